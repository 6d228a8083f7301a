"""One request must not freeze the gateway or break its record (SPEC §3 "one client cannot stall
the others"): the structured parse of a user message is bounded (libyaml only, no aliases, a
depth limit, a work budget) and runs off the event loop when the input is large; JSON bodies
nested too deep are refused at parse time with 400."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
import yaml

import gateway.session.record as record_module
from benchmarks.yaml_body import KEYED_MODEL, worst_body
from gateway.audit import entry_fields
from gateway.paths import MISSING, compile_key
from gateway.session.record import (
    MAX_PARSE_UNITS,
    MAX_STRUCTURE_DEPTH,
    build_request_view,
    parse_user_text,
    render_user,
)
from gateway.store.sqlite import SQLiteStore
from tests.conftest import ACME_KEY, Gateway

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}
MAX_BODY = 4 * 1024 * 1024  # the default server.max_body_bytes


def stored(gateway: Gateway) -> tuple[list[Any], list[dict[str, Any]]]:
    """The acme round rows and round audit entries, read through the SQLite store."""

    async def read() -> tuple[list[Any], list[dict[str, Any]]]:
        store = SQLiteStore(gateway.db_path)
        await store.open()
        try:
            rounds = [r async for r in store.iter_rounds("acme")]
            entries = [entry_fields(a) async for a in store.iter_audit("acme")]
        finally:
            await store.close()
        return rounds, [e for e in entries if e["event"] == "round"]

    return asyncio.run(read())


def keyed_slots(content: str) -> dict[str, Any]:
    return parse_user_text(content)


def nested_flow(depth: int) -> str:
    return "[" * depth + "x" + "]" * depth


def nested_block(depth: int) -> str:
    return "\n".join("  " * level + f"k{level}:" for level in range(depth)) + " leaf"


# --- the parse itself --------------------------------------------------------------------------


def test_the_pure_python_yaml_parser_is_never_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """A section with a ``*`` (bold markdown, a quoted star) is read by libyaml like any other:
    the pure-Python composer, which froze the event loop, is never reached."""

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the pure-Python YAML composer ran")

    monkeypatch.setattr(yaml.composer.Composer, "compose_node", forbidden)
    slots = keyed_slots("[INPUT]:\nticket_id: T-1\nnote: '**bold**'\n\n[INSTRUCT]:\nstars: '*'\n")
    assert slots == {"input": {"ticket_id": "T-1", "note": "**bold**"}, "instruct": {"stars": "*"}}


def test_yaml_aliases_leave_the_section_as_text() -> None:
    """An alias (a billion-laughs seed) is never expanded: the section stays text."""
    body = "a: &a [x, x, x]\nb: &b [*a, *a, *a]\nc: [*b, *b, *b]"
    assert keyed_slots("[INPUT]:\n" + body) == {"input": body}


@pytest.mark.parametrize("make", [nested_flow, nested_block], ids=["flow", "block"])
def test_yaml_nesting_is_bounded(make: Callable[[int], str]) -> None:
    """YAML nested up to the depth limit is structure; one level more stays text."""
    fits, too_deep = make(MAX_STRUCTURE_DEPTH - 1), make(MAX_STRUCTURE_DEPTH + 1)
    assert not isinstance(keyed_slots("[INPUT]:\n" + fits)["input"], str)
    assert keyed_slots("[INPUT]:\n" + too_deep)["input"] == too_deep


@pytest.mark.parametrize("text", [
    "[INPUT]:\n" + "[" * 900 + "]" * 900,                  # JSON orjson reads (under its 1024 limit)
    "[" * 900 + "]" * 900,                                 # the whole message as JSON
    "[INPUT]:\nnote: '*'\nv: " + nested_flow(1500),        # deep YAML with a star
    "[INPUT]:\na: " + "1" * 5000,                          # an int Python refuses to convert
    "[INFO]:\n- a: " + "[" * 150 + "]" * 150,              # an Agently info literal
])
def test_hostile_sections_never_raise_and_stay_text(text: str) -> None:
    """Inputs that used to raise RecursionError or ValueError in the record are recorded as text."""
    view = build_request_view({"messages": [{"role": "user", "content": text}]})
    recorded = render_user([compile_key("input"), compile_key("info")], view.messages, view)
    assert recorded is not None and len(recorded) >= len(text) // 2


def test_the_work_budget_is_shared_by_all_sections() -> None:
    """Once one message's parse budget is spent, its later sections stay text (a message cannot
    make the gateway parse megabytes of YAML), while early ones are structure."""
    section = "[" + ", ".join(["a"] * 1000) + "]"
    sections = "".join(f"[S{n}]:\n{section}\n\n" for n in range(3 * MAX_PARSE_UNITS // 1000))
    slots = keyed_slots(sections)
    assert isinstance(slots["s0"], list) and len(slots["s0"]) == 1000
    assert slots[f"s{3 * MAX_PARSE_UNITS // 1000 - 1}"] == section
    parsed = sum(1 for value in slots.values() if isinstance(value, list))
    assert 0 < parsed <= MAX_PARSE_UNITS // 1000


def test_one_big_yaml_section_stays_text() -> None:
    """A single section larger than the budget is not built at all."""
    body = "\n".join(f"k{n}: v" for n in range(MAX_PARSE_UNITS))
    assert keyed_slots("[INPUT]:\n" + body)["input"] == body


def test_info_continuation_lines_are_kept() -> None:
    """Agently's ``- title: content`` info keeps content that continues over several lines."""
    info = keyed_slots("[INFO]:\n- task: first\nsecond\n- note: [1, 2]\n\n[INPUT]:\nq")["info"]
    assert info == {"task": "first\nsecond", "note": [1, 2]}
    mixed = keyed_slots("[INFO]:\n- plain\nmore\n- t: c\n\n[INPUT]:\nq")["info"]
    assert mixed == ["plain\nmore", "t: c"]


