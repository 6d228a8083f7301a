"""Fixtures for the evidence tests: a real gateway on SQLite or PostgreSQL, a direct handle on
its tables (the adversary's), and ``audit verify`` run through the CLI.

``db_gateway``  parametrized over ``sqlite`` and ``postgres`` (a fresh schema; skipped, saying
                why, when PostgreSQL does not answer): ``(gateway, tables)``.
``tables.sql``  runs one statement on the gateway's database from a second connection
                (``?`` placeholders on both backends) and returns the rows.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Callable
from contextlib import closing, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from io import StringIO
from typing import Any

import asyncpg
import pytest

from gateway import cli
from tests.conftest import Gateway
from tests.store.conftest import pg_dsn, pg_schema  # noqa: F401 - fixtures used by db_gateway


@dataclass
class Tables:
    """The gateway's tables, reached around the gateway (as an adversary with database access)."""

    backend: str
    gateway: Gateway
    dsn: str = ""
    schema: str = ""

    def overrides(self) -> dict[str, Any]:
        """The configuration overrides that put another gateway on the same database."""
        if self.backend == "sqlite":
            return {}
        return {"store": {"backend": "postgres", "dsn": self.dsn, "schema": self.schema, "pool_size": 4}}

    def sql(self, statement: str, *args: Any) -> list[tuple[Any, ...]]:
        if self.backend == "sqlite":
            with closing(sqlite3.connect(self.gateway.db_path, isolation_level=None, timeout=30)) as conn:
                return conn.execute(statement, args).fetchall()
        counter = iter(range(1, 100))
        pg_statement = re.sub(r"\?", lambda _m: f"${next(counter)}", statement)

        async def run() -> list[tuple[Any, ...]]:
            conn = await asyncpg.connect(self.dsn, server_settings={"search_path": self.schema})
            try:
                return [tuple(r) for r in await conn.fetch(pg_statement, *args)]
            finally:
                await conn.close()
        return asyncio.run(run())


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``sessiongate ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = StringIO(), StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def verify(gw: Gateway, *extra: str) -> tuple[int, str]:
    """``audit verify`` over the gateway's configuration: (exit code, stdout + stderr)."""
    code, out, err = run_cli("--config", str(gw.config_path), "audit", "verify", *extra)
    return code, out + err


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_gateway(request: pytest.FixtureRequest, make_gateway: Callable[..., Gateway]) -> tuple[Gateway, Tables]:
    if request.param == "sqlite":
        gw = make_gateway()
        return gw, Tables("sqlite", gw)
    dsn = request.getfixturevalue("pg_dsn")
    schema = request.getfixturevalue("pg_schema")
    tables = Tables("postgres", None, dsn, schema)  # type: ignore[arg-type]
    tables.gateway = make_gateway(**tables.overrides())
    return tables.gateway, tables
