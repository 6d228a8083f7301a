"""A client cannot keep what it sent out of the record, or make recording fail quietly (SPEC §3):
a ``[CHAT SESSION MEMO]:`` header is client text like any other; a record step that fails stores
an incomplete round and an audit entry and withholds the end of the reply; ``model`` is checked
before it is logged or audited; no exception text from code that saw content reaches a log."""

from __future__ import annotations

import asyncio
import shutil
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import structlog

import gateway.stages.record as record_stage
from gateway import pipeline
from gateway.sessions import SessionService
from tests.conftest import ACME_KEY, REPO, Gateway, Upstream

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}
CANARY = "CANARY-7f3e-hidden-from-record"
EXC_CANARY = "CANARY-exc-4111111111111111"


def entries_of(gateway: Gateway, event: str = "round") -> list[dict[str, Any]]:
    return [e for e in gateway.audit_entries() if e["event"] == event]


def exported(gateway: Gateway, session: str) -> dict[str, Any]:
    resp = httpx.get(f"{gateway.base_url}/sessions/{session}", headers=AUTH)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def last_user_upstream(upstream: Upstream) -> str:
    return str(upstream.requests[-1]["messages"][-1]["content"])


# --- the memo header trick -------------------------------------------------------------------


def test_memo_header_text_is_recorded_under_null_keys(gateway: Gateway, upstream: Upstream) -> None:
    """A user message that starts with ``[CHAT SESSION MEMO]:\\n…\\n\\n`` is recorded whole: the
    model saw all of it, so the record holds all of it."""
    content = f"[CHAT SESSION MEMO]:\n{CANARY}\n\nwhat is the weather?"
    gateway.openai(session="memo-trick").chat.completions.create(
        model="standin", messages=[{"role": "user", "content": content}])
    assert last_user_upstream(upstream) == content
    assert exported(gateway, "memo-trick")["full_context"][0] == {"role": "user", "content": content}


def test_memo_header_with_a_real_memo_records_exactly_the_client_text(gateway: Gateway, upstream: Upstream) -> None:
    """With a gateway memo injected in front, the model sees memo + client text; the record holds
    exactly the client's text (not the gateway's memo, not less)."""
    resp = httpx.put(f"{gateway.base_url}/sessions/memo-real", headers=AUTH,
                     json={"full_context": [], "memo": "the gateway's memo"})
    assert resp.status_code == 200, resp.text
    content = f"[CHAT SESSION MEMO]:\n{CANARY}\n\nnext question"
    gateway.openai(session="memo-real").chat.completions.create(
        model="standin", messages=[{"role": "user", "content": content}])
    sent = last_user_upstream(upstream)
    # Agently's rendering: the memo section, then the client's text as [INPUT], then [OUTPUT]:
    assert sent == f"[CHAT SESSION MEMO]:\nthe gateway's memo\n\n[INPUT]:\n{content}\n\n[OUTPUT]:"
    assert exported(gateway, "memo-real")["full_context"][0] == {"role": "user", "content": content}


MEMO_POLICY = """\
id: memo-keys
priority: 50
match:
  session_ids: ["memo-keyed:*"]
session:
  input_keys: {keys}
  reply_keys: []
  max_length: 12000
  bounding: {{strategy: simple_cut}}
  inject: {{context_window: true, memo: true, memo_placement: user_section}}
"""


@pytest.fixture
def keyed(make_gateway: Callable[..., Gateway], tmp_path: Path) -> Callable[[str], Gateway]:
    def make(keys: str) -> Gateway:
        policies = tmp_path / f"policies-{abs(hash(keys))}"
        shutil.copytree(REPO / "policies", policies)
        (policies / "memo-keys.yaml").write_text(MEMO_POLICY.format(keys=keys))
        return make_gateway(policies, name=f"gw-{abs(hash(keys))}")

    return make


