"""Several SQLite stores (gateway processes) on one file: they take turns through the lock file
``<file>-writer.lock``, and rows re-read after another connection committed count as this
store's own (``Current.own``) only when byte for byte the rows its last commit left.

Two ``SQLiteStore`` instances in one process stand for two processes: each opens its own
connections and its own descriptor of the lock file, and ``flock`` locks belong to the open
file, so they contend exactly as two processes do. A "probe" plan records the ``Current`` a
write plan is handed and then raises, so it writes (and keeps) nothing.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

import gateway.store.sqlite as sqlite_store
from gateway import audit, evidence
from gateway.errors import IntegrityError
from gateway.keyring import Keyring, new_master_key
from gateway.sessions import Bounding, RoundRecord, SessionService
from gateway.store.base import Changes, Current
from gateway.store.sqlite import SQLiteStore

T = TypeVar("T")
ACME = "acme"
STEP_TIMEOUT = 5.0
"""No awaited step of these tests may take longer: a write that never gets its turn fails the
test instead of hanging it."""


def record(text: str) -> RoundRecord:
    return RoundRecord(f"req-{text}", "default", "h", "completed", text, f"re: {text}",
                       {"event": "round", "request_id": f"req-{text}"})


def lock_path(path: Path) -> Path:
    return Path(str(path) + "-writer.lock")


async def step(aw: Awaitable[T]) -> T:
    return await asyncio.wait_for(aw, STEP_TIMEOUT)


def run(path: Path, fn: Callable[[SQLiteStore, SQLiteStore], Awaitable[T]]) -> T:
    """Open two stores on *path* (two gateway processes), await ``fn(a, b)``, close both (at
    once: a writer left waiting for the other's turn is freed when the other closes)."""
    async def go() -> T:
        a, b = SQLiteStore(path), SQLiteStore(path)
        await a.open()
        await b.open()
        try:
            return await asyncio.wait_for(fn(a, b), 30)
        finally:
            await asyncio.gather(a.close(), b.close())
    return asyncio.run(go())


class Probe(Exception):
    """Raised by the probe plan once it has seen the rows: the transaction writes nothing."""


async def probe(store: SQLiteStore, session_id: str) -> Current:
    """The ``Current`` a write plan on *session_id* is handed by *store* (nothing is written)."""
    seen: list[Current] = []

    def plan(cur: Current) -> Changes:
        seen.append(cur)
        raise Probe

    with pytest.raises(Probe):
        await step(store.transact(ACME, session_id, plan))
    assert len(seen) == 1
    return seen[0]


def stored(path: Path, session_id: str) -> tuple[bytes, int, int, int]:
    """The session's state bytes, version, next_seq and round count, as a fresh connection sees them."""
    with closing(sqlite3.connect(path)) as conn:
        ct, version, next_seq = conn.execute("SELECT state_ct, version, next_seq FROM sessions "
                                             "WHERE tenant=? AND session_id=?", (ACME, session_id)).fetchone()
        count = conn.execute("SELECT count(*) FROM rounds WHERE tenant=? AND session_id=?",
                             (ACME, session_id)).fetchone()[0]
    return bytes(ct), version, next_seq, count


def quarantine_reason(path: Path, session_id: str) -> str | None:
    with closing(sqlite3.connect(path)) as conn:
        row = conn.execute("SELECT quarantine_reason FROM session_heads WHERE tenant=? AND session_id=?",
                           (ACME, session_id)).fetchone()
    return row[0] if row else None


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[sqlite3.Connection, str | None]]:
    """Every ``read_current`` of the SQLite store: (connection, session id)."""
    seen: list[tuple[sqlite3.Connection, str | None]] = []
    real = sqlite_store.read_current

    def counted(conn: sqlite3.Connection, tenant: str, session_id: str | None) -> Current:
        seen.append((conn, session_id))
        return real(conn, tenant, session_id)

    monkeypatch.setattr(sqlite_store, "read_current", counted)
    return seen


def reads_of(seen: list[tuple[sqlite3.Connection, str | None]], conn: Any, session_id: str) -> int:
    return sum(1 for c, sid in seen if c is conn and sid == session_id)


# --- rows re-read after another store committed -------------------------------------------


