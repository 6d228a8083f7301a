"""Policy files through a running gateway (SPEC §1 "Key paths", §2 policies, §3 whitelist): real
requests from the ``openai`` SDK and Agently, and the stored session read back over HTTP and from
the SQLite file. Each example in ``policies/`` gets a test of what it records and injects, and
every recorded round carries the id and content hash of the policy version that recorded it."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from agently import Agently

from gateway.policy import PolicySet, load_policy_set
from gateway.session.bounding import SUMMARY_PROMPT
from tests.conftest import ACME_KEY, GLOBEX_KEY, REPO, Gateway, Upstream, wait_for

PII = "Jane Roe, jane.roe@example.com, +1 555 0100, card 4111 1111 1111 1111"
COMPLIANCE_INPUT = {"ticket_id": "T-1001", "intent": "refund", "raw_text": f"Please refund me. {PII}"}
COMPLIANCE_USER = "[input.ticket_id]:\nT-1001\n[input.intent]:\nrefund"
COMPLIANCE_REPLY = {"resolution": "refund approved", "risk_level": "low", "customer_email": "jane.roe@example.com",
                    "internal_notes": f"spoke to {PII}"}
COMPLIANCE_ASSISTANT = "[resolution]:\nrefund approved\n[risk_level]:\nlow"
AGENTLY_SESSION_KEYS = {"id", "auto_resize", "full_context", "context_window", "memo", "session_settings"}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def export(gateway: Gateway, session: str, key: str = ACME_KEY) -> httpx.Response:
    return httpx.get(f"{gateway.base_url}/sessions/{session}", headers={"Authorization": f"Bearer {key}"})


def rows(gateway: Gateway, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of a read-only query on the gateway's SQLite file."""
    conn = sqlite3.connect(f"file:{gateway.db_path}?mode=ro", uri=True)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def audit_entries(gateway: Gateway, tenant: str) -> list[dict[str, Any]]:
    """The parsed audit entries of *tenant* (their bodies are names and hashes, stored as JSON)."""
    return [orjson.loads(body) for (body,) in rows(gateway, "SELECT body FROM audit WHERE tenant=? ORDER BY seq",
                                                    tenant)]


def example_policies() -> PolicySet:
    return load_policy_set(REPO / "policies")



def copy_policies(tmp_path: Path, edits: dict[str, tuple[str, str]] | None = None) -> Path:
    """A copy of ``policies/`` with text replacements ``{file: (old, new)}`` applied."""
    folder = tmp_path / "policies-copy"
    shutil.copytree(REPO / "policies", folder)
    for name, (old, new) in (edits or {}).items():
        path = folder / name
        text = path.read_text()
        assert old in text, f"{old!r} not in {name}"
        path.write_text(text.replace(old, new))
    return folder


def single_policy(tmp_path: Path, text: str) -> Path:
    """A policy folder holding one catch-all policy file."""
    folder = tmp_path / "one-policy"
    folder.mkdir()
    (folder / "keys.yaml").write_text(text)
    return folder


# --- compliance-minimal --------------------------------------------------------------------


def assert_nowhere(gateway: Gateway, *secrets: str) -> None:
    """None of *secrets* is in the database files or the gateway's log."""
    stored, logged = gateway.stored_bytes(), gateway.log_path.read_text()
    for secret in secrets:
        assert secret.encode() not in stored
        assert secret not in logged


