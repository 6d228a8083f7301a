"""The outermost middleware: every answered request is counted and timed, whatever route it took
and however it ended (refusals, unknown paths and errors included).

A handler may name the request's outcome with ``set_outcome(request, "completed")`` (the chat
route does: completed, incomplete, upstream_error, not_recorded); otherwise the outcome follows
the status: ``ok`` below 400, ``refused`` for 4xx, ``error`` for 5xx. The route label is the
router's template, never the raw path, so label sets stay bounded.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.metrics import Metrics

METRICS = web.AppKey("metrics", Metrics)
_OUTCOME = web.RequestKey("outcome", str)


def set_outcome(request: web.Request, outcome: str) -> None:
    request[_OUTCOME] = outcome


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
        if metrics is not None:
            metrics.in_flight -= 1
            outcome = request.get(_OUTCOME) or ("ok" if status < 400 else "refused" if status < 500 else "error")
            metrics.request(route_label(request), request.method, status, outcome, time.perf_counter() - started)
