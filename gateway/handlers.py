"""HTTP handlers: each turns a request into a pipeline run or a call on a service.

Handlers hold no policy, crypto or storage logic; they authenticate, validate path parameters
and shape responses. Errors are raised, never rendered here: ``app.error_middleware`` renders
every ``GatewayError`` in OpenAI's shape. One exception: once a chat stream has begun no second
response can be sent, so an error then ends the stream with an SSE event carrying that shape
(and no ``[DONE]``).
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import io
import os
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import structlog
from aiohttp import web

from gateway import pipeline
from gateway.context import Context, Services
from gateway.errors import BadRequest, GatewayError, NotFound
from gateway.export import FORMATS, bundle_paths
from gateway.session.bounding import maintain, needs_maintenance
from gateway.session.history import HISTORY_OPS, HistoryResult, change_history, needs_hooks, parse_messages, write_memo
from gateway.session.model import over_limit
from gateway.stages.forward import reply_headers
from gateway.stages.load_state import HOOK_WAIT_SECONDS
from gateway.stages.parse_request import parse_json_object, read_limited
from gateway.stages.resolve_session import check_session_id
from gateway.store.base import Changes

SERVICES = web.AppKey("services", Services)
log = structlog.get_logger("gateway.access")


def parse_time(value: str) -> float:
    """An ISO 8601 time (UTC when no zone is given) or a Unix timestamp, as a timestamp."""
    try:
        return float(value)
    except ValueError:
        pass
    moment = datetime.datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def new_request_id() -> str:
    return os.urandom(8).hex()


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    ctx = Context(request, services, new_request_id())
    status = 500
    try:
        await pipeline.run(ctx)
        assert ctx.response is not None
        status = ctx.response.status
        return ctx.response
    except GatewayError as exc:
        status = exc.status
        if exc.status >= 500 and exc.status != 500:
            services.metrics.upstream_errors.labels(kind=exc.code).inc()
        if _stream_started(ctx):
            return await _end_stream(ctx, exc.to_body())
        raise
    except Exception:
        if not _stream_started(ctx):
            raise
        log.exception("unhandled_error", path=request.path, request_id=ctx.request_id)
        return await _end_stream(ctx, INTERNAL_ERROR)
    finally:
        elapsed = time.perf_counter() - ctx.started
        if ctx.ended_by == "upstream":
            services.metrics.upstream_errors.labels(kind="broke_off_stream").inc()
        elif ctx.upstream_status >= 400:
            services.metrics.upstream_errors.labels(kind=f"status_{ctx.upstream_status}").inc()
        services.metrics.requests.labels(route="chat", status=str(status)).inc()
        services.metrics.chat_latency.observe(elapsed)
        outcome = "not_recorded" if ctx.persist_attempted and not ctx.persisted else ctx.outcome or None
        log.info("request", request_id=ctx.request_id, tenant=ctx.tenant or None, session_id=ctx.session_id,
                 model=ctx.model, status=status, outcome=outcome, ended_by=ctx.ended_by or None,
                 latency_ms=round(elapsed * 1000, 3), bytes_in=len(ctx.raw),
                 bytes_out=ctx.bytes_out or len(ctx.tail), policy=ctx.policy.id if ctx.policy else None)


INTERNAL_ERROR = {"error": {"message": "the gateway hit an internal error; it has been logged",
                             "type": "server_error", "code": "internal_error"}}


def _stream_started(ctx: Context) -> bool:
    return ctx.response is not None and ctx.response.prepared


async def _end_stream(ctx: Context, error: dict[str, dict[str, str]]) -> web.StreamResponse:
    """End a stream that already began with an SSE error event instead of ``[DONE]``."""
    out = ctx.response
    assert out is not None
    try:
        await out.write(b"data: " + orjson.dumps(error) + b"\n\n")
        await out.write_eof()
    except (ConnectionResetError, OSError):
        pass  # the client is gone; nothing more can reach it
    return out


async def proxy(request: web.Request) -> web.StreamResponse:
    """Any other ``/v1/*`` route: forwarded as it is, with the upstream's key, and audited."""
    services = request.app[SERVICES]
    principal = services.auth.client(request.headers.get("Authorization"))
    refuse_session_paths(request)
    request_id = new_request_id()
    body = await read_limited(request, services.settings.server.max_body_bytes) if request.can_read_body else None
    model = None
    if body and request.content_type == "application/json":
        try:
            parsed = orjson.loads(body)
            model = parsed.get("model") if isinstance(parsed, dict) else None
        except orjson.JSONDecodeError:
            model = None
    upstream = services.upstreams.route(model if isinstance(model, str) else None)
    resp = await services.upstreams.send(upstream, request.method, request.path[len("/v1"):], body=body,
                                         headers=request.headers, query=request.query_string)
    outcome = "incomplete"
    try:
        out = web.StreamResponse(status=resp.status, headers=reply_headers(resp, request_id))
        out.content_type = resp.content_type
        await out.prepare(request)
        async for chunk in resp.content.iter_any():
            await out.write(chunk)
        outcome = "completed" if resp.status < 400 else "upstream_error"
    finally:
        resp.release()
        # audited before the client sees the end of the reply, also when it was cut off
        await asyncio.shield(services.sessions.store.transact(principal.tenant or "", None, lambda cur: _audit_only({
            "event": "proxy", "request_id": request_id, "route": request.path, "model": model,
            "outcome": outcome, "upstream_status": resp.status})))
    await out.write_eof()
    services.metrics.requests.labels(route="proxy", status=str(resp.status)).inc()
    return out


def refuse_session_paths(request: web.Request) -> None:
    """A ``/v1/sessions`` path that no session route took never goes upstream (it would carry a
    session document or id to the provider): an id with ``/`` gets 400, a wrong method 405."""
    path = request.path
    if path == "/v1/sessions":
        raise web.HTTPMethodNotAllowed(request.method, ["GET"])
    if not path.startswith("/v1/sessions/"):
        return
    rest = path[len("/v1/sessions/"):]
    for suffix, methods in SESSION_SUBROUTES.items():
        if rest.endswith(suffix):
            check_session_id(rest.removesuffix(suffix))
            raise web.HTTPMethodNotAllowed(request.method, methods)
    check_session_id(rest)
    raise web.HTTPMethodNotAllowed(request.method, ["GET", "PUT", "DELETE"])


SESSION_SUBROUTES = {"/reset": ["POST"], "/history": ["POST"], "/clean_context_window": ["POST"],
                     "/memo": ["GET", "PUT"]}
"""The routes under ``/v1/sessions/{id}`` and their methods (anything else there is refused)."""


def _audit_only(fields: dict[str, object]) -> Changes:
    return Changes(audit=[fields])


# --- sessions over HTTP ------------------------------------------------------------------

def _session_target(request: web.Request) -> tuple[Services, str, str]:
    services = request.app[SERVICES]
    principal = services.auth.client(request.headers.get("Authorization"))
    return services, principal.tenant or "", check_session_id(request.match_info["session_id"])


async def list_sessions(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    tenant = services.auth.client(request.headers.get("Authorization")).tenant or ""
    rows = await services.sessions.list_sessions(tenant)
    return json_response({"object": "list", "data": [
        {"id": r.session_id, "rounds": r.rounds, "version": r.version, "created_at": r.created_at,
         "updated_at": r.updated_at} for r in rows]})


async def export_session(request: web.Request) -> web.Response:
    services, tenant, sid = _session_target(request)
    return json_response(await services.sessions.export(tenant, sid))


async def import_session(request: web.Request) -> web.Response:
    services, tenant, sid = _session_target(request)
    data = parse_json_object(await read_limited(request, services.settings.server.max_body_bytes))
    added = await services.sessions.import_agently(tenant, sid, data, new_request_id())
    return json_response({"id": sid, "imported_messages": added})


async def reset_session(request: web.Request) -> web.Response:
    """Agently's ``reset_chat_history``: the window is emptied (memo and recorded history stay)."""
    result = await _edit_history(request, "reset", None)
    return json_response({"id": result["id"], "reset": True})


async def clean_context_window(request: web.Request) -> web.Response:
    """Agently's ``clean_context_window``: the window is emptied (memo and recorded history stay)."""
    return json_response(await _edit_history(request, "clean_context_window", None))


async def session_history(request: web.Request) -> web.Response:
    """``{"op": "add" | "set", "messages": [...], "model": optional}``: Agently's
    ``add_chat_history`` / ``set_chat_history`` (see ``gateway.session.history``)."""
    services = request.app[SERVICES]
    body = parse_json_object(await read_limited(request, services.settings.server.max_body_bytes))
    op = body.get("op")
    if op not in HISTORY_OPS:
        raise BadRequest(f"'op' must be one of {', '.join(HISTORY_OPS)}")
    return json_response(await _edit_history(request, op, body))


async def _edit_history(request: web.Request, op: str, body: dict[str, Any] | None) -> dict[str, Any]:
    services, tenant, sid = _session_target(request)
    model = _model_param(request, body)
    policy = services.policies.current.match(tenant, model, sid)
    messages = parse_messages(body.get("messages")) if body is not None else []
    result = await change_history(services.sessions, policy, tenant, sid, op, messages, new_request_id())
    out = result.to_dict(sid)
    if needs_maintenance(policy) and (needs_hooks(policy, result.state) or over_limit(result.state,
                                                                                     policy.session.max_length)):
        key = (tenant, sid)
        services.background.start(key, functools.partial(
            maintain, services.sessions, tenant, sid, policy, services.upstreams.complete, model))
        if policy.session.bounding.strategy == "hook" and await services.background.settled(key, HOOK_WAIT_SECONDS):
            loaded = await services.sessions.load(tenant, sid)
            if loaded is not None:
                out = HistoryResult(op, result.recorded, loaded.state).to_dict(sid)
    return out


def _model_param(request: web.Request, body: dict[str, Any] | None) -> str | None:
    """The model a session route's policy is matched with: ``model`` in the body, else ``?model=``."""
    model = body.get("model") if body is not None else None
    model = model if model is not None else request.query.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string")
    return model


async def get_memo(request: web.Request) -> web.Response:
    """The session's memo: ``{"id", "memo"}`` (404 for an unknown session)."""
    services, tenant, sid = _session_target(request)
    loaded = await services.sessions.load(tenant, sid)
    if loaded is None:
        raise NotFound(f"no session '{sid}' for this tenant")
    return json_response({"id": sid, "memo": loaded.state.memo})


async def put_memo(request: web.Request) -> web.Response:
    """``{"memo": ..., "model": optional}``: replace the memo (creates the session)."""
    services, tenant, sid = _session_target(request)
    body = parse_json_object(await read_limited(request, services.settings.server.max_body_bytes))
    if "memo" not in body:
        raise BadRequest("the body must hold 'memo' (a string, an object, a list or null)")
    policy = services.policies.current.match(tenant, _model_param(request, body), sid)
    await write_memo(services.sessions, policy, tenant, sid, body["memo"], new_request_id())
    return json_response({"id": sid, "memo": body["memo"]})


async def delete_session(request: web.Request) -> web.Response:
    services, tenant, sid = _session_target(request)
    await services.sessions.erase(tenant, sid, new_request_id())
    return json_response({"id": sid, "deleted": True})


# --- auditors ---------------------------------------------------------------------------

def _time_param(request: web.Request, name: str) -> float | None:
    value = request.query.get(name)
    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError:
        raise BadRequest(f"'{name}' must be an ISO 8601 time or a Unix timestamp, not {value[:40]!r}") from None


def _tenant_param(request: web.Request) -> str:
    tenant = request.query.get("tenant")
    if not tenant:
        raise BadRequest("the 'tenant' query parameter is required")
    return tenant


async def admin_public_key(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    services.auth.auditor(request.headers.get("Authorization"))
    return web.Response(body=services.audit.signer.public_key_pem(), content_type="application/x-pem-file")


async def admin_verify(request: web.Request) -> web.Response:
    """Verify one tenant's chain (``?tenant=``) against the checkpoints kept outside the database."""
    services = request.app[SERVICES]
    services.auth.auditor(request.headers.get("Authorization"))
    report = await services.audit.verify(services.sessions.store, _tenant_param(request))
    return json_response(report.to_dict(), status=200)


async def admin_export(request: web.Request) -> web.StreamResponse:
    """A redacted, verifiable export bundle as a tar stream (records, manifest, audit entries).

    Query: ``tenant`` (required), ``session``, ``since``, ``until``, ``format`` (jsonl|csv|agently).
    """
    services = request.app[SERVICES]
    auditor = services.auth.auditor(request.headers.get("Authorization"))
    tenant = _tenant_param(request)
    fmt = request.query.get("format", "jsonl")
    if fmt not in FORMATS:
        raise BadRequest(f"'format' must be one of {', '.join(FORMATS)}")
    sid = request.query.get("session")
    since, until = _time_param(request, "since"), _time_param(request, "until")
    with tempfile.TemporaryDirectory(prefix="sessiongate-export-") as tmp:
        out = Path(tmp) / f"{tenant}-export.{ 'csv' if fmt == 'csv' else 'jsonl'}"
        await services.audit.export(services.sessions, services.policies.current, out, tenant=tenant, fmt=fmt,
                                    session_id=check_session_id(sid) if sid else None, since=since, until=until)
        log.info("export", auditor=auditor.name, tenant=tenant, session_id=sid, format=fmt)
        resp = web.StreamResponse(headers={
            "Content-Type": "application/x-tar",
            "Content-Disposition": f'attachment; filename="{out.name}.tar"'})
        await resp.prepare(request)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w|") as tar:
            for path in bundle_paths(out):
                tar.add(path, arcname=path.name)
                await resp.write(buffer.getvalue())
                buffer.seek(0)
                buffer.truncate()
        await resp.write(buffer.getvalue())
        await resp.write_eof()
        return resp


# --- health ----------------------------------------------------------------------------

async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    try:
        await services.sessions.store.tenants()
    except GatewayError as exc:
        return json_response({"status": "unavailable", "reason": exc.message}, status=503)
    return json_response({"status": "ready", "policies": len(services.policies.current.policies)})


async def metrics(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    return web.Response(body=services.metrics.render(), headers={"Content-Type": services.metrics.content_type})