def test_compliance_round_records_only_ticket_id_intent_resolution_and_risk(gateway: Gateway,
                                                                           upstream: Upstream) -> None:
    """support-tickets records exactly the two input and two reply keys, streamed or not; the raw text is
    nowhere in the database files or the logs, although the model saw it."""
    upstream.reply = lambda body: json.dumps(COMPLIANCE_REPLY)
    client = gateway.openai(session="support:T-1001")
    messages = [{"role": "system", "content": "You resolve support tickets."}, user(json.dumps(COMPLIANCE_INPUT))]
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert json.loads(reply.choices[0].message.content) == COMPLIANCE_REPLY
    second = {**COMPLIANCE_INPUT, "ticket_id": "T-1002", "intent": "cancel"}
    stream = client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                            messages=[messages[0], user(json.dumps(second))])
    assert json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)) == COMPLIANCE_REPLY
    assert PII in upstream.requests[0]["messages"][-1]["content"]
    doc = export(gateway, "support:T-1001").json()
    assert doc["full_context"] == [
        user(COMPLIANCE_USER), {"role": "assistant", "content": COMPLIANCE_ASSISTANT},
        user("[input.ticket_id]:\nT-1002\n[input.intent]:\ncancel"),
        {"role": "assistant", "content": COMPLIANCE_ASSISTANT}]
    assert doc["session_settings"]["input_keys"] == ["input.ticket_id", "input.intent"]
    assert upstream.requests[1]["messages"][1:3] == doc["full_context"][:2]
    policy = example_policies().get("support-tickets")
    assert policy is not None
    assert rows(gateway, "SELECT policy_id, policy_hash FROM rounds") == [(policy.id, policy.version_hash)] * 2
    assert_nowhere(gateway, "Jane Roe", "jane.roe@example.com", "4111 1111", "Please refund me", "spoke to")


