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


# --- JSONPath evaluation: jsonpath-ng's values, with bounded work ------------------------------

DIFF_BODIES: list[Any] = [
    {"model": "m", "messages": [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "u"}}],
         "name": "bob"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]}],
     "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
     "n": 1, "temperature": 0.5, "stream": False, "x": [3, 1, 2], "y": {"b": 2, "a": 1},
     "z": [{"k": 2}, {"k": 1}, {"k": "s"}], "t": True, "nn": None, "content": {"content": {"content": "deep"}}},
    {"a": [1, [2, [3]], {"a": 4}], "b": {"a": {"a": 5}}, "c": "str", "d": [], "e": {},
     "f": [True, False, 0, 1, None, "1", 1.0]},
    {"": 1, "*": 2, "a b": 3, "m": [{"a": 1}, {"a": [1]}, {"a": {"a": 1}}]},
]
DIFF_KEYS = [
    "$", "$.messages[*].content", "$.messages[*].name", "$..content", "$..*", "$.tools", "$.messages[0]",
    "$.messages[-1].role", "$.messages[0:2].role", "$.messages[::-1].role", "$.messages[::0]", "$.x[1:]", "$..a",
    "$.a[*]", "$.*", "$[*]", "$[0,0,-1]", "$['a','a']", "$['*']", "$.nn", "$.t", "$.`len`", "$.`sorted`",
    "$.messages[?(@.role == 'user')].content", "$.messages[?(@.role != 'user')]", "$.messages[?(@.name)]",
    "$.messages[?(!@.name)]", "$.f[?(@ == 1)]", "$.f[?(@ == true)]", "$.f[?(@ == null)]", "$.f[?(@ != null)]",
    "$.f[?(@ > 0)]", "$.f[?(@ >= '1')]", "$.z[?(@.k > 1 || @.k == 's')]", "$.z[?(@.k > 0 && @.k < 2)]",
    "$.z[?(@.k == $.n)]", "$.messages[?(@.role == $.messages[0].role)]", "$.m[?(@.a == $.m[1].a)]",
    "$.x.`len`", "$.y.`keys`", "$.x.`sorted`", "$.y.`sorted`", "$.z[/k]", "$.z[\\k]", "$.c.`sorted`",
    "$.messages[*].`path`", "$..`path`", "$.messages[*].role.`parent`", "$.a[*].`parent`", "$.messages[*].$",
    "$.a | $.b", "$.a & $.b", "$.messages where name", "$.messages[*] where name", "$.messages[*] wherenot name",
    "$..[?(@.a)]", "$..[?(@ == 5)]", "$..content..content", "$.a..a", "$..a.`len`", "$.y.`sorted`[0]",
    "$.*.`path`", "$.a[?(@[0] == 2)]", "$.content..*", "$..[?($.t == true)]", "$.b..[?(@ == $.b.a.a)]",
    "$.z[/k].`len`", "$.x[?(@ > 1)].`path`", "$..*.`parent`.`len`",
    "$.messages[*].content[?(@.type=='text')].text",
]


def jsonpath_ng_outcome(key: str, data: Any) -> str:
    """What the key gave under jsonpath-ng (values, or the type of the error it raised), as text."""
    from jsonpath_ng.ext import parse
    try:
        return repr(("values", [match.value for match in parse(key).find(data)]))
    except Exception as exc:  # noqa: BLE001 - the error's type is part of the outcome
        return repr(("error", type(exc).__name__))


def our_outcome(key: str, data: Any) -> str:
    try:
        return repr(("values", compile_key(key).jsonpath.values(data)))
    except Exception as exc:  # noqa: BLE001
        return repr(("error", type(exc).__name__))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("key", DIFF_KEYS)
def test_jsonpath_keys_find_what_jsonpath_ng_finds(key: str) -> None:
    """Every key finds jsonpath-ng's values in its order (``repr``, so ``1``, ``1.0`` and ``True``
    differ), and fails where jsonpath-ng fails, with the same error type."""
    for data in DIFF_BODIES:
        assert our_outcome(key, data) == jsonpath_ng_outcome(key, data), (key, data)


def _json_values() -> Any:
    from hypothesis import strategies as st
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([0.5, 1.0]),
                        st.sampled_from(["", "a", "b", "1", "content"]))
    names = st.sampled_from(["a", "b", "content", "role", "k"])
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(names, inner, max_size=4)), max_leaves=20)


