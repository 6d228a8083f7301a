"""Event streams framed the other ways the SSE format allows, as providers and OpenAI-compatible
servers send them: JSON spread over several ``data:`` lines, ``data:`` without a space, ``id:``,
``retry:`` and comment lines around the data, no ``event:`` lines at all, lines ended by a lone
carriage return. The SDKs read all of
them (they implement the format), so the gateway must read them the same way: the recorded
reply is the reply the client was shown, and each protocol's final event is still held back
until the round is committed.

The upstream here is the built-in stand-in behind a proxy that re-frames its streams
(:class:`Reframer`); the clients are the ``openai`` and ``anthropic`` SDKs and raw httpx."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
from aiohttp import web

from gateway.standin import make_app
from tests.conftest import ACME_KEY, Gateway, _Server, wait_for
from tests.protocols.conftest import anthropic_client

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}
FRAMINGS = ("multiline", "nospace", "fields", "dataonly", "cr")


def parse(raw: bytes) -> list[tuple[str | None, bytes]]:
    """The stand-in's own events (one optional ``event:`` line, one ``data: `` line each)."""
    events = []
    for block in raw.split(b"\n\n"):
        name, data = None, None
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
        if data is not None:
            events.append((name, data))
    return events


def frame(name: str | None, data: bytes, framing: str, seq: int) -> bytes:
    """One event in *framing*; every form reads back as (*name*, *data*) in a conforming parser."""
    if framing == "multiline":  # the JSON pretty-printed, one data line per line of it
        text = data if data == b"[DONE]" else orjson.dumps(orjson.loads(data), option=orjson.OPT_INDENT_2)
        lines = [b"data: " + line for line in text.split(b"\n")]
        return (b"event: " + name.encode() + b"\n" if name else b"") + b"\n".join(lines) + b"\n\n"
    if framing == "nospace":
        return (b"event:" + name.encode() + b"\n" if name else b"") + b"data:" + data + b"\n\n"
    if framing == "fields":  # a comment, an id, a retry hint; the name after them
        head = b": keep-alive\nid: " + str(seq).encode() + b"\nretry: 3000\n"
        return head + (b"event: " + name.encode() + b"\n" if name else b"") + b"data: " + data + b"\n\n"
    if framing == "cr":  # lines ended by a lone carriage return
        return (b"event: " + name.encode() + b"\r" if name else b"") + b"data: " + data + b"\r\r"
    assert framing == "dataonly"  # no event names at all (the Anthropic SDK needs them: not used there)
    return b"data: " + data + b"\n\n"


class Reframer:
    """Forwards every request to the stand-in and sends its event streams back re-framed. With
    ``hold`` set, a stream's connection stays open after its last event until ``release``."""

    def __init__(self, standin_url: str) -> None:
        self.standin_url = standin_url
        self.framing = "multiline"
        self.hold = False
        self.released: asyncio.Event | None = None
        self.sent: list[bytes] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "anthropic-version")}
        async with aiohttp.ClientSession() as session, session.post(
                f"{self.standin_url}{request.path}", data=body, headers=headers) as up:
            raw = await up.read()
            if up.content_type != "text/event-stream":
                return web.Response(status=up.status, body=raw, content_type=up.content_type)
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        seq = itertools.count(1)
        self.sent = [frame(name, data, self.framing, next(seq)) for name, data in parse(raw)]
        for piece in self.sent:
            await out.write(piece)
        if self.hold:
            self.released = asyncio.Event()
            await self.released.wait()
        await out.write_eof()
        return out

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


@pytest.fixture
def reframer() -> Iterator[tuple[Reframer, _Server]]:
    standin = _Server(make_app(chunks=7))
    up = Reframer(f"http://127.0.0.1:{standin.port}")
    server = _Server(up.app())
    try:
        yield up, server
    finally:
        server.stop()
        standin.stop()


@pytest.fixture
def fgw(make_gateway: Callable[..., Gateway], reframer: tuple[Reframer, _Server]) -> Gateway:
    url = f"http://127.0.0.1:{reframer[1].port}/v1"
    return make_gateway(upstreams=[{"name": "oa", "base_url": url, "models": ["*"], "protocol": "openai"},
                                   {"name": "an", "base_url": url, "models": ["*"], "protocol": "anthropic"}])