def test_a_keyed_round_of_a_few_kilobytes_is_built_off_the_event_loop(gateway: Gateway, upstream: Upstream,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A keyed policy renders a key's structured value as YAML with PyYAML's pure-Python emitter,
    about a microsecond per character: built on the event loop up to 64 KiB, 60 KB rounds held
    every client up some 100 ms each. Above 4 KiB under a keyed policy the round is built in a
    worker thread; a small one still on the loop."""
    import threading

    from gateway import offload
    from gateway.stages import record as record_stage

    built_on: list[str] = []
    real = record_stage.recorded_round

    def spy(*args: Any) -> Any:
        built_on.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(record_stage, "recorded_round", spy)
    upstream.reply = lambda body: json.dumps(COMPLIANCE_REPLY)
    client = gateway.openai(session="support:T-big")
    for notes in ("short", "x" * 20_000):
        big = {**COMPLIANCE_INPUT, "intent": {"detail": [notes, notes]}}
        client.chat.completions.create(model="gpt-4o-mini", messages=[user(json.dumps(big))])
    loop_thread, worker = built_on
    assert loop_thread != worker and worker.startswith(offload.THREAD_PREFIX), built_on


def test_compliance_through_an_agently_agent(gateway: Gateway, upstream: Upstream, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """An Agently agent's ``.input({...}).output({...})`` gets its whole structured answer, while the gateway's
    policy alone whitelists what is stored."""
    monkeypatch.chdir(tmp_path)  # Agently writes a task workspace under the working directory
    upstream.reply = lambda body: "```json\n" + json.dumps(COMPLIANCE_REPLY) + "\n```"
    agent = Agently.create_agent()
    agent.set_settings("OpenAICompatible", {"base_url": gateway.base_url, "model": "gpt-4o-mini", "auth": ACME_KEY,
                                            "headers": {"X-Session-Id": "support:agently"}})
    result = agent.input(COMPLIANCE_INPUT).output({
        "resolution": (str, "what was decided"), "risk_level": (str, "low, medium or high"),
        "customer_email": (str,), "internal_notes": (str,)}).get_data()
    assert result == COMPLIANCE_REPLY
    sent = upstream.requests[0]
    assert sent["stream"] is True and "[INPUT]:" in sent["messages"][-1]["content"]
    assert "jane.roe@example.com" in sent["messages"][-1]["content"]
    doc = export(gateway, "support:agently").json()
    assert doc["full_context"] == [user(COMPLIANCE_USER), {"role": "assistant", "content": COMPLIANCE_ASSISTANT}]
    assert_nowhere(gateway, "Jane Roe", "jane.roe@example.com", "4111 1111", "Please refund me", "spoke to")


# --- key forms (SPEC §1 "Key paths") ---------------------------------------------------------

REQUEST_KEYS_POLICY = """\
id: request-keys
session:
  input_keys: [".request.model", ".agent.system", "input/customer/name", "items[*].sku", "items[1].qty",
               "$.user", "$.messages[-1].role", "lang", "input.missing", ".execution.temperature"]
  reply_keys: null
"""


def test_request_key_forms_record_in_list_order(make_gateway: Callable[..., Gateway], upstream: Upstream,
                                                tmp_path: Path) -> None:
    """.request/.execution, .agent.system, a slash path, a wildcard, an index, JSONPath and a bare name each
    record their value from a real request, in list order; a missing key is skipped."""
    gateway = make_gateway(single_policy(tmp_path, REQUEST_KEYS_POLICY))
    content = {"customer": {"name": "Ann", "card": "4111-secret"}, "lang": "de",
               "items": [{"sku": "A1", "qty": 1}, {"sku": "B2", "qty": 3}]}
    gateway.openai(session="keys").chat.completions.create(
        model="standin", user="u-42", temperature=0.25,
        messages=[{"role": "system", "content": "SYS-K"}, user(json.dumps(content))])
    recorded = export(gateway, "keys").json()["full_context"][0]
    assert recorded == user("[.request.model]:\nstandin\n[.agent.system]:\nSYS-K\n[input/customer/name]:\nAnn\n"
                            "[items[*].sku]:\n- A1\n- B2\n[items[1].qty]:\n3\n[$.user]:\nu-42\n"
                            "[$.messages[-1].role]:\nuser\n[lang]:\nde\n[.execution.temperature]:\n0.25")
    assert b"4111-secret" not in gateway.stored_bytes()


REPLY_KEYS_POLICY = """\
id: reply-keys
session:
  input_keys: ["input.q"]
  reply_keys: ["answer/parts/1", "scores[*].value", "meta.lang", "$.choices[0].finish_reason", "$.model",
               "absent.key"]
"""


@pytest.mark.parametrize("stream", [False, True])
def test_reply_key_forms_record_from_the_parsed_reply(make_gateway: Callable[..., Gateway], upstream: Upstream,
                                                      tmp_path: Path, stream: bool) -> None:
    """Slash, wildcard and dotted keys read the reply's JSON (fenced too), JSONPath reads the raw completion,
    whether the reply was streamed or not."""
    gateway = make_gateway(single_policy(tmp_path, REPLY_KEYS_POLICY))
    reply = {"answer": {"parts": ["p0", "p1"]}, "scores": [{"value": 1}, {"value": 2}], "meta": {"lang": "en"},
             "secret": "do-not-store"}
    upstream.reply = lambda body: "Here:\n```json\n" + json.dumps(reply) + "\n```"
    created = gateway.openai(session="reply").chat.completions.create(
        model="standin", messages=[user('{"q": "why?", "noise": "n"}')], stream=stream)
    if stream:
        list(created)
    assert export(gateway, "reply").json()["full_context"] == [
        user("[input.q]:\nwhy?"),
        {"role": "assistant", "content": "[answer/parts/1]:\np1\n[scores[*].value]:\n- 1\n- 2\n[meta.lang]:\nen\n"
                                         "[$.choices[0].finish_reason]:\nstop\n[$.model]:\nstandin"}]
    assert b"do-not-store" not in gateway.stored_bytes()


TOOL_POLICY = """\
id: tool-keys
session:
  input_keys: null
  reply_keys: ["tool_calls[0].function.name", "tool_calls[0].function.arguments.city", "tool_calls[*].id",
               "$.choices[0].message.tool_calls[1].function.name"]
"""

TOOL_REPLY = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function",
     "function": {"name": "get_weather", "arguments": json.dumps({"city": "Oslo", "api_token": "tok-secret"})}},
    {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_arguments_in_a_reply_are_recorded_by_key(make_gateway: Callable[..., Gateway],
                                                            upstream: Upstream, tmp_path: Path, stream: bool) -> None:
    """A reply made only of tool calls records the keyed tool name, one parsed argument and the ids; the other
    arguments are not stored."""
    gateway = make_gateway(single_policy(tmp_path, TOOL_POLICY))
    upstream.reply = lambda body: TOOL_REPLY
    created = gateway.openai(session="tools").chat.completions.create(
        model="standin", messages=[user("weather in Oslo?")], stream=stream)
    if stream:
        names = [tc.function.name for chunk in created if chunk.choices
                 for tc in (chunk.choices[0].delta.tool_calls or []) if tc.function and tc.function.name]
        assert names == ["get_weather", "get_time"]
    else:
        assert created.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert export(gateway, "tools").json()["full_context"] == [
        user("weather in Oslo?"),
        {"role": "assistant", "content": "[tool_calls[0].function.name]:\nget_weather\n"
                                         "[tool_calls[0].function.arguments.city]:\nOslo\n"
                                         "[tool_calls[*].id]:\n- call_1\n- call_2\n"
                                         "[$.choices[0].message.tool_calls[1].function.name]:\nget_time"}]
    assert b"tok-secret" not in gateway.stored_bytes()


# --- the examples in policies/ -------------------------------------------------------------


def test_default_policy_records_the_whole_new_input_and_reply(gateway: Gateway, upstream: Upstream) -> None:
    """Without a more specific policy a session round records the new input and the whole reply as text."""
    client = gateway.openai(session="plain")
    reply = client.chat.completions.create(model="standin", messages=[user("hello there")])
    doc = export(gateway, "plain").json()
    assert doc["full_context"] == [user("hello there"),
                                   {"role": "assistant", "content": reply.choices[0].message.content}]
    policy = example_policies().get("default")
    assert policy is not None
    assert rows(gateway, "SELECT policy_id, policy_hash FROM rounds") == [("default", policy.version_hash)]


def test_multi_user_chat_keeps_tenant_user_sessions_apart_and_bounded(gateway: Gateway, upstream: Upstream) -> None:
    """acme:alice and acme:bob are separate sessions, globex's "acme:alice" is globex's own, and keep_last 8
    bounds the window once it passes max_length while full_context keeps every round."""
    upstream.reply = lambda body: f"ok {len(body['messages'])}"
    alice, bob = gateway.openai(session="acme:alice"), gateway.openai(session="acme:bob")
    long_text = "x" * 1800  # a round is ~1,900 characters: 8 rounds fit in 16,000, 9 do not
    for turn in range(10):
        alice.chat.completions.create(model="standin", messages=[user(f"alice {turn} {long_text}")])
    bob.chat.completions.create(model="standin", messages=[user("bob here")])
    gateway.openai(GLOBEX_KEY, session="acme:alice").chat.completions.create(
        model="standin", messages=[user("globex user")])
    assert upstream.requests[10]["messages"] == [user("bob here")]
    assert upstream.requests[11]["messages"] == [user("globex user")]
    doc = export(gateway, "acme:alice").json()
    assert len(doc["full_context"]) == 20
    assert doc["context_window"] == doc["full_context"][-16:]
    assert doc["context_window"][0]["content"].startswith("alice 2 ")
    assert export(gateway, "acme:bob").json()["full_context"] == [user("bob here"),
                                                                  {"role": "assistant", "content": "ok 1"}]
    globex = export(gateway, "acme:alice", GLOBEX_KEY).json()
    assert globex["full_context"][0] == user("globex user") and len(globex["full_context"]) == 2
    policy = example_policies().get("multi-user-chat")
    assert policy is not None
    assert set(rows(gateway, "SELECT policy_id, policy_hash FROM rounds")) == {(policy.id, policy.version_hash)}


def is_summary_request(body: dict[str, Any]) -> bool:
    first = body["messages"][0]
    return first["role"] == "system" and first["content"].startswith(SUMMARY_PROMPT[:50])


def test_long_conversation_folds_the_window_into_a_memo(make_gateway: Callable[..., Gateway], upstream: Upstream,
                                                        tmp_path: Path) -> None:
    """Past max_length the oldest rounds are folded into the memo by an unrecorded side request without session
    context; the memo is then injected as a system message and the last rounds stay verbatim."""
    gateway = make_gateway(copy_policies(tmp_path, {"long-conversation.yaml": ("max_length: 24000",
                                                                               "max_length: 900")}))
    upstream.reply = lambda body: ("MEMO: the user studies otters" if is_summary_request(body)
                                   else f"noted ({len(body['messages'])})")
    client = gateway.openai(session="longform:otters")
    for turn in range(5):
        client.chat.completions.create(model="standin", messages=[user(f"fact {turn}: " + "o" * 200)])
    doc = wait_for(lambda: (d := export(gateway, "longform:otters").json())["memo"]
                   and len(d["context_window"]) == 6 and d)
    assert doc["memo"] == "MEMO: the user studies otters"
    assert doc["context_window"] == doc["full_context"][-6:] and len(doc["full_context"]) == 10
    side = [r for r in upstream.requests if is_summary_request(r)]
    assert side and all(len(r["messages"]) == 2 for r in side)
    assert "fact 0: " in side[0]["messages"][1]["content"]
    client.chat.completions.create(model="standin", messages=[user("what do I study?")])
    # the round just sent may start another side request in the background: skip those
    last = [r for r in upstream.requests if not is_summary_request(r)][-1]["messages"]
    assert last[0] == {"role": "system", "content": "[CHAT SESSION MEMO]:\nMEMO: the user studies otters\n"}
    assert last[1:] == [*doc["context_window"], user("what do I study?")]
    assert rows(gateway, "SELECT count(*) FROM rounds") == [(6,)]
    assert {e["event"] for e in audit_entries(gateway, "acme")} >= {"round", "bounding"}


def test_record_nothing_audits_private_rounds_without_storing_or_injecting(gateway: Gateway,
                                                                          upstream: Upstream) -> None:
    """A private:* session's rounds are audited with their policy, but leave no round, no session state,
    and nothing is injected into the next request."""
    client = gateway.openai(session="private:diary")
    client.chat.completions.create(model="standin", messages=[user("dear diary, secret-one")])
    client.chat.completions.create(model="standin", messages=[user("dear diary, secret-two")])
    assert [r["messages"] for r in upstream.requests] == [[user("dear diary, secret-one")],
                                                          [user("dear diary, secret-two")]]
    assert rows(gateway, "SELECT count(*) FROM rounds") == [(0,)]
    assert rows(gateway, "SELECT count(*) FROM sessions") == [(0,)]
    assert export(gateway, "private:diary").status_code == 404
    policy = example_policies().get("record-nothing")
    assert policy is not None
    rounds = [e for e in audit_entries(gateway, "acme") if e["event"] == "round"]
    assert len(rounds) == 2
    assert all((e["session_id"], e["policy_id"], e["policy_hash"], e["recorded"], e["outcome"])
               == ("private:diary", policy.id, policy.version_hash, [], "completed") for e in rounds)
    assert b"secret-one" not in gateway.stored_bytes() and "secret-one" not in gateway.log_path.read_text()
    # nothing stored, nothing to check: verification passes without a note about unbound rows
    from tests.evidence.conftest import verify
    code, out = verify(gateway)
    assert code == 0 and "note:" not in out, out


def test_every_round_carries_the_id_and_hash_of_its_policy(gateway: Gateway, upstream: Upstream) -> None:
    """Rounds under four example policies each store their policy's id and version hash, in the rounds table
    and the audit log, while the Agently export keeps its plain shape."""
    policies = example_policies()
    expected = {"plain-1": "default", "support:T-9": "support-tickets", "acme:carol": "multi-user-chat",
                "longform:x": "long-conversation"}
    for session in expected:
        gateway.openai(session=session).chat.completions.create(
            model="gpt-4o", messages=[user('{"ticket_id": "T-9", "intent": "ask"}')])
    stored = dict(((sid, (pid, ph)) for sid, pid, ph in rows(gateway, "SELECT session_id, policy_id, policy_hash "
                                                                    "FROM rounds")))
    want = {}
    for session, policy_id in expected.items():
        policy = policies.get(policy_id)
        assert policy is not None
        want[session] = (policy.id, policy.version_hash)
    assert stored == want
    audited = {e["session_id"]: (e["policy_id"], e["policy_hash"]) for e in audit_entries(gateway, "acme")
               if e["event"] == "round"}
    assert audited == want
    for session in expected:
        doc = export(gateway, session).json()
        assert set(doc) == AGENTLY_SESSION_KEYS and doc["id"] == session
        assert "policy" not in json.dumps(doc)
