"""Stage: forward. Sends ``forward_body`` upstream (to the codec's ``upstream_path``) and relays
the reply, read and assembled by the codec (``gateway.codecs``); sets ``response``,
``upstream_status``, ``reply_message``, ``reply_body``, ``reply_truncated``, ``tail``,
``tail_type``, ``tail_headers`` and ``outcome``.

The reply comes through ``Upstreams.open`` already decoded (a provider that compresses is
fine), with only the headers a client may see (rate limits, request id, Retry-After).

Non-streaming, up to the upstream's ``max_reply_bytes``: the whole body becomes ``tail``, sent
by ``respond`` after ``persist``; when the client hung up while the upstream was answering, the
round is ``incomplete``. A body over the cap is relayed to the client as it arrives (so memory
stays near the cap, not the reply's size), its first ``max_reply_bytes`` are kept and the
assistant's text is read from them as far as it goes (``content_prefix``; nothing when the
content does not start within them), the last piece is held back as ``tail`` until the round
is committed, and the round is ``incomplete`` with ``reply_truncated`` set. Error
statuses take the same path, with outcome ``upstream_error``.

Streaming: complete SSE events go to the client as they arrive; the final event (Chat's
``data: [DONE]``, Responses' ``response.completed``, ``.incomplete`` or ``.failed``, Messages'
``message_stop``) is held back as ``tail`` so that the round is committed before the client sees
the end; of a final event longer than the cap only its last newline is held (``event_open``: the
client has the rest). A stream that ends with its final event is ``completed``, unless the
codec's assembler says the provider failed (Responses' ``response.failed``: ``upstream_error``);
either way the client gets the provider's own final event. When ``reply_id`` is set (a
gateway-held Responses chain), the upstream's response id is replaced by it in what the client
gets, and so are the request fields the gateway changed on the way up (:func:`echoed`: the
``previous_response_id`` the client sent, also on a ``store: false`` continuation, and
``store: true``) in the response objects' own members.
Past ``max_reply_bytes`` of events the client still gets every event, the reply is assembled
from what fits, and the round is ``incomplete`` with ``reply_truncated``. A client that
disconnects, or an upstream that breaks off, ends the stream with outcome ``incomplete``
(``ended_by`` says which); the partial reply is still recorded. A round cancelled by the
gateway's shutdown, streamed or not, whether or not the provider had begun its reply, is
``incomplete`` with ``ended_by = "shutdown"``. Errors before any byte reached
the client raise ``UpstreamError``/``UpstreamTimeout``; once bytes went out, a broken-off
upstream sets ``ended_by = "upstream"`` and ``respond`` ends the reply (an SSE error event for a
stream, a closed connection otherwise) — never a second status line. Upstream 4xx/5xx bodies
pass through.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from gateway import jsonbody
from gateway.context import Context
from gateway.errors import UpstreamError
from gateway.session.model import Message
from gateway.sse import EventSplitter
from gateway.tracing import finish_reply
from gateway.upstream import UpstreamReply


class RelayedResponse(web.StreamResponse):
    """A relayed reply whose status line and headers can go out with its first bytes of body, in
    one send: ``prepare`` only buffers them (a ``web.Response`` does the same; a plain
    ``StreamResponse`` sends them at once), the first ``write`` sends them, ``write(b"")`` sends
    them alone. The class attribute is aiohttp's (3.12+); without it they go out at ``prepare``."""

    _send_headers_immediately = False


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
    watch = ClientWatch(ctx.request)
    try:
        async with ctx.services.upstreams.open(ctx.upstream, "POST", ctx.codec.upstream_path,
                                               body=ctx.forward_body, headers=headers, json=True) as reply:
            ctx.upstream_status = reply.status
            if reply.status >= 400 or not reply.streaming:
                await _read_reply(ctx, reply)
                return
            await _relay_stream(ctx, reply)
    except UpstreamError as exc:
        if exc.upstream_status is not None:  # the provider answered, with an error the boundary translated
            ctx.upstream_status = exc.upstream_status
        raise
    except asyncio.CancelledError:
        if not watch.fired:  # the gateway's shutdown cut the round off (the provider did not fail)
            ctx.outcome, ctx.ended_by = "incomplete", "shutdown"
            raise
        asyncio.current_task().uncancel()  # type: ignore[union-attr]
        ctx.outcome, ctx.ended_by = "incomplete", "client"  # recorded as any client that left
    finally:
        watch.stop()


