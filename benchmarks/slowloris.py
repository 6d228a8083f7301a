"""Slowloris against the gateway, on loopback: how many slow connections it holds, and what a
normal client sees meanwhile.

Starts ``python -m gateway serve`` (built-in stand-in model, fresh temporary directory) with its
open-file limit set to ``--gateway-nofile`` (1,024 by default, a common default soft limit),
then for ``--seconds`` keeps up to ``--connections`` slowloris sockets open: each sends a request
line and then one header line every ``--drip`` seconds, never finishing its head, and reconnects
when the gateway closes it. Meanwhile a normal client sends ``GET /healthz`` and a chat request
on a fresh connection every ``--probe-every`` seconds. As the original slowloris.py does, a
socket the gateway closed is re-created on the next drip round. It runs once per mode:

- ``limits``: the gateway's defaults (header timeout 10 s, connection cap 1,024 lowered to fit
  the open-file limit, idle connections closed first at the cap);
- ``stock``: the same app under aiohttp's stock ``web.run_app`` (no header or body timeout,
  no cap), the way the first release served it.

Prints, per mode: slow sockets held (largest and mean of the per-second count), slowloris
connects and server-side closes, the normal client's success count and latency (p50, p99,
max), and the gateway's ``sessiongate_connections_*`` counters. Stops by itself; every process
it starts is ended by its PID.

    .venv/bin/python -m benchmarks.slowloris [--connections 2000] [--seconds 15] [--modes limits,stock]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CHAT = (b'{"model": "standin", "messages": [{"role": "user", "content": "hello"}]}')
MODES = ("limits", "stock")
STOCK = """
import sys
from pathlib import Path
from aiohttp import web
from gateway import logs
from gateway.app import build_app
from gateway.settings import load_settings
settings = load_settings(Path(sys.argv[1]))
logs.configure("warning", "json")
web.run_app(build_app(settings), host=settings.server.host, port=settings.server.port, access_log=None, print=None)
"""
"""The same app under aiohttp's stock ``web.run_app``, as the first release served it."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Result:
    mode: str
    held: list[int] = field(default_factory=list)
    connects: int = 0
    connect_failures: int = 0
    closed_by_server: int = 0
    probe_ok: int = 0
    probe_failed: int = 0
    latencies: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def start_gateway(tmp: Path, mode: str, nofile: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = yaml.safe_load((REPO / "config/sessiongate.yaml").read_text())
    config["server"] = {**config["server"], "host": HOST, "port": port}
    config["upstreams"] = []
    config["store"] = {"backend": "sqlite", "path": str(tmp / "gateway.db")}
    config["keys"] = {"master_key_file": str(tmp / "master-keys.json")}
    shutil.copytree(REPO / "policies", tmp / "policies")
    config["policies"] = {"path": str(tmp / "policies")}
    config["audit"] = {"signing_key_file": str(tmp / "audit.key"), "checkpoint_file": str(tmp / "checkpoints.jsonl")}
    config["logging"] = {"level": "warning", "format": "json"}
    path = tmp / "sessiongate.yaml"
    path.write_text(yaml.safe_dump(config))

    def limit_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    log = (tmp / "gateway.log").open("wb")
    argv = ([sys.executable, "-m", "gateway", "--config", str(path), "serve"] if mode == "limits"
            else [sys.executable, "-c", STOCK, str(path)])
    proc = subprocess.Popen(argv, cwd=REPO if mode == "stock" else tmp,
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit_fds)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((tmp / "gateway.log").read_text()[-2000:])
        with contextlib.suppress(OSError), urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=1):
            return proc, port
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("gateway did not start")


