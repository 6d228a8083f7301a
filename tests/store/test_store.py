"""The store contract, run against every backend (SQLite and PostgreSQL) through the same tests.

Most tests go through ``SessionService`` with a real keyring, as the gateway does; the paging,
chaining and failure tests drive the raw ``Store`` with hand-written plans. The last tests are
PostgreSQL's own: migrations, and failures turned into ``StoreUnavailable``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from gateway import audit, evidence
from gateway.errors import Conflict, NotFound, StoreUnavailable
from gateway.keyring import Keyring, new_master_key
from gateway.sessions import Bounding, RoundRecord, SessionService
from gateway.store.base import Changes, Current, DataKeyRow, RoundRow, SessionRow
from gateway.store.postgres import MIGRATIONS, PAGE, PostgresStore
from gateway.store.sqlite import PAGE as SQLITE_PAGE
from gateway.store.sqlite import SQLiteStore

ACME, GLOBEX = "acme", "globex"


def record(marker: str, outcome: str = "completed") -> RoundRecord:
    return RoundRecord(request_id=marker, policy_id="default", policy_hash="h" * 8, outcome=outcome,
                       user=f"user {marker}", assistant=f"reply {marker}",
                       audit={"event": "round", "request_id": marker, "outcome": outcome})


def service(store: Any, keyring: Keyring | None = None) -> SessionService:
    return SessionService(store, keyring or Keyring([new_master_key()]))


async def chain(store: Any, tenant: str = ACME, **kw: Any) -> list[Any]:
    return [row async for row in store.iter_audit(tenant, **kw)]


async def rounds(store: Any, tenant: str = ACME, session_id: str | None = None, **kw: Any) -> list[RoundRow]:
    return [row async for row in store.iter_rounds(tenant, session_id, **kw)]


def raw_rounds(tenant: str, sid: str, count: int) -> Changes:
    """A plan result with *count* rounds, ``created_at`` = ``seq`` so time filters are exact."""
    return Changes(rounds=[RoundRow(tenant, sid, seq, float(seq), f"r{seq}", "p", "h", "completed", "round",
                                    bytes([seq % 256]) * 8) for seq in range(1, count + 1)])


def users(messages: list[dict[str, Any]]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "user"]


# --- sessions through SessionService ------------------------------------------------------


def test_commit_round_then_load_returns_the_state(backend: Any) -> None:
    """Two committed rounds come back as the window, full_context, version and next sequence."""
    async def body(store: Any) -> None:
        svc = service(store)
        await svc.commit_round(ACME, "s1", record("one"), Bounding())
        await svc.commit_round(ACME, "s1", record("two"), Bounding())
        loaded = await svc.load(ACME, "s1")
        assert loaded is not None
        assert (loaded.version, loaded.next_seq) == (2, 3)
        assert users(loaded.state.context_window) == ["user one", "user two"]
        assert users(await svc.full_context(ACME, "s1")) == ["user one", "user two"]
        srow, krow = await store.get_session(ACME, "s1")
        assert isinstance(srow, SessionRow) and isinstance(krow, DataKeyRow)
        assert isinstance(srow.state_ct, bytes) and isinstance(krow.wrapped, bytes)
        assert await svc.load(ACME, "missing") is None
        assert await svc.load(GLOBEX, "s1") is None
    backend.run(body)


def test_export_import_round_trip_in_agently_json(backend: Any) -> None:
    """An exported session imports into a new id unchanged; a different history is refused."""
    async def body(store: Any) -> None:
        svc = service(store)
        for marker in ("a", "b", "c"):
            await svc.commit_round(ACME, "src", record(marker), Bounding())
        data = await svc.export(ACME, "src")
        assert await svc.import_agently(ACME, "dst", data, "imp-1") == 6
        assert await svc.export(ACME, "dst") == {**data, "id": "dst"}
        assert await svc.import_agently(ACME, "dst", data, "imp-2") == 0
        other = {**data, "full_context": [{"role": "user", "content": "something else"}]}
        with pytest.raises(Conflict):
            await svc.import_agently(ACME, "dst", other, "imp-3")
        with pytest.raises(NotFound):
            await svc.export(ACME, "nowhere")
    backend.run(body)


def test_reset_clears_the_window_and_keeps_the_history(backend: Any) -> None:
    """Reset empties the context window while full_context keeps every round."""
    async def body(store: Any) -> None:
        svc = service(store)
        await svc.commit_round(ACME, "s1", record("x"), Bounding())
        await svc.reset(ACME, "s1", "reset-1")
        loaded = await svc.load(ACME, "s1")
        assert loaded is not None and loaded.state.context_window == []
        assert users(await svc.full_context(ACME, "s1")) == ["user x"]
        with pytest.raises(NotFound):
            await svc.reset(ACME, "nowhere", "reset-2")
        assert audit.entry_fields((await chain(store))[-1])["event"] == "reset"
    backend.run(body)


def test_erase_removes_the_data_key_and_every_row(backend: Any) -> None:
    """After erasure the session's key, state and rounds are gone and the chain records it."""
    async def body(store: Any) -> None:
        svc = service(store)
        await svc.commit_round(ACME, "gone", record("secret"), Bounding())
        await svc.commit_round(ACME, "kept", record("other"), Bounding())
        await svc.erase(ACME, "gone", "erase-1")
        await store.checkpoint()
        assert await store.get_session(ACME, "gone") == (None, None)
        assert await rounds(store, ACME, "gone") == []
        assert [k.session_id async for k in store.iter_data_keys()] == ["kept"]
        assert [s.session_id for s in await store.list_sessions(ACME)] == ["kept"]
        assert users(await svc.full_context(ACME, "kept")) == ["user other"]
        last = audit.entry_fields((await chain(store))[-1])
        assert (last["event"], last["session_id"]) == ("erasure", "gone")
        with pytest.raises(NotFound):
            await svc.erase(ACME, "gone", "erase-2")
    backend.run(body)


