"""An upstream declares its protocol and key header: the provider key goes out the way that upstream
expects, ``anthropic-version``/``anthropic-beta`` reach Anthropic upstreams (with a default version),
no client credential is ever forwarded, and models route per protocol. A recording upstream on
loopback sees every header the gateway sends."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web
from multidict import CIMultiDict

from gateway.errors import BadRequest
from gateway.handlers import SERVICES
from gateway.settings import UpstreamSettings
from gateway.upstream import ANTHROPIC_VERSION, Upstreams
from tests.conftest import ACME_KEY, Gateway, _Server

PROVIDER_KEY = "sk-provider-key-123"
CLIENT_SECRET = "client-secret-must-stay-here"
CLIENT = {"Authorization": f"Bearer {ACME_KEY}", "x-api-key": CLIENT_SECRET, "Content-Type": "application/json"}


class Recorder:
    """An upstream that answers every request with ``{}`` and keeps (path, headers) of each."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []

        async def record(request: web.Request) -> web.Response:
            self.seen.append((request.path, {k.lower(): v for k, v in request.headers.items()}))
            return web.json_response({"object": "list", "data": []})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        self.server = _Server(app)
        self.url = f"http://127.0.0.1:{self.server.port}/v1"

    @property
    def headers(self) -> dict[str, str]:
        return self.seen[-1][1]


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    monkeypatch.setenv("SG_TEST_PROVIDER_KEY", PROVIDER_KEY)
    rec = Recorder()
    try:
        yield rec
    finally:
        rec.server.stop()


def send(recorder: Recorder, client_headers: dict[str, str], **settings: Any) -> dict[str, str]:
    """One POST /v1/messages through ``Upstreams`` to an upstream made of *settings*; the headers it got."""
    settings.setdefault("api_key_env", "SG_TEST_PROVIDER_KEY")
    upstream = UpstreamSettings(name="up", base_url=recorder.url, **settings)

    async def go() -> None:
        upstreams = Upstreams([upstream])
        await upstreams.start()
        try:
            up = upstreams.route("m", upstream.protocol)
            async with upstreams.open(up, "POST", "/messages", body=b"{}", headers=CIMultiDict(client_headers)) as r:
                await r.read()
        finally:
            await upstreams.close()

    asyncio.run(go())
    return recorder.headers


def no_client_secret(headers: dict[str, str]) -> bool:
    return not any(CLIENT_SECRET in v or ACME_KEY in v for v in headers.values())