@pytest.mark.parametrize("quiet", [False, True], ids=["writer-thread", "inline"])
def test_rows_another_store_left_alone_are_vouched_for_as_own(
        tmp_path: Path, quiet: bool, reads: list[tuple[sqlite3.Connection, str | None]]) -> None:
    """A commits s1, B commits s2 (A's data_version moves): A reads s1 again, finds exactly the
    rows its commit left, and hands them out as its own; the write path's look makes the kept
    rows current again, so the next hot read queries nothing."""
    path = tmp_path / "db.sqlite"
    keyring = Keyring([new_master_key()])

    async def scenario(a: SQLiteStore, b: SQLiteStore) -> None:
        a.quiet = (lambda: True) if quiet else None
        svc_a, svc_b = SessionService(a, keyring), SessionService(b, keyring)
        await step(svc_a.commit_round(ACME, "s1", record("one"), Bounding()))
        await step(svc_a.commit_round(ACME, "s1", record("two"), Bounding()))
        assert a._writer is not None and a._inline is not None
        writer, inline = a._writer.conn, a._inline
        written = reads_of(reads, writer, "s1")  # the first round read the new session

        epoch = a._epoch
        await step(svc_b.commit_round(ACME, "s2", record("other"), Bounding()))
        hot = await step(a.read_session(ACME, "s1", hot=True))
        assert a._epoch > epoch  # A saw that another connection committed
        assert reads_of(reads, inline, "s1") == 1  # so it read s1 again ...
        assert hot.own is True  # ... and vouched for it
        ct, version, next_seq, count = stored(path, "s1")
        assert hot.session is not None and (hot.session.state_ct, hot.session.version) == (ct, version)
        assert (hot.session.next_seq, hot.rounds, hot.max_seq) == (next_seq, count, 2)
        cold = await step(a.read_session(ACME, "s1"))  # the reader thread's read is vouched for too
        assert cold.own is True and cold == hot

        await step(svc_b.commit_round(ACME, "s2", record("another"), Bounding()))
        cur = await probe(a, "s1")
        assert reads_of(reads, writer, "s1") == written + 1
        assert cur.own is True
        assert cur == hot

        before = len(reads)
        again = await step(a.read_session(ACME, "s1", hot=True))
        assert again.own is True and again == cur
        assert len(reads) == before  # the write path's look made the kept rows current again

        loaded = await step(svc_a.load(ACME, "s1"))
        assert loaded is not None and [m["content"] for m in loaded.state.context_window] == [
            "one", "re: one", "two", "re: two"]
        await step(svc_a.commit_round(ACME, "s1", record("three"), Bounding(), loaded))
        assert stored(path, "s1")[3] == 3

    run(path, scenario)


def test_rows_another_store_changed_are_read_and_checked(
        tmp_path: Path, reads: list[tuple[sqlite3.Connection, str | None]]) -> None:
    """B commits a round on A's session: A's kept rows are dropped, the plan gets B's rows (not
    own, so the check runs on them, and passes), and A's next round builds on them."""
    path = tmp_path / "db.sqlite"
    keyring = Keyring([new_master_key()])

    async def scenario(a: SQLiteStore, b: SQLiteStore) -> None:
        svc_a, svc_b = SessionService(a, keyring), SessionService(b, keyring)
        await step(svc_a.commit_round(ACME, "s1", record("one"), Bounding()))
        assert a._known.peek((ACME, "s1")) is not None
        await step(svc_b.commit_round(ACME, "s1", record("two"), Bounding()))

        cur = await probe(a, "s1")
        assert cur.own is False
        assert a._known.peek((ACME, "s1")) is None  # the kept entry is dropped
        ct, version, _next_seq, count = stored(path, "s1")
        assert cur.session is not None and (cur.session.state_ct, cur.session.version) == (ct, version)
        assert (cur.rounds, cur.max_seq) == (count, 2) == (2, 2)
        assert evidence.check(cur) is None

        hot = await step(a.read_session(ACME, "s1", hot=True))
        assert hot.own is False and hot.session == cur.session
        await step(svc_a.commit_round(ACME, "s1", record("three"), Bounding()))
        loaded = await step(svc_b.load(ACME, "s1"))
        assert loaded is not None and [m["content"] for m in loaded.state.context_window] == [
            "one", "re: one", "two", "re: two", "three", "re: three"]

    run(path, scenario)


def _flip_state_byte(conn: sqlite3.Connection) -> None:
    ct = bytearray(conn.execute("SELECT state_ct FROM sessions WHERE session_id='s1'").fetchone()[0])
    ct[-1] ^= 0x01
    conn.execute("UPDATE sessions SET state_ct=? WHERE session_id='s1'", (bytes(ct),))


