"""Benchmark driver: direct-to-upstream vs a bare pass-through vs the gateway, in one run.

Starts, as separate processes on free loopback ports, the stand-in model (``python -m
gateway.standin``) and every proxy target asked for (``--targets``), waits until each is ready
(``/healthz`` for the gateway, a TCP connect otherwise), warms each target up, then runs every
cell — streaming and not, at each concurrency, for each target — with ``load.run_cell`` and
prints a Markdown table (see ``benchmarks/README.md`` for the columns). The proxy's CPU time
per request comes from ``utime + stime`` in ``/proc/<pid>/stat`` around each cell.

Every process it starts is ended by its PID on exit, Ctrl-C and SIGTERM included.

To add a target (say the gateway on PostgreSQL), append a :class:`Target` to :data:`TARGETS`;
``gateway_target(name, patch)`` deep-merges ``patch`` into the gateway's generated config.

    .venv/bin/python -m benchmarks.run [--quick] [--requests N] [--targets direct,passthrough,gateway]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks.load import CellResult, run_cell, run_sync

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = REPO / "config" / "sessiongate.yaml"
CLIENT_KEY = "sg-demo-acme"
READY_TIMEOUT = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Env:
    """What a target's launcher needs: the scratch folder, the upstream and the CLI options."""

    tmp: Path
    upstream_url: str
    args: argparse.Namespace


@dataclass(frozen=True)
class Launch:
    """How to start a proxy process and how to tell it is ready."""

    argv: list[str]
    health_path: str | None = None  # None: ready when the port accepts a TCP connection


@dataclass(frozen=True)
class Target:
    """One row group of the table. ``launch`` is None for the upstream itself (direct)."""

    name: str
    launch: Callable[[Env, int], Launch] | None


