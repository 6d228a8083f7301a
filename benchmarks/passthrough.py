"""A bare pass-through proxy: the baseline the gateway's overhead is measured against.

``POST /v1/chat/completions`` is forwarded to ``<upstream>/chat/completions`` through one shared
``aiohttp.ClientSession`` (keep-alive, no connection limit) and the reply goes back as it
arrives: a body with a Content-Length is read whole, anything else (SSE) is streamed chunk by
chunk. Nothing is parsed, recorded or logged. An unreachable upstream answers 502.

    python benchmarks/passthrough.py --port 9200 --upstream http://127.0.0.1:9100/v1
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

FORWARDED = ("Content-Type", "Authorization", "Accept")
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def _client(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0)
    app[SESSION] = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
    yield
    await app[SESSION].close()


async def forward(request: web.Request) -> web.StreamResponse:
    """Send the request body upstream and relay the reply's status, type and bytes."""
    headers = {name: request.headers[name] for name in FORWARDED if name in request.headers}
    url = request.app[UPSTREAM] + request.path[len("/v1"):]
    try:
        async with request.app[SESSION].post(url, data=await request.read(), headers=headers) as upstream:
            content_type = upstream.headers.get("Content-Type", "application/json")
            if upstream.content_length is not None:
                body = await upstream.read()
                return web.Response(status=upstream.status, body=body, headers={"Content-Type": content_type})
            response = web.StreamResponse(status=upstream.status, headers={"Content-Type": content_type})
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except aiohttp.ClientConnectionError as exc:
        raise web.HTTPBadGateway(text=f"upstream unreachable: {exc}") from exc


def make_app(upstream: str) -> web.Application:
    """The proxy application forwarding to ``upstream`` (a base URL ending in ``/v1``)."""
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(_client)
    for path in ("/v1/chat/completions", "/v1/responses", "/v1/messages"):
        app.router.add_post(path, forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9200)
    parser.add_argument("--upstream", default="http://127.0.0.1:9100/v1", help="base URL, ending in /v1")
    args = parser.parse_args()
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    web.run_app(make_app(args.upstream), host=args.host, port=args.port, access_log=None, print=None,
                loop=loop, shutdown_timeout=1.0)


if __name__ == "__main__":
    main()
