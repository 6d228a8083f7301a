"""The opened-state cache of ``SessionService`` (``gateway.sessions.StateCache``): it saves the
decryption of a state row this process opened or sealed, and never hides a change or damage."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
from structlog.testing import capture_logs

from gateway.auditor import ObservedStore
from gateway.errors import IntegrityError
from gateway.keyring import Keyring, new_master_key
from gateway.session.model import normalise_window
from gateway.sessions import Bounding, RoundRecord, SessionService
from gateway.store.base import Changes
from gateway.store.sqlite import SQLiteStore

T = TypeVar("T")


def record(text: str) -> RoundRecord:
    return RoundRecord(f"req-{text}", "default", "h", "completed", text, f"re: {text}", {"event": "round"})


def run(path: Path, keyring: Keyring, fn: Callable[[SessionService], Awaitable[T]]) -> T:
    async def go() -> T:
        store = SQLiteStore(path)
        await store.open()
        try:
            return await fn(SessionService(store, keyring))
        finally:
            await store.close()
    return asyncio.run(go())


def counting(svc: SessionService) -> list[int]:
    """Count the state rows *svc* decrypts."""
    opened = [0]
    real = svc._open_state

    def spy(dk: Any, row: Any) -> Any:
        opened[0] += 1
        return real(dk, row)

    svc._open_state = spy  # type: ignore[method-assign]
    return opened


def test_a_round_then_loads_open_nothing_again(tmp_path: Path) -> None:
    keyring = Keyring([new_master_key()])

    async def scenario(svc: SessionService) -> tuple[int, int, list[str]]:
        opened = counting(svc)
        await svc.commit_round("acme", "s1", record("one"), Bounding())
        first = await svc.load("acme", "s1")
        await svc.load("acme", "s1")
        after_loads = opened[0]
        assert first is not None
        await svc.commit_round("acme", "s1", record("two"), Bounding(), first)
        loaded = await svc.load("acme", "s1")
        assert loaded is not None
        return after_loads, opened[0], [m["content"] for m in loaded.state.context_window]

    after_loads, total, window = run(tmp_path / "db.sqlite", keyring, scenario)
    assert after_loads == 0  # the state the round sealed is the one stored
    assert total == 0
    assert window == ["one", "re: one", "two", "re: two"]


def test_a_row_written_by_another_process_is_opened(tmp_path: Path) -> None:
    keyring = Keyring([new_master_key()])
    path = tmp_path / "db.sqlite"

    async def scenario(svc: SessionService) -> list[str]:
        opened = counting(svc)
        await svc.commit_round("acme", "s1", record("one"), Bounding())
        other = SQLiteStore(path)  # another process's connection and service
        await other.open()
        try:
            await SessionService(other, keyring).commit_round("acme", "s1", record("two"), Bounding())
        finally:
            await other.close()
        loaded = await svc.load("acme", "s1")
        assert loaded is not None and opened[0] == 1
        return [m["content"] for m in loaded.state.context_window]

    assert run(path, keyring, scenario) == ["one", "re: one", "two", "re: two"]


@pytest.mark.parametrize("tamper", [
    "UPDATE sessions SET version = version + 1",            # same bytes under another version
    "UPDATE session_heads SET bound_seq = bound_seq - 1",   # rows no longer the ones the chain binds
])
def test_a_tampered_row_fails_even_when_its_state_is_cached(tmp_path: Path, tamper: str) -> None:
    keyring = Keyring([new_master_key()])
    path = tmp_path / "db.sqlite"

    async def scenario(svc: SessionService) -> str:
        await svc.commit_round("acme", "s1", record("one"), Bounding())
        await svc.commit_round("acme", "s1", record("two"), Bounding())
        assert await svc.load("acme", "s1") is not None  # cached now
        with sqlite3.connect(path) as conn:
            conn.execute(tamper)
        with pytest.raises(IntegrityError) as caught:
            await svc.load("acme", "s1")
        return caught.value.detail

    assert run(path, keyring, scenario)


def test_erasure_drops_the_cached_state(tmp_path: Path) -> None:
    keyring = Keyring([new_master_key()])

    async def scenario(svc: SessionService) -> tuple[bool, bool]:
        await svc.commit_round("acme", "s1", record("one"), Bounding())
        cached = svc.states._items.get(("acme", "s1")) is not None
        await svc.erase("acme", "s1", "req-erase")
        return cached, svc.states._items.get(("acme", "s1")) is None

    assert run(tmp_path / "db.sqlite", keyring, scenario) == (True, True)


def _reference_normalise(window: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``normalise_window`` as it was before its fast path (every message through part lists),
    with Agently's default role mapping (75656f9: a role other than system, developer, user or
    assistant is sent as the assistant's)."""
    from gateway.session.model import AGENTLY_ROLES, CHAT_HISTORY_OPENER, CONTINUE_INPUT, _joined, _parts

    merged: list[tuple[str, list[Any]]] = []
    for message in window:
        role = str(message.get("role"))
        role = role if role in AGENTLY_ROLES else "assistant"
        parts = _parts(message.get("content"))
        if merged and merged[-1][0] == role:
            merged[-1][1].extend(parts)
        else:
            merged.append((role, list(parts)))
    if not merged:
        return []
    out = [_joined(role, parts) for role, parts in merged]
    if out[0]["role"] != "user":
        out.insert(0, {"role": "user", "content": CHAT_HISTORY_OPENER})
    if out[-1]["role"] != "assistant":
        out.append({"role": "assistant", "content": CONTINUE_INPUT})
    return out