def test_list_sessions_newest_first_with_round_counts(backend: Any) -> None:
    """Sessions are listed for their tenant only, most recently written first, with round counts."""
    async def body(store: Any) -> None:
        svc = service(store)
        await svc.commit_round(ACME, "old", record("1"), Bounding())
        await svc.commit_round(ACME, "new", record("2"), Bounding())
        await svc.commit_round(ACME, "new", record("3"), Bounding())
        await svc.commit_round(GLOBEX, "theirs", record("4"), Bounding())
        listed = await svc.list_sessions(ACME)
        assert [(s.session_id, s.rounds, s.version) for s in listed] == [("new", 2, 2), ("old", 1, 1)]
        assert await store.tenants() == [ACME, GLOBEX]
    backend.run(body)


def test_concurrent_commits_on_one_session_lose_nothing(backend: Any) -> None:
    """Fifty rounds committed at once on one session all land, numbered 1..50 in audit order."""
    async def body(store: Any) -> None:
        svc = service(store)
        markers = [f"m{i}" for i in range(50)]
        await asyncio.gather(*(svc.commit_round(ACME, "hot", record(m), Bounding()) for m in markers))
        stored = await rounds(store, ACME, "hot")
        assert [r.seq for r in stored] == list(range(1, 51))
        assert sorted(users(await svc.full_context(ACME, "hot"))) == sorted(f"user {m}" for m in markers)
        loaded = await svc.load(ACME, "hot")
        assert loaded is not None and (loaded.version, loaded.next_seq) == (50, 51)
        entries = [audit.entry_fields(r) for r in await chain(store)]
        assert [e["round_seq"] for e in entries] == list(range(1, 51))
        assert [e["request_id"] for e in entries] == [r.request_id for r in stored]
        assert (await audit.averify_chain(store.iter_audit(ACME), tenant=ACME)).ok
    backend.run(body)


