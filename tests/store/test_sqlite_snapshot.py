"""``SQLiteStore.snapshot``: a reader cancelled while its query runs (a verification stopped, the
gateway shutting down) gets its connection closed after that query, never from another thread
while the query still uses it (the console's verification job, cancelled at a test's teardown,
crashed a test run with a segmentation fault in a worker thread)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

import gateway.store.sqlite as sqlite_store
from gateway.store.sqlite import SQLiteStore


def test_a_cancelled_snapshot_read_finishes_before_its_connection_closes(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    started = threading.Event()
    end_snapshot = sqlite_store._end_snapshot

    def slow_read(conn: sqlite3.Connection) -> int:
        started.set()
        time.sleep(0.3)  # a long query, still running on the connection when its reader is cancelled
        value = int(conn.execute("SELECT count(*) FROM audit").fetchone()[0])
        events.append("read done")
        return value

    def recording_end(conn: sqlite3.Connection) -> None:
        events.append("close")
        end_snapshot(conn)

    monkeypatch.setattr(sqlite_store, "_end_snapshot", recording_end)

    async def body() -> None:
        store = SQLiteStore(tmp_path / "gateway.db")
        await store.open()
        try:
            async def reader() -> None:
                async with store.snapshot() as view:
                    await view._read(slow_read)

            task = asyncio.create_task(reader())
            await asyncio.to_thread(started.wait, 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(50):  # the close was queued behind the read; both end on their own
                if "close" in events:
                    break
                await asyncio.sleep(0.05)
        finally:
            await store.close()

    asyncio.run(body())
    assert events == ["read done", "close"]
