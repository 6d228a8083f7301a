"""Store fixtures: the same tests run against every backend.

``pg_dsn``   the DSN of this machine's PostgreSQL (``SESSIONGATE_TEST_PG_DSN``, default
             ``postgresql://postgres@127.0.0.1:5432/test``); the test is skipped, saying why,
             when nothing answers there.
``pg_schema`` a fresh schema ``sg_test_<random>`` on it, dropped at teardown.
``backend``  parametrized over ``sqlite`` (a file under ``tmp_path``) and ``postgres`` (a fresh
             schema): ``backend.make()`` builds an unopened store on the shared database (call
             it twice for two "replicas"), ``backend.run(fn)`` opens one, awaits ``fn(store)``
             in a new event loop and closes it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from gateway.store.base import Store
from gateway.store.postgres import PostgresStore, describe_dsn
from gateway.store.sqlite import SQLiteStore

T = TypeVar("T")
PG_DSN = os.environ.get("SESSIONGATE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


async def _pg_execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    try:
        asyncio.run(_pg_execute(PG_DSN, "SELECT 1"))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        where = describe_dsn(PG_DSN).split("/")[0]
        pytest.skip(f"PostgreSQL not reachable at {where}: {type(exc).__name__}: {exc}")
    return PG_DSN


@pytest.fixture
def pg_schema(pg_dsn: str) -> Iterator[str]:
    name = f"sg_test_{secrets.token_hex(6)}"
    yield name
    asyncio.run(_pg_execute(pg_dsn, f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))


@dataclass
class Backend:
    name: str
    make: Callable[[], Store]

    def run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        async def main() -> T:
            store = self.make()
            await store.open()
            try:
                return await fn(store)
            finally:
                await store.close()
        return asyncio.run(main())


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        path = tmp_path / "store.db"
        return Backend("sqlite", lambda: SQLiteStore(path))
    dsn = request.getfixturevalue("pg_dsn")
    schema = request.getfixturevalue("pg_schema")
    return Backend("postgres", lambda: PostgresStore(dsn, schema=schema, pool_size=4))
