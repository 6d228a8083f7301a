"""The provider's rate-limit and request-id headers reach the client; its other headers do not."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx
from aiohttp import web

from tests.conftest import ACME_KEY, _Server


@contextlib.contextmanager
def limited_upstream() -> Iterator[str]:
    async def chat(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "slow down", "type": "rate_limit", "code": "rate_limited"}},
                                 status=429, headers={"Retry-After": "7", "x-ratelimit-remaining-requests": "0",
                                                      "x-request-id": "req-up-1", "Set-Cookie": "tracking=1"})
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = _Server(app)
    try:
        yield f"http://127.0.0.1:{server.port}/v1"
    finally:
        server.stop()


def test_rate_limit_headers_pass_through(make_gateway) -> None:
    """A 429 keeps its body, Retry-After, x-ratelimit-* and x-request-id; cookies stay behind."""
    with limited_upstream() as url:
        gw = make_gateway(upstreams=[{"name": "limited", "base_url": url}])
        r = httpx.post(f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {ACME_KEY}"},
                       json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert r.headers["retry-after"] == "7" and r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.headers["x-request-id"] == "req-up-1" and r.headers["x-sessiongate-request-id"]
    assert "set-cookie" not in r.headers
