"""``model`` on the model routes: Chat Completions and Messages require it, as their APIs do;
Responses requires it unless a ``prompt`` template names the model at the provider, and such a
request goes only to an upstream that takes every model (``*``), never to the first upstream
whatever its globs. A refused request reaches no upstream and records nothing."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import ACME_KEY, Gateway
from tests.protocols.upstream import ProtocolUpstream, start_upstream

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def wide() -> Iterator[ProtocolUpstream]:
    """A second provider: the catch-all upstream, told apart from ``proto`` by what it received."""
    up, server = start_upstream()
    try:
        yield up
    finally:
        server.stop()


def narrow_then_wide(make_gateway: Callable[..., Gateway], proto: ProtocolUpstream,
                     wide: ProtocolUpstream | None) -> Gateway:
    """A gateway whose first upstream serves only ``gpt-4o*`` (at *proto*) and, given *wide*, a
    second that serves every model."""
    upstreams: list[dict[str, Any]] = [{"name": "narrow", "base_url": f"{proto.url}/v1", "models": ["gpt-4o*"]}]
    if wide is not None:
        upstreams.append({"name": "wide", "base_url": f"{wide.url}/v1", "models": ["*"]})
    upstreams.append({"name": "an", "base_url": f"{proto.url}/v1", "models": ["*"], "protocol": "anthropic"})
    return make_gateway(upstreams=upstreams)


def sessions_of(gw: Gateway) -> int:
    with sqlite3.connect(gw.db_path) as db:
        return int(db.execute("SELECT count(*) FROM sessions").fetchone()[0])


@pytest.mark.parametrize(("path", "body", "shape"), [
    ("/v1/chat/completions", {"messages": USER}, "openai"),
    ("/v1/chat/completions", {"model": None, "messages": USER}, "openai"),
    ("/v1/responses", {"input": "hi"}, "openai"),
    ("/v1/responses", {"model": None, "input": "hi"}, "openai"),
    ("/v1/messages", {"max_tokens": 5, "messages": USER}, "anthropic"),
], ids=["chat-absent", "chat-null", "responses-absent", "responses-null", "messages-absent"])
def test_a_request_without_a_model_is_400_and_goes_nowhere(make_gateway: Callable[..., Gateway],
                                                             proto: ProtocolUpstream, wide: ProtocolUpstream,
                                                             path: str, body: dict, shape: str) -> None:
    """No ``model`` (absent or null) is 400 ``missing_model`` in the route's error shape, naming
    the field; neither upstream is called and no session is recorded."""
    gw = narrow_then_wide(make_gateway, proto, wide)
    r = httpx.post(f"{gw.url}{path}", json=body, headers={**AUTH, "X-Session-Id": "no-model"}, timeout=30)
    assert r.status_code == 400, r.text
    doc = r.json()
    if shape == "openai":
        assert doc["error"]["code"] == "missing_model"
    else:
        assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"
    assert "'model' is required" in (doc["error"]["message"])
    assert proto.requests == [] and wide.requests == []
    assert sessions_of(gw) == 0


def test_a_prompt_template_without_a_model_goes_to_the_catch_all_upstream(
        make_gateway: Callable[..., Gateway], proto: ProtocolUpstream, wide: ProtocolUpstream) -> None:
    """A Responses request with a ``prompt`` and no ``model`` goes to the upstream whose models are
    ``*`` (the second here), not to the first, whose ``gpt-4o*`` may not match the template's."""
    gw = narrow_then_wide(make_gateway, proto, wide)
    reply = gw.openai(session="templated").responses.create(prompt={"id": "pmpt_1"}, input="hi")
    assert reply.output_text
    assert [p for p, _, _ in wide.requests] == ["/v1/responses"] and proto.requests == []
    assert "model" not in wide.requests[0][2]


def test_a_prompt_template_without_a_model_and_no_catch_all_upstream_is_400(
        make_gateway: Callable[..., Gateway], proto: ProtocolUpstream) -> None:
    """With no upstream taking every model, a model-less prompt request is 400 ``missing_model``
    saying why (no upstream takes every model) and naming the upstreams; nothing is sent."""
    gw = narrow_then_wide(make_gateway, proto, None)
    r = httpx.post(f"{gw.base_url}/responses", json={"prompt": {"id": "pmpt_1"}, "input": "hi"},
                   headers={**AUTH, "X-Session-Id": "templated"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_model", r.text
    message = r.json()["error"]["message"]
    assert "no upstream takes every model" in message and "narrow" in message
    assert proto.requests == [] and sessions_of(gw) == 0
    models = httpx.get(f"{gw.base_url}/models", headers=AUTH, timeout=30)  # a forwarded route runs no model:
    assert models.status_code != 400, models.text  # it still goes to the first upstream (which has no such route)


def test_a_named_model_routes_by_the_globs_as_before(
        make_gateway: Callable[..., Gateway], proto: ProtocolUpstream, wide: ProtocolUpstream) -> None:
    """A named model routes as before: ``gpt-4o-mini`` to ``narrow``, anything else to ``wide``."""
    gw = narrow_then_wide(make_gateway, proto, wide)
    client = gw.openai()
    client.responses.create(model="gpt-4o-mini", input="hi")
    client.responses.create(model="o3", input="hi")
    assert [b["model"] for _, _, b in proto.requests] == ["gpt-4o-mini"]
    assert [b["model"] for _, _, b in wide.requests] == ["o3"]
