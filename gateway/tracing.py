"""OpenTelemetry tracing, optional (``pip install 'sessiongate[otel]'``) and off unless configured.

One span per chat request (``POST /v1/chat/completions``, kind SERVER), a child per pipeline
stage (``stage authenticate`` …), and under ``forward`` the upstream call as a GenAI client span
(``chat {model}``, kind CLIENT) whose context travels to the provider in ``traceparent``.

Attributes follow OpenTelemetry's HTTP and GenAI semantic conventions (``http.request.method``,
``http.route``, ``http.response.status_code``, ``gen_ai.operation.name``, ``gen_ai.provider.name``
and its older spelling ``gen_ai.system``, ``gen_ai.request.model``, ``gen_ai.response.model``,
``gen_ai.response.finish_reasons``, ``gen_ai.usage.input_tokens``,
``gen_ai.usage.output_tokens``), plus ``sessiongate.tenant``, ``sessiongate.policy.id`` and
``sessiongate.outcome``. Contract: no span ever carries message content, a key, a token or a
session id; only the names and numbers listed here. An exception that leaves a span is never
recorded (no ``exception`` event, message or stack trace, no status description: an upstream's
error page or a refusal may quote the request): the span gets status ERROR and ``error.type``,
the gateway's error code (``upstream_error_page``, ``invalid_json`` …) or the exception's class
name (:func:`error_type`). The provider's response id is not an attribute (a provider-held
response id continues its conversation; a gateway-held chain's id is a handle on recorded
rounds, as a session id is).

Each app has its own ``TracerProvider`` (nothing global), so tests can export to memory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from gateway.errors import ConfigError, GatewayError
from gateway.observe import model_label

if TYPE_CHECKING:
    from gateway.context import Context
    from gateway.settings import Settings

INSTALL_HINT = "tracing is configured but OpenTelemetry is not installed: pip install 'sessiongate[otel]'"


def wanted(settings: Settings) -> bool:
    """True when tracing is configured here or through the standard environment variables."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(settings.tracing.endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


class Tracing:
    """Spans for one app. Build with :func:`from_settings`, or directly with an exporter (tests)."""

    def __init__(self, settings: Settings, exporter: Any = None) -> None:
        try:
            from opentelemetry.propagate import get_global_textmap
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        except ImportError as exc:
            raise ConfigError(INSTALL_HINT, file=settings.source, field="tracing") from exc
        cfg = settings.tracing
        attributes = {"service.name": cfg.service_name} if cfg.service_name else {}
        if not cfg.service_name and not os.environ.get("OTEL_SERVICE_NAME"):
            attributes["service.name"] = "sessiongate"
        sampler = ParentBased(TraceIdRatioBased(cfg.sample_ratio)) if cfg.sample_ratio is not None else None
        self.provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler)
        if exporter is None:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError as exc:
                raise ConfigError(INSTALL_HINT, file=settings.source, field="tracing") from exc
            exporter = OTLPSpanExporter(endpoint=cfg.endpoint) if cfg.endpoint else OTLPSpanExporter()
            self.provider.add_span_processor(BatchSpanProcessor(exporter))
        else:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("sessiongate")
        self._propagator = get_global_textmap()

    @contextlib.contextmanager
    def request(self, method: str, route: str) -> Iterator[Any]:
        """The request's SERVER span, current for everything the request does inside it."""
        from opentelemetry.trace import SpanKind

        with self._span(f"{method} {route}", kind=SpanKind.SERVER, attributes={
                "http.request.method": method, "http.route": route}) as span:
            yield span

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[Any]:
        with self._span(f"stage {name}") as span:
            yield span

    @contextlib.contextmanager
    def _span(self, name: str, **kwargs: Any) -> Iterator[Any]:
        """A current span that records no exception text: an exception leaving it sets status
        ERROR and ``error.type`` (:func:`error_type`) only. (OpenTelemetry's defaults would export
        ``str(exc)`` and the stack trace, as an event and as the status description.)"""
        from opentelemetry.trace import Status, StatusCode

        with self.tracer.start_as_current_span(name, record_exception=False, set_status_on_exception=False,
                                               **kwargs) as span:
            try:
                yield span
            except Exception as exc:
                span.set_attribute("error.type", error_type(exc))
                span.set_status(Status(StatusCode.ERROR))
                raise

    @contextlib.contextmanager
    def upstream_call(self, ctx: Context, headers: MutableMapping[str, str]) -> Iterator[Any]:
        """The GenAI CLIENT span of the call to the provider; writes ``traceparent`` into *headers*."""
        from opentelemetry.trace import SpanKind

        upstream = ctx.upstream
        model = model_label(ctx.model, upstream)  # never the client's free text (SPEC 3)
        with self._span(f"chat {model}" if model else "chat", kind=SpanKind.CLIENT, attributes=_drop_none({
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": "openai",
                "gen_ai.system": "openai",
                "gen_ai.request.model": model,
                "sessiongate.upstream": upstream.name if upstream else None,
        })) as span:
            self._propagator.inject(headers)
            yield span

    def shutdown(self) -> None:
        self.provider.shutdown()


def finish_request(span: Any, ctx: Context, status: int) -> None:
    """Attributes known once the request has ended: status, outcome, policy, model, usage."""
    policy = ctx.policy
    span.set_attributes(_drop_none({
        "http.response.status_code": status,
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": model_label(ctx.model, ctx.upstream, ctx.reply_body),
        "sessiongate.tenant": ctx.tenant or None,
        "sessiongate.policy.id": policy.id if policy else None,
        "sessiongate.outcome": ctx.outcome or None,
    }))
    finish_reply(span, ctx)
    if status >= 500:
        from opentelemetry.trace import Status, StatusCode
        span.set_attribute("error.type", str(status))  # an exception leaving the span names itself instead
        span.set_status(Status(StatusCode.ERROR))


def finish_reply(span: Any, ctx: Context) -> None:
    """The GenAI response attributes of the assembled reply (model, finish reasons, usage); never
    its id (see the module docstring)."""
    reply = ctx.reply_body if isinstance(ctx.reply_body, dict) else {}
    raw_usage = reply.get("usage")
    usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
    reasons = [c.get("finish_reason") for c in reply.get("choices") or [] if isinstance(c, dict)]
    span.set_attributes(_drop_none({
        "gen_ai.response.model": _safe(reply.get("model")),
        "gen_ai.response.finish_reasons": [r for r in reasons if isinstance(r, str)] or None,
        "gen_ai.usage.input_tokens": _count(usage.get("prompt_tokens")),
        "gen_ai.usage.output_tokens": _count(usage.get("completion_tokens")),
    }))
    if ctx.upstream_status:
        span.set_attribute("http.response.status_code", ctx.upstream_status)


def from_settings(settings: Settings) -> Tracing | None:
    """The app's tracing, or None when it is not configured (then tracing costs nothing)."""
    return Tracing(settings) if wanted(settings) else None


def error_type(exc: BaseException) -> str:
    """A span's ``error.type``: the gateway's error code, an HTTP refusal's status, or the class
    name of any other exception; never its message."""
    if isinstance(exc, GatewayError):
        return exc.code
    status = getattr(exc, "status", None)
    if isinstance(status, int) and type(exc).__module__.startswith("aiohttp."):
        return str(status)  # aiohttp's web.HTTPException (a 404, a 405)
    return f"{type(exc).__module__}.{type(exc).__qualname__}"


def _safe(value: Any) -> str | None:
    """A model or id as an attribute: a short printable string, else nothing."""
    if isinstance(value, str) and 0 < len(value) <= 256 and value.isprintable():
        return value
    return None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _drop_none(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if v is not None}
