"""A bounded property test of the upstream boundary's error replies: whatever status, content
type and body a provider answers an error with (HTML, text, JSON of any shape, bytes that are no
text at all, the provider key echoed back), on any protocol's route, the client gets no 5xx of
the gateway's own making, an error body in its protocol's shape (or the API's own JSON error
relayed byte for byte), never the provider key, and every request leaves its audit entry with the
provider's status."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.upstream import RETRIED_STATUSES
from tests.conftest import ACME_KEY, Gateway, _Server

KEY = "sk-fuzz-provider-key-7d41c9"


@dataclass
class Reply:
    status: int = 500
    content_type: str = "text/html"
    body: bytes = b""


def provider(reply: Reply) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        body = reply.body.replace(b"{key}", KEY.encode())
        return web.Response(status=reply.status, body=body, headers={"Content-Type": reply.content_type,
                                                                      "x-request-id": "req-fuzz"})
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


texts = st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass"))
bodies = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda title, rest: b"<html><head><title>" + title + b"</title></head>" + rest + b"</html>",
              st.one_of(texts, st.just(b"edge {key} says no")), texts),
    st.builds(lambda line: line + b"\n" + b"x" * 10, st.one_of(texts, st.just(b"Bearer {key}"))),
    st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20), st.just("{key}")),
                 lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(
                     st.sampled_from(["error", "detail", "message", "code", "type"]), inner, max_size=3)),
                 max_leaves=6).map(orjson.dumps),
)
replies = st.builds(Reply, st.integers(400, 599), st.sampled_from(
    ["text/html", "text/plain", "application/json", "application/problem+json", "application/octet-stream",
     "text/event-stream", ""]), bodies)
routes = st.sampled_from([
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/chat/completions", {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/responses", {"model": "m", "input": "hi"}),
    ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/models/x", None),
])


def test_any_error_reply_of_a_provider_keeps_every_promise(make_gateway: Callable[..., Gateway],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    reply = Reply()
    server = _Server(provider(reply))
    monkeypatch.setenv("FUZZ_KEY", KEY)
    try:
        url = f"http://127.0.0.1:{server.port}/v1"
        gateway = make_gateway(upstreams=[
            {"name": "oa", "base_url": url, "models": ["*"], "api_key_env": "FUZZ_KEY"},
            {"name": "an", "base_url": url, "models": ["*"], "protocol": "anthropic", "api_key_env": "FUZZ_KEY"}])
        sent = 0
        with httpx.Client(base_url=gateway.url, timeout=30,
                          headers={"Authorization": f"Bearer {ACME_KEY}", "X-Session-Id": "fuzz"}) as client:
            @settings(max_examples=80, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(replies, routes)
            def one(answer: Reply, route: tuple[str, dict[str, object] | None]) -> None:
                nonlocal sent
                reply.status, reply.content_type, reply.body = answer.status, answer.content_type, answer.body
                path, body = route
                resp = client.get(path) if body is None else client.post(path, json=body)
                sent += 1
                assert KEY not in resp.text and "fuzz-provider-key" not in resp.text
                if _is_json(answer) and answer.status != 401:  # the API's own error: relayed as it came
                    assert resp.status_code == answer.status
                    assert resp.content == answer.body.replace(b"{key}", b"[provider key]")
                    return
                expected = 502 if answer.status not in RETRIED_STATUSES else answer.status
                assert resp.status_code == expected, (answer, resp.status_code, resp.text[:200])
                assert resp.headers["content-type"].startswith("application/json")
                data = resp.json()
                if path == "/v1/messages":
                    assert data["type"] == "error" and set(data["error"]) == {"type", "message"}
                else:
                    assert set(data["error"]) == {"message", "type", "code"}
                    assert data["error"]["code"] == ("upstream_auth_failed" if answer.status == 401
                                                     else "upstream_error_page")
            one()
        with sqlite3.connect(gateway.db_path) as db:
            entries = [orjson.loads(b) for (b,) in db.execute("SELECT body FROM audit WHERE tenant='acme'")]
        statused = [e for e in entries if e.get("event") in ("round", "proxy")]
        assert len(statused) == sent
        assert all(isinstance(e.get("upstream_status"), int) and e["upstream_status"] >= 400 for e in statused)
    finally:
        server.stop()


def _is_json(reply: Reply) -> bool:
    return reply.content_type in ("application/json", "application/problem+json")
