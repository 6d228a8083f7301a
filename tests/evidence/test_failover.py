"""Fail-over answers 503 (issue 10 §6): terminating the gateway's PostgreSQL backends under load
gives clients 200 or 503 ``store_unavailable`` with ``Retry-After``, never a 500, and the gateway
recovers by itself."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from gateway.errors import STORE_UNAVAILABLE_MESSAGE, StoreUnavailable
from gateway.store.base import Changes, Current
from gateway.store.postgres import PostgresStore, describe_dsn
from gateway.store.sqlite import SQLiteStore
from tests.conftest import ACME_KEY, REPO, Gateway

PG_DSN = os.environ.get("SESSIONGATE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


async def _execute(sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(PG_DSN, timeout=5)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def _named(dsn: str, name: str) -> str:
    """*dsn* with ``application_name`` *name*, so that only this test's connections are found."""
    return f"{dsn}{'&' if '?' in dsn else '?'}application_name={name}"


_TERMINATE = ("WITH mine AS MATERIALIZED (SELECT pid FROM pg_stat_activity "
              "WHERE application_name = $1 AND pid <> pg_backend_pid()) "
              "SELECT pg_terminate_backend(pid) FROM mine")
"""Terminates only the backends named *$1*: the function runs in the select list over rows already
filtered (in a WHERE clause PostgreSQL may call it before the other conditions, on every backend)."""


@pytest.fixture
def pg_schema() -> Iterator[str]:
    try:
        asyncio.run(_execute("SELECT 1"))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        where = describe_dsn(PG_DSN).split("/")[0]
        pytest.skip(f"PostgreSQL not reachable at {where}: {type(exc).__name__}: {exc}")
    name = f"sg_failover_{secrets.token_hex(6)}"
    yield name
    asyncio.run(_execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))


def _terminator(stop: threading.Event, rounds: int, name: str) -> tuple[threading.Thread, list[int]]:
    """A thread that terminates the backends of this test's gateway (application_name *name*) a few
    times, and no other gateway's on the shared server."""
    killed: list[int] = []

    async def main() -> None:
        conn = await asyncpg.connect(PG_DSN, timeout=5)
        try:
            for _ in range(rounds):
                if stop.is_set():
                    return
                await asyncio.sleep(0.15)
                rows = await conn.fetch(_TERMINATE, name)
                killed.append(sum(1 for r in rows if r[0]))
        finally:
            await conn.close()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    return thread, killed


async def _load(url: str, n: int, concurrency: int) -> list[httpx.Response]:
    limit = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
        async with limit:
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"hello {i}"}],
                    "stream": i % 3 == 0}
            return await client.post(f"{url}/v1/chat/completions", json=body, headers={
                "Authorization": f"Bearer {ACME_KEY}", "X-Session-Id": f"fail-{i % 10}"})

    async with httpx.AsyncClient(timeout=30) as client:
        return await asyncio.gather(*(one(client, i) for i in range(n)))


@pytest.mark.postgres
def test_terminated_backends_give_503_with_retry_after_never_500(
        make_gateway: Callable[..., Gateway], pg_schema: str) -> None:
    """~100 concurrent chats while the backends are terminated: every answer is 200 or 503
    (with Retry-After; a started stream ends with a store_unavailable event), and afterwards a
    chat succeeds again."""
    name = f"sg-failover-{secrets.token_hex(6)}"
    gw = make_gateway(store={"backend": "postgres", "dsn": _named(PG_DSN, name), "schema": pg_schema, "pool_size": 6})
    stop = threading.Event()
    thread, killed = _terminator(stop, rounds=5, name=name)
    thread.start()
    try:
        responses = asyncio.run(_load(gw.url, 100, 16))
    finally:
        stop.set()
        thread.join(10)
    assert sum(killed) > 0, "no backend was terminated: the test proved nothing"
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "store_unavailable"
            assert r.headers.get("Retry-After")
        elif r.headers.get("content-type", "").startswith("text/event-stream"):
            assert b"internal_error" not in r.content
    recovered = httpx.post(f"{gw.url}/v1/chat/completions", json={
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "still there?"}]},
        headers={"Authorization": f"Bearer {ACME_KEY}", "X-Session-Id": "fail-after"}, timeout=30)
    assert recovered.status_code == 200, recovered.text


@pytest.mark.postgres
def test_a_dsn_names_the_connections_so_one_gateway_can_be_terminated_alone(pg_schema: str) -> None:
    """A DSN's application_name names the store's pooled and snapshot connections in
    pg_stat_activity (so one replica's backends can be told apart); without one it is sessiongate."""
    name = f"sg-appname-{secrets.token_hex(6)}"

    async def main() -> None:
        store = PostgresStore(_named(PG_DSN, name), schema=pg_schema, pool_size=2)
        await store.open()
        try:
            await store.tenants()
            async with store.snapshot():
                rows = await _execute("SELECT application_name FROM pg_stat_activity WHERE application_name "
                                      "IN ($1, $2)", name, f"{name}-verify")
            assert {r[0] for r in rows} == {name, f"{name}-verify"}
        finally:
            await store.close()
    asyncio.run(main())
    assert PostgresStore(PG_DSN, schema=pg_schema).application_name == "sessiongate"


