"""Builds the aiohttp application: services, routes and the one error middleware. No logic.

``build_app(settings)`` returns an app whose start-up opens the store, loads the keyring and
the policies, and starts the upstream client (or the built-in stand-in model when no upstream
is configured); its clean-up closes them in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from aiohttp.web_urldispatcher import _default_expect_handler

from gateway import console, handlers
from gateway.audit import EntryKey
from gateway.auditor import AuditTrail
from gateway.auth import Authenticator, auth_header, check_single_headers
from gateway.background import Background, Health
from gateway.codecs import render_error
from gateway.console.throttle import admin_throttled
from gateway.context import Services
from gateway.errors import (
    ConfigError,
    ExpectationFailed,
    GatewayError,
    IntegrityError,
    PayloadTooLarge,
    StoreUnavailable,
    UnsupportedTransferCoding,
)
from gateway.export import sweep_private_folders
from gateway.handlers import INTERNAL_ERROR, REQUEST_ID, SERVICES, json_response
from gateway.keyring import EnvKeyProvider, FileKeyProvider, KeyProvider, Keyring, ensure
from gateway.keys import KeyringWatcher, load_signer
from gateway.logs import exception_fields
from gateway.metrics import Metrics
from gateway.observe import METRICS, metrics_middleware, route_label, set_error_code
from gateway.policy import PolicySet, PolicyWatcher
from gateway.policy.reload_audit import ReloadAudit
from gateway.policy.versions import PolicyVersions
from gateway.retention import RetentionTask
from gateway.sessions import SessionService
from gateway.settings import Settings, UpstreamSettings
from gateway.store.base import Store
from gateway.store.sqlite import SQLiteStore
from gateway.tracing import Tracing, from_settings
from gateway.upstream import Upstreams

log = structlog.get_logger("gateway.app")
SETTINGS = web.AppKey("settings", Settings)
STANDIN = web.AppKey("standin", bool)
TRACING = web.AppKey("tracing", Tracing)


@web.middleware
async def error_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every refusal in the error shape of the route's protocol (OpenAI's; Anthropic's on
    ``/v1/messages``, ``codecs.render_error``); nothing else ever reaches a client. Refused here,
    before any route reads the request: a transfer coding other than a lone ``chunked`` (501), an
    ``Expect`` other than ``100-continue`` (417), credentials or a session named twice
    (``auth.check_single_headers``), and what the head of a ``100-continue`` request already
    decides (:func:`refuse_before_continue`); such a refusal closes the connection, its body
    unread. Every response to a request with an id (:data:`handlers.REQUEST_ID`) carries it."""
    unread = True  # a refusal from here until the handler runs leaves the body unread
    try:
        headers = request.headers
        expect = headers.get("Expect")
        coding = headers.get("Transfer-Encoding")
        if coding is not None and coding.lower() != "chunked":  # aiohttp refuses a second header (400)
            raise UnsupportedTransferCoding()
        if expect is not None and expect.lower() != "100-continue":
            raise ExpectationFailed("the Expect header is not supported: send 'Expect: 100-continue', or no Expect")
        check_single_headers(headers)
        if expect is not None and request.match_info.http_exception is None:  # 404/405: aiohttp's own answered
            refuse_before_continue(request)
            await _default_expect_handler(request)  # "100 Continue"
            await request.writer.drain()
        unread = False
        return await handler(request)
    except GatewayError as exc:
        if isinstance(exc, IntegrityError):
            log.error("integrity_error", route=route_label(request), request_id=request.get(REQUEST_ID),
                      detail=exc.detail)
            request.app[SERVICES].metrics.integrity_failures.inc()
        elif isinstance(exc, StoreUnavailable):
            log.error("store_unavailable", route=route_label(request), request_id=request.get(REQUEST_ID),
                      detail=exc.message)
        set_error_code(request, exc.code)
        resp = json_response(render_error(request.path, exc.to_body(), exc.status), status=exc.status)
        if exc.retry_after is not None:
            resp.headers["Retry-After"] = str(exc.retry_after)
        resp.headers.update(exc.headers)
        if unread and not request.content.is_eof():  # else its bytes would be read as the next request
            resp.force_close()
        return _with_request_id(request, resp)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status, "http_error")
        kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
        message = {404: "this path is not a sessiongate route: see the README for the routes it serves",
                   405: "this route does not accept this method: see the README for the routes it serves",
                   413: "the request body is over this route's limit"}.get(exc.status, exc.reason)
        if exc.status == 405 and exc.headers.get("Allow"):
            message = f"this route does not accept this method; it takes {exc.headers['Allow']}"
        resp = _refusal(request, {"message": message, "type": kind, "code": code}, exc.status)
        if "Allow" in exc.headers:  # a 405 names the methods the route takes (RFC 9110)
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    except RequestPayloadError as exc:
        log.info("bad_request_body", route=route_label(request), error=type(exc.__cause__ or exc).__name__)
        return _refusal(request, {"message": "the request body could not be read: invalid chunked framing or "
                                             "content encoding", "type": "invalid_request_error",
                                  "code": "invalid_body"}, 400)
    except ConnectionResetError as exc:
        if request.transport is not None and not request.transport.is_closing():
            log.error("unhandled_error", route=route_label(request), **exception_fields(exc))
            return _refusal(request, INTERNAL_ERROR["error"], 500)
        log.info("client_disconnected", route=route_label(request))
        return _refusal(request, {"message": "client disconnected", "type": "invalid_request_error",
                                  "code": "client_disconnected"}, 400)
    except Exception as exc:  # types and frames only: the failing code may have seen content
        log.error("unhandled_error", route=route_label(request), **exception_fields(exc))
        return _refusal(request, INTERNAL_ERROR["error"], 500)


