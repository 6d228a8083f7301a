"""Property-based fuzzing of the model routes (Chat Completions, Responses, Messages; JSON and
stream) and the session routes against a real gateway on loopback, under a keyed policy, with a
canary in every field the policy does not whitelist. A fixed, derandomised example budget keeps
it bounded (a few seconds).

Properties: client input never gets a 5xx; every request that reached the upstream has its
audit entry; the canary appears in no file the gateway wrote (database, WAL, log, checkpoints)
and in no export bundle.
"""

from __future__ import annotations

import io
import json
import secrets
import sqlite3
import tarfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import httpx
import orjson
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from tests.conftest import ACME_KEY, AUDITOR_TOKEN, Gateway, Upstream

CANARY = f"FUZZCANARY{secrets.token_hex(8)}"
POLICY = """\
id: keyed
description: fuzz target - only the ticket id, the intent and the resolution are recorded
session:
  input_keys: ["input.ticket_id", "input.intent"]
  reply_keys: ["resolution"]
  max_length: 4000
  bounding: {strategy: simple_cut}
  inject: {context_window: true, memo: false}
"""
AUTH = {"Authorization": f"Bearer {ACME_KEY}"}
ROUTES = ("/v1/chat/completions", "/v1/responses", "/v1/messages")

safe_text = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789-_ ", max_size=12)
any_text = st.text(max_size=40)  # any code point but surrogates: control characters, NUL, RTL, emoji
header_text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=30)


def with_canary(fuzz: str) -> str:
    return f"{fuzz}{CANARY}{fuzz[::-1]}"


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=False),
                      any_text.map(with_canary))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(safe_text, inner, max_size=3)), max_leaves=8)

structured_input = st.builds(
    lambda tid, intent, raw, extra: json.dumps({"ticket_id": tid, "intent": intent, "raw_text": raw, **extra}),
    safe_text, safe_text, any_text.map(with_canary), st.dictionaries(safe_text.filter(
        lambda k: k not in ("ticket_id", "intent")), json_value, max_size=2))
user_content = st.one_of(
    structured_input,
    any_text.map(with_canary),
    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": any_text.map(with_canary)}), min_size=1,
             max_size=2),
    json_value,
)
message = st.one_of(
    st.fixed_dictionaries({"role": st.just("user"), "content": user_content}),
    st.fixed_dictionaries({"role": st.sampled_from(["system", "assistant", "developer", "tool", "x"]),
                           "content": any_text.map(with_canary)}),
    json_value,
)
chat_body = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(message, min_size=1, max_size=4).map(
        lambda ms: [*ms, {"role": "user", "content": ms[-1].get("content", "") if isinstance(ms[-1], dict)
                          else with_canary("")}]), json_value),
     "model": st.one_of(st.sampled_from(["gpt-4o", "standin"]), safe_text, st.integers(-2**63, 2**63 - 1),
                        st.none())},  # Chat requires a model: absent or null is a 400 like an integer
    optional={"stream": st.one_of(st.booleans(), st.none(), st.just("yes"), st.integers(-2**63, 2**63 - 1)),
              "temperature": st.one_of(st.floats(allow_nan=False), st.text(max_size=3)),
              "metadata": st.dictionaries(safe_text, any_text.map(with_canary), max_size=2),
              "user": any_text.map(with_canary)})
session_id = st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,20}", fullmatch=True),
                       header_text)
responses_body = st.fixed_dictionaries(  # a model is required (without a prompt template): absent, a 400
    {"input": st.one_of(any_text.map(with_canary), st.lists(message, max_size=3), json_value),
     "model": st.one_of(st.sampled_from(["standin", "gpt-4o"]), st.sampled_from(["standin", "gpt-4o"]), st.none())},
    optional={"stream": st.booleans(),
              "instructions": any_text.map(with_canary), "previous_response_id": safe_text})
text_blocks = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": any_text.map(with_canary)}),
                       min_size=1, max_size=2)
messages_body = st.fixed_dictionaries(
    {"model": st.sampled_from(["standin", "claude-x"]), "max_tokens": st.integers(1, 4096),
     "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                                 "content": st.one_of(any_text.map(with_canary), text_blocks)}),
                          max_size=3).map(lambda ms: [*ms, {"role": "user", "content": with_canary("q")}])},
    optional={"system": st.one_of(any_text.map(with_canary), text_blocks), "stream": st.booleans(),
              "metadata": st.dictionaries(safe_text, any_text.map(with_canary), max_size=2)})
raw_body = st.one_of(
    chat_body.map(lambda b: orjson.dumps(b)),
    chat_body.map(lambda b: orjson.dumps(b)[:-3]),  # truncated
    st.binary(max_size=60).map(lambda b: b + CANARY.encode() + b),
)