@pytest.mark.postgres
def test_a_backend_terminated_mid_commit_is_named_as_the_cause(pg_schema: str) -> None:
    """The batch's connection is terminated while its plan runs: the write fails as unavailable
    caused by the lost connection (the server's 'terminating connection'), not by the clean-up's
    call on a connection asyncpg had already handed back to the pool."""
    name = f"sg-midcommit-{secrets.token_hex(6)}"

    def terminate_all(_cur: Current) -> Changes:
        thread = threading.Thread(target=lambda: asyncio.run(_execute(_TERMINATE, name)))
        thread.start()
        thread.join(10)
        return Changes()

    async def main() -> None:
        store = PostgresStore(_named(PG_DSN, name), schema=pg_schema, pool_size=2)
        await store.open()
        try:
            with pytest.raises(StoreUnavailable) as info:
                await store.transact("acme", "s", terminate_all)
            assert isinstance(info.value.__cause__, asyncpg.PostgresConnectionError), repr(info.value.__cause__)
            assert "terminating connection" in str(info.value) and "released back to the pool" not in str(info.value)
            assert isinstance(await store.tenants(), list)  # and the store goes on
        finally:
            await store.close()
    asyncio.run(main())


@pytest.mark.postgres
def test_a_read_on_a_connection_terminated_while_idle_names_the_termination(pg_schema: str) -> None:
    """The pooled connection's backend is terminated while it is idle, and a read runs after the
    event loop has taken in a few turns (the server's FATAL message, maybe its close): the read
    succeeds on a new connection, or fails as unavailable naming the server's ending of the
    connection, never only asyncpg's 'cannot switch to state'."""
    name = f"sg-idle-{secrets.token_hex(6)}"

    def terminate_and_wait() -> None:
        asyncio.run(_execute(_TERMINATE, name))
        for _ in range(250):  # until the backend has exited (its FATAL message and close are sent)
            if not asyncio.run(_execute("SELECT 1 FROM pg_stat_activity WHERE application_name = $1", name)):
                return
            threading.Event().wait(0.02)

    async def main() -> list[str]:
        store = PostgresStore(_named(PG_DSN, name), schema=pg_schema, pool_size=1)
        await store.open()
        causes = []
        try:
            for turns in range(5):
                await store.tenants()
                thread = threading.Thread(target=terminate_and_wait)
                thread.start()
                thread.join(10)  # blocking the loop: the connection takes nothing in meanwhile
                for _ in range(turns):
                    await asyncio.sleep(0)
                try:
                    await store.tenants()
                except StoreUnavailable as exc:
                    causes.append(str(exc))
        finally:
            await store.close()
        return causes
    causes = asyncio.run(main())
    for cause in causes:
        assert "terminating connection" in cause or "the server ended the connection" in cause, cause


@pytest.mark.postgres
def test_an_internal_client_error_becomes_store_unavailable(pg_schema: str) -> None:
    """asyncpg's InternalClientError (a connection whose backend died mid-protocol) is a store
    failure at the boundary, not a bug; the state asyncpg is left in by the server's ending of an
    idle connection is named as that."""
    async def main() -> None:
        store = PostgresStore(PG_DSN, schema=pg_schema, pool_size=2)
        await store.open()
        try:
            async def broken() -> None:
                raise asyncpg.InternalClientError("cannot switch to state 12; another operation is in progress")
            with pytest.raises(StoreUnavailable) as info:
                await store._guard(broken(), "read from")
            assert isinstance(info.value.__cause__, asyncpg.InternalClientError)

            async def ended() -> None:
                raise asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress")
            with pytest.raises(StoreUnavailable, match="the server ended the connection while it was idle"):
                await store._guard(ended(), "read from")
        finally:
            await store.close()
    asyncio.run(main())


def test_sqlite_operational_errors_inside_a_write_or_read_become_store_unavailable(tmp_path: Path) -> None:
    """A disk I/O or locked error raised while a write plan or a read runs is StoreUnavailable
    (503), not an internal error; a plan's own error still reaches its caller unchanged."""
    async def main() -> None:
        store = SQLiteStore(tmp_path / "s.db")
        await store.open()
        try:
            def disk_fails(_cur: Current) -> Changes:
                raise sqlite3.OperationalError("disk I/O error")
            with pytest.raises(StoreUnavailable) as info:
                await store.transact("acme", "s", disk_fails)
            assert isinstance(info.value.__cause__, sqlite3.OperationalError)

            def locked(_conn: sqlite3.Connection) -> None:
                raise sqlite3.OperationalError("database is locked")
            with pytest.raises(StoreUnavailable):
                await store._read(locked)

            def refuses(_cur: Current) -> Changes:
                raise KeyError("not a database error")
            with pytest.raises(KeyError):
                await store.transact("acme", "s", refuses)
        finally:
            await store.close()
    asyncio.run(main())