def refuse_before_continue(request: web.Request) -> None:
    """What the head of an ``Expect: 100-continue`` request already decides, refused instead of
    ``100 Continue`` so that the client does not send its body: on a client route (``/v1/``) a
    missing or unknown key (``Unauthorized``, as the route would refuse it), and a Content-Length
    over ``server.max_body_bytes`` (``PayloadTooLarge``). Anything else is the route's to decide,
    after the body has come."""
    if request.path.startswith("/v1/"):
        request.app[SERVICES].auth.client(auth_header(request.headers))
    length, limit = request.content_length, request.app[SETTINGS].server.max_body_bytes
    if length is not None and length > limit:
        raise PayloadTooLarge(f"request body is {length} bytes; the limit is {limit}")


async def expect_continue(request: web.Request) -> None:
    """Every route's ``Expect`` handler, which aiohttp runs before any middleware: nothing.
    :func:`error_middleware` answers ``Expect`` in the route's error shape, and the access log has
    it: ``100 Continue`` once :func:`refuse_before_continue` has passed the head, 417 for any other
    value (aiohttp's own handler sends 100 before anything is checked, and answers 417 in plain
    text quoting the whole header value)."""


def _refusal(request: web.Request, error: dict[str, str], status: int) -> web.Response:
    """*error* (OpenAI's fields) as a response in the shape of the route's protocol."""
    set_error_code(request, error["code"])
    return _with_request_id(request, json_response(render_error(request.path, {"error": error}, status),
                                                   status=status))


