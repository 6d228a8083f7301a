"""Agently key paths and JSONPath (SPEC §1 "Key paths"), cross-checked against Agently's own lookup."""

from __future__ import annotations

import json
from typing import Any

import pytest
from agently.core.session.Session import Session

from gateway.paths import KeyPath, compile_key
from gateway.session.record import ReplyView, RequestView, build_reply_view, build_request_view

INPUT = {
    "ticket_id": "T-1001",
    "lang": "en",
    "a": [{"b": 1, "c": "x"}, {"b": 2}],
    "matrix": [[1, 2], [3, 4]],
    "dotted.key": "literal",
    "flag": False,
    "nothing": None,
}


def json_request(data: Any, system: str | None = "SYS") -> RequestView:
    """A request whose last user message is ``data`` as JSON."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": json.dumps(data)})
    return build_request_view({"model": "gpt-x", "temperature": 0.2, "messages": messages})


def prompt_request() -> RequestView:
    """A request carrying an Agently-rendered prompt with info, instruct and input slots."""
    content = (
        "[INFO]:\n- task: Summarize #0\n- owner: ops\n\n[INSTRUCT]:\nbe brief\n\n"
        "[INPUT]:\nlang: en\nitems:\n- name: one\n  n: 1\n- name: two\n  n: 2\n\n\n[OUTPUT]:"
    )
    return build_request_view(
        {
            "model": "m",
            "messages": [{"role": "system", "content": "SYS-C"}, {"role": "user", "content": content}],
        }
    )


def agently_input(view: RequestView, key: str) -> tuple[bool, Any]:
    """Agently's own answer for an input key over the same structured data."""
    agent_data = {"system": view.system} if view.system is not None else {}
    return Session._extract_input_value(dict(view.slots), key, agent_data)


def test_roots_are_classified() -> None:
    """Each key form maps to its root: request, agent_system, jsonpath or the structured view."""
    roots = {
        ".request": "request",
        ".execution": "request",
        ".request.model": "request",
        ".execution.temperature": "request",
        ".agent.system": "agent_system",
        "$.model": "jsonpath",
        "input.lang": "view",
        "info.task": "view",
        "lang": "view",
        "a/0/b": "view",
    }
    assert {key: compile_key(key).root for key in roots} == roots


def test_compile_is_cached_and_keeps_source() -> None:
    """Compiling the same key twice returns the same object, and the source is the key as written."""
    assert compile_key("input.lang") is compile_key("input.lang")
    assert compile_key(" input.lang ").source == " input.lang "
    assert isinstance(compile_key("a[*].b"), KeyPath)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "   ",
        "a[x]",
        "a[1",
        "a]",
        "a[1][2]",
        "a..b",
        "a.",
        ".b",
        "/",
        "//",
        ".foo",
        ".agent",
        ".agent.info",
        "$..[",
        "$.a[",
        "$$",
    ],
)
def test_invalid_keys_raise_value_error(key: str) -> None:
    """A key with invalid syntax is refused at compile time with a ValueError that names it."""
    with pytest.raises(ValueError) as info:
        compile_key(key)
    assert "key" in str(info.value)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("input.ticket_id", "T-1001"),
        ("ticket_id", "T-1001"),
        ("input/lang", "en"),
        ("lang", "en"),
        ("input", INPUT),
        ("input.a[1].b", 2),
        ("a[0].c", "x"),
        ("a[-1].b", 2),
        ("a[*].b", [1, 2]),
        ("a[].b", [1, 2]),
        ("input.a/0/c", "x"),
        ("a/1/b", 2),
        ("a/*/b", [1, 2]),
        ("input/a/[1]/b", 2),
        ("matrix[1]", [3, 4]),
        ("matrix/1/0", 3),
        ("input.dotted.key", "literal"),
        ("dotted.key", "literal"),
        ("flag", False),
        ("nothing", None),
    ],
)
def test_view_keys_find_values(key: str, expected: Any) -> None:
    """Dot, slash, index, wildcard, literal and bare-name keys find the same value as Agently does."""
    view = json_request(INPUT)
    assert compile_key(key).find(view) == (True, expected)
    assert agently_input(view, key) == (True, expected)


