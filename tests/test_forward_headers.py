"""The provider's rate-limit and request-id headers reach the client; its other headers do not."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx
from aiohttp import web

from tests.conftest import ACME_KEY, chat_provider


@contextlib.contextmanager
def limited_upstream() -> Iterator[str]:
    async def chat(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "slow down", "type": "rate_limit", "code": "rate_limited"}},
                                 status=429, headers={"Retry-After": "7", "x-ratelimit-remaining-requests": "0",
                                                      "x-request-id": "req-up-1", "Set-Cookie": "tracking=1"})
    with chat_provider(chat) as url:
        yield url


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


PROVIDER_KEY = "sk-provider-echo-0123456789"


@contextlib.contextmanager
def echoing_upstream() -> Iterator[str]:
    """A provider that names its account and echoes the request's credentials in the headers
    a client is given (a proxy in front of a provider may)."""
    async def chat(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        return web.json_response(
            {"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
             "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]},
            headers={"x-request-id": f"req-2 {auth}", "x-ratelimit-remaining-requests": f"9 ({auth})",
                     "openai-organization": "org-operator-account", "anthropic-organization-id": "org-ant",
                     "anthropic-workspace-id": "wrkspc-1"})
    with chat_provider(chat) as url:
        yield url


def test_the_provider_account_and_key_stay_behind(make_gateway, monkeypatch) -> None:
    """The provider's organisation and workspace ids name the operator's account, which every
    tenant shares: they are not passed. A provider key echoed in a passed header is blanked."""
    monkeypatch.setenv("SG_TEST_ECHO_KEY", PROVIDER_KEY)
    with echoing_upstream() as url:
        gw = make_gateway(upstreams=[{"name": "echo", "base_url": url, "api_key_env": "SG_TEST_ECHO_KEY"}])
        r = httpx.post(f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {ACME_KEY}"},
                       json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    for name in ("openai-organization", "anthropic-organization-id", "anthropic-workspace-id"):
        assert name not in r.headers
    assert r.headers["x-request-id"] == "req-2 Bearer [provider key]"
    assert r.headers["x-ratelimit-remaining-requests"] == "9 (Bearer [provider key])"
    assert PROVIDER_KEY not in str(r.headers)
