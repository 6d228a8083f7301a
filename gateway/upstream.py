"""The one place that talks to the model provider.

``Upstreams`` owns one ``aiohttp.ClientSession`` for the process (keep-alive, a connector
limit), routes a model name to an upstream by glob, adds the upstream's own key, and
translates client errors at the boundary: unreachable → ``UpstreamError`` (502), timeout →
``UpstreamTimeout`` (504). A response with an error status is handed back as it is, so its body
reaches the client unchanged. Client credentials never pass through here.
"""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from gateway.errors import BadRequest, UpstreamError, UpstreamTimeout
from gateway.settings import UpstreamSettings

# Request headers a client may send on to the provider; everything else (its gateway key,
# cookies, session ids) stays here.
FORWARD_HEADERS = ("Content-Type", "Accept", "OpenAI-Beta", "User-Agent", "traceparent", "tracestate")


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    base_url: str
    headers: Mapping[str, str]
    models: tuple[str, ...]
    timeout: aiohttp.ClientTimeout


class Upstreams:
    """Routes requests to upstreams and sends them. Create, ``await start()``, ``await close()``."""

    def __init__(self, settings: list[UpstreamSettings]) -> None:
        self._list = [
            Upstream(
                name=s.name,
                base_url=s.base_url,
                headers={"Authorization": f"Bearer {key}"} if (key := s.api_key()) else {},
                models=tuple(s.models),
                timeout=aiohttp.ClientTimeout(total=None, connect=s.connect_timeout,
                                              sock_connect=s.connect_timeout, sock_read=s.read_timeout),
            )
            for s in settings
        ]
        self._limit = max((s.max_connections for s in settings), default=100)
        self._routes: dict[str | None, Upstream] = {}
        self._session: aiohttp.ClientSession | None = None

    @property
    def names(self) -> list[str]:
        return [u.name for u in self._list]

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._limit, limit_per_host=self._limit,
                                         keepalive_timeout=30, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                              skip_auto_headers=("User-Agent",))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def route(self, model: str | None) -> Upstream:
        """The first upstream whose model globs match *model* (cached per model name)."""
        hit = self._routes.get(model)
        if hit is not None:
            return hit
        for up in self._list:
            if model is None or any(fnmatch.fnmatchcase(model, p) for p in up.models):
                if len(self._routes) < 4096:
                    self._routes[model] = up
                return up
        raise BadRequest(f"no upstream serves model '{model}'; configured upstreams: {', '.join(self.names)}",
                         code="model_not_found")

    async def complete(self, model: str | None, messages: list[dict[str, Any]], timeout: float) -> str:
        """A side request (no session, never recorded): the text of a non-streaming completion."""
        up = self.route(model)
        body: dict[str, Any] = {"messages": messages, "stream": False}
        if model is not None:
            body["model"] = model
        resp = await self.send(up, "POST", "/chat/completions", body=orjson.dumps(body),
                               headers={"Content-Type": "application/json"})
        async with resp:
            if resp.status >= 400:
                raise UpstreamError(f"upstream '{up.name}' refused the side request with status {resp.status}")
            try:
                data = await asyncio.wait_for(resp.read(), timeout)
                return str(orjson.loads(data)["choices"][0]["message"]["content"] or "")
            except (KeyError, IndexError, TypeError, orjson.JSONDecodeError) as exc:
                raise UpstreamError(f"upstream '{up.name}' sent a side reply that is not a chat completion") from exc

    async def send(self, up: Upstream, method: str, path: str, *, body: bytes | None,
                   headers: Mapping[str, str], query: str = "") -> aiohttp.ClientResponse:
        """Send one request; the caller reads (or streams) and releases the response."""
        assert self._session is not None, "Upstreams.start() was not awaited"
        out = {h: v for h in FORWARD_HEADERS if (v := headers.get(h)) is not None}
        out.update(up.headers)
        url = f"{up.base_url}{path}" + (f"?{query}" if query else "")
        try:
            return await self._session.request(method, url, data=body, headers=out, timeout=up.timeout,
                                               allow_redirects=False)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(f"upstream '{up.name}' did not answer in time") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"upstream '{up.name}' is unreachable ({type(exc).__name__})") from exc