def test_erase_between_rounds_in_one_batch_starts_the_session_afresh(backend: Any) -> None:
    """A round, an erasure and a round submitted together leave only the last round, under a new key."""
    async def body(store: Any) -> None:
        svc = service(store)
        first, _, _ = await asyncio.gather(svc.commit_round(ACME, "s", record("before"), Bounding()),
                                           svc.erase(ACME, "s", "erase-1"),
                                           svc.commit_round(ACME, "s", record("after"), Bounding()))
        assert users(await svc.full_context(ACME, "s")) == ["user after"]
        assert [r.seq for r in await rounds(store, ACME, "s")] == [1]
        _, key = await store.get_session(ACME, "s")
        assert key is not None and first.data_key is not None and key.dk_id != first.data_key.dk_id
        events = [audit.entry_fields(r)["event"] for r in await chain(store)]
        assert events == ["round", "erasure", "round"]
        assert (await audit.averify_chain(store.iter_audit(ACME), tenant=ACME)).ok
    backend.run(body)


def test_two_stores_on_one_database_serialise_writes(backend: Any) -> None:
    """Two store instances on one database (two replicas) interleave rounds without loss."""
    async def body(first: Any) -> None:
        second = backend.make()
        await second.open()
        try:
            keyring = Keyring([new_master_key()])
            a, b = service(first, keyring), service(second, keyring)
            replicas = [a, b] * 20
            await asyncio.gather(*(svc.commit_round(ACME, "shared", record(f"m{i}"), Bounding())
                                   for i, svc in enumerate(replicas)))
        finally:
            await second.close()
        assert [r.seq for r in await rounds(first, ACME, "shared")] == list(range(1, 41))
        report = await audit.averify_chain(first.iter_audit(ACME), tenant=ACME)
        assert report.ok and report.entries == 40
    backend.run(body)


def test_rewrap_is_compare_and_set_and_audited(backend: Any) -> None:
    """Re-wrapping succeeds once from the current row, with a ``rewrap`` entry that binds the new
    wrapping (the session loads and verifies under it), and refuses a stale row."""
    async def body(store: Any) -> None:
        old_key = new_master_key()
        await service(store, Keyring([old_key])).commit_round(ACME, "s1", record("x"), Bounding())
        new_key = new_master_key(taken={old_key.id})
        rotated = service(store, Keyring([dataclasses.replace(old_key, state="active"), new_key]))
        _, row = await store.get_session(ACME, "s1")
        assert await rotated.rewrap(row) is True
        assert await rotated.rewrap(row) is False
        assert (await store.count_data_keys(new_key.id), await store.count_data_keys(old_key.id)) == (1, 0)
        only_new = service(store, Keyring([new_key]))
        assert users(await only_new.full_context(ACME, "s1")) == ["user x"]
        assert (await only_new.load(ACME, "s1")) is not None
        entries = [orjson.loads(a.body) async for a in store.iter_audit(ACME)]
        assert [e["event"] for e in entries] == ["round", "rewrap"]
        assert entries[-1]["state"]["data_key"]["kek_id"] == new_key.id
        assert entries[-1]["state"]["version"] == entries[0]["state"]["version"]
        report = await audit.averify_chain(store.iter_audit(ACME), tenant=ACME)
        assert report.ok
    backend.run(body)


# --- the raw store -----------------------------------------------------------------------