def _keys() -> Any:
    from hypothesis import strategies as st
    literal = st.sampled_from(["1", "'a'", "true", "null", "0.5", "$.a", "@.b"])
    test = st.one_of(st.sampled_from(["@.a", "@.content", "!@.k", "@.a.`len`", "@[0]"]),
                     st.builds(lambda t, op, v: f"{t} {op} {v}", st.sampled_from(["@.a", "@", "@.k", "@[0]"]),
                               st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), literal))
    segment = st.one_of(
        st.sampled_from([".a", ".b", ".content", ".*", "[*]", "[0]", "[-1]", "[0,0]", "[1:]", "[::-1]", "[:2]",
                         "..a", "..content", "..*", "['a','b']", ".`len`", ".`keys`", ".`path`", ".`parent`",
                         ".`sorted`", "[/k]", "[\\a]", ".$", ".`this`"]),
        st.builds(lambda t: f"[?({t})]", test),
        st.builds(lambda a, b: f"[?({a} || {b})]", test, test),
        st.builds(lambda a, b: f"[?({a} && {b})]", test, test),
        st.builds(lambda t: f"..[?({t})]", test),
    )
    return st.builds(lambda parts: "$" + "".join(parts), st.lists(segment, min_size=1, max_size=4))


def test_jsonpath_keys_match_jsonpath_ng_on_generated_keys_and_bodies() -> None:
    """A bounded property test: on generated keys and JSON values, the evaluator and jsonpath-ng
    agree (values in order, or the same error type)."""
    import warnings

    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(key=_keys(), data=_json_values())
    def agree(key: str, data: Any) -> None:
        try:
            compile_key(key)
        except ValueError:
            return  # a key jsonpath-ng cannot parse either, or one refused as computing
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert our_outcome(key, data) == jsonpath_ng_outcome(key, data)

    agree()


HOSTILE_BODIES = {
    "$.messages[*].content": {"model": "m", "messages": [{"role": "user"}] * 400_000},
    "$..content": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "junk": [[]] * 500_000},
    "$.junk[*]": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "junk": [0] * 500_000},
    "$..*": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "junk": [0] * 500_000},
    "$.messages[?(@.role == 'user')].role": {"model": "m", "messages": [{"role": "user"}] * 100_000},
    "$.junk.`sorted`": {"junk": [[0] * 50] * 2000},
}


@pytest.mark.parametrize("key", sorted(HOSTILE_BODIES))
def test_a_jsonpath_key_on_a_padded_body_stops_at_its_budget(key: str) -> None:
    """A key on a body padded with values (the size a client controls) raises KeyBudgetExceeded
    once its counted work passes WORK_BUDGET, instead of walking the whole body (jsonpath-ng took
    seconds on these) or coming out "not found"."""
    from gateway.jsonpath import WORK_BUDGET, KeyBudgetExceeded
    body = HOSTILE_BODIES[key]
    with pytest.raises(KeyBudgetExceeded) as raised:
        compile_key(key).find(build_request_view(body))
    assert raised.value.what == "work" and raised.value.limit == WORK_BUDGET


def test_output_repeated_per_ancestor_is_counted() -> None:
    """``$..*`` holds every value once per ancestor: a long string nested 100 deep would be
    recorded 100 times, so the output, not only the walk, is bounded."""
    from gateway.jsonpath import MAX_OUTPUT_CHARS, KeyBudgetExceeded
    deep: Any = "x" * (MAX_OUTPUT_CHARS // 50)
    for _ in range(100):
        deep = [deep]
    with pytest.raises(KeyBudgetExceeded) as raised:
        compile_key("$..*").find(build_request_view({"deep": deep}))
    assert raised.value.what == "output"
    assert compile_key("$.deep").find(build_request_view({"deep": deep}))[0]  # once is fine


@pytest.mark.parametrize("key", ["$.messages[*].content", "$.messages[*].name", "$..content", "$.tools", "$..*",
                                 "$.messages[?(@.role == 'user')].content"])
def test_keys_on_a_normal_chat_body_cost_a_few_hundred_units(key: str) -> None:
    """The benchmark's chat body (13 turns) costs a key at most a few hundred units of work,
    far below the budget."""
    import orjson

    from benchmarks.load import request_body
    body = orjson.loads(request_body(7, False, "gpt-4o-mini", history=[f"earlier {i}" for i in range(12)]))
    assert compile_key(key).jsonpath.cost(body) < 600
