"""The ``sessiongate`` command line.

    sessiongate serve [--config FILE] [--host H] [--port P] [--workers N]
    sessiongate clients new --tenant T [--name N]
    sessiongate sessions list|export|import|reset|delete|erase|release --tenant T [ID] [FILE]
    sessiongate sessions add|set|clean|memo --tenant T [--model M] ID [FILE]
    sessiongate policy check [PATH ...] | policy explain --request FILE [--reply FILE] ...
    sessiongate policy test [POLICY_DIR] [CASES ...] | policy diff OLD_DIR NEW_DIR [--cases ...]
    sessiongate keys generate|list|rotate|rewrap|retire [KEY_ID]
    sessiongate purge
    sessiongate db migrate
    sessiongate audit verify [--tenant T] [--checkpoints F] [--public-key F] [--bundle OUT] | public-key
    sessiongate export --tenant T [--session S] [--since] [--until] --format jsonl|csv|agently --out F

Every command reads the same configuration file as ``serve`` (``--config``, default
``config/sessiongate.yaml``). Errors are printed as one line naming the file, line and field,
never as a stack trace; the exit code is 1 for a failed check and 2 for unusable input.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import (
    BadRequest,
    ConfigError,
    Conflict,
    GatewayError,
    ImportNotWhitelisted,
    IntegrityError,
    InvalidSession,
    NotWhitelisted,
)
from gateway.session.lenient_json import field_of, line_of
from gateway.settings import DEFAULT_CONFIG, Settings, load_settings, with_server_flags
from gateway.visible import json_escaped

T = TypeVar("T")
RETIRE_GRACE_SECONDS = 10
"""How long after a rotation ``keys retire`` waits: running gateways follow a key file within a
second or two, and must not wrap new sessions under a key that is already retired."""


def _fail(message: str, code: int = 2) -> int:
    print(f"sessiongate: error: {message}", file=sys.stderr)
    return code


def _bad_tenant(tenant: str) -> str | None:
    """Why *tenant* cannot be a tenant's name (``settings.TENANT_PATTERN``), or None when it can."""
    import re

    from gateway.settings import TENANT_PATTERN

    if re.fullmatch(TENANT_PATTERN, tenant):
        return None
    return f"--tenant {tenant!r} is not a valid tenant name: use 1-64 letters, digits, '_', '.' or '-'"


def _no_tenant(tenant: str, known: list[str], why: str) -> str:
    """The refusal of a ``--tenant`` the store does not know (a typo would otherwise look like an
    empty tenant), naming the tenants it does know."""
    return f"no tenant '{tenant}': {why} (tenants: {', '.join(known) or 'none'})"


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(Path(args.config) if args.config else None)


def _run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


# --- serve -----------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from gateway import logs
    from gateway.app import STANDIN, build_app
    from gateway.handlers import SERVICES

    # every environment variable the file names is checked with the file: all findings at once
    settings = with_server_flags(load_settings(Path(args.config) if args.config else None, environment=True),
                                 host=args.host, port=args.port)
    server = settings.server
    from gateway import workers
    index = workers.worker_index()
    count = args.workers if args.workers is not None else workers.default_workers(settings.store.backend)
    if count < 1:
        return _fail(f"--workers {count}: must be at least 1 (the number of gateway processes sharing the port)")
    if count > (most := workers.max_workers()):
        return _fail(f"--workers {count}: at most {most} on this machine ({workers.WORKERS_PER_CPU} per CPU, "
                     f"{os.cpu_count() or 1} CPUs): each worker is a whole gateway with its own store connections "
                     "and memory; one per core the gateway may use is the most that helps")
    if index is None:  # a worker's port is already bound by its siblings (SO_REUSEPORT)
        preflight(settings, flags={name for name in ("host", "port") if getattr(args, name) is not None})
    else:
        workers.die_with_supervisor()
    logs.configure(settings.logging.level, settings.logging.format)
    if index is None and count > 1:
        return workers.Supervisor(workers.worker_argv(), count, settings.server.shutdown_timeout).run()
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
        if app[STANDIN]:
            lines.append("  upstream  *** BUILT-IN STAND-IN MODEL: no upstream configured; replies are canned ***")
        else:
            lines.append(f"  upstream  {', '.join(services.upstreams.names)}")
        lines += [f"  warning   {w}" for w in services.policies.current.warnings]  # what `policy check` says
        print("\n".join(lines), file=sys.stderr, flush=True)

    if not index:  # a single gateway, or the first worker
        app.on_startup.append(banner)
    try:
        import uvloop
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop_factory = None
    from gateway.server import run
    run(app, settings, loop_factory)
    return 0


def preflight(settings: Settings, flags: Collection[str] = ()) -> None:
    """What ``serve`` checks before it writes anything to disk (key file, database), after the
    settings were loaded with every environment variable they name (``load_settings(...,
    environment=True)``): the listen address resolves and the port is free. Raises
    ``ConfigError`` saying what to do, naming the flag when the value is one of *flags* (``host``,
    ``port``: given on the command line), else the file and the setting."""
    import errno
    import socket

    def refusal(message: str, name: str) -> ConfigError:
        if name in flags:
            return ConfigError(message, field=f"--{name}")
        return ConfigError(message, file=settings.source, field=f"server.{name}")

    host, port = settings.server.host, settings.server.port
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise refusal(f"cannot resolve the listen address {host!r}", "host") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise refusal(f"port {port} on {host} is already in use: stop the process that holds it or "
                              "choose another with --port", "port") from None
            raise refusal(f"cannot listen on {host}:{port}: {exc.strerror}", "port") from None


# --- clients ---------------------------------------------------------------------------

