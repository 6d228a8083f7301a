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
from gateway import audit
from gateway.errors import StoreUnavailable
from gateway.keyring import Keyring, new_master_key
from gateway.sessions import Bounding, RoundRecord, SessionService
from gateway.store.postgres import PostgresStore, lock_key

pytestmark = pytest.mark.postgres
ACME = "acme"
GLOBEX = "globex"
INITECH = "initech"


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
            assert line["holder_pids"] == [holder.get_server_pid()]
            await holder.execute("ROLLBACK")
            await asyncio.wait_for(svc.commit_round(ACME, "s1", record("three"), Bounding()), 20)
            loaded = await svc.load(ACME, "s1")
            assert loaded is not None and [m["content"] for m in loaded.state.context_window] == [
                "one", "re: one", "three", "re: three"]
        finally:
            await holder.close()
            await store.close()

    asyncio.run(scenario())


def test_a_held_tenant_lock_fails_only_that_tenants_writes_in_a_shared_batch(
        pg_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds of another tenant batched with the stuck one (one writer lane) commit, and those
    queued behind it commit before the stuck tenant's next wait; only the stuck tenant's rounds
    fail, and the log names only it. The batch used to fail every tenant in it, blaming them all."""
    monkeypatch.setattr(pg_store, "LOCK_WAIT_SECONDS", 2.0)

    async def scenario() -> None:
        store = PostgresStore(pg_dsn, schema=pg_schema, pool_size=2, writers=1)
        await store.open()
        stuck, busy = await asyncpg.connect(pg_dsn), await asyncpg.connect(pg_dsn)
        done: list[str] = []

        def submit(tenant: str, session_id: str, text: str) -> asyncio.Task[object]:
            task = asyncio.create_task(svc.commit_round(tenant, session_id, record(text), Bounding()))
            task.add_done_callback(lambda _: done.append(text))
            return task

        async def lane_waits_for_a_lock() -> None:
            for _ in range(500):
                if await busy.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"):
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("the writer lane never waited for a lock")

        async def lane_holds(n: int) -> None:
            for _ in range(500):
                if store._lanes[0].qsize() == n:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"{n} writes never queued")

        try:
            svc = SessionService(store, Keyring([new_master_key()]))
            for tenant in (ACME, GLOBEX, INITECH):
                await svc.commit_round(tenant, "s1", record(f"{tenant}-one"), Bounding())
            await stuck.execute("BEGIN")
            await stuck.execute("SELECT pg_advisory_xact_lock($1)", lock_key("tenant", pg_schema, ACME))
            # a healthy process holds initech's lock a moment: acme's and globex's rounds queue as one batch
            await busy.execute("BEGIN")
            await busy.execute("SELECT pg_advisory_xact_lock($1)", lock_key("tenant", pg_schema, INITECH))
            with capture_logs() as logs:
                initech = submit(INITECH, "s1", "initech-two")
                await lane_waits_for_a_lock()
                acme, globex = submit(ACME, "s2", "acme-two"), submit(GLOBEX, "s1", "globex-two")
                await lane_holds(2)
                await busy.execute("ROLLBACK")
                await asyncio.wait_for(initech, 20)
                await lane_waits_for_a_lock()  # the batch of acme and globex, on acme's lock
                acme_later, globex_later = submit(ACME, "s3", "acme-three"), submit(GLOBEX, "s2", "globex-three")
                await lane_holds(2)
                results = await asyncio.wait_for(asyncio.gather(
                    acme, globex, acme_later, globex_later, return_exceptions=True), 20)
            assert not isinstance(results[1], BaseException), results[1]
            assert not isinstance(results[3], BaseException), results[3]
            for failed in (results[0], results[2]):
                assert isinstance(failed, StoreUnavailable), failed
                assert "write lock of tenant acme" in str(failed) and "globex" not in str(failed), failed
            assert done.index("globex-three") < done.index("acme-three"), done
            lines = [e for e in logs if e["event"] == "store_turn_timeout"]
            assert len(lines) == 2 and all(line["tenants"] == ["acme"] for line in lines), lines
            assert all(line["holder_pids"] == [stuck.get_server_pid()] for line in lines), lines
            await stuck.execute("ROLLBACK")
            await asyncio.wait_for(svc.commit_round(ACME, "s1", record("acme-four"), Bounding()), 20)
            loaded = await svc.load(ACME, "s1")
            assert loaded is not None and [m["content"] for m in loaded.state.context_window] == [
                "acme-one", "re: acme-one", "acme-four", "re: acme-four"]
            assert await svc.load(ACME, "s2") is None and await svc.load(ACME, "s3") is None
            loaded = await svc.load(GLOBEX, "s1")
            assert loaded is not None and [m["content"] for m in loaded.state.context_window] == [
                "globex-one", "re: globex-one", "globex-two", "re: globex-two"]
            for tenant in (ACME, GLOBEX, INITECH):
                assert (await audit.averify_chain(store.iter_audit(tenant), tenant=tenant)).ok, tenant
        finally:
            await stuck.close()
            await busy.close()
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
