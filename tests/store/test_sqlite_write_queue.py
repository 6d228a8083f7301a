"""``gateway.store.sqlite.WriteQueue``: writes under load, in call order, bounded plans batched on
the event loop's thread with only their ``COMMIT`` on a thread, every other plan on the writer
thread. Each test makes the store busy (``quiet`` False), as a gateway under load is."""

from __future__ import annotations

import asyncio
import fcntl
import functools
import json
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any, TypeVar

import pytest

import gateway.store.sqlite as sqlite_store
from gateway.errors import StoreUnavailable
from gateway.store.base import Changes, Current
from gateway.store.sqlite import SQLiteStore
from tests.store.conftest import Backend

T = TypeVar("T")


def run(path: Path, fn: Callable[[SQLiteStore], Awaitable[T]]) -> T:
    def busy() -> SQLiteStore:
        store = SQLiteStore(path)
        store.quiet = lambda: False  # under load: nothing commits at once
        return store
    return Backend("sqlite", busy).run(fn)


def entry(name: str, ran: list[str] | None = None) -> Callable[[Current], Changes]:
    """A plan writing one audit entry named *name* (and noting, in *ran*, that it ran, and on
    which thread)."""
    def plan(cur: Current) -> Changes:
        if ran is not None:
            ran.append(f"{name}@{threading.current_thread().name}")
        return Changes(audit=[{"event": "round", "request_id": name}], result=name)
    return plan


def stored(path: Path) -> list[str]:
    """The request ids of the audit entries on disk, in chain order (a connection of its own)."""
    with closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT body FROM audit WHERE tenant = 'acme' ORDER BY seq").fetchall()
    return [json.loads(body)["request_id"] for (body,) in rows]


def test_bounded_writes_share_one_transaction_planned_on_the_loop_and_committed_on_a_thread(tmp_path: Path) -> None:
    """Five bounded writes asked for in one turn of the loop: their plans run on the loop's
    thread, in call order, in one transaction; its COMMIT runs on the commit thread; every
    caller gets its result only once all five are on disk."""
    path = tmp_path / "db.sqlite"
    ran: list[str] = []
    batches: list[int] = []
    committed_on: list[str] = []
    on_disk_when_resolved: list[list[str]] = []

    async def scenario(store: SQLiteStore) -> list[Changes]:
        store.on_commit = lambda seconds, n: batches.append(n)
        assert store._writes is not None
        store._writes.on_batch = store.on_commit
        real = store._committed

        def committed() -> None:
            committed_on.append(threading.current_thread().name)
            real()
        store._writes._committed = committed
        futures = [store.transact("acme", None, entry(f"r{i}", ran), bounded=True) for i in range(5)]
        assert not any(f.done() for f in futures)  # nothing commits before the loop turns
        futures[0].add_done_callback(lambda _: on_disk_when_resolved.append(stored(path)))
        return list(await asyncio.gather(*futures))

    results = [c.result for c in run(path, scenario)]
    assert results == ["r0", "r1", "r2", "r3", "r4"]
    assert ran == [f"r{i}@MainThread" for i in range(5)]
    assert batches == [5]
    assert len(committed_on) == 1 and committed_on[0].startswith("sqlite-commit")
    assert on_disk_when_resolved == [["r0", "r1", "r2", "r3", "r4"]]


def test_writes_keep_call_order_across_the_loop_and_the_writer_thread(tmp_path: Path) -> None:
    """A bounded write syncing on the commit thread; then a write that is not bounded (it goes to
    the writer thread) and another bounded one: they run after the first has committed, in the
    order asked for, and the mixed batch runs on the writer thread."""
    path = tmp_path / "db.sqlite"
    ran: list[str] = []

    async def scenario(store: SQLiteStore) -> list[str]:
        first = store.transact("acme", None, entry("a", ran), bounded=True)
        await asyncio.sleep(0)  # the first batch starts: planned, its COMMIT on the commit thread
        assert ran == ["a@MainThread"]
        second = store.transact("acme", None, entry("b", ran))
        third = store.transact("acme", None, entry("c", ran), bounded=True)
        done: list[str] = []

        def note(name: str, _: object) -> None:
            done.append(name)
        for name, fut in (("a", first), ("b", second), ("c", third)):
            fut.add_done_callback(functools.partial(note, name))
        await asyncio.gather(first, second, third)
        return done

    done = run(path, scenario)
    assert [r.split("@")[0] for r in ran] == ["a", "b", "c"]
    assert ran[1].startswith("b@sqlite-writer") and ran[2].startswith("c@sqlite-writer")
    assert done[0] == "a"
    assert stored(path) == ["a", "b", "c"]