TAMPERS: dict[str, Callable[[sqlite3.Connection], Any]] = {
    "state-byte": _flip_state_byte,
    "state-rolled-back": lambda c: c.execute("UPDATE sessions SET version = version - 1 WHERE session_id='s1'"),
    "round-deleted": lambda c: c.execute("DELETE FROM rounds WHERE session_id='s1' AND seq=1"),
    "round-added": lambda c: c.execute(
        "INSERT INTO rounds SELECT tenant, session_id, seq + 10, created_at, request_id, policy_id, "
        "policy_hash, outcome, kind, ct FROM rounds WHERE session_id='s1' AND seq=1"),
    "head-moved": lambda c: c.execute("UPDATE session_heads SET bound_seq = bound_seq - 1 WHERE session_id='s1'"),
}


@pytest.mark.parametrize("first", ["plan", "hot-read", "read"])
@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_a_tamper_after_another_stores_commit_is_not_vouched_for(
        tmp_path: Path, tamper: str, first: str) -> None:
    """B commits s2, then someone edits A's s1 with a raw connection: whichever of A's paths
    reads s1 first (a write plan, a hot read on the loop, a read on the reader thread) gets the
    fresh rows, not own, and the check finds the edit, as do the later looks; loading the
    session fails and quarantines it, no round is recorded on top of it, and a load after the
    refused round still fails (the quarantine's commit does not make the edited rows own)."""
    path = tmp_path / "db.sqlite"
    keyring = Keyring([new_master_key()])

    async def scenario(a: SQLiteStore, b: SQLiteStore) -> None:
        svc_a, svc_b = SessionService(a, keyring), SessionService(b, keyring)
        await step(svc_a.commit_round(ACME, "s1", record("one"), Bounding()))
        await step(svc_a.commit_round(ACME, "s1", record("two"), Bounding()))
        assert await step(svc_a.load(ACME, "s1")) is not None  # hot, with its opened state cached
        await step(svc_b.commit_round(ACME, "s2", record("other"), Bounding()))
        with closing(sqlite3.connect(path)) as conn, conn:
            TAMPERS[tamper](conn)
        ct, version, next_seq, count = stored(path, "s1")

        async def look(how: str) -> Current:
            if how == "plan":
                return await probe(a, "s1")
            return await step(a.read_session(ACME, "s1", hot=how == "hot-read"))

        cur = await look(first)
        assert cur.own is False
        assert cur.session is not None
        assert (cur.session.state_ct, cur.session.version, cur.session.next_seq, cur.rounds) == (
            ct, version, next_seq, count)
        assert evidence.check(cur) is not None
        if first == "plan":  # read under the write lock: the kept rows are known not to be the stored ones
            assert a._known.peek((ACME, "s1")) is None
        for how in ("plan", "hot-read", "read"):  # whatever stays kept is never handed out for these rows
            again = await look(how)
            assert again.own is False and evidence.check(again) is not None

        with pytest.raises(IntegrityError):
            await step(svc_a.load(ACME, "s1"))
        assert quarantine_reason(path, "s1")
        with pytest.raises(IntegrityError):
            await step(svc_a.commit_round(ACME, "s1", record("three"), Bounding()))
        assert stored(path, "s1")[3] == count  # nothing recorded on top of the edited rows
        with pytest.raises(IntegrityError):
            await step(svc_a.load(ACME, "s1"))

    run(path, scenario)


def test_a_tamper_of_a_round_row_alone_is_found_by_a_commit(tmp_path: Path) -> None:
    """The same edit found by the next round (the plan's own check) rather than by a load: the
    round is refused, the session quarantined."""
    path = tmp_path / "db.sqlite"
    keyring = Keyring([new_master_key()])

    async def scenario(a: SQLiteStore, b: SQLiteStore) -> None:
        svc_a, svc_b = SessionService(a, keyring), SessionService(b, keyring)
        await step(svc_a.commit_round(ACME, "s1", record("one"), Bounding()))
        loaded = await step(svc_a.load(ACME, "s1"))
        await step(svc_b.commit_round(ACME, "s2", record("other"), Bounding()))
        with closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("DELETE FROM rounds WHERE session_id='s1'")
        with pytest.raises(IntegrityError):
            await step(svc_a.commit_round(ACME, "s1", record("two"), Bounding(), loaded))
        assert quarantine_reason(path, "s1")
        assert stored(path, "s1")[3] == 0

    run(path, scenario)


# --- the lock file --------------------------------------------------------------------------


