"""Azure OpenAI as an upstream: a deployment's URL, the ``api-key`` header and a fixed
``api-version`` query parameter on every request (the upstream's ``query`` setting).

The fake below answers as Azure does: 401 without the right ``api-key``, 404 "Resource not found"
without ``api-version`` or outside the deployment's path, and Chat Completions (JSON or SSE) and
embeddings inside it. The client is the real ``openai`` SDK, pointed at the gateway as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from aiohttp import web

from gateway.errors import ConfigError
from gateway.settings import load_settings
from tests.conftest import ACME_KEY, Gateway, serving

AZURE_KEY = "azure-key-0123456789"
API_VERSION = "2024-10-21"
DEPLOYMENT = "/openai/deployments/gpt-4o-prod"


class Azure:
    """What the fake Azure resource received: (method, path, query, headers) of each request."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, list[str]], dict[str, str]]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        query: dict[str, list[str]] = {}
        for name, value in request.query.items():
            query.setdefault(name, []).append(value)
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.seen.append((request.method, request.path, query, headers))
        if headers.get("api-key") != AZURE_KEY:
            return web.json_response({"error": {"code": "401", "message": "Access denied due to invalid "
                                                "subscription key or wrong API endpoint."}}, status=401)
        if query.get("api-version") != [API_VERSION] or not request.path.startswith(DEPLOYMENT + "/"):
            return web.json_response({"error": {"code": "404", "message": "Resource not found"}}, status=404)
        body = await request.json()
        if request.path == DEPLOYMENT + "/embeddings":
            return web.json_response({"object": "list", "model": "text-embedding-3-small",
                                      "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}],
                                      "usage": {"prompt_tokens": 1, "total_tokens": 1}})
        text = "azure says: " + body["messages"][-1]["content"]
        if not body.get("stream"):
            return web.json_response({"id": "chatcmpl-az", "object": "chat.completion", "created": 1,
                                      "model": "gpt-4o", "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}]})
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for piece in (text[:6], text[6:]):
            chunk = {"id": "chatcmpl-az", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
                     "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            await out.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out


@pytest.fixture
def azure(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Azure, str]]:
    monkeypatch.setenv("SG_TEST_AZURE_KEY", AZURE_KEY)
    fake = Azure()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    with serving(app) as url:
        yield fake, url


def connect(make_gateway: Callable[..., Gateway], url: str, **upstream: Any) -> Gateway:
    settings = {"name": "azure", "base_url": url + DEPLOYMENT, "models": ["*"], "api_key_env": "SG_TEST_AZURE_KEY",
                "key_header": "api-key", "query": {"api-version": API_VERSION},
                "forward_routes": ["embeddings"], **upstream}
    return make_gateway(upstreams=[settings])


def test_the_openai_sdk_reaches_an_azure_deployment_through_the_gateway(
        make_gateway: Callable[..., Gateway], azure: tuple[Azure, str]) -> None:
    """Chat (JSON and stream) and a forwarded route reach the deployment with the configured
    api-version, once, and Azure's key header: never the client's key, never Authorization."""
    fake, url = azure
    gateway = connect(make_gateway, url)
    client = gateway.openai(session="azure-1")
    reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content == "azure says: hello"
    stream = client.chat.completions.create(model="gpt-4o", stream=True,
                                            messages=[{"role": "user", "content": "again"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "azure says: again"
    # a client that sends its own api-version (an AzureOpenAI habit) gets the upstream's
    embedding = client.embeddings.create(model="text-embedding-3-small", input="hi",
                                         extra_query={"api-version": "1999-01-01", "keep": "me"})
    assert embedding.data[0].embedding == [0.5, 0.25]

    assert [(m, p) for m, p, _, _ in fake.seen] == [("POST", DEPLOYMENT + "/chat/completions")] * 2 + [
        ("POST", DEPLOYMENT + "/embeddings")]
    for _, _, query, headers in fake.seen:
        assert query["api-version"] == [API_VERSION]
        assert headers["api-key"] == AZURE_KEY and "authorization" not in headers
        assert not any(ACME_KEY in v for v in headers.values())
    assert fake.seen[-1][2]["keep"] == ["me"]
    session = httpx.get(f"{gateway.base_url}/sessions/azure-1", headers={"Authorization": f"Bearer {ACME_KEY}"}).json()
    assert [m["content"] for m in session["full_context"]] == ["hello", "azure says: hello", "again",
                                                               "azure says: again"]


def test_without_the_query_setting_azure_refuses_and_the_client_hears_it(
        make_gateway: Callable[..., Gateway], azure: tuple[Azure, str]) -> None:
    """The provider's 404 reaches the client as Azure's own error, so the missing setting shows."""
    import openai

    fake, url = azure
    gateway = connect(make_gateway, url, query={})
    with pytest.raises(openai.NotFoundError) as caught:
        gateway.openai(session="azure-2").chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hello"}])
    assert "Resource not found" in str(caught.value)
    assert "api-version" not in fake.seen[-1][2]


@pytest.mark.parametrize(("field", "value", "says"), [
    ("base_url", "https://res.openai.azure.com/openai/deployments/d?api-version=2024-10-21",
     "give fixed query parameters, such as Azure's api-version, in the upstream's query setting"),
    ("base_url", f"https://user:{AZURE_KEY}@res.openai.azure.com/openai", "must not hold a user or password"),
    ("query", {"api-key": AZURE_KEY}, "looks like a credential"),
    ("query", {"sig": AZURE_KEY}, "looks like a credential"),
    ("query", {"": "x"}, "names not empty"),
])
def test_a_query_in_the_wrong_place_or_a_credential_in_a_url_is_refused(tmp_path: Path, field: str, value: Any,
                                                                        says: str) -> None:
    """``serve``'s loader names file, line and field, says what to do, and never echoes the secret."""
    path = tmp_path / "sessiongate.yaml"
    upstream = {"name": "azure", "base_url": "https://res.openai.azure.com/openai", field: value}
    path.write_text(yaml.safe_dump({"upstreams": [upstream]}))
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    text = str(caught.value)
    assert says in text and "sessiongate.yaml:" in text and field in text, text
    assert AZURE_KEY not in text, text


def test_a_client_cannot_smuggle_its_own_api_version_past_the_fixed_one() -> None:
    """Spelled percent-encoded, with '+', or twice: the client's value is dropped, the rest kept as sent."""
    import aiohttp

    from gateway.upstream import Upstream

    up = Upstream("azure", "https://r.openai.azure.com/openai/deployments/d", {}, ("*",), aiohttp.ClientTimeout(),
                  query=(("api-version", API_VERSION),))
    url = up.url("/embeddings", "api%2Dversion=1999&api-version=2000&keep=a%20b&flag&api-version")
    assert url.raw_query_string == f"keep=a%20b&flag&api-version={API_VERSION}"
    assert str(up.url("/chat/completions")).endswith(f"/chat/completions?api-version={API_VERSION}")