def cmd_clients_new(args: argparse.Namespace) -> int:
    from gateway.settings import RESERVED_TENANT
    from gateway.store.base import SYSTEM_TENANT

    bad = _bad_tenant(args.tenant)
    if bad is not None:
        return _fail(bad)
    if args.tenant == SYSTEM_TENANT:
        return _fail(f"--tenant: {RESERVED_TENANT}")
    if args.name is not None and not args.name.strip():
        return _fail("--name must not be empty")
    key = "sg-" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(key.encode()).hexdigest()
    print(f"client key (give it to the client; it is not stored anywhere): {key}", file=sys.stderr)
    print("add this to 'clients:' in your configuration:")
    print(f"  - name: {args.name or args.tenant + '-client'}\n    tenant: {args.tenant}\n    key_sha256: {digest}")
    return 0


# --- sessions --------------------------------------------------------------------------

async def _with_sessions(settings: Settings, fn: Callable[[Any], Awaitable[T]]) -> T:
    from gateway.app import holds_data_keys, key_provider, open_store
    from gateway.keyring import Keyring
    from gateway.sessions import SessionService

    store = open_store(settings)
    await store.open()
    try:
        provider = key_provider(settings, store_has_data_keys=await holds_data_keys(store))
        svc = SessionService(store, Keyring.from_provider(provider))
    except BaseException:
        await store.close()
        raise
    try:
        return await fn(svc)
    finally:
        await svc.erasures.stop()
        await store.close()


async def _import_policy(settings: Settings, store: Any, tenant: str, session_id: str,
                         model: str | None = None, *, writes: bool = True, model_file: str | None = None) -> Any:
    """The policy that matches a session the CLI writes to now; its version is kept in the store
    (as the gateway keeps every version it loads), so the rounds written under it are governed
    by it and verify. Where *writes* (messages or a memo), without a model when the policy
    depends on one, ``BadRequest`` saying to pass ``--model``, and with a model no upstream of
    the settings serves (the gateway would run no round with it), ``ConfigError`` naming
    ``--model`` or, when the model came from it, *model_file*'s ``model``
    (``session.importing.session_policy``)."""
    from gateway.app import model_routes
    from gateway.policy import load_policy_set
    from gateway.policy.versions import PolicyVersions
    from gateway.session.importing import session_policy

    policies = load_policy_set(settings.policies.path, hook_modules=settings.policies.hook_modules)
    await PolicyVersions(store).record(policies)
    if not writes:
        return policies.match(tenant, model, session_id)
    try:
        return session_policy(policies, tenant, model, session_id, upstreams=model_routes(settings),
                              pass_model="--model")
    except BadRequest as exc:
        if exc.code != "model_not_found":
            raise
        raise ConfigError(exc.message, file=model_file, field="model" if model_file else "--model") from None


def cmd_sessions(args: argparse.Namespace) -> int:
    from gateway.handlers import new_request_id
    from gateway.stages.resolve_session import check_session_id

    settings = _settings(args)
    tenant = args.tenant
    bad = _bad_tenant(tenant)
    if bad is not None:
        return _fail(bad)
    sid = check_session_id(args.id) if getattr(args, "id", None) else ""

    async def act(svc: Any) -> int:
        if args.action == "list":
            known = await svc.store.tenants()
            if tenant not in known:  # a mistyped tenant would list nothing, as an empty one does
                return _fail(_no_tenant(tenant, known, "no sessions and no audit chain in the store"))
            after = check_session_id(args.after) if args.after else None
            rows = await svc.page_sessions(tenant, after=after, limit=args.limit + 1)
            quarantined = await svc.store.quarantined(tenant)
            for s in rows[: args.limit]:
                mark = f"\tquarantined (audit entry {quarantined[s.session_id]})" if s.session_id in quarantined else ""
                print(f"{s.session_id}\trounds={s.rounds}\tversion={s.version}{mark}")
            if quarantined:
                print(f"{len(quarantined)} quarantined session(s) of tenant {tenant}: their data failed an integrity "
                      "check; 'sessiongate audit verify' says what differs, 'sessions release' or 'sessions erase' "
                      "ends a quarantine", file=sys.stderr)
            if len(rows) > args.limit:
                print(f"more sessions follow: add --after {rows[args.limit - 1].session_id}", file=sys.stderr)
        elif args.action == "export":
            print(json_escaped(json.dumps(await svc.export(tenant, sid), indent=2, ensure_ascii=False)))
        elif args.action == "import":
            from gateway.session.lenient_json import JSON5Error, loads_json5

            source = sys.stdin.read() if args.file in (None, "-") else _read_text(args.file)
            try:
                data = loads_json5(source.removeprefix("\ufeff"))  # JSON or JSON5, as Agently loads
            except JSON5Error as exc:
                raise ConfigError("neither JSON nor JSON5", file=args.file or "<stdin>", line=exc.line,
                                  column=exc.column) from None
            policy = await _import_policy(settings, svc.store, tenant, sid, _import_model(args.model, data, args.file),
                                          model_file=None if args.model is not None else args.file or "<stdin>")
            try:
                added = await svc.import_agently(tenant, sid, data, new_request_id(), policy)
            except (InvalidSession, ImportNotWhitelisted) as exc:  # the file, the line and the field
                field = field_of(exc.message)
                raise ConfigError(exc.message, file=args.file or "<stdin>",
                                  line=line_of(source, field) if field else None) from None
            except Conflict:
                return _fail(f"session {tenant}/{sid} already holds a different history, and recorded history is "
                             f"append-only: erase it first ('sessiongate sessions erase --tenant {tenant} {sid}') "
                             "or import into a new id", code=1)
            print(f"imported {added} messages into {tenant}/{sid}")
        elif args.action == "reset":
            await svc.reset(tenant, sid, new_request_id())
            print(f"reset the context window of {tenant}/{sid}")
        elif args.action in ("delete", "erase"):
            if await svc.erase(tenant, sid, new_request_id()) or await svc.erasures.wait(args.wait):
                print(f"erased {tenant}/{sid}: its data key and rows are destroyed")
            else:
                print(f"erased {tenant}/{sid}: its data key and rows are deleted, but another connection holds "
                      "a read transaction, so their bytes stay in the write-ahead log until it ends. The erasure "
                      "is recorded as pending in the store: a running gateway finishes it within seconds of the "
                      "reader ending (an 'erasure_completed' audit entry), and so does the next gateway to start, "
                      "or this command run again", file=sys.stderr)
                return 3
        elif args.action == "release":
            reason = await svc.release(tenant, sid, new_request_id())
            print(f"released {tenant}/{sid} from quarantine (it was quarantined for: {reason}); a check that "
                  "fails again quarantines it again")
        return 0

    return _run(_with_sessions(settings, act))