def test_iter_rounds_pages_in_session_then_sequence_order(backend: Any) -> None:
    """More than two pages of rounds come back ordered by (session, seq), filtered by session and time."""
    assert PAGE == SQLITE_PAGE

    async def body(store: Any) -> None:
        for sid in ("a", "B", "a-1"):
            await store.transact(ACME, sid, lambda cur, sid=sid: raw_rounds(ACME, sid, 450))
        await store.transact(GLOBEX, "a", lambda cur: raw_rounds(GLOBEX, "a", 3))
        every = await rounds(store)
        assert len(every) == 1350
        assert [(r.session_id, r.seq) for r in every] == sorted((sid, n) for sid in ("a", "B", "a-1")
                                                                 for n in range(1, 451))
        assert [r.seq for r in await rounds(store, ACME, "a-1")] == list(range(1, 451))
        window = await rounds(store, ACME, since=100.0, until=200.0)
        assert len(window) == 300 and all(100 <= r.seq < 200 for r in window)
        assert every[0].ct == bytes([1]) * 8 and every[0].outcome == "completed"
        later = await rounds(store, ACME, "a", after_seq=120)  # the rest of one session, from a round on
        assert [r.seq for r in later] == list(range(121, 451)) and {r.session_id for r in later} == {"a"}
        assert await rounds(store, ACME, "a", after_seq=450) == []
    backend.run(body)


def test_iter_audit_pages_and_the_chain_stays_continuous(backend: Any) -> None:
    """A chain longer than two pages, written over several transactions, verifies and resumes."""
    async def body(store: Any) -> None:
        entries = [{"event": "proxy", "request_id": f"p{i}"} for i in range(1100)]
        written = await store.transact(ACME, None, lambda cur: Changes(audit=list(entries)))
        assert [r.seq for r in written.audit_rows] == list(range(1, 1101))
        await store.transact(ACME, None, lambda cur: Changes(audit=[{"event": "reset"}] * 5))
        await store.transact(GLOBEX, None, lambda cur: Changes(audit=[{"event": "reset"}]))
        rows = await chain(store)
        assert [r.seq for r in rows] == list(range(1, 1106))
        assert rows[0].prev_hash == audit.GENESIS and rows[1100].prev_hash == rows[1099].hash
        assert rows[:1100] == written.audit_rows
        report = await audit.averify_chain(store.iter_audit(ACME), tenant=ACME)
        assert report.ok and report.entries == 1105
        assert [r.seq for r in await chain(store, after_seq=1000)] == list(range(1001, 1106))
        theirs = await chain(store, GLOBEX)
        assert [(r.seq, r.prev_hash) for r in theirs] == [(1, audit.GENESIS)]
        assert await store.tenants() == [ACME, GLOBEX]
    backend.run(body)


def test_a_failing_plan_writes_nothing_while_its_neighbours_commit(backend: Any) -> None:
    """Plans that raise (or whose audit entry cannot be sealed) leave no row; the others commit."""
    refusal = NotFound("no such session")

    def refuse(cur: Current) -> Changes:
        raise refusal

    def bad_audit(cur: Current) -> Changes:
        return Changes(rounds=raw_rounds(ACME, "bad", 1).rounds, audit=[{"event": "round", "password": "x"}])

    def good(sid: str) -> Any:
        return lambda cur: Changes(rounds=raw_rounds(ACME, sid, 1).rounds, audit=[{"event": "round"}])

    async def body(store: Any) -> None:
        results = await asyncio.gather(store.transact(ACME, "g1", good("g1")), store.transact(ACME, "x", refuse),
                                       store.transact(ACME, "bad", bad_audit), store.transact(ACME, "g2", good("g2")),
                                       return_exceptions=True)
        assert results[1] is refusal
        assert isinstance(results[2], ValueError)
        assert isinstance(results[0], Changes) and isinstance(results[3], Changes)
        assert [r.session_id for r in await rounds(store)] == ["g1", "g2"]
        rows = await chain(store)
        assert [r.seq for r in rows] == [1, 2]
        assert (await audit.averify_chain(store.iter_audit(ACME), tenant=ACME)).ok
    backend.run(body)