def passthrough_launch(env: Env, port: int) -> Launch:
    script = str(REPO / "benchmarks" / "passthrough.py")
    return Launch([sys.executable, script, "--port", str(port), "--upstream", env.upstream_url])


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``patch`` merged in: nested dicts merge, everything else replaces."""
    merged = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def gateway_config(env: Env, name: str, port: int, patch: dict[str, Any] | None = None) -> Path:
    """Write the example config adjusted for the benchmark; returns its path."""
    state = env.tmp / name
    state.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    config = deep_merge(config, {
        "server": {"host": "127.0.0.1", "port": port},
        "upstreams": [{"name": "bench", "base_url": env.upstream_url, "models": ["*"]}],
        "store": {"path": str(state / "sessiongate.db")},
        "keys": {"master_key_file": str(state / "master-keys.json")},
        "policies": {"path": str(Path(env.args.policies).resolve())},
        "audit": {"signing_key_file": str(state / "audit-signing.key"),
                  "checkpoint_file": str(state / "checkpoints.jsonl")},
    })
    config = deep_merge(config, patch or {})
    path = env.tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def gateway_target(name: str, patch: dict[str, Any] | None = None) -> Target:
    """A gateway target whose config is the example config plus ``patch``."""

    def launch(env: Env, port: int) -> Launch:
        config = gateway_config(env, name, port, patch)
        argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)]
        return Launch(argv, health_path="/healthz")

    return Target(name, launch)


TARGETS: list[Target] = [
    Target("direct", None),
    Target("passthrough", passthrough_launch),
    gateway_target("gateway"),
]


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
        process = subprocess.Popen(launch.argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    proc = Proc(name, process, log)
    procs.append(proc)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with status {process.returncode}; its log:\n{proc.tail()}")
        if _ready(port, launch.health_path):
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


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all threads, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# --- measuring -------------------------------------------------------------------------------

@dataclass
class Row:
    target: str
    stream: bool
    concurrency: int
    result: CellResult
    cpu_ms_per_request: float | None


def measure(targets: list[tuple[Target, str, int | None]], args: argparse.Namespace) -> list[Row]:
    """Warm every target up, then run every cell; ``targets`` holds (target, base URL, proxy PID)."""
    for target, url, _ in targets:
        for stream in (False, True):
            warm = run_sync(run_cell(url, stream=stream, concurrency=4, requests=args.warmup, time_cap=10,
                                     session_prefix=f"warmup-{target.name}"))
            if warm.ok == 0:
                raise RuntimeError(f"{target.name} answered no warm-up request: {warm.first_error}")
    rows = []
    for cell, (stream, concurrency, (target, url, pid)) in enumerate(
            (s, c, t) for s in (False, True) for c in args.concurrency for t in targets):
        before = cpu_seconds(pid) if pid else 0.0
        result = run_sync(run_cell(url, stream=stream, concurrency=concurrency, requests=args.requests,
                                   time_cap=args.time_cap, api_key=CLIENT_KEY,
                                   session_prefix=f"bench-{cell}"))
        cpu = (cpu_seconds(pid) - before) * 1000 / (result.ok + result.errors) if pid and result.ok else None
        rows.append(Row(target.name, stream, concurrency, result, cpu))
        mode = "stream" if stream else "json"
        print(f"  {target.name:<12} {mode:<6} c={concurrency:<3} {result.ok:>6} ok {result.errors:>4} err "
              f"{result.rps:>8.0f} req/s", file=sys.stderr, flush=True)
        if result.first_error:
            print(f"    first error: {result.first_error}", file=sys.stderr)
    return rows


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f}"


def table(rows: list[Row]) -> str:
    """The Markdown table of all rows."""
    direct = {(r.stream, r.concurrency): r.result.p50 for r in rows if r.target == "direct"}
    lines = [
        "| target | mode | concurrency | ok / err | req/s | p50 ms | p99 ms | TTFB p50 ms | "
        "added p50 vs direct ms | proxy CPU ms/req |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        base = direct.get((r.stream, r.concurrency))
        added = "-" if r.target == "direct" or base is None or r.result.p50 is None else \
            f"{(r.result.p50 - base) * 1000:+.2f}"
        cpu = "-" if r.cpu_ms_per_request is None else f"{r.cpu_ms_per_request:.2f}"
        lines.append(
            f"| {r.target} | {'stream' if r.stream else 'json'} | {r.concurrency} | "
            f"{r.result.ok} / {r.result.errors} | {r.result.rps:.0f} | {_ms(r.result.p50)} | "
            f"{_ms(r.result.p99)} | {_ms(r.result.ttfb_p50) if r.stream else '-'} | {added} | {cpu} |")
    return "\n".join(lines)


# --- the run ---------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Compare direct, pass-through and gateway latency.")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per cell (default 5000; 300 with --quick)")
    parser.add_argument("--time-cap", type=float, default=None,
                        help="seconds per cell before it stops sending (default 8; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated levels")
    parser.add_argument("--targets", default=",".join(t.name for t in TARGETS),
                        help=f"comma-separated, from: {', '.join(t.name for t in TARGETS)}")
    parser.add_argument("--chunks", type=int, default=20, help="content pieces per streamed reply")
    parser.add_argument("--policies", default=str(REPO / "policies"), help="the gateway's policy folder")
    parser.add_argument("--output", help="also write the table (with its header) to this file")
    parser.add_argument("--keep-temp", action="store_true", help="keep the scratch folder (configs, logs)")
    args = parser.parse_args(argv)
    args.requests = args.requests or (300 if args.quick else 5000)
    args.time_cap = args.time_cap or (2.0 if args.quick else 8.0)
    args.warmup = 20 if args.quick else 100
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
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


def header(args: argparse.Namespace) -> str:
    return (f"sessiongate benchmark, {time.strftime('%Y-%m-%d %H:%M')}: {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, {args.requests} requests per cell "
            f"(cap {args.time_cap:g} s), {args.chunks} chunks per streamed reply, all on loopback.")


def run(args: argparse.Namespace) -> str:
    procs: list[Proc] = []
    try:
        with scratch(args.keep_temp) as tmp:
            upstream_port = free_port()
            upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
            start("upstream", Launch([sys.executable, "-m", "gateway.standin", "--port", str(upstream_port),
                                      "--chunks", str(args.chunks)]), upstream_port, tmp, procs)
            env = Env(tmp, upstream_url, args)
            ready: list[tuple[Target, str, int | None]] = []
            for target in args.targets:
                if target.launch is None:
                    ready.append((target, upstream_url, None))
                    continue
                port = free_port()
                proc = start(target.name, target.launch(env, port), port, tmp, procs)
                ready.append((target, f"http://127.0.0.1:{port}/v1", proc.process.pid))
            print(f"started: {', '.join(f'{p.name} (pid {p.process.pid})' for p in procs)}", file=sys.stderr)
            rows = measure(ready, args)
            return header(args) + "\n\n" + table(rows) + "\n"
    finally:
        stop(procs)


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
