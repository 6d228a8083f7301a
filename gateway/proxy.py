"""Forwarded routes: any other ``/v1/*`` request, sent to the provider with its key, and audited.

Contract, in order:

1. The client is authenticated, by ``Authorization`` or Anthropic's ``x-api-key`` as on the
   model routes (401 otherwise).
2. ``parse_route`` validates the raw, still-encoded request target. Refused with 400, never
   forwarded: dot segments (``.``/``..``, also as ``%2e``), encoded slashes or backslashes
   (``%2F``, ``%5C``), literal backslashes, empty segments (``//``, a trailing ``/``), bad
   percent escapes, control characters, targets over 2,048 characters. The URL sent upstream is
   the upstream's ``base_url`` plus exactly this encoded path (``Upstreams.open`` does not
   re-resolve it), so the provider key reaches only paths below the configured base URL.
3. A path that holds ``/v1`` twice (``/v1/v1/messages``: an SDK whose base URL ends in ``/v1``
   once too often) is 404 ``doubled_v1``, saying what the base URL should be. Paths the gateway
   serves itself are never forwarded, whatever their spelling: any path whose first segment is
   ``sessions`` in any case (400/405/404), ``chat/completions`` (405 for a method other than
   POST), and ``responses`` and ``messages`` themselves (405 for a method other than POST). A
   URL that holds a gateway key or auditor token (a path segment, a query parameter's name or
   value) is refused with 400 ``key_in_url``: it would reach the
   provider, and its logs, as it is. Then a path segment holding ``;`` (also as ``%3B``) is
   refused with 400 (``refuse_path_parameters``): servers that read ``;`` as the start of path
   parameters (Tomcat, Jetty, Spring, some API gateways) would see ``..;`` as ``..`` and
   ``models;x`` as ``models``, a path other than the one the gateway checked.
4. The body (``server.max_body_bytes``) is read; a JSON body's ``model`` must be a printable
   string of at most 256 characters (400 ``invalid_model`` otherwise) before it is used,
   logged or audited. It picks the upstream, among those of the route's protocol
   (``route_protocol``: Anthropic's for ``/v1/messages/...`` and for clients that send
   ``anthropic-version``); a request without one goes to that protocol's first upstream
   (``Upstreams.route(any_upstream=True)``: ``/v1/models`` runs no model). A JSON body is
   forwarded as parsed (a key sent twice goes once, with the value that was routed and
   audited); other bodies as they came.
5. The route must be in that upstream's ``forward_routes`` (403 otherwise, saying how to allow
   it, and whether the route runs the model outside the gateway's recording): account-wide
   provider state (files, batches, assistants, ...) is not shared by tenants unless the
   operator says so. A JSON body below ``/v1/responses`` or ``/v1/messages`` is held to the
   model routes' rules (``refuse_forwarded_references``): no account-wide object named by id
   whose routes are not forwarded (403), no other tenant's provider-held response (404).
6. The reply is relayed as it arrives, decoded (``Upstreams`` never hands out compressed
   bytes), with the provider's rate-limit and request-id headers and no Content-Length; a
   provider's 401 or non-JSON error page is the boundary's error instead (``gateway.upstream``). The
   last piece is held back until the audit entry is committed. Once bytes have gone out,
   a failure (upstream broke off, audit write failed) ends the connection: no second status
   line is ever written into a started body.
7. Every request that was sent upstream leaves one audit entry (``event: proxy``), whatever
   happened: completed, upstream error, upstream broke off, client gone. The entry, and the
   ``proxy`` log line, name the route by ``Route.template`` (``/v1/responses/{id}/input_items``,
   ``/v1/files/{id}``): never an object's id (a provider-held response's continues its
   conversation), a model name or anything else a client wrote into the path.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote_to_bytes

import orjson
import structlog
from aiohttp import web

from gateway import jsonbody, offload
from gateway.auth import Authenticator, auth_header
from gateway.codecs import references
from gateway.codecs.responses import check_references
from gateway.context import Services
from gateway.errors import BadRequest, Forbidden, GatewayError, NotFound, StoreUnavailable, UpstreamError
from gateway.observe import mark_logged, model_label, set_outcome
from gateway.stages.parse_request import THREAD_ABOVE_BYTES, check_model, read_limited
from gateway.stages.resolve_session import check_session_id
from gateway.stages.respond import end_connection
from gateway.store.base import Changes
from gateway.upstream import Upstream

log = structlog.get_logger("gateway.proxy")

MAX_TARGET = 2048
_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


@dataclass(frozen=True, slots=True)
class Route:
    """A validated forwarded route: ``path`` below ``/v1`` still encoded (``/models/x``),
    its decoded ``segments``, and the encoded ``query`` (no ``?``)."""

    path: str
    segments: tuple[str, ...]
    query: str

    @property
    def display(self) -> str:
        return "/v1" + self.path

    @property
    def template(self) -> str:
        """The route as logged and audited: each segment that is a word of a provider API's paths
        (:data:`API_WORDS`) as it is, every other (an object's id, a model's name, whatever a
        client made up) as ``{id}``. It says which kind of object was reached, never which."""
        return "/v1/" + "/".join(seg if seg in API_WORDS else "{id}" for seg in self.segments)


API_WORDS = frozenset({
    # OpenAI
    "models", "embeddings", "moderations", "files", "content", "uploads", "parts", "complete", "batches",
    "responses", "input_items", "input_tokens", "compact", "cancel", "conversations", "items", "chat",
    "completions", "messages", "assistants", "threads", "runs", "steps", "submit_tool_outputs", "vector_stores",
    "file_batches", "search", "audio", "speech", "transcriptions", "translations", "voices", "images",
    "generations", "edits", "variations", "fine_tuning", "jobs", "checkpoints", "events", "permissions", "pause",
    "resume", "alpha", "graders", "run", "validate", "realtime", "sessions", "transcription_sessions",
    "client_secrets", "calls", "accept", "reject", "hangup", "refer", "containers", "evals", "output_items",
    "videos", "remix", "organization", "projects", "users", "invites", "api_keys", "service_accounts",
    "rate_limits", "roles", "groups", "usage", "costs", "audit_logs", "admin_api_keys", "certificates",
    "activate", "deactivate", "skills", "versions",
    # Anthropic
    "count_tokens", "results", "organizations", "workspaces", "members", "usage_report", "cost_report",
})
"""The fixed words of OpenAI's and Anthropic's API paths (``Route.template`` keeps these, and
writes any other segment as ``{id}``)."""


def parse_route(raw_target: str) -> Route:
    """Validate the raw request target of a ``/v1/*`` request; ``BadRequest`` says what is wrong."""
    if len(raw_target) > MAX_TARGET:
        raise BadRequest(f"the request target is over {MAX_TARGET} characters", code="invalid_path")
    path, _, query = raw_target.partition("?")
    if not path.startswith("/v1/") or any(not (0x21 <= ord(c) < 0x7F) for c in raw_target) or "#" in raw_target:
        raise BadRequest("the request path must be /v1/ followed by printable ASCII", code="invalid_path")
    encoded = path[len("/v1/"):].split("/")
    segments = []
    for seg in encoded:
        if "\\" in seg or _ESCAPE.search(seg.encode()):
            raise BadRequest("backslashes and malformed percent escapes are not allowed in paths",
                             code="invalid_path")
        decoded = unquote_to_bytes(seg)
        if not decoded:
            raise BadRequest("empty path segments ('//' or a trailing '/') are not allowed", code="invalid_path")
        if decoded in (b".", b".."):
            raise BadRequest("dot segments ('.' and '..', also percent-encoded) are not allowed in paths",
                             code="invalid_path")
        if b"/" in decoded or b"\\" in decoded:
            raise BadRequest("encoded slashes and backslashes (%2F, %5C) are not allowed in paths",
                             code="invalid_path")
        try:
            text = decoded.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("path segments must be UTF-8 when percent-decoded", code="invalid_path") from None
        if not text.isprintable():
            raise BadRequest("path segments must not hold control characters", code="invalid_path")
        segments.append(text)
    return Route("/" + "/".join(encoded), tuple(segments), query)


def refuse_path_parameters(route: Route) -> None:
    """``BadRequest`` when a path segment holds ``;`` (raw or percent-encoded): a server that reads
    ``;`` as the start of path parameters drops what follows it, so ``/v1/models/..;/files`` would
    reach ``/v1/files`` there, past the ``models`` rule the gateway checked (and ``chat;x`` would
    be a chat it never records). No provider API uses path parameters."""
    if any(";" in seg for seg in route.segments):
        raise BadRequest("';' (also as %3B) is not allowed in forwarded paths: servers that read it as the start "
                         "of path parameters would see another path than the one the gateway allowed. Remove the "
                         "';' and what follows it in that path segment", code="invalid_path")


_KEY_RUN = re.compile(r"[A-Za-z0-9._~-]+")
"""A run of URL-unreserved characters: a key written into a URL with anything around it (``;``,
a space, ``Bearer``, ``%00``) is one of the runs of the text it is in."""


def refuse_keys_in_url(route: Route, auth: Authenticator, credential: str | None = None) -> None:
    """``BadRequest`` when the forwarded URL holds a gateway key or auditor token: a path segment
    or a query parameter's name or value (decoded), or any run of URL-unreserved characters in
    one (a key with ``;``, a space or ``Bearer`` around it), is one; or the request's own key
    (*credential*, its ``Authorization`` value) is anywhere in the URL. The URL goes to the
    provider as it is (and into its logs), so a key there would leave the gateway. The error
    never repeats it."""
    values = [*route.segments]
    if route.query:
        for name, value in parse_qsl(route.query, keep_blank_values=True):
            values += (name, value)
    own = credential.partition(" ")[2].strip() if credential else ""
    for value in values:
        if auth.knows(value) or any(auth.knows(run) for run in _KEY_RUN.findall(value) if run != value) \
                or (own and own in value):
            raise BadRequest("the request's URL holds a gateway key, and forwarded URLs go to the provider as "
                             "they are: send the key only in the Authorization (or x-api-key) header, and "
                             "replace that key, as it may have been logged on the way", code="key_in_url")


SESSION_SUBROUTES = {"reset": ["POST"], "history": ["POST"], "clean_context_window": ["POST"], "memo": ["GET", "PUT"]}
"""The routes under ``/v1/sessions/{id}/`` and their methods (a wrong method there is 405)."""


UNRECORDED_MODEL_ROUTES = ("batches", "messages/batches", "threads", "completions", "realtime", "fine_tuning")
"""Provider routes that run the model without passing its replies through the gateway (batch
jobs, assistant runs, legacy completions, realtime sessions, training): a refusal says so."""


def route_protocol(route: Route, headers: Mapping[str, str]) -> str:
    """The protocol of the upstream a forwarded route goes to: ``anthropic`` for ``/v1/messages/...``
    (``count_tokens``, batches) and for a client that speaks Anthropic's API (it sends
    ``anthropic-version``, as the ``anthropic`` SDK always does: its ``models.list()`` wants
    Anthropic's list); ``openai`` otherwise."""
    if route.segments[0] == "messages" or "anthropic-version" in headers:
        return "anthropic"
    return "openai"


def suggested_rule(segments: tuple[str, ...]) -> str:
    """The ``forward_routes`` rule a refusal suggests: the route's first segment, or its first two
    under ``messages``, whose one-segment rule would also forward Message Batches (model calls
    the gateway never sees) where ``messages/count_tokens`` was meant."""
    if segments[0] == "messages" and len(segments) > 1:
        return "/".join(segments[:2])
    return segments[0]


def refuse_gateway_paths(method: str, route: Route) -> None:
    """Paths the gateway serves itself never go upstream (they would carry a session document or
    id, or an unrecorded chat, to the provider): ``/v1/sessions...`` in any spelling and
    ``/v1/chat/completions``."""
    first = route.segments[0].casefold()
    if first == "sessions":
        if route.path == "/sessions":
            raise web.HTTPMethodNotAllowed(method, ["GET"])
        if route.segments[0] != "sessions" or "%" in route.path:
            raise web.HTTPNotFound()
        rest = route.segments[1:]
        sub = SESSION_SUBROUTES.get(rest[1]) if len(rest) == 2 else None
        if len(rest) != (2 if sub else 1):
            check_session_id("/".join(rest))
            raise web.HTTPNotFound()
        check_session_id(rest[0])
        raise web.HTTPMethodNotAllowed(method, sub or ["GET", "PUT", "DELETE"])
    if first == "chat" and len(route.segments) > 1 and route.segments[1].casefold() == "completions":
        if method != "POST":
            raise web.HTTPMethodNotAllowed(method, ["POST"])
        raise web.HTTPNotFound()  # another spelling of the chat route: never forwarded unrecorded
    if route.segments in (("responses",), ("messages",)):  # the other model routes: their POST never comes here
        raise web.HTTPMethodNotAllowed(method, ["POST"])


DOUBLED_V1 = ("this path holds /v1 twice (/v1/v1/...): the client's base URL ends in /v1 and its SDK adds /v1 "
              "again. The Anthropic SDK's base_url is the gateway's address without /v1 (http://HOST:PORT); the "
              "OpenAI SDK's is that address with /v1 once (http://HOST:PORT/v1)")


def refuse_doubled_v1(route: Route) -> None:
    """``NotFound`` (``doubled_v1``) for ``/v1/v1/...``: no provider has such a route; it is an
    SDK whose base URL already ends in ``/v1`` (the Anthropic SDK's takes the host alone), and
    the refusal says what to set instead of suggesting a ``forward_routes`` rule ``v1``."""
    if route.segments[0] == "v1":
        raise NotFound(DOUBLED_V1, code="doubled_v1")


def json_body(body: bytes | None, content_type: str) -> tuple[bytes | None, str | None, bool]:
    """The body to forward, its ``model`` (None when there is none), and whether the body is
    JSON the gateway serialised.

    A JSON body (``application/json``) that parses is forwarded as the gateway parsed it, so a
    key sent twice reaches the provider once, with the value that routed and audited it; any
    other body goes as it came. ``BadRequest`` when ``model`` is not a printable string of at
    most 256 characters (nothing of it is echoed).
    """
    if not body or content_type != "application/json":
        return body, None, False
    try:
        parsed = jsonbody.loads(body)
    except orjson.JSONDecodeError:
        return body, None, False  # not ours to judge: the provider answers it
    model = parsed.get("model") if isinstance(parsed, dict) else None
    check_model(model)  # the chat route's rule, so both routes refuse the same values
    return jsonbody.dumps(parsed), model if isinstance(model, str) else None, True


async def forward_route(request: web.Request, services: Services, request_id: str) -> web.StreamResponse:
    """Run one forwarded route (see the module docstring); returns the finished response."""
    credential = auth_header(request.headers)
    principal = services.auth.client(credential)
    route = parse_route(request.raw_path)
    refuse_doubled_v1(route)
    refuse_gateway_paths(request.method, route)
    refuse_keys_in_url(route, services.auth, credential)
    refuse_path_parameters(route)
    tenant = principal.tenant or ""
    body = await read_limited(request, services.settings.server.max_body_bytes, tenant) \
        if request.can_read_body else None
    if body is not None and len(body) > THREAD_ABOVE_BYTES:
        body, model, is_json = await offload.run(tenant, json_body, body, request.content_type)
    else:
        body, model, is_json = json_body(body, request.content_type)
    upstream = services.upstreams.route(model, route_protocol(route, request.headers), any_upstream=True)
    if not upstream.allows(route.segments):
        rule = suggested_rule(route.segments)
        unrecorded = any(rule == r or rule.startswith(f"{r}/") or r.startswith(f"{rule}/")
                         for r in UNRECORDED_MODEL_ROUTES)  # the rule allows such a route, or one within
        raise Forbidden(f"forwarded route /v1/{rule} is not allowed: it may reach account-wide provider state "
                        f"shared by every tenant"
                        + (", and the model calls it makes are not recorded by the gateway" if unrecorded else "")
                        + f". An operator can allow it by adding '{rule}' to forward_routes of upstream "
                        f"'{upstream.name}' in the gateway configuration", code="route_not_allowed")
    await refuse_forwarded_references(services, tenant, route, upstream, body, is_json)
    audit: dict[str, object] = {
        "event": "proxy", "request_id": request_id, "route": route.template, "model": model_label(model, upstream),
        "outcome": "upstream_error", "ended_by": None, "upstream_status": None, "bytes_out": 0,
        "detail": {"method": request.method, "upstream": upstream.name}}
    out: web.StreamResponse | None = None
    pending = b""
    failure: GatewayError | None = None
    sent = 0
    try:
        async with services.upstreams.open(upstream, request.method, route.path, body=body,
                                           headers=request.headers, query=route.query, json=is_json) as reply:
            audit["upstream_status"] = reply.status
            out = web.StreamResponse(status=reply.status,
                                     headers={**reply.headers, "X-Sessiongate-Request-Id": request_id})
            out.content_type = reply.content_type
            await out.prepare(request)
            async for chunk in reply.aiter_bytes():
                if pending:
                    await out.write(pending)
                    sent += len(pending)
                pending = chunk
            audit["outcome"] = "completed" if reply.status < 400 else "upstream_error"
    except UpstreamError as exc:
        if out is None:
            failure = exc
            audit["upstream_status"] = exc.upstream_status
        else:
            audit["outcome"], audit["ended_by"] = "incomplete", "upstream"
    except (ConnectionResetError, OSError):
        audit["outcome"], audit["ended_by"] = "incomplete", "client"
    except asyncio.CancelledError:
        audit["outcome"], audit["ended_by"] = "incomplete", "client"
        raise
    finally:
        # committed before the client sees the end of the reply, also when it was cut off
        audit["bytes_out"] = sent + (len(pending) if audit["ended_by"] is None else 0)
        written = await _audit(services, tenant, audit)
    status = out.status if out is not None else (failure.status if failure else 500)
    set_outcome(request, str(audit["outcome"]))  # counted by gateway.observe with route and status
    mark_logged(request)
    log.info("proxy", request_id=request_id, tenant=principal.tenant or None, route=route.template,
             model=audit["model"],
             status=status, outcome=audit["outcome"], ended_by=audit["ended_by"])
    if out is None:
        raise failure or written or StoreUnavailable("the gateway could not write the audit entry of this request")
    if audit["ended_by"] is not None or written is not None or not out.prepared:
        end_connection(request, out)
        return out
    try:
        if pending:
            await out.write(pending)
        await out.write_eof()
    except (ConnectionResetError, OSError):
        pass
    return out


async def refuse_forwarded_references(services: Services, tenant: str, route: Route, upstream: Upstream,
                                      body: bytes | None, is_json: bool) -> None:
    """The model routes' rules for a body forwarded below ``/v1/responses`` or ``/v1/messages``
    (``responses/input_tokens``, ``responses/compact``, ``messages/count_tokens``): account-wide
    objects named by id only where the upstream forwards their routes (403), and under
    provider-held state a ``previous_response_id`` only when it is *tenant*'s (404). Such a body
    the gateway did not read as JSON (another ``Content-Type``, a byte-order mark, ``NaN``,
    UTF-16: a provider may read it all the same) is 400, never forwarded unchecked. Batch
    bodies (``messages/batches``, allowed only by name) are not looked into."""
    first = route.segments[0]
    if not body or first not in ("responses", "messages") or route.segments[1:2] == ("batches",):
        return
    if not is_json:
        raise BadRequest(f"the body of {route.display} must be JSON sent as "
                         "'Content-Type: application/json': the gateway checks what it names before forwarding it",
                         code="invalid_json")
    parsed = orjson.loads(body)  # the gateway's own serialisation of a body it parsed (json_body)
    if not isinstance(parsed, dict):
        return
    if first == "messages":
        references.refuse(references.references_messages(parsed), upstream)
    else:
        await check_references(parsed, upstream, tenant, services.sessions.store)


async def _audit(services: Services, tenant: str, fields: dict[str, object]) -> GatewayError | None:
    """Commit the audit entry (shielded: it completes even if the client goes away). None when
    written; the error when it was not (logged, never raised over the reply's own outcome)."""
    try:
        await asyncio.shield(services.sessions.store.transact(tenant, None, lambda cur: Changes(audit=[fields]),
                                                              bounded=True))
        return None
    except GatewayError as exc:
        log.error("proxy_not_audited", request_id=fields["request_id"], error=type(exc).__name__)
        return exc
    except Exception as exc:  # noqa: BLE001 - fail closed: the client never gets a complete-looking reply
        log.error("proxy_not_audited", request_id=fields["request_id"], error=type(exc).__name__)
        return StoreUnavailable("the gateway could not write the audit entry of this request")
