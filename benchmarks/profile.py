"""Where the gateway's time goes: py-spy on the benchmark's gateway under load, by stage.

    .venv/bin/pip install py-spy          # once; not a dependency of the project
    .venv/bin/python -m benchmarks.profile [--mode json|stream] [--concurrency 64] [--seconds 8]
        [--clients window|history] [--target gateway|gateway-nosession] [--blocking] [--raw FILE]

Starts the stand-in and one gateway target as ``benchmarks.run`` does (same config, same
load generator, every process ended by its PID), sends the warm-up, then keeps the load on while
``py-spy record --gil`` samples the gateway for ``--seconds``. Prints the share of the samples
that held the interpreter, per stage of the request (:data:`STAGES`: a sample counts for the
first stage whose frame is on its stack), and the functions of ``gateway/`` that were innermost
most often. Samples in C code that releases the interpreter (SQLite's statements, the fsync)
are not counted: this is where the Python time goes, which is what bounds throughput.

py-spy samples without pausing the gateway (``--nonblocking``) unless ``--blocking`` is given.
Paused sampling gives whole stacks, but on this kind of machine its samples pile up just after
system calls: ``asyncio.get_running_loop()`` (one ``getpid`` call, about 90 ns) took 7.5% of
a paused profile's samples and none of an unpaused one's, which inflates whichever stage makes
the call. Unpaused sampling can read a stack torn mid-change; such a sample has no stage's mark
and counts as "other".
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.load import run_cell, run_sync
from benchmarks.run import Env, Launch, Proc, free_port, parse_args, start, start_target, stop

STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("store: the round's plan and its SQL (batched on the loop, or the writer thread)",
     ("Lane._loop", "WriteQueue.", "SQLiteStore.transact", "PostgresStore.transact", "write_changes",
      "commit_round")),
    ("load the session", ("load_state (gateway",)),
    ("inject the window (the forwarded body)", ("inject (gateway",)),
    ("upstream request (aiohttp client)", ("Upstreams.open", "aiohttp/client", "aiohttp/connector.py")),
    ("read and relay the reply", ("_read_reply", "_relay_stream", "aiter_bytes", "_parse_reply")),
    ("record the round's texts", ("record (gateway/stages/record",)),
    ("respond", ("respond (gateway/stages/respond",)),
    ("persist stage (other)", ("persist (gateway",)),
    ("authenticate, parse, policy", ("parse_request (gateway", "authenticate (gateway", "match_policy (gateway",
                                     "resolve_session (gateway")),
    ("logging", ("structlog", "gateway/logs.py")),
    ("metrics", ("prometheus_client", "Metrics.")),
    ("handler and pipeline glue", ("_chat (gateway", "pipeline.py", "metrics_middleware", "error_middleware")),
    ("aiohttp server (parsing, writing, tasks)", ("web_protocol", "web_app", "web_server", "GatewayProtocol.")),
)
"""Each stage and the frame names (substrings of py-spy's ``function (file:line)``) that mark it.
The client's own callbacks and its body-writing task run straight from the event loop, outside
``Upstreams.open``: aiohttp's client modules mark them. Every sample of the loop's thread passes
through ``run (gateway/server.py)``, so the server is marked by its classes, not that file."""


def py_spy() -> str | None:
    """The py-spy executable: beside this Python, else on PATH."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def by_stage(raw: str) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """From py-spy's raw (collapsed) output: the sample count, samples per stage (most first),
    and per innermost ``gateway/`` function (most first)."""
    total = 0
    stages: collections.Counter[str] = collections.Counter()
    inner: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        stages[next((name for name, marks in STAGES if any(m in stack for m in marks)), "other")] += n
        ours = [f for f in stack.split(";") if "gateway/" in f]
        inner[ours[-1].split(" (")[0] if ours else "(outside gateway/)"] += n
    return total, stages.most_common(), inner.most_common()


def report(total: int, stages: list[tuple[str, int]], inner: list[tuple[str, int]], top: int = 15) -> str:
    if not total:
        return "py-spy recorded no samples"
    lines = [f"{total} samples holding the interpreter", "", "| stage | share |", "| --- | ---: |"]
    lines += [f"| {name} | {100 * n / total:.1f}% |" for name, n in stages]
    lines += ["", "| innermost gateway/ function | share |", "| --- | ---: |"]
    lines += [f"| {name} | {100 * n / total:.1f}% |" for name, n in inner[:top]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("json", "stream"), default="json")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=8, help="how long py-spy samples (the load runs 3 s longer)")
    parser.add_argument("--clients", choices=("window", "history"), default="window")
    parser.add_argument("--target", choices=("gateway", "gateway-nosession"), default="gateway")
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--blocking", action="store_true",
                        help="pause the gateway for each sample (whole stacks; see above for the bias)")
    parser.add_argument("--raw", help="also keep py-spy's raw output in this file")
    args = parser.parse_args(argv)
    spy = py_spy()
    if spy is None:
        print("benchmarks.profile needs py-spy: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    bench = parse_args(["--targets", args.target])
    target = bench.targets[0]
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="sessiongate-profile-") as name:
        tmp = Path(name)
        try:
            port = free_port()
            upstream = f"http://127.0.0.1:{port}/v1"
            start("upstream", Launch([sys.executable, "-m", "gateway.standin", "--port", str(port)]), port, tmp, procs)
            running = start_target(target, Env(tmp, upstream, bench), procs)
            prefix = "profile" if target.sessions else None
            stream = args.mode == "stream"
            run_sync(run_cell(running.urls, stream=stream, concurrency=args.concurrency, requests=200,
                              time_cap=30, session_prefix=prefix, client=args.clients))  # warm-up
            load = threading.Thread(target=lambda: run_sync(run_cell(
                running.urls, stream=stream, concurrency=args.concurrency, requests=10**7,
                time_cap=args.seconds + 3, session_prefix=prefix, client=args.clients)), daemon=True)
            load.start()
            time.sleep(1)
            out = tmp / "py-spy.txt"
            done = subprocess.run([spy, "record", "--gil", *(() if args.blocking else ("--nonblocking",)),
                                   "-r", str(args.rate), "-d", str(args.seconds),
                                   "-p", str(running.pids[0]), "-f", "raw", "-o", str(out)],
                                  capture_output=True, text=True, timeout=args.seconds + 60)
            load.join(args.seconds + 60)
            if done.returncode != 0 or not out.exists():
                print(f"py-spy failed (status {done.returncode}): {done.stderr.strip()[-500:]}", file=sys.stderr)
                return 1
            raw = out.read_text()
        finally:
            stop(procs)
    if args.raw:
        Path(args.raw).write_text(raw)
    print(f"{args.target}, {args.mode}, concurrency {args.concurrency}, {args.clients} clients, "
          f"py-spy record --gil{'' if args.blocking else ' --nonblocking'} at {args.rate} Hz "
          f"for {args.seconds:g} s\n")
    print(report(*by_stage(raw)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
