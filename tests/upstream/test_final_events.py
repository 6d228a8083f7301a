"""How a stream's final event reaches the client: the provider's own, after the commit.

A Responses stream may end with ``response.completed``, ``response.incomplete`` (the model
stopped at ``max_output_tokens``) or ``response.failed``; each is relayed as the provider sent
it, never replaced by the gateway's "broke off" error. A final event longer than the
recorded-reply cap (a Responses reply past the cap ends with a ``response.completed`` that
repeats the whole text) is relayed as it arrives, but the newline that ends it for a client
still waits for the commit. The provider writes that event in pieces, as a real one's socket does.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiohttp import web

from gateway.errors import StoreUnavailable
from gateway.sessions import SessionService
from gateway.sse import EventSplitter, head_type
from tests.conftest import ACME_KEY, Gateway, _Server

CAP = 64 * 1024
TEXT = "0123456789" * 20_000  # 200 KB: the final event alone is three times the cap
AUTH = {"Authorization": f"Bearer {ACME_KEY}"}
REQUEST = {"model": "m", "input": "hi", "stream": True}


def sse(obj: dict[str, Any]) -> bytes:
    return b"event: " + obj["type"].encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def final_event(kind: str = "response.completed") -> bytes:
    done = {"id": "resp_up", "object": "response", "model": "m", "status": "completed",
            "output": [{"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
                        "content": [{"type": "output_text", "text": TEXT, "annotations": []}]}],
            "usage": {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}}
    return sse({"type": kind, "response": done, "sequence_number": 2})


def short_final(kind: str) -> dict[str, Any]:
    status = kind.removeprefix("response.")
    return {"id": "resp_up", "object": "response", "model": kind, "status": status,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "error": {"code": "server_error", "message": "The model failed"} if status == "failed" else None,
            "output": [{"id": "msg_1", "type": "message", "role": "assistant", "status": "incomplete",
                        "content": [{"type": "output_text", "text": "partial", "annotations": []}]}]}


async def responses(request: web.Request) -> web.StreamResponse:
    """Model ``m``: a reply whose final event is longer than the cap. A model named after a final
    type (``response.incomplete``, ...): a short reply ending with that event, or that response
    object as JSON when not streamed."""
    model = (await request.json())["model"]
    if model.startswith("response.") and not (await request.json()).get("stream"):
        return web.json_response(short_final(model))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    base = {"id": "resp_up", "object": "response", "model": "m", "status": "in_progress", "output": []}
    await resp.write(sse({"type": "response.created", "response": base, "sequence_number": 0}))
    if model.startswith("response."):
        await resp.write(sse({"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
                              "content_index": 0, "delta": "partial", "sequence_number": 1}))
        await resp.write(sse({"type": model, "response": short_final(model), "sequence_number": 2}))
        await resp.write_eof()
        return resp
    await resp.write(sse({"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
                          "content_index": 0, "delta": TEXT, "sequence_number": 1}))
    data = final_event()
    for i in range(0, len(data), 16384):  # pieces well apart: the gateway cannot read the event whole
        await resp.write(data[i:i + 16384])
        await asyncio.sleep(0.005)
    await resp.write_eof()
    return resp


@pytest.fixture
def gw(make_gateway: Callable[..., Gateway]) -> Iterator[Gateway]:
    app = web.Application()
    app.router.add_post("/v1/responses", responses)
    server = _Server(app)
    try:
        yield make_gateway(upstreams=[{"name": "big", "base_url": f"http://127.0.0.1:{server.port}/v1",
                                       "models": ["*"], "max_reply_bytes": CAP}])
    finally:
        server.stop()


def test_the_sdk_gets_the_oversized_final_event_and_no_error_after_it(gw: Gateway) -> None:
    """The openai SDK's stream ends with response.completed, whole; the round is recorded as
    truncated, not as cut off by the upstream."""
    events = list(gw.openai(session="big").responses.create(**REQUEST))
    assert [e.type for e in events][-1] == "response.completed"
    assert "error" not in [e.type for e in events]
    assert events[-1].response.output[0].content[0].text == TEXT
    rounds = [e for e in gw.audit_entries() if e["event"] == "round"]
    assert [(e["outcome"], e.get("truncated"), e.get("ended_by")) for e in rounds] == [("incomplete", True, None)]


def test_the_end_of_the_oversized_final_event_waits_for_the_commit(gw: Gateway) -> None:
    """The blank line that makes a client take the event arrives only once the round is stored."""
    seen = b""
    with httpx.stream("POST", f"{gw.base_url}/responses", json=REQUEST, timeout=20,
                      headers={**AUTH, "X-Session-Id": "durable"}) as resp:
        for piece in resp.iter_raw():
            ended = (seen + piece).endswith(b"}\n\n") and b"event: response.completed" in seen + piece
            if ended:
                assert [e["outcome"] for e in gw.audit_entries() if e["event"] == "round"] == ["incomplete"]
            seen += piece
    assert seen.endswith(final_event())


def test_a_round_that_cannot_be_stored_leaves_the_oversized_final_event_unended(
        gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the commit fails the connection closes inside the event: the SDK never sees it, and
    no error event is written into it (its lines would join the open event's)."""

    async def store_down(*args: Any, **kwargs: Any) -> None:
        raise StoreUnavailable("the store is down (test)")

    monkeypatch.setattr(SessionService, "commit_round", store_down)
    kinds: list[str] = []
    with pytest.raises((httpx.HTTPError, openai.APIError)):
        kinds.extend(e.type for e in gw.openai(session="unstored").responses.create(**REQUEST))
    assert kinds[-1] == "response.output_text.delta"
    raw = b""
    with (httpx.stream("POST", f"{gw.base_url}/responses", json=REQUEST, timeout=20,
                       headers={**AUTH, "X-Session-Id": "unstored"}) as resp,
          pytest.raises(httpx.HTTPError)):  # the close comes before the chunked body's end
        for piece in resp.iter_raw():
            raw += piece
    assert raw.endswith(final_event()[:-1]) and b"event: error" not in raw


