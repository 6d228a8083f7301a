"""A test upstream that behaves like a real provider behind a CDN, unlike the plain stand-in.

- Compresses every reply (JSON, SSE, forwarded routes) whenever the request's
  ``Accept-Encoding`` allows gzip or deflate; with ``force_encoding`` set it compresses with that
  encoding whatever the request says (providers that ignore the header).
- Cuts SSE into TCP writes that do not follow event boundaries: events split across writes
  and several events in one write (compressed streams are flushed per write).
- Closes every third keep-alive connection after its reply.
- Sends ``x-request-id``, ``x-ratelimit-*`` and ``openai-processing-ms`` on every reply,
  ``Retry-After`` on 429, and OpenAI-shaped error bodies.
- Records what it received: ``paths`` (raw request targets, exactly as they arrived) and
  ``requests`` (method, raw path, headers, body).

Chat behaviour by ``model``: ``rate-limited`` → 429, ``broken`` → 500, the models of
``ERROR_PAGES`` → what a CDN, a reverse proxy or a refused key answer, ``held`` → streams two
events, then waits for ``release`` before the rest, ``slow-start`` → sends a stream's headers, then
waits for ``release`` before its first event (a model thinking first; a JSON reply waits whole),
``partial-start`` → the same after the first 10 bytes of its first event, ``huge`` → a ~20 MB reply
(JSON or SSE) whose last piece waits for ``release``, ``done-then-hold`` and ``done-then-reset`` →
a whole stream whose body never ends (held open until ``release``, or broken off after ``[DONE]``);
anything else answers ``"provider says: <last user text>"``.
Forwarded routes: ``GET /v1/models``, ``GET /v1/models/{id}`` (an ``ERROR_PAGES`` name answers that
page, ``broken-body`` breaks off mid-body,
``slow-body`` sends a first piece and then waits for the client to hang up), ``POST
/v1/embeddings``, and a catch-all that answers 200 with the raw path it saw.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import zlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.conftest import _Server

HUGE_BYTES = 20 * 1024 * 1024
# model -> (status, content type, body) of replies that are not the API's own: a key refused, a
# CDN's page, a reverse proxy's text, nothing; "{key}" becomes the provider key the request carried
ERROR_PAGES = {
    "bad-key": (401, "application/json", orjson.dumps({"error": {
        "message": "Incorrect API key provided: sk-prov-****9f2c. You can find your API key at https://x/keys.",
        "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}})),
    "vllm-401": (401, "application/json", b'{"error": "Unauthorized"}'),  # vLLM's --api-key refusal
    "fastapi-401": (401, "application/json", b'{"detail": "Not authenticated"}'),
    "cdn-502": (502, "text/html", b"<!DOCTYPE html>\n<html><head><title>api.provider.test | 502: Bad gateway</title>"
                                  b"</head><body><h1>Bad gateway</h1>" + b"<p>cloud</p>" * 400 + b"</body></html>"),
    "cdn-503": (503, "text/html", b"<html><head><title>Service &amp; Unavailable</title></head></html>"),
    "wrong-base-url": (404, "text/html", b"<html><head><title>404 Not Found</title></head><body>nginx</body></html>"),
    "proxy-text": (503, "text/plain", b"\n upstream connect error or disconnect/reset before headers. "
                                      b"reset reason: connection failure\nsecond line"),
    "empty-504": (504, "text/plain", b""),
    "echo": (400, "text/html", b"<html><title>Bad request from Bearer {key} at edge</title></html>"),
}
RAW_BODY = web.RequestKey("raw_body", bytes)
WRITE_SIZES = (7, 120, 3, 512, 41, 2048, 1)


def encoding_for(request: web.Request, force: str | None) -> str | None:
    if force:
        return force
    accepted = request.headers.get("Accept-Encoding", "").lower()
    for name in ("gzip", "deflate"):
        if name in accepted:
            return name
    return None


class Compressor:
    """Streaming gzip/deflate (zlib-wrapped), flushed per piece so a stream stays live."""

    def __init__(self, encoding: str | None) -> None:
        self.encoding = encoding
        wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
        self._obj = zlib.compressobj(6, zlib.DEFLATED, wbits) if encoding else None

    def piece(self, data: bytes) -> bytes:
        if self._obj is None:
            return data
        return self._obj.compress(data) + self._obj.flush(zlib.Z_SYNC_FLUSH)

    def end(self) -> bytes:
        return self._obj.flush() if self._obj is not None else b""


def error_body(message: str, type_: str, code: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


def completion(text: str, model: str) -> dict[str, Any]:
    return {"id": "chatcmpl-prov", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}


def sse_event(delta: dict[str, Any], model: str, finish: str | None = None) -> bytes:
    event = {"id": "chatcmpl-prov", "object": "chat.completion.chunk", "created": 1, "model": model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(event) + b"\n\n"


def huge_text() -> str:
    line = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-huge-reply-line\n"
    return (line * (HUGE_BYTES // len(line) + 1))[:HUGE_BYTES]


@dataclass
class Provider:
    url: str = ""
    force_encoding: str | None = None
    paths: list[str] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    encodings_sent: list[str | None] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    released_by_test: list[bool] = field(default_factory=list)
    client_gone: threading.Event = field(default_factory=threading.Event)
    _count: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    # --- plumbing ---------------------------------------------------------------------------

    @web.middleware
    async def record(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        body = await request.read()
        request[RAW_BODY] = body
        self.paths.append(request.raw_path)
        self.requests.append({"method": request.method, "path": request.raw_path,
                              "headers": dict(request.headers), "body": body})
        return await handler(request)

    def headers(self, n: int) -> dict[str, str]:
        return {"x-request-id": f"req-prov-{n}", "x-ratelimit-limit-requests": "5000",
                "x-ratelimit-remaining-requests": "4999", "openai-processing-ms": "12",
                "Set-Cookie": "__cf_bm=tracking"}

    async def _wait_release(self) -> None:
        got = await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 15)
        self.released_by_test.append(got)

    async def send(self, request: web.Request, status: int, payload: bytes, content_type: str = "application/json",
                   extra: dict[str, str] | None = None) -> web.StreamResponse:
        """A whole reply, compressed when allowed; every third connection closed afterwards."""
        n = next(self._count)
        comp = Compressor(encoding_for(request, self.force_encoding))
        self.encodings_sent.append(comp.encoding)
        headers = {**self.headers(n), **(extra or {}), "Content-Type": content_type}
        if comp.encoding:
            headers["Content-Encoding"] = comp.encoding
        resp = web.Response(status=status, body=comp.piece(payload) + comp.end(), headers=headers)
        if n % 3 == 0:
            resp.force_close()
        return resp

    async def stream(self, request: web.Request, data: bytes, *, content_type: str, hold_after: int | None = None,
                     sizes: tuple[int, ...] = WRITE_SIZES) -> web.StreamResponse:
        """*data* in writes of irregular *sizes*; waits for ``release`` after *hold_after* bytes."""
        n = next(self._count)
        comp = Compressor(encoding_for(request, self.force_encoding))
        self.encodings_sent.append(comp.encoding)
        resp = web.StreamResponse(headers={**self.headers(n), "Content-Type": content_type})
        if comp.encoding:
            resp.headers["Content-Encoding"] = comp.encoding
        if n % 3 == 0:
            resp.force_close()
        await resp.prepare(request)
        pos, cycle = 0, itertools.cycle(sizes)
        held = hold_after is None
        try:
            while pos < len(data):
                if not held and pos >= hold_after:  # type: ignore[operator]
                    held = True
                    await self._wait_release()
                size = next(cycle)
                if not held:
                    size = min(size, hold_after - pos)  # type: ignore[operator]
                await resp.write(comp.piece(data[pos:pos + size]))
                pos += size
            await resp.write(comp.end())
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass
        return resp

    # --- routes -------------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(request[RAW_BODY])
        model = body.get("model", "")
        if model == "rate-limited":
            return await self.send(request, 429, error_body("Rate limit reached for requests", "requests",
                                                            "rate_limit_exceeded"), extra={"Retry-After": "3"})
        if model == "broken":
            return await self.send(request, 500, error_body("The server had an error while processing your "
                                                            "request.", "server_error", "server_error"))
        if model in ERROR_PAGES:
            return await self.error_page(request, model)
        text = huge_text() if model == "huge" else f"provider says: {body['messages'][-1]['content']}"
        if not body.get("stream"):
            if model == "slow-start":  # a model that thinks before it answers at all
                await self._wait_release()
            payload = orjson.dumps(completion(text, model))
            if model == "bom":  # a byte-order mark first: Python's json and the SDKs read it; RFC 8259 allows it
                payload = b"\xef\xbb\xbf" + payload
            if model == "huge":
                return await self.stream(request, payload, content_type="application/json",
                                         hold_after=len(payload) - 1000, sizes=(65536,))
            return await self.send(request, 200, payload)
        if model == "huge":
            events = [sse_event({"role": "assistant", "content": ""}, model)]
            events += [sse_event({"content": text[i:i + 32768]}, model) for i in range(0, len(text), 32768)]
        else:
            words = [w + " " for w in text.split(" ")]
            events = [sse_event({"role": "assistant", "content": ""}, model)]
            events += [sse_event({"content": w}, model) for w in words]
        events.append(sse_event({}, model, "stop"))
        events.append(b"data: [DONE]\n\n")
        data = b"".join(events)
        if model == "held":
            return await self.stream(request, data, content_type="text/event-stream",
                                     hold_after=len(events[0]) + len(events[1]))
        if model in ("slow-start", "partial-start"):
            return await self.stream(request, data, content_type="text/event-stream",
                                     hold_after=0 if model == "slow-start" else 10)
        if model == "huge":
            return await self.stream(request, data, content_type="text/event-stream",
                                     hold_after=len(data) - 100, sizes=(65536,))
        if model in ("done-then-hold", "done-then-reset"):
            return await self.after_done(request, data, hold=model == "done-then-hold")
        return await self.stream(request, data, content_type="text/event-stream")

    async def after_done(self, request: web.Request, data: bytes, *, hold: bool) -> web.StreamResponse:
        """A whole stream, ``[DONE]`` included, whose body does not end: the connection is held
        open (until ``release``) or broken off, as some servers and proxies do."""
        resp = web.StreamResponse(headers={**self.headers(next(self._count)), "Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(data)
        if hold:
            await self._wait_release()
        elif request.transport is not None:
            request.transport.abort()
        return resp

    async def error_page(self, request: web.Request, model: str) -> web.StreamResponse:
        status, content_type, page = ERROR_PAGES[model]
        key = request.headers.get("Authorization", request.headers.get("x-api-key", "")).removeprefix("Bearer ")
        return await self.send(request, status, page.replace(b"{key}", key.encode()), content_type,
                               extra={"Retry-After": "20"} if status == 503 else None)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's route: the ``ERROR_PAGES`` models only."""
        model = orjson.loads(request[RAW_BODY]).get("model", "")
        if model in ERROR_PAGES:
            return await self.error_page(request, model)
        return await self.send(request, 404, error_body("unknown model", "not_found_error", "not_found"))

    async def models(self, request: web.Request) -> web.StreamResponse:
        data = [{"id": name, "object": "model", "created": 1, "owned_by": "provider"} for name in ("gpt-x", "gpt-y")]
        return await self.send(request, 200, orjson.dumps({"object": "list", "data": data}))

    async def model(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name in ERROR_PAGES:
            return await self.error_page(request, name)
        if name == "broken-body":
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            await resp.write(b'{"id": "broken-body", "object": "model", "padding": "' + b"x" * 4000)
            await asyncio.sleep(0.1)
            await resp.write(b"y" * 4000)
            await asyncio.sleep(0.1)
            if request.transport is not None:
                request.transport.close()
            resp.force_close()
            return resp
        if name == "slow-body":
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            await resp.write(b'{"id": "slow-body", "padding": "' + b"x" * 4000)
            for _ in range(200):
                await asyncio.sleep(0.05)
                if request.transport is None or request.transport.is_closing():
                    break
                try:
                    await resp.write(b"x")
                except (ConnectionResetError, ConnectionError):
                    break
            self.client_gone.set()
            return resp
        return await self.send(request, 200, orjson.dumps({"id": name, "object": "model", "created": 1,
                                                            "owned_by": "provider"}))

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(request[RAW_BODY])
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": [0.25] * 256} for i in range(len(inputs))]
        return await self.send(request, 200, orjson.dumps({"object": "list", "data": data, "model": body["model"],
                                                            "usage": {"prompt_tokens": 2, "total_tokens": 2}}))

    async def anything(self, request: web.Request) -> web.StreamResponse:
        return await self.send(request, 200, orjson.dumps({"object": "echo", "path": request.raw_path}))

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.record])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{name}", self.model)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_route("*", "/{tail:.*}", self.anything)
        return app


@pytest.fixture
def provider() -> Iterator[Provider]:
    """A provider-like upstream on loopback (see the module docstring)."""
    prov = Provider()
    server = _Server(prov.app())
    prov.url = f"http://127.0.0.1:{server.port}/v1"
    try:
        yield prov
    finally:
        prov.release.set()
        server.stop()