def _import_model(flag: str | None, data: Any, file: str | None) -> str | None:
    """The model an import's policy is matched with: ``--model``, or the document's ``model``
    (an error naming the file when they differ, or when the document's is not a model name)."""
    from gateway.stages.parse_request import check_model

    in_file = data.get("model") if isinstance(data, dict) else None
    try:
        check_model(in_file)
    except BadRequest as exc:
        raise ConfigError(exc.message, file=file or "<stdin>", field="model") from None
    if flag is not None and in_file is not None and flag != in_file:
        raise ConfigError(f"'model' is {in_file!r} but --model is {flag!r}: pass one", file=file or "<stdin>",
                          field="model")
    return flag if flag is not None else in_file


def cmd_history(args: argparse.Namespace) -> int:
    """``sessions add|set|clean|memo``: Agently's chat-history operations and the memo, each one
    transaction held to the session's policy (see ``gateway.session.history``). Under a hook
    strategy the hooks run here, before the command returns; ``summarize`` is left to the gateway."""
    from gateway.handlers import new_request_id
    from gateway.session.bounding import maintain
    from gateway.session.history import change_history, needs_hooks, parse_messages, write_memo
    from gateway.stages.resolve_session import check_session_id

    settings = _settings(args)
    bad = _bad_tenant(args.tenant)
    if bad is not None:
        return _fail(bad)
    tenant, sid = args.tenant, check_session_id(args.id)
    document: Any = None
    source = ""
    if args.action in ("add", "set") or (args.action == "memo" and args.file is not None):
        source = sys.stdin.read() if args.file in (None, "-") else _read_text(args.file)
        try:
            document = json.loads(source)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"not valid JSON: {exc.msg}", file=args.file or "<stdin>", line=exc.lineno,
                              column=exc.colno) from None

    async def no_summarizer(model: str | None, messages: Any, timeout: float) -> str:
        raise RuntimeError("the CLI does not call the model")

    async def act(svc: Any) -> int:
        writes = args.action in ("add", "set") or (args.action == "memo" and args.file is not None)
        # keeps the version it writes under; what writes messages or a memo is held to the rounds' policy
        policy = await _import_policy(settings, svc.store, tenant, sid, args.model, writes=writes)
        if args.action == "memo":
            if args.file is None:
                loaded = await svc.load(tenant, sid)
                if loaded is None:
                    raise ConfigError(f"no session '{sid}' for tenant '{tenant}'")
                print(json_escaped(json.dumps(loaded.state.memo, indent=2, ensure_ascii=False)))
            else:
                await write_memo(svc, policy, tenant, sid, document, new_request_id())
                print(f"wrote the memo of {tenant}/{sid}")
            return 0
        op = "clean_context_window" if args.action == "clean" else args.action
        try:
            messages = parse_messages(document.get("messages") if isinstance(document, dict) and "role" not in document
                                      else document) if op in ("add", "set") else []
            result = await change_history(svc, policy, tenant, sid, op, messages, new_request_id())
        except (BadRequest, NotWhitelisted) as exc:  # the file, the line and the message
            raise ConfigError(exc.message, file=args.file or "<stdin>",
                              line=_message_line(source, document, field_of(exc.message))) from None
        if needs_hooks(policy, result.state):
            await maintain(svc, tenant, sid, policy, no_summarizer, args.model)
        loaded = await svc.load(tenant, sid)
        window = len(loaded.state.context_window) if loaded else 0
        print(f"{op}: {result.recorded} messages recorded in {tenant}/{sid}; the window holds {window}")
        return 0

    return _run(_with_sessions(settings, act))


# --- policy ----------------------------------------------------------------------------

def cmd_policy_check(args: argparse.Namespace) -> int:
    from gateway.policy import main_check

    paths = args.paths
    settings = _settings(args) if not paths or args.config or DEFAULT_CONFIG.exists() else Settings()
    if not paths:
        paths = [str(settings.policies.path)]
    # hooks only from the configuration's allow-list: checking an untrusted file imports nothing else
    return main_check(paths, hook_modules=settings.policies.hook_modules)


def _message_line(source: str, document: Any, field: str | None) -> int | None:
    """The line of *source* where the ``messages[i]`` an error names starts: the document is the
    list itself, ``{"messages": [...]}``, or one message."""
    if field is None or not field.startswith("messages["):
        return None
    if isinstance(document, list):
        return line_of(source, field[len("messages"):])
    if isinstance(document, dict) and "role" in document:
        return line_of(source, field[len("messages[0]"):].lstrip("."))
    return line_of(source, field)


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {getattr(exc, 'strerror', None) or exc}", file=path) from None