def test_a_lone_failing_plan_leaves_nothing_of_what_it_wrote(backend: Any) -> None:
    """A transaction of one plan that fails after its first rows went in (its round is inserted,
    then its audit entry cannot be sealed) leaves neither; the next transaction commits normally."""
    def bad_audit(cur: Current) -> Changes:
        return Changes(rounds=raw_rounds(ACME, "bad", 2).rounds, audit=[{"event": "round", "password": "x"}])

    async def body(store: Any) -> None:
        with pytest.raises(ValueError):
            await store.transact(ACME, "bad", bad_audit)
        assert await rounds(store) == [] and await chain(store) == []
        await store.transact(ACME, "good", lambda cur: Changes(rounds=raw_rounds(ACME, "good", 1).rounds,
                                                               audit=[{"event": "round"}]))
        assert [(r.session_id, r.seq) for r in await rounds(store)] == [("good", 1)]
        assert [r.seq for r in await chain(store)] == [1]
    backend.run(body)


def test_retention_drops_rounds_and_their_window_messages(backend: Any) -> None:
    """Dropping expired rounds deletes their rows, takes their text out of the sealed window,
    erases a session whose rounds all expired while idle, and audits each step."""
    async def body(store: Any) -> None:
        svc = service(store)
        for marker in ("old", "new"):
            await svc.commit_round(ACME, "kept", record(marker), Bounding())
        await svc.commit_round(ACME, "idle", record("gone"), Bounding())
        old = [(row.seq, msgs) async for row, msgs in svc.decrypted_rounds(ACME, "kept") if row.seq == 1]
        assert await svc.drop_rounds(ACME, "kept", old, policy_id="default", erase_if_idle_before=None) == (1, False)
        assert users(await svc.full_context(ACME, "kept")) == ["user new"]
        loaded = await svc.load(ACME, "kept")
        assert loaded is not None and users(loaded.state.context_window) == ["user new"]
        idle = [(row.seq, msgs) async for row, msgs in svc.decrypted_rounds(ACME, "idle")]
        future = 1e12
        assert await svc.drop_rounds(ACME, "idle", idle, policy_id="default", erase_if_idle_before=future) == (1, True)
        assert await store.get_session(ACME, "idle") == (None, None)
        events = [audit.entry_fields(r)["event"] for r in await chain(store)]
        assert events[-2:] == ["purge", "purge"]
        assert (await audit.averify_chain(store.iter_audit(ACME), tenant=ACME)).ok
    backend.run(body)


# --- PostgreSQL only ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.postgres
def test_migrations_apply_once_even_when_replicas_start_together(pg_dsn: str, pg_schema: str) -> None:
    """Two stores migrating one fresh schema at once apply every version exactly once."""
    async def body() -> tuple[list[list[int]], list[int], int]:
        first, second = PostgresStore(pg_dsn, schema=pg_schema), PostgresStore(pg_dsn, schema=pg_schema)
        together = await asyncio.gather(first.migrate(), second.migrate())
        again = await first.migrate()
        conn = await asyncpg.connect(pg_dsn)
        try:
            count = await conn.fetchval(f'SELECT count(*) FROM "{pg_schema}".schema_migrations')
        finally:
            await conn.close()
        return sorted(together), again, count
    together, again, count = asyncio.run(body())
    assert together == [[], [m.version for m in MIGRATIONS]]
    assert again == [] and count == len(MIGRATIONS)


@pytest.mark.postgres
def test_a_schema_newer_than_the_code_is_refused(pg_dsn: str, pg_schema: str) -> None:
    """A database migrated by a newer gateway makes open() fail with StoreUnavailable."""
    async def body() -> None:
        await PostgresStore(pg_dsn, schema=pg_schema).migrate()
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(f"INSERT INTO \"{pg_schema}\".schema_migrations (version, name) VALUES (999, 'x')")
        finally:
            await conn.close()
        with pytest.raises(StoreUnavailable, match="newer"):
            await PostgresStore(pg_dsn, schema=pg_schema).open()
    asyncio.run(body())