@pytest.mark.parametrize(
    "key",
    [
        "missing",
        "input.missing",
        "a[5].b",
        "a[*].c",
        "a/9/b",
        "matrix.0",
        "a[0].b.c",
        "lang.x",
        "input/a/x/b",
    ],
)
def test_missing_view_keys_are_not_found(key: str) -> None:
    """A path that leads nowhere is not found, exactly where Agently does not find it either."""
    view = json_request(INPUT)
    assert compile_key(key).find(view) == (False, None)
    assert agently_input(view, key)[0] is False


def test_wildcard_needs_every_item() -> None:
    """A wildcard is found only when every list item has the rest of the path (Agently's rule)."""
    view = json_request({"a": [{"b": 1}, {"c": 2}], "empty": []})
    assert compile_key("a[*].b").find(view) == (False, None)
    assert compile_key("empty[*].b").find(view) == (True, [])
    assert agently_input(view, "a[*].b") == (False, None)
    assert agently_input(view, "empty[*].b") == (True, [])


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("info.task", "Summarize #0"),
        ("info", {"task": "Summarize #0", "owner": "ops"}),
        ("instruct", "be brief"),
        ("input/lang", "en"),
        ("items[1].name", "two"),
        ("input.items[*].n", [1, 2]),
        ("items/0/n", 1),
        (".agent.system", "SYS-C"),
    ],
)
def test_prompt_slots_match_agently(key: str, expected: Any) -> None:
    """Keys over an Agently-rendered prompt find the slot values, as Agently's lookup does over them."""
    view = prompt_request()
    assert compile_key(key).find(view) == (True, expected)
    assert agently_input(view, key) == (True, expected)


def test_request_root_addresses_the_raw_body_then_the_slots() -> None:
    """``.request``/``.execution`` address the body as sent, and fall back to the structured request."""
    view = json_request({"lang": "en"})
    assert compile_key(".request").find(view) == (True, view.request)
    assert compile_key(".execution").find(view) == (True, view.request)
    assert compile_key(".request.model").find(view) == (True, "gpt-x")
    assert compile_key(".execution.temperature").find(view) == (True, 0.2)
    assert compile_key(".request.messages[0].content").find(view) == (True, "SYS")
    assert compile_key(".execution.input.lang").find(view) == (True, "en")
    assert compile_key(".request.top_p").find(view) == (False, None)


def test_agent_system_is_missing_without_a_system_message() -> None:
    """``.agent.system`` is not found in a request that has no system message."""
    view = json_request({"lang": "en"}, system=None)
    assert compile_key(".agent.system").find(view) == (False, None)
    assert agently_input(view, ".agent.system")[0] is False


def test_jsonpath_on_the_request_body() -> None:
    """JSONPath runs on the raw body: one match gives the value, several a list, filters work."""
    view = json_request({"lang": "en"})
    assert compile_key("$.model").find(view) == (True, "gpt-x")
    assert compile_key("$.messages[*].role").find(view) == (True, ["system", "user"])
    assert compile_key("$.messages[?(@.role == 'system')].content").find(view) == (True, "SYS")
    assert compile_key("$.nope").find(view) == (False, None)


def test_jsonpath_on_the_raw_reply() -> None:
    """JSONPath reply keys run on the whole chat.completion body."""
    message = {"role": "assistant", "content": "plain text"}
    response = {"id": "c1", "choices": [{"index": 0, "message": message}], "usage": {"total_tokens": 9}}
    assert compile_key("$.usage.total_tokens").find(build_reply_view(message, response)) == (True, 9)
    synthetic = build_reply_view(message, None)
    assert compile_key("$.choices[0].message.content").find(synthetic) == (True, "plain text")


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("summary", "ok"),
        ("scores.total", 50),
        ("scores/total", 50),
        ("tags[1]", "b"),
        ("tags[*]", ["a", "b"]),
        ("items[*].id", [1, 2]),
        ("a.b", "literal dotted"),
    ],
)
def test_reply_keys_match_agently(key: str, expected: Any) -> None:
    """Reply keys find the value that Agently's ``_extract_by_path`` finds in the parsed reply."""
    data = {
        "summary": "ok",
        "scores": {"total": 50},
        "tags": ["a", "b"],
        "items": [{"id": 1}, {"id": 2}],
        "a.b": "literal dotted",
    }
    view: ReplyView = build_reply_view({"role": "assistant", "content": json.dumps(data)}, None)
    assert compile_key(key).find(view) == (True, expected)
    assert Session._extract_by_path(data, key) == (True, expected)


