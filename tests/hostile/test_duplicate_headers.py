"""A request that names its credentials or its session twice is refused (400
``duplicate_header``, or ``conflicting_credentials`` for two different keys in ``Authorization``
and ``x-api-key``) before anything reads them: the gateway would read one value, and a proxy in
front of it (which may authorise, log or route on these headers) the other."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import ACME_KEY, GLOBEX_KEY, Gateway, Upstream

CHAT = {"model": "standin", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("headers", [
    [("Authorization", f"Bearer {ACME_KEY}"), ("Authorization", f"Bearer {GLOBEX_KEY}")],
    [("Authorization", f"Bearer {ACME_KEY}"), ("Authorization", f"Bearer {ACME_KEY}")],
    [("Authorization", f"Bearer {ACME_KEY}"), ("X-Session-Id", "a"), ("X-Session-Id", "b")],
    [("x-api-key", ACME_KEY), ("X-API-Key", GLOBEX_KEY)],
], ids=["two-keys", "same-key-twice", "two-sessions", "two-api-keys"])
def test_a_chat_request_with_a_header_twice_is_refused(gateway: Gateway, upstream: Upstream,
                                                       headers: list[tuple[str, str]]) -> None:
    resp = httpx.post(f"{gateway.base_url}/chat/completions", headers=headers, json=CHAT, timeout=30)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "duplicate_header" and "more than once" in error["message"]
    assert ACME_KEY not in resp.text and GLOBEX_KEY not in resp.text
    assert upstream.requests == []


def test_messages_refuses_it_in_anthropics_shape(gateway: Gateway, upstream: Upstream) -> None:
    body = {"model": "claude-x", "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}]}
    resp = httpx.post(f"{gateway.url}/v1/messages", json=body, timeout=30,
                      headers=[("x-api-key", ACME_KEY), ("x-api-key", GLOBEX_KEY)])
    assert resp.status_code == 400, resp.text
    assert resp.json()["type"] == "error" and resp.json()["error"]["type"] == "invalid_request_error"
    assert "x-api-key header was sent more than once" in resp.json()["error"]["message"]
    assert upstream.requests == []


def test_other_routes_refuse_it_too(gateway: Gateway) -> None:
    resp = httpx.get(f"{gateway.base_url}/sessions", timeout=30,
                     headers=[("Authorization", f"Bearer {ACME_KEY}"), ("Authorization", f"Bearer {GLOBEX_KEY}")])
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "duplicate_header"


def test_one_of_each_passes(gateway: Gateway, upstream: Upstream) -> None:
    resp = httpx.post(f"{gateway.base_url}/chat/completions", json=CHAT, timeout=30,
                      headers=[("Authorization", f"Bearer {ACME_KEY}"), ("X-Session-Id", "dup:ok")])
    assert resp.status_code == 200, resp.text
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/models"])
def test_authorization_and_x_api_key_naming_different_keys_are_refused(gateway: Gateway, upstream: Upstream,
                                                                       path: str) -> None:
    """The gateway reads ``Authorization`` before ``x-api-key``; a proxy in front may authorise on
    the other. Two different keys are refused on every route; the same key in both is served."""
    body = {"model": "standin", "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}]}
    method = "GET" if path == "/v1/models" else "POST"
    resp = httpx.request(method, gateway.url + path, json=None if method == "GET" else body, timeout=30,
                         headers={"Authorization": f"Bearer {ACME_KEY}", "x-api-key": GLOBEX_KEY})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert "Authorization and x-api-key name different keys" in error["message"]
    if path == "/v1/messages":  # Anthropic's shape: a type, no code
        assert resp.json()["type"] == "error" and error["type"] == "invalid_request_error"
    else:
        assert error["code"] == "conflicting_credentials"
    assert ACME_KEY not in resp.text and GLOBEX_KEY not in resp.text
    assert upstream.requests == []
    if path != "/v1/messages":  # this gateway has no anthropic upstream to serve the same request
        same = httpx.request(method, gateway.url + path, json=None if method == "GET" else body, timeout=30,
                             headers={"Authorization": f"Bearer {ACME_KEY}", "x-api-key": ACME_KEY})
        assert same.status_code == 200, same.text