@pytest.mark.postgres
def test_database_failures_become_store_unavailable(pg_dsn: str, pg_schema: str) -> None:
    """With its tables gone, writes and reads fail as StoreUnavailable caused by the asyncpg error."""
    async def body() -> None:
        store = PostgresStore(pg_dsn, schema=pg_schema, pool_size=2)
        await store.open()
        try:
            conn = await asyncpg.connect(pg_dsn)
            try:
                await conn.execute(f'DROP SCHEMA "{pg_schema}" CASCADE')
            finally:
                await conn.close()
            with pytest.raises(StoreUnavailable) as write_err:
                await store.transact(ACME, "s1", lambda cur: raw_rounds(ACME, "s1", 1))
            assert isinstance(write_err.value.__cause__, asyncpg.PostgresError)
            with pytest.raises(StoreUnavailable):
                await store.list_sessions(ACME)
        finally:
            await store.close()
    asyncio.run(body())


def test_unreachable_postgres_raises_store_unavailable_without_the_password() -> None:
    """A DSN nobody answers makes open() raise StoreUnavailable that names the host, not the password."""
    store = PostgresStore(f"postgresql://postgres:s3cret-pw@127.0.0.1:{_free_port()}/test")
    with pytest.raises(StoreUnavailable) as err:
        asyncio.run(store.open())
    assert "127.0.0.1" in err.value.message and "s3cret-pw" not in err.value.message
    assert isinstance(err.value.__cause__, OSError)


def test_postgres_store_refuses_an_unsafe_schema_name() -> None:
    """A schema name that is not a plain lower-case identifier is refused before any connection."""
    with pytest.raises(ValueError, match="schema"):
        PostgresStore("postgresql://127.0.0.1/test", schema='x"; DROP TABLE audit; --')


def test_sqlite_rewrites_a_session_row_in_place(tmp_path: Path) -> None:
    """A round rewrites the session's row where it is (same rowid, same key entry), keeping the
    values an ``INSERT OR REPLACE`` would have written: a replace would move the row to a new
    rowid past the other sessions' rows and reallocate its overflow pages on every round."""
    path = tmp_path / "in-place.db"

    async def body() -> None:
        store = SQLiteStore(path)
        await store.open()
        try:
            svc = service(store)
            await svc.commit_round(ACME, "first", record("a"), Bounding(max_length=100_000))
            await svc.commit_round(ACME, "second", record("b"), Bounding(max_length=100_000))
            with closing(sqlite3.connect(path)) as conn:
                before = conn.execute("SELECT rowid, created_at FROM sessions WHERE session_id='first'").fetchone()
            await svc.commit_round(ACME, "first", record("c"), Bounding(max_length=100_000))
            with closing(sqlite3.connect(path)) as conn:
                after = conn.execute("SELECT rowid, created_at, version, next_seq FROM sessions "
                                     "WHERE session_id='first'").fetchone()
            assert after[:2] == before
            assert after[2:] == (2, 3)
            loaded = await svc.load(ACME, "first")
            assert loaded is not None and users(loaded.state.context_window) == ["user a", "user c"]
        finally:
            await store.close()
    asyncio.run(body())


def test_current_is_copied_field_by_field_without_losing_one() -> None:
    """``Current.as_own`` and ``evidence.after`` build a ``Current`` field by field (for speed,
    instead of ``dataclasses.replace``): with every field set to something other than its
    default, ``as_own`` equals ``replace(..., own=True)`` and ``after`` of no change gives the
    same rows back, so a field added to ``Current`` and forgotten in either fails here."""
    session = SessionRow(ACME, "s", 3, 4, b"ct", 1.0, 2.0)
    key = DataKeyRow(ACME, "s", b"dk", "kek", b"wrapped", 1.0)
    head = audit.AuditRow(ACME, 7, 1.0, b"{}", "p" * 64, "h" * 64)
    cur = Current(ACME, "s", session, key, rounds=5, max_seq=6, head=head, quarantine="why")
    for f in dataclasses.fields(Current):
        if f.name != "own":
            assert getattr(cur, f.name) not in (None, f.default), f"set {f.name} in this test"
    assert cur.as_own() == dataclasses.replace(cur, own=True)
    assert cur.as_own().own is True and cur.own is False
    assert evidence.after(cur, Changes(), [], None) == cur
    assert evidence.after(cur.as_own(), Changes(), [], None) == cur.as_own()


