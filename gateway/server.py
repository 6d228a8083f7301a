"""The HTTP listener: aiohttp's server, held to a proxy's limits against slow and hostile clients.

``run(app, settings)`` serves *app* until SIGTERM/SIGINT/SIGHUP, then shuts down: in-flight
requests get ``server.shutdown_timeout`` seconds to finish, then are cancelled and get as long
again for their settle step to record the round (so the connections are done within twice
``shutdown_timeout``; the app's clean-up, closing the store, follows). ``GatewayRunner`` is the
``web.AppRunner`` that does the same for tests and embedders.

What aiohttp does not do and this module adds, per connection (``GatewayProtocol``):

- a **header timeout**: from accept (or the first byte of a keep-alive request) to the end of
  the request head. Past it a connection that sent part of a head gets 408, an empty one is
  closed; the keep-alive idle timeout stays aiohttp's own (``server.keepalive_timeout``);
- a **body timeout**: idle between body chunks (``body_idle_timeout``), in total
  (``body_timeout``), and a **rate floor** (``body_min_rate`` bytes/s once past
  ``body_rate_grace``, as Apache's mod_reqtimeout ``MinRate``: the deadline is the grace plus
  one second per ``body_min_rate`` bytes received), so a body dripped a byte at a time to beat
  the idle timeout still ends. A handler still reading the body gets ``RequestTimeout`` (408 in
  the route's error shape, through the error middleware); the connection is then closed, never
  lingered;
- a **connection cap** (``max_connections``, lowered to fit the open-file limit): at the cap
  the oldest connection with no request in progress (idle keep-alive, or still sending its
  head) is closed to make room; failing that, the connection whose body has arrived slowest
  (bytes per second since its body began, at least ``EVICT_MIN_AGE`` ago) gets 408 and is
  closed, so drippers holding every slot cannot keep a client out; only when every connection
  is busy otherwise (its body complete: the gateway is working on it) does the new one get
  503. All are counted (``sessiongate_connections_*`` in ``/metrics``);
- **error rendering**: aiohttp's own refusals (bad request line, header too long, invalid
  characters, bad chunked framing...) are answered in OpenAI's error shape with a fixed
  message naming the kind of problem; nothing of the request is echoed or logged, and
  aiohttp's own logging of the offending bytes is replaced by a line naming the exception type;
- **shutdown** that finishes what it started and never waits for a body nobody is reading: a
  request whose head arrived before shutdown keeps receiving its body (aiohttp drops every byte
  that arrives once it is stopping, so such a request waited out the grace and was cut off with
  no reply) and is answered with ``Connection: close``; no other request starts on its
  connection (a pipelined one behind it gets no answer: the connection closes after the first).
  A head on its way counts too: connections still in the listen backlog are accepted before
  the listener closes (``take_backlog``: closing it reset them), and a head begun, or a
  connection opened under ``EVICT_MIN_AGE`` before, may still complete within the grace. A
  connection with no request (idle, or lingering after a 413) is closed at once.
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from aiohttp import http_exceptions, web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from gateway.errors import RequestTimeout
from gateway.settings import ServerSettings, Settings

log = structlog.get_logger("gateway.server")

LINGERING_SECONDS = 2.0
"""After a response that left part of the body unread (a 413), how long the connection keeps
draining it so that the client reads the response instead of a reset; bounded, and skipped on
shutdown."""
EVICT_MIN_AGE = 1.0
"""Seconds a new connection is safe from being closed to make room: enough for any client to
send a request head, so a flood of reconnecting slow sockets cannot evict a normal client
before it is served."""
BACKLOG = 1024
"""The listening socket's queue of connections the kernel completed and the gateway has not accepted."""
FD_RESERVE = 256
"""Descriptors kept free for everything that is not a client connection: the store, the
policy and key files, logs, the stand-in model."""


@dataclass
class ConnectionStats:
    """Counters behind ``sessiongate_connections_*``."""

    open: int = 0
    accepted: int = 0
    refused: int = 0
    evicted: int = 0
    evicted_slow_bodies: int = 0
    header_timeouts: int = 0
    body_timeouts: int = 0
    slow_bodies: int = 0


@dataclass(frozen=True)
class Limits:
    header_timeout: float
    body_idle_timeout: float
    body_timeout: float
    max_connections: int
    body_min_rate: int = 0
    body_rate_grace: float = 0.0

    @classmethod
    def from_settings(cls, server: ServerSettings, max_connections: int | None = None) -> Limits:
        return cls(server.header_timeout, server.body_idle_timeout, server.body_timeout,
                   max_connections or server.max_connections, server.body_min_rate, server.body_rate_grace)


