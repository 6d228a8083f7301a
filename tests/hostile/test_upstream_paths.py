"""Forwarded ``/v1/*`` paths never leave the provider's base URL (issue 9, item 2), replayed over
raw sockets so that no client library normalises the attack away. The provider-like upstream
records the exact request targets it received: a refused path reaches it not at all, an
accepted one arrives byte for byte as the client encoded it."""

from __future__ import annotations

import socket
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest

from tests.conftest import ACME_KEY, AUDITOR_TOKEN, GLOBEX_KEY, Gateway
from tests.provider import Provider, provider  # noqa: F401

UPSTREAM_KEY = "sk-provider-secret"

ESCAPES = [
    "/v1/%2e%2e/%2e%2e/secret",
    "/v1/..%2F..%2Fy",
    "/v1/models/../../x?y=1",
    "/v1/../internal",
    "/v1/models/%2E%2E/x",
    "/v1/models/.%2e/x",
    "/v1/models/./x",
    "/v1/models%2Fx",
    "/v1/models%5Cx",
    "/v1/models\\..\\x",
    "/v1//models",
    "/v1/models/",
    "/v1/models/%zz",
    "/v1/models/%00",
]
SESSION_SPELLINGS = [
    "/v1//sessions/abc",
    "/v1/Sessions/abc",
    "/v1/SESSIONS/abc",
    "/v1/%73essions/abc",
    "/v1/sessions/abc/extra",
    "/v1/sessions%2Fabc",
]


def raw_request(gateway: Gateway, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send one request exactly as written; return the status and every byte that came back."""
    url = urlsplit(gateway.url)
    head = (f"{method} {target} HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {ACME_KEY}\r\n"
            f"Content-Length: {len(body)}\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(head.encode("latin-1") + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data


@pytest.fixture
def gateway(make_gateway: Callable[..., Gateway], provider: Provider,  # noqa: F811
            monkeypatch: pytest.MonkeyPatch) -> Gateway:
    """A gateway that allows every forwarded route, so only path validation stands in the way."""
    monkeypatch.setenv("SG_TEST_PROVIDER_KEY", UPSTREAM_KEY)
    return make_gateway(upstreams=[{"name": "provider", "base_url": provider.url, "models": ["*"],
                                    "api_key_env": "SG_TEST_PROVIDER_KEY", "forward_routes": ["*"]}])


@pytest.mark.parametrize("target", ESCAPES)
def test_paths_that_could_leave_the_base_url_are_refused(gateway: Gateway, provider: Provider,  # noqa: F811
                                                         target: str) -> None:
    """Dot segments, encoded slashes, backslashes and empty segments get 4xx and never reach the provider."""
    status, data = raw_request(gateway, "GET", target)
    assert 400 <= status < 500, data[:300]
    assert provider.paths == []
    assert UPSTREAM_KEY.encode() not in data


def test_every_spelling_of_a_session_path_stays_in_the_gateway(gateway: Gateway, provider: Provider) -> None:  # noqa: F811
    """``/v1/sessions/...`` in another case, behind ``//`` or percent-encoded is refused, not forwarded."""
    for target in SESSION_SPELLINGS:
        for method in ("GET", "POST", "PATCH"):
            status, data = raw_request(gateway, method, target, b"{}" if method != "GET" else b"")
            assert 400 <= status < 500, (target, data[:300])
    assert provider.paths == []


def test_an_accepted_path_reaches_the_provider_exactly_as_encoded(gateway: Gateway,
                                                                  provider: Provider) -> None:  # noqa: F811
    """Percent escapes and the query arrive unchanged below the base URL, with the provider's key."""
    targets = ["/v1/models/ft%3Agpt-x%3Aacme", "/v1/models/a%20b?after=x%2Fy&limit=2", "/v1/files/file-1/content"]
    for target in targets:
        status, data = raw_request(gateway, "GET", target)
        assert status == 200, data[:300]
    assert provider.paths == targets
    assert all(r["headers"]["Authorization"] == f"Bearer {UPSTREAM_KEY}" for r in provider.requests)


@pytest.mark.parametrize("target", [
    f"/v1/models?api_key={ACME_KEY}",
    f"/v1/models?limit=2&key=%20{ACME_KEY.replace('-', '%2D')}",
    f"/v1/models?{ACME_KEY}",
    f"/v1/models/{ACME_KEY}",
    f"/v1/files?purpose=x&token={AUDITOR_TOKEN}",
    # with something around it: another tenant's key, the auditor's, the client's own
    f"/v1/models/gpt-4o;{GLOBEX_KEY}",
    f"/v1/models?k={GLOBEX_KEY};x=1",
    f"/v1/models/Bearer%20{AUDITOR_TOKEN}",
    f"/v1/models?k={ACME_KEY}%00",
    f"/v1/models/x{ACME_KEY}y",
])
def test_a_gateway_key_in_a_forwarded_url_never_reaches_the_provider(gateway: Gateway, provider: Provider,  # noqa: F811
                                                                     target: str) -> None:
    """A gateway key or auditor token anywhere in the URL (percent-encoded too) is refused with
    400 key_in_url, which does not repeat it; the provider sees nothing."""
    status, data = raw_request(gateway, "GET", target)
    assert status == 400 and b'"key_in_url"' in data, data[:300]
    assert not any(key.encode() in data for key in (ACME_KEY, GLOBEX_KEY, AUDITOR_TOKEN))
    assert provider.paths == []
    status, _ = raw_request(gateway, "GET", "/v1/models?limit=2&key=not-a-gateway-key")
    assert status == 200 and provider.paths == ["/v1/models?limit=2&key=not-a-gateway-key"]
