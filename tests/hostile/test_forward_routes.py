"""Forwarded routes as an attacker and a broken provider would use them (issue 9, items 3, 5, 7):
account-wide provider routes are refused unless allowed per upstream, the chat route is never
forwarded, a reply that breaks off mid-body ends the connection without a second status line,
``model`` is validated before anything logs or audits it, and every request that reached the
provider leaves an audit entry (completed, upstream error, broken off, client gone)."""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest

from tests.conftest import ACME_KEY, GLOBEX_KEY, Gateway, wait_for
from tests.provider import Provider, provider  # noqa: F401

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}
ACCOUNT_WIDE = ["GET /v1/files", "POST /v1/files", "GET /v1/files/file-1/content", "DELETE /v1/files/file-1",
                "POST /v1/uploads", "GET /v1/batches", "POST /v1/assistants", "GET /v1/threads/t1/messages",
                "GET /v1/vector_stores", "POST /v1/fine_tuning/jobs", "GET /v1/organization/costs",
                "GET /v1/models-x", "GET /v1/unheard-of"]


def connect(make_gateway: Callable[..., Gateway], url: str, **upstream: Any) -> Gateway:
    return make_gateway(upstreams=[{"name": "provider", "base_url": url, "models": ["*"], **upstream}])


def audit_entries(gateway: Gateway, tenant: str = "acme") -> list[dict[str, Any]]:
    conn = sqlite3.connect(gateway.db_path)
    try:
        return [orjson.loads(b) for (b,) in conn.execute("SELECT body FROM audit WHERE tenant=? ORDER BY seq",
                                                         (tenant,))]
    finally:
        conn.close()


def proxied(gateway: Gateway) -> list[dict[str, Any]]:
    return [e for e in audit_entries(gateway) if e["event"] == "proxy"]


