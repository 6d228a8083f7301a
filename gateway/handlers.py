"""HTTP handlers: each turns a request into a pipeline run or a call on a service.

Handlers hold no policy, crypto or storage logic; they authenticate, validate path parameters
and shape responses. Errors are raised, never rendered here: ``app.error_middleware`` renders
every ``GatewayError`` in the route protocol's shape. One exception: once a stream has begun no
second response can be sent, so an error then ends the stream with the codec's SSE error event
(and no final event); a JSON body already being relayed (a reply over the recorded-reply cap) is
ended by closing the connection instead. Forwarded ``/v1/*`` routes live in ``gateway.proxy``.
"""

from __future__ import annotations

import datetime
import functools
import io
import os
import re
import tarfile
import time
from collections.abc import Mapping
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.web_exceptions import HTTPException
from aiohttp.web_protocol import RequestPayloadError

from gateway import jsonbody, offload, pipeline
from gateway.auth import Principal, auth_header
from gateway.codecs import Codec
from gateway.codecs.chat import CHAT
from gateway.codecs.messages import MESSAGES
from gateway.codecs.responses import RESPONSES, chain_of, to_items
from gateway.context import Context, Services
from gateway.errors import (
    BadRequest,
    EvidenceRefused,
    GatewayError,
    IntegrityError,
    NotFound,
    StoreUnavailable,
    UpstreamError,
)
from gateway.export import FORMATS, PrivateFolder, bundle_paths
from gateway.logs import exception_fields
from gateway.observe import mark_logged, model_label, route_label, set_outcome
from gateway.policy import Policy
from gateway.proxy import forward_route
from gateway.session.bounding import maintain, needs_maintenance
from gateway.session.history import (
    CLEAR_OPS,
    HISTORY_OPS,
    HistoryResult,
    change_history,
    needs_hooks,
    parse_messages,
    write_memo,
)
from gateway.session.importing import session_policy
from gateway.session.lenient_json import parse_session_document
from gateway.session.model import memo_limit_message, memo_over_limit, memo_text, over_limit
from gateway.settings import TENANT_PATTERN
from gateway.stages.load_state import HOOK_WAIT_SECONDS
from gateway.stages.parse_request import THREAD_ABOVE_BYTES, check_model, parse_json_object, read_limited
from gateway.stages.resolve_session import check_not_a_key, check_session_id
from gateway.stages.respond import end_connection
from gateway.store.base import RoundRow, provider_id_digest
from gateway.tracing import finish_request

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


REQUEST_ID = web.RequestKey("request_id", str)
"""A model or forwarded request's id, for the error middleware: every response to such a request
carries it as ``X-Sessiongate-Request-Id``, a refusal too, so a client can find the audit entry."""


def request_id_of(request: web.Request) -> str:
    """A new request id, kept on *request* (:data:`REQUEST_ID`)."""
    request[REQUEST_ID] = request_id = os.urandom(8).hex()
    return request_id


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _model_route(request, CHAT)