def test_a_snapshot_sees_one_moment_while_writes_go_on(backend: Any) -> None:
    """Rounds committed after a snapshot's first read are in neither its chain nor its rows; a
    read outside it sees them."""
    async def go(store: Any) -> None:
        svc = service(store)
        await svc.commit_round(ACME, "s", record("one"), Bounding())
        async with store.snapshot() as view:
            assert [r.request_id for r in await _all(view.iter_rounds(ACME))] == ["one"]
            await svc.commit_round(ACME, "s", record("two"), Bounding())
            assert [r.request_id for r in await _all(view.iter_rounds(ACME))] == ["one"]
            assert len(await _all(view.iter_audit(ACME))) == 1
            session, key = await view.get_session(ACME, "s")
            assert session is not None and session.version == 1 and key is not None
        assert [r.request_id for r in await rounds(store)] == ["one", "two"]
    backend.run(go)


@pytest.mark.postgres
def test_a_postgres_snapshot_takes_no_connection_from_the_pool(pg_dsn: str, pg_schema: str) -> None:
    """Verifications hold their snapshot for as long as they read: with a pool of one, requests
    must still get the pool's connection while two snapshots are open."""
    async def go() -> None:
        store = PostgresStore(pg_dsn, schema=pg_schema, pool_size=1)
        await store.open()
        try:
            svc = service(store)
            await svc.commit_round(ACME, "s", record("one"), Bounding())
            async with store.snapshot() as first, store.snapshot() as second:
                assert await first.tenants() == await second.tenants() == [ACME]
                assert (await asyncio.wait_for(store.get_session(ACME, "s"), 5))[0] is not None
                await asyncio.wait_for(svc.commit_round(ACME, "s", record("two"), Bounding()), 5)
                assert len(await _all(first.iter_rounds(ACME))) == 1
        finally:
            await store.close()
    asyncio.run(asyncio.wait_for(go(), 30))  # a snapshot that waited for the pool would hang here


async def _all(rows: Any) -> list[Any]:
    return [row async for row in rows]


def test_a_lane_whose_callers_loop_has_closed_goes_on_quietly(tmp_path: Path) -> None:
    """A job queued by a loop that closes before the job is done (a gateway stopped while
    starting, with a read in flight): the lane's thread raised ``RuntimeError: Event loop is
    closed``, a traceback on stderr; it drops that result and goes on serving other loops."""
    import threading

    from gateway.store.sqlite import Lane

    crashes: list[BaseException] = []
    hook, threading.excepthook = threading.excepthook, lambda args: crashes.append(args.exc_value)
    release = threading.Event()
    conn = sqlite3.connect(tmp_path / "lane.db", check_same_thread=False)

    def run_batch(conn: sqlite3.Connection, jobs: list[Any]) -> list[tuple[bool, Any]]:
        return [(True, job(conn)) for job in jobs]

    lane = Lane("test-lane", conn, run_batch)
    try:
        loop = asyncio.new_event_loop()
        loop.run_until_complete(asyncio.sleep(0))

        async def queue_slow_read() -> None:
            lane.enqueue(lambda c: release.wait(10))

        loop.run_until_complete(queue_slow_read())
        loop.close()
        release.set()

        async def later_read() -> int:
            return int(await lane.submit(lambda c: c.execute("SELECT 7").fetchone()[0]))

        assert asyncio.run(asyncio.wait_for(later_read(), 10)) == 7  # a dead lane would never answer
        asyncio.run(lane.stop())
    finally:
        threading.excepthook = hook
    assert crashes == []