CLIENT_WATCH_SECONDS = 1.0
"""How often a request waiting on the upstream looks whether its client is still there."""


class ClientWatch:
    """While the upstream is asked, checks every :data:`CLIENT_WATCH_SECONDS` that the client is
    still connected, and cancels the waiting task when it has gone, so the upstream request ends
    (a model that thinks for minutes stops working, and billing, for nobody) and the round is
    recorded as the client's leaving. Writes find a client gone by themselves; this is for the
    waits without writes: a non-streamed reply, a stream before or between events. A timer, not
    a task: nothing to do for a request that is answered within the interval."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        self.fired = False
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(CLIENT_WATCH_SECONDS, self._check)

    def _check(self) -> None:
        if _client_gone(self._request) and self._task is not None:
            self.fired = True
            self._timer = None
            self._task.cancel()
        else:
            self._timer = self._loop.call_later(CLIENT_WATCH_SECONDS, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def _read_reply(ctx: Context, reply: UpstreamReply) -> None:
    assert ctx.upstream is not None
    cap = ctx.upstream.max_reply_bytes
    ctx.tail_type = reply.content_type
    ctx.tail_headers = {**reply.headers, "X-Sessiongate-Request-Id": ctx.request_id}
    kept: list[bytes] = []
    size = 0
    pieces = reply.aiter_bytes()
    async for piece in pieces:
        if size + len(piece) > cap:
            await _relay_oversized(ctx, reply, kept, piece, pieces)
            return
        kept.append(piece)
        size += len(piece)
    ctx.tail = b"".join(kept)
    if reply.status < 400:
        _parse_reply(ctx)
        if _client_gone(ctx.request):
            ctx.outcome, ctx.ended_by = "incomplete", "client"


async def _relay_oversized(ctx: Context, reply: UpstreamReply, kept: list[bytes], piece: bytes,
                           pieces: AsyncIterator[bytes]) -> None:
    """Relay a non-streamed body past the cap as it arrives; hold back its last piece as ``tail``."""
    ctx.reply_truncated = True
    if reply.status < 400:
        ctx.outcome = "incomplete"
    out = web.StreamResponse(status=reply.status, headers=ctx.tail_headers)
    out.content_type = reply.content_type or "application/json"
    ctx.response = out
    pending = b"".join(kept) + piece
    kept.clear()
    if reply.status < 400:
        text = ctx.codec.reply_prefix(pending[: ctx.upstream.max_reply_bytes])  # type: ignore[union-attr]
        if text is not None:
            ctx.reply_message = {"role": "assistant", "content": text}
    writing = True
    try:
        await out.prepare(ctx.request)
        writing = False
        async for piece in pieces:
            writing = True
            await out.write(pending)
            writing = False
            ctx.bytes_out += len(pending)
            pending = piece
        ctx.tail = pending
    except UpstreamError:
        ctx.outcome, ctx.ended_by = "incomplete", "upstream"
    except (ConnectionResetError, OSError):
        ctx.outcome, ctx.ended_by = "incomplete", "client" if writing else "upstream"


_CONTENT = re.compile(rb'"message"\s*:\s*\{.{0,4096}?"content"\s*:\s*"', re.DOTALL)
_PARTIAL_ESCAPE = re.compile(rb'\\(u[0-9A-Fa-f]{0,3})?$')


def content_prefix(prefix: bytes) -> str | None:
    """The text of ``choices[0].message.content`` as far as it goes in the first bytes of a
    chat completion (a string cut off at the end), or None when it does not start there."""
    match = _CONTENT.search(prefix)
    if match is None:
        return None
    rest = prefix[match.end():]
    end = re.search(rb'(?<!\\)(\\\\)*"', rest)
    body = rest[: end.end() - 1] if end else _PARTIAL_ESCAPE.sub(b"", rest)
    for _ in range(8):  # a cut inside a UTF-8 sequence or an escape costs a few bytes at most
        try:
            text = orjson.loads(b'"' + body + b'"')
        except orjson.JSONDecodeError:
            body = body[:-1]
            continue
        return text if isinstance(text, str) else None
    return None


def _client_gone(request: web.Request) -> bool:
    """True when the client hung up while the gateway waited for a non-streamed reply."""
    return request.transport is None or request.transport.is_closing()


def _calls_widened(message: Message) -> bool:
    """Whether a tool call of the reply's message may hold an integer beyond 64 bits that orjson
    read as a float (``jsonbody.widened``): a Messages ``tool_use`` input is written again as the
    call's arguments by orjson. A reply without tool calls costs one dict lookup."""
    calls = message.get("tool_calls")
    if not calls:
        return False
    for call in calls:
        arguments = (call.get("function") or {}).get("arguments") if isinstance(call, dict) else None
        if isinstance(arguments, str) and jsonbody.widened(arguments.encode()):
            return True
    return False