def test_openai_upstream_gets_a_bearer_key_and_no_anthropic_headers(recorder: Recorder) -> None:
    """protocol openai (the default): Authorization: Bearer <provider key>; the client's keys and its
    anthropic-* headers stay behind."""
    got = send(recorder, {**CLIENT, "anthropic-version": "2024-01-01", "anthropic-beta": "x"})
    assert got["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert "x-api-key" not in got and "anthropic-version" not in got and "anthropic-beta" not in got
    assert no_client_secret(got)


def test_anthropic_upstream_gets_x_api_key_and_a_default_version(recorder: Recorder) -> None:
    """protocol anthropic: x-api-key: <provider key>, no Authorization, anthropic-version 2023-06-01 when the
    client sent none."""
    got = send(recorder, CLIENT, protocol="anthropic")
    assert got["x-api-key"] == PROVIDER_KEY and "authorization" not in got
    assert got["anthropic-version"] == ANTHROPIC_VERSION == "2023-06-01"
    assert no_client_secret(got)


def test_anthropic_upstream_gets_the_clients_version_and_beta(recorder: Recorder) -> None:
    """The client's anthropic-version and anthropic-beta are forwarded as sent."""
    got = send(recorder, {**CLIENT, "Anthropic-Version": "2099-01-01", "anthropic-beta": "tools-2024-04-04"},
               protocol="anthropic")
    assert got["anthropic-version"] == "2099-01-01" and got["anthropic-beta"] == "tools-2024-04-04"
    assert got["x-api-key"] == PROVIDER_KEY and no_client_secret(got)


@pytest.mark.parametrize(("protocol", "header", "expected"), [
    ("openai", "api-key", PROVIDER_KEY),  # Azure OpenAI
    ("anthropic", "Authorization", f"Bearer {PROVIDER_KEY}"),  # an Anthropic-compatible proxy taking Bearer
    ("openai", "x-goog-api-key", PROVIDER_KEY),
])
def test_key_header_override(recorder: Recorder, protocol: str, header: str, expected: str) -> None:
    """key_header names the header that carries the key; only Authorization gets the Bearer scheme."""
    got = send(recorder, CLIENT, protocol=protocol, key_header=header)
    assert got[header.lower()] == expected
    others = {"authorization", "x-api-key", "api-key", "x-goog-api-key"} - {header.lower()}
    assert not others & set(got) and no_client_secret(got)


def test_no_key_configured_sends_no_key(recorder: Recorder) -> None:
    """An upstream without api_key_env gets no key header at all, and still none of the client's."""
    got = send(recorder, CLIENT, protocol="anthropic", api_key_env=None)
    assert not {"authorization", "x-api-key"} & set(got) and got["anthropic-version"] == ANTHROPIC_VERSION


@pytest.mark.parametrize("field", [{"protocol": "gemini"}, {"key_header": "x api key"},
                                   {"key_header": "x-api-key\r\nEvil: 1"}, {"key_header": ""}])
def test_bad_protocol_or_key_header_is_refused(field: dict[str, str]) -> None:
    """An unknown protocol or a key_header that is not a header name fails validation."""
    with pytest.raises(ValueError):
        UpstreamSettings(name="x", base_url="http://127.0.0.1:1/v1", **field)


def test_route_picks_the_first_upstream_of_the_protocol() -> None:
    """route(model) keeps its old meaning (openai); route(model, "anthropic") skips openai upstreams; an
    unserved pair is a 400 model_not_found naming the upstreams of that protocol."""
    upstreams = Upstreams([
        UpstreamSettings(name="oa", base_url="http://127.0.0.1:1/v1"),
        UpstreamSettings(name="claude", base_url="http://127.0.0.1:2/v1", protocol="anthropic", models=["claude-*"]),
        UpstreamSettings(name="claude-all", base_url="http://127.0.0.1:3/v1", protocol="anthropic"),
    ])
    assert upstreams.route("claude-3").name == "oa"
    assert upstreams.route("claude-3", "anthropic").name == "claude"
    assert upstreams.route("other", "anthropic").name == "claude-all"
    assert upstreams.route("other", "anthropic").protocol == "anthropic"
    only_openai = Upstreams([UpstreamSettings(name="oa", base_url="http://127.0.0.1:1/v1", models=["gpt-*"])])
    with pytest.raises(BadRequest) as caught:
        only_openai.route("claude-3", "anthropic")
    assert caught.value.code == "model_not_found" and "no anthropic upstream" in caught.value.message
    with pytest.raises(BadRequest, match="configured upstreams: oa"):
        only_openai.route("claude-3")


def test_forwarded_route_through_the_gateway_carries_only_the_provider_key(
        make_gateway: Callable[..., Gateway], recorder: Recorder) -> None:
    """Through the gateway, a forwarded route reaches the provider with its key and none of the client's
    (the gateway key in both of the client's headers: two different keys are refused, see
    ``tests/hostile/test_duplicate_headers.py``)."""
    gateway = make_gateway(upstreams=[{"name": "rec", "base_url": recorder.url,
                                       "api_key_env": "SG_TEST_PROVIDER_KEY", "key_header": "api-key"}])
    response = httpx.get(f"{gateway.base_url}/models", headers={**CLIENT, "x-api-key": ACME_KEY})
    assert response.status_code == 200, response.text
    path, got = recorder.seen[-1]
    assert path == "/v1/models" and got["api-key"] == PROVIDER_KEY
    assert "authorization" not in got and "x-api-key" not in got and no_client_secret(got)


def test_standin_is_registered_for_both_protocols(make_gateway: Callable[..., Gateway]) -> None:
    """With no upstream configured, the built-in stand-in serves openai and anthropic routing alike."""
    gateway = make_gateway(use_upstream=False)
    upstreams = gateway.app[SERVICES].upstreams
    openai_up, anthropic_up = upstreams.route("anything"), upstreams.route("claude-x", "anthropic")
    assert (openai_up.name, anthropic_up.name) == ("stand-in", "stand-in-anthropic")
    assert openai_up.base_url == anthropic_up.base_url and anthropic_up.protocol == "anthropic"
    reply = httpx.post(f"{anthropic_up.base_url}/messages", json={
        "model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 200 and reply.json()["type"] == "message"