def stop_gateway(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def slow_socket(port: int, drip: float, until: float, open_now: set[int], result: Result, ident: int) -> None:
    """One slowloris: connect, send a request line, drip a header line now and then; reconnect a round after
    the gateway closes it."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 5)
        except (OSError, TimeoutError):
            result.connect_failures += 1
            await asyncio.sleep(0.5)
            continue
        result.connects += 1
        open_now.add(ident)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n")
            await writer.drain()
            n = 0
            while time.monotonic() < until:
                with contextlib.suppress(TimeoutError):
                    if await asyncio.wait_for(reader.read(1024), drip) == b"":
                        result.closed_by_server += 1
                        break
                    result.closed_by_server += 1  # it answered (408 or 503) and will close
                    break
                n += 1
                writer.write(b"X-Slow-%d: a\r\n" % n)
                await writer.drain()
        except OSError:
            result.closed_by_server += 1
        finally:
            open_now.discard(ident)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        await asyncio.sleep(drip)  # like slowloris.py: closed sockets are re-created on the next round


async def http(port: int, raw: bytes, timeout: float) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def probe(port: int, every: float, until: float, result: Result) -> None:
    """A normal client: healthz and a chat on fresh connections, timing each."""
    chat = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sg-demo-acme\r\n"
            b"Content-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(CHAT)) + CHAT
    health = b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    while time.monotonic() < until:
        for raw in (health, chat):
            started = time.monotonic()
            try:
                reply = await http(port, raw, 10)
                why = "ok" if reply.startswith(b"HTTP/1.1 200") else reply[:12].decode(errors="replace") or "closed"
            except TimeoutError:
                why = "timeout"
            except OSError as exc:
                why = type(exc).__name__
            if why == "ok":
                result.probe_ok += 1
                result.latencies.append(time.monotonic() - started)
            else:
                result.probe_failed += 1
                result.failures[why] = result.failures.get(why, 0) + 1
        await asyncio.sleep(every)


async def sample(open_now: set[int], until: float, result: Result) -> None:
    while time.monotonic() < until:
        await asyncio.sleep(1)
        result.held.append(len(open_now))


def connection_metrics(port: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with contextlib.suppress(OSError), urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("sessiongate_connections_") and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name.removeprefix("sessiongate_connections_")] = float(value)
    return out


async def attack(port: int, args: argparse.Namespace, result: Result) -> None:
    until = time.monotonic() + args.seconds
    open_now: set[int] = set()
    tasks = [asyncio.create_task(sample(open_now, until, result)),
             asyncio.create_task(probe(port, args.probe_every, until, result))]
    for i in range(args.connections):  # ramp up over the first second or so
        tasks.append(asyncio.create_task(slow_socket(port, args.drip, until, open_now, result, i)))
        if i % 200 == 199:
            await asyncio.sleep(0.05)
    await asyncio.gather(*tasks, return_exceptions=True)


def run_mode(mode: str, args: argparse.Namespace) -> Result:
    result = Result(mode)
    with tempfile.TemporaryDirectory(prefix="sg-slowloris-") as tmp:
        proc, port = start_gateway(Path(tmp), mode, args.gateway_nofile)
        try:
            asyncio.run(attack(port, args, result))
            result.metrics = connection_metrics(port)
        finally:
            stop_gateway(proc)
    return result


def ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.1f}"


def report(results: list[Result], args: argparse.Namespace) -> str:
    lines = [f"slowloris: {args.connections} slow sockets for {args.seconds:.0f} s, gateway open-file limit "
             f"{args.gateway_nofile}, drip every {args.drip:.0f} s, a normal client every {args.probe_every} s",
             "",
             "| mode | slow sockets held (max / mean) | slow connects | closed by gateway "
             "| normal requests ok / failed | latency p50 / p99 / max ms | gateway counters |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        held = f"{max(r.held, default=0)} / {statistics.mean(r.held) if r.held else 0:.0f}"
        counters = ", ".join(f"{k}={v:.0f}" for k, v in sorted(r.metrics.items())) or "-"
        latency = f"{ms(r.latencies, 0.5)} / {ms(r.latencies, 0.99)} / {ms(r.latencies, 1.0)}"
        failed = f"{r.probe_failed} ({', '.join(f'{k}: {v}' for k, v in r.failures.items())})" if r.failures \
            else "0"
        lines.append(f"| {r.mode} | {held} | {r.connects} | {r.closed_by_server} | {r.probe_ok} / {failed} "
                     f"| {latency} | {counters} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.slowloris", description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000, help="slowloris sockets kept open (max 10000)")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each mode's attack (max 120)")
    parser.add_argument("--drip", type=float, default=5.0, help="seconds between a slow socket's header lines")
    parser.add_argument("--probe-every", type=float, default=0.25, help="seconds between normal requests")
    parser.add_argument("--gateway-nofile", type=int, default=1024, help="the gateway's open-file limit")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: limits, stock")
    args = parser.parse_args(argv)
    args.connections = max(1, min(args.connections, 10_000))
    args.seconds = max(1.0, min(args.seconds, 120.0))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = args.connections + 256
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
        if hard < needed:
            args.connections = hard - 256
            print(f"open-file limit {hard}: using {args.connections} slow sockets", file=sys.stderr)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    results = [run_mode(mode, args) for mode in modes]
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