def raw_get(gateway: Gateway, target: str, *, hang_up_after: int | None = None) -> bytes:
    """GET over a raw socket; every byte until the server closes (or until *hang_up_after* bytes)."""
    url = urlsplit(gateway.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {ACME_KEY}\r\n\r\n"
                     .encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            if hang_up_after is not None and len(data) >= hang_up_after:
                break
    return data


@pytest.mark.parametrize("request_line", ACCOUNT_WIDE)
def test_account_wide_routes_are_refused_by_default(make_gateway: Callable[..., Gateway],
                                                    provider: Provider, request_line: str) -> None:  # noqa: F811
    """Files, batches, assistants and anything unlisted get 403 saying how to allow them; nothing is sent."""
    gateway = connect(make_gateway, provider.url)
    method, path = request_line.split(" ")
    resp = httpx.request(method, gateway.url + path, headers=AUTH,
                         json={"purpose": "batch"} if method == "POST" else None)
    assert resp.status_code == 403, resp.text
    error = resp.json()["error"]
    assert error["code"] == "route_not_allowed" and "forward_routes" in error["message"]
    assert provider.paths == []


@pytest.mark.parametrize(("request_line", "rule", "unrecorded"), [
    ("POST /v1/messages/something_new", "messages/something_new", False),
    ("POST /v1/messages/batches", "messages/batches", True),
    ("GET /v1/messages/batches/b1/results", "messages/batches", True),
    ("POST /v1/batches", "batches", True),
    ("POST /v1/threads/t1/runs", "threads", True),
    ("POST /v1/completions", "completions", True),
    ("GET /v1/files/file-1", "files", False),
    ("POST /v1/realtime/sessions", "realtime", True),  # GET /v1/messages is 405: see the model routes' test below
])
def test_a_refusal_suggests_the_narrowest_rule_and_says_when_model_calls_would_go_unrecorded(
        make_gateway: Callable[..., Gateway], provider: Provider, request_line: str, rule: str,  # noqa: F811
        unrecorded: bool) -> None:
    """``messages`` as a rule would also forward Message Batches; the hint for another route under it
    names that route, and routes that run the model outside the gateway say so."""
    gateway = make_gateway(upstreams=[{"name": "provider", "base_url": provider.url, "models": ["*"]},
                                      {"name": "an", "base_url": provider.url, "models": ["*"],
                                       "protocol": "anthropic"}])
    method, path = request_line.split(" ")
    resp = httpx.request(method, gateway.url + path, headers=AUTH, json={"model": "m"} if method == "POST" else None)
    assert resp.status_code == 403, resp.text
    message = resp.json()["error"]["message"]
    assert f"adding '{rule}' to forward_routes" in message
    assert ("not recorded by the gateway" in message) is unrecorded
    assert provider.paths == []


def test_default_routes_and_their_sub_paths_are_forwarded(make_gateway: Callable[..., Gateway],
                                                         provider: Provider) -> None:  # noqa: F811
    """models (and models/{id}), embeddings and moderations are allowed out of the box, and audited."""
    gateway = connect(make_gateway, provider.url)
    assert httpx.get(f"{gateway.base_url}/models", headers=AUTH).status_code == 200
    assert httpx.get(f"{gateway.base_url}/models/gpt-y", headers=AUTH).json()["id"] == "gpt-y"
    embedded = httpx.post(f"{gateway.base_url}/embeddings", headers=AUTH, json={"model": "e", "input": "x"})
    assert embedded.status_code == 200
    assert httpx.post(f"{gateway.base_url}/moderations", headers=AUTH, json={"input": "x"}).status_code == 200
    assert provider.paths == ["/v1/models", "/v1/models/gpt-y", "/v1/embeddings", "/v1/moderations"]
    assert [(e["route"], e["outcome"], e["upstream_status"]) for e in proxied(gateway)] == [
        ("/v1/models", "completed", 200), ("/v1/models/{id}", "completed", 200),
        ("/v1/embeddings", "completed", 200), ("/v1/moderations", "completed", 200)]


def test_an_operator_allows_routes_per_upstream(make_gateway: Callable[..., Gateway],
                                                provider: Provider) -> None:  # noqa: F811
    """With forward_routes [models, files], files is forwarded and embeddings no longer is."""
    gateway = connect(make_gateway, provider.url, forward_routes=["models", "files"])
    assert httpx.get(f"{gateway.base_url}/files/file-1/content", headers=AUTH).status_code == 200
    refused = httpx.post(f"{gateway.base_url}/embeddings", headers=AUTH, json={"model": "e", "input": "x"})
    assert refused.status_code == 403
    assert provider.paths == ["/v1/files/file-1/content"]


def test_the_chat_route_is_never_forwarded(make_gateway: Callable[..., Gateway],
                                           provider: Provider) -> None:  # noqa: F811
    """GET /v1/chat/completions is 405 and another spelling of the chat route is 404, both unforwarded."""
    gateway = connect(make_gateway, provider.url, forward_routes=["*"])
    resp = httpx.get(f"{gateway.base_url}/chat/completions", headers=AUTH)
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "method_not_allowed"
    body = {"model": "gpt-x", "messages": [{"role": "user", "content": "unrecorded?"}]}
    assert httpx.post(f"{gateway.base_url}/Chat/Completions", headers=AUTH, json=body).status_code == 404
    assert provider.paths == []


@pytest.mark.parametrize(("method", "path"), [("GET", "/messages"), ("DELETE", "/messages"), ("GET", "/responses"),
                                            ("PUT", "/responses"), ("GET", "/chat/completions")])
def test_a_wrong_method_on_a_model_route_is_405_with_allow(make_gateway: Callable[..., Gateway],
                                                           provider: Provider, method: str,  # noqa: F811
                                                           path: str) -> None:
    """A model route called with another method than POST is 405 with ``Allow: POST``, in the
    path's error shape (Anthropic's on /v1/messages), not a 403 suggesting a forward_routes
    rule; nothing is forwarded, even with every route allowed."""
    gateway = connect(make_gateway, provider.url, forward_routes=["*"])
    resp = httpx.request(method, f"{gateway.base_url}{path}", headers=AUTH)
    assert resp.status_code == 405 and resp.headers["Allow"] == "POST", resp.text
    doc = resp.json()
    error = doc["error"]
    if path == "/messages":
        assert doc["type"] == "error" and set(error) == {"type", "message"}
    else:
        assert error["code"] == "method_not_allowed"
    assert "it takes POST" in error["message"] and "forward_routes" not in error["message"]
    assert provider.paths == []


def test_a_doubled_v1_path_says_what_base_url_to_set(make_gateway: Callable[..., Gateway],
                                                     provider: Provider) -> None:  # noqa: F811
    """The Anthropic SDK given the OpenAI habit's base URL (ending in /v1) posts to /v1/v1/messages:
    it gets 404 in Anthropic's shape (its SDK raises NotFoundError) saying its base_url is the
    address without /v1; the OpenAI SDK with /v1 twice gets the same in OpenAI's shape. Neither
    is a 403 suggesting a forward_routes rule 'v1', and nothing is forwarded."""
    import anthropic
    import openai
    gateway = connect(make_gateway, provider.url, forward_routes=["*"])
    client = anthropic.Anthropic(base_url=gateway.base_url, api_key=ACME_KEY, max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as refused:
        client.messages.create(model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    body = refused.value.body
    assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == "not_found_error"
    assert "/v1 twice" in body["error"]["message"]
    assert "Anthropic SDK's base_url is the gateway's address without /v1" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError) as refused_oa:
        openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=ACME_KEY, max_retries=0).chat.completions.create(
            model="gpt-x", messages=[{"role": "user", "content": "hi"}])
    assert refused_oa.value.code == "doubled_v1" and "OpenAI SDK's is that address with /v1 once" in str(
        refused_oa.value)
    assert provider.paths == []


def test_a_reply_that_breaks_off_mid_body_ends_the_connection(make_gateway: Callable[..., Gateway],
                                                             provider: Provider) -> None:  # noqa: F811
    """The client gets one status line and a cut-off body, never a second response; the request is audited."""
    gateway = connect(make_gateway, provider.url)
    data = raw_get(gateway, "/v1/models/broken-body")
    assert data.startswith(b"HTTP/1.1 200")
    assert data.count(b"HTTP/1.1") == 1 and b'"error"' not in data
    assert b"broken-body" in data and not data.endswith(b"0\r\n\r\n")
    entry = proxied(gateway)[-1]
    assert (entry["route"], entry["outcome"], entry["ended_by"]) == ("/v1/models/{id}", "incomplete", "upstream")


def test_a_client_that_hangs_up_mid_body_is_audited(make_gateway: Callable[..., Gateway],
                                                    provider: Provider) -> None:  # noqa: F811
    """A client that leaves while the reply streams still leaves an audit entry saying so."""
    gateway = connect(make_gateway, provider.url)
    data = raw_get(gateway, "/v1/models/slow-body", hang_up_after=1000)
    assert data.startswith(b"HTTP/1.1 200")
    entry = wait_for(lambda: [e for e in proxied(gateway) if e["route"] == "/v1/models/{id}"])[0]
    assert (entry["outcome"], entry["ended_by"]) == ("incomplete", "client")


@pytest.mark.parametrize("model", [
    "nested", "m" * 300, "gpt\x1b[31m", "", 42, ["gpt-x"]])
def test_a_model_that_is_not_a_short_printable_string_is_refused(make_gateway: Callable[..., Gateway],
                                                                 provider: Provider, model: Any) -> None:  # noqa: F811
    """400 invalid_model before anything is forwarded, logged or audited; the value is not echoed."""
    gateway = connect(make_gateway, provider.url)
    raw = orjson.dumps({"model": model, "input": "x"})
    if model == "nested":  # built as text: orjson will not even serialise this depth
        raw = b'{"model": ' + b'{"model": ' * 300 + b'"deep"' + b"}" * 300 + b', "input": "x"}'
    resp = httpx.post(f"{gateway.base_url}/embeddings", content=raw,
                      headers={**AUTH, "Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_model"
    assert "deep" not in resp.text and "mmmm" not in resp.text
    assert provider.paths == []
    ok = httpx.post(f"{gateway.base_url}/embeddings", headers=AUTH, json={"model": "gpt-x", "input": "x"})
    assert ok.status_code == 200
    assert [e["model"] for e in proxied(gateway)] == ["unlisted"]  # the upstream lists it by a glob only
    assert "deep" not in gateway.log_path.read_text()


def test_every_forwarded_request_leaves_an_audit_entry(make_gateway: Callable[..., Gateway],
                                                       provider: Provider) -> None:  # noqa: F811
    """An upstream error status and an unreachable upstream are audited like a success."""
    gateway = connect(make_gateway, provider.url)
    failed = httpx.post(f"{gateway.base_url}/embeddings", headers=AUTH, json={"model": "gpt-x"})
    assert failed.status_code == 500
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    down = connect(make_gateway, f"http://127.0.0.1:{closed_port}/v1", name="down")
    gone = httpx.get(f"{down.base_url}/models", headers={"Authorization": f"Bearer {GLOBEX_KEY}"})
    assert gone.status_code == 502 and gone.json()["error"]["type"] == "upstream_error"
    assert [(e["route"], e["outcome"], e["upstream_status"]) for e in proxied(gateway)] == [
        ("/v1/embeddings", "upstream_error", 500)]
    assert [(e["route"], e["outcome"], e["upstream_status"]) for e in
            audit_entries(down, "globex") if e["event"] == "proxy"] == [("/v1/models", "upstream_error", None)]


def test_anthropic_clients_reach_the_anthropic_upstream_on_forwarded_routes(
        make_gateway: Callable[..., Gateway], provider: Provider) -> None:  # noqa: F811
    """The ``anthropic`` SDK authenticates with ``x-api-key`` and sends ``anthropic-version``: its
    ``count_tokens`` and ``models.list()`` go to the anthropic upstream (they were refused 401, and
    routed by model to the openai one), with that upstream's key, and both are allowed by default;
    an OpenAI client's go to the openai upstream."""
    import anthropic
    gateway = make_gateway(upstreams=[
        {"name": "oa", "base_url": provider.url, "models": ["gpt-*"]},
        {"name": "an", "base_url": f"{provider.url}/anthropic", "models": ["claude-*"], "protocol": "anthropic"}])
    client = anthropic.Anthropic(base_url=gateway.url, api_key=ACME_KEY, max_retries=0)
    client.messages.count_tokens(model="claude-x", messages=[{"role": "user", "content": "hi"}])
    client.models.list()
    httpx.get(f"{gateway.base_url}/models", headers=AUTH)
    assert provider.paths == ["/v1/anthropic/messages/count_tokens", "/v1/anthropic/models", "/v1/models"]
    sent = [r["headers"] for r in provider.requests]
    assert "x-api-key" not in {k.lower() for k in sent[0]}  # the client's key never goes upstream
    assert sent[0].get("anthropic-version")  # the client's own version goes on


def test_an_anthropic_client_without_an_anthropic_upstream_is_told_so(make_gateway: Callable[..., Gateway],
                                                                      provider: Provider) -> None:  # noqa: F811
    """``GET /v1/models`` names no model: the refusal says no anthropic upstream is configured
    (it said "serves model 'None'"), and nothing reaches the openai upstream."""
    gateway = connect(make_gateway, provider.url)
    resp = httpx.get(f"{gateway.base_url}/models", headers={"x-api-key": ACME_KEY, "anthropic-version": "2023-06-01"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["message"] == ("no anthropic upstream is configured; "
                                               "configured anthropic upstreams: none")
    assert provider.paths == []
