"""``POST /v1/messages`` through the gateway with the real ``anthropic`` SDK: sessions over three
turns, JSON and stream, client keys in ``x-api-key``, and Anthropic's error shape."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import pytest

from tests.conftest import ACME_KEY, Gateway
from tests.protocols.conftest import anthropic_client
from tests.protocols.upstream import ProtocolUpstream


def _turn(client: anthropic.Anthropic, text: str, stream: bool) -> str:
    kwargs = {"model": "claude-test", "max_tokens": 64, "system": "be brief",
              "messages": [{"role": "user", "content": text}]}
    if stream:
        with client.messages.stream(**kwargs) as s:  # type: ignore[arg-type]
            pieces = list(s.text_stream)
            final = s.get_final_message()
        assert "".join(pieces) == final.content[0].text  # type: ignore[union-attr]
        return "".join(pieces)
    message = client.messages.create(**kwargs)  # type: ignore[arg-type]
    assert message.stop_reason == "end_turn"
    return message.content[0].text  # type: ignore[union-attr]


@pytest.mark.parametrize("stream", [False, True])
def test_three_turns_with_a_session(pgw: Gateway, proto: ProtocolUpstream, stream: bool) -> None:
    """The anthropic SDK (x-api-key = the gateway key) over three turns: the upstream receives the
    window as alternating Anthropic messages after the top-level system, and every round is recorded."""
    client = anthropic_client(pgw, session=f"m-{stream}")
    for turn in ("one", "two", "three"):
        assert _turn(client, f"turn {turn}", stream) == f"messages says: turn {turn}"
    sent = proto.bodies("/v1/messages")
    assert sent[-1]["system"] == "be brief"
    assert sent[-1]["messages"] == [
        {"role": "user", "content": "turn one"}, {"role": "assistant", "content": "messages says: turn one"},
        {"role": "user", "content": "turn two"}, {"role": "assistant", "content": "messages says: turn two"},
        {"role": "user", "content": "turn three"}]
    headers = [h for p, h, _ in proto.requests if p == "/v1/messages"][-1]
    assert ACME_KEY not in str(headers)  # the gateway key never travels upstream
    exported = pgw.openai().get(f"/sessions/m-{stream}", cast_to=object)
    assert len(exported["full_context"]) == 6


def test_round_audit_entry_names_the_protocol(pgw: Gateway) -> None:
    """The round's audit entry says it came from the Messages protocol."""
    import sqlite3

    import orjson
    _turn(anthropic_client(pgw, session="audit-m"), "hello", False)
    pgw.openai(session="audit-c").chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    with sqlite3.connect(pgw.db_path) as db:
        rows = [orjson.loads(r[0]) for r in db.execute("SELECT body FROM audit")]
    rounds = {e["session_id"]: e for e in rows if e.get("event") == "round"}
    assert rounds["audit-m"]["protocol"] == "messages" and rounds["audit-m"]["route"] == "/v1/messages"
    assert rounds["audit-c"]["protocol"] == "chat"


def test_bad_input_gets_anthropic_error_shape(pgw: Gateway) -> None:
    """A Messages request without max_tokens is 400 in Anthropic's error shape, and a bad key 401."""
    r = httpx.post(f"{pgw.url}/v1/messages", json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
                   headers={"x-api-key": ACME_KEY, "anthropic-version": "2023-06-01"})
    assert r.status_code == 400
    assert r.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                   "message": "'max_tokens' is required: a whole number"}}
    with pytest.raises(anthropic.AuthenticationError) as err:
        anthropic_client(pgw, key="sg-wrong").messages.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert err.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]


def test_built_in_stand_in_is_routed_for_messages(make_gateway: Any) -> None:
    """With no upstream configured, /v1/messages is routed to the built-in stand-in (listed once per
    protocol), not refused as a model no upstream serves."""
    gw = make_gateway(use_upstream=False)
    r = httpx.post(f"{gw.url}/v1/messages", headers={"x-api-key": ACME_KEY}, timeout=10,
                   json={"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
    assert not (r.status_code == 400 and "no upstream" in r.text)


def test_an_anthropic_prefill_is_recorded_as_the_start_of_the_reply(pgw: Gateway, proto: ProtocolUpstream) -> None:
    """A final assistant message is a prefill the model continues: the user message before it is
    recorded, and the reply as the prefill and the continuation (``tests/session/test_prefill.py``)."""
    client = anthropic_client(pgw, session="prefill-msg")
    reply = client.messages.create(model="c", max_tokens=20, messages=[
        {"role": "user", "content": "CANARY-prefill-msg"}, {"role": "assistant", "content": "Answer:"}])
    text = "".join(block.text for block in reply.content if block.type == "text")
    exported = pgw.openai().get("/sessions/prefill-msg", cast_to=object)["full_context"]  # type: ignore[index]
    assert exported == [{"role": "user", "content": "CANARY-prefill-msg"},
                        {"role": "assistant", "content": "Answer:" + text}]
