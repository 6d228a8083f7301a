"""A stopped or stuck process holding a tenant's write lock on PostgreSQL (SIGSTOP, a paused VM,
a partitioned replica) fails the others' writes as unavailable after ``LOCK_WAIT_SECONDS``,
with a ``store_turn_timeout`` line naming the tenant, as SQLite's write turn does; it used to
hang every write of the tenant, on every worker and replica, for as long as the holder was
stuck, with nothing logged. A holder idle inside its transaction loses it after the same time."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from structlog.testing import capture_logs

import gateway.store.postgres as pg_store
from gateway.errors import StoreUnavailable
from gateway.keyring import Keyring, new_master_key
from gateway.sessions import Bounding, RoundRecord, SessionService
from gateway.store.postgres import PostgresStore, lock_key

pytestmark = pytest.mark.postgres
ACME = "acme"


def record(text: str) -> RoundRecord:
    return RoundRecord(f"req-{text}", "default", "h", "completed", text, f"re: {text}",
                       {"event": "round", "request_id": f"req-{text}"})


def test_a_held_tenant_lock_fails_writes_as_unavailable_then_frees(
        pg_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg_store, "LOCK_WAIT_SECONDS", 0.5)

    async def scenario() -> None:
        store = PostgresStore(pg_dsn, schema=pg_schema, pool_size=2)
        await store.open()
        holder = await asyncpg.connect(pg_dsn)
        try:
            svc = SessionService(store, Keyring([new_master_key()]))
            await svc.commit_round(ACME, "s1", record("one"), Bounding())
            # another process's transaction that took acme's lock and then stopped
            await holder.execute("BEGIN")
            await holder.execute("SELECT pg_advisory_xact_lock($1)", lock_key("tenant", pg_schema, ACME))
            with capture_logs() as logs, pytest.raises(StoreUnavailable) as failed:
                await asyncio.wait_for(svc.commit_round(ACME, "s1", record("two"), Bounding()), 20)
            assert "write lock of tenant acme" in str(failed.value), failed.value
            (line,) = [e for e in logs if e["event"] == "store_turn_timeout"]
            assert line["tenants"] == ["acme"] and "stopped or stuck" in line["note"]
            await holder.execute("ROLLBACK")
            await asyncio.wait_for(svc.commit_round(ACME, "s1", record("three"), Bounding()), 20)
            loaded = await svc.load(ACME, "s1")
            assert loaded is not None and [m["content"] for m in loaded.state.context_window] == [
                "one", "re: one", "three", "re: three"]
        finally:
            await holder.close()
            await store.close()

    asyncio.run(scenario())


def test_a_pooled_connection_idle_inside_a_transaction_loses_it(pg_dsn: str, pg_schema: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool's connections carry ``idle_in_transaction_session_timeout``: a gateway process
    stopped between the statements of its commit cannot hold the tenant's lock for ever."""
    monkeypatch.setattr(pg_store, "LOCK_WAIT_SECONDS", 0.5)

    async def scenario() -> None:
        store = PostgresStore(pg_dsn, schema=pg_schema, pool_size=1)
        await store.open()
        try:
            assert store._pool is not None
            async with store._pool.acquire() as conn:
                assert await conn.fetchval("SHOW idle_in_transaction_session_timeout") == "500ms"
                await conn.execute("BEGIN")
                await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key("tenant", pg_schema, ACME))
                await asyncio.sleep(1.5)  # idle in the transaction past the limit: the server ends it
                with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
                    await conn.execute("SELECT 1")
        finally:
            await store.close()

    asyncio.run(scenario())