def test_memo_header_is_a_section_under_keyed_policies(keyed: Callable[[str], Gateway]) -> None:
    """Under a keyed policy the client's memo header is just a section of client text: the
    whitelist decides; it is recorded when whitelisted, and the rest of the message still is."""
    gateway = keyed('["input.ticket_id", "chat_session_memo"]')
    content = f"[CHAT SESSION MEMO]:\n{CANARY}\n\n[INPUT]:\nticket_id: T-1\nsecret: not whitelisted"
    gateway.openai(session="memo-keyed:1").chat.completions.create(
        model="standin", messages=[{"role": "user", "content": content}])
    recorded = exported(gateway, "memo-keyed:1")["full_context"][0]["content"]
    assert recorded == f"[input.ticket_id]:\nT-1\n[chat_session_memo]:\n{CANARY}"


def test_keyed_policy_without_the_memo_key_records_none_of_it(keyed: Callable[[str], Gateway]) -> None:
    """The whitelist still holds: without ``chat_session_memo`` in the keys, its text is not recorded."""
    gateway = keyed('["input.ticket_id"]')
    content = f"[CHAT SESSION MEMO]:\n{CANARY}\n\n[INPUT]:\nticket_id: T-2"
    gateway.openai(session="memo-keyed:2").chat.completions.create(
        model="standin", messages=[{"role": "user", "content": content}])
    document = exported(gateway, "memo-keyed:2")
    assert document["full_context"][0]["content"] == "[input.ticket_id]:\nT-2"
    assert CANARY not in orjson.dumps(document).decode()


# --- roles the gateway does not know --------------------------------------------------------


@pytest.mark.parametrize("role", ["narrator", "User", "Tool"])
def test_a_message_under_an_unknown_role_is_recorded(gateway: Gateway, upstream: Upstream, role: str) -> None:
    """OpenAI refuses roles it does not know, but a lenient provider (an OpenAI-compatible
    server that lower-cases roles or renders any role into its chat template) shows the message
    to the model, so the record must hold it too."""
    messages = [{"role": role, "content": CANARY}, {"role": "user", "content": "and hello"}]
    resp = httpx.post(f"{gateway.base_url}/chat/completions", headers={**AUTH, "X-Session-Id": "roles:1"},
                      json={"model": "standin", "messages": messages}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert upstream.requests[-1]["messages"][0] == {"role": role, "content": CANARY}
    assert exported(gateway, "roles:1")["full_context"][0] == {"role": "user", "content": f"{CANARY}\n\nand hello"}


@pytest.mark.parametrize("part", [{"type": "weird", "weird": CANARY}, {"type": "input_text", "text": CANARY},
                                  {"type": "text", "text": {"nested": CANARY}}])
def test_a_content_part_the_gateway_does_not_know_is_recorded(gateway: Gateway, part: object) -> None:
    """A part that is not text (an unknown type, a text part whose text is not a string) is
    recorded as its JSON beside the text parts, not left out. (A bare string or number as a part,
    or content that is a number or a boolean, is refused with 400: tests/test_errors.py.)"""
    content = [{"type": "text", "text": "hello"}, part]
    resp = httpx.post(f"{gateway.base_url}/chat/completions", headers={**AUTH, "X-Session-Id": "parts:1"},
                      json={"model": "standin", "messages": [{"role": "user", "content": content}]}, timeout=30)
    assert resp.status_code == 200, resp.text
    recorded = exported(gateway, "parts:1")["full_context"][0]
    assert recorded == {"role": "user", "content": "hello\n" + orjson.dumps(part).decode()}


def test_an_unknown_role_is_recorded_in_a_structured_round(gateway: Gateway, upstream: Upstream) -> None:
    """A round with a tool result is recorded as structured messages; a message under a role the
    gateway does not know is recorded there as a user message."""
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                {"role": "narrator", "content": CANARY}]
    resp = httpx.post(f"{gateway.base_url}/chat/completions", headers={**AUTH, "X-Session-Id": "roles:2"},
                      json={"model": "standin", "messages": messages}, timeout=30)
    assert resp.status_code == 200, resp.text
    recorded = exported(gateway, "roles:2")["full_context"]
    assert {"role": "tool", "tool_call_id": "c1", "content": "sunny"} in recorded
    assert {"role": "user", "content": CANARY} in recorded


# --- system and developer messages after the prompt -----------------------------------------