def _parse_reply(ctx: Context) -> None:
    if ctx.tail.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (RFC 8259 lets a parser ignore it)
        ctx.tail = ctx.tail[3:]
    try:
        body = orjson.loads(ctx.tail)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError(f"upstream sent a reply that is not JSON ({ctx.codec.name})",
                            code="bad_upstream_reply") from exc
    message = ctx.codec.parse_reply(body)
    if _calls_widened(message):  # a tool call's input may hold a wide integer orjson read as a float
        with contextlib.suppress(RecursionError):  # deeper than the exact reader goes: orjson's stands
            body = jsonbody.loads_exact(ctx.tail)
            message = ctx.codec.parse_reply(body)
    if ctx.reply_id and isinstance(body.get("id"), str):
        ctx.tail = ctx.tail.replace(body["id"].encode(), ctx.reply_id.encode())
        body["id"] = ctx.reply_id
    if fields := echoed(ctx):
        ctx.tail = echo_json(ctx.tail, fields)
    ctx.reply_body, ctx.reply_message = body, message
    ctx.outcome = "upstream_error" if ctx.codec.failed(body) else "completed"


async def _relay_stream(ctx: Context, reply: UpstreamReply) -> None:
    assert ctx.upstream is not None
    cap = ctx.upstream.max_reply_bytes
    out = RelayedResponse(status=reply.status, headers={**reply.headers, "X-Sessiongate-Request-Id": ctx.request_id})
    out.headers["Content-Type"] = "text/event-stream"
    out.headers["Cache-Control"] = "no-cache"
    codec = ctx.codec
    assembler = codec.assembler(cap)
    splitter = EventSplitter(assembler.add_event, max_event=cap, on_oversized=assembler.add_oversized)
    swap: tuple[bytes, bytes] | None = None
    fields = echoed(ctx)
    ctx.response = out
    ctx.outcome = "incomplete"
    writing = True
    pieces = reply.aiter_bytes()
    try:
        await out.prepare(ctx.request)  # the headers wait for the first events when they are here already
        if not reply.body_arrived:  # a provider that thinks before its first event: the headers go now
            await out.write(b"")
        writing = False
        async for chunk in pieces:
            data = splitter.feed(chunk)
            if ctx.reply_id and swap is None and assembler.id:
                swap = (assembler.id.encode(), ctx.reply_id.encode())
            if data and swap is not None:
                data = data.replace(*swap)
            if data and fields:
                data = echo_events(data, fields)
            if data:
                writing = True
                await out.write(data)
                writing = False
                if not ctx.first_byte_at:
                    ctx.first_byte_at = time.perf_counter()
                ctx.bytes_out += len(data)
            elif not ctx.bytes_out:  # no whole event yet: the headers go now (later writes of b"" do nothing)
                writing = True
                await out.write(b"")
                writing = False
            if splitter.done and not reply.at_eof:  # a final event and no end of body yet: wait a little
                await _drain(pieces)
                break
        ctx.reply_truncated = assembler.truncated or splitter.oversized
        ended = splitter.done or assembler.finished
        if ended and not ctx.reply_truncated:  # the provider's own end, relayed after the commit
            ctx.outcome = "completed" if assembler.completed else "upstream_error"
        if ended:
            held = splitter.held
            held = held.replace(*swap) if swap is not None else held
            ctx.tail = (echo_events(held, fields) if fields else held) if splitter.done else b""
        else:
            ctx.ended_by = "upstream"
    except UpstreamError:
        ctx.ended_by = "upstream"
    except (TimeoutError, OSError):
        ctx.ended_by = "client" if writing else "upstream"
    except asyncio.CancelledError:  # shutting down (or the client left: _forward says so): settled with what came
        ctx.ended_by = "shutdown"
        raise
    finally:  # also on cancellation, so the settled round keeps the reply the client already has
        ctx.reply_truncated = ctx.reply_truncated or assembler.truncated or splitter.oversized
        ctx.event_open = splitter.open_end
        ctx.error_relayed = assembler.errored
        ctx.stream_seq = assembler.last_seq
        ctx.reply_message, ctx.reply_body = assembler.message(), assembler.response()
        if ctx.reply_id and ctx.reply_body is not None:
            ctx.reply_body["id"] = ctx.reply_id


