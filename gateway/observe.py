"""The outermost middleware: every answered request is counted, timed and logged, whatever route
it took and however it ended (refusals, unknown paths and errors included).

Logging: every request leaves one access line. The model routes log their own (``request``,
with tenant, session and outcome) and so do forwarded routes that reached the upstream
(``proxy``); a handler that did says so with ``mark_logged``. Every other request, refusals on
those routes before their own line included (an unknown key, a route not allowed), gets an
``access`` line here: method, route template, status, outcome, the refusal's ``code`` (set by
the error middleware with ``set_error_code``) and the time taken. Never the raw path or query,
which a client may fill with anything. Successful health checks and metric scrapes are not
logged.

A handler may name the request's outcome with ``set_outcome(request, "completed")`` (the chat
route does: completed, incomplete, upstream_error, erased_meanwhile, not_recorded); otherwise the outcome follows
the status: ``ok`` below 400, ``refused`` for 4xx, ``error`` for 5xx. The route label is the
router's template, never the raw path, so label sets stay bounded.

Model names: a request's ``model`` is client text (any printable string up to 256 characters),
so it is never written as sent, not to the audit trail (which outlives erasure), a log line or a
metric label. :func:`model_label` gives the name the gateway can vouch for instead.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from gateway.metrics import Metrics

METRICS = web.AppKey("metrics", Metrics)
_OUTCOME = web.RequestKey("outcome", str)
_LOGGED = web.RequestKey("logged", bool)
_CODE = web.RequestKey("error_code", str)
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
"""Routes whose successful requests leave no access line (probes and scrapes every few seconds)."""
log = structlog.get_logger("gateway.access")


UNLISTED = "unlisted"
"""The model name written for a model the gateway cannot vouch for."""
_REPORTED_MAX = 128


def model_label(requested: Any, upstream: Any = None, reply: Any = None) -> str:
    """The model name the audit trail, logs and metrics may hold for a request: *requested* when
    the upstream it went to names it exactly in its ``models`` (an entry without ``*``, ``?`` or
    ``[``); else the model the provider reported in its *reply* (a reply body's ``model``: the
    provider's words, not the client's) when it is a printable string of at most 128 characters;
    else :data:`UNLISTED`."""
    models = getattr(upstream, "models", ()) or ()
    if isinstance(requested, str) and requested in models and not any(c in requested for c in "*?["):
        return requested
    reported = reply.get("model") if isinstance(reply, dict) else None
    if isinstance(reported, str) and reported and len(reported) <= _REPORTED_MAX and reported.isprintable():
        return reported
    return UNLISTED


def set_outcome(request: web.Request, outcome: str) -> None:
    request[_OUTCOME] = outcome


def mark_logged(request: web.Request) -> None:
    """The handler logged this request's access line itself."""
    request[_LOGGED] = True


def set_error_code(request: web.Request, code: str) -> None:
    """The ``code`` of the refusal the client was sent (for its access line)."""
    request[_CODE] = code


def route_label(request: web.Request) -> str:
    """The matched route's template (``/v1/sessions/{session_id}``), or ``unmatched``."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.in_flight += 1
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        elapsed = time.perf_counter() - started
        outcome = request.get(_OUTCOME) or ("ok" if status < 400 else "refused" if status < 500 else "error")
        route = route_label(request)
        if metrics is not None:
            metrics.in_flight -= 1
            metrics.request(route, request.method, status, outcome, elapsed)
        if not request.get(_LOGGED) and (status >= 400 or route not in QUIET_ROUTES):
            log.info("access", method=request.method, route=route, status=status, outcome=outcome,
                     code=request.get(_CODE), latency_ms=round(elapsed * 1000, 3))
