"""A provider (or whatever answers at its base URL) that redirects: the gateway never follows,
so the provider key goes nowhere but the configured base URL, and the client is told what to fix
instead of getting a bare 3xx or "not JSON". The redirect points at a capturing server, which
must see nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
from aiohttp import web

from tests.conftest import ACME_KEY, Gateway, serving
from tests.hostile.conftest import Capture, capture  # noqa: F401

UPSTREAM_KEY = "sk-provider-REDIRECT-secret"
AUTH = {"Authorization": f"Bearer {ACME_KEY}"}


@pytest.fixture
def redirector(capture: Capture) -> Iterator[tuple[str, list[int]]]:  # noqa: F811
    """Answers every request with the next status of ``statuses`` (301 … 308), Location at *capture*."""
    statuses = [301, 302, 303, 307, 308]
    seen: list[int] = []

    async def handle(request: web.Request) -> web.Response:
        status = statuses[len(seen) % len(statuses)]
        seen.append(status)
        return web.Response(status=status, headers={"Location": f"{capture.url}{request.path[3:]}"},
                            text="<html>moved</html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    with serving(app) as url:
        yield f"{url}/v1", seen


@pytest.fixture
def rgw(make_gateway: Callable[..., Gateway], redirector: tuple[str, list[int]],
        monkeypatch: pytest.MonkeyPatch) -> Gateway:
    monkeypatch.setenv("SG_TEST_PROVIDER_KEY", UPSTREAM_KEY)
    url = redirector[0]
    return make_gateway(upstreams=[
        {"name": "oa", "base_url": url, "models": ["*"], "api_key_env": "SG_TEST_PROVIDER_KEY",
         "forward_routes": ["*"]},
        {"name": "an", "base_url": url, "models": ["*"], "api_key_env": "SG_TEST_PROVIDER_KEY",
         "protocol": "anthropic"}])


REQUESTS = [
    ("POST", "/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/chat/completions", {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/responses", {"model": "m", "input": "hi"}),
    ("POST", "/messages", {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}),
    ("GET", "/models", None),
]


def test_a_redirect_is_never_followed_and_says_what_to_fix(rgw: Gateway, redirector: tuple[str, list[int]],
                                                          capture: Capture) -> None:  # noqa: F811
    for method, path, body in REQUESTS:
        resp = httpx.request(method, f"{rgw.base_url}{path}", json=body, timeout=30,
                             headers={**AUTH, "X-Session-Id": "redirected", "anthropic-version": "2023-06-01"})
        assert resp.status_code == 502, (path, resp.text)
        error = resp.json()["error"]
        assert "redirect" in error["message"] and "base_url" in error["message"], error
        if path == "/messages":  # Anthropic's shape: a type, no code
            assert error["type"] == "api_error" and "code" not in error, error
        else:
            assert error["code"] == "upstream_redirect", error
        assert UPSTREAM_KEY not in resp.text and capture.url not in resp.text
        assert "location" not in resp.headers
    assert len(redirector[1]) == len(REQUESTS)  # each reached the redirecting upstream once
    assert capture.seen == []  # and nothing, the key least of all, went where it pointed
    outcomes = [e["outcome"] for e in rgw.audit_entries() if e.get("event") in ("round", "proxy")]
    assert outcomes == ["upstream_error"] * len(REQUESTS)