def _load_json_file(path: str) -> Any:
    """A JSON file the way the gateway reads a body: nested at most ``MAX_JSON_DEPTH`` deep."""
    return _load_json_text(path)[1]


def _load_json_text(path: str) -> tuple[str, Any]:
    """:func:`_load_json_file`'s text and value."""
    from gateway.stages.parse_request import MAX_JSON_DEPTH

    text = _read_text(path)
    too_deep = _nesting_past(text, MAX_JSON_DEPTH)
    if too_deep is not None:
        line = text.count("\n", 0, too_deep) + 1
        raise ConfigError(f"nested more than {MAX_JSON_DEPTH} levels deep (the gateway refuses such a body)",
                          file=path, line=line, column=too_deep - (text.rfind("\n", 0, too_deep) + 1) + 1) \
            from None
    try:
        return text, json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON: {exc.msg}", file=path, line=exc.lineno, column=exc.colno) from None


def _field_line(text: str, message: str) -> int | None:
    """The line of the JSON *text* holding the value the error *message* names first; for a
    field that is missing, the line where the object that lacks it starts."""
    import re

    field = field_of(message)
    while field is not None:
        line = line_of(text, field)
        if line is not None or not field:
            return line
        field = re.sub(r"(?:^|\.)[A-Za-z_]+$|\[\d+\]$", "", field)
    return None


def _nesting_past(text: str, limit: int) -> int | None:
    """The offset of the first bracket nested deeper than *limit* (outside strings), else None."""
    depth, in_string, escaped = 0, False, False
    for offset, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return offset
        elif char in "]}":
            depth -= 1
    return None


def cmd_policy_explain(args: argparse.Namespace) -> int:
    import yaml

    from gateway.codecs import by_name
    from gateway.policy import load_policy_set
    from gateway.policy.explain import detect_protocol, explain
    from gateway.stages.parse_request import check_chat
    from gateway.stages.resolve_session import check_session_id

    settings = _settings(args)
    policies = load_policy_set(Path(args.policies) if args.policies else settings.policies.path,
                               hook_modules=settings.policies.hook_modules)
    text, request = _load_json_text(args.request)
    if not isinstance(request, dict):
        raise ConfigError("must hold a request object (Chat Completions, Responses or Messages)", file=args.request)
    protocol = getattr(args, "protocol", None) or detect_protocol(request)
    try:
        if protocol == "chat":
            check_chat(request)
        else:
            by_name(protocol).check(request)
    except GatewayError as exc:  # what the gateway would answer with 400, at the request file's line
        raise ConfigError(f"{exc.message} (as a {protocol} request)", file=args.request,
                          line=_field_line(text, exc.message)) from None
    reply_text, reply = _load_json_text(args.reply) if args.reply else ("", None)
    sid = check_session_id(args.session) if args.session else None
    state = None
    if sid is not None and args.load_state:
        loaded = _run(_with_sessions(settings, lambda svc: svc.load(args.tenant, sid)))
        state = loaded.state if loaded else None
    try:
        report = explain(policies, request, tenant=args.tenant, session_id=sid, reply=reply, state=state,
                         protocol=protocol)
    except (ValueError, GatewayError) as exc:
        message = exc.message if isinstance(exc, GatewayError) else str(exc)
        raise ConfigError(message, file=args.reply, line=_field_line(reply_text, message) if args.reply else None) \
            from None
    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    _Dumper.add_multi_representer(str, _str)  # str subclasses too (record.KeyedText)
    print(yaml.dump(report, Dumper=_Dumper, allow_unicode=True, sort_keys=False, width=100), end="")
    return 0


def _policy_dir(args: argparse.Namespace, given: str | None) -> Path:
    return Path(given) if given else _settings(args).policies.path


def cmd_policy_test(args: argparse.Namespace) -> int:
    from gateway.policy.cases import main_test

    return main_test(_policy_dir(args, args.policy_dir), [Path(p) for p in args.cases])