@pytest.mark.parametrize(("route", "body", "recorded"), [
    ("/chat/completions", {"messages": [{"role": "system", "content": "the prompt"},
                                        {"role": "user", "content": "hello"}, {"role": "system", "content": CANARY}]},
     f"hello\n\n[system message]:\n{CANARY}"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "hello"},
                                        {"role": "developer", "content": [{"type": "text", "text": CANARY}]}]},
     f"hello\n\n[developer message]:\n{CANARY}"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                        {"role": "system", "content": CANARY}, {"role": "user", "content": "c"}]},
     f"[system message]:\n{CANARY}\n\nc"),
    ("/responses", {"instructions": "the prompt", "input": [{"role": "user", "content": "hello"},
                                                             {"role": "developer", "content": CANARY}]},
     f"hello\n\n[developer message]:\n{CANARY}"),
])
def test_a_system_message_after_the_prompt_is_recorded(gateway: Gateway, upstream: Upstream, route: str,
                                                       body: dict[str, Any], recorded: str) -> None:
    """A system or developer message after the user's turn reaches the model as such, so the record
    holds it, as the user's text under a header naming its role (a window holds no system message
    after the first user one); the leading system prompt stays unrecorded. It used to be left out."""
    resp = httpx.post(f"{gateway.base_url}{route}", headers={**AUTH, "X-Session-Id": "late-system"}, timeout=30,
                      json={"model": "standin", **body})
    assert resp.status_code == 200, resp.text
    assert CANARY in orjson.dumps(upstream.requests[-1]).decode()
    assert exported(gateway, "late-system")["full_context"][0] == {"role": "user", "content": recorded}


# --- what the reply shows the client ---------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_refusal_beside_content_is_recorded_after_it(gateway: Gateway, upstream: Upstream, stream: bool) -> None:
    """A Chat reply with both ``content`` and ``refusal`` shows the client both; the record holds
    both, the refusal after a blank line (only the content was recorded)."""
    upstream.reply = lambda body: {"role": "assistant", "content": "VISIBLE", "refusal": CANARY}
    resp = httpx.post(f"{gateway.base_url}/chat/completions", headers={**AUTH, "X-Session-Id": f"refusal-{stream}"},
                      json={"model": "standin", "stream": stream, "messages": [{"role": "user", "content": "hi"}]},
                      timeout=30)
    assert resp.status_code == 200 and CANARY in resp.text
    assert exported(gateway, f"refusal-{stream}")["full_context"][1] == {
        "role": "assistant", "content": f"VISIBLE\n\n{CANARY}"}


# --- a record step that fails fails closed ------------------------------------------------------


@pytest.fixture
def broken_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """The record step raises (as the 1,500-deep section once did), its message quoting content."""

    def explode(*args: Any, **kwargs: Any) -> Any:
        raise RecursionError(f"maximum recursion depth exceeded while reading {EXC_CANARY}")

    monkeypatch.setattr(record_stage, "render_user", explode)


def test_record_failure_on_a_json_reply_is_an_error_and_an_incomplete_round(
        gateway: Gateway, broken_record: None) -> None:
    """A non-streamed reply whose round could not be recorded is withheld (500 record_failed);
    the round's audit entry says incomplete, names the failure's type and holds no text."""
    resp = httpx.post(f"{gateway.base_url}/chat/completions", headers={**AUTH, "X-Session-Id": "rec-fail"},
                      json={"model": "standin", "messages": [{"role": "user", "content": "q"}]}, timeout=30)
    assert resp.status_code == 500
    assert resp.json()["error"]["code"] == "record_failed" and "choices" not in resp.text
    [entry] = entries_of(gateway)
    assert (entry["session_id"], entry["outcome"], entry["record_failed"], entry["recorded"]) == \
        ("rec-fail", "incomplete", "RecursionError", [])
    assert EXC_CANARY not in gateway.log_path.read_text()


