"""Benchmark driver: direct-to-upstream vs a bare pass-through vs the gateway (on SQLite, on
PostgreSQL, and as two replicas sharing PostgreSQL), in one run.

Starts, as separate processes on free loopback ports, the stand-in model (``python -m
gateway.standin``) and every proxy process of the targets asked for (``--targets``; a target may
run several replicas, started one after the other), waits until each is ready (``/healthz`` for
the gateway, a TCP connect otherwise), warms each target up, then runs every cell — streaming
and not, at each concurrency, for each target — with ``load.run_cell`` (requests round-robin
over a target's replicas) and prints a Markdown table (see ``benchmarks/README.md`` for the
columns). With ``--repeat N`` every cell runs N times, one pass after another, and a table of
medians comes first: each figure's median over the passes, with the shares of the
pass-through's req/s and the added p50s taken within each pass (the machine's speed drifts
between passes). A target's CPU time per request is the sum of ``utime + stime`` in
``/proc/<pid>/stat`` of its processes around each cell; for PostgreSQL targets the same is
measured for the server's processes when the server runs on this host.

PostgreSQL targets use the server at ``--pg-dsn``, one fresh schema ``sg_bench_<hex>`` per target,
dropped at the end. When the server cannot be reached they are skipped, with the reason printed
and noted under the report's header line; that is not an error.

Every process it starts is ended by its PID on exit, Ctrl-C and SIGTERM included.

To add a target, append a :class:`Target` to :data:`TARGETS`; ``gateway_target(name, patch)``
deep-merges ``patch`` into the gateway's generated config.

    .venv/bin/python -m benchmarks.run [--quick] [--requests N] [--targets direct,passthrough,gateway]
        [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import secrets
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from benchmarks.load import CLIENTS, PROTOCOLS, CellResult, run_cell, run_sync
from gateway.store.postgres import describe_dsn

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = REPO / "config" / "sessiongate.yaml"
CLIENT_KEY = "sg-demo-acme"
READY_TIMEOUT = 120.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
DSN_ENV = "SESSIONGATE_BENCH_DSN"  # the gateways read the DSN from here (store.dsn_env)
PG_TIMEOUT = 5.0


class BenchDatabase:
    """The PostgreSQL server of the PostgreSQL targets: one fresh schema per target.

    Every method opens its own short connection. :meth:`unreachable` returns why the server
    cannot be used (None when it can); :meth:`drop_schemas` drops every schema handed out.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.schemas: dict[str, str] = {}

    def _run(self, query: str) -> list[asyncpg.Record]:
        async def go() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(self.dsn, timeout=PG_TIMEOUT)
            try:
                return await conn.fetch(query, timeout=PG_TIMEOUT)
            finally:
                await conn.close()

        return asyncio.run(go())

    def unreachable(self) -> str | None:
        try:
            self._run("SELECT 1")
        except (OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            return f"{type(exc).__name__}: {exc}"  # TimeoutError is an OSError; a bad DSN a ValueError
        return None

    def schema(self, target: str) -> str:
        """The target's schema name, made up on first use (the gateway creates the schema)."""
        return self.schemas.setdefault(target, f"sg_bench_{secrets.token_hex(4)}")

    def drop_schemas(self) -> None:
        """Drop the schemas handed out; one that cannot be dropped is named on stderr."""
        for schema in self.schemas.values():
            try:
                self._run(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                print(f"could not drop schema {schema}: {exc}", file=sys.stderr)

    def server_pids(self) -> list[int]:
        """The server's processes (postmaster, backends, WAL writer...) when it runs on this host.

        Empty when it runs elsewhere, ``/proc`` cannot tell or the server does not answer.
        """
        try:
            rows = self._run("SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return []
        pids = {row["pid"] for row in rows if _is_postgres(row["pid"])}
        parents = {_parent(pid) for pid in pids}
        return sorted(pids | {pid for pid in parents if pid is not None and _is_postgres(pid)})


def _is_postgres(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip().startswith("postgres")
    except OSError:
        return False


def _parent(pid: int) -> int | None:
    try:
        return int(_stat(pid)[1])
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class Env:
    """What a target's launcher needs: the scratch folder, the upstream, the CLI options and
    the PostgreSQL server (None when no PostgreSQL target runs)."""

    tmp: Path
    upstream_url: str
    args: argparse.Namespace
    db: BenchDatabase | None = None


@dataclass(frozen=True)
class Launch:
    """How to start a proxy process, with which extra environment, and how to tell it is ready."""

    argv: list[str]
    health_path: str | None = None  # None: ready when the port accepts a TCP connection
    env: dict[str, str] = field(default_factory=dict)
    ready_text: str | None = None  # also wait until the process's log holds this text
    cwd: Path = REPO
    """Where it starts: ``python -m gateway`` imports the ``gateway`` package of this folder."""


@dataclass(frozen=True)
class Target:
    """One row group of the table. ``launch`` is None for the upstream itself (direct); it is
    called as ``launch(env, port, replica)`` for each of the ``replicas`` processes."""

    name: str
    launch: Callable[[Env, int, int], Launch] | None
    replicas: int = 1
    postgres: bool = False
    workers: int = 1  # serve --workers: processes behind each replica's port
    api_key: str = CLIENT_KEY  # what the load generator sends as its bearer token
    sessions: bool = True  # False: no X-Session-Id (the gateway audits each request, records no session)


def passthrough_launch(env: Env, port: int, replica: int) -> Launch:
    script = str(REPO / "benchmarks" / "passthrough.py")
    return Launch([sys.executable, script, "--port", str(port), "--upstream", env.upstream_url])


def commit_floor_launch(env: Env, port: int, replica: int) -> Launch:
    """The pass-through plus one durable SQLite commit per request before its last byte."""
    launch = passthrough_launch(env, port, replica)
    return replace(launch, argv=[*launch.argv, "--commit", str(env.tmp / f"floor-{port}.db")])


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``patch`` merged in: nested dicts merge, everything else replaces."""
    merged = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def gateway_config(env: Env, name: str, port: int, replica: int = 0,
                   patch: dict[str, Any] | None = None) -> Path:
    """Write the example config adjusted for the benchmark; returns its path.

    A target's replicas share its state folder: the keyring, the audit signing key and the
    SQLite file (the first replica creates them); each keeps its own checkpoint file.
    """
    state = env.tmp / name
    state.mkdir(parents=True, exist_ok=True)
    tree = Path(getattr(env.args, "gateway_tree", None) or REPO)
    # the gateway tree's own example (an A/B's base may not know settings added since)
    example = tree / "config" / "sessiongate.yaml"
    config = yaml.safe_load((example if example.is_file() else EXAMPLE_CONFIG).read_text())
    config = deep_merge(config, {
        "server": {"host": "127.0.0.1", "port": port},
        "upstreams": [{"name": "bench", "base_url": env.upstream_url, "models": ["*"]},
                      {"name": "bench-anthropic", "base_url": env.upstream_url, "models": ["*"],
                       "protocol": "anthropic"}],  # the same stand-in answers /v1/messages
        "store": {"path": str(state / "sessiongate.db")},
        "keys": {"master_key_file": str(state / "master-keys.json")},
        "policies": {"path": str(Path(env.args.policies).resolve())},
        "audit": {"signing_key_file": str(state / "audit-signing.key"),
                  "checkpoint_file": str(state / f"checkpoints-{replica}.jsonl")},
    })
    config = deep_merge(config, patch or {})
    path = env.tmp / (f"{name}.yaml" if replica == 0 else f"{name}-{replica}.yaml")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def gateway_target(name: str, patch: dict[str, Any] | None = None, *, replicas: int = 1,
                   postgres: bool = False, workers: int = 1) -> Target:
    """A gateway target whose config is the example config plus ``patch``.

    With ``postgres`` its store is the benchmark's PostgreSQL server, in the target's own
    schema, the DSN passed through the environment (``store.dsn_env``) as in production.
    With ``workers`` above 1 it runs ``serve --workers N`` (one port, N processes).
    """

    def launch(env: Env, port: int, replica: int) -> Launch:
        extra: dict[str, str] = {}
        full = patch or {}
        if postgres:
            if env.db is None:
                raise RuntimeError(f"{name} needs PostgreSQL but no server is configured")
            store = {"backend": "postgres", "dsn_env": DSN_ENV, "schema": env.db.schema(name)}
            full = deep_merge({"store": store}, full)
            extra[DSN_ENV] = env.db.dsn
        config = gateway_config(env, name, port, replica, full)
        argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port),
                "--workers", str(workers)]
        return Launch(argv, health_path="/healthz", env=extra,
                      ready_text="workers, pids" if workers > 1 else None,
                      cwd=Path(getattr(env.args, "gateway_tree", None) or REPO))

    return Target(name, launch, replicas, postgres, workers)


LITELLM_PACKAGE = "litellm[proxy]"
LITELLM_KEY = "sk-bench-" + "0123456789abcdef" * 2  # its master key: authentication on, as deployed


def litellm_venv(env: Env) -> Path:
    """A virtualenv holding LiteLLM's proxy: ``--litellm-venv`` when given (made there if
    missing, kept afterwards), else one made in the scratch folder for this run. Never the
    project's own environment."""
    venv = Path(env.args.litellm_venv) if env.args.litellm_venv else env.tmp / "litellm-venv"
    binary = venv / "bin" / "litellm"
    if not binary.exists():
        print(f"installing {LITELLM_PACKAGE} into {venv} (a few minutes)...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        done = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", LITELLM_PACKAGE],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0 or not binary.exists():
            raise RuntimeError(f"could not install {LITELLM_PACKAGE}: {done.stderr.strip()[-500:]}")
    return binary


def litellm_launch(env: Env, port: int, replica: int) -> Launch:
    """LiteLLM's proxy, one worker, routing every model to the same stand-in, nothing recorded."""
    config = env.tmp / "litellm.yaml"
    config.write_text(yaml.safe_dump({
        "model_list": [{"model_name": "standin", "litellm_params": {
            "model": "openai/standin", "api_base": env.upstream_url, "api_key": "sk-bench"}}],
        "litellm_settings": {"telemetry": False},
    }))
    argv = [str(litellm_venv(env)), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", "1"]
    return Launch(argv, health_path="/health/liveliness",
                  env={"LITELLM_TELEMETRY": "False", "LITELLM_MASTER_KEY": LITELLM_KEY})


TARGETS: list[Target] = [
    Target("direct", None),
    Target("passthrough", passthrough_launch),
    Target("passthrough-commit", commit_floor_launch),
    gateway_target("gateway"),
    gateway_target("gateway-pg", postgres=True),
    gateway_target("gateway-pg2", replicas=2, postgres=True),
    gateway_target("gateway-w2", workers=2),
    gateway_target("gateway-w4", workers=4),
    replace(gateway_target("gateway-nosession"), sessions=False),
    gateway_target("gateway-pg-w2", postgres=True, workers=2),
    gateway_target("gateway-pg-w4", postgres=True, workers=4),
    Target("litellm", litellm_launch, api_key=LITELLM_KEY),
]
DEFAULT_TARGETS = ("direct", "passthrough", "gateway", "gateway-pg", "gateway-pg2")
"""What runs without ``--targets``; the others are asked for by name."""


# --- processes -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def start(name: str, launch: Launch, port: int, tmp: Path, procs: list[Proc]) -> Proc:
    """Start a process, record it in ``procs`` (for the clean-up) and wait until it is ready."""
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(launch.argv, cwd=launch.cwd, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **launch.env})
    proc = Proc(name, process, log)
    procs.append(proc)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with status {process.returncode}; its log:\n{proc.tail()}")
        if _ready(port, launch.health_path) and (
                launch.ready_text is None or launch.ready_text in log.read_text(errors="replace")):
            return proc
        time.sleep(0.1)
    raise RuntimeError(f"{name} not ready after {READY_TIMEOUT:.0f} s; its log:\n{proc.tail()}")


def _ready(port: int, health_path: str | None) -> bool:
    try:
        if health_path is None:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{health_path}", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def stop(procs: list[Proc]) -> None:
    """End every started process by PID: SIGTERM, then SIGKILL after 5 s."""
    for proc in procs:
        if proc.process.poll() is None:
            proc.process.terminate()
    for proc in procs:
        try:
            proc.process.wait(5)
        except subprocess.TimeoutExpired:
            proc.process.kill()
            proc.process.wait()


def _stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (state is field 0)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all threads, from /proc/<pid>/stat."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def with_children(pids: list[int]) -> list[int]:
    """*pids* and their child processes (a ``serve --workers`` supervisor's workers)."""
    out = list(pids)
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return out


def cpu_of(pids: list[int]) -> dict[int, float]:
    """CPU seconds of each process still alive (one that has exited is left out)."""
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            out[pid] = cpu_seconds(pid)
    return out


# --- measuring -------------------------------------------------------------------------------

@dataclass
class Running:
    """A target ready for load: its base URLs (one per replica) and the PIDs of its processes."""

    target: Target
    urls: list[str]
    pids: list[int]


@dataclass
class Row:
    target: str
    stream: bool
    concurrency: int
    result: CellResult
    cpu_ms_per_request: float | None
    db_cpu_ms_per_request: float | None = None
    protocol: str = "chat"
    client: str = "window"
    repeat: int = 0
    """Which pass of ``--repeat`` measured it (0 for the first)."""

    @property
    def mode(self) -> str:
        kind = "stream" if self.stream else "json"
        kind = kind if self.protocol == "chat" else f"{self.protocol} {kind}"
        return kind if self.client == "window" else f"{kind} (history)"


class CpuMeter:
    """CPU seconds spent by a set of processes between :meth:`start` and :meth:`stop`.

    Processes that appear in between count from zero; ones that exit in between are lost.
    """

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self.pids = pids
        self.before: dict[int, float] = {}

    def start(self) -> None:
        self.before = cpu_of(self.pids())

    def stop(self) -> float | None:
        """The CPU seconds spent, or None when no process could be read."""
        after = cpu_of(self.pids())
        if not after:
            return None
        return sum(t - self.before.get(pid, 0.0) for pid, t in after.items())


def per_request(seconds: float | None, result: CellResult) -> float | None:
    sent = result.ok + result.errors
    return None if seconds is None or not result.ok else seconds * 1000 / sent


def measure(targets: list[Running], args: argparse.Namespace, db: BenchDatabase | None) -> list[Row]:
    """Warm every target up, then run every cell."""
    for run in targets:
        for protocol in args.protocols:
            for stream in [mode == "stream" for mode in args.modes]:
                warm = run_sync(run_cell(run.urls, stream=stream, concurrency=4, requests=args.warmup, time_cap=10,
                                         api_key=run.target.api_key, session_prefix=f"warmup-{run.target.name}",
                                         protocol=protocol))
                if warm.ok == 0:
                    raise RuntimeError(f"{run.target.name} answered no {protocol} warm-up request: "
                                       f"{warm.first_error}")
    db_meter = CpuMeter(db.server_pids) if db is not None else None
    rows = []
    cells = [(p, m == "stream", k, c, t) for p in args.protocols for m in args.modes for k in args.clients
             for c in args.concurrency for t in targets if k == "window" or t.target.sessions]
    passes = [(rep, cell, spec) for rep in range(args.repeat) for cell, spec in enumerate(cells)]
    for rep, cell, (protocol, stream, client, concurrency, run) in passes:
        proxy = CpuMeter(functools.partial(with_children, run.pids))
        database = db_meter if run.target.postgres else None
        for meter in (proxy, database):
            if meter is not None:
                meter.start()
        time_cap = args.pg_time_cap if run.target.postgres else args.time_cap
        result = run_sync(run_cell(run.urls, stream=stream, concurrency=concurrency, requests=args.requests,
                                   time_cap=time_cap, api_key=run.target.api_key,
                                   session_prefix=f"bench-{cell}" if run.target.sessions else None,
                                   protocol=protocol, client=client))
        cpu = per_request(proxy.stop() if run.pids else None, result)
        db_cpu = per_request(database.stop(), result) if database is not None else None
        row = Row(run.target.name, stream, concurrency, result, cpu, db_cpu, protocol, client, rep)
        rows.append(row)
        where = f"pass {rep + 1}/{args.repeat} " if args.repeat > 1 else ""
        print(f"  {where}{run.target.name:<12} {row.mode:<6} c={concurrency:<3} {result.ok:>6} ok "
              f"{result.errors:>4} err {result.rps:>8.0f} req/s", file=sys.stderr, flush=True)
        if result.first_error:
            print(f"    first error: {result.first_error}", file=sys.stderr)
    return rows


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f}"


def _cpu(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.2f}"


def added_p50(rows: list[Row]) -> list[float | None]:
    """Each row's p50 less the direct row's of the same cell (protocol, mode, concurrency and
    clients) and pass, in seconds, in the rows' order; None for direct rows and where either is
    missing."""
    direct = {(r.protocol, r.stream, r.concurrency, r.client, r.repeat): r.result.p50
              for r in rows if r.target == "direct"}
    out: list[float | None] = []
    for r in rows:
        base, p50 = direct.get((r.protocol, r.stream, r.concurrency, r.client, r.repeat)), r.result.p50
        out.append(p50 - base if r.target != "direct" and base is not None and p50 is not None else None)
    return out


def table(rows: list[Row], *, db_column: bool = False) -> str:
    """The Markdown table of all rows; ``db_column`` adds the PostgreSQL server's CPU."""
    lines = [
        "| target | mode | concurrency | ok / err | req/s | p50 ms | p99 ms | TTFB p50 ms | "
        "added p50 vs direct ms | proxy CPU ms/req |" + (" PostgreSQL CPU ms/req |" if db_column else ""),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if db_column else ""),
    ]
    for r, gap in zip(rows, added_p50(rows), strict=True):
        added = "-" if gap is None else f"{gap * 1000:+.2f}"
        lines.append(
            f"| {r.target} | {r.mode} | {r.concurrency} | "
            f"{r.result.ok} / {r.result.errors} | {r.result.rps:.0f} | {_ms(r.result.p50)} | "
            f"{_ms(r.result.p99)} | {_ms(r.result.ttfb_p50) if r.stream else '-'} | {added} | "
            f"{_cpu(r.cpu_ms_per_request)} |" + (f" {_cpu(r.db_cpu_ms_per_request)} |" if db_column else ""))
    return "\n".join(lines)


def medians(rows: list[Row], *, db_column: bool = False) -> str:
    """The Markdown table of ``--repeat``: per cell, the median over its passes of each figure,
    and of its req/s as a share of the pass-through's in the same pass (``%``, "-" without a
    pass-through row). Added p50 is taken against the direct row of the same pass. ``db_column``
    adds the PostgreSQL server's CPU, as in :func:`table`."""
    def median(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    def key(r: Row) -> tuple[str, str, bool, int, str]:
        return r.target, r.protocol, r.stream, r.concurrency, r.client

    floor = {(r.protocol, r.stream, r.concurrency, r.client, r.repeat): r.result.rps
             for r in rows if r.target == "passthrough"}

    def share(r: Row) -> float | None:
        base = floor.get((r.protocol, r.stream, r.concurrency, r.client, r.repeat))
        return 100 * r.result.rps / base if base else None

    groups: dict[tuple[str, str, bool, int, str], list[tuple[Row, float | None]]] = {}
    for r, gap in zip(rows, added_p50(rows), strict=True):
        groups.setdefault(key(r), []).append((r, gap))
    lines = [
        f"Medians of {max(r.repeat for r in rows) + 1} passes:",
        "",
        "| target | mode | concurrency | ok / err | req/s | % of pass-through req/s | p50 ms | TTFB p50 ms | "
        "added p50 vs direct ms | proxy CPU ms/req |" + (" PostgreSQL CPU ms/req |" if db_column else ""),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if db_column else ""),
    ]
    for group in groups.values():
        first, runs = group[0][0], [r for r, _ in group]
        pct, gap = median([share(r) for r in runs]), median([g for _, g in group])
        ttfb = _ms(median([r.result.ttfb_p50 for r in runs])) if first.stream else "-"
        lines.append(
            f"| {first.target} | {first.mode} | {first.concurrency} | {sum(r.result.ok for r in runs)} / "
            f"{sum(r.result.errors for r in runs)} | {median([r.result.rps for r in runs]) or 0:.0f} | "
            f"{'-' if pct is None else f'{pct:.0f}%'} | {_ms(median([r.result.p50 for r in runs]))} | {ttfb} | "
            f"{'-' if gap is None else f'{gap * 1000:+.2f}'} | {_cpu(median([r.cpu_ms_per_request for r in runs]))} |"
            + (f" {_cpu(median([r.db_cpu_ms_per_request for r in runs]))} |" if db_column else ""))
    return "\n".join(lines)


def cells(rows: list[Row]) -> list[dict[str, Any]]:
    """Every row's figures, unrounded (seconds as milliseconds), for ``--json``."""
    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else seconds * 1000

    out = []
    for r, added in zip(rows, added_p50(rows), strict=True):
        out.append({"target": r.target, "mode": r.mode, "concurrency": r.concurrency, "pass": r.repeat + 1,
                    "ok": r.result.ok, "errors": r.result.errors, "rps": r.result.rps, "p50_ms": ms(r.result.p50),
                    "ttfb_ms": ms(r.result.ttfb_p50) if r.stream else None, "added_ms": ms(added),
                    "cpu_ms": r.cpu_ms_per_request, "db_cpu_ms": r.db_cpu_ms_per_request})
    return out


# --- the run ---------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Compare direct, pass-through and gateway latency.")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per cell (default 5000; 300 with --quick)")
    parser.add_argument("--time-cap", type=float, default=None,
                        help="seconds per cell before it stops sending (default 8; 2 with --quick)")
    parser.add_argument("--pg-time-cap", type=float, default=None,
                        help="the same for the PostgreSQL targets (default 5, keeping the run under 3 minutes; "
                             "never above --time-cap)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every cell this many times over, one pass after another, and report the "
                             "median of each figure (and of each share of the pass-through's req/s) before "
                             "every pass's own table (default 1)")
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated levels")
    parser.add_argument("--protocols", default="chat",
                        help=f"comma-separated wire protocols to measure ({', '.join(PROTOCOLS)}; default chat)")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                        help=f"comma-separated, from: {', '.join(t.name for t in TARGETS)}")
    parser.add_argument("--modes", default="json,stream", help="comma-separated: json, stream (default both)")
    parser.add_argument("--clients", default="window",
                        help="comma-separated kinds of session client: window (sends only the new message and "
                             "relies on the injected window; the default), history (sends its whole conversation "
                             "each turn, as most OpenAI clients do)")
    parser.add_argument("--chunks", type=int, default=20, help="content pieces per streamed reply")
    parser.add_argument("--policies", default=str(REPO / "policies"), help="the gateway's policy folder")
    parser.add_argument("--pg-dsn", default=os.environ.get(DSN_ENV, DEFAULT_PG_DSN),
                        help=f"PostgreSQL for the gateway-pg* targets (default ${DSN_ENV} or {DEFAULT_PG_DSN})")
    parser.add_argument("--output", help="also write the table (with its header) to this file")
    parser.add_argument("--json", help="also write every cell's figures, unrounded, to this file (benchmarks.ab)")
    parser.add_argument("--gateway-tree", default=str(REPO),
                        help="a checkout whose gateway package the gateway targets run (the stand-in, the "
                             "pass-through, the config and the policies stay this tree's; benchmarks.ab)")
    parser.add_argument("--keep-temp", action="store_true", help="keep the scratch folder (configs, logs)")
    parser.add_argument("--litellm-venv", help="virtualenv for the litellm target (made and filled on first use; "
                        "default: a new one in the scratch folder)")
    args = parser.parse_args(argv)
    args.requests = args.requests or (300 if args.quick else 5000)
    args.time_cap = args.time_cap or (2.0 if args.quick else 8.0)
    args.pg_time_cap = min(args.pg_time_cap or 5.0, args.time_cap)
    args.warmup = 20 if args.quick else 100
    if args.repeat < 1:
        parser.error("--repeat takes a count of 1 or more")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in ("json", "stream") for m in args.modes):
        parser.error("--modes takes json, stream or both")
    args.clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    if not args.clients or any(c not in CLIENTS for c in args.clients):
        parser.error(f"--clients takes {', '.join(CLIENTS)}")
    unknown = [p for p in args.protocols if p not in PROTOCOLS]
    if unknown:
        parser.error(f"unknown protocol(s) {', '.join(unknown)}; choose from {', '.join(PROTOCOLS)}")
    known = {t.name: t for t in TARGETS}
    unknown = [n for n in args.targets.split(",") if n not in known]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(known)}")
    args.targets = [known[n] for n in args.targets.split(",")]
    return args