def cmd_policy_diff(args: argparse.Namespace) -> int:
    from gateway.policy import load_policy_set
    from gateway.policy.cases import load_cases
    from gateway.policy.diff import diff_sets

    old, new = load_policy_set(Path(args.old)), load_policy_set(Path(args.new))
    cases = load_cases([Path(p) for p in args.cases]) if args.cases else []
    result = diff_sets(old, new, cases)
    if args.format == "json":
        print(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
    else:
        print("\n".join(result.render()))
    return result.exit_code


# --- keys ------------------------------------------------------------------------------

def _key_file(settings: Settings) -> Path:
    if settings.keys.master_key_env or settings.keys.master_key_file is None:
        raise ConfigError("keys are read from an environment variable; manage them where it is set",
                          file=settings.source, field="keys.master_key_env")
    return settings.keys.master_key_file


def cmd_keys(args: argparse.Namespace) -> int:
    """``keys generate|list|rotate|rewrap|retire``. A command that changes the key file first loads
    the settings, the key file and the store, so that a configuration or store it cannot use
    leaves the file as it was: ``generate`` refuses a store that holds data keys (a new keyring
    could unwrap none of them); ``rotate`` writes its new primary only once the store is open, and
    when the re-wrap then stops (the store went away, Ctrl-C) says that the new key is in place and
    that ``keys rewrap`` finishes the job; ``retire`` counts the key's data keys first."""
    import datetime

    from gateway import keyring as kr

    settings = _settings(args)
    if args.action == "generate":
        path = _key_file(settings)
        if path.exists():
            return _fail(f"{path} exists already; use 'sessiongate keys rotate' to add a new primary key")
        if _run(_store_holds_data_keys(settings)):
            return _fail(f"{path}: keys.master_key_file: the store holds data keys that only the keyring they were "
                         "wrapped with can unwrap (a new keyring could read none of the stored sessions): restore "
                         "the key file from your backup instead")
        if not kr.ensure(path):
            return _fail(f"{path} exists already; use 'sessiongate keys rotate' to add a new primary key")
        print(f"generated a keyring with one primary master key at {path} (mode 0600); back it up")
        return 0
    from gateway.app import key_provider
    provider = key_provider(settings)
    if args.action in ("rotate", "retire") and not isinstance(provider, kr.FileKeyProvider):
        return _fail(f"the keyring comes from {provider.describe()}, which is read-only here: "
                     "rotate it where it is kept and restart the gateways")
    if args.action == "list":
        async def counts(svc: Any) -> dict[str, int]:
            return {info.id: await svc.store.count_data_keys(info.id) for info in kr.list_keys(provider)}
        used = _run(_with_sessions(settings, counts))
        for info in kr.list_keys(provider):
            when = datetime.datetime.fromtimestamp(info.created_at, datetime.UTC).isoformat(timespec="seconds")
            print(f"{info.id}\t{info.state}\tcreated {when}\twraps {used.get(info.id, 0)} data keys")
        return 0
    if args.action in ("rotate", "rewrap"):
        from gateway.keys import rewrap_all
        kr.list_keys(provider)  # the key file loads (there, private, valid) before anything is opened
        rewrapping_for: list[str] = []  # the primary being re-wrapped for, once the store is open

        async def rotate(svc: Any) -> Any:
            # the settings, the store and the keyring are usable: only now does the key file change
            if args.action == "rotate":
                new = kr.rotate(provider)
                print(f"new primary master key {new.id}; re-wrapping data keys...", flush=True)
                svc.keyring = kr.Keyring.from_provider(provider)
            rewrapping_for.append(svc.keyring.primary_id)
            return await rewrap_all(svc)
        try:
            report = _run(_with_sessions(settings, rotate))
        except (GatewayError, KeyboardInterrupt) as exc:
            if not rewrapping_for:
                raise
            why = exc.message if isinstance(exc, GatewayError) else "interrupted"
            return _fail(f"re-wrapping stopped ({why}): the primary master key {rewrapping_for[0]} is in the key "
                         "file; data keys not re-wrapped yet stay under their old key, which still unwraps them "
                         "('sessiongate keys list' counts them). Run 'sessiongate keys rewrap' (once the store "
                         "answers) to finish; do not retire an old key that still wraps one", 1)
        print(f"re-wrapped {report.rewrapped} data keys ({report.already_primary} already under "
              f"{rewrapping_for[0]}); the old key stays for unwrapping until you retire it")
        if report.failed:
            return _fail(f"{report.failed} data keys could not be re-wrapped and stay under their old master key "
                         "(each is named in a rewrap_integrity_error log line; 'sessiongate audit verify' "
                         "reports their sessions); do not retire an old key that still wraps one", 1)
        return 0
    if args.action == "retire":
        if not args.key_id:
            return _fail("keys retire needs the id of the key to retire (see 'sessiongate keys list')")
        in_use = _run(_with_sessions(settings, lambda svc: svc.store.count_data_keys(args.key_id)))
        keys = kr.list_keys(provider)
        primary = max(keys, key=lambda info: info.created_at)
        age = time.time() - primary.created_at
        known = any(info.id == args.key_id and info.state == "active" for info in keys)
        if known and in_use == 0 and age < RETIRE_GRACE_SECONDS and not args.force:
            return _fail(f"the primary key {primary.id} is only {age:.0f} s old: running gateways may still wrap new "
                         f"sessions under {args.key_id}; retry in {RETIRE_GRACE_SECONDS} s (or pass --force)")
        kr.retire(provider, args.key_id, in_use=in_use)
        print(f"retired {args.key_id}: its key bytes are destroyed in {provider.describe()}, so data keys it "
              "wrapped (erased sessions' keys in old WAL, replicas and database backups) can no longer be "
              "unwrapped with this file. Copies of the key file from before now (key file backups, "
              "'sessiongate backup' folders) still hold it: destroy those too")
        return 0
    return _fail(f"unknown keys action {args.action}")


async def _store_holds_data_keys(settings: Settings) -> bool:
    """Whether the configured store holds any data key (opening it as ``serve`` does)."""
    from gateway.app import holds_data_keys, open_store

    store = open_store(settings)
    await store.open()
    try:
        return await holds_data_keys(store)
    finally:
        await store.close()


# --- audit and export --------------------------------------------------------------------

def cmd_audit(args: argparse.Namespace) -> int:
    """``audit verify``: the chain and checkpoints of every tenant, then the stored rows against
    the chain (exit 1 naming tenant, session and round of the first mismatch); ``--bundle``
    verifies an export offline with the public key alone, no configuration file needed.
    A ``--checkpoints`` file that does not exist is unusable input (exit 2); one that holds no
    checkpoint (or a configured ``audit.checkpoint_file`` not written yet) is a warning that
    nothing was checked against checkpoints."""
    from gateway.audit import CheckpointLog, load_public_key
    from gateway.auditor import AuditTrail

    if args.action == "verify" and args.bundle:
        return _verify_bundle(args)
    settings = _settings(args)
    if args.action == "public-key":
        sys.stdout.write(AuditTrail(settings).signer.public_key_pem().decode())
        return 0
    trail = AuditTrail(settings)
    public_key = load_public_key(Path(args.public_key)) if args.public_key else None
    checkpoint_path = Path(args.checkpoints) if args.checkpoints else settings.audit.checkpoint_file
    if not checkpoint_path.is_file():
        if args.checkpoints:
            return _fail(f"checkpoint file not found: {checkpoint_path}")
        print(f"sessiongate: warning: no checkpoint file at {checkpoint_path}: nothing was checked against "
              "checkpoints", file=sys.stderr)
    checkpoints = list(CheckpointLog(checkpoint_path))
    if not checkpoints and checkpoint_path.is_file():
        print(f"sessiongate: warning: {checkpoint_path} holds no checkpoints: nothing was checked against "
              "checkpoints", file=sys.stderr)

    async def verify(svc: Any) -> int:
        known = await trail.tenants(svc.store, checkpoints)
        if args.tenant and args.tenant not in known:
            return _fail(_no_tenant(args.tenant, known, "nothing in the store and no signed checkpoint"))
        tenants = [args.tenant] if args.tenant else known
        failed = 0
        for tenant in tenants:
            report = await trail.verify(svc.store, tenant, checkpoints=checkpoints, public_key=public_key,
                                        open_key=svc.unwrap)
            print(report.summary())
            for note in report.notes:
                print(f"     note: {note}")
            failed += not report.ok
        return 1 if failed else 0

    return _run(_with_sessions(settings, verify))


def _verify_bundle(args: argparse.Namespace) -> int:
    """Offline: reads only the bundle and the public key (no configuration, no store). A
    ``--bundle`` path that is not a readable file is unusable input (exit 2), as a missing
    ``--checkpoints`` file is; a bundle that lacks one of its other files fails (exit 1)."""
    from gateway.export import verify_bundle
    if not args.public_key:
        return _fail("verifying a bundle offline needs --public-key FILE (from 'sessiongate audit public-key')")
    given = Path(args.bundle)
    if not given.is_file():
        what = "is a folder" if given.is_dir() else "not found"
        return _fail(f"--bundle {given}: {what}; name an export's records file or its .manifest.json")
    try:
        report = verify_bundle(given, Path(args.public_key))
    except OSError as exc:  # a file of the bundle that exists but cannot be read
        return _fail(f"--bundle {given}: cannot read {exc.filename or given}: {exc.strerror or exc}")
    print(report.summary())
    for note in report.notes:
        print(f"     note: {note}")
    return 0 if report.ok else 1


def cmd_export(args: argparse.Namespace) -> int:
    from gateway.auditor import AuditTrail
    from gateway.export import Progress
    from gateway.handlers import parse_time
    from gateway.policy import load_policy_set
    from gateway.stages.resolve_session import check_session_id

    settings = _settings(args)
    policies = load_policy_set(settings.policies.path, hook_modules=settings.policies.hook_modules)
    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
    except ValueError:
        return _fail("--since/--until take an ISO 8601 time (2026-01-31T00:00:00) or a Unix timestamp")
    sid = check_session_id(args.session) if args.session else None
    folder = Path(args.out).resolve().parent
    if not folder.is_dir():
        return _fail(f"--out {args.out}: the folder {folder} does not exist; create it first")
    trail = AuditTrail(settings)

    async def export(svc: Any) -> dict[str, Any]:
        svc.store = trail.observe(svc.store)
        return await trail.export(svc, policies, Path(args.out), tenant=args.tenant, fmt=args.format,
                                  session_id=sid, since=since, until=until, progress=Progress())

    try:
        manifest = _run(_with_sessions(settings, export))
    except OSError as exc:  # the bundle's files could not be made there (a read-only or special folder)
        if exc.filename is None or Path(exc.filename).resolve().parent != folder:
            raise
        return _fail(f"--out {args.out}: cannot write the export in {folder} ({exc.strerror}); choose a folder "
                     "you can write to")
    except IntegrityError as exc:  # the operator runs the CLI: the detail (names and seqs, no content) is theirs
        return _fail(f"export refused (the stored data failed an integrity check), nothing written: {exc.detail}. "
                     f"Run 'sessiongate audit verify --tenant {args.tenant}' for the whole report")
    records = manifest["records"]
    print(f"exported {records['count']} records ({records['sessions']} sessions) to {args.out}; "
          f"manifest and audit entries beside it; checkpoint seq {manifest['checkpoint']['seq']}")
    return 0


def cmd_db_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings.store.backend != "postgres":
        print(f"the SQLite store ({settings.store.path}) migrates itself when it opens; nothing to do")
        return 0
    from gateway.store.postgres import SCHEMA_VERSION, PostgresStore

    store = PostgresStore(settings.store.postgres_dsn(), schema=settings.store.schema_name, pool_size=1)
    applied = _run(store.migrate())
    if applied:
        print(f"applied migrations {', '.join(map(str, applied))} to schema {settings.store.schema_name}")
    else:
        print(f"schema {settings.store.schema_name} is up to date (version {SCHEMA_VERSION})")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    from gateway.policy import load_policy_set
    from gateway.retention import purge_expired

    settings = _settings(args)
    policies = load_policy_set(settings.policies.path, hook_modules=settings.policies.hook_modules)
    totals = _run(_with_sessions(settings, lambda svc: purge_expired(svc, policies)))
    print(f"purged {totals['rounds']} expired rounds; erased {totals['sessions']} sessions")
    if totals["skipped"]:
        print(f"sessiongate: warning: skipped {totals['skipped']} quarantined session(s), whose expired rounds "
              "stay until they are released or erased (sessiongate sessions release / erase)", file=sys.stderr)
    if totals["versions_missing"]:
        print(f"sessiongate: error: kept {totals['versions_missing']} round(s) whose recorded policy version is "
              "missing from the store's policy_versions table (retention_policy_version_missing above names "
              "each version): their retention is unknown; run 'sessiongate audit verify'", file=sys.stderr)
        return 1
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    """An online, consistent backup of everything a restore needs, in the order that keeps it
    consistent: the keyring, the audit signing key, the checkpoint file, the export secret (when
    it is a file: exports made after a restore keep their pseudonyms), then the database (so
    every data key in the copy is wrapped by a key the copied keyring holds, and every copied
    checkpoint covers a prefix of the copied chain). SQLite only; PostgreSQL is backed up with
    ``pg_dump`` in the same order (see the README)."""
    import shutil
    import sqlite3

    settings = _settings(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _fail(f"--out {out}: it is a file, not a folder; name a new (or empty) folder to back up into")
    if out.exists() and any(out.iterdir()):
        return _fail(f"--out {out}: the folder is not empty; back up into a new folder")
    if not out.parent.is_dir():
        return _fail(f"--out {out}: the folder {out.parent} does not exist; create it first")
    if settings.store.backend != "sqlite":
        return _fail("the store is PostgreSQL: copy the keyring, signing key and checkpoint file, then run "
                     "pg_dump (see 'Backups' in the README)")
    sources: list[tuple[str, Path]] = []
    key_file = settings.keys.master_key_file
    if settings.keys.master_key_env or key_file is None:
        print("the master keys come from an environment variable: back them up where they are kept",
              file=sys.stderr)
    else:
        sources.append(("master-keys.json", key_file))
    sources += [("audit-signing.key", settings.audit.signing_key_file),
                ("checkpoints.jsonl", settings.audit.checkpoint_file)]
    if not settings.audit.export_secret_env:  # the pseudonyms of exports made so far and from now on
        sources.append(("export-secret", settings.audit.signing_key_file.parent / "export-secret"))
    for name, path in sources:
        if name not in ("checkpoints.jsonl", "export-secret") and not path.is_file():  # the secret: made below
            return _fail(f"{path} does not exist: nothing to back up for {name}")
    if not settings.store.path.is_file():
        return _fail(f"{settings.store.path} does not exist: there is no database to back up")
    if not settings.audit.export_secret_env:
        from gateway.auditor import export_secret
        export_secret(settings)  # made now when no export has made it yet, so a restore keeps the pseudonyms
    umask = os.umask(0o077)  # every copy is made 0600 (the folder 0700) from its first byte
    try:
        out.mkdir(mode=0o700, exist_ok=True)
        for name, path in sources:
            if path.is_file():
                shutil.copyfile(path, out / name)
        target = out / "sessiongate.db"
        source = sqlite3.connect(f"file:{settings.store.path}?mode=ro", uri=True, timeout=30)
        copy = sqlite3.connect(target)
        try:
            source.backup(copy)
        finally:
            copy.close()
            source.close()
    except OSError as exc:
        return _fail(f"--out {out}: cannot write the backup there ({exc.strerror}: {exc.filename}); choose a "
                     "folder you can write to")
    finally:
        os.umask(umask)
    names = ", ".join(name for name, path in sources if (out / name).is_file())
    print(f"backed up {names} and the database to {out}")
    return 0


# --- parser ----------------------------------------------------------------------------

CONFIG_HELP = f"configuration file (default {DEFAULT_CONFIG})"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sessiongate")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "unknown"


def _page_limit(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 1000:
        raise argparse.ArgumentTypeError("must be a whole number from 1 to 1000")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sessiongate", description="A recording gateway for LLM traffic.")
    p.add_argument("--config", help=f"configuration file (default {DEFAULT_CONFIG})")
    p.add_argument("--version", action="version", version=f"sessiongate {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
    s.add_argument("--host", help="address to listen on (default: server.host of the configuration)")
    s.add_argument("--port", type=int, help="port to listen on (default: server.port of the configuration)")
    s.add_argument("--workers", type=int, help="gateway processes sharing the port (default 1); see gateway/workers.py "
                   "and the README's Performance section")
    s.set_defaults(fn=cmd_serve)

    c = sub.add_parser("clients", help="client keys: new").add_subparsers(dest="action", required=True)
    cn = c.add_parser("new", help="make a client key and the line for the configuration")
    cn.add_argument("--tenant", required=True, help="the tenant the key belongs to (letters, digits, _ . -)")
    cn.add_argument("--name", help="the client's name in logs and the configuration (default: TENANT-client)")
    cn.set_defaults(fn=cmd_clients_new)

    ss = sub.add_parser("sessions", help="sessions: list, export, import, reset, delete, erase, release; their "
                        "history: add, set, clean, memo").add_subparsers(
        dest="action", required=True)
    for action, text in (("list", "the tenant's sessions"), ("export", "a session as Agently JSON"),
                         ("import", "load Agently JSON into a session"), ("reset", "clear a session's window"),
                         ("delete", "erase a session (same as erase)"), ("erase", "crypto-shred a session"),
                         ("release", "lift the quarantine of a session that failed an integrity check")):
        sp = ss.add_parser(action, help=text)
        sp.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
        sp.add_argument("--tenant", required=True, help="the tenant that owns the session(s)")
        if action == "list":
            sp.add_argument("--limit", type=_page_limit, default=100,
                            help="at most this many sessions, in id order (default 100, at most 1000)")
            sp.add_argument("--after", help="start after this session id (the last id of the previous page)")
        else:
            sp.add_argument("id", help="session id")
        if action == "import":
            sp.add_argument("file", nargs="?", help="Agently JSON file (default: standard input)")
            sp.add_argument("--model", help="model to match the session's policy with (default: the file's "
                                            "'model', else none)")
        if action in ("delete", "erase"):
            sp.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                            help="how long to wait for a reader of the store to end before exiting 3 with the "
                                 "erasure pending (default 10)")
        sp.set_defaults(fn=cmd_sessions)

    for action, text in (("add", "Agently's add_chat_history: append messages (JSON file or stdin)"),
                         ("set", "Agently's set_chat_history: make messages the window (JSON file or stdin)"),
                         ("clean", "Agently's clean_context_window: empty the window"),
                         ("memo", "print the memo, or replace it with the JSON value in FILE ('-': stdin)")):
        sp = ss.add_parser(action, help=text)
        sp.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
        sp.add_argument("--tenant", required=True, help="the tenant that owns the session")
        sp.add_argument("--model", help="model to match the session's policy with (default: none)")
        sp.add_argument("id", help="session id")
        if action != "clean":
            sp.add_argument("file", nargs="?", help="JSON: a message list, {\"messages\": [...]}, or the memo")
        else:
            sp.set_defaults(file=None)
        sp.set_defaults(fn=cmd_history)

    pol = sub.add_parser("policy", help="policy files: check, explain, test, diff").add_subparsers(
        dest="action", required=True)
    pc = pol.add_parser("check", help="validate policy files; exit 1 on any error")
    pc.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
    pc.add_argument("paths", nargs="*", help="policy files or folders (default: the configured policies folder)")
    pc.set_defaults(fn=cmd_policy_check)
    pe = pol.add_parser("explain", help="which policy a request gets, and what it would record and inject")
    pe.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
    pe.add_argument("--request", required=True, help="request JSON file: Chat Completions, Responses or Messages")
    pe.add_argument("--reply", help="reply JSON file: a chat.completion, an assistant message or a string (chat); "
                                    "a response or message object (responses, messages)")
    pe.add_argument("--tenant", default="default", help="the tenant the request comes from (default: default)")
    pe.add_argument("--session", help="session id (without one nothing is recorded or injected)")
    pe.add_argument("--policies", help="policy folder (default: the configured one)")
    pe.add_argument("--load-state", action="store_true", help="read the session's real state from the store")
    pe.add_argument("--protocol", choices=("chat", "responses", "messages"),
                    help="the request's wire protocol (default: detected: 'input' means responses, a top-level "
                         "'system' or 'max_tokens' with 'messages' means messages, else chat)")
    pe.set_defaults(fn=cmd_policy_explain)

    pt = pol.add_parser("test", help="run policy test cases; exit 1 on a failed case, 2 on an invalid file")
    pt.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
    pt.add_argument("policy_dir", nargs="?", help="policy folder (default: the configured one)")
    pt.add_argument("cases", nargs="*", help="case files or folders (default: POLICY_DIR/cases)")
    pt.set_defaults(fn=cmd_policy_test)
    pd = pol.add_parser("diff", help="what changing OLD_DIR into NEW_DIR does; exit 0 same, 1 changed, "
                        "3 widens recording, 2 invalid input")
    pd.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
    pd.add_argument("old", metavar="OLD_DIR", help="the policy folder as it is now (e.g. a checkout of main)")
    pd.add_argument("new", metavar="NEW_DIR", help="the policy folder with the change")
    pd.add_argument("--cases", nargs="+", default=[], help="case files or folders whose outcomes to compare")
    pd.add_argument("--format", choices=["text", "json"], default="text", help="output format (default text)")
    pd.set_defaults(fn=cmd_policy_diff)

    k = sub.add_parser("keys", help="master keys: generate, list, rotate, rewrap, retire")
    k.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
    k.add_argument("action", choices=["generate", "list", "rotate", "rewrap", "retire"],
                   help="what to do (rewrap: re-wrap every data key under the primary, finishing a rotation "
                   "that stopped)")
    k.add_argument("key_id", nargs="?", help="retire: the id of the master key to retire")
    k.add_argument("--force", action="store_true",
                   help=f"retire: skip the {RETIRE_GRACE_SECONDS} s wait after a rotation")
    k.set_defaults(fn=cmd_keys)

    au = sub.add_parser("audit", help="verify the audit chain; export the checkpoint public key")
    au.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
    au.add_argument("action", choices=["verify", "public-key"], help="verify the chain, or print the public key")
    au.add_argument("--tenant", help="one tenant (default: every tenant)")
    au.add_argument("--checkpoints", help="checkpoint file kept outside the database (default: configured)")
    au.add_argument("--public-key", help="PEM public key to check signatures with (default: the signing key's)")
    au.add_argument("--bundle", help="verify an export bundle offline (records file or manifest)")
    au.set_defaults(fn=cmd_audit)

    ex = sub.add_parser("export", help="redacted, verifiable export of recorded rounds")
    ex.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
    ex.add_argument("--tenant", required=True, help="the tenant whose records to export")
    ex.add_argument("--session", help="one session id (default: every session of the tenant)")
    ex.add_argument("--since", help="ISO 8601 time or Unix timestamp (inclusive)")
    ex.add_argument("--until", help="ISO 8601 time or Unix timestamp (exclusive)")
    ex.add_argument("--format", choices=["jsonl", "csv", "agently"], default="jsonl",
                    help="records format (default jsonl)")
    ex.add_argument("--out", required=True, help="records file; OUT.manifest.json and OUT.audit.jsonl go beside it")
    ex.set_defaults(fn=cmd_export)

    db = sub.add_parser("db", help="database schema: migrate").add_subparsers(dest="action", required=True)
    dm = db.add_parser("migrate", help="apply schema migrations (PostgreSQL; SQLite migrates on open)")
    dm.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
    dm.set_defaults(fn=cmd_db_migrate)

    bk = sub.add_parser("backup", help="online backup of keyring, signing key, checkpoints and SQLite database")
    bk.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
    bk.add_argument("--out", required=True, help="a new (or empty) folder to write the backup into")
    bk.set_defaults(fn=cmd_backup)

    pu = sub.add_parser("purge", help="erase rounds past their policy's retention")
    pu.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
    pu.set_defaults(fn=cmd_purge)
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