def _error_bytes(status: int, reason: str, message: str, kind: str, code: str,
                 extra: Iterable[str] = ()) -> bytes:
    """A complete ``Connection: close`` response in OpenAI's error shape, for the socket itself."""
    body = orjson.dumps({"error": {"message": message, "type": kind, "code": code}})
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


HEADER_TIMEOUT_RESPONSE = _error_bytes(
    408, "Request Timeout", "the request head (request line and headers) did not arrive in time",
    "invalid_request_error", "request_timeout")
BUSY_RESPONSE = _error_bytes(
    503, "Service Unavailable", "the gateway is at its connection limit; retry shortly",
    "service_unavailable", "too_many_connections", ("Retry-After: 1",))


def parse_error_body(exc: BaseException | None) -> tuple[str, str]:
    """The fixed message and code for one of aiohttp's parser errors. Never the exception's
    text: it quotes the offending bytes (a header with a key in it, for example)."""
    if isinstance(exc, http_exceptions.LineTooLong):
        return "the request line or a header is too long", "header_too_large"
    if isinstance(exc, http_exceptions.BadStatusLine):  # includes BadHttpMethod
        return "malformed request line: expected 'METHOD /path HTTP/1.1'", "bad_request_line"
    if isinstance(exc, http_exceptions.InvalidHeader):
        return "invalid header name or value (control characters are not allowed)", "invalid_header"
    if isinstance(exc, http_exceptions.InvalidURLError):
        return "invalid request target", "invalid_url"
    if isinstance(exc, http_exceptions.PayloadEncodingError):
        return "invalid body framing (Content-Length, Transfer-Encoding or chunk sizes)", "invalid_body_framing"
    return "malformed HTTP request", "bad_http_message"


def release_body(request: BaseRequest) -> None:
    """Once a request has been answered: drop the traceback of the error that ended its body
    (the client hung up, or a body timeout). The body stream keeps that error, and its traceback
    keeps the frames that were reading the body, with every chunk read so far and the stream
    itself: a reference cycle that only the cyclic collector frees, which :func:`settle_heap`
    makes rare. Without the traceback, reference counting frees the partial body at once, on
    every route, however the route reads its body (``read_limited``, ``request.post()``)."""
    exc = request.content.exception()
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


