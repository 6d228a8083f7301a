"""What one recorded round costs the store, without HTTP: load the session, then commit the round.

Runs ``SessionService`` on a SQLite store in a scratch folder (removed afterwards), fills
``--sessions`` sessions until their windows are full (``--window-chars``, as the benchmark's
sessions are), then times ``--rounds`` rounds, each ``commit_round`` (with the loaded state, as
a request does), ``load`` and the forwarded body built from what was loaded (the inject stage's
work), taking the sessions in turn. With many sessions (``--sessions 64``, as the benchmark's
64 connections hold) a session's objects are cold in the CPU caches when its turn comes, as
they are in a gateway under load; with one they stay warm. Four ways:

- ``quiet``: the gateway has nothing else in flight: the commit runs on the event loop, at once
  (``SessionService.commit_round`` with no task), and the load gets the rows this process
  committed (``gateway.store.sqlite``: no query, no thread);
- ``shielded``: as ``quiet``, but the whole commit is awaited inside ``asyncio.shield`` (a task
  of its own), as the persist stage did before the commit went at once;
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

    python -m benchmarks.round_cost [--rounds 400] [--sessions 1] [--window-chars 12000] [--no-fsync]
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

import orjson

from gateway.keyring import Keyring, new_master_key
from gateway.session.model import inject
from gateway.sessions import Bounding, LoadedSession, RoundRecord, SessionService
from gateway.store.sqlite import SQLiteStore

USER = "Benchmark request {n}: please answer in one sentence."
REPLY = "A benchmark reply of about the length the stand-in gives, one sentence or so, no more."


MODES = ("quiet", "shielded", "busy", "read")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _round(svc: SessionService, sid: str, n: int, bounding: Bounding,
                 loaded: LoadedSession | None, shielded: bool = False) -> LoadedSession:
    rec = RoundRecord(f"r{n}", "default", "h", "completed", USER.format(n=n), REPLY, {"event": "round"})
    commit = svc.commit_round("acme", sid, rec, bounding, loaded)  # as the persist stage commits
    await (asyncio.shield(commit) if shielded else commit)
    out = await svc.load("acme", sid, for_round=True)
    assert out is not None
    request = [{"role": "user", "content": USER.format(n=n + 1)}]
    messages = inject(request, out.state, encoded=True)  # as the Chat Completions codec does
    orjson.dumps({"model": "standin", "messages": messages})
    return out


class Session:
    """One session of the benchmark, filled until its window is full, then timed round by round."""

    def __init__(self, svc: SessionService, window_chars: int, sid: str = "bench") -> None:
        self.svc, self.window_chars, self.sid = svc, window_chars, sid
        self.bounding = Bounding(max_length=window_chars)
        self.loaded: LoadedSession | None = None
        self.n = 0

    async def fill(self) -> None:
        """Rounds until the window is full: the first round that had to cut it."""
        chars = -1
        while self.loaded is None or self.loaded.state.window_chars() > chars:
            chars = self.loaded.state.window_chars() if self.loaded is not None else -1
            await self.step()

    async def step(self, shielded: bool = False) -> None:
        self.loaded = await _round(self.svc, self.sid, self.n, self.bounding, self.loaded, shielded)
        self.n += 1


async def _time(sessions: list[Session], mode: str, rounds: int,
                before: Callable[[], None] = lambda: None) -> tuple[str, float, float]:
    """(mode, median round ms, CPU ms per round) over *rounds* rounds taking *sessions* in turn,
    *before* run before each."""
    times = []
    cpu = _cpu()
    for n in range(rounds):
        before()
        started = time.perf_counter()
        await sessions[n % len(sessions)].step(shielded=mode == "shielded")
        times.append(time.perf_counter() - started)
    return mode, statistics.median(times) * 1000, (_cpu() - cpu) / rounds * 1000


async def measure(folder: Path, rounds: int, window_chars: int, fsync: bool,
                  count: int = 1) -> list[tuple[str, float, float]]:
    store = SQLiteStore(folder / "round-cost.db")
    await store.open()
    try:
        if not fsync and store._writer is not None:
            store._writer.conn.execute("PRAGMA synchronous=OFF")
        svc = SessionService(store, Keyring([new_master_key()]))
        sessions = [Session(svc, window_chars, f"bench-{i}") for i in range(count)]
        store.quiet = lambda: True
        for session in sessions:
            await session.fill()
        results = []
        for mode in MODES:
            store.quiet = lambda mode=mode: mode in ("quiet", "shielded")  # type: ignore[misc]
            results.append(await _time(sessions, mode, rounds, store._known.clear if mode == "read" else lambda: None))
        return results
    finally:
        await store.close()


async def measure_postgres(dsn: str, rounds: int, window_chars: int, count: int = 1) -> list[tuple[str, float, float]]:
    import asyncpg

    from gateway.store.postgres import PostgresStore

    schema = f"sg_round_cost_{secrets.token_hex(4)}"
    store = PostgresStore(dsn, schema=schema)
    await store.open()
    try:
        svc = SessionService(store, Keyring([new_master_key()]))
        sessions = [Session(svc, window_chars, f"bench-{i}") for i in range(count)]
        for session in sessions:
            await session.fill()
        return [await _time(sessions, "postgres", rounds)]
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
    parser.add_argument("--sessions", type=int, default=1,
                        help="sessions taken in turn (64: cold caches, as under the benchmark's load)")
    parser.add_argument("--window-chars", type=int, default=12000)
    parser.add_argument("--no-fsync", action="store_true", help="commit with synchronous=OFF (SQLite)")
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--pg-dsn", default=os.environ.get("SESSIONGATE_BENCH_DSN",
                                                           "postgresql://postgres@127.0.0.1:5432/test"))
    args = parser.parse_args()
    if args.store == "postgres":
        results = asyncio.run(measure_postgres(args.pg_dsn, args.rounds, args.window_chars, args.sessions))
        print(f"{args.rounds} rounds over {args.sessions} session(s), window {args.window_chars} characters, "
              "PostgreSQL")
    else:
        folder = Path(tempfile.mkdtemp(prefix="sessiongate-round-cost-"))
        try:
            results = asyncio.run(measure(folder, args.rounds, args.window_chars, not args.no_fsync, args.sessions))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print(f"{args.rounds} rounds per mode over {args.sessions} session(s), window {args.window_chars} characters, "
              f"{'no fsync' if args.no_fsync else 'synchronous=FULL'}")
    print("| mode | round p50 ms | CPU ms per round |")
    print("| --- | ---: | ---: |")
    for mode, p50, cpu in results:
        print(f"| {mode} | {p50:.3f} | {cpu:.3f} |")


if __name__ == "__main__":
    main()