@contextlib.contextmanager
def scratch(keep: bool) -> Iterator[Path]:
    if keep:
        path = Path(tempfile.mkdtemp(prefix="sessiongate-bench-"))
        print(f"scratch folder (kept): {path}", file=sys.stderr)
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="sessiongate-bench-") as name:
            yield Path(name)


def commit_floor(folder: Path, commits: int = 200) -> float:
    """Median seconds of one durable SQLite commit (WAL, ``synchronous=FULL``, one small row) in
    *folder*: the least a round's commit can cost on this disk, whatever the gateway does."""
    conn = sqlite3.connect(folder / "commit-floor.db", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE IF NOT EXISTS t (b BLOB)")
        times = []
        for _ in range(commits):
            started = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t VALUES (?)", (os.urandom(1024),))
            conn.execute("COMMIT")
            times.append(time.perf_counter() - started)
    finally:
        conn.close()
    return sorted(times)[len(times) // 2]


def header(args: argparse.Namespace, notes: list[str]) -> str:
    pg = any(t.postgres for t in args.targets) and args.pg_time_cap < args.time_cap
    pg_cap = f"; {args.pg_time_cap:g} s for PostgreSQL targets" if pg else ""
    line = (f"sessiongate benchmark, {time.strftime('%Y-%m-%d %H:%M')}: {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, {args.requests} requests per cell "
            f"(cap {args.time_cap:g} s{pg_cap}), {args.chunks} chunks per streamed reply, all on loopback.")
    return "\n".join([line, *(f"\n{note}" for note in notes)])


def open_database(args: argparse.Namespace, notes: list[str]) -> BenchDatabase | None:
    """The PostgreSQL server when a target needs it and it answers; else None, the PostgreSQL
    targets dropped from ``args.targets`` and the reason added to ``notes``."""
    wanted = [t.name for t in args.targets if t.postgres]
    if not wanted:
        return None
    db = BenchDatabase(args.pg_dsn)
    reason = db.unreachable()
    if reason is None:
        return db
    note = f"Skipped {', '.join(wanted)}: PostgreSQL at {describe_dsn(args.pg_dsn)} cannot be used ({reason})."
    print(note, file=sys.stderr)
    notes.append(note)
    args.targets = [t for t in args.targets if not t.postgres]
    return None


def start_target(target: Target, env: Env, procs: list[Proc]) -> Running:
    """Start the target's processes one after the other (the first creates shared keys and schema)."""
    if target.launch is None:
        return Running(target, [env.upstream_url], [])
    urls, pids = [], []
    for replica in range(target.replicas):
        port = free_port()
        name = target.name if target.replicas == 1 else f"{target.name}.{replica}"
        proc = start(name, target.launch(env, port, replica), port, env.tmp, procs)
        urls.append(f"http://127.0.0.1:{port}/v1")
        pids.append(proc.process.pid)
    return Running(target, urls, pids)


def run(args: argparse.Namespace) -> str:
    procs: list[Proc] = []
    notes: list[str] = []
    db = open_database(args, notes)
    try:
        with scratch(args.keep_temp) as tmp:
            try:
                upstream_port = free_port()
                upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
                start("upstream", Launch([sys.executable, "-m", "gateway.standin", "--port", str(upstream_port),
                                          "--chunks", str(args.chunks)]), upstream_port, tmp, procs)
                env = Env(tmp, upstream_url, args, db)
                ready = [start_target(target, env, procs) for target in args.targets]
                print(f"started: {', '.join(f'{p.name} (pid {p.process.pid})' for p in procs)}",
                      file=sys.stderr)
                notes.append(f"One durable SQLite commit (WAL, synchronous=FULL) in the scratch folder: "
                             f"p50 {commit_floor(tmp) * 1000:.2f} ms.")
                rows = measure(ready, args, db)
                if args.json:
                    Path(args.json).write_text(json.dumps(cells(rows), indent=1))
                if args.repeat == 1:
                    return header(args, notes) + "\n\n" + table(rows, db_column=db is not None) + "\n"
                passes = [f"Pass {k + 1}:\n\n" + table([r for r in rows if r.repeat == k], db_column=db is not None)
                          for k in range(args.repeat)]
                return "\n\n".join([header(args, notes), medians(rows, db_column=db is not None), *passes]) + "\n"
            finally:
                stop(procs)  # before the scratch folder goes: gateways write checkpoints as they stop
    finally:
        if db is not None:
            db.drop_schemas()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        report = run(args)
    except KeyboardInterrupt:
        print("interrupted; processes stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    print(report)
    if args.output:
        Path(args.output).write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