def try_lock(fd: int, *, keep: bool = False) -> bool:
    """Whether *fd* can take the lock file now (without waiting); released again unless *keep*."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    if not keep:
        fcntl.flock(fd, fcntl.LOCK_UN)
    return True


@contextmanager
def held(path: Path) -> Iterator[Callable[[], None]]:
    """Hold the lock file exclusively (another process's turn); yields a release (idempotent).
    A timer releases it anyway after a few seconds, so a write that wrongly blocks the event
    loop on it fails the test instead of hanging it."""
    fd = os.open(lock_path(path), os.O_RDWR)
    deadline = time.monotonic() + STEP_TIMEOUT
    while not try_lock(fd, keep=True):  # never blocks the loop, even when a store kept its turn
        if time.monotonic() > deadline:
            os.close(fd)
            pytest.fail("the lock file stays taken after the store's commits")
        time.sleep(0.01)
    done = threading.Lock()
    released = [False]

    def release() -> None:
        with done:
            if not released[0]:
                released[0] = True
                fcntl.flock(fd, fcntl.LOCK_UN)

    safety = threading.Timer(3.0, release)
    safety.start()
    try:
        yield release
    finally:
        safety.cancel()
        release()
        os.close(fd)


def test_the_lock_file_is_created_private(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"

    async def scenario(a: SQLiteStore, b: SQLiteStore) -> None:
        lock = lock_path(path)
        assert lock.is_file()
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600

    run(path, scenario)


@pytest.mark.parametrize("quiet", [False, True], ids=["writer-thread", "inline"])
def test_a_write_waits_for_its_turn_without_blocking_the_loop(tmp_path: Path, quiet: bool) -> None:
    """While another process holds the lock file, a round (on the writer thread, or one that
    would commit inline when quiet) does not commit, the event loop keeps running (a load is
    served meanwhile), and the round commits once the lock is released."""
    path = tmp_path / "db.sqlite"
    keyring = Keyring([new_master_key()])

    async def scenario(a: SQLiteStore, b: SQLiteStore) -> None:
        a.quiet = (lambda: True) if quiet else None
        svc = SessionService(a, keyring)
        await step(svc.commit_round(ACME, "s1", record("one"), Bounding()))
        with held(path) as release:
            started = time.monotonic()
            task = asyncio.create_task(svc.commit_round(ACME, "s1", record("two"), Bounding()))
            await asyncio.sleep(0.3)
            assert time.monotonic() - started < 2.0  # the loop was not stuck on the lock
            assert not task.done()
            assert stored(path, "s1")[3] == 1
            loaded = await step(svc.load(ACME, "s1"))  # reads take no turn
            assert loaded is not None and len(loaded.state.context_window) == 2
            assert not task.done()
            release()
            await step(task)
        assert stored(path, "s1")[3] == 2
        loaded = await step(svc.load(ACME, "s1"))
        assert loaded is not None and [m["content"] for m in loaded.state.context_window] == [
            "one", "re: one", "two", "re: two"]

    run(path, scenario)


@pytest.mark.parametrize("quiet", [False, True], ids=["writer-thread", "inline"])
def test_the_store_holds_the_lock_file_while_it_writes(tmp_path: Path, quiet: bool) -> None:
    """Inside a write plan, nobody else can take the lock file; after the commit it is free."""
    path = tmp_path / "db.sqlite"

    async def scenario(a: SQLiteStore, b: SQLiteStore) -> None:
        a.quiet = (lambda: True) if quiet else None
        fd = os.open(lock_path(path), os.O_RDWR)
        try:
            assert try_lock(fd)
            inside: list[bool] = []
            ran_on: list[threading.Thread] = []

            def plan(cur: Current) -> Changes:
                inside.append(try_lock(fd))
                ran_on.append(threading.current_thread())
                return Changes(audit=[{"event": "reset"}])

            await step(a.transact(ACME, None, plan))
            assert inside == [False]
            assert (ran_on[0] is threading.current_thread()) is quiet  # both paths were exercised
            assert try_lock(fd)
        finally:
            os.close(fd)

    run(path, scenario)


# --- two stores committing at once ---------------------------------------------------------


@pytest.mark.parametrize("quiet", [False, True], ids=["writer-thread", "inline"])
def test_two_stores_in_two_threads_lose_no_round(tmp_path: Path, quiet: bool) -> None:
    """Two stores, each on its own thread and event loop, commit rounds on one session at once
    (loading it between rounds): every round lands once, in each store's order, numbered
    1..2N, and a fresh read of the rows passes the check, the chain and the full verification."""
    path = tmp_path / "db.sqlite"
    keyring = Keyring([new_master_key()])
    rounds_each = 20
    asyncio.run(_open_and_close(path))  # create the file once, so both threads only open it
    start = threading.Barrier(2, timeout=STEP_TIMEOUT)
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        async def go() -> None:
            store = SQLiteStore(path)
            await store.open()
            store.quiet = (lambda: True) if quiet else None
            try:
                svc = SessionService(store, keyring)
                start.wait()
                loaded = None
                for i in range(rounds_each):
                    await step(svc.commit_round(ACME, "shared", record(f"{name}{i:02d}"), Bounding(), loaded))
                    loaded = await step(svc.load(ACME, "shared"))
                    assert loaded is not None
            finally:
                await store.close()
        try:
            asyncio.run(go())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(name,), daemon=True) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a store did not finish (lost wake-up?)"
    assert errors == []

    async def check() -> None:
        store = SQLiteStore(path)
        await store.open()
        try:
            rows = [r async for r in store.iter_rounds(ACME, "shared")]
            assert [r.seq for r in rows] == list(range(1, 2 * rounds_each + 1))
            ids = [r.request_id for r in rows]
            assert len(set(ids)) == len(ids) == 2 * rounds_each
            for name in ("a", "b"):
                assert [i for i in ids if i.startswith(f"req-{name}")] == [
                    f"req-{name}{i:02d}" for i in range(rounds_each)]
            cur = await store.read_session(ACME, "shared")
            assert cur.own is False and evidence.check(cur) is None
            assert cur.session is not None and (cur.session.version, cur.session.next_seq, cur.rounds) == (
                2 * rounds_each, 2 * rounds_each + 1, 2 * rounds_each)
            report = await audit.averify_chain(store.iter_audit(ACME), tenant=ACME)
            assert report.ok and report.entries == 2 * rounds_each
            found = await evidence.verify_data(
                ACME, store.iter_audit(ACME), store.iter_rounds(ACME),
                lambda sid: _state_of(store, sid), ["shared"])
            assert found.first_error is None and found.rounds == 2 * rounds_each
            loaded = await SessionService(store, keyring).load(ACME, "shared")
            assert loaded is not None and len(loaded.state.context_window) == 4 * rounds_each
        finally:
            await store.close()

    asyncio.run(asyncio.wait_for(check(), 60))


async def _open_and_close(path: Path) -> None:
    store = SQLiteStore(path)
    await store.open()
    await store.close()


async def _state_of(store: SQLiteStore, session_id: str) -> Any:
    return await store.get_session(ACME, session_id)


def test_a_turn_held_too_long_fails_the_write_and_is_handed_back_when_it_comes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process holds the lock file past ``BUSY_WAIT_SECONDS`` (stopped, stuck): the
    write fails as unavailable (no server path in what the client sees) instead of waiting for
    ever, and nothing of it is stored. When the holder lets go, the turn the abandoned wait then
    gets is handed straight back (the lock is free again), and the next write commits."""
    from gateway.errors import StoreUnavailable

    monkeypatch.setattr(sqlite_store, "BUSY_WAIT_SECONDS", 0.3)
    path = tmp_path / "db.sqlite"
    keyring = Keyring([new_master_key()])

    async def scenario(a: SQLiteStore, b: SQLiteStore) -> None:
        svc = SessionService(a, keyring)
        await step(svc.commit_round(ACME, "s1", record("one"), Bounding()))
        with held(path) as release:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as failed:
                await step(svc.commit_round(ACME, "s1", record("two"), Bounding()))
            assert 0.25 <= time.monotonic() - started < 2.0
            assert "write turn" in str(failed.value) and str(tmp_path) not in str(failed.value)
            release()
        fd = os.open(lock_path(path), os.O_RDWR)
        try:
            deadline = time.monotonic() + STEP_TIMEOUT
            while not try_lock(fd, keep=False):  # the abandoned wait takes it, then gives it back
                assert time.monotonic() < deadline, "the abandoned wait kept the turn"
                await asyncio.sleep(0.01)
        finally:
            os.close(fd)
        assert stored(path, "s1")[3] == 1
        await step(svc.commit_round(ACME, "s1", record("three"), Bounding()))
        loaded = await step(svc.load(ACME, "s1"))
        assert loaded is not None and [m["content"] for m in loaded.state.context_window] == [
            "one", "re: one", "three", "re: three"]

    run(path, scenario)