chat_op = st.one_of(
    st.tuples(st.just(ROUTES[0]), session_id, raw_body),
    st.tuples(st.just(ROUTES[1]), session_id, st.one_of(responses_body.map(orjson.dumps), raw_body)),
    st.tuples(st.just(ROUTES[2]), session_id, st.one_of(messages_body.map(orjson.dumps), raw_body)),
)
session_op = st.tuples(st.sampled_from(["GET", "PUT", "DELETE", "RESET"]),
                       st.one_of(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,20}", fullmatch=True),
                                 any_text.filter(bool)),
                       st.one_of(st.just(b""), json_value.map(lambda v: orjson.dumps(v)), st.fixed_dictionaries(
                           {"full_context": st.lists(st.fixed_dictionaries(
                               {"role": st.sampled_from(["user", "assistant", "tool"]),
                                "content": st.one_of(safe_text, any_text.map(with_canary))},
                               optional={"tool_calls": st.one_of(json_value, st.lists(st.fixed_dictionaries(
                                   {"id": st.one_of(safe_text, json_value), "type": st.sampled_from(
                                       ["function", "custom", "x"]),
                                    "function": st.fixed_dictionaries({"name": safe_text, "arguments": st.one_of(
                                        any_text.map(with_canary), json_value)})}), max_size=2)),
                                   "tool_call_id": st.one_of(safe_text, json_value),
                                   "reasoning": st.one_of(json_value, st.lists(st.fixed_dictionaries(
                                       {"type": st.sampled_from(["thinking", "redacted_thinking"]),
                                        "thinking": any_text.map(with_canary), "signature": safe_text}),
                                       max_size=2))}), max_size=3)},
                           optional={"memo": st.one_of(st.none(), safe_text, any_text.map(with_canary))}).map(
                               lambda v: orjson.dumps(v))))


def send(client: httpx.Client, op: tuple[str, str | None, bytes]) -> httpx.Response:
    kind, sid, body = op
    if kind in ROUTES:
        headers = {**AUTH, "Content-Type": "application/json", "anthropic-version": "2023-06-01"}
        if sid is not None:
            headers["X-Session-Id"] = sid.encode()  # type: ignore[assignment]
        with client.stream("POST", kind, content=body, headers=headers) as resp:
            resp.read()
            return resp
    assert sid is not None
    path = f"/v1/sessions/{quote(sid, safe='')}"
    if kind == "RESET":
        return client.post(path + "/reset", headers=AUTH)
    if kind == "PUT":
        # no canary here: holding an import to the session's policy is issue 9 item 9, in another branch
        return client.put(path, content=body, headers={**AUTH, "Content-Type": "application/json"})
    return client.request(kind, path, headers=AUTH)


def written_files(gateway: Gateway) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in gateway.dir.rglob("*")
            if p.is_file() and "policies" not in p.parts and p.name != "sessiongate.yaml"}


def audit_rounds(gateway: Gateway) -> int:
    conn = sqlite3.connect(f"file:{gateway.db_path}?mode=ro", uri=True)
    try:
        bodies = [orjson.loads(b) for (b,) in conn.execute("SELECT body FROM audit WHERE tenant='acme'")]
    finally:
        conn.close()
    return sum(1 for b in bodies if b.get("event") in ("round", "proxy"))


def test_fuzzed_chat_and_session_requests_keep_every_promise(make_gateway: Callable[..., Gateway],
                                                             upstream: Upstream, tmp_path: Path) -> None:
    """No 5xx, an audit entry per upstream request, and no canary outside the whitelist in any file or export."""
    policies = tmp_path / "fuzz-policies"
    policies.mkdir()
    (policies / "keyed.yaml").write_text(POLICY)
    upstream.reply = lambda body: orjson.dumps({"resolution": "done", "notes": CANARY}).decode()
    gateway = make_gateway(policies, upstreams=[  # the stand-in speaks both protocols
        {"name": "standin", "base_url": upstream.url, "models": ["*"]},
        {"name": "standin-anthropic", "base_url": upstream.url, "models": ["*"], "protocol": "anthropic"}])
    statuses: list[int] = []
    answered: set[str] = set()

    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        @settings(max_examples=90, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.one_of(chat_op, session_op))
        def one_request(op: tuple[str, str | None, bytes]) -> None:
            try:
                resp = send(client, op)
            except httpx.LocalProtocolError:  # a header value the client itself will not send
                reject()
            statuses.append(resp.status_code)
            if resp.status_code == 200:
                answered.add(op[0])
            assert resp.status_code < 500, (op[0], resp.status_code, resp.text[:300])
            if resp.status_code >= 400:
                error = resp.json()["error"]
                shape = {"message", "type"} if op[0] == "/v1/messages" else {"message", "type", "code"}  # Anthropic's
                assert shape <= set(error)
                assert CANARY not in resp.text

        one_request()
        bundle = client.get("/admin/export", params={"tenant": "acme"},
                            headers={"Authorization": f"Bearer {AUDITOR_TOKEN}"})
    assert bundle.status_code == 200
    assert any(s == 200 for s in statuses) and any(400 <= s < 500 for s in statuses)
    assert answered >= set(ROUTES)  # every model route answered some of it
    assert len(upstream.requests) > 0
    assert audit_rounds(gateway) == len(upstream.requests)
    for name, data in written_files(gateway).items():
        assert CANARY.encode() not in data, name
        assert CANARY.encode("utf-16-le") not in data, name
    with tarfile.open(fileobj=io.BytesIO(bundle.content)) as tar:
        for member in tar.getmembers():
            extracted = tar.extractfile(member)
            assert extracted is None or CANARY.encode() not in extracted.read(), member.name