def echoed(ctx: Context) -> dict[str, Any]:
    """The members of a response object the client gets back as it sent them, where the gateway
    changed them on the way up (gateway-held Responses state): the ``previous_response_id`` it
    stripped (a chain round, or a ``store: false`` continuation) and, for a chain round, ``store``
    (sent upstream as false, while the gateway keeps the response). Empty for anything else."""
    fields: dict[str, Any] = {}
    prev = ctx.body.get("previous_response_id")
    if isinstance(prev, str) and (ctx.reply_id or ctx.window_only):
        fields["previous_response_id"] = prev
    if ctx.reply_id:
        fields["store"] = True
    return fields


def _set_members(obj: Any, fields: dict[str, Any]) -> bool:
    """Set *fields* among *obj*'s own members where it has them with another value; True if any."""
    changed = False
    if isinstance(obj, dict):
        for name, value in fields.items():
            if name in obj and obj[name] != value:
                obj[name] = value
                changed = True
    return changed


def echo_json(data: bytes, fields: dict[str, Any]) -> bytes:
    """A JSON reply (a response object) with *fields* set among its top-level members, never in
    what it nests (an echoed schema may have a member named ``store``); unchanged when nothing
    differs or it is not JSON."""
    try:
        obj = jsonbody.loads(data)
    except orjson.JSONDecodeError:
        return data
    return jsonbody.dumps(obj) if _set_members(obj, fields) else data


def echo_events(data: bytes, fields: dict[str, Any]) -> bytes:
    """Whole SSE events with *fields* set among the top-level members of each event's
    ``response`` object (``response.created``, ``.in_progress``, ``.completed`` ...); every
    other line, and an event whose JSON does not parse, is left as it came."""
    if b'"response"' not in data:
        return data
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if not line.startswith(b"data:") or b'"response"' not in line:
            continue
        start = 6 if line.startswith(b"data: ") else 5
        try:
            event = jsonbody.loads(line[start:])
        except orjson.JSONDecodeError:
            continue
        if isinstance(event, dict) and _set_members(event.get("response"), fields):
            lines[i] = line[:start] + jsonbody.dumps(event) + (b"\r" if line.endswith(b"\r") else b"")
    return b"\n".join(lines)


DRAIN_SECONDS = 0.5
"""How long a stream's end may follow its final event before the gateway stops waiting for it."""


async def _drain(pieces: AsyncIterator[bytes]) -> None:
    """Read the rest of a stream whose final event has come but whose body has not ended:
    normally its end, in a moment (the connection then goes back to the pool). A provider that
    holds the connection open after it, or breaks it off, costs that connection and at most
    :data:`DRAIN_SECONDS`, never the round: the reply is whole. (When the body's end is already
    here the relay loop simply runs out, so its generator ends as it always did.)"""
    with contextlib.suppress(UpstreamError, TimeoutError):
        async with asyncio.timeout(DRAIN_SECONDS):
            async for _ in pieces:  # nothing comes after a final event but the end of the body
                pass