def test_store_unavailable_is_rendered_503_with_retry_after() -> None:
    """The one error middleware gives StoreUnavailable OpenAI's shape, 503 and Retry-After; other
    errors get no Retry-After."""
    from aiohttp import web

    from gateway.app import error_middleware
    from gateway.errors import NotFound
    from tests.conftest import _Server

    async def down(_request: web.Request) -> web.Response:
        raise StoreUnavailable("cannot reach the database at db.internal:5432/prod")

    async def missing(_request: web.Request) -> web.Response:
        raise NotFound("no such thing")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/down", down)
    app.router.add_get("/missing", missing)
    server = _Server(app)
    try:
        r = httpx.get(f"http://127.0.0.1:{server.port}/down")
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert r.json() == {"error": {"message": STORE_UNAVAILABLE_MESSAGE, "type": "service_unavailable",
                                      "code": "store_unavailable"}}
        r = httpx.get(f"http://127.0.0.1:{server.port}/missing")
        assert r.status_code == 404 and "Retry-After" not in r.headers
    finally:
        server.stop()


def test_a_store_failure_names_the_database_to_the_operator_only(
        make_gateway: Callable[..., Gateway], monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's own message names the database file and quotes SQLite. A plain reply, a
    stream's error event and /readyz answer without it (503, Retry-After); the log has it."""
    from structlog.testing import capture_logs

    from gateway.app import SERVICES

    gw = make_gateway()
    store = gw.app[SERVICES].sessions.store
    secret = "/srv/acme-private/sessiongate.db"

    async def down(*_args: Any, **_kwargs: Any) -> Any:
        raise StoreUnavailable(f"the SQLite store failed to commit: disk I/O error ({secret})")

    headers = {"Authorization": f"Bearer {ACME_KEY}", "X-Session-Id": "down"}
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
    with capture_logs() as logs:
        monkeypatch.setattr(store, "transact", down)
        monkeypatch.setattr(store, "tenants", down)
        plain = httpx.post(f"{gw.url}/v1/chat/completions", json=chat, headers=headers, timeout=30)
        streamed = httpx.post(f"{gw.url}/v1/chat/completions", json={**chat, "stream": True},
                              headers=headers, timeout=30)
        ready = httpx.get(f"{gw.url}/readyz", timeout=30)
    assert plain.status_code == 503 and plain.headers["Retry-After"] == "1"
    assert plain.json()["error"] == {"message": STORE_UNAVAILABLE_MESSAGE, "type": "service_unavailable",
                                     "code": "store_unavailable"}
    assert b"store_unavailable" in streamed.content and b"[DONE]" not in streamed.content
    assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
    for answer in (plain, streamed, ready):
        assert secret.encode() not in answer.content and b"SQLite" not in answer.content
    logged = [e for e in logs if secret in str(e.get("detail", ""))]
    assert {e["event"] for e in logged} >= {"store_unavailable", "readiness_store_unavailable"}, logs


def test_a_table_an_operator_renamed_fails_rounds_until_it_is_back(make_gateway: Callable[..., Gateway]) -> None:
    """A real store failure, no stub: an operator with write access renames the audit table
    under the running gateway. A round then cannot commit: the client gets the fixed 503 (no
    table name, no SQLite text), the log names the cause, and nothing of the round is stored.
    Once the table is back the next round commits and the chain verifies."""
    gw = make_gateway()
    headers = {"Authorization": f"Bearer {ACME_KEY}", "X-Session-Id": "renamed"}

    def chat(text: str) -> httpx.Response:
        return httpx.post(f"{gw.url}/v1/chat/completions", headers=headers, timeout=30,
                          json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]})

    assert chat("before").status_code == 200
    with closing(sqlite3.connect(gw.db_path)) as conn:
        conn.execute("ALTER TABLE audit RENAME TO audit_moved")
        conn.commit()
    failed = chat("while the table is gone")
    assert failed.status_code == 503 and failed.headers["Retry-After"] == "1"
    assert failed.json()["error"]["message"] == STORE_UNAVAILABLE_MESSAGE
    assert b"audit" not in failed.content and b"SQLite" not in failed.content
    logged = [json.loads(line) for line in gw.log_path.read_text().splitlines() if line.startswith("{")]
    causes = [e.get("detail", "") for e in logged if e.get("event") == "store_unavailable"]
    assert any("no such table: audit" in c for c in causes), causes
    with closing(sqlite3.connect(gw.db_path)) as conn:
        conn.execute("ALTER TABLE audit_moved RENAME TO audit")
        conn.commit()
        stored = conn.execute("SELECT count(*) FROM rounds WHERE session_id = 'renamed'").fetchone()[0]
    assert stored == 1  # the failed round left nothing
    after = chat("after")
    assert after.status_code == 200, after.text
    verified = subprocess.run([sys.executable, "-m", "gateway", "audit", "verify", "--config", str(gw.config_path)],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    with closing(sqlite3.connect(gw.db_path)) as conn:
        assert conn.execute("SELECT count(*) FROM rounds WHERE session_id = 'renamed'").fetchone()[0] == 2
