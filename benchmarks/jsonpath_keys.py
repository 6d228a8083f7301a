"""JSONPath policy keys, measured: the evaluator (``gateway.jsonpath``) against jsonpath-ng on the
load benchmark's chat bodies and on padded ones, and other clients' ``/healthz`` latency while a
padded request runs through a gateway whose policy has a ``$`` key.

    .venv/bin/python -m benchmarks.jsonpath_keys [--rounds 3] [--gateway-tree DIR] [--skip-gateway]

``--gateway-tree`` runs the gateway from another checkout (``git archive HEAD~1 | tar -x -C DIR``
gives the code before a change): the "before" row. Every process it starts is ended by its PID.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import orjson

from benchmarks.load import request_body
from benchmarks.run import REPO, Env, Launch, Proc, free_port, gateway_target, scratch, start, stop
from benchmarks.yaml_body import _ms, during_big, healthz, idle_latency

POLICY = """\
id: jsonpath-bench
priority: 60
match:
  tenants: [acme]
  models: ["gpt-4o*"]
  session_ids: ["support:*"]
session:
  input_keys: ["$..content"]
  reply_keys: null
"""
KEYS = ("$.messages[*].content", "$.messages[*].name", "$..content", "$.tools", "$..*",
        "$.messages[?(@.role == 'user')].content")


def padded_bodies() -> dict[str, dict[str, Any]]:
    """Bodies a client controls the size of, each about 1-1.5 MB, with the key they pad."""
    message = [{"role": "user", "content": "hi"}]
    return {
        "$.messages[*].content": {"model": "m", "messages": [{}] * 400_000},
        "$..content": {"model": "m", "messages": message, "junk": [[]] * 400_000},
        "$.junk[*]": {"model": "m", "messages": message, "junk": [0] * 500_000},
        "$..*": {"model": "m", "messages": message, "junk": [0] * 500_000},
        "$..content ": {"model": "m", "messages": message, "junk": tree(17)},
        "$..* ": {"model": "m", "messages": message, "junk": tree(17)},
    }


def tree(depth: int) -> Any:
    """A complete binary tree of lists: no list is long, so a walk spends its budget a little at a
    time (the slowest way to reach it)."""
    node: Any = 0
    for _ in range(depth):
        node = [node, node]
    return node


def per_call(fn: Any, seconds: float = 0.5) -> float:
    """Best-of-three mean seconds per call of *fn*."""
    best = float("inf")
    for _ in range(3):
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 3:
            fn()
            n += 1
        best = min(best, (time.perf_counter() - started) / n)
    return best


def micro(with_jsonpath_ng_on_padded: bool) -> str:
    from jsonpath_ng.ext import parse

    from gateway.jsonpath import KeyBudgetExceeded, compile_query
    warnings.simplefilter("ignore", DeprecationWarning)
    body = orjson.loads(request_body(7, False, "gpt-4o-mini", history=[f"earlier question {i}" for i in range(12)]))
    lines = ["| key on the benchmark's chat body (13 turns) | jsonpath-ng (µs) | ours (µs) | units |",
             "| --- | --- | --- | --- |"]
    for key in KEYS:
        expression = parse(key)
        query = compile_query(expression)
        old = per_call(lambda e=expression: [m.value for m in e.find(body)])
        new = per_call(lambda q=query: q.values(body))
        lines.append(f"| `{key}` | {old * 1e6:.0f} | {new * 1e6:.0f} | {query.cost(body)} |")
    lines += ["", "| key on a padded body | body (MB) | jsonpath-ng (ms) | ours (ms) | outcome |",
              "| --- | --- | --- | --- | --- |"]
    for key, padded in padded_bodies().items():
        size = len(orjson.dumps(padded)) / 1e6
        key = key.strip()
        expression = parse(key)
        query = compile_query(expression)
        old_ms = "-"
        if with_jsonpath_ng_on_padded:
            started = time.perf_counter()
            expression.find(padded)
            old_ms = f"{(time.perf_counter() - started) * 1000:.0f}"
        started = time.perf_counter()
        try:
            query.values(padded)
            outcome = "found"
        except KeyBudgetExceeded as exc:
            outcome = f"KeyBudgetExceeded ({exc.what})"
        lines.append(f"| `{key}` | {size:.2f} | {old_ms} | {(time.perf_counter() - started) * 1000:.1f} | {outcome} |")
    return "\n".join(lines)


def gateway_rounds(args: argparse.Namespace) -> str:
    procs: list[Proc] = []
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                         "junk": [[]] * 400_000})
    with scratch(False) as tmp:
        try:
            policies = Path(tmp) / "policies"
            shutil.copytree(REPO / "policies", policies)
            (policies / "jsonpath-bench.yaml").write_text(POLICY)
            upstream_port = free_port()
            upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
            start("upstream", Launch([sys.executable, "-m", "gateway.standin", "--port", str(upstream_port)]),
                  upstream_port, tmp, procs)
            env = Env(tmp, upstream_url, argparse.Namespace(policies=str(policies), gateway_tree=args.gateway_tree))
            port = free_port()
            target = gateway_target("gateway", {})
            assert target.launch is not None
            start("gateway", target.launch(env, port, 0), port, tmp, procs)
            url = f"http://127.0.0.1:{port}"
            idle = idle_latency(url, healthz, 50)
            rows = [during_big(url, body) for _ in range(args.rounds)]
        finally:
            stop(procs)
    lines = [f"padded body: {len(body):,} bytes, 400,000 empty lists beside one message; policy key `$..content`; "
             "latencies in ms as p50 / p99 / max", "",
             "| round | padded request: status | its time (ms) | /healthz meanwhile (n, ms) |",
             "| --- | --- | --- | --- |",
             f"| idle | - | - | {len(idle)}, {_ms(idle)} |"]
    for n, (seconds, status, lat) in enumerate(rows, 1):
        lines.append(f"| {n} | {status} | {seconds * 1000:.0f} | {len(lat['healthz'])}, {_ms(lat['healthz'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="JSONPath keys: evaluator speed and other clients' latency.")
    parser.add_argument("--rounds", type=int, default=3, help="how many times to send the padded body")
    parser.add_argument("--gateway-tree", help="run the gateway from this checkout (the 'before' measurement)")
    parser.add_argument("--skip-gateway", action="store_true", help="only the in-process measurements")
    parser.add_argument("--skip-micro", action="store_true", help="only the gateway measurement")
    parser.add_argument("--jsonpath-ng-on-padded", action="store_true",
                        help="also time jsonpath-ng on the padded bodies (seconds each)")
    args = parser.parse_args(argv)
    if not args.skip_micro:
        print(micro(args.jsonpath_ng_on_padded), end="\n\n")
    if not args.skip_gateway:
        try:
            print(gateway_rounds(args))
        except RuntimeError as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
