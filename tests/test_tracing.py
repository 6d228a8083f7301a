"""OpenTelemetry traces: a SERVER span per chat request, a child per pipeline stage, a GenAI
CLIENT span for the upstream call whose context reaches the provider in ``traceparent``; GenAI
attributes from the semantic conventions; never message content, keys or session ids."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway.app import build_app
from gateway.settings import load_settings
from gateway.standin import make_app
from gateway.tracing import Tracing, wanted
from tests.conftest import REPO, _Server, wait_for, write_config

CANARY = "tr4ce-canary-6d1f"
KEY = "sg-demo-acme"
STAGES = ["authenticate", "parse_request", "resolve_session", "match_policy", "load_state", "inject", "forward",
          "record", "persist", "respond"]


@pytest.fixture
def provider_headers() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """The stand-in model, recording the headers of every request it gets."""
    seen: list[dict[str, str]] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append(dict(request.headers))
        return await handler(request)

    app = make_app()
    app.middlewares.append(record)
    server = _Server(app)
    try:
        yield f"http://127.0.0.1:{server.port}/v1", seen
    finally:
        server.stop()


@pytest.fixture
def traced(tmp_path: Path, provider_headers: tuple[str, list[dict[str, str]]]
           ) -> Iterator[tuple[str, InMemorySpanExporter, list[dict[str, str]]]]:
    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies)
    settings = load_settings(write_config(tmp_path, provider_headers[0], policies))
    exporter = InMemorySpanExporter()
    server = _Server(build_app(settings, tracing=Tracing(settings, exporter)))
    try:
        yield f"http://127.0.0.1:{server.port}/v1", exporter, provider_headers[1]
    finally:
        server.stop()


def _client(base_url: str, session: str) -> Any:
    import openai
    return openai.OpenAI(base_url=base_url, api_key=KEY, default_headers={"X-Session-Id": session}, max_retries=0)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_request_spans(traced: tuple[str, InMemorySpanExporter, list[dict[str, str]]], stream: bool) -> None:
    """Names, kinds, parentage and attributes of the spans of one chat round, streamed or not. The
    model the client asked for is its own text: spans name the model the gateway can vouch for
    (``observe.model_label``: one the upstream lists exactly, else the one the provider reported,
    else ``unlisted``), never the client's string."""
    base_url, exporter, seen = traced
    client = _client(base_url, f"{CANARY}-session")
    messages = [{"role": "user", "content": f"remember {CANARY}"}]
    if stream:
        chunks = list(client.chat.completions.create(model=f"gpt-{CANARY}", messages=messages, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks
    else:
        client.chat.completions.create(model=f"gpt-{CANARY}", messages=messages)
    # the server span ends when the handler returns, which may be just after the client read [DONE]
    wait_for(lambda: any(s.name == "POST /v1/chat/completions" for s in exporter.get_finished_spans()))
    spans = exporter.get_finished_spans()
    by_name = {s.name: s for s in spans}
    server = by_name["POST /v1/chat/completions"]
    assert server.kind == SpanKind.SERVER and server.parent is None
    assert [s.name for s in sorted(spans, key=lambda s: s.start_time) if s.name.startswith("stage ")] == \
        [f"stage {name}" for name in STAGES]
    for name in STAGES:
        assert by_name[f"stage {name}"].parent.span_id == server.context.span_id
    call = by_name["chat unlisted"]  # before the reply, only a model the upstream lists could be named
    assert call.kind == SpanKind.CLIENT and call.parent.span_id == by_name["stage forward"].context.span_id
    attrs = dict(server.attributes)
    assert attrs["http.request.method"] == "POST" and attrs["http.route"] == "/v1/chat/completions"
    assert attrs["http.response.status_code"] == 200
    assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.request.model"] == "standin"
    assert attrs["gen_ai.response.model"] == "standin"
    assert attrs["sessiongate.tenant"] == "acme" and attrs["sessiongate.outcome"] == "completed"
    assert attrs["sessiongate.policy.id"]
    assert tuple(attrs["gen_ai.response.finish_reasons"]) == ("stop",)
    assert attrs["gen_ai.usage.input_tokens"] > 0 and attrs["gen_ai.usage.output_tokens"] > 0
    call_attrs = dict(call.attributes)
    assert call_attrs["gen_ai.provider.name"] == "openai" and call_attrs["gen_ai.system"] == "openai"
    assert call_attrs["gen_ai.request.model"] == "unlisted" and call_attrs["http.response.status_code"] == 200
    # the provider received our client span's context
    trace_id, span_id = f"{call.context.trace_id:032x}", f"{call.context.span_id:016x}"
    assert seen[-1]["traceparent"].startswith(f"00-{trace_id}-{span_id}-")
    # nothing of the content, the key or the session id in any span
    for s in spans:
        text = repr(dict(s.attributes)) + s.name + repr([e.attributes for e in s.events])
        assert CANARY not in text and KEY not in text


def test_tracing_is_off_unless_configured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No endpoint and no OTEL_* variable: no tracing; the endpoint variable turns it on, and
    OTEL_SDK_DISABLED wins over both."""
    settings = load_settings(write_config(tmp_path, None, REPO / "policies"))
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    assert not wanted(settings)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert wanted(settings)
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not wanted(settings)


@pytest.fixture
def page_traced(tmp_path: Path) -> Iterator[tuple[str, InMemorySpanExporter]]:
    """A traced gateway whose provider (models ``gpt-*``) answers every chat with a 500 HTML page
    quoting the request: its system prompt, its ``user`` and ``metadata``."""
    async def page(request: web.Request) -> web.Response:
        body = (await request.read()).decode()
        return web.Response(status=500, content_type="text/html",
                            text=f"<html><head><title>failed on {body}</title></head></html>")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", page)
    provider = _Server(app)
    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies)
    settings = load_settings(write_config(tmp_path, None, policies, upstreams=[
        {"name": "standin", "base_url": f"http://127.0.0.1:{provider.port}/v1", "models": ["gpt-*"]}]))
    exporter = InMemorySpanExporter()
    server = _Server(build_app(settings, tracing=Tracing(settings, exporter)))
    try:
        yield f"http://127.0.0.1:{server.port}/v1", exporter
    finally:
        server.stop()
        provider.stop()


@pytest.mark.parametrize("model, code", [("gpt-x", "upstream_error_page"), (f"zz-{CANARY}", "model_not_found")])
def test_an_exception_leaving_a_span_exports_its_type_never_its_text(
        page_traced: tuple[str, InMemorySpanExporter], model: str, code: str) -> None:
    """An upstream's error page quoting the request's content, or a refusal quoting the client's
    model, fails its spans with status ERROR and ``error.type`` (the error's code) only: no
    exception event, message, stack trace or status description is exported."""
    import httpx

    base_url, exporter = page_traced
    resp = httpx.post(f"{base_url}/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {KEY}", "X-Session-Id": "s1"},
                      json={"model": model, "user": f"user-{CANARY}", "metadata": {"k": f"meta-{CANARY}"},
                            "messages": [{"role": "system", "content": f"system {CANARY}"},
                                         {"role": "user", "content": "hi"}]})
    assert resp.json()["error"]["code"] == code
    wait_for(lambda: any(s.name == "POST /v1/chat/completions" for s in exporter.get_finished_spans()))
    spans = exporter.get_finished_spans()
    failed = [s for s in spans if s.status.status_code.name == "ERROR"]
    assert "POST /v1/chat/completions" in {s.name for s in failed} and len(failed) >= 2  # a stage's span too
    for s in spans:
        assert not s.events and not s.status.description
        text = repr(dict(s.attributes)) + s.name
        assert CANARY not in text and "Traceback" not in text and "failed on" not in text
    for s in failed:
        assert s.attributes["error.type"] == code


def test_spans_carry_no_response_id(traced: tuple[str, InMemorySpanExporter, list[dict[str, str]]]) -> None:
    """The provider's response id (a provider-held response's continues its conversation) is no attribute."""
    base_url, exporter, _ = traced
    reply = _client(base_url, "ids").chat.completions.create(model="standin", messages=[{"role": "user",
                                                                                          "content": "hi"}])
    wait_for(lambda: any(s.name == "POST /v1/chat/completions" for s in exporter.get_finished_spans()))
    for s in exporter.get_finished_spans():
        assert "gen_ai.response.id" not in s.attributes and reply.id not in repr(dict(s.attributes))
