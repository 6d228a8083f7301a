"""The YAML-body attack, measured: how long the gateway takes over the worst chat body its limits
allow, and how long other clients wait meanwhile.

The worst body (``worst_body``) fills ``server.max_body_bytes`` with an Agently-style prompt for a
policy with structured ``input_keys`` (``policies/compliance-minimal.yaml``: acme, ``gpt-4o*``,
``support:*``): thousands of ``[Sn]:`` sections, each a YAML flow list with a ``'*'`` in it (the
character that used to switch the parse to the pure-Python loader on the event loop) and as many
nodes as the structured-parse budget lets one text build. The gateway has to read, parse, forward
and record it.

Starts the stand-in model and one gateway as separate processes on free loopback ports (as
``benchmarks.run`` does), measures the idle latency of ``GET /healthz`` and of a small chat
request, then sends the worst body ``--rounds`` times; during each, it keeps sending ``/healthz``
and small chats (another session, default policy) one after the other and records how long
each took. Prints a Markdown table. Every process it starts is ended by its PID.

    .venv/bin/python -m benchmarks.yaml_body [--rounds 3] [--max-body-bytes 4194304]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import orjson

from benchmarks.run import REPO, Env, Launch, Proc, free_port, gateway_target, scratch, start, stop

CLIENT_KEY = "sg-demo-acme"
KEYED_MODEL, KEYED_SESSION = "gpt-4o-mini", "support:yaml-bench"


def worst_content(max_body_bytes: int, items_per_section: int = 1000) -> str:
    """The user message of ``worst_body``: an ``[INPUT]:`` section, then ``[Sn]:`` sections of
    YAML flow lists holding a quoted ``'*'``, until the JSON body would pass the limit."""
    head = "[INPUT]:\nticket_id: T-1\nintent: refund\nnote: '*'\n\n"
    section = "['*', " + ", ".join(["a"] * items_per_section) + "]\n\n"
    budget = max_body_bytes - 512  # the JSON around the content, its escapes included below
    parts = [head]
    size = len(head) + head.count("\n")
    n = 0
    while True:
        piece = f"[S{n}]:\n" + section
        cost = len(piece) + piece.count("\n")  # each newline is two bytes in JSON
        if size + cost > budget:
            break
        parts.append(piece)
        size += cost
        n += 1
    return "".join(parts)


def worst_body(max_body_bytes: int, *, stream: bool = False) -> bytes:
    """The worst chat body (JSON bytes) that fits *max_body_bytes*."""
    body = orjson.dumps({"model": KEYED_MODEL, "stream": stream,
                         "messages": [{"role": "user", "content": worst_content(max_body_bytes)}]})
    assert len(body) <= max_body_bytes, len(body)
    return body


def small_chat(client: httpx.Client, n: int) -> None:
    resp = client.post("/v1/chat/completions", headers={"X-Session-Id": f"bench-small-{n % 4}"},
                       json={"model": "standin", "messages": [{"role": "user", "content": f"small {n}"}]})
    resp.raise_for_status()


def healthz(client: httpx.Client, _n: int) -> None:
    client.get("/healthz").raise_for_status()


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"{p50 * 1000:.1f} / {p99 * 1000:.1f} / {ordered[-1] * 1000:.1f}"


def idle_latency(url: str, probe: object, count: int) -> list[float]:
    out = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {CLIENT_KEY}"}, timeout=120) as client:
        for n in range(count):
            started = time.perf_counter()
            probe(client, n)  # type: ignore[operator]
            out.append(time.perf_counter() - started)
    return out


def during_big(url: str, body: bytes) -> tuple[float, int, dict[str, list[float]]]:
    """Send the big body; meanwhile probe /healthz and small chats back to back. Returns the big
    request's time and status, and each probe's latencies while it was in flight."""
    done = threading.Event()
    result: dict[str, float] = {}
    status: list[int] = []

    def big() -> None:
        headers = {"Authorization": f"Bearer {CLIENT_KEY}", "X-Session-Id": KEYED_SESSION,
                   "Content-Type": "application/json"}
        started = time.perf_counter()
        try:
            resp = httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers, timeout=600)
            status.append(resp.status_code)
        finally:
            result["big"] = time.perf_counter() - started
            done.set()

    latencies: dict[str, list[float]] = {"healthz": [], "chat": []}

    def prober(name: str, probe: object) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {CLIENT_KEY}"}, timeout=600) as client:
            n = 0
            while not done.is_set():
                started = time.perf_counter()
                probe(client, n)  # type: ignore[operator]
                if not done.is_set():
                    latencies[name].append(time.perf_counter() - started)
                n += 1

    thread = threading.Thread(target=big)
    thread.start()
    time.sleep(0.02)  # the big body is on its way
    probes = [threading.Thread(target=prober, args=("healthz", healthz)),
              threading.Thread(target=prober, args=("chat", small_chat))]
    for probe in probes:
        probe.start()
    thread.join()
    for probe in probes:
        probe.join()
    return result["big"], status[0] if status else 0, latencies


def run(args: argparse.Namespace) -> str:
    procs: list[Proc] = []
    with scratch(False) as tmp:
        try:
            upstream_port = free_port()
            upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
            start("upstream", Launch([sys.executable, "-m", "gateway.standin", "--port", str(upstream_port)]),
                  upstream_port, tmp, procs)
            env = Env(tmp, upstream_url, argparse.Namespace(policies=str(REPO / "policies")))
            port = free_port()
            target = gateway_target("gateway", {"server": {"max_body_bytes": args.max_body_bytes}})
            assert target.launch is not None
            start("gateway", target.launch(env, port, 0), port, tmp, procs)
            url = f"http://127.0.0.1:{port}"
            body = worst_body(args.max_body_bytes)
            idle = {"healthz": idle_latency(url, healthz, 50), "chat": idle_latency(url, small_chat, 50)}
            rows = []
            for _ in range(args.rounds):
                rows.append(during_big(url, body))
        finally:
            stop(procs)
    lines = [
        f"worst body: {len(body):,} bytes (limit {args.max_body_bytes:,}), "
        f"{body.count(b'[S'):,} YAML sections with a '*'; {args.rounds} rounds; "
        f"latencies in ms as p50 / p99 / max",
        "",
        "| round | big request: status | big request: time (ms) | /healthz during it (n, ms) "
        "| small chat during it (n, ms) |",
        "| --- | --- | --- | --- | --- |",
        f"| idle | - | - | {len(idle['healthz'])}, {_ms(idle['healthz'])} | {len(idle['chat'])}, {_ms(idle['chat'])} |",
    ]
    for n, (seconds, status, lat) in enumerate(rows, 1):
        lines.append(f"| {n} | {status} | {seconds * 1000:.0f} | {len(lat['healthz'])}, {_ms(lat['healthz'])} "
                     f"| {len(lat['chat'])}, {_ms(lat['chat'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The worst YAML chat body, and other clients' latency meanwhile.")
    parser.add_argument("--rounds", type=int, default=3, help="how many times to send the worst body")
    parser.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024,
                        help="the gateway's server.max_body_bytes (the worst body fills it)")
    parser.add_argument("--output", help="also write the table to this file")
    args = parser.parse_args(argv)
    try:
        report = run(args)
    except RuntimeError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    print(report)
    if args.output:
        Path(args.output).write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
