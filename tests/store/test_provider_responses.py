"""The ``provider_responses`` table: which tenant each provider-held response id belongs to, by
an HMAC of tenant and id under a key derived from the audit signing key, written in the
transaction of the round that relayed it, shared by every store on one database, and added to
stores made before it by a migration; rows kept by the id's bare SHA-256 (schema 4) are dropped."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.audit import EntryKey
from gateway.store.base import Changes, Current, owned_response, provider_id_digest
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import SQLiteStore

ID = "resp_68af0b1c2d3e4f5a6b7c8d9e0f1a2b3c"


def _keep(*ids: str) -> Any:
    def plan(cur: Current) -> Changes:
        return Changes(audit=[{"event": "round", "request_id": "r"}],
                       provider_responses=[provider_id_digest(i) for i in ids])
    return plan


def test_an_id_is_the_tenants_once_committed_and_nobody_elses(backend: Any) -> None:
    """A change without a session makes the id its tenant's, with its audit entry; the same id
    again is no error; another tenant, or another id, is not held."""
    async def body(store: Any) -> tuple[bool, ...]:
        await store.transact("acme", None, _keep(ID, ID), bounded=True)
        await store.transact("acme", None, _keep(ID), bounded=True)
        return (await store.holds_provider_response("acme", provider_id_digest(ID)),
                await store.holds_provider_response("globex", provider_id_digest(ID)),
                await store.holds_provider_response("acme", provider_id_digest(ID + "x")),
                await store.audit_head("acme") == 2)
    assert backend.run(body) == (True, False, False, True)


def test_a_failing_plan_keeps_no_id(backend: Any) -> None:
    """The id is written with the round's transaction: a plan that fails leaves none behind."""
    def failing(cur: Current) -> Changes:
        raise ValueError("no")

    async def body(store: Any) -> bool:
        with pytest.raises(ValueError):
            await store.transact("acme", None, failing, bounded=True)
        return bool(await store.holds_provider_response("acme", provider_id_digest(ID)))
    assert backend.run(body) is False


def test_every_store_on_one_database_sees_the_ids(backend: Any) -> None:
    """Two stores (workers, replicas) share the table: an id one commits, the other holds."""
    async def body(_: Any) -> bool:
        first, second = backend.make(), backend.make()
        await first.open()
        await second.open()
        try:
            await first.transact("acme", None, _keep(ID), bounded=True)
            return bool(await second.holds_provider_response("acme", provider_id_digest(ID)))
        finally:
            await first.close()
            await second.close()
    assert backend.run(body) is True


def test_a_row_moved_to_another_tenant_or_made_without_the_key_holds_nothing(tmp_path: Path) -> None:
    """What the table keeps is bound to the tenant and to the signing key's secret: acme's row
    copied under globex's name, a row holding the id's bare SHA-256, or one keyed with another
    secret, makes the id nobody's but acme's."""
    key = EntryKey("k1", b"\x01" * 32)
    path = tmp_path / "keyed.db"

    async def body() -> tuple[bool, ...]:
        store = SQLiteStore(path, entry_key=key)
        await store.open()
        try:
            await store.transact("acme", None, _keep(ID), bounded=True)
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("INSERT INTO provider_responses SELECT 'globex', id_mac, created_at FROM provider_responses")
            conn.execute("INSERT INTO provider_responses VALUES ('initech', ?, 0)", (provider_id_digest(ID),))
            conn.execute("INSERT INTO provider_responses VALUES ('hooli', ?, 0)",
                         (owned_response(EntryKey("k2", b"\x02" * 32), "hooli", provider_id_digest(ID)),))
            conn.close()
            return tuple([await store.holds_provider_response(t, provider_id_digest(ID))
                          for t in ("acme", "globex", "initech", "hooli")])
        finally:
            await store.close()
    assert asyncio.run(body()) == (True, False, False, False)


def test_a_sqlite_file_from_schema_3_gets_the_table(tmp_path: Path) -> None:
    """A file made before the table (schema 3) is migrated when opened; it holds no id, so an id
    made before the upgrade is refused."""
    path = tmp_path / "old.db"
    asyncio.run(_open_close(SQLiteStore(path)))
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE provider_responses")
    conn.execute("UPDATE meta SET value='3' WHERE name='schema_version'")
    conn.commit()
    conn.close()

    async def body() -> bool:
        store = SQLiteStore(path)
        await store.open()
        try:
            before = await store.holds_provider_response("acme", provider_id_digest(ID))
            await store.transact("acme", None, _keep(ID), bounded=True)
            return not before and await store.holds_provider_response("acme", provider_id_digest(ID))
        finally:
            await store.close()
    assert asyncio.run(body())
    assert sqlite3.connect(path).execute("SELECT value FROM meta WHERE name='schema_version'").fetchone() == ("5",)


def test_rows_kept_by_the_ids_bare_hash_are_dropped_by_the_migration(tmp_path: Path) -> None:
    """A schema-4 file keeps ids by their SHA-256, which a database writer can copy to any tenant:
    migration 5 deletes those rows (an id relayed before the upgrade is refused afterwards: the
    conversation starts anew) and keeps ids by their keyed MAC from then on."""
    path = tmp_path / "v4.db"
    asyncio.run(_open_close(SQLiteStore(path)))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TABLE provider_responses")
    conn.execute("CREATE TABLE provider_responses (tenant TEXT NOT NULL, id_sha256 BLOB NOT NULL, "
                 "created_at REAL NOT NULL, PRIMARY KEY (tenant, id_sha256)) WITHOUT ROWID")
    conn.execute("INSERT INTO provider_responses VALUES ('acme', ?, 0)", (provider_id_digest(ID),))
    conn.execute("UPDATE meta SET value='4' WHERE name='schema_version'")
    conn.close()

    async def body() -> tuple[bool, bool]:
        store = SQLiteStore(path)
        await store.open()
        try:
            before = await store.holds_provider_response("acme", provider_id_digest(ID))
            await store.transact("acme", None, _keep(ID), bounded=True)
            return before, await store.holds_provider_response("acme", provider_id_digest(ID))
        finally:
            await store.close()
    assert asyncio.run(body()) == (False, True)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM provider_responses").fetchone() == (1,)
    assert conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone() == ("5",)


@pytest.mark.postgres
def test_a_postgres_schema_from_version_3_gets_the_table(pg_dsn: str, pg_schema: str) -> None:
    """A schema migrated to version 3 gets migrations 4 (the table) and 5 (keyed ids) when a newer
    store opens it."""
    async def body() -> tuple[list[int], bool]:
        await PostgresStore(pg_dsn, schema=pg_schema).migrate()
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(f'DROP TABLE "{pg_schema}".provider_responses; '
                               f'DELETE FROM "{pg_schema}".schema_migrations WHERE version >= 4')
        finally:
            await conn.close()
        store = PostgresStore(pg_dsn, schema=pg_schema)
        applied = await store.migrate()
        await store.open()
        try:
            await store.transact("acme", None, _keep(ID), bounded=True)
            return applied, await store.holds_provider_response("acme", provider_id_digest(ID))
        finally:
            await store.close()
    assert asyncio.run(body()) == ([4, 5], True)


async def _open_close(store: Any) -> None:
    await store.open()
    await store.close()
