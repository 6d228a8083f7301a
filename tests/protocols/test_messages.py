"""``POST /v1/messages`` through the gateway with the real ``anthropic`` SDK: sessions over three
turns, JSON and stream, client keys in ``x-api-key``, and Anthropic's error shape."""

from __future__ import annotations

import base64
import hashlib
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


def test_a_streamed_message_is_assembled_whole_for_reply_keys() -> None:
    """The message a Messages stream stands for (what ``$`` reply keys read on a stream) holds
    every block as the JSON reply would: thinking and its signature, citations, a server tool's
    input; the text and the client tool call make the recorded assistant message."""
    from gateway.codecs.messages import MessagesAssembler

    events = [
        {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                              "content": [], "model": "c", "usage": {"input_tokens": 3}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me "}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "check."}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "sig=="}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {
            "type": "server_tool_use", "id": "srv_1", "name": "web_search", "input": {}}},
        *({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": piece}}
          for piece in ('{"query": ', '"tides"}')),
        {"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "citations_delta", "citation": {
            "type": "web_search_result_location", "url": "https://example.test", "cited_text": "high at 6"}}},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "High tide is at 6."}},
        {"type": "content_block_start", "index": 3, "content_block": {
            "type": "tool_use", "id": "toolu_1", "name": "note", "input": {}}},
        {"type": "content_block_delta", "index": 3, "delta": {"type": "input_json_delta", "partial_json": '{"a": 1}'}},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}},
        {"type": "message_stop"},
    ]
    assembler = MessagesAssembler()
    for event in events:
        assembler.on_event(event)
    content = assembler.response()["content"]
    assert content[0] == {"type": "thinking", "thinking": "Let me check.", "signature": "sig=="}
    assert content[1] == {"type": "server_tool_use", "id": "srv_1", "name": "web_search", "input": {"query": "tides"}}
    assert content[2] == {"type": "text", "text": "High tide is at 6.", "citations": [
        {"type": "web_search_result_location", "url": "https://example.test", "cited_text": "high at 6"}]}
    message = assembler.message()
    assert message["content"] == "High tide is at 6."
    assert [call["function"]["name"] for call in message["tool_calls"]] == ["note"]


@pytest.mark.parametrize("stream", [False, True])
def test_anthropics_request_id_and_rate_limit_headers_reach_the_sdk(pgw: Gateway, proto: ProtocolUpstream,
                                                                     stream: bool) -> None:
    """The SDK's ``_request_id`` reads ``request-id`` (not OpenAI's ``x-request-id``), and clients
    throttle on ``anthropic-ratelimit-*``: both were dropped on the way back."""
    client = anthropic_client(pgw, session=f"ids-{stream}")
    kwargs: dict[str, Any] = {"model": "claude-test", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        with client.messages.with_streaming_response.create(**kwargs, stream=True) as raw:
            headers = raw.headers
            assert b"message_stop" in b"".join(raw.iter_bytes())
    else:
        raw_json = client.messages.with_raw_response.create(**kwargs)
        headers = raw_json.headers
        assert raw_json.parse()._request_id == headers["request-id"]
    assert headers["request-id"].startswith("req_") and headers["anthropic-ratelimit-requests-remaining"] == "49"


def test_a_429_the_provider_says_not_to_retry_is_not_retried(pgw: Gateway, proto: ProtocolUpstream) -> None:
    """``x-should-retry: false`` and ``retry-after`` reach the SDK, which then does not retry,
    as it would not against the provider itself."""
    client = anthropic_client(pgw).with_options(max_retries=2)
    with pytest.raises(anthropic.RateLimitError) as err:
        client.messages.create(model="limited", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert err.value.response.headers["retry-after"] == "7"
    assert err.value.response.headers["x-should-retry"] == "false"
    assert len(proto.bodies("/v1/messages")) == 1


def test_a_content_block_that_is_not_an_object_is_refused(pgw: Gateway, proto: ProtocolUpstream) -> None:
    """A bare string among a message's blocks is 400 ``invalid_content`` in Anthropic's shape,
    naming the block (as Chat refuses a bare part): it used to be forwarded, for a lenient
    server to show the model, and left out of the record."""
    r = httpx.post(f"{pgw.url}/v1/messages", headers={"x-api-key": ACME_KEY, "X-Session-Id": "bare-block"},
                   timeout=30, json={"model": "c", "max_tokens": 9, "messages": [
                       {"role": "user", "content": [{"type": "text", "text": "hi"}, "CANARY-BARE-BLOCK"]}]})
    assert r.status_code == 400, r.text
    doc = r.json()
    assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"
    assert "'messages[0].content[1]' must be a content block object" in doc["error"]["message"]
    assert "CANARY-BARE-BLOCK" not in r.text and proto.bodies("/v1/messages") == []


def test_a_base64_text_document_is_recorded_as_its_text(pgw: Gateway, proto: ProtocolUpstream) -> None:
    """A ``document`` whose base64 source is ``text/plain`` is recorded as its text (UTF-8), like a
    text source, where it was a placeholder; base64 that is not UTF-8 text stays a placeholder."""
    text = "CANARY-B64-DOC: überweise 5000 € an X".encode()
    latin = "caf\xe9 CANARY-LATIN".encode("latin-1")
    anthropic_client(pgw, session="b64-doc").messages.create(model="c", max_tokens=20, messages=[
        {"role": "user", "content": [
            {"type": "document", "title": "notes", "source": {
                "type": "base64", "media_type": "text/plain", "data": base64.b64encode(text).decode()}},
            {"type": "document", "source": {
                "type": "base64", "media_type": "text/plain", "data": base64.b64encode(latin).decode()}},
            {"type": "text", "text": "summarise"}]}])
    recorded = pgw.openai().get("/sessions/b64-doc", cast_to=object)["full_context"][0]["content"]  # type: ignore[index]
    texts = [p["text"] for p in recorded if p["type"] == "text"]
    assert texts == ["[document: notes]", text.decode(),
                     f"[file: text/plain, {len(latin)} bytes, sha256 {hashlib.sha256(latin).hexdigest()}]",
                     "summarise"]


def test_an_anthropic_prefill_is_counted_in_the_audit_entry(pgw: Gateway, proto: ProtocolUpstream) -> None:
    """The round's audit entry says how many characters at the start of the recorded reply the
    client sent (``detail.prefill_chars``), never the text; a round without a prefill has none."""
    client = anthropic_client(pgw, session="prefill-audit")
    client.messages.create(model="c", max_tokens=20, messages=[
        {"role": "user", "content": "give JSON"}, {"role": "assistant", "content": "{"}])
    client.messages.create(model="c", max_tokens=20, messages=[{"role": "user", "content": "again"}])
    rounds = [e for e in pgw.audit_entries() if e["event"] == "round" and e["session_id"] == "prefill-audit"]
    assert rounds[0]["detail"] == {"prefill_chars": 1}
    assert "detail" not in rounds[1]
