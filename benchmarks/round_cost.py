"""What one recorded round costs the store, without HTTP: load the session, then commit the round.

Runs ``SessionService`` on a SQLite store in a scratch folder (removed afterwards), fills one
session until its window is full (``--window-chars``, as the benchmark's sessions are), then
times ``--rounds`` rounds of ``load`` followed by ``commit_round`` (with the loaded state, as a
request does) in three ways:

- ``quiet``: the gateway has nothing else in flight: the commit runs on the event loop and the
  load gets the rows this process committed (``gateway.store.sqlite``: no query, no thread);
- ``busy``: every commit goes through the writer thread (as under load), the load still gets
  the kept rows when the writer is idle;
- ``read``: as ``busy``, and the kept rows are forgotten before every load and commit, so both
  read the session's rows (as when another process wrote in between, or before this change).

For each it prints the median wall time of a round and the process's CPU time (user + system)
per round, with ``synchronous=FULL`` (one fsync per commit) and, with ``--no-fsync``, without it
(the CPU the round costs besides waiting for the disk).

With ``--store postgres`` the same rounds run on the PostgreSQL store instead (``--pg-dsn``, by
default ``$SESSIONGATE_BENCH_DSN`` or the local test server), in a schema of their own that is
dropped afterwards; one mode, ``postgres`` (the CPU column is this process's only).

    python -m benchmarks.round_cost [--rounds 400] [--window-chars 12000] [--no-fsync]
    python -m benchmarks.round_cost --store postgres [--pg-dsn postgresql://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from gateway.keyring import Keyring, new_master_key
from gateway.session.model import normalise_window
from gateway.sessions import Bounding, LoadedSession, RoundRecord, SessionService
from gateway.store.sqlite import SQLiteStore

USER = "Benchmark request {n}: please answer in one sentence."
REPLY = "A benchmark reply of about the length the stand-in gives, one sentence or so, no more."


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _round(svc: SessionService, n: int, bounding: Bounding, loaded: LoadedSession | None) -> LoadedSession:
    rec = RoundRecord(f"r{n}", "default", "h", "completed", USER.format(n=n), REPLY, {"event": "round"})
    await svc.commit_round("acme", "bench", rec, bounding, loaded)
    out = await svc.load("acme", "bench", for_round=True)
    assert out is not None
    if hasattr(out.state, "normalised"):
        out.state.normalised()  # as the inject stage does
    else:  # an older tree (benchmarking a previous revision with this script)
        normalise_window(out.state.context_window)
    return out


class Session:
    """One session of the benchmark, filled until its window is full, then timed round by round."""

    def __init__(self, svc: SessionService, window_chars: int) -> None:
        self.svc, self.window_chars = svc, window_chars
        self.bounding = Bounding(max_length=window_chars)
        self.loaded: LoadedSession | None = None
        self.n = 0

    async def fill(self) -> None:
        while self.loaded is None or self.loaded.state.window_chars() < self.window_chars * 0.95:
            self.loaded = await _round(self.svc, self.n, self.bounding, self.loaded)
            self.n += 1

    async def time(self, mode: str, rounds: int, before: Callable[[], None] = lambda: None) -> tuple[str, float, float]:
        """(mode, median round ms, CPU ms per round) over *rounds* rounds, *before* run before each."""
        times = []
        cpu = _cpu()
        for _ in range(rounds):
            before()
            started = time.perf_counter()
            self.loaded = await _round(self.svc, self.n, self.bounding, self.loaded)
            times.append(time.perf_counter() - started)
            self.n += 1
        return mode, statistics.median(times) * 1000, (_cpu() - cpu) / rounds * 1000


async def measure(folder: Path, rounds: int, window_chars: int, fsync: bool) -> list[tuple[str, float, float]]:
    store = SQLiteStore(folder / "round-cost.db")
    await store.open()
    try:
        if not fsync and store._writer is not None:
            store._writer.conn.execute("PRAGMA synchronous=OFF")
        session = Session(SessionService(store, Keyring([new_master_key()])), window_chars)
        store.quiet = lambda: True
        await session.fill()
        results = []
        for mode in ("quiet", "busy", "read"):
            store.quiet = lambda mode=mode: mode == "quiet"  # type: ignore[misc]
            results.append(await session.time(mode, rounds, store._known.clear if mode == "read" else lambda: None))
        return results
    finally:
        await store.close()


async def measure_postgres(dsn: str, rounds: int, window_chars: int) -> list[tuple[str, float, float]]:
    import asyncpg

    from gateway.store.postgres import PostgresStore

    schema = f"sg_round_cost_{secrets.token_hex(4)}"
    store = PostgresStore(dsn, schema=schema)
    await store.open()
    try:
        session = Session(SessionService(store, Keyring([new_master_key()])), window_chars)
        await session.fill()
        return [await session.time("postgres", rounds)]
    finally:
        await store.close()
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--window-chars", type=int, default=12000)
    parser.add_argument("--no-fsync", action="store_true", help="commit with synchronous=OFF (SQLite)")
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--pg-dsn", default=os.environ.get("SESSIONGATE_BENCH_DSN",
                                                           "postgresql://postgres@127.0.0.1:5432/test"))
    args = parser.parse_args()
    if args.store == "postgres":
        results = asyncio.run(measure_postgres(args.pg_dsn, args.rounds, args.window_chars))
        print(f"{args.rounds} rounds, window {args.window_chars} characters, PostgreSQL")
    else:
        folder = Path(tempfile.mkdtemp(prefix="sessiongate-round-cost-"))
        try:
            results = asyncio.run(measure(folder, args.rounds, args.window_chars, not args.no_fsync))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print(f"{args.rounds} rounds per mode, window {args.window_chars} characters, "
              f"{'no fsync' if args.no_fsync else 'synchronous=FULL'}")
    print("| mode | round p50 ms | CPU ms per round |")
    print("| --- | ---: | ---: |")
    for mode, p50, cpu in results:
        print(f"| {mode} | {p50:.3f} | {cpu:.3f} |")


if __name__ == "__main__":
    main()