def _keep(parsed: list[bytes], event: bytes) -> bool:
    parsed.append(event)
    return False  # never final: only the oversized hook can end these streams


def test_the_splitter_holds_only_the_end_of_an_oversized_final_event() -> None:
    """Cut anywhere: a non-final oversized event goes out whole, a final one all but its last newline."""
    small = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"x"}\n\n'
    big_delta = sse({"type": "response.output_text.delta", "delta": "y" * 5000})
    final = final_event()
    data = small + big_delta + small + final
    for step in (1, 7, 999, len(data)):
        parsed: list[bytes] = []
        splitter = EventSplitter(functools.partial(_keep, parsed), max_event=1000,
                                 on_oversized=lambda head: head_type(head) == "response.completed")
        out = b"".join(splitter.feed(data[i:i + step]) for i in range(0, len(data), step))
        if step == len(data):  # every event whole in one piece: parsed (by take, which calls none final)
            assert out == data and parsed == [small[:-2], big_delta[:-2], small[:-2], final[:-2]]
            continue
        assert out == data[:-1] and splitter.held == b"\n" and splitter.done and splitter.open_end, step
        assert splitter.oversized and parsed == [small[:-2], small[:-2]]


@pytest.mark.parametrize(("head", "kind"), [
    (b'event: response.completed\ndata: {"type":"response.completed","response":{"type":"x"', "response.completed"),
    (b'data: {"type": "message_stop"', "message_stop"),
    (b'event: response.failed\ndata: {"response":{"type":"response.completed"', "response.failed"),
    (b'id: 7\ndata: {"response":{"type":"response.completed"', None),
    (b": comment\ndata: [1,2", None),
    (b'event: message\ndata: {\ndata:  "type": "response.completed",\ndata:  "resp', "response.completed"),
])
def test_an_oversized_event_is_typed_by_its_data_then_its_event_line(head: bytes, kind: str | None) -> None:
    """The data's leading "type" decides (its data lines joined), else the event: line; a type
    nested deeper never does."""
    assert head_type(head) == kind


@pytest.mark.parametrize(("kind", "outcome"), [("response.incomplete", "completed"),
                                               ("response.failed", "upstream_error")])
def test_a_stream_ending_incomplete_or_failed_ends_with_the_providers_event(gw: Gateway, kind: str,
                                                                            outcome: str) -> None:
    """The SDK gets the provider's final event, not the gateway's "broke off" error. An incomplete
    reply (max_output_tokens) is a completed round that extends the window; a failed one is the
    upstream's error and does not. The same reply not streamed is recorded alike."""
    events = list(gw.openai(session=f"s-{kind}").responses.create(model=kind, input="hi", stream=True))
    assert [e.type for e in events] == ["response.created", "response.output_text.delta", kind]
    assert events[-1].response.status == kind.removeprefix("response.")
    gw.openai(session=f"j-{kind}").responses.create(model=kind, input="hi")
    rounds = [e for e in gw.audit_entries() if e["event"] == "round"]
    assert [(e["session_id"], e["outcome"], e.get("ended_by")) for e in rounds] == [
        (f"s-{kind}", outcome, None), (f"j-{kind}", outcome, None)]
    for session in (f"s-{kind}", f"j-{kind}"):
        window = httpx.get(f"{gw.base_url}/sessions/{session}", headers=AUTH).json()["context_window"]
        assert window == ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "partial"}]
                          if outcome == "completed" else []), session