class GatewayProtocol(RequestHandler):
    """aiohttp's request handler plus timeouts, the connection cap and safe error rendering."""

    def __init__(self, manager: GatewayServer, *, limits: Limits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._gw = manager
        self._limits = limits
        self._refused = False
        self._connected_at = self._loop.time()
        self._head_deadline = 0.0
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = False
        self._body: StreamReader | None = None
        self._body_started = 0.0
        self._body_idle_deadline = 0.0
        self._body_deadline = 0.0
        self._body_timer: asyncio.TimerHandle | None = None
        self._answered = 0  # requests handled to their end; _request_count counts the heads parsed
        self._head_began = 0.0
        self._head_grace_until = 0.0  # at shutdown: until when a head on its way may still come
        self._head_waiter: asyncio.Future[None] | None = None

    # --- connection life --------------------------------------------------------------

    @property
    def evictable(self) -> bool:
        """No request is being handled (the connection is idle or still sending its head), and it
        has had ``EVICT_MIN_AGE`` to send one: a client that just connected is never the one closed."""
        return (not self._request_in_progress and not self._messages and not self._refused
                and self._loop.time() - self._connected_at >= EVICT_MIN_AGE)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        gw = self._gw
        if len(gw.live) >= self._limits.max_connections and not gw.make_room():
            self._refused = True
            self._force_close = True
            gw.stats.refused += 1
            try:
                transport.write(BUSY_RESPONSE)  # type: ignore[attr-defined]
            finally:
                transport.close()
            return
        gw.live[self] = None
        gw.stats.accepted += 1
        super().connection_made(transport)
        if self._keepalive_handle is not None:  # the header timeout covers a new connection
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        self._arm_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        self._gw.live.pop(self, None)
        self._cancel_timers()
        self._head_came()
        super().connection_lost(exc)

    def evict(self) -> None:
        """Close this connection to make room for a new one (it has no request in progress)."""
        self._gw.live.pop(self, None)
        self._cancel_timers()
        self.force_close()

    def body_rate(self) -> float | None:
        """Bytes per second this connection's request body has arrived at since it began, when
        it may be evicted for it: a body still arriving, begun at least ``EVICT_MIN_AGE`` ago
        (a request that just started is never the one closed). None otherwise."""
        body = self._body
        if (body is None or body.is_eof() or not self._request_in_progress or self._close or self._force_close
                or self.transport is None):
            return None
        elapsed = self._loop.time() - self._body_started
        return body.total_bytes / elapsed if elapsed >= EVICT_MIN_AGE else None

    def evict_slow_body(self) -> None:
        """Make room for a new connection at the cap: this one's body has been the slowest to
        arrive. Its request gets 408; the connection closes (at the latest ``LINGERING_SECONDS``
        on, should the handler not be reading the body)."""
        self._gw.live.pop(self, None)
        self._end_body(RequestTimeout("the request body arrived too slowly while the gateway was at its "
                                      "connection limit; send the body as fast as the network allows"))
        self._body_timer = self._loop.call_later(LINGERING_SECONDS, self.force_close)

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    # --- reading ----------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """The server is shutting down: the request in progress is the connection's last."""
        return self._gw.stopping

    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close:
            if self._gw.stopping and not self._force_close:
                self._shutdown_body(data)
            return
        body = self._body
        into_body = body is not None and not body.is_eof()  # known before the parser takes the segment
        before = self._request_count
        super().data_received(data)
        loop = self._loop
        if self._request_count > before:
            self._disarm_head()
            if self._gw.stopping:  # a head that was on its way at shutdown: its request is the last
                self.close()
                self._head_came()
            if self._body is not None and not self._body.is_eof() and isinstance(self._messages[-1][0], _ErrInfo):
                # broken framing inside a body being read: that request fails, the connection ends
                self._messages.pop()
                self._body.set_exception(RequestPayloadError("invalid body framing"))
                self._body = None
                self._lingering_time = 0.0
                self.close()
                return
            payload = self._messages[-1][1] if self._messages else None
            if isinstance(payload, StreamReader) and not payload.is_eof():
                now = loop.time()
                self._body = payload
                self._body_started = now
                self._body_idle_deadline = now + self._limits.body_idle_timeout
                self._body_deadline = now + self._limits.body_timeout
                if self._body_timer is None:
                    self._body_timer = loop.call_at(self._next_body_deadline(), self._on_body_timer)
            return
        if not data:
            return
        if into_body:  # body bytes, the last ones too: a segment that ends a body begins no new head
            self._body_idle_deadline = loop.time() + self._limits.body_idle_timeout
        elif self._head_timer is None:
            self._arm_head()
            self._head_bytes = True
        else:
            self._head_bytes = True

    def _shutdown_body(self, data: bytes) -> None:
        """Once shutdown began: the bytes of the body of the request being served, which is still
        to be answered. What follows that body (a pipelined request) is parsed and dropped: no
        request starts on a connection after shutdown began."""
        body, parser = self._body, self._parser
        if body is None or body.is_eof() or parser is None or self._payload_parser is not None or self._upgraded:
            return
        self._body_idle_deadline = self._loop.time() + self._limits.body_idle_timeout
        try:
            parser.feed_data(data)
        except http_exceptions.HttpProcessingError:
            if not body.is_eof():
                body.set_exception(RequestPayloadError("invalid body framing"))
            self._body = None

    def _process_keepalive(self) -> None:
        if self._head_timer is not None and self._head_bytes:
            return  # a request head has begun: the header timeout decides now
        super()._process_keepalive()

    def _head_came(self) -> None:
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_result(None)

    def _arm_head(self) -> None:
        self._head_bytes = False
        self._head_began = self._loop.time()
        self._head_deadline = self._head_began + self._limits.header_timeout
        self._head_timer = self._loop.call_at(self._head_deadline, self._on_head_timer)

    def _disarm_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _on_head_timer(self) -> None:
        self._head_timer = None
        if self.transport is None or self._force_close:
            return
        if self._request_in_progress or self._messages:
            # a pipelined head behind a request still being answered: its clock starts afterwards
            self._arm_head()
            self._head_bytes = True
            return
        self._gw.stats.header_timeouts += 1
        log.info("header_timeout", partial=self._head_bytes, seconds=self._limits.header_timeout)
        if self._head_bytes:
            self.transport.write(HEADER_TIMEOUT_RESPONSE)
        self.evict()

    def _rate_deadline(self) -> float:
        """When the body falls under ``body_min_rate``: the grace, plus a second per
        ``body_min_rate`` bytes received (never, with the floor off)."""
        limits, body = self._limits, self._body
        if not limits.body_min_rate or body is None:
            return float("inf")
        return self._body_started + limits.body_rate_grace + body.total_bytes / limits.body_min_rate

    def _next_body_deadline(self) -> float:
        return min(self._body_idle_deadline, self._body_deadline, self._rate_deadline())

    def _on_body_timer(self) -> None:
        self._body_timer = None
        body = self._body
        if body is None or body.is_eof() or self.transport is None or self._force_close:
            return
        if self._loop.time() < self._next_body_deadline():
            self._body_timer = self._loop.call_at(self._next_body_deadline(), self._on_body_timer)
            return
        if self._rate_deadline() < min(self._body_idle_deadline, self._body_deadline):
            self._gw.stats.slow_bodies += 1
            log.info("body_too_slow", received=body.total_bytes, min_rate=self._limits.body_min_rate,
                     grace_seconds=self._limits.body_rate_grace)
            self._end_body(RequestTimeout(
                "the request body arrived too slowly (the gateway's minimum body rate); send it without pauses"))
            return
        self._gw.stats.body_timeouts += 1
        log.info("body_timeout", idle_seconds=self._limits.body_idle_timeout, total_seconds=self._limits.body_timeout)
        self._end_body(RequestTimeout("the request body did not arrive in time; send it without pauses"))

    def _end_body(self, exc: RequestTimeout) -> None:
        """Stop reading the body in progress: the handler reading it gets *exc* (a 408 in the
        route's shape) and the connection closes after it; with no handler, it closes now."""
        body = self._body
        self._lingering_time = 0.0  # nothing more will be read from this connection
        self._body = None
        self._cancel_timers()
        if self._request_in_progress:
            if body is not None:
                body.set_exception(exc)
            self.close()
        else:
            if self._task_handler is not None:
                self._task_handler.cancel()
            self.evict()

    async def _handle_request(self, request: BaseRequest, start_time: float | None,
                              request_handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
                              ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            self._answered += 1
            release_body(request)

    # --- errors and logs --------------------------------------------------------------

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's own refusals in OpenAI's shape; the request's bytes are neither echoed nor logged."""
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; the connection is closed instead")
        if status >= 500:
            log.error("http_server_error", status=status, error=type(exc).__name__ if exc else None)
            body = {"message": "the gateway hit an internal error; it has been logged",
                    "type": "server_error", "code": "internal_error"}
        else:
            log.info("bad_http_request", status=status, error=type(exc).__name__ if exc else None)
            text, code = parse_error_body(exc)
            body = {"message": text, "type": "invalid_request_error", "code": code}
        resp = web.Response(status=status, body=orjson.dumps({"error": body}), content_type="application/json")
        resp.force_close()
        return resp

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's internal error log, reduced to the exception type (its text may quote the request)."""
        exc = kw.get("exc_info")
        log.error("http_server_error", error=type(exc).__name__ if isinstance(exc, BaseException) else None)

    # --- shutdown ---------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Shutdown began (``GatewayServer.pre_shutdown``): no further request starts on this
        connection (aiohttp's ``close``), unless a head is on its way, none being parsed yet: part
        of it has come (it may come until its header timeout), or the connection is new, accepted
        less than ``EVICT_MIN_AGE`` ago (until it is that old). :meth:`shutdown` waits for such a
        head, within the grace; its request is then the connection's last."""
        until = 0.0
        if self._head_timer is not None and not self._messages and not self._request_in_progress:
            until = self._head_deadline if self._head_bytes else self._head_began + EVICT_MIN_AGE
        if until > self._loop.time() and self.transport is not None:
            self._head_grace_until = until
        else:
            self.close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        """Give the request whose head has arrived (being handled, or parsed and about to be; or
        on its way, see :meth:`begin_shutdown`) until *timeout* seconds from now to be answered,
        its body still arriving meanwhile; then cancel it and give it as long again to settle (the
        pipeline records its round, ``ended_by: shutdown``). A connection with no such request
        (idle, a head begun long ago, lingering over a body nobody will read) is closed now.

        aiohttp's own waits *timeout* for the handler, then fails only a body read and waits
        *timeout* again before it cancels, not waiting for the cancelled handler at all."""
        loop = self._loop
        deadline = float("inf") if timeout is None else loop.time() + timeout
        self._lingering_time = 0.0  # a body left unread after the answer is not waited for
        if self._head_grace_until and self._answered >= self._request_count:
            self._head_waiter = loop.create_future()
            until = min(self._head_grace_until, deadline)
            await asyncio.wait({self._head_waiter}, timeout=max(0.0, until - loop.time()))
            self._head_waiter = None
        self.close()
        self._disarm_head()
        task = self._task_handler
        if self._answered >= self._request_count or task is None or task.done():
            self._cancel_timers()
            if task is not None and not task.done():
                task.cancel()
            self.force_close()
            return
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        done, _ = await asyncio.wait({task}, timeout=None if timeout is None else max(0.0, deadline - loop.time()))
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=timeout)
        self._cancel_timers()
        self.force_close()


class GatewayServer(Server):
    """aiohttp's low-level server making ``GatewayProtocol`` connections, with their counters."""

    def __init__(self, handler: Any, *, limits: Limits, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.limits = limits
        self.live: dict[GatewayProtocol, None] = {}
        self.stats = ConnectionStats()
        self.stopping = False

    def pre_shutdown(self) -> None:
        """Shutdown begins: no connection starts another request, but a head on its way
        (``GatewayProtocol.begin_shutdown``), while the body of a request in progress still
        arrives (``GatewayProtocol.data_received``)."""
        self.stopping = True
        for conn in list(self._connections):
            if isinstance(conn, GatewayProtocol):
                conn.begin_shutdown()
            else:
                conn.close()

    def __call__(self) -> GatewayProtocol:
        return GatewayProtocol(self, limits=self.limits, loop=self._loop, **self._kwargs)

    def make_room(self) -> bool:
        """Close the oldest connection that has no request in progress, or else the one whose
        body is arriving slowest (``GatewayProtocol.body_rate``); False when every connection
        is busy with a request the gateway itself is working on."""
        for conn in self.live:
            if conn.evictable:
                conn.evict()
                self.stats.evicted += 1
                log.info("connection_evicted", open=len(self.live), limit=self.limits.max_connections)
                return True
        slowest, lowest = None, float("inf")
        for conn in self.live:
            rate = conn.body_rate()
            if rate is not None and rate < lowest:
                slowest, lowest = conn, rate
        if slowest is None:
            return False
        slowest.evict_slow_body()
        self.stats.evicted_slow_bodies += 1
        log.info("slow_body_evicted", bytes_per_second=round(lowest, 1), open=len(self.live),
                 limit=self.limits.max_connections)
        return True


class ConnectionCollector:
    """Exposes a server's ``ConnectionStats`` in the app's Prometheus registry."""

    def __init__(self, server: GatewayServer) -> None:
        self._server = server

    def collect(self) -> Iterable[Any]:
        s = self._server.stats
        yield GaugeMetricFamily("sessiongate_connections_open", "Client connections open", value=len(self._server.live))
        yield GaugeMetricFamily("sessiongate_connections_limit", "Connection cap in force",
                                value=self._server.limits.max_connections)
        family = CounterMetricFamily("sessiongate_connections_closed", "Connections closed or refused by the "
                                     "gateway's own limits, by reason", labels=("reason",))
        for reason, value in (("refused_at_cap", s.refused), ("evicted_at_cap", s.evicted),
                              ("slow_body_evicted_at_cap", s.evicted_slow_bodies),
                              ("header_timeout", s.header_timeouts), ("body_timeout", s.body_timeouts),
                              ("body_min_rate", s.slow_bodies)):
            family.add_metric((reason,), value)
        yield family
        yield CounterMetricFamily("sessiongate_connections_accepted", "Client connections accepted", value=s.accepted)

    def describe(self) -> Iterable[Any]:
        return []


def fd_budget(settings: Settings) -> int:
    """Raise the soft open-file limit towards the hard one as the cap needs; the largest
    connection count that still leaves descriptors for the store, upstreams and files."""
    wanted = settings.server.max_connections + FD_RESERVE + sum(u.max_connections for u in settings.upstreams)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return settings.server.max_connections
    return max(1, soft - (wanted - settings.server.max_connections))


async def last_on_connection(request: web.Request, response: web.StreamResponse) -> None:
    """A response prepared once shutdown began says ``Connection: close``: the connection ends
    after it, and the client must not send another request on it."""
    protocol = request.protocol
    if isinstance(protocol, GatewayProtocol) and protocol.stopping:
        response.force_close()
        response.headers["Connection"] = "close"  # aiohttp set its headers before this hook runs


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose server enforces ``server.*`` limits (see the module docstring)."""

    def __init__(self, app: web.Application, server: ServerSettings, *, max_connections: int | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("access_log", None)
        super().__init__(app, shutdown_timeout=server.shutdown_timeout, keepalive_timeout=server.keepalive_timeout,
                         lingering_time=LINGERING_SECONDS, **kwargs)
        self._limits = Limits.from_settings(server, max_connections)
        if isinstance(app, web.Application):
            app.on_response_prepare.append(last_on_connection)

    async def _make_server(self) -> Server:
        base = await super()._make_server()
        server = GatewayServer(base.request_handler, request_factory=base.request_factory,
                               handler_cancellation=base.handler_cancellation, limits=self._limits,
                               loop=asyncio.get_running_loop(), **base._kwargs)
        from gateway.handlers import SERVICES  # the app's services exist once startup has run
        services = self._app.get(SERVICES) if isinstance(self._app, web.Application) else None
        if services is not None:
            services.metrics.registry.register(ConnectionCollector(server))  # type: ignore[arg-type]
        return server


GC_THRESHOLD = (20_000, 20, 20)
"""The collector's thresholds while serving: a request allocates a few thousand objects (the
window's messages), so CPython's default first generation (700) would run a collection several
times per request."""


def settle_heap() -> None:
    """Once start-up is done: move everything allocated so far (modules, policies, the app) out
    of the collector's reach (``gc.freeze``), so no later collection walks it again, and collect
    less often (:data:`GC_THRESHOLD`). Reference counting still frees almost everything at once;
    the collector only finds cycles."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def take_backlog(site: web.TCPSite) -> list[socket.socket]:
    """The connections the kernel completed on *site*'s listening sockets that the event loop
    has not accepted yet (the listen backlog), taken before the listeners close: closing a
    listener resets them, so a client that had connected and sent its request got a reset
    instead of an answer. Bounded by the backlog's size."""
    taken: list[socket.socket] = []
    for listener in getattr(site._server, "sockets", None) or ():
        with socket.socket(fileno=os.dup(listener.fileno())) as sock:
            sock.setblocking(False)
            for _ in range(BACKLOG):
                try:
                    conn, _addr = sock.accept()
                except OSError:  # BlockingIOError: nothing more waiting
                    break
                conn.setblocking(False)
                taken.append(conn)
    return taken


async def serve(app: web.Application, settings: Settings) -> None:
    """Serve *app* on ``server.host:server.port`` until SIGTERM, SIGINT or SIGHUP, then shut down."""
    server = settings.server
    cap = fd_budget(settings)
    if cap < server.max_connections:
        log.warning("max_connections_lowered", configured=server.max_connections, effective=cap,
                    note="the open-file limit is too low for the configured cap; raise it (ulimit -n, LimitNOFILE)")
    from gateway import workers
    worker = workers.worker_index() is not None
    if worker:  # tell every response's worker apart (tests, operators finding a worker's pid)
        pid = str(os.getpid())

        async def tag(_request: web.Request, response: web.StreamResponse) -> None:
            response.headers[workers.WORKER_HEADER] = pid

        app.on_response_prepare.append(tag)
    runner = GatewayRunner(app, server, max_connections=min(cap, server.max_connections))
    await runner.setup()
    try:
        site = web.TCPSite(runner, server.host, server.port, backlog=BACKLOG, reuse_port=worker or None)
        await site.start()
        settle_heap()
        workers.notify_ready()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in workers.STOP_SIGNALS:  # SIGHUP too: a closing terminal must not cut rounds off unrecorded
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        queued = take_backlog(site)
        await site.stop()  # new connections are refused (or go to a sibling worker)
        for conn in queued:  # served like those the loop had accepted: see take_backlog
            await loop.connect_accepted_socket(runner.server, conn)  # type: ignore[arg-type]
        log.info("shutting_down", open_connections=len(runner.server.live) if isinstance(
            runner.server, GatewayServer) else None, from_backlog=len(queued))
    finally:
        await runner.cleanup()


def run(app: web.Application, settings: Settings,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> None:
    """Blocking: ``serve`` on a new event loop (uvloop when given as *loop_factory*)."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(app, settings))