@pytest.mark.parametrize("window", [
    [],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    [{"role": "assistant", "content": "b"}, {"role": "user", "content": None}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": 3}],
    [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": [{"type": "text", "text": "d"}]}],
    [{"role": "user", "content": "x", "name": "n"}, {"role": "tool", "content": "t"}],
])
def test_normalise_window_fast_path_matches_the_reference(window: list[dict[str, Any]]) -> None:
    assert normalise_window(window) == _reference_normalise(window)


def reads_by_lane(store: SQLiteStore) -> list[int]:
    """Count the reads *store* hands to its reader thread."""
    handed = [0]
    real = store._read

    async def spy(fn: Any) -> Any:
        handed[0] += 1
        return await real(fn)

    store._read = spy  # type: ignore[method-assign]
    return handed


def test_a_hot_session_is_read_on_the_loop_and_still_checked(tmp_path: Path) -> None:
    """A session this process just wrote is read without the reader thread; a round row deleted
    behind its back is still found by that read, and the session is quarantined."""
    keyring = Keyring([new_master_key()])
    path = tmp_path / "db.sqlite"

    async def scenario(svc: SessionService) -> tuple[int, int]:
        assert isinstance(svc.store, SQLiteStore)
        handed = reads_by_lane(svc.store)
        assert await svc.load("acme", "cold") is None  # never seen: the reader thread
        cold = handed[0]
        await svc.commit_round("acme", "s1", record("one"), Bounding())
        await svc.commit_round("acme", "s1", record("two"), Bounding())
        loaded = await svc.load("acme", "s1")
        assert loaded is not None and len(loaded.state.context_window) == 4
        hot = handed[0] - cold
        with sqlite3.connect(path) as conn:  # an operator deletes the first round
            conn.execute("DELETE FROM rounds WHERE tenant='acme' AND session_id='s1' AND seq=1")
        with pytest.raises(IntegrityError):
            await svc.load("acme", "s1")
        return cold, hot

    cold, hot = run(path, keyring, scenario)
    assert cold == 1
    assert hot == 0
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT quarantine_reason FROM session_heads WHERE session_id='s1'").fetchone()[0]


def test_a_busy_hot_read_waits_in_the_reader_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the loop's connection finds the database busy, the read goes to the reader thread
    (which may wait) instead of failing or blocking the loop."""
    import gateway.store.sqlite as sqlite_store

    keyring = Keyring([new_master_key()])
    real = sqlite_store.read_current

    async def scenario(svc: SessionService) -> tuple[int, list[str]]:
        assert isinstance(svc.store, SQLiteStore)
        await svc.commit_round("acme", "s1", record("one"), Bounding())
        with sqlite3.connect(tmp_path / "db.sqlite") as conn:  # another connection commits: rows must be read
            conn.execute("INSERT INTO meta VALUES ('touched', '1')")
        inline = svc.store._inline
        handed = reads_by_lane(svc.store)

        def busy_inline(conn: sqlite3.Connection, tenant: str, session_id: str | None) -> Any:
            if conn is inline:
                raise sqlite3.OperationalError("database is locked")
            return real(conn, tenant, session_id)

        monkeypatch.setattr(sqlite_store, "read_current", busy_inline)
        loaded = await svc.load("acme", "s1")
        assert loaded is not None
        return handed[0], [m["content"] for m in loaded.state.context_window]

    handed, window = run(tmp_path / "db.sqlite", keyring, scenario)
    assert handed == 1
    assert window == ["one", "re: one"]


def test_rows_this_process_committed_are_not_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While no other connection commits (``PRAGMA data_version``), a load and the next round's
    plan use the rows as this process's last commit left them: no query; they are still
    checked against the chain. Once another connection commits, they are read again."""
    import gateway.store.sqlite as sqlite_store

    keyring = Keyring([new_master_key()])
    path = tmp_path / "db.sqlite"
    reads = [0]
    real = sqlite_store.read_current

    def counted(conn: sqlite3.Connection, tenant: str, session_id: str | None) -> Any:
        reads[0] += 1
        return real(conn, tenant, session_id)

    monkeypatch.setattr(sqlite_store, "read_current", counted)

    async def scenario(svc: SessionService) -> tuple[int, int, list[str]]:
        await svc.commit_round("acme", "s1", record("one"), Bounding())  # a new session: read once
        first = reads[0]
        loaded = await svc.load("acme", "s1")
        await svc.commit_round("acme", "s1", record("two"), Bounding(), loaded)
        loaded = await svc.load("acme", "s1")
        own = reads[0] - first
        with sqlite3.connect(path) as conn:  # an operator rolls the state row back by one version
            conn.execute("UPDATE sessions SET version = version - 1 WHERE session_id = 's1'")
        with pytest.raises(IntegrityError):
            await svc.load("acme", "s1")
        assert loaded is not None
        return first, own, [m["content"] for m in loaded.state.context_window]

    first, own, window = run(path, keyring, scenario)
    assert first == 1
    assert own == 0
    assert window == ["one", "re: one", "two", "re: two"]


def test_known_rows_while_the_writer_is_busy_need_its_lock_held(tmp_path: Path) -> None:
    """With the writer thread inside a batch, the kept rows are handed out only while that batch
    holds the write lock and has looked at ``data_version`` (``_locked``); not between batches,
    when another connection may commit."""
    keyring = Keyring([new_master_key()])

    async def scenario(svc: SessionService) -> tuple[bool, bool, bool]:
        store = svc.store
        assert isinstance(store, SQLiteStore) and store._writer is not None
        await svc.commit_round("acme", "s1", record("one"), Bounding())
        lane = store._writer
        lane._busy.acquire()  # as if the writer thread were running a batch
        try:
            between = store._known_now("acme", "s1") is not None
            store._locked = True  # the batch took the lock and looked
            inside = store._known_now("acme", "s1") is not None
            store._unlocking()  # about to COMMIT: the lock goes
            after = store._known_now("acme", "s1") is not None
        finally:
            lane._busy.release()
        return between, inside, after

    between, inside, after = run(tmp_path / "db.sqlite", keyring, scenario)
    assert (between, inside, after) == (False, True, False)


@pytest.mark.parametrize("quiet", [True, False])
def test_a_write_waits_for_another_process_holding_the_lock(tmp_path: Path, quiet: bool) -> None:
    """Another connection (the CLI, another worker) holds the write lock for a while: a round,
    whether it would commit on the event loop (quiet) or in the writer thread, waits for it
    and commits once it is released, never failing as busy."""
    import threading
    import time

    keyring = Keyring([new_master_key()])
    path = tmp_path / "db.sqlite"

    async def scenario(svc: SessionService) -> tuple[float, list[str]]:
        assert isinstance(svc.store, SQLiteStore)
        svc.store.quiet = lambda: quiet
        await svc.commit_round("acme", "s1", record("one"), Bounding())
        holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")
        release = threading.Timer(0.3, holder.execute, args=("COMMIT",))
        release.start()
        started = time.monotonic()
        await svc.commit_round("acme", "s1", record("two"), Bounding())
        waited = time.monotonic() - started
        release.join()
        holder.close()
        loaded = await svc.load("acme", "s1")
        assert loaded is not None
        return waited, [m["content"] for m in loaded.state.context_window]

    waited, window = run(path, keyring, scenario)
    assert waited >= 0.25
    assert window == ["one", "re: one", "two", "re: two"]


def test_a_commit_that_fails_keeps_none_of_its_rows(tmp_path: Path) -> None:
    """The commit of a round fails at COMMIT (the disk, say): the caller gets the error, the
    rows kept for the session stay those of the last durable commit, so the next round builds
    on what is stored and a fresh read of the rows passes the chain check."""
    from gateway.errors import StoreUnavailable

    keyring = Keyring([new_master_key()])

    async def scenario(svc: SessionService) -> tuple[list[str], list[str]]:
        store = svc.store
        assert isinstance(store, SQLiteStore)
        store.quiet = lambda: True
        await svc.commit_round("acme", "s1", record("one"), Bounding())
        loaded = await svc.load("acme", "s1")
        real = store._unlocking
        calls = [0]

        def failing() -> None:  # called just before COMMIT, inside run_transaction's error handling
            calls[0] += 1
            real()
            if calls[0] == 1:
                raise sqlite3.OperationalError("disk I/O error")

        store._unlocking = failing  # type: ignore[method-assign]
        with pytest.raises(StoreUnavailable):
            await svc.commit_round("acme", "s1", record("two"), Bounding(), loaded)
        store._unlocking = real  # type: ignore[method-assign]
        after_failure = await svc.load("acme", "s1")
        assert after_failure is not None
        await svc.commit_round("acme", "s1", record("three"), Bounding(), after_failure)
        store._known.clear()  # read the rows themselves: they must match the chain
        svc.states.drop("acme", "s1")
        read = await svc.load("acme", "s1")
        assert read is not None
        return ([m["content"] for m in after_failure.state.context_window],
                [m["content"] for m in read.state.context_window])

    after_failure, read = run(tmp_path / "db.sqlite", keyring, scenario)
    assert after_failure == ["one", "re: one"]
    assert read == ["one", "re: one", "three", "re: three"]


def test_a_round_commits_at_once_only_when_the_store_can(tmp_path: Path) -> None:
    """When the store is quiet and free, ``commit_round`` commits without ever suspending (no
    task, no turn of the loop); when the gateway is busy or another connection holds the write
    lock, the round waits for the writer thread, shielded: dropping or cancelling its caller
    still commits it, and the checkpointer still hears of its audit entry."""
    keyring = Keyring([new_master_key()])
    path = tmp_path / "db.sqlite"

    def first_step(coro: Any) -> bool:
        """Run *coro* up to its first suspension, then drop it: True when it finished before."""
        try:
            coro.send(None)
        except StopIteration:
            return True
        coro.close()
        return False

    async def scenario(svc: SessionService) -> tuple[list[bool], list[str], list[int]]:
        store = svc.store
        assert isinstance(store, SQLiteStore)
        observed: list[int] = []  # what the gateway's checkpointer is told after each commit
        svc.store = ObservedStore(store, SimpleNamespace(observe=lambda rows: observed.extend(r.seq for r in rows)))
        busy = [False]
        store.quiet = lambda: not busy[0]
        at_once = first_step(svc.commit_round("acme", "s1", record("one"), Bounding()))
        busy[0] = True
        waited_busy = not first_step(svc.commit_round("acme", "s1", record("busy"), Bounding()))
        await svc.commit_round("acme", "s1", record("awaited"), Bounding())
        await svc.store.transact("acme", None, lambda cur: Changes(audit=[{"event": "round", "request_id": "r"}]))
        told_first = observed[-2:] == [3, 4]  # the checkpointer heard of each before its caller resumed
        busy[0] = False
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        task = asyncio.create_task(svc.commit_round("acme", "s1", record("two"), Bounding()))
        await asyncio.sleep(0.05)
        waited_lock = not task.done()  # waiting for the lock, in the writer thread
        task.cancel()
        holder.execute("COMMIT")
        holder.close()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):  # the shielded commits go on without their callers
            loaded = await svc.load("acme", "s1")
            assert loaded is not None
            if len(loaded.state.context_window) == 8 and len(observed) == 5:
                break
            await asyncio.sleep(0.01)
        steps = [at_once, waited_busy, told_first, waited_lock]
        return steps, [m["content"] for m in loaded.state.context_window], observed

    steps, window, observed = run(path, keyring, scenario)
    assert steps == [True, True, True, True]
    assert window == ["one", "re: one", "busy", "re: busy", "awaited", "re: awaited", "two", "re: two"]
    assert sorted(observed) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("altered", [False, True], ids=["commits", "fails"])
def test_a_cancelled_callers_round_is_logged_as_it_ends(tmp_path: Path, altered: bool) -> None:
    """A request cancelled while its round waits for the writer thread hears nothing of the
    commit, so the commit's end is logged: ``round_recorded_after_cancel`` when it went through,
    the error ``round_not_recorded`` when it failed (here: an operator altered the session's
    state row while the round waited for the write lock)."""
    keyring = Keyring([new_master_key()])
    path = tmp_path / "db.sqlite"

    async def scenario(svc: SessionService) -> list[dict[str, Any]]:
        store = svc.store
        assert isinstance(store, SQLiteStore)
        await svc.commit_round("acme", "s1", record("one"), Bounding())
        store.quiet = lambda: False  # every commit goes through the writer thread
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        if altered:
            holder.execute("UPDATE sessions SET state_ct = randomblob(64) WHERE session_id = 's1'")
        with capture_logs() as logs:
            task = asyncio.create_task(svc.commit_round("acme", "s1", record("two"), Bounding()))
            await asyncio.sleep(0.05)
            assert not task.done()  # waiting for the lock, in the writer thread
            task.cancel()
            holder.execute("COMMIT")
            holder.close()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(200):
                if any(e["event"].startswith("round_") for e in logs):
                    break
                await asyncio.sleep(0.01)
        return [e for e in logs if e["event"].startswith("round_")]

    events = run(path, keyring, scenario)
    if altered:
        assert [(e["event"], e["log_level"], e["request_id"]) for e in events] == [
            ("round_not_recorded", "error", "req-two")]
        assert events[0]["error"] == "IntegrityError"
    else:
        assert [(e["event"], e["log_level"], e["request_id"]) for e in events] == [
            ("round_recorded_after_cancel", "info", "req-two")]


def test_an_export_is_one_moment_of_the_session_when_a_round_lands_between_its_reads(tmp_path: Path) -> None:
    """The export reads the state, then the history: a round committed between the two used to give
    a history one round ahead of the window. Now the export reads again until both are one moment's."""
    keyring = Keyring([new_master_key()])

    async def scenario(svc: SessionService) -> dict[str, Any]:
        await svc.commit_round("acme", "s1", record("one"), Bounding())
        real = svc.full_context
        landed = []

        async def racing(tenant: str, session_id: str) -> list[dict[str, Any]]:
            if not landed:  # another request's round lands between the export's two reads
                landed.append(True)
                await svc.commit_round("acme", "s1", record("two"), Bounding())
            return await real(tenant, session_id)

        svc.full_context = racing  # type: ignore[method-assign]
        return await svc.export("acme", "s1")

    doc = run(tmp_path / "s.db", keyring, scenario)
    assert [m["content"] for m in doc["full_context"]] == ["one", "re: one", "two", "re: two"]
    assert [m["content"] for m in doc["context_window"]] == ["one", "re: one", "two", "re: two"]