async def responses_create(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses``: the same pipeline with the Responses codec."""
    return await _model_route(request, RESPONSES)


async def messages_create(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages``: the same pipeline with the Messages (Anthropic) codec."""
    return await _model_route(request, MESSAGES)


async def _model_route(request: web.Request, codec: Codec) -> web.StreamResponse:
    tracing = request.app[SERVICES].tracing
    if tracing is None:
        return await _chat(request, None, codec)
    with tracing.request(request.method, request.path) as span:
        return await _chat(request, span, codec)


async def _chat(request: web.Request, span: Any, codec: Codec = CHAT) -> web.StreamResponse:
    services = request.app[SERVICES]
    ctx = Context(request, services, request_id_of(request), codec=codec)
    status = 500
    try:
        await pipeline.run(ctx)
        if ctx.response is None:  # the client left before its reply came: nobody to answer (nginx's 499)
            status = CLIENT_CLOSED
            return web.Response(status=CLIENT_CLOSED)
        status = ctx.response.status
        return ctx.response
    except GatewayError as exc:
        status = exc.status
        answered = isinstance(exc, UpstreamError) and exc.upstream_status is not None  # counted by status below
        if exc.status >= 500 and exc.status != 500 and not answered:
            services.metrics.upstream_errors.labels(kind=exc.code).inc()
        if _stream_started(ctx):
            if isinstance(exc, StoreUnavailable):  # its cause is for the operator: logged, not streamed
                log.error("store_unavailable", route=route_label(request), request_id=ctx.request_id,
                          detail=exc.message)
            return await _end_stream(ctx, exc.to_body())
        raise
    except Exception as exc:
        if not _stream_started(ctx):
            if isinstance(exc, RequestPayloadError | HTTPException):  # the error middleware answers: 400, 413
                status = exc.status if isinstance(exc, HTTPException) else 400
            raise
        log.error("unhandled_error", route=route_label(request), request_id=ctx.request_id, **exception_fields(exc))
        return await _end_stream(ctx, INTERNAL_ERROR)
    finally:
        elapsed = time.perf_counter() - ctx.started
        if ctx.ended_by == "upstream":
            services.metrics.upstream_errors.labels(kind="broke_off_stream").inc()
        elif ctx.upstream_status >= 400:
            services.metrics.upstream_errors.labels(kind=f"status_{ctx.upstream_status}").inc()
        outcome = "not_recorded" if ctx.persist_attempted and not ctx.persisted else ctx.outcome or None
        if outcome:
            set_outcome(request, outcome)
        if span is not None:
            finish_request(span, ctx, status)
        if ctx.first_byte_at:
            services.metrics.first_byte.observe(ctx.first_byte_at - ctx.started)
        if ctx.reply_body is not None:
            services.metrics.usage(ctx.tenant, model_label(ctx.model, ctx.upstream, ctx.reply_body),
                                   ctx.reply_body.get("usage"))
        mark_logged(request)
        log.info("request", request_id=ctx.request_id, tenant=ctx.tenant or None, session_id=ctx.session_id,
                 model=model_label(ctx.model, ctx.upstream, ctx.reply_body), status=status, outcome=outcome,
                 ended_by=ctx.ended_by or None,
                 latency_ms=round(elapsed * 1000, 3), bytes_in=len(ctx.raw),
                 bytes_out=ctx.reply_bytes, policy=ctx.policy.id if ctx.policy else None)


CLIENT_CLOSED = 499
"""The status logged for a request whose client hung up before its reply (never sent)."""

INTERNAL_ERROR = {"error": {"message": "the gateway hit an internal error; it has been logged",
                             "type": "server_error", "code": "internal_error"}}


def _stream_started(ctx: Context) -> bool:
    return ctx.response is not None and ctx.response.prepared


async def _end_stream(ctx: Context, error: dict[str, dict[str, str]]) -> web.StreamResponse:
    """End a stream that already began with an SSE error event instead of ``[DONE]``, or by
    closing the connection when no event can go in: a JSON body relayed early, or a stream whose
    client holds an unended event (``event_open``; its decoder drops that event at the close)."""
    out = ctx.response
    assert out is not None
    if out.content_type != "text/event-stream" or ctx.event_open:
        end_connection(ctx.request, out)
        return out
    try:
        await out.write(ctx.codec.stream_error(error, ctx.stream_seq))
        await out.write_eof()
    except (ConnectionResetError, OSError):
        pass  # the client is gone; nothing more can reach it
    return out


async def proxy(request: web.Request) -> web.StreamResponse:
    """Any other ``/v1/*`` route: validated, allowed per upstream, forwarded and audited
    (``gateway.proxy`` holds the contract)."""
    return await forward_route(request, request.app[SERVICES], request_id_of(request))


# --- Responses held by the gateway ----------------------------------------------------------

def _response_target(request: web.Request) -> tuple[Services, str, str, str] | None:
    """The caller's tenant and the chain session and round a gateway-minted response id names;
    None for any other id (a provider's: forwarded like any ``/v1/*`` route, under the upstream's
    ``forward_routes``)."""
    services = request.app[SERVICES]
    tenant = services.auth.client(auth_header(request.headers)).tenant or ""
    chain = chain_of(request.match_info["response_id"])
    if chain is None:
        return None
    return services, tenant, chain[0], chain[1]


async def _provider_response(request: web.Request) -> web.StreamResponse:
    """A response id the gateway did not mint: forwarded when the provider holds responses
    (``responses_state: provider``) or the operator lets them be read (``forward_routes``);
    otherwise 404 saying where such a response is. Under provider-held state an id that did not
    pass through the gateway for the caller's tenant (``provider_responses``) is 404 before
    anything is forwarded, as an unknown gateway-held id is. The
    gateway sends ``store: false`` upstream under gateway-held state, so a response made through
    it with ``X-Session-Id`` is in that session's record and nowhere at the provider."""
    services = request.app[SERVICES]
    up = services.upstreams.route(None, "openai", any_upstream=True)
    if up.responses_state == "provider":  # one namespace at the provider for every tenant: the caller's ids only
        tenant = services.auth.client(auth_header(request.headers)).tenant or ""
        digest = provider_id_digest(request.match_info["response_id"])
        if not await services.sessions.store.holds_provider_response(tenant, digest):
            raise _no_response(request)
    if up.responses_state == "provider" or up.allows(("responses", request.match_info["response_id"])):
        return await proxy(request)
    raise NotFound("no response with this id is held by the gateway. A response made with X-Session-Id is "
                   "recorded in that session: read it with GET /v1/sessions/{session id}; the provider keeps "
                   "none of those (the gateway asks it to store nothing). A response the provider holds for "
                   "another client of its account is read through the gateway only if the operator adds "
                   "'responses' to the upstream's forward_routes", code="response_not_found")


def _no_response(request: web.Request) -> NotFound:
    return NotFound("no response with this id for this tenant", code="response_not_found")


async def _held_round(request: web.Request, services: Services, tenant: str, sid: str,
                      round_id: str) -> tuple[RoundRow, list[dict[str, Any]]]:
    """The round a gateway-held response id names, opened; 404 when this tenant has none."""
    for row, messages in await services.sessions.session_rounds(tenant, sid):
        if row.request_id == round_id:
            return row, messages
    raise _no_response(request)


async def get_response(request: web.Request) -> web.StreamResponse:
    """``GET /v1/responses/{id}``: a response of a gateway-held chain, as recorded (the policy's
    whitelist applies: what was not recorded is not there); 404 when this tenant has none.
    ``?stream=true`` (the SDK's ``retrieve(id, stream=True)``, which resumes a background
    response's stream) is 400 ``stream_not_supported``: the gateway holds no background response
    and keeps no events, and JSON in its place would read as an empty stream."""
    target = _response_target(request)
    if target is None:
        return await _provider_response(request)
    services, tenant, sid, round_id = target
    row, messages = await _held_round(request, services, tenant, sid, round_id)
    if request.query.get("stream", "").lower() in ("true", "1"):  # the SDK sends "true"; "false", "0": JSON
        raise BadRequest("streaming a stored response is not supported: the gateway keeps a response as recorded, "
                         "not its events (only background responses, which the gateway does not hold, can be "
                         "streamed again). Retrieve it without stream", code="stream_not_supported")
    output = [_output_item(item, f"{row.request_id}_{n}") for n, item in
              enumerate(to_items([m for m in messages if m.get("role") == "assistant"]))]
    return json_response({"id": request.match_info["response_id"], "object": "response",
                          "created_at": int(row.created_at), "status": RESPONSE_STATUS.get(row.outcome, "incomplete"),
                          "output": output, "store": True, "metadata": {"session_id": sid}})


async def list_input_items(request: web.Request) -> web.StreamResponse:
    """``GET /v1/responses/{id}/input_items``: the input a gateway-held response was made from
    (the round's new input, as recorded: what the policy did not record is not there), as a list
    page with OpenAI's ``order`` (``desc`` by default), ``limit`` (1–100, default 20) and
    ``after`` (an item id of the previous page); 404 when this tenant has no such response."""
    target = _response_target(request)
    if target is None:
        return await _provider_response(request)
    services, tenant, sid, round_id = target
    order, after = request.query.get("order", "desc"), request.query.get("after")
    if order not in ("asc", "desc"):
        raise BadRequest("order must be 'asc' or 'desc'", code="invalid_order")
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise BadRequest("limit must be a whole number from 1 to 100", code="invalid_limit")
    row, messages = await _held_round(request, services, tenant, sid, round_id)
    items = [_listed_item(item, f"{row.request_id}_{n}")
             for n, item in enumerate(to_items([m for m in messages if m.get("role") != "assistant"]))]
    if order == "desc":
        items.reverse()
    start = 0
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise BadRequest("after must be the id of an item of this response's input, as listed",
                             code="invalid_after")
        start = ids.index(after) + 1
    page = items[start:start + limit]
    return json_response({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                          "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(items)})


RESPONSE_STATUS = {"completed": "completed", "upstream_error": "failed"}
"""A recorded round's outcome as a response's ``status`` (any other outcome: ``incomplete``)."""


def _output_item(item: dict[str, Any], suffix: str) -> dict[str, Any]:
    """A recorded reply item as a response's output item: the text as an ``output_text`` message,
    a tool call as its ``function_call`` / ``custom_tool_call`` item."""
    if "role" not in item:
        return {"id": f"fc_{suffix}", **item, "status": "completed"}
    content = item.get("content")
    parts = content if isinstance(content, list) else [{"type": "output_text", "text": content or ""}]
    return {"type": "message", "id": f"msg_{suffix}", "status": "completed", "role": "assistant",
            "content": [{**p, "annotations": []} if isinstance(p, dict) and p.get("type") == "output_text" else p
                        for p in parts]}


def _listed_item(item: dict[str, Any], suffix: str) -> dict[str, Any]:
    """An input item as OpenAI lists one: with an id, a message's text as ``input_text`` parts."""
    if "role" not in item:
        return {"id": f"item_{suffix}", **item}
    content = item.get("content")
    if isinstance(content, str):
        content = [{"type": "input_text", "text": content}]
    return {"id": f"msg_{suffix}", "type": "message", "role": item["role"], "content": content, "status": "completed"}


async def cancel_response(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses/{id}/cancel``: only background responses can be cancelled, and the
    gateway holds none (``background`` is refused on recorded sessions): 400 for a response of
    this tenant's chains, 404 for any other gateway-minted id."""
    target = _response_target(request)
    if target is None:
        return await _provider_response(request)
    services, tenant, sid, round_id = target
    if await _holds_round(services, tenant, sid, round_id):
        raise BadRequest("only background responses can be cancelled, and a response the gateway holds is "
                         "never one: it has finished", code="response_not_cancellable")
    raise _no_response(request)


async def _holds_round(services: Services, tenant: str, sid: str, round_id: str) -> bool:
    """Whether the tenant's chain session *sid* has the round a gateway-minted id names (rows only,
    nothing opened)."""
    async for row in services.sessions.store.iter_rounds(tenant, sid):
        if row.request_id == round_id:
            return True
    return False


async def delete_response(request: web.Request) -> web.StreamResponse:
    """``DELETE /v1/responses/{id}``: erases the chain the response belongs to (its session): the
    gateway keeps a chain as one session, so one response cannot outlive the others."""
    target = _response_target(request)
    if target is None:
        return await _provider_response(request)
    services, tenant, sid, round_id = target
    if await services.sessions.load(tenant, sid) is None or not await _holds_round(services, tenant, sid, round_id):
        raise _no_response(request)  # an id the chain never minted erases nothing, as GET finds nothing
    purged = await services.sessions.erase(tenant, sid, new_request_id())
    return json_response({"id": request.match_info["response_id"], "object": "response.deleted", "deleted": True,
                          "session_id": sid, "purge": "complete" if purged else "pending"})


# --- sessions over HTTP ------------------------------------------------------------------

async def _parse_session_body(raw: bytes, tenant: str) -> dict[str, Any]:
    """A session route's JSON object (``parse_json_object``), read again exactly when it may hold
    an integer beyond 64 bits (``jsonbody.widened``), so such a number is refused where it cannot
    be stored rather than changed into a float. A body over ``THREAD_ABOVE_BYTES`` is read on the
    offload pool, as a model route's is: the reads and the look take a few MB a few tenths of a second."""
    if len(raw) > THREAD_ABOVE_BYTES:
        return await offload.run(tenant, _read_session_body, raw)
    return _read_session_body(raw)


def _read_session_body(raw: bytes) -> dict[str, Any]:
    body = parse_json_object(raw)
    return parse_json_object(raw, exact=True) if jsonbody.widened(orjson.dumps(body)) else body


def _session_target(request: web.Request) -> tuple[Services, str, str]:
    services = request.app[SERVICES]
    principal = services.auth.client(auth_header(request.headers))
    sid = check_not_a_key(services.auth, check_session_id(request.match_info["session_id"]))
    return services, principal.tenant or "", sid


SESSIONS_PAGE_DEFAULT, SESSIONS_PAGE_MAX = 100, 1000


def page_params(query: Mapping[str, str]) -> tuple[str | None, int]:
    """``after`` and ``limit`` of a list request (OpenAI's list convention); ``BadRequest`` naming
    the parameter when either is unusable."""
    raw = query.get("limit", str(SESSIONS_PAGE_DEFAULT))
    if not raw.isdigit() or not 1 <= int(raw) <= SESSIONS_PAGE_MAX:
        raise BadRequest(f"'limit' must be a whole number from 1 to {SESSIONS_PAGE_MAX}", code="invalid_limit")
    after = query.get("after")
    return (check_session_id(after) if after else None), int(raw)


async def list_sessions(request: web.Request) -> web.Response:
    """One page of the caller's sessions in id order: ``?limit=`` (default 100, at most 1000) and
    ``?after=<last id of the previous page>``; ``has_more`` says whether another page follows."""
    services = request.app[SERVICES]
    tenant = services.auth.client(auth_header(request.headers)).tenant or ""
    after, limit = page_params(request.query)
    rows = await services.sessions.page_sessions(tenant, after=after, limit=limit + 1)
    page = rows[:limit]
    return json_response({
        "object": "list",
        "data": [{"id": r.session_id, "rounds": r.rounds, "version": r.version, "created_at": r.created_at,
                  "updated_at": r.updated_at} for r in page],
        "first_id": page[0].session_id if page else None,
        "last_id": page[-1].session_id if page else None,
        "has_more": len(rows) > limit})


async def export_session(request: web.Request) -> web.Response:
    services, tenant, sid = _session_target(request)
    return json_response(await services.sessions.export(tenant, sid))


async def import_session(request: web.Request) -> web.Response:
    """Agently JSON (or JSON5) in, held to the session's policy at import time, matched with the
    document's ``model`` or ``?model=`` (``session.importing.session_policy``)."""
    services, tenant, sid = _session_target(request)
    raw = await read_limited(request, services.settings.server.max_body_bytes, tenant)
    data = await offload.run(tenant, parse_session_document, raw)  # JSON or JSON5, as Agently loads
    policy = _session_policy(request, data, tenant, sid)
    added = await services.sessions.import_agently(tenant, sid, data, new_request_id(), policy)
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
    services, tenant, _ = _session_target(request)
    body = await _parse_session_body(await read_limited(request, services.settings.server.max_body_bytes, tenant),
                                      tenant)
    op = body.get("op")
    if op not in HISTORY_OPS:
        raise BadRequest(f"'op' must be one of {', '.join(HISTORY_OPS)}")
    return json_response(await _edit_history(request, op, body))


async def _edit_history(request: web.Request, op: str, body: dict[str, Any] | None) -> dict[str, Any]:
    services, tenant, sid = _session_target(request)
    model = _model_param(request, body)
    policy = services.policies.current.match(tenant, model, sid) if op in CLEAR_OPS else \
        _session_policy(request, body, tenant, sid)  # what writes messages is held to the rounds' policy
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
    """The model a session route's policy is matched with: ``model`` in the body, or ``?model=``
    (400 when both are given and differ), held to the rule for a request's ``model``."""
    in_body = body.get("model") if body is not None else None
    check_model(in_body)
    in_query = request.query.get("model")
    check_model(in_query)
    if in_body is not None and in_query is not None and in_body != in_query:
        raise BadRequest("'model' in the body and '?model=' name different models: pass one")
    return in_body if in_body is not None else in_query


def _session_policy(request: web.Request, body: dict[str, Any] | None, tenant: str, sid: str) -> Policy:
    """The policy a session write is held to; 400 ``model_required`` when it depends on a model
    the request does not name, ``model_not_found`` when it names one no upstream serves
    (``session.importing.session_policy``)."""
    services = request.app[SERVICES]
    return session_policy(services.policies.current, tenant, _model_param(request, body), sid,
                          upstreams=services.upstreams, pass_model="'?model=' or \"model\" in the body")


async def get_memo(request: web.Request) -> web.Response:
    """The session's memo: ``{"id", "memo"}`` (404 for an unknown session)."""
    services, tenant, sid = _session_target(request)
    loaded = await services.sessions.load(tenant, sid)
    if loaded is None:
        raise NotFound("no session with this id for this tenant")
    return json_response({"id": sid, "memo": loaded.state.memo})


async def put_memo(request: web.Request) -> web.Response:
    """``{"memo": ..., "model": optional}``: replace the memo (creates the session)."""
    services, tenant, sid = _session_target(request)
    body = await _parse_session_body(await read_limited(request, services.settings.server.max_body_bytes, tenant),
                                      tenant)
    if "memo" not in body:
        raise BadRequest("the body must hold 'memo' (a string, an object, a list or null)")
    size = memo_over_limit(body["memo"])
    if size is not None:
        raise BadRequest(memo_limit_message(size), code="memo_too_large")
    policy = _session_policy(request, body, tenant, sid)
    await write_memo(services.sessions, policy, tenant, sid, body["memo"], new_request_id())
    await offload.run(tenant, memo_text, body["memo"])  # rendered here, off the loop, not by the next request
    return json_response({"id": sid, "memo": body["memo"]})


async def delete_session(request: web.Request) -> web.Response:
    services, tenant, sid = _session_target(request)
    purged = await services.sessions.erase(tenant, sid, new_request_id())
    # 202 while the erased bytes may still be in the store's files (see gateway.erasure)
    return json_response({"id": sid, "deleted": True, "purge": "complete" if purged else "pending"},
                         status=200 if purged else 202)


# --- auditors ---------------------------------------------------------------------------

def _time_param(request: web.Request, name: str) -> float | None:
    value = request.query.get(name)
    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError:
        raise BadRequest(f"'{name}' must be an ISO 8601 time (2026-01-31T12:00:00Z) or a Unix timestamp") from None


def _tenant_param(request: web.Request) -> str:
    """The ``tenant`` query parameter, held to the configuration's rule for tenant names (400)."""
    tenant = request.query.get("tenant")
    if not tenant:
        raise BadRequest("the 'tenant' query parameter is required")
    if not _TENANT.fullmatch(tenant):
        raise BadRequest("'tenant' must be a tenant name as the configuration allows: 1 to 64 letters, "
                         "digits, '_', '.' or '-'", code="invalid_tenant")
    if request.app[SERVICES].auth.knows(tenant):  # an error naming the tenant would echo the key
        raise BadRequest("the 'tenant' parameter is one of this gateway's keys: send a tenant name, and replace "
                         "that key if the URL may have been logged on the way", code="key_in_url")
    return tenant


def _auditor_tenant(request: web.Request) -> tuple[Principal, str]:
    """The auditor behind the request and the ``?tenant=`` it asks for, which its scope must
    cover (``Forbidden`` otherwise): the one tenant check of every admin route."""
    auditor = request.app[SERVICES].auth.auditor(request.headers)
    return auditor, auditor.check_tenant(_tenant_param(request))


_TENANT = re.compile(TENANT_PATTERN.removeprefix("^").removesuffix("$"))


async def admin_public_key(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    services.auth.auditor(request.headers)
    return web.Response(body=services.audit.signer.public_key_pem(), content_type="application/x-pem-file")


async def admin_verify(request: web.Request) -> web.Response:
    """Verify one tenant's chain (``?tenant=``) against the checkpoints kept outside the database."""
    services = request.app[SERVICES]
    _, tenant = _auditor_tenant(request)
    report = await services.audit.verify(services.sessions.store, tenant, open_key=services.sessions.unwrap)
    return json_response(report.to_dict(), status=200)


async def admin_export(request: web.Request) -> web.StreamResponse:
    """A redacted, verifiable export bundle as a tar stream (records, manifest, audit entries).

    Query: ``tenant`` (required), ``session``, ``since``, ``until``, ``format`` (jsonl|csv|agently).
    """
    services = request.app[SERVICES]
    auditor, tenant = _auditor_tenant(request)
    fmt = request.query.get("format", "jsonl")
    if fmt not in FORMATS:
        raise BadRequest(f"'format' must be one of {', '.join(FORMATS)}")
    sid = request.query.get("session")
    since, until = _time_param(request, "since"), _time_param(request, "until")
    sid = check_session_id(sid) if sid else None
    with PrivateFolder("export") as folder:  # removed after streaming; after a crash, by the next gateway
        # built from the validated tenant only: letters, digits, '_', '.', '-' (never a path)
        out = folder.path / f"{tenant}-export.{'csv' if fmt == 'csv' else 'jsonl'}"
        try:
            await services.audit.export(services.sessions, services.policies.current, out, tenant=tenant, fmt=fmt,
                                        session_id=sid, since=since, until=until)
        except IntegrityError as exc:
            raise EvidenceRefused(exc.detail, tenant) from exc
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
    """200 when the store answers, its writes are not failing (``Health.store_writes_failing``)
    and every background task does its job; 503 with a reason naming what is not (a failing task
    is named with its last exception type only)."""
    services = request.app[SERVICES]
    try:
        await services.sessions.store.tenants()
    except GatewayError as exc:  # the cause may name the database: logged, not answered
        log.error("readiness_store_unavailable", detail=exc.message)
        return json_response({"status": "unavailable", "reason": "the session store does not answer (the log "
                                                                  "has the cause)"}, status=503)
    writes = services.background.health.store_writes_failing()
    if writes is not None:  # it answers reads, but cannot write (a full disk): no round could be recorded
        log.error("readiness_store_unavailable", detail=writes.detail, writes_failed=writes.failures)
        return json_response({"status": "unavailable", "reason": f"the session store's writes are failing "
                              f"({writes.failures} in a row, the last {writes.seconds_ago:.0f} s ago; the log has "
                              "the cause)"}, status=503)
    failing = services.background.health.unready()
    if failing:
        reason = "; ".join(f"background task {t.name} is failing ({t.last_error}, {t.consecutive_failures} "
                           "attempt(s)) and retrying" for t in failing)
        return json_response({"status": "unavailable", "reason": reason,
                              "tasks": [t.name for t in failing]}, status=503)
    ready: dict[str, Any] = {"status": "ready", "policies": len(services.policies.current.policies)}
    refused = services.background.health.refused_chains()
    if refused:  # that tenant's evidence, not the gateway's readiness: named, still 200
        ready["audit_chains_refused"] = sorted(refused)
    return json_response(ready)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text; with ``metrics.token_sha256`` set, only for that bearer token."""
    services = request.app[SERVICES]
    services.auth.scraper(request.headers)
    return web.Response(body=services.metrics.render(), headers={"Content-Type": services.metrics.content_type})
