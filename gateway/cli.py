"""The ``sessiongate`` command line.

    sessiongate serve [--config FILE] [--host H] [--port P]
    sessiongate clients new --tenant T [--name N]
    sessiongate sessions list|export|import|reset|delete|erase --tenant T [ID] [FILE]
    sessiongate policy check [PATH ...] | policy explain --request FILE [--reply FILE] ...
    sessiongate keys generate|list|rotate|retire
    sessiongate audit verify ... | export ... | purge

Every command reads the same configuration file as ``serve`` (``--config``, default
``config/sessiongate.yaml``). Errors are printed as one line naming the file, line and field,
never as a stack trace; the exit code is 1 for a failed check and 2 for unusable input.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import secrets
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import ConfigError, GatewayError
from gateway.settings import DEFAULT_CONFIG, Settings, load_settings

T = TypeVar("T")


def _fail(message: str, code: int = 2) -> int:
    print(f"sessiongate: error: {message}", file=sys.stderr)
    return code


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(Path(args.config) if args.config else None)


def _run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


# --- serve -----------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from gateway import logs
    from gateway.app import build_app
    from gateway.handlers import SERVICES

    settings = _settings(args)
    server = settings.server.model_copy(update={k: v for k, v in (("host", args.host), ("port", args.port))
                                                if v is not None})
    settings = settings.model_copy(update={"server": server})
    logs.configure(settings.logging.level, settings.logging.format)
    app = build_app(settings)

    async def banner(app: web.Application) -> None:
        services = app[SERVICES]
        lines = [
            f"sessiongate listening on http://{server.host}:{server.port}/v1",
            f"  config    {settings.source}",
            f"  store     {settings.store.backend}: "
            + (str(settings.store.path) if settings.store.backend == "sqlite" else "postgres"),
            f"  keys      {services.sessions.keyring.source}",
            f"  policies  {settings.policies.path} ({len(services.policies.current.policies)} loaded)",
        ]
        if app["standin"]:
            lines.append("  upstream  *** BUILT-IN STAND-IN MODEL: no upstream configured; replies are canned ***")
        else:
            lines.append(f"  upstream  {', '.join(services.upstreams.names)}")
        print("\n".join(lines), file=sys.stderr, flush=True)

    app.on_startup.append(banner)
    try:
        import uvloop
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop_factory = None
    loop = loop_factory() if loop_factory else asyncio.new_event_loop()
    web.run_app(app, host=server.host, port=server.port, access_log=None, print=None, loop=loop,
                handle_signals=True)
    return 0


# --- clients ---------------------------------------------------------------------------

def cmd_clients_new(args: argparse.Namespace) -> int:
    key = "sg-" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(key.encode()).hexdigest()
    print(f"client key (give it to the client; it is not stored anywhere): {key}", file=sys.stderr)
    print("add this to 'clients:' in your configuration:")
    print(f"  - name: {args.name or args.tenant + '-client'}\n    tenant: {args.tenant}\n    key_sha256: {digest}")
    return 0


# --- sessions --------------------------------------------------------------------------

async def _with_sessions(settings: Settings, fn: Callable[[Any], Awaitable[T]]) -> T:
    from gateway.app import key_provider, open_store
    from gateway.keyring import Keyring
    from gateway.sessions import SessionService

    store = open_store(settings)
    await store.open()
    try:
        return await fn(SessionService(store, Keyring.from_provider(key_provider(settings))))
    finally:
        await store.close()


def cmd_sessions(args: argparse.Namespace) -> int:
    from gateway.handlers import new_request_id
    from gateway.stages.resolve_session import check_session_id

    settings = _settings(args)
    tenant = args.tenant
    if args.action != "list" and not args.id:
        return _fail(f"sessions {args.action} needs a session id")
    sid = check_session_id(args.id) if args.id else ""

    async def act(svc: Any) -> int:
        if args.action == "list":
            for s in await svc.list(tenant):
                print(f"{s.session_id}\trounds={s.rounds}\tversion={s.version}")
        elif args.action == "export":
            print(json.dumps(await svc.export(tenant, sid), indent=2, ensure_ascii=False))
        elif args.action == "import":
            source = sys.stdin.read() if args.file in (None, "-") else Path(args.file).read_text(encoding="utf-8")
            try:
                data = json.loads(source)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"not valid JSON: {exc.msg}", file=args.file or "<stdin>", line=exc.lineno,
                                  column=exc.colno) from None
            added = await svc.import_agently(tenant, sid, data, new_request_id())
            print(f"imported {added} messages into {tenant}/{sid}")
        elif args.action == "reset":
            await svc.reset(tenant, sid, new_request_id())
            print(f"reset the context window of {tenant}/{sid}")
        elif args.action in ("delete", "erase"):
            await svc.erase(tenant, sid, new_request_id())
            await svc.store.checkpoint()
            print(f"erased {tenant}/{sid}: its data key and rows are destroyed")
        return 0

    return _run(_with_sessions(settings, act))


# --- policy ----------------------------------------------------------------------------

def cmd_policy_check(args: argparse.Namespace) -> int:
    from gateway.policy import main_check

    paths = args.paths
    if not paths:
        paths = [str(_settings(args).policies.path)]
    return main_check(paths)


# --- parser ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sessiongate", description="A recording gateway for LLM traffic.")
    p.add_argument("--config", help=f"configuration file (default {DEFAULT_CONFIG})")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--config", default=argparse.SUPPRESS)
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.set_defaults(fn=cmd_serve)

    c = sub.add_parser("clients", help="client keys").add_subparsers(dest="action", required=True)
    cn = c.add_parser("new", help="make a client key and the line for the configuration")
    cn.add_argument("--tenant", required=True)
    cn.add_argument("--name")
    cn.set_defaults(fn=cmd_clients_new)

    ss = sub.add_parser("sessions", help="list, export, import, reset or erase sessions")
    ss.add_argument("--config", default=argparse.SUPPRESS)
    ss.add_argument("action", choices=["list", "export", "import", "reset", "delete", "erase"])
    ss.add_argument("id", nargs="?")
    ss.add_argument("file", nargs="?", help="for import: Agently JSON file (default stdin)")
    ss.add_argument("--tenant", required=True)
    ss.set_defaults(fn=cmd_sessions)

    pol = sub.add_parser("policy", help="check and explain policy files").add_subparsers(dest="action", required=True)
    pc = pol.add_parser("check", help="validate policy files; exit 1 on any error")
    pc.add_argument("--config", default=argparse.SUPPRESS)
    pc.add_argument("paths", nargs="*")
    pc.set_defaults(fn=cmd_policy_check)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "config"):
        args.config = None
    try:
        return int(args.fn(args))
    except ConfigError as exc:
        return _fail(str(exc))
    except GatewayError as exc:
        return _fail(exc.message)
    except KeyboardInterrupt:
        return 130