# --- over HTTP ---------------------------------------------------------------------------------


def chat(gateway: Gateway, content: str, session: str, **extra: Any) -> httpx.Response:
    return httpx.post(f"{gateway.base_url}/chat/completions", headers={**AUTH, "X-Session-Id": session},
                      json={"model": KEYED_MODEL, "messages": [{"role": "user", "content": content}], **extra},
                      timeout=120)


def test_worst_body_does_not_stall_other_clients(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the worst body the limits allow is being parsed (held in the middle of its parse),
    concurrent /healthz and chat requests over real sockets are answered: they finish before it."""
    body = worst_body(MAX_BODY)
    entered, release = threading.Event(), threading.Event()
    original = record_module.parse_user_text

    def held(text: str) -> dict[str, Any]:
        if len(text) > MAX_BODY // 2:
            entered.set()
            release.wait(20)  # on the event loop this would block every other client
        return original(text)

    monkeypatch.setattr(record_module, "parse_user_text", held)
    finished: list[str] = []
    big_status: list[int] = []

    def big() -> None:
        resp = httpx.post(f"{gateway.base_url}/chat/completions", content=body, timeout=120,
                          headers={**AUTH, "X-Session-Id": "support:worst", "Content-Type": "application/json"})
        big_status.append(resp.status_code)
        finished.append("big")

    sender = threading.Thread(target=big)
    sender.start()
    try:
        assert entered.wait(60), "the big request never reached the record step"
        with httpx.Client(timeout=10) as client:
            for n in range(3):
                assert client.get(f"{gateway.url}/healthz").status_code == 200
                finished.append("healthz")
                small = client.post(f"{gateway.base_url}/chat/completions", headers={**AUTH, "X-Session-Id": f"s-{n}"},
                                    json={"model": "standin", "messages": [{"role": "user", "content": f"hi {n}"}]})
                assert small.status_code == 200
                finished.append("chat")
    finally:
        release.set()
        sender.join(120)
    assert finished == ["healthz", "chat"] * 3 + ["big"]
    assert big_status == [200]
    rounds, entries = stored(gateway)
    worst = [e for e in entries if e["session_id"] == "support:worst"]
    assert len(worst) == 1 and worst[0]["outcome"] == "completed"
    assert worst[0]["recorded"] == ["user"]  # the stand-in's text reply holds no whitelisted reply key


def test_worst_body_is_answered_and_recorded_under_the_budget(gateway: Gateway) -> None:
    """Unheld, the worst body is answered (streamed too) and its whitelisted keys are recorded."""
    body = orjson.loads(worst_body(MAX_BODY, stream=True))
    resp = chat(gateway, body["messages"][0]["content"], "support:worst-stream", stream=True)
    assert resp.status_code == 200 and resp.text.rstrip().endswith("data: [DONE]")
    exported = httpx.get(f"{gateway.base_url}/sessions/support:worst-stream", headers=AUTH).json()
    assert exported["full_context"][0]["content"] == "[input.ticket_id]:\nT-1\n[input.intent]:\nrefund"


DEEP_SECTIONS = [
    "[INPUT]:\nticket_id: T-9\nnote: '*'\ndeep: " + nested_flow(1500),
    "[INPUT]:\n" + "[" * 1000 + "]" * 1000,
    "[INPUT]:\n" + "{\"a\": " * 900 + "1" + "}" * 900,
]


@pytest.mark.parametrize("content", DEEP_SECTIONS)
@pytest.mark.parametrize(("model", "session"), [(KEYED_MODEL, "support:deep"), ("standin", "plain-deep")],
                         ids=["keyed", "null-keys"])
def test_deeply_nested_input_section_is_answered_recorded_and_audited(gateway: Gateway, content: str, model: str,
                                                                      session: str) -> None:
    """The [INPUT] section nested 1,000+ deep (the reported attack) no longer breaks the record:
    the reply is complete and the round is audited as completed; under null keys its whole text
    is recorded, under keys it is text, so no structured key is found in it."""
    resp = httpx.post(f"{gateway.base_url}/chat/completions", headers={**AUTH, "X-Session-Id": session}, timeout=60,
                      json={"model": model, "stream": True, "messages": [{"role": "user", "content": content}]})
    assert resp.status_code == 200 and "data: [DONE]" in resp.text
    rounds, entries = stored(gateway)
    assert [(e["session_id"], e["outcome"]) for e in entries] == [(session, "completed")]
    if model == "standin":
        assert [r.outcome for r in rounds] == ["completed"]
        exported = httpx.get(f"{gateway.base_url}/sessions/{session}", headers=AUTH).json()
        assert exported["full_context"][0]["content"] == content
    else:
        assert entries[0]["recorded"] == []


@pytest.mark.parametrize("depth", [MAX_STRUCTURE_DEPTH * 2 + 1, 200, 1100])
def test_json_body_nested_too_deep_is_400(gateway: Gateway, depth: int) -> None:
    """A request body nested deeper than 128 levels (orjson alone allows 1,024) is refused at parse
    time with 400 in OpenAI's shape, and nothing is stored or forwarded."""
    nested = "[" * depth + "]" * depth
    raw = ('{"model": "standin", "messages": [{"role": "user", "content": "q", "extra": ' + nested + "}]}").encode()
    resp = httpx.post(f"{gateway.base_url}/chat/completions", content=raw, timeout=30,
                      headers={**AUTH, "X-Session-Id": "support:deep-json", "Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid_json" and "deeper than 128" in error["message"]
    assert stored(gateway) == ([], [])


def test_structured_json_content_nested_too_deep_is_400(gateway: Gateway) -> None:
    """A message whose content is a JSON object nested 500 deep is refused before it is recorded,
    and nothing is stored."""
    content = '{"k": ' * 500 + '"leaf"' + "}" * 500
    raw = ('{"model": "' + KEYED_MODEL + '", "messages": [{"role": "user", "content": ' + content + "}]}").encode()
    resp = httpx.post(f"{gateway.base_url}/chat/completions", timeout=30, content=raw,
                      headers={**AUTH, "X-Session-Id": "support:deep-object", "Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"
    assert stored(gateway) == ([], [])


def test_bodies_at_the_depth_limit_pass(gateway: Gateway) -> None:
    """A body nested exactly 128 deep (strings full of brackets do not count) is answered."""
    nested = "[" * 124 + "]" * 124  # + body, messages, message = 127 ... 128 with the list itself
    raw = ('{"model": "standin", "messages": [{"role": "user", "content": "[[[{{{ not structure", '
           '"extra": ' + nested + "}]}").encode()
    resp = httpx.post(f"{gateway.base_url}/chat/completions", content=raw, timeout=30,
                      headers={**AUTH, "Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text


def test_many_concurrent_big_bodies_are_all_answered(gateway: Gateway) -> None:
    """Several large keyed requests at once each get their reply (worker threads, no deadlock)."""
    content = orjson.loads(worst_body(MAX_BODY // 8))["messages"][0]["content"]
    statuses: list[int] = []

    def one(n: int) -> None:
        statuses.append(chat(gateway, content, f"support:many-{n}").status_code)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(4)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert statuses == [200] * 4, (statuses, time.monotonic() - started)


def test_fenced_blocks_match_the_old_expression() -> None:
    """The linear fence scanner finds exactly what the backtracking expression found."""
    import random
    import re

    expression = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
    pieces = ["`", "```", "````", "\n", "json", "py-3", " ", "\t", "a", "{}", '{"k": 1}']
    rng = random.Random(9)
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        assert record_module.fenced_blocks(text) == expression.findall(text), repr(text)


def test_a_reply_of_backticks_is_parsed_in_one_pass() -> None:
    """A reply made of 300,000 backticks (no line end: no block) is read as no JSON at all, and a
    block after many openers is still found."""
    assert record_module.parse_reply_json("```" * 100_000) is MISSING
    text = "``` " * 50_000 + "\n" + '{"risk_level": "low"}' + "```"
    assert record_module.fenced_blocks(text)[0][1] == '{"risk_level": "low"}'
