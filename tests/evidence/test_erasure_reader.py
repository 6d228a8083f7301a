"""Erasure is final even with a reader (issue 10 §5): while another connection holds a read
transaction on the SQLite file, ``DELETE`` answers 202 ``purge: pending`` (the erased bytes are
still in the write-ahead log); once the reader closes, the gateway's background retry folds the
log and the key and ciphertext bytes leave the db, -wal and -shm files within seconds, with an
``erasure_completed`` audit entry and the pending gauge back at zero."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import orjson

from gateway.erasure import ErasureFinisher
from gateway.errors import StoreUnavailable
from gateway.handlers import SERVICES
from gateway.store.base import Changes, Current
from gateway.store.sqlite import _connect
from tests.conftest import Gateway, wait_for
from tests.test_erasure import audit_events, delete, session_bytes
from tests.test_integrity import chat


def pending_gauge(gw: Gateway) -> float:
    text = httpx.get(f"{gw.url}/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("sessiongate_erasures_pending "))
    return float(line.split()[1])


def test_erasure_with_a_reader_open_is_pending_then_final_once_it_closes(gateway: Gateway) -> None:
    """Pending (202, gauge 1, bytes still stored) while a reader holds a snapshot; final after."""
    chat(gateway, "held", "the distinctive secret zebra-4417")
    doomed = session_bytes(gateway, "acme", "held")
    assert all(blob in gateway.stored_bytes() for blob in doomed)

    reader = sqlite3.connect(gateway.db_path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM sessions").fetchone()  # holds the snapshot with the key
        resp = delete(gateway, "held")
        assert resp.status_code == 202, resp.text
        assert resp.json() == {"id": "held", "deleted": True, "purge": "pending"}
        assert pending_gauge(gateway) == 1
        stored = gateway.stored_bytes()
        assert any(blob in stored for blob in doomed[:2]), "the reader should have kept the key bytes on disk"
        assert not any('"erasure_completed"' in body for body in audit_events(gateway, "acme"))
    finally:
        reader.execute("COMMIT")
        reader.close()

    def gone() -> bool:
        stored = gateway.stored_bytes()
        return not any(blob in stored for blob in doomed)
    wait_for(gone, seconds=5)
    wait_for(lambda: pending_gauge(gateway) == 0, seconds=5)
    completed = [orjson.loads(b) for b in audit_events(gateway, "acme") if '"erasure_completed"' in b]
    assert [e["session_id"] for e in completed] == ["held"]
    erasure = next(orjson.loads(b) for b in audit_events(gateway, "acme") if '"erasure"' in b)
    assert completed[0]["request_id"] == erasure["request_id"]


def test_erasure_without_a_reader_completes_at_once(gateway: Gateway) -> None:
    """No reader: 200 ``purge: complete``, the ``erasure`` entry alone is final, nothing pending."""
    chat(gateway, "quick", "short-lived")
    resp = delete(gateway, "quick")
    assert resp.status_code == 200 and resp.json()["purge"] == "complete"
    assert not any('"erasure_completed"' in body for body in audit_events(gateway, "acme"))
    assert len(gateway.app[SERVICES].sessions.erasures) == 0


def test_store_connections_zero_freed_pages(tmp_path: Path) -> None:
    """``secure_delete`` is on for the store's connections, so a checkpoint leaves no erased
    bytes in the main file's free pages."""
    with closing(_connect(tmp_path / "x.db")) as conn:
        assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 1


class FlakyStore:
    """A store whose checkpoint fails, then is busy, then completes; audit plans are collected."""

    def __init__(self) -> None:
        self.results: list[object] = [StoreUnavailable("down"), False, True]
        self.audit: list[dict[str, object]] = []

    async def checkpoint(self) -> bool:
        outcome = self.results.pop(0) if len(self.results) > 1 else self.results[0]
        if isinstance(outcome, Exception):
            raise outcome
        return bool(outcome)

    async def pending_erasures(self) -> None:
        return None  # keeps no record of them (as PostgreSQL): the finisher's memory holds them

    async def transact(self, tenant: str, session_id: str | None, plan: Any) -> Changes:
        changes = plan(Current(tenant, session_id, None, None))
        self.audit.extend(changes.audit)
        return changes


def test_the_background_retry_survives_store_errors_and_audits_completion() -> None:
    """A failing, then busy, then completing checkpoint: the erasure stays pending through the
    error and completes with one erasure_completed entry carrying the erasure's request id."""
    async def main() -> tuple[bool, FlakyStore, ErasureFinisher]:
        store = FlakyStore()
        finisher = ErasureFinisher(store, first_delay=0.01, max_delay=0.02)  # type: ignore[arg-type]
        first = await finisher.settle("acme", "s1", "req-1")
        assert len(finisher) == 1
        assert await finisher.wait(5.0)
        await finisher.stop()
        return first, store, finisher
    first, store, finisher = asyncio.run(main())
    assert first is False and len(finisher) == 0
    assert [(e["event"], e["request_id"], e["session_id"]) for e in store.audit] == [
        ("erasure_completed", "req-1", "s1")]


def test_a_purge_checkpoint_kept_busy_is_retried_until_it_completes() -> None:
    """Retention's checkpoint (``fold``) is retried in the background too, without an audit entry."""
    async def main() -> tuple[bool, bool, FlakyStore]:
        store = FlakyStore()
        store.results = [False, False, True]
        finisher = ErasureFinisher(store, first_delay=0.01, max_delay=0.02)  # type: ignore[arg-type]
        first = await finisher.fold()
        done = await finisher.wait(5.0)
        await finisher.stop()
        return first, done, store
    first, done, store = asyncio.run(main())
    assert first is False and done and store.results == [True] and store.audit == []


def test_two_processes_finishing_one_pending_erasure_write_one_entry(tmp_path: Path) -> None:
    """Two finishers (two workers) that both find an erasure recorded as pending finish it once:
    one ``erasure_completed`` entry, and the record is gone from the store."""
    from gateway.audit import entry_fields
    from gateway.store.sqlite import SQLiteStore

    async def main() -> tuple[list[str], object]:
        store = SQLiteStore(tmp_path / "x.db")
        await store.open()
        try:
            await store.transact("acme", "s1", lambda cur: Changes(
                audit=[{"event": "erasure", "request_id": "req-1", "session_id": "s1"}], delete_session=True,
                erasure="req-1"))
            found = await store.pending_erasures()
            assert found is not None and [(p.tenant, p.session_id, p.request_id) for p in found] == [
                ("acme", "s1", "req-1")]
            one, two = ErasureFinisher(store), ErasureFinisher(store)  # type: ignore[arg-type]
            await asyncio.gather(one.resume(found), two.resume(found))  # one may find the other checkpointing
            assert await one.wait(5.0) and await two.wait(5.0)
            await one.stop()
            await two.stop()
            events = [entry_fields(a)["event"] async for a in store.iter_audit("acme")]
            return events, await store.pending_erasures()
        finally:
            await store.close()
    events, left = asyncio.run(main())
    assert events == ["erasure", "erasure_completed"] and left == []