def test_a_failed_commit_withholds_the_providers_incomplete_event(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """The held-back response.incomplete goes out only after the round is stored."""

    async def store_down(*args: Any, **kwargs: Any) -> None:
        raise StoreUnavailable("the store is down (test)")

    monkeypatch.setattr(SessionService, "commit_round", store_down)
    raw = httpx.post(f"{gw.base_url}/responses", json={"model": "response.incomplete", "input": "hi", "stream": True},
                     headers={**AUTH, "X-Session-Id": "unstored"}).content
    assert b"event: response.incomplete" not in raw and b'"store_unavailable"' in raw


def test_bytes_after_an_oversized_final_event_wait_with_its_end() -> None:
    """A provider that sends more after its final event (a trailing [DONE], a stray event): none of
    it goes out before the held-back end of the open event, so nothing joins that event."""
    final = final_event()
    trailer = b'data: {"type":"response.output_text.delta","delta":"late"}\n\ndata: [DONE]\n\n'
    data = final + trailer
    for step in (999, len(final) - 1, 4096):
        splitter = EventSplitter(functools.partial(_keep, []), max_event=1000,
                                 on_oversized=lambda head: head_type(head) == "response.completed")
        out = b"".join(splitter.feed(data[i:i + step]) for i in range(0, len(data), step))
        assert out == final[:-1] and splitter.held == b"\n" + trailer and splitter.open_end, step


async def chat_then_error(request: web.Request) -> web.StreamResponse:
    """Two content chunks, then the provider's own error event, then the end (as OpenAI does)."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for piece in ("Hel", "lo"):
        chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "m",
                 "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
        await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
    await resp.write(b'data: {"error": {"message": "The server is overloaded", "type": "server_error"}}\n\n')
    await resp.write_eof()
    return resp


async def messages_then_error(request: web.Request) -> web.StreamResponse:
    """A message start and some text, then Anthropic's ``event: error`` (overloaded), then the end."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    start = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                                  "model": "c", "content": [], "stop_reason": None,
                                                  "usage": {"input_tokens": 1, "output_tokens": 0}}}
    for event in (start, {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                  {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
                  {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}):
        await resp.write(sse(event))
    await resp.write_eof()
    return resp


@pytest.fixture
def erring(make_gateway: Callable[..., Gateway]) -> Iterator[Gateway]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_then_error)
    app.router.add_post("/v1/messages", messages_then_error)
    server = _Server(app)
    url = f"http://127.0.0.1:{server.port}/v1"
    try:
        yield make_gateway(upstreams=[{"name": "oa", "base_url": url, "models": ["*"]},
                                      {"name": "claude", "base_url": url, "models": ["*"], "protocol": "anthropic"}])
    finally:
        server.stop()


@pytest.mark.parametrize(("path", "body"), [
    ("/chat/completions", {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}),
    ("/messages", {"model": "c", "max_tokens": 9, "stream": True, "messages": [{"role": "user", "content": "hi"}]}),
])
def test_a_stream_ended_by_the_providers_error_event_gets_no_second_one(erring: Gateway, path: str,
                                                                        body: dict[str, Any]) -> None:
    """The provider's error event (which says why) is the last the client reads: the gateway adds
    no "broke off" event of its own after it. The round is still recorded as cut off upstream."""
    sid = "err" + path.replace("/", "-")
    raw = httpx.post(f"{erring.base_url}{path}", json=body, headers={**AUTH, "X-Session-Id": sid}).content
    events = [e for e in raw.split(b"\n\n") if e.strip()]
    assert b"verloaded" in events[-1], raw
    assert b"upstream_incomplete" not in raw and sum(b"error" in e for e in events) == 1, raw
    rounds = [e for e in erring.audit_entries() if e["event"] == "round" and e["session_id"] == sid]
    assert [(e["outcome"], e["ended_by"]) for e in rounds] == [("incomplete", "upstream")]


def test_the_sdks_raise_the_providers_own_error(erring: Gateway) -> None:
    """The openai and anthropic SDKs raise with the provider's message, not the gateway's."""
    import anthropic

    with pytest.raises(openai.APIError) as raised:
        list(erring.openai(session="sdk-chat").chat.completions.create(
            model="m", stream=True, messages=[{"role": "user", "content": "hi"}]))
    assert "overloaded" in str(raised.value)
    client = anthropic.Anthropic(base_url=erring.url, api_key=ACME_KEY, max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as failed:
        list(client.messages.create(model="c", max_tokens=9, stream=True, messages=[{"role": "user", "content": "hi"}]))
    assert "Overloaded" in str(failed.value)