def test_record_failure_on_a_stream_ends_without_done(gateway: Gateway, broken_record: None) -> None:
    """A streamed reply whose round could not be recorded ends with an SSE error event, no [DONE];
    the openai SDK raises; each attempt leaves an incomplete round in the audit log."""
    resp = httpx.post(f"{gateway.base_url}/chat/completions", headers={**AUTH, "X-Session-Id": "rec-fail-s"},
                      json={"model": "standin", "stream": True, "messages": [{"role": "user", "content": "q"}]},
                      timeout=30)
    assert b"[DONE]" not in resp.content
    last = resp.content.strip().split(b"\n\n")[-1]
    assert orjson.loads(last.removeprefix(b"data: "))["error"]["code"] == "record_failed"
    with pytest.raises(openai.APIError):
        list(gateway.openai(session="rec-fail-s").chat.completions.create(
            model="standin", stream=True, messages=[{"role": "user", "content": "again"}]))
    entries = entries_of(gateway)
    assert [(e["outcome"], e["record_failed"]) for e in entries] == [("incomplete", "RecursionError")] * 2
    log = gateway.log_path.read_text()
    assert EXC_CANARY not in log and '"record_failed"' in log


# --- model validation --------------------------------------------------------------------------


@pytest.mark.parametrize("model", [
    CANARY + "x" * 300,
    CANARY + "\x00",
    CANARY + "\n\x1b[31m",
    CANARY + "\u202e",
    "",
    12,
    ["gpt-4o"],
], ids=["too-long", "nul", "control", "bidi", "empty", "int", "list"])
def test_invalid_model_is_400_before_anything_logs_or_audits_it(gateway: Gateway, upstream: Upstream,
                                                                model: Any) -> None:
    """A ``model`` that is not a printable string of at most 256 characters is refused with 400
    in OpenAI's shape; it is not echoed, logged, audited or forwarded."""
    resp = httpx.post(f"{gateway.base_url}/chat/completions", headers={**AUTH, "X-Session-Id": "bad-model"},
                      content=orjson.dumps({"model": model, "messages": [{"role": "user", "content": "q"}]}),
                      timeout=30)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "code"} and error["code"] == "invalid_model"
    assert CANARY not in resp.text
    assert upstream.requests == []
    assert entries_of(gateway) == []
    assert CANARY not in gateway.log_path.read_text()


def test_a_plain_model_name_passes(gateway: Gateway) -> None:
    """Ordinary model names, up to 256 printable characters, are accepted."""
    for model in ("standin", "gpt-4o-mini-2024-07-18", "org/model:tag@v1 é", "m" * 256):
        resp = httpx.post(f"{gateway.base_url}/chat/completions", headers=AUTH, timeout=30,
                          json={"model": model, "messages": [{"role": "user", "content": "q"}]})
        assert resp.status_code == 200, (model, resp.text)


# --- no exception text in logs -------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_unexpected_errors_log_types_not_text(gateway: Gateway, monkeypatch: pytest.MonkeyPatch,
                                              stream: bool) -> None:
    """An unexpected exception on the chat path (its message quoting content) is logged by type
    and place only; the client gets OpenAI's error shape."""

    async def failing_commit(*args: Any, **kwargs: Any) -> Any:
        raise ValueError(f"invalid literal for int() with base 10: '{EXC_CANARY}'")

    monkeypatch.setattr(SessionService, "commit_round", failing_commit)
    resp = httpx.post(f"{gateway.base_url}/chat/completions", headers={**AUTH, "X-Session-Id": "log-leak"},
                      json={"model": "standin", "stream": stream, "messages": [{"role": "user", "content": "q"}]},
                      timeout=30)
    if stream:
        assert b"[DONE]" not in resp.content and b"internal_error" in resp.content
    else:
        assert resp.status_code == 500 and resp.json()["error"]["code"] == "internal_error"
    assert EXC_CANARY not in resp.text
    log = gateway.log_path.read_text()
    assert "unhandled_error" in log and "ValueError" in log
    assert EXC_CANARY not in log


def test_settle_logs_the_failure_type_never_its_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """When settling an early-ended round fails, the log names the exception type, not its text."""

    async def failing_persist(ctx: Any) -> None:
        raise ValueError(f"could not parse '{EXC_CANARY}'")

    monkeypatch.setattr(pipeline, "persist", failing_persist)
    ctx = types.SimpleNamespace(outcome="completed", policy=None, session_id="s", request_id="r", tenant="acme")
    with structlog.testing.capture_logs() as captured:
        asyncio.run(pipeline.settle(ctx))  # type: ignore[arg-type]
    [event] = [e for e in captured if e["event"] == "round_not_recorded"]
    assert event["error"] == "ValueError" and ctx.outcome == "incomplete"
    assert EXC_CANARY not in repr(captured)