def _with_request_id(request: web.Request, resp: web.Response) -> web.Response:
    """*resp* with the request's id, when it has one (:data:`handlers.REQUEST_ID`)."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        resp.headers["X-Sessiongate-Request-Id"] = request_id
    return resp


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sessiongate")
    except PackageNotFoundError:  # pragma: no cover - a source tree that was not installed
        return "unknown"


def key_provider(settings: Settings, *, store_has_data_keys: bool | None = None) -> KeyProvider:
    """The keyring source. A missing key file is generated (mode 0600) only for a fresh store
    (*store_has_data_keys* False, see :func:`holds_data_keys`); for a store that holds data keys
    it is a ``ConfigError`` naming the file and what to do, because a new keyring could unwrap
    none of them. With None (the store is not known) nothing is generated: loading the keyring
    then reports the missing file."""
    if settings.keys.master_key_env:
        settings.keys.check_env()  # unset: an error at the setting's file and line
        return EnvKeyProvider(settings.keys.master_key_env)
    path = settings.keys.master_key_file or Path(".sessiongate/master-keys.json")
    if store_has_data_keys and not path.exists():
        raise ConfigError(
            "the master key file is missing, but the store holds data keys that only its keys can unwrap "
            "(a new keyring could read none of the stored sessions): restore this file from your backup, "
            "or point keys.master_key_file (or keys.master_key_env) at the keyring in use. A keyring is "
            "generated only for a store without data keys", file=str(path), field="keys.master_key_file")
    if store_has_data_keys is False and ensure(path):
        log.warning("master_key_generated", path=str(path),
                    note="back this file up: without it the stored data cannot be read")
    return FileKeyProvider(path)


async def holds_data_keys(store: Store) -> bool:
    """Whether *store* holds any data key (so it is not a fresh store)."""
    async for _ in store.iter_data_keys():
        return True
    return False


def open_store(settings: Settings, entry_key: EntryKey | None = None) -> Store:
    """The configured store, sealing audit entries with *entry_key* (default: the one derived from
    ``audit.signing_key_file``, ``gateway.keys.load_signer``): every process that writes the chain
    must seal with it, or verification fails its entries as ``unauthenticated``."""
    key = entry_key if entry_key is not None else load_signer(settings).entry_key
    if settings.store.backend == "postgres":
        from gateway.store.postgres import PostgresStore
        return PostgresStore(settings.store.postgres_dsn(), schema=settings.store.schema_name,
                             pool_size=settings.store.pool_size, entry_key=key)
    from gateway.store.sqlite import SQLiteStore
    return SQLiteStore(settings.store.path, entry_key=key)


def standin_upstreams(base_url: str) -> list[UpstreamSettings]:
    """What a gateway with no upstream configured routes to: the built-in stand-in at *base_url*,
    one entry per protocol, each taking every model (``models`` default ``['*']``)."""
    return [UpstreamSettings(name="stand-in", base_url=base_url),
            UpstreamSettings(name="stand-in-anthropic", base_url=base_url, protocol="anthropic")]


def model_routes(settings: Settings) -> Upstreams:
    """The routing of a gateway started with *settings* (its upstreams, else the stand-in's), built
    without reading provider keys and never started: which models a round could use, for the CLI."""
    return Upstreams(list(settings.upstreams) or standin_upstreams("http://127.0.0.1/v1"), keys=False)


async def _services(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    upstream_settings = list(settings.upstreams)
    standin = None
    if not upstream_settings:
        from gateway.standin import run_standin
        standin, port = await run_standin("127.0.0.1", 0)
        upstream_settings = standin_upstreams(f"http://127.0.0.1:{port}/v1")
        log.warning("standin_model", note="NO UPSTREAM CONFIGURED: replies come from the built-in stand-in "
                    "model (deterministic, offline). Add an entry under 'upstreams' to reach a real model.")
    metrics = Metrics(_version())
    app[METRICS] = metrics
    trail = AuditTrail(settings)
    trail.log.check_writable()  # a gateway that could never sign a checkpoint does not start
    raw_store = open_store(settings, trail.signer.entry_key)
    raw_store.on_commit = metrics.commit
    if isinstance(raw_store, SQLiteStore):
        raw_store.quiet = metrics.quiet
    store = trail.observe(raw_store)
    await store.open()
    try:
        provider = key_provider(settings, store_has_data_keys=await holds_data_keys(store))
        keyring = Keyring.from_provider(provider)
    except BaseException:
        await store.close()
        raise
    health = Health()
    store.on_write = health.store_write  # a store that fails every write is not ready (/readyz)
    background = Background(health)
    checkpoints = asyncio.create_task(trail.checkpointer.run(health), name="checkpointer")
    sessions = SessionService(store, keyring, lambda: Keyring.from_provider(provider))
    for folder in sweep_private_folders():  # export bundles a killed gateway left in $TMPDIR
        log.warning("export_folder_removed", folder=str(folder), note="left by a gateway that did not stop cleanly")
    await sessions.erasures.start()  # erasures left pending by the CLI, another worker or a killed gateway
    keyring_watcher = None
    if isinstance(provider, FileKeyProvider):
        keyring_watcher = KeyringWatcher(provider.path, lambda: Keyring.from_provider(provider), sessions)
        keyring_watcher.attach(health)
        await keyring_watcher.start()

    metrics.registry.register(health)
    metrics.erasures_pending.set_function(lambda: len(sessions.erasures))
    versions = PolicyVersions(store)

    async def on_policies(new: PolicySet) -> None:
        await versions.record(new)
        await reload_audit.record(new)  # one policy_reload entry per change, not per reload or worker
        metrics.policy_reloads.labels(result="ok").inc()

    policies = PolicyWatcher(settings.policies.path, on_policies, interval=settings.policies.reload_interval,
                             on_refused=lambda _exc: metrics.policy_reloads.labels(result="refused").inc(),
                             hook_modules=settings.policies.hook_modules)
    reload_audit = ReloadAudit(store, policies.current)
    policies.attach(health)
    await versions.record(policies.current)
    upstreams = Upstreams(upstream_settings)
    await upstreams.start()
    await policies.start()
    retention = RetentionTask(sessions, policies, settings.store.purge_interval_seconds)
    retention.attach(health)
    await retention.start()
    tracing = app[TRACING] if TRACING in app else from_settings(settings)
    services = Services(settings, Authenticator(settings), upstreams, sessions, policies, metrics, trail,
                        background=background, tracing=tracing)
    app[SERVICES] = services
    app[STANDIN] = standin is not None
    try:
        yield
    finally:
        await retention.stop()
        if keyring_watcher is not None:
            await keyring_watcher.stop()
        await policies.stop()
        await services.background.drain()
        await sessions.erasures.stop()
        checkpoints.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await checkpoints
        await upstreams.close()
        await store.close()
        if tracing is not None:
            tracing.shutdown()
        if standin is not None:
            await standin.cleanup()


def build_app(settings: Settings, *, tracing: Tracing | None = None) -> web.Application:
    """The gateway app for *settings*; *tracing* replaces the configured tracing (tests)."""
    app = web.Application(middlewares=[metrics_middleware, error_middleware],
                          client_max_size=settings.server.max_body_bytes,
                          handler_args={"auto_decompress": False})  # parse_request.read_limited decodes bodies
    app[SETTINGS] = settings
    if tracing is not None:
        app[TRACING] = tracing
    app.cleanup_ctx.append(_services)
    r = app.router
    r.add_post("/v1/chat/completions", handlers.chat_completions)
    r.add_post("/v1/responses", handlers.responses_create)
    r.add_get("/v1/responses/{response_id}", handlers.get_response)
    r.add_get("/v1/responses/{response_id}/input_items", handlers.list_input_items)
    r.add_post("/v1/responses/{response_id}/cancel", handlers.cancel_response)
    r.add_delete("/v1/responses/{response_id}", handlers.delete_response)
    r.add_post("/v1/messages", handlers.messages_create)
    r.add_get("/v1/sessions", handlers.list_sessions)
    r.add_get("/v1/sessions/{session_id}", handlers.export_session)
    r.add_put("/v1/sessions/{session_id}", handlers.import_session)
    r.add_delete("/v1/sessions/{session_id}", handlers.delete_session)
    r.add_post("/v1/sessions/{session_id}/reset", handlers.reset_session)
    r.add_post("/v1/sessions/{session_id}/history", handlers.session_history)
    r.add_post("/v1/sessions/{session_id}/clean_context_window", handlers.clean_context_window)
    r.add_get("/v1/sessions/{session_id}/memo", handlers.get_memo)
    r.add_put("/v1/sessions/{session_id}/memo", handlers.put_memo)
    r.add_route("*", "/v1/{tail:.*}", handlers.proxy)
    r.add_get("/admin/public-key", admin_throttled(handlers.admin_public_key))
    r.add_get("/admin/audit/verify", admin_throttled(handlers.admin_verify))
    r.add_get("/admin/export", admin_throttled(handlers.admin_export))
    console.add_routes(app)
    r.add_get("/healthz", handlers.healthz)
    r.add_get("/readyz", handlers.readyz)
    r.add_get("/metrics", handlers.metrics)
    for route in r.routes():  # the console's routes too; aiohttp takes a handler only per add_route call
        route._expect_handler = expect_continue
    return app
