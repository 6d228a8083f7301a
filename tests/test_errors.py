"""Every refusal is OpenAI's error shape ``{"error": {"message", "type", "code"}}`` with the right
status (SPEC §3): 401 for keys, 400 for bad input, 413 for big bodies, 502/504 for the upstream,
upstream 4xx/5xx passed through. No client input gets a 500 or a stack trace, and a refused
request stores nothing."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from tests.conftest import ACME_KEY, AUDITOR_TOKEN, Gateway, Upstream, _Server

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}
CHAT = {"model": "standin", "messages": [{"role": "user", "content": "hello"}]}
UPSTREAM_500 = b'{"error":{"message":"upstream exploded (marker-500)","type":"server_error","param":null,"code":null}}'
UPSTREAM_429 = (b'{"error":{"message":"slow down (marker-429)","type":"requests","param":null,'
                b'"code":"rate_limit_exceeded"}}')


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """*resp* is an OpenAI-shaped error with *status* (and *code*); returns its ``error`` object."""
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in resp.text
    if code is not None:
        assert error["code"] == code
    return error


def post_chat(gateway: Gateway, content: Any = None, *, headers: dict[str, str] | None = None,
              json: Any = None) -> httpx.Response:
    return httpx.post(f"{gateway.base_url}/chat/completions", content=content, json=json,
                      headers={**AUTH, **(headers or {})}, timeout=30)


async def _faulty_chat(request: web.Request) -> web.StreamResponse:
    """An upstream whose behaviour is chosen by the request's model name."""
    body = await request.json()
    model = body.get("model")
    if model == "fail-500":
        return web.Response(status=500, body=UPSTREAM_500, content_type="application/json")
    if model == "fail-429":
        return web.Response(status=429, body=UPSTREAM_429, content_type="application/json")
    if model == "redirect":
        return web.Response(status=302, headers={"Location": "http://127.0.0.1:9/v1/chat/completions"})
    if model == "not-json":
        return web.Response(status=200, body=b"{not json", content_type="application/json")
    if model == "hang":
        for _ in range(200):  # until the gateway hangs up, at most 10 s
            if request.transport is None or request.transport.is_closing():
                break
            await asyncio.sleep(0.05)
        return web.Response(status=503)
    return web.json_response({"id": "x", "object": "chat.completion", "model": model, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}]})


@pytest.fixture
def faulty_url() -> Iterator[str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _faulty_chat)
    server = _Server(app)
    yield f"http://127.0.0.1:{server.port}/v1"
    server.stop()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer sg-not-a-key"},
    {"Authorization": "Basic c2ctZGVtby1hY21lOg=="},
    {"Authorization": "Bearer"},
], ids=["missing", "unknown", "basic", "empty-bearer"])
def test_missing_or_unknown_key_is_401(gateway: Gateway, upstream: Upstream, headers: dict[str, str]) -> None:
    """Chat, session and proxied routes answer 401 authentication_error without a valid client key."""
    for method, path in (("POST", "/chat/completions"), ("GET", "/sessions"), ("GET", "/sessions/s1"),
                         ("GET", "/models")):
        resp = httpx.request(method, f"{gateway.base_url}{path}", json=CHAT, headers=headers)
        error = assert_error(resp, 401, "invalid_api_key")
        assert error["type"] == "authentication_error"
        assert "sg-not-a-key" not in resp.text
        if not headers:  # the hint names both headers a client route takes
            assert "'Authorization: Bearer <your gateway key>' or 'x-api-key: <your gateway key>'" in error["message"]
    assert upstream.requests == []


def test_auditor_token_cannot_chat(gateway: Gateway) -> None:
    """An auditor token on a client route answers as an unknown key does (401), in the error shape."""
    resp = httpx.post(f"{gateway.base_url}/chat/completions", json=CHAT,
                      headers={"Authorization": f"Bearer {AUDITOR_TOKEN}"})
    assert assert_error(resp, 401, "invalid_api_key")["type"] == "authentication_error"