def recorded_reply(gw: Gateway, session: str) -> Any:
    resp = httpx.get(f"{gw.base_url}/sessions/{session}", headers=AUTH, timeout=30)
    assert resp.status_code == 200, resp.text
    (*_, last) = resp.json()["full_context"]
    assert last["role"] == "assistant"
    return last["content"]


def outcomes(gw: Gateway) -> list[str]:
    return [e["outcome"] for e in gw.audit_entries() if e.get("event") == "round"]


@pytest.mark.parametrize("framing", FRAMINGS)
def test_a_chat_stream_in_any_framing_is_recorded_as_the_sdk_read_it(
        fgw: Gateway, reframer: tuple[Reframer, _Server], framing: str) -> None:
    reframer[0].framing = framing
    chunks = list(fgw.openai(session=f"chat-{framing}").chat.completions.create(
        model="gpt-x", stream=True, messages=[{"role": "user", "content": "frame this"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "frame this" in text  # the stand-in's reply quotes the request
    assert recorded_reply(fgw, f"chat-{framing}") == text
    assert outcomes(fgw) == ["completed"]


@pytest.mark.parametrize("framing", FRAMINGS)
def test_a_responses_stream_in_any_framing_is_recorded_and_relayed_in_order(
        fgw: Gateway, reframer: tuple[Reframer, _Server], framing: str) -> None:
    """The request's metadata comes back inside ``response.created``: a value that reads
    ``"type": "response.completed"`` there does not make that event the final one (it was held
    back, and sent last, when a stream had no ``event:`` lines)."""
    reframer[0].framing = framing
    events = list(fgw.openai(session=f"resp-{framing}").responses.create(
        model="gpt-x", stream=True, input="frame this", metadata={"type": "response.completed"}))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert "frame this" in text
    assert recorded_reply(fgw, f"resp-{framing}") == text
    assert outcomes(fgw) == ["completed"]


@pytest.mark.parametrize("framing", [f for f in FRAMINGS if f != "dataonly"])
def test_a_messages_stream_in_any_framing_is_recorded_as_the_sdk_read_it(
        fgw: Gateway, reframer: tuple[Reframer, _Server], framing: str) -> None:
    reframer[0].framing = framing
    client = anthropic_client(fgw, session=f"msg-{framing}")
    with client.messages.stream(model="claude-x", max_tokens=64,
                                messages=[{"role": "user", "content": "frame this"}]) as stream:
        text = "".join(stream.text_stream)
    assert "frame this" in text
    assert recorded_reply(fgw, f"msg-{framing}") == text
    assert outcomes(fgw) == ["completed"]


@pytest.mark.parametrize(("path", "body", "last"), [
    ("/chat/completions", {"messages": [{"role": "user", "content": "hold"}]}, b"[DONE]"),
    ("/responses", {"input": "hold"}, b"response.completed"),
    ("/messages", {"max_tokens": 64, "messages": [{"role": "user", "content": "hold"}]}, b"message_stop"),
])
@pytest.mark.parametrize("framing", ["nospace", "fields", "cr"])
def test_the_final_event_in_any_framing_waits_for_the_commit(
        fgw: Gateway, reframer: tuple[Reframer, _Server], framing: str, path: str, body: dict[str, Any],
        last: bytes) -> None:
    """The upstream sends every event, then keeps its connection open: the round cannot be
    committed yet, so the client must not have the final event. It comes once the upstream ends."""
    up, server = reframer
    up.framing, up.hold = framing, True
    headers = {**AUTH, "X-Session-Id": f"hold-{framing}", "anthropic-version": "2023-06-01"}
    received: list[bytes] = []

    def read() -> None:
        with httpx.stream("POST", f"{fgw.base_url}{path}", headers=headers, timeout=30,
                          json={"model": "m", "stream": True, **body}) as resp:
            assert resp.status_code == 200
            received.extend(resp.iter_raw())

    reader = threading.Thread(target=read)
    reader.start()
    wait_for(lambda: up.released is not None)  # every event went out upstream
    wait_for(lambda: b"".join(received).count(b"\n\n") >= len(up.sent) - 1)  # all but the final one relayed
    time.sleep(0.3)
    assert last in up.sent[-1] and last not in b"".join(received)
    assert not [e for e in fgw.audit_entries() if e.get("event") == "round"]
    server.loop.call_soon_threadsafe(lambda: up.released.set() if up.released else None)
    reader.join(30)
    assert b"".join(received).endswith(up.sent[-1].replace(b"\r", b"\n"))
    assert outcomes(fgw) == ["completed"]
