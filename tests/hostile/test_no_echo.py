"""Refusals never echo what the client sent in a header, the path or the query (SPEC §3: "never
an echo of a header or a key"): each says what is wrong and what to send instead, in the error
shape of the route's protocol, and is in the access log like any other refusal."""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest

from tests.conftest import ACME_KEY, AUDITOR_TOKEN, GLOBEX_KEY, Gateway, wait_for
from tests.test_access_log import access

SECRET = "sg-secret-1234567890abcdefghij-canary"
HEX = "5ec7e75ec7e75ec7"
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": "claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}


def error_fields(reply: httpx.Response) -> dict[str, Any]:
    """The error object of an OpenAI-shaped or Anthropic-shaped error body."""
    assert reply.headers["content-type"].startswith("application/json")
    doc = reply.json()
    if doc.get("type") == "error":  # Anthropic's shape
        return {**doc["error"], "code": doc["error"].get("code")}
    return dict(doc["error"])


@pytest.mark.parametrize(("path", "body", "headers"), [
    ("/v1/chat/completions", CHAT, {"Authorization": f"Bearer {ACME_KEY}"}),
    ("/v1/messages", MESSAGES, {"x-api-key": ACME_KEY}),
    ("/console/login", None, {}),
])
def test_unknown_expect_is_417_in_the_error_shape_without_the_value(
        gateway: Gateway, path: str, body: dict[str, Any] | None, headers: dict[str, str]) -> None:
    """``Expect: <anything but 100-continue>`` gets 417 naming the header, in the route's error shape, and is
    logged; the value (here a key) is not in the reply."""
    reply = httpx.post(f"{gateway.url}{path}", json=body, headers={**headers, "Expect": f"{SECRET} {GLOBEX_KEY}"})
    assert reply.status_code == 417
    assert SECRET not in reply.text and GLOBEX_KEY not in reply.text
    error = error_fields(reply)
    assert "Expect" in error["message"] and "100-continue" in error["message"]
    if path == "/v1/messages":
        assert reply.json()["error"]["type"] == "invalid_request_error"
    else:
        assert error["code"] == "expectation_failed"
    wait_for(lambda: any(e.get("status") == 417 for e in access(gateway)))


def test_expect_100_continue_still_works(gateway: Gateway) -> None:
    """A client that waits for ``100 Continue`` before its body gets it, then the answer."""
    body = orjson.dumps(CHAT)
    target = urlsplit(gateway.url)
    with socket.create_connection((target.hostname, target.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + ACME_KEY.encode()
                     + b"\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nConnection: close\r\n"
                     + b"Content-Length: %d\r\n\r\n" % len(body))
        interim = sock.recv(25)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    assert b"HTTP/1.1 200" in raw


def test_unsupported_content_encoding_is_not_quoted(gateway: Gateway) -> None:
    """An unknown ``Content-Encoding`` gets 415 saying what to send, not the header's value."""
    reply = httpx.post(f"{gateway.url}/v1/chat/completions", content=orjson.dumps(CHAT),
                       headers={"Authorization": f"Bearer {ACME_KEY}", "Content-Encoding": GLOBEX_KEY})
    assert reply.status_code == 415
    assert GLOBEX_KEY not in reply.text and GLOBEX_KEY[:12] not in reply.text
    assert "gzip" in error_fields(reply)["message"]


@pytest.mark.parametrize(("method", "path", "headers", "status"), [
    ("GET", f"/x/{SECRET}", {}, 404),
    ("GET", f"/console/{SECRET}", {}, 404),
    ("DELETE", "/healthz", {}, 405),
    ("GET", f"/admin/export?tenant=acme&since={SECRET}", {"Authorization": f"Bearer {AUDITOR_TOKEN}"}, 400),
    ("GET", f"/admin/export?tenant=acme&until={SECRET}", {"Authorization": f"Bearer {AUDITOR_TOKEN}"}, 400),
    ("GET", f"/v1/sessions/{SECRET}/memo", {"Authorization": f"Bearer {ACME_KEY}"}, 404),
    ("GET", f"/v1/responses/resp_{HEX}", {"Authorization": f"Bearer {ACME_KEY}"}, 404),
])
def test_paths_and_query_values_are_not_echoed(gateway: Gateway, method: str, path: str, headers: dict[str, str],
                                               status: int) -> None:
    """A route that does not exist, a bad ``since``/``until``, an unknown session or response id: the refusal
    says what is wrong without the value sent."""
    reply = httpx.request(method, f"{gateway.url}{path}", headers=headers)
    assert reply.status_code == status
    for part in (SECRET, SECRET[:20], HEX, path.split("?")[0]):
        assert part not in reply.text
    assert error_fields(reply)["message"]