@pytest.mark.parametrize(("body", "code"), [
    (b'{"model": "standin", "messages": [', "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "invalid_json"),
    (b'', "invalid_json"),
    (b'[1, 2]', "invalid_json"),
    (b'{"model": "standin"}', "missing_messages"),
    (b'{"messages": []}', "missing_messages"),
    (b'{"messages": "hello"}', "missing_messages"),
    (b'{"messages": [{"content": "no role"}]}', "invalid_messages"),
    (b'{"messages": [42]}', "invalid_messages"),
    (b'{"messages": [{"role": "user", "content": "x"}], "model": 7}', "invalid_model"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "invalid_stream"),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "missing_model"),
    (b'{"messages": [{"role": "user", "content": "x"}], "model": null}', "missing_model"),
    (b'{"model": "standin", "messages": [{"role": "user", "content": 5}]}', "invalid_content"),
    (b'{"model": "standin", "messages": [{"role": "user", "content": true}]}', "invalid_content"),
    (b'{"model": "standin", "messages": [{"role": "user", "content": [5]}]}', "invalid_content"),
    (b'{"model": "standin", "messages": [{"role": "user", "content": null}]}', "invalid_content"),
    (b'{"model": "standin", "messages": [{"role": "system"}, {"role": "user", "content": "x"}]}', "invalid_content"),
], ids=["malformed", "latin1", "empty", "array", "no-messages", "empty-messages", "string-messages",
        "no-role", "number-message", "model-int", "stream-string", "model-absent", "model-null", "content-number",
        "content-bool", "content-part-number", "user-content-null", "system-content-absent"])
def test_bad_chat_bodies_are_400(gateway: Gateway, upstream: Upstream, body: bytes, code: str) -> None:
    """Malformed JSON, invalid UTF-8, requests without usable messages or without a model, and
    message content that is a number, a boolean, a list holding other than part objects, or null
    on a user or system turn (the model would read one text and the session record another)
    answer 400 with a stable code."""
    error = assert_error(post_chat(gateway, body, headers={"X-Session-Id": "victim"}), 400, code)
    assert error["type"] == "invalid_request_error"
    assert upstream.requests == []


@pytest.mark.parametrize("session_id", ["x" * 300, "has space", "a/b", "-leading-dash", "semi;colon"],
                         ids=["300-chars", "space", "slash", "leading-dash", "semicolon"])
def test_bad_session_id_header_is_400(gateway: Gateway, upstream: Upstream, session_id: str) -> None:
    """An X-Session-Id outside the id rule answers 400 invalid_session_id and is not forwarded."""
    assert_error(post_chat(gateway, json=CHAT, headers={"X-Session-Id": session_id}), 400, "invalid_session_id")
    assert upstream.requests == []


@pytest.mark.parametrize("path", ["x" * 300, "has%20space", "a%2Fb", "a/b", "a/b/c"],
                         ids=["300-chars", "space", "encoded-slash", "slash", "two-slashes"])
def test_bad_session_id_in_the_path_is_400(gateway: Gateway, upstream: Upstream, path: str) -> None:
    """Every session route refuses a bad id with 400, never forwarding the request or its document upstream."""
    base = f"{gateway.base_url}/sessions/{path}"
    for method, url in (("GET", base), ("DELETE", base), ("POST", f"{base}/reset")):
        assert_error(httpx.request(method, url, headers=AUTH), 400, "invalid_session_id")
    put = httpx.put(base, headers=AUTH, json={"full_context": [{"role": "user", "content": "secret"}]})
    assert_error(put, 400, "invalid_session_id")
    assert httpx.get(f"{gateway.base_url}/sessions", headers=AUTH).json()["data"] == []


