"""The one place that talks to the model provider.

``Upstreams`` owns one ``aiohttp.ClientSession`` per upstream (keep-alive, a connection pool of
that upstream's ``max_connections``, no cookie jar: cookies a provider sets are never stored or
sent back), routes a model
name and protocol to an upstream by glob, adds the upstream's own key in the header its protocol
expects (``Authorization: Bearer`` for openai, ``x-api-key`` for anthropic, or the upstream's
``key_header``), forwards ``anthropic-version``/``anthropic-beta`` to anthropic upstreams
(``anthropic-version: 2023-06-01`` when the client sent none), and hands
back an :class:`UpstreamReply` of our own from ``open()``. Nothing of aiohttp leaves this
module: unreachable or broken off → ``UpstreamError`` (502), timeout → ``UpstreamTimeout``
(504), a body we cannot decode → ``UpstreamError`` with code ``bad_upstream_reply``, a redirect
(3xx, never followed: the provider key goes nowhere but ``base_url``) → ``UpstreamError`` with
code ``upstream_redirect``.

URLs: ``open(up, method, path, query=...)`` takes *path* (relative to the upstream's
``base_url``) and *query* already percent-encoded and validated by the caller (see
``gateway.proxy.parse_route``); the URL is joined as text and given to aiohttp with
``encoded=True``, so nothing re-resolves dot segments or re-encodes escapes on the way out. An
upstream's fixed ``query`` parameters (Azure OpenAI's ``api-version``) go on every URL,
replacing the client's parameters of the same names.

Encodings: the gateway asks for the upstream's ``accept_encoding`` (default ``identity``: a
compressed reply would be decoded here anyway, and the provider link is rarely the bottleneck
of an LLM call). A provider that compresses anyway, or because we allowed it, is decoded here:
``gzip`` (several members allowed), ``deflate`` (zlib or raw) and ``zstd``, each in pieces of at
most about a MiB whatever the compression ratio (a small bomb cannot balloon in memory); any
other encoding (``br`` among them) is a ``bad_upstream_reply``. ``aiter_bytes()`` and ``read()``
always give identity bytes, and ``headers`` never carry ``Content-Encoding`` or
``Content-Length``, so what the gateway relays is always consistent with its headers.

A response with an error status is handed back as it is, so its body reaches the client
unchanged (but for the provider key, below), with two exceptions that ``open()`` raises
instead (:func:`translated_error`):

* a 401 is the provider refusing the gateway's own provider key, which the client neither
  caused nor can fix: ``UpstreamAuthFailed`` (502, ``x-should-retry: false``), without the
  provider's message (OpenAI's quotes the key's last characters), logged for the operator;
* an error whose body is not JSON (a CDN's or a reverse proxy's HTML page, a plain-text
  message, nothing) is not the API's error and would reach the SDK as a blob of markup: an
  ``UpstreamError`` (code ``upstream_error_page``) in the protocol's error shape that says what
  came (an HTML page's title, a text's first line, at most 200 characters), with the
  provider's status when a client would retry it (429, 5xx) and 502 otherwise, and the
  provider's retry advice and request id headers.

Every reply body, relayed or read here, error or not, streamed or not, has the upstream's
provider key replaced by ``[provider key]`` wherever it appears (``UpstreamReply.aiter_bytes``,
:class:`KeyBlanker`), so neither a client nor a round's record ever holds it, should the provider
(or a proxy in front of it) echo the request's credentials, in an error or in a stream's error
event. Client credentials never pass through here.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import html
import re
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote_plus, urlencode

import aiohttp
import orjson
import structlog
import zstandard
from yarl import URL

from gateway.errors import BadRequest, UpstreamAuthFailed, UpstreamError, UpstreamTimeout
from gateway.settings import UpstreamSettings

log = structlog.get_logger("gateway.upstream")

# Request headers a client may send on to the provider; everything else (its gateway key, in
# Authorization or x-api-key, cookies, session ids, its Accept-Encoding) stays here. W3C trace
# context goes on (the gateway's own when tracing is on, see gateway.tracing).
FORWARD_HEADERS = ("Content-Type", "Accept", "OpenAI-Beta", "User-Agent", "traceparent", "tracestate")
# ... and to an upstream whose protocol is anthropic, also these; anthropic-version defaults to
# ANTHROPIC_VERSION when the client sent none (the API refuses a request without it).
ANTHROPIC_HEADERS = ("anthropic-version", "anthropic-beta")
ANTHROPIC_VERSION = "2023-06-01"
# Reply headers a client may see, besides OpenAI's x-ratelimit-* and Anthropic's
# anthropic-ratelimit-*: the request ids the SDKs expose (x-request-id, Anthropic's request-id),
# and what their retry logic reads (retry-after, retry-after-ms, x-should-retry).
# The provider's account (openai-organization, anthropic-organization-id, -workspace-id) is the
# operator's, shared by every tenant: it stays behind with cookies and the rest.
PASS_HEADERS = frozenset({"retry-after", "retry-after-ms", "x-should-retry", "x-request-id", "request-id",
                          "openai-processing-ms", "openai-version"})
RATE_LIMIT_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")
PROTOCOLS = ("openai", "anthropic")
"""The wire protocols an upstream speaks: each model route goes to an upstream of its protocol."""
# Largest piece a decoder hands out at once: a small compressed chunk cannot balloon in memory.
_DECODE_PIECE = 1 << 20


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    base_url: str
    headers: Mapping[str, str]
    models: tuple[str, ...]
    timeout: aiohttp.ClientTimeout
    forward_routes: tuple[str, ...] = ("models", "embeddings", "moderations", "messages/count_tokens")
    max_reply_bytes: int = 8 * 1024 * 1024
    protocol: str = "openai"  # the wire protocol it speaks: openai (Chat, Responses) or anthropic
    responses_state: str = "gateway"  # who holds Responses chains: the gateway or the provider
    query: tuple[tuple[str, str], ...] = ()  # fixed query parameters (Azure's api-version), unencoded

    @property
    def secret(self) -> bytes | None:
        """The provider key this upstream sends (None without one), as it would appear in a body."""
        for value in self.headers.values():
            key = value.removeprefix("Bearer ").strip()
            return key.encode() if len(key) >= 8 else None
        return None

    def url(self, path: str, query: str = "") -> URL:
        """The upstream URL of *path* with the client's *query* (both percent-encoded already),
        the upstream's fixed ``query`` parameters replacing any of the client's of the same name."""
        if self.query:
            fixed = {name for name, _ in self.query}
            kept = [pair for pair in query.split("&") if pair and unquote_plus(pair.split("=", 1)[0]) not in fixed]
            query = "&".join([*kept, urlencode(self.query, quote_via=quote)])
        return URL(f"{self.base_url}{path}" + (f"?{query}" if query else ""), encoded=True)

    def allows(self, segments: tuple[str, ...]) -> bool:
        """Whether the forwarded route ``/v1/<segments>`` is in ``forward_routes``.

        A rule is a prefix of whole (decoded) segments: ``models`` allows ``/v1/models`` and
        ``/v1/models/{id}``, never ``/v1/models-x``; ``*`` allows every route."""
        for rule in self.forward_routes:
            if rule == "*":
                return True
            parts = tuple(rule.split("/"))
            if segments[: len(parts)] == parts:
                return True
        return False


def client_headers(headers: Mapping[str, str], secret: bytes | None = None) -> dict[str, str]:
    """The provider's reply headers a client needs: request id, rate limits, retry advice; the
    provider key (*secret*) blanked in them should a provider echo it."""
    kept = {k: v for k, v in headers.items() if k.lower() in PASS_HEADERS or k.lower().startswith(RATE_LIMIT_PREFIXES)}
    if secret is not None:
        key, blank = secret.decode(), BLANKED_KEY.decode()
        kept = {k: v.replace(key, blank) for k, v in kept.items()}
    return kept


class KeyBlanker:
    """Replaces *secret* by :data:`BLANKED_KEY` in a body fed piece by piece, a key split across
    pieces included. A piece goes out whole at once unless its last bytes could begin the key
    (they are a prefix of it): only those wait for the next piece. An event stream's pieces end
    in a blank line, which no key begins, so streamed events are never held back; the cost per
    piece is one substring search and a look at its last byte (at its last ``len(secret) - 1``
    bytes only when that byte is one of the key's)."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._first = secret[:1]
        self._chars = frozenset(secret)  # a piece ending in another byte ("\n", "}") cannot end in a key's start
        self._carry = b""

    def feed(self, piece: bytes) -> bytes:
        """What of *piece* (after what was held) can go out now, the key blanked in it."""
        text = self._carry + piece if self._carry else piece
        if self._secret in text:
            text = text.replace(self._secret, BLANKED_KEY)
        cut = self._key_start(text)
        self._carry = text[cut:]
        return text[:cut] if cut < len(text) else text

    def end(self) -> bytes:
        """What was held back at the end of the body (the start of a key that never finished)."""
        carry, self._carry = self._carry, b""
        return carry

    def _key_start(self, text: bytes) -> int:
        """Where the end of *text* that could begin the key starts (``len(text)`` when none does)."""
        if not text or text[-1] not in self._chars:
            return len(text)
        secret, first = self._secret, self._first
        pos = text.find(first, max(len(text) - len(secret) + 1, 0))
        while pos != -1:
            if secret.startswith(text[pos:]):
                return pos
            pos = text.find(first, pos + 1)
        return len(text)


class UpstreamReply:
    """One provider reply: ``status``, ``content_type``, the client-visible ``headers``, and the
    decoded body through ``aiter_bytes()`` (as it arrives) or ``read()``. Raises only our errors."""

    def __init__(self, up: Upstream, resp: aiohttp.ClientResponse) -> None:
        self._up = up
        self._resp = resp
        self.status = resp.status
        self.content_type = resp.content_type
        self.headers = client_headers(resp.headers, up.secret)
        # every Content-Encoding line, in order: a repeated header is one list (RFC 9110, 5.3); the
        # first line alone would leave the body still encoded, where the key cannot be blanked
        self._decoder = Decoder.for_header(", ".join(resp.headers.getall("Content-Encoding", ())), up.name)

    @property
    def streaming(self) -> bool:
        return self.content_type == "text/event-stream"

    @property
    def at_eof(self) -> bool:
        """Whether the whole body has come in (read or not)."""
        return self._resp.content.is_eof()

    @property
    def body_arrived(self) -> bool:
        """Whether any byte of the body has come in yet (read or not)."""
        return self._resp.content.total_bytes > 0

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The decoded body, piece by piece as the provider sends it (empty pieces skipped), with
        the provider key blanked out wherever it appears (:class:`KeyBlanker`), should the
        provider (or a proxy in front of it) echo the request's credentials: in an error body, a
        reply's text or a stream's error event alike."""
        secret = self._up.secret
        return self._pieces() if secret is None else self._blanked(secret)

    async def _blanked(self, secret: bytes) -> AsyncIterator[bytes]:
        blanker = KeyBlanker(secret)
        async for piece in self._pieces():
            if out := blanker.feed(piece):
                yield out
        if tail := blanker.end():
            yield tail

    async def _pieces(self) -> AsyncIterator[bytes]:
        try:
            if self._decoder.identity:  # nothing to undo: the pieces as they come
                async for chunk in self._resp.content.iter_any():
                    if chunk:
                        yield chunk
                return
            async for chunk in self._resp.content.iter_any():
                for piece in self._decoder.feed(chunk):
                    yield piece
            for piece in self._decoder.flush():
                yield piece
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(f"upstream '{self._up.name}' stopped answering mid-reply") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"upstream '{self._up.name}' broke off its reply ({type(exc).__name__})") from exc

    async def read(self) -> bytes:
        """The whole decoded body."""
        return b"".join([piece async for piece in self.aiter_bytes()])


ERROR_PAGE_BYTES = 64 * 1024
"""How much of an error page ``translated_error`` reads, to find its title or first line."""
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504, 529})
BLANKED_KEY = b"[provider key]"
_TITLE = re.compile(rb"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


async def translated_error(up: Upstream, reply: UpstreamReply) -> UpstreamError:
    """The error to raise for a provider's 401 or non-JSON error reply (see the module docstring)."""
    head = b""
    with contextlib.suppress(UpstreamError):  # what little arrived says enough
        async for piece in reply.aiter_bytes():
            head += piece
            if len(head) >= ERROR_PAGE_BYTES:
                break
    error: UpstreamError
    if reply.status == 401:
        code = None
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
            err = orjson.loads(head)["error"]  # the provider's own code (Anthropic's type), never its message
            code = err.get("code") or err.get("type")
        log.warning("upstream_auth_failed", upstream=up.name, status=401,
                    provider_code=str(code)[:64] if code is not None else None)
        error = UpstreamAuthFailed(f"upstream '{up.name}' refused the gateway's provider key (401); your gateway "
                                   "key was accepted. The gateway's operator must check the provider key configured "
                                   f"for upstream '{up.name}'")
    else:
        what = _describe(reply.content_type, head)
        error = UpstreamError(f"upstream '{up.name}' answered {reply.status} with {what}, not the API's JSON error",
                              code="upstream_error_page")
        error.status = reply.status if reply.status in RETRIED_STATUSES else 502
        error.headers = dict(reply.headers)
    error.upstream_status = reply.status
    return error


def _describe(content_type: str, head: bytes) -> str:
    """What an error body is, in a few words: an HTML page's title, a text's first line."""
    if not head.strip():
        return "an empty body"
    if content_type == "text/html" or head.lstrip()[:1] == b"<":
        match = _TITLE.search(head)
        title = _line(html.unescape(match.group(1).decode("utf-8", "replace"))) if match else ""
        return f"an HTML page titled '{title}'" if title else "an HTML page"
    kind = content_type or "untyped"
    first = next((line for line in head.decode("utf-8", "replace").splitlines() if line.strip()), "")
    return f"a {kind} body: '{_line(first)}'"


def _line(text: str) -> str:
    """*text* on one line, printable, at most 200 characters (its bytes had the key blanked out)."""
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= 200 else text[:199] + "…"


class Decoder:
    """Undoes a ``Content-Encoding`` (a list, applied in order, is undone in reverse)."""

    def __init__(self, steps: list[Callable[[bytes], Iterator[bytes]]], flushers: list[Callable[[], bytes]],
                 upstream: str) -> None:
        self._steps, self._flushers, self._upstream = steps, flushers, upstream
        self.identity = not steps

    @classmethod
    def for_header(cls, header: str, upstream: str) -> Decoder:
        codings = [c.strip().lower() for c in header.split(",") if c.strip() and c.strip().lower() != "identity"]
        steps: list[Callable[[bytes], Iterator[bytes]]] = []
        flushers: list[Callable[[], bytes]] = []
        for coding in reversed(codings):
            step, flush = _codec(coding, upstream)
            steps.append(step)
            flushers.append(flush)
        return cls(steps, flushers, upstream)

    def feed(self, data: bytes) -> Iterator[bytes]:
        if not self._steps:
            if data:
                yield data
            return
        yield from self._run(0, data)

    def flush(self) -> Iterator[bytes]:
        for i, flush in enumerate(self._flushers):
            tail = self._wrap(flush)
            if tail:
                yield from (self._run(i + 1, tail) if i + 1 < len(self._steps) else (tail,))

    def _run(self, index: int, data: bytes) -> Iterator[bytes]:
        pieces = self._wrap_iter(self._steps[index], data)
        for piece in pieces:
            if not piece:
                continue
            if index + 1 < len(self._steps):
                yield from self._run(index + 1, piece)
            else:
                yield piece

    def _wrap_iter(self, step: Callable[[bytes], Iterator[bytes]], data: bytes) -> Iterator[bytes]:
        try:
            yield from step(data)
        except (zlib.error, zstandard.ZstdError, ValueError, OSError) as exc:
            raise UpstreamError(f"upstream '{self._upstream}' sent a body that does not decode",
                                code="bad_upstream_reply") from exc

    def _wrap(self, flush: Callable[[], bytes]) -> bytes:
        try:
            return flush()
        except (zlib.error, zstandard.ZstdError, ValueError, OSError) as exc:
            raise UpstreamError(f"upstream '{self._upstream}' sent a body that does not decode",
                                code="bad_upstream_reply") from exc


def _zlib_codec(gzip: bool) -> tuple[Callable[[bytes], Iterator[bytes]], Callable[[], bytes]]:
    """gzip (several members allowed) or deflate (zlib-wrapped, or raw as some servers send)."""
    state: dict[str, Any] = {"obj": zlib.decompressobj(16 + zlib.MAX_WBITS) if gzip else None, "head": b""}

    def step(data: bytes) -> Iterator[bytes]:
        if state["obj"] is None:  # deflate: decide zlib or raw from the first two bytes
            data = state["head"] + data
            if len(data) < 2:
                state["head"] = data
                return
            wrapped = data[0] & 0x0F == 8 and ((data[0] << 8) | data[1]) % 31 == 0
            state["obj"] = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        obj = state["obj"]
        while True:
            if obj.eof:  # a gzip member ended: what follows it (now or later) is the next member
                data = obj.unused_data + data
                if gzip:
                    data = data.lstrip(b"\0")  # zero padding between or after members, as gzip(1) allows
                if not gzip or not data:
                    return  # deflate: bytes after the end are ignored, as browsers do
                obj = state["obj"] = zlib.decompressobj(16 + zlib.MAX_WBITS)
            if not data:
                return
            yield obj.decompress(data, _DECODE_PIECE)
            data = obj.unconsumed_tail

    def flush() -> bytes:
        obj = state["obj"]
        return obj.flush() if obj is not None else b""

    return step, flush


_ZSTD_SLICE = 32
"""Compressed bytes a zstd decoder takes at a time: a block of 3 header bytes and 1 byte of run
can stand for 128 KiB, so 32 bytes decode to at most about 1 MiB, whatever the provider sent."""


def _zstd_codec() -> tuple[Callable[[bytes], Iterator[bytes]], Callable[[], bytes]]:
    """zstd, fed in ``_ZSTD_SLICE`` pieces so that no piece decodes to more than about a MiB
    (zstandard's decoders give all of an input's output at once). Slow for a large body, which
    the gateway never asks for: a provider sends zstd only unasked."""
    out: list[bytes] = []

    class Sink:
        def write(self, piece: bytes) -> int:
            out.append(bytes(piece))
            return len(piece)

    writer = zstandard.ZstdDecompressor().stream_writer(Sink(), write_size=_DECODE_PIECE)  # type: ignore[arg-type]

    def step(data: bytes) -> Iterator[bytes]:
        view = memoryview(data)
        for start in range(0, len(view), _ZSTD_SLICE):
            writer.write(view[start:start + _ZSTD_SLICE])
            if out:
                yield from out
                out.clear()

    return step, lambda: b""


def _codec(coding: str, upstream: str) -> tuple[Callable[[bytes], Iterator[bytes]], Callable[[], bytes]]:
    if coding in ("gzip", "x-gzip"):
        return _zlib_codec(gzip=True)
    if coding == "deflate":
        return _zlib_codec(gzip=False)
    if coding == "zstd":
        return _zstd_codec()
    raise UpstreamError(f"upstream '{upstream}' sent its reply in an encoding the gateway cannot read "
                        f"({coding[:32]!r}); set its accept_encoding to identity", code="bad_upstream_reply")


class Upstreams:
    """Routes requests to upstreams and sends them. Create, ``await start()``, ``await close()``."""

    def __init__(self, settings: list[UpstreamSettings], *, keys: bool = True) -> None:
        """Without *keys*, the provider keys are not read (no header is built): for routing only,
        as the CLI checks which models a round could use."""
        self._list = [
            Upstream(
                name=s.name,
                base_url=str(URL(s.base_url)).rstrip("/"),
                headers=s.key_headers() if keys else {},
                models=tuple(s.models),
                timeout=aiohttp.ClientTimeout(total=None, connect=s.connect_timeout,
                                              sock_connect=s.connect_timeout, sock_read=s.read_timeout),
                forward_routes=tuple(s.forward_routes),
                max_reply_bytes=s.max_reply_bytes,
                protocol=s.protocol,
                responses_state=s.responses_state,
                query=tuple(s.query.items()),
            )
            for s in settings
        ]
        self._accept = {s.name: s.accept_encoding for s in settings}
        self._limits = {s.name: s.max_connections for s in settings}
        self._routes: dict[tuple[str, str | None, bool], Upstream] = {}
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    @property
    def names(self) -> list[str]:
        return [u.name for u in self._list]

    async def start(self) -> None:
        """One client per upstream, each with a connection pool of its own ``max_connections``:
        a busy or slow upstream cannot take the connections another one needs."""
        for name, limit in self._limits.items():
            connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit,
                                             keepalive_timeout=30, enable_cleanup_closed=True)
            # no cookie jar: an upstream's client serves every tenant, so a cookie one tenant's reply
            # set (a CDN's tracking cookie, say) would go out with every other tenant's requests
            self._sessions[name] = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                         skip_auto_headers=("User-Agent",),
                                                         cookie_jar=aiohttp.DummyCookieJar())

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()

    def route(self, model: str | None, protocol: str = "openai", *, any_upstream: bool = False) -> Upstream:
        """The first upstream speaking *protocol* (``openai`` or ``anthropic``) whose model globs
        match *model* (cached per protocol and model name); BadRequest ``model_not_found`` if none.

        A request that names no model (*model* None: a Responses request whose ``prompt`` template
        picks the model at the provider) goes to the first upstream that takes every model (a
        ``*`` pattern), never to one whose globs may not match the template's model; with none,
        BadRequest ``missing_model`` asks for ``model``. With *any_upstream* (a forwarded route,
        such as ``/v1/models``, or a provider-held response: no model is run by name) it goes to
        the first upstream of the protocol."""
        key = (protocol, model, any_upstream)
        hit = self._routes.get(key)
        if hit is not None:
            return hit
        for up in self._list:
            if up.protocol == protocol and (any(fnmatch.fnmatchcase(model, p) for p in up.models) if model is not None
                                            else any_upstream or any(set(p) == {"*"} for p in up.models)):
                if len(self._routes) < 4096:
                    self._routes[key] = up
                return up
        names = ", ".join(u.name for u in self._list if u.protocol == protocol) or "none"
        kind = "upstream" if protocol == "openai" else f"{protocol} upstream"
        if model is None and not any_upstream and names != "none":
            raise BadRequest(f"'model' is required here: this request names no model (a prompt template picks it at "
                             f"the provider), and no {kind} takes every model (models: ['*']), so the gateway cannot "
                             f"tell which upstream serves it. Send 'model'; configured {kind}s: {names}",
                             code="missing_model")
        what = f"serves model '{model}'" if model is not None else "is configured"  # a route without a model
        raise BadRequest(f"no {kind} {what}; configured {kind}s: {names}", code="model_not_found")

    def check_serves(self, model: str) -> None:
        """Whether a round could use *model*: an upstream of some protocol (``openai`` or
        ``anthropic``) serves it (:meth:`route`). Otherwise BadRequest ``model_not_found`` in a
        round's words, for each protocol that has upstreams configured."""
        refusals: list[tuple[str, str]] = []
        for protocol in PROTOCOLS:
            try:
                self.route(model, protocol)
            except BadRequest as exc:
                refusals.append((protocol, exc.message))
            else:
                return
        said = [message for protocol, message in refusals if any(up.protocol == protocol for up in self._list)]
        raise BadRequest("; ".join(said or [refusals[0][1]]), code="model_not_found")

    async def complete(self, model: str | None, messages: list[dict[str, Any]], timeout: float) -> str:
        """A side request (no session, never recorded): the text of a non-streaming completion."""
        up = self.route(model, "openai", any_upstream=True)
        body: dict[str, Any] = {"messages": messages, "stream": False}
        if model is not None:
            body["model"] = model
        async with self.open(up, "POST", "/chat/completions", body=orjson.dumps(body),
                             headers={"Content-Type": "application/json"}) as reply:
            if reply.status >= 400:
                raise UpstreamError(f"upstream '{up.name}' refused the side request with status {reply.status}")
            try:
                data = await asyncio.wait_for(reply.read(), timeout)
                return str(orjson.loads(data)["choices"][0]["message"]["content"] or "")
            except (KeyError, IndexError, TypeError, orjson.JSONDecodeError) as exc:
                raise UpstreamError(f"upstream '{up.name}' sent a side reply that is not a chat completion") from exc

    @contextlib.asynccontextmanager
    async def open(self, up: Upstream, method: str, path: str, *, body: bytes | None,
                   headers: Mapping[str, str], query: str = "", json: bool = False) -> AsyncIterator[UpstreamReply]:
        """Send one request and yield its reply; the connection is released on exit.

        *path* and *query* are percent-encoded already and are sent exactly as given. With
        *json*, *body* is JSON the gateway serialised (UTF-8) and goes as ``application/json``
        whatever ``Content-Type`` the client claimed."""
        session = self._sessions.get(up.name)
        assert session is not None, "Upstreams.start() was not awaited"
        out = {h: v for h in FORWARD_HEADERS if (v := headers.get(h)) is not None}
        if up.protocol == "anthropic":
            out.update({h: v for h in ANTHROPIC_HEADERS if (v := headers.get(h)) is not None})
            out.setdefault("anthropic-version", ANTHROPIC_VERSION)
        out["Accept-Encoding"] = self._accept.get(up.name, "identity")
        if json:
            out["Content-Type"] = "application/json"
        out.update(up.headers)
        url = up.url(path, query)
        try:
            resp = await session.request(method, url, data=body, headers=out, timeout=up.timeout,
                                         allow_redirects=False)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(f"upstream '{up.name}' did not answer in time") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"upstream '{up.name}' is unreachable ({type(exc).__name__})") from exc
        if resp.status == 401 or (resp.status >= 400 and not _is_json(resp.content_type)):
            try:
                raise await translated_error(up, UpstreamReply(up, resp))
            finally:
                resp.release()
        if 300 <= resp.status < 400:  # never followed: the key would go wherever it points
            resp.release()
            raise UpstreamError(f"upstream '{up.name}' answered with a redirect ({resp.status}), which the gateway "
                                f"does not follow so that the provider key reaches only the upstream's base_url; "
                                f"check its base_url (https://, and the path up to /v1)", code="upstream_redirect")
        try:
            yield UpstreamReply(up, resp)
        finally:
            resp.release()
