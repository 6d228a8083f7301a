"""Stage: forward. Sends ``forward_body`` upstream and relays the reply; sets ``response``,
``upstream_status``, ``reply_message``, ``reply_body``, ``tail`` and ``outcome``.

Non-streaming: the whole upstream body becomes ``tail``, sent by ``respond`` after ``persist``;
when the client hung up while the upstream was answering, the round is ``incomplete``.
Streaming: complete SSE events go to the client as they arrive; the final ``data: [DONE]`` is
held back as ``tail`` so that the round is committed before the client sees the end. A client
that disconnects, or an upstream that breaks off, ends the stream with outcome ``incomplete``
(``ended_by`` says which); the partial reply is still recorded. Errors before any byte reached
the client raise ``UpstreamError``/``UpstreamTimeout``; upstream 4xx/5xx bodies pass through.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from gateway.context import Context
from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.sse import EventSplitter, ReplyAssembler
from gateway.tracing import finish_reply

PASS_HEADERS = frozenset({"retry-after", "x-request-id", "openai-processing-ms", "openai-version"})


def reply_headers(resp: aiohttp.ClientResponse, request_id: str) -> dict[str, str]:
    """The provider's headers a client needs (request id, rate limits, Retry-After), plus ours."""
    out = {k: v for k, v in resp.headers.items()
           if k.lower() in PASS_HEADERS or k.lower().startswith("x-ratelimit-")}
    out["X-Sessiongate-Request-Id"] = request_id
    return out


DONE_TAIL = b"data: [DONE]\n\n"


async def forward(ctx: Context) -> None:
    tracing = ctx.services.tracing
    if tracing is None:
        await _forward(ctx, ctx.request.headers)
        return
    headers = CIMultiDict(ctx.request.headers)
    with tracing.upstream_call(ctx, headers) as span:
        try:
            await _forward(ctx, headers)
        finally:
            finish_reply(span, ctx)


async def _forward(ctx: Context, headers: Mapping[str, str]) -> None:
    assert ctx.upstream is not None
    ctx.outcome = "upstream_error"  # until proven otherwise
    resp = await ctx.services.upstreams.send(ctx.upstream, "POST", "/chat/completions",
                                             body=ctx.forward_body, headers=headers)
    try:
        ctx.upstream_status = resp.status
        streaming = resp.content_type == "text/event-stream"
        if resp.status >= 400 or not streaming:
            ctx.tail = await _read_all(ctx, resp)
            ctx.tail_type = resp.content_type
            ctx.tail_headers = reply_headers(resp, ctx.request_id)
            if resp.status < 400:
                _parse_reply(ctx)
                if _client_gone(ctx.request):
                    ctx.outcome, ctx.ended_by = "incomplete", "client"
            return
        await _relay_stream(ctx, resp)
    finally:
        resp.release()


async def _read_all(ctx: Context, resp: aiohttp.ClientResponse) -> bytes:
    try:
        return await resp.read()
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise UpstreamTimeout(f"upstream '{ctx.upstream.name}' stopped answering mid-reply") from exc  # type: ignore[union-attr]
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"upstream '{ctx.upstream.name}' broke off its reply ({type(exc).__name__})") from exc  # type: ignore[union-attr]


def _client_gone(request: web.Request) -> bool:
    """True when the client hung up while the gateway waited for a non-streamed reply."""
    return request.transport is None or request.transport.is_closing()


def _parse_reply(ctx: Context) -> None:
    try:
        body = orjson.loads(ctx.tail)
        message = body["choices"][0]["message"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
        raise UpstreamError("upstream sent a reply that is not a chat completion", code="bad_upstream_reply") from exc
    ctx.reply_body, ctx.reply_message, ctx.outcome = body, message, "completed"


async def _relay_stream(ctx: Context, resp: aiohttp.ClientResponse) -> None:
    out = web.StreamResponse(status=resp.status, headers=reply_headers(resp, ctx.request_id))
    out.headers["Content-Type"] = "text/event-stream"
    out.headers["Cache-Control"] = "no-cache"
    splitter, assembler = EventSplitter(), ReplyAssembler()
    ctx.response = out
    ctx.outcome = "incomplete"
    writing = True
    try:
        await out.prepare(ctx.request)
        writing = False
        async for chunk in resp.content.iter_any():
            data = splitter.feed(chunk)
            if splitter.events:
                assembler.add_events(splitter.events)
                splitter.events.clear()
            if data:
                writing = True
                await out.write(data)
                writing = False
                if not ctx.first_byte_at:
                    ctx.first_byte_at = time.perf_counter()
                ctx.bytes_out += len(data)
        if splitter.done or assembler.finish_reason:
            ctx.outcome = "completed"
            ctx.tail = DONE_TAIL if splitter.done else b""
        else:
            ctx.ended_by = "upstream"
    except (TimeoutError, OSError, aiohttp.ClientError):
        ctx.ended_by = "client" if writing else "upstream"
    ctx.reply_message, ctx.reply_body = assembler.message(), assembler.response()