def test_wrong_method_on_a_session_route_is_405(gateway: Gateway) -> None:
    """A session route called with a method it does not take answers 405, not a forward upstream."""
    for method, path in (("POST", "/sessions"), ("POST", "/sessions/s1"), ("GET", "/sessions/s1/reset")):
        assert_error(httpx.request(method, f"{gateway.base_url}{path}", headers=AUTH, json={}), 405,
                     "method_not_allowed")


def test_body_over_the_limit_is_413(make_gateway: Callable[..., Gateway], upstream: Upstream) -> None:
    """A body over server.max_body_bytes answers 413, with Content-Length or sent chunked without one."""
    gateway = make_gateway(server={"host": "127.0.0.1", "port": 0, "max_body_bytes": 2048})
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * 4000 + b'"}]}'
    assert_error(post_chat(gateway, big), 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 500):
            yield big[i:i + 500]

    assert_error(post_chat(gateway, chunks()), 413, "payload_too_large")
    put = httpx.put(f"{gateway.base_url}/sessions/big", headers=AUTH, content=big)
    assert_error(put, 413, "payload_too_large")
    assert post_chat(gateway, json=CHAT).status_code == 200
    assert len(upstream.requests) == 1


def test_unreachable_upstream_is_502(make_gateway: Callable[..., Gateway]) -> None:
    """An upstream that refuses connections answers 502 upstream_error, streaming or not."""
    gateway = make_gateway(upstreams=[{"name": "dead", "base_url": f"http://127.0.0.1:{closed_port()}/v1",
                                       "connect_timeout": 2}])
    for stream in (False, True):
        resp = post_chat(gateway, json={**CHAT, "stream": stream})
        assert assert_error(resp, 502, "upstream_unreachable")["type"] == "upstream_error"
        assert "dead" in resp.json()["error"]["message"]


def test_upstream_timeout_is_504(make_gateway: Callable[..., Gateway], faulty_url: str) -> None:
    """An upstream that does not answer within read_timeout answers 504 upstream_timeout."""
    gateway = make_gateway(upstreams=[{"name": "slow", "base_url": faulty_url, "read_timeout": 0.3}])
    for stream in (False, True):
        resp = post_chat(gateway, json={**CHAT, "model": "hang", "stream": stream})
        assert assert_error(resp, 504, "upstream_timeout")["type"] == "upstream_error"


def test_errors_made_for_upstream_failures_carry_the_request_id(make_gateway: Callable[..., Gateway],
                                                                faulty_url: str) -> None:
    """A 502 or 504 the gateway makes for an upstream failure carries ``X-Sessiongate-Request-Id``, the id of
    the request's audit entry, as a relayed provider error does; on model and forwarded routes alike."""
    gateway = make_gateway(upstreams=[
        {"name": "faulty", "base_url": faulty_url, "read_timeout": 0.3, "models": ["hang", "redirect", "not-json",
                                                                                  "fail-500"]},
        {"name": "dead", "base_url": f"http://127.0.0.1:{closed_port()}/v1", "connect_timeout": 2}])
    ids = []
    for model, status, code in (("hang", 504, "upstream_timeout"), ("redirect", 502, "upstream_redirect"),
                                ("not-json", 502, "bad_upstream_reply"), ("standin", 502, "upstream_unreachable"),
                                ("fail-500", 500, None)):
        for stream in (False, True):
            resp = post_chat(gateway, json={**CHAT, "model": model, "stream": stream})
            if code is not None:
                assert_error(resp, status, code)
            assert resp.status_code == status
            ids.append(resp.headers["X-Sessiongate-Request-Id"])
    forwarded = httpx.get(f"{gateway.base_url}/models", headers=AUTH)
    assert_error(forwarded, 502, "upstream_error_page")  # the faulty upstream has no such route
    ids.append(forwarded.headers["X-Sessiongate-Request-Id"])
    audited = {entry.get("request_id") for entry in gateway.audit_entries()}
    assert len(set(ids)) == len(ids) and set(ids) <= audited