def test_request_keys_find_nothing_in_a_reply() -> None:
    """Request-only roots and the input fallback do not apply to a reply."""
    view = build_reply_view({"role": "assistant", "content": '{"input": {"lang": "en"}}'}, None)
    assert compile_key(".request.model").find(view) == (False, None)
    assert compile_key(".agent.system").find(view) == (False, None)
    assert compile_key("lang").find(view) == (False, None)
    assert compile_key("input.lang").find(view) == (True, "en")


@pytest.mark.parametrize("key", [
    "$.messages[?(@.content =~ '(a+)+$')].role",
    "$.messages[?(@.x =~ '(')]",
    "$.messages[?(@.role == 'user' && @.content =~ 'x')].content",
    "$.a[?(@.b[?(@.c =~ 'x')])]",
    "$.metadata.`sub(/(a+)+$/, b)`",
])
def test_a_jsonpath_holding_a_regular_expression_is_refused(key: str) -> None:
    """A =~ filter or sub(/regex/) would run a policy author's regex on client text for every request: refused."""
    with pytest.raises(ValueError, match="not allowed"):
        compile_key(key)


@pytest.mark.parametrize("key", [
    "$.a * $.b",
    "$.metadata.a + $.metadata.b",
    "$.a - 1",
    "$.a * 2",
    "$.messages[?(@.n * 1000000 > 1)]",
    "$.messages[/(@.a * @.b)]",
    "$.messages[?(@.role == 'user' && @.content.`str()` == 'x')]",
    "$.metadata.`str()`",
    "$.metadata.`split(-, *, -1)`",
    "$.metadata.`split(-, 1, 1)`",
])
def test_a_jsonpath_computing_new_values_from_the_client_values_is_refused(key: str) -> None:
    """Arithmetic, split() and str() build values from what the client sent ("x" * 2000000 is 2 GB): refused."""
    with pytest.raises(ValueError, match="is not allowed"):
        compile_key(key)


@pytest.mark.parametrize(("key", "expected"), [
    ("$.metadata.tags.`len`", 3),
    ("$.metadata.tags.`sorted`", ["a", "b", "c"]),
    ("$.metadata.`keys`", ["tags", "x-y"]),
    ("$.metadata.x-y", 1),
])
def test_a_jsonpath_that_only_selects_or_measures_is_allowed(key: str, expected: Any) -> None:
    """len, sorted and keys (bounded by what the body holds) still compile, and a '-' inside a name is a name."""
    view = build_request_view({"model": "m", "metadata": {"tags": ["c", "a", "b"], "x-y": 1},
                               "messages": [{"role": "user", "content": "hi"}]})
    assert compile_key(key).find(view) == (True, expected)


def test_a_filter_that_only_quotes_the_operator_is_allowed() -> None:
    """Only the operator is refused: '=~' as a compared value is plain text."""
    found = compile_key("$.messages[?(@.role == '=~')].content").find(
        build_request_view({"model": "m", "messages": [{"role": "=~", "content": "hi"}]}))
    assert found == (True, "hi")


@pytest.mark.parametrize(("key", "metadata"), [
    ("$.metadata.`sorted`", "a-string"),
    ("$.metadata.`sorted`", 5),
    ("$.metadata.`keys`", "a-string"),
    ("$.metadata.`len`", 5),
    ("$.metadata[?(@.n > 1)]", [{"n": "a"}, {"n": [1]}]),
])
def test_a_jsonpath_operator_that_fails_on_the_client_value_means_not_found(key: str, metadata: Any) -> None:
    """find never raises: an operator that cannot handle the type the client sent finds nothing."""
    view = build_request_view({"model": "m", "metadata": metadata, "messages": [{"role": "user", "content": "hi"}]})
    assert compile_key(key).find(view) == (False, None)
