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

from gateway import handlers
from gateway.auditor import AuditTrail
from gateway.auth import Authenticator
from gateway.context import Services
from gateway.errors import GatewayError, IntegrityError
from gateway.handlers import SERVICES, json_response
from gateway.keyring import EnvKeyProvider, FileKeyProvider, KeyProvider, Keyring, ensure
from gateway.keys import KeyringWatcher
from gateway.metrics import Metrics
from gateway.policy import PolicySet, PolicyWatcher
from gateway.retention import RetentionTask
from gateway.sessions import SessionService
from gateway.settings import Settings, UpstreamSettings
from gateway.store.base import SYSTEM_TENANT, Changes, Store
from gateway.upstream import Upstreams

log = structlog.get_logger("gateway.app")
SETTINGS = web.AppKey("settings", Settings)
STANDIN = web.AppKey("standin", bool)


@web.middleware
async def error_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every refusal in OpenAI's error shape; nothing else ever reaches a client."""
    try:
        return await handler(request)
    except GatewayError as exc:
        if isinstance(exc, IntegrityError):
            log.error("integrity_error", path=request.path, detail=exc.detail)
        return json_response(exc.to_body(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
        message = f"{request.method} {request.path} is not a sessiongate route" if exc.status in (404, 405) \
            else exc.reason
        return json_response({"error": {"message": message, "type": kind, "code": code}}, status=exc.status)
    except Exception:
        log.exception("unhandled_error", path=request.path)
        return json_response({"error": {"message": "the gateway hit an internal error; it has been logged",
                                        "type": "server_error", "code": "internal_error"}}, status=500)


def key_provider(settings: Settings) -> KeyProvider:
    """The keyring source; a key file is generated (mode 0600) on first start."""
    if settings.keys.master_key_env:
        return EnvKeyProvider(settings.keys.master_key_env)
    path = settings.keys.master_key_file or Path(".sessiongate/master-keys.json")
    if ensure(path):
        log.warning("master_key_generated", path=str(path),
                    note="back this file up: without it the stored data cannot be read")
    return FileKeyProvider(path)


def open_store(settings: Settings) -> Store:
    if settings.store.backend == "postgres":
        from gateway.store.postgres import PostgresStore
        return PostgresStore(settings.store.postgres_dsn(), schema=settings.store.schema_name,
                             pool_size=settings.store.pool_size)
    from gateway.store.sqlite import SQLiteStore
    return SQLiteStore(settings.store.path)


async def _services(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    upstream_settings = list(settings.upstreams)
    standin = None
    if not upstream_settings:
        from gateway.standin import run_standin
        standin, port = await run_standin("127.0.0.1", 0)
        upstream_settings = [UpstreamSettings(name="stand-in", base_url=f"http://127.0.0.1:{port}/v1")]
        log.warning("standin_model", note="NO UPSTREAM CONFIGURED: replies come from the built-in stand-in "
                    "model (deterministic, offline). Add an entry under 'upstreams' to reach a real model.")
    trail = AuditTrail(settings)
    store = trail.observe(open_store(settings))
    await store.open()
    checkpoints = asyncio.create_task(trail.checkpointer.run(), name="checkpointer")
    provider = key_provider(settings)
    sessions = SessionService(store, Keyring.from_provider(provider), lambda: Keyring.from_provider(provider))
    keyring_watcher = None
    if isinstance(provider, FileKeyProvider):
        keyring_watcher = KeyringWatcher(provider.path, lambda: Keyring.from_provider(provider), sessions)
        await keyring_watcher.start()

    metrics = Metrics()

    async def on_policies(new: PolicySet) -> None:
        await store.transact(SYSTEM_TENANT, None, lambda cur: Changes(audit=[{
            "event": "policy_reload", "detail": {p.id: p.version_hash for p in new}}]))
        metrics.policy_reloads.labels(result="ok").inc()

    policies = PolicyWatcher(settings.policies.path, on_policies, interval=settings.policies.reload_interval,
                             on_refused=lambda _exc: metrics.policy_reloads.labels(result="refused").inc())
    upstreams = Upstreams(upstream_settings)
    await upstreams.start()
    await policies.start()
    retention = RetentionTask(sessions, policies, settings.store.purge_interval_seconds)
    await retention.start()
    services = Services(settings, Authenticator(settings), upstreams, sessions, policies, metrics, trail)
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
        checkpoints.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await checkpoints
        await upstreams.close()
        await store.close()
        if standin is not None:
            await standin.cleanup()


def build_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.server.max_body_bytes)
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_services)
    r = app.router
    r.add_post("/v1/chat/completions", handlers.chat_completions)
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
    r.add_get("/admin/public-key", handlers.admin_public_key)
    r.add_get("/admin/audit/verify", handlers.admin_verify)
    r.add_get("/admin/export", handlers.admin_export)
    r.add_get("/healthz", handlers.healthz)
    r.add_get("/readyz", handlers.readyz)
    r.add_get("/metrics", handlers.metrics)
    return app