def test_bounded_writes_asked_for_while_a_batch_syncs_form_the_next_batch_on_the_loop(tmp_path: Path) -> None:
    """A batch waits for the one syncing instead of going to the writer thread."""
    path = tmp_path / "db.sqlite"
    ran: list[str] = []

    async def scenario(store: SQLiteStore) -> None:
        first = store.transact("acme", None, entry("a", ran), bounded=True)
        await asyncio.sleep(0)  # the first batch is syncing on the commit thread
        second = store.transact("acme", None, entry("b", ran), bounded=True)
        await asyncio.gather(first, second)

    run(path, scenario)
    assert ran == ["a@MainThread", "b@MainThread"]
    assert stored(path) == ["a", "b"]


def test_a_failing_plan_in_a_loop_batch_leaves_its_neighbours_committed(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"

    def broken(cur: Current) -> Changes:
        raise ValueError("the plan refuses")

    async def scenario(store: SQLiteStore) -> list[Any]:
        futures = [store.transact("acme", None, entry("x"), bounded=True),
                   store.transact("acme", None, broken, bounded=True),
                   store.transact("acme", None, entry("y"), bounded=True)]
        return list(await asyncio.gather(*futures, return_exceptions=True))

    first, failed, last = run(path, scenario)
    assert isinstance(failed, ValueError)
    assert (first.result, last.result) == ("x", "y")
    assert stored(path) == ["x", "y"]


def test_a_failed_commit_fails_the_whole_batch_and_gives_the_lock_back(tmp_path: Path) -> None:
    """The COMMIT fails (a disk error): every write of the batch fails with StoreUnavailable,
    nothing of it is on disk, and the next write still commits."""
    path = tmp_path / "db.sqlite"

    async def scenario(store: SQLiteStore) -> tuple[list[Any], Changes]:
        assert store._writes is not None
        real = store._writes._committing

        def disk_error() -> None:
            raise sqlite3.OperationalError("disk I/O error")
        store._writes._committing = disk_error
        failed = await asyncio.gather(*[store.transact("acme", None, entry(f"lost{i}"), bounded=True)
                                        for i in range(3)], return_exceptions=True)
        store._writes._committing = real
        after = await store.transact("acme", None, entry("kept"), bounded=True)
        return failed, after

    failed, after = run(path, scenario)
    assert all(isinstance(f, StoreUnavailable) and "disk I/O error" in str(f) for f in failed)
    assert after.result == "kept"
    assert stored(path) == ["kept"]


def test_closing_the_store_commits_what_is_queued(tmp_path: Path) -> None:
    """Writes asked for just before ``close()`` (none awaited) are on disk when it returns."""
    path = tmp_path / "db.sqlite"

    async def scenario(store: SQLiteStore) -> None:
        store.transact("acme", None, entry("p"), bounded=True)
        store.transact("acme", None, entry("q"))
        store.transact("acme", None, entry("r"), bounded=True)

    run(path, scenario)
    assert stored(path) == ["p", "q", "r"]


def test_a_bounded_batch_waits_for_the_lock_on_the_commit_thread_and_is_planned_on_the_loop(
        tmp_path: Path) -> None:
    """The loop never waits for a lock: with SQLite's write lock held elsewhere, the commit
    thread waits for it; once it is free the batch is planned on the loop's thread, joined by
    the bounded writes asked for meanwhile, in one transaction."""
    path = tmp_path / "db.sqlite"
    ran: list[str] = []
    batches: list[int] = []

    async def scenario(store: SQLiteStore) -> list[Any]:
        await store.transact("acme", None, entry("before"), bounded=True)
        assert store._writes is not None
        store._writes.on_batch = lambda seconds, n: batches.append(n)
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        first = store.transact("acme", None, entry("w", ran), bounded=True)
        await asyncio.sleep(0.05)
        later = [store.transact("acme", None, entry(f"w{i}", ran), bounded=True) for i in range(2)]
        await asyncio.sleep(0.05)
        waiting = not first.done() and not ran  # nothing planned while the lock is elsewhere
        holder.execute("COMMIT")
        holder.close()
        assert waiting
        return [c.result for c in await asyncio.gather(first, *later)]

    assert run(path, scenario) == ["w", "w0", "w1"]
    assert ran == ["w@MainThread", "w0@MainThread", "w1@MainThread"]
    assert batches == [3]
    assert stored(path) == ["before", "w", "w0", "w1"]


def test_a_bounded_batch_whose_lock_never_comes_fails_and_gives_the_lane_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another gateway process holds the turn file past ``BUSY_WAIT_SECONDS``: the waiting
    batch fails as unavailable, saying why, and the next write, once the turn is free, commits."""
    monkeypatch.setattr(sqlite_store, "BUSY_WAIT_SECONDS", 0.2)
    path = tmp_path / "db.sqlite"

    async def scenario(store: SQLiteStore) -> tuple[BaseException | None, str]:
        await store.transact("acme", None, entry("before"), bounded=True)
        with open(f"{path}-writer.lock", "a+b") as turn:
            fcntl.flock(turn, fcntl.LOCK_EX)  # another process's turn (flock locks are per open file)
            failed = await asyncio.gather(store.transact("acme", None, entry("lost"), bounded=True),
                                          return_exceptions=True)
            fcntl.flock(turn, fcntl.LOCK_UN)
        assert store._writer is not None
        if not store._writer._busy.acquire(blocking=False):  # given back (else every later write would hang)
            pytest.fail("the writer's lane was not given back after the failed wait")
        store._writer._busy.release()
        after = await store.transact("acme", None, entry("after"), bounded=True)
        error = failed[0] if isinstance(failed[0], BaseException) else None
        return error, str(after.result)

    error, after = run(path, scenario)
    assert isinstance(error, StoreUnavailable) and "write turn" in error.message
    assert after == "after"
    assert stored(path) == ["before", "after"]


@pytest.mark.parametrize("bounded", [True, False])
def test_a_quiet_write_never_goes_ahead_of_queued_ones(tmp_path: Path, bounded: bool) -> None:
    """With writes still queued, a write made when the gateway turns quiet queues behind them
    instead of committing at once."""
    path = tmp_path / "db.sqlite"

    async def scenario(store: SQLiteStore) -> None:
        queued = store.transact("acme", None, entry("first"), bounded=bounded)
        store.quiet = lambda: True
        later = store.transact("acme", None, entry("second"), bounded=True)
        assert not later.done()  # not committed at once
        await asyncio.gather(queued, later)

    run(path, scenario)
    assert stored(path) == ["first", "second"]


def test_a_loop_batch_takes_at_most_batch_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """However many writes wait, one batch on the loop takes at most ``BATCH`` of them (a bounded
    stall of the loop); the rest form the next batches, in order."""
    monkeypatch.setattr(sqlite_store, "BATCH", 2)
    path = tmp_path / "db.sqlite"
    batches: list[int] = []

    async def scenario(store: SQLiteStore) -> None:
        assert store._writes is not None
        store._writes.on_batch = lambda seconds, n: batches.append(n)
        await asyncio.gather(*[store.transact("acme", None, entry(f"w{i}"), bounded=True) for i in range(5)])

    run(path, scenario)
    assert batches == [2, 2, 1]
    assert stored(path) == [f"w{i}" for i in range(5)]


def test_a_lone_failing_write_rolls_back_and_gives_the_lock_back(tmp_path: Path) -> None:
    """A batch of one whose plan fails is rolled back on the loop (nothing to commit): its caller
    gets the plan's error, and the next write takes the lock and commits."""
    path = tmp_path / "db.sqlite"

    def broken(cur: Current) -> Changes:
        raise ValueError("the plan refuses")

    async def scenario(store: SQLiteStore) -> tuple[BaseException | Changes, Changes]:
        failed = (await asyncio.gather(store.transact("acme", None, broken, bounded=True),
                                       return_exceptions=True))[0]
        assert store._writer is not None
        free = store._writer._busy.acquire(blocking=False)  # given back (else every later write would hang)
        if not free:
            pytest.fail("the writer's lock was not given back after the rollback")
        store._writer._busy.release()
        return failed, await store.transact("acme", None, entry("next"), bounded=True)

    failed, after = run(path, scenario)
    assert isinstance(failed, ValueError)
    assert after.result == "next" and stored(path) == ["next"]