def test_upstream_error_status_passes_through_with_its_body(make_gateway: Callable[..., Gateway],
                                                            faulty_url: str) -> None:
    """An upstream 500 or 429 reaches the client with that status and the upstream's exact body."""
    gateway = make_gateway(upstreams=[{"name": "faulty", "base_url": faulty_url}])
    for model, status, body in (("fail-500", 500, UPSTREAM_500), ("fail-429", 429, UPSTREAM_429)):
        for stream in (False, True):
            resp = post_chat(gateway, json={**CHAT, "model": model, "stream": stream},
                             headers={"X-Session-Id": "passthrough"})
            assert resp.status_code == status
            assert resp.content == body
    client = gateway.openai()
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="fail-429", messages=CHAT["messages"])
    assert caught.value.code == "rate_limit_exceeded"


def test_no_client_input_gets_a_500(gateway: Gateway) -> None:
    """Odd but possible client input never yields a 500 or a stack trace."""
    raw = httpx.Client(base_url=gateway.base_url)
    cases: list[tuple[str, str, dict[str, str], bytes]] = [
        ("POST", "/chat/completions", AUTH, b"[" * 5000),
        ("POST", "/chat/completions", AUTH, b'{"messages": [{"role": "user", "content": {"odd": [1, 2]}}]}'),
        ("POST", "/chat/completions", AUTH, b'{"messages": [{"role": "assistant", "content": "only me"}]}'),
        ("POST", "/chat/completions", AUTH, b'{"messages": [{"role": "user", "content": null}], "stream": null}'),
        ("POST", "/chat/completions", AUTH, b'{"messages": [{"role": "user", "content": "x"}], "model": ""}'),
        ("POST", "/chat/completions", AUTH, b'{"messages": [{"role": 5}]}'),
        ("POST", "/chat/completions", AUTH, b"\x00\x01\x02"),
        ("POST", "/chat/completions", {**AUTH, "Content-Type": "text/plain"}, b"hello"),
        ("POST", "/chat/completions", {**AUTH, "X-Session-Id": ""}, b'{"messages": [{"role": "user"}]}'),
        ("PUT", "/sessions/odd", AUTH, b'{"full_context": [{"role": "user", "content": [{"type": "text"}]}]}'),
        ("PUT", "/sessions/odd2", AUTH, b"\xff\xfe"),
        ("PUT", "/sessions/odd3", AUTH, b'{"full_context": null, "context_window": 5}'),
        ("GET", "/sessions/%00", AUTH, b""),
        ("DELETE", "/sessions/..", AUTH, b""),
    ]
    for method, path, headers, body in cases:
        resp = raw.request(method, path, headers=headers, content=body)
        assert resp.status_code < 500, (path, body[:40], resp.text)
        assert "Traceback" not in resp.text and 'File "' not in resp.text
        if resp.status_code >= 400:
            assert set(resp.json()["error"]) == {"message", "type", "code"}
    raw.close()


def test_a_refused_request_stores_nothing(gateway: Gateway, upstream: Upstream) -> None:
    """After a series of refused requests naming a session, the database holds no session, round or entry for it."""
    for body in (b"{", b"[]", b'{"messages": []}', b'{"messages": [{"role": 1}]}', b"\xff"):
        assert post_chat(gateway, body, headers={"X-Session-Id": "victim"}).status_code == 400
    assert post_chat(gateway, json=CHAT, headers={"X-Session-Id": "bad id"}).status_code == 400
    assert httpx.put(f"{gateway.base_url}/sessions/victim", headers=AUTH, content=b"{oops").status_code == 400
    assert upstream.requests == []
    conn = sqlite3.connect(gateway.db_path)
    try:
        for table in ("sessions", "rounds", "data_keys"):
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0, table
        assert conn.execute("SELECT count(*) FROM audit WHERE tenant='acme'").fetchone()[0] == 0
    finally:
        conn.close()
