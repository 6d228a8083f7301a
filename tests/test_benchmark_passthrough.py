"""The benchmark's commit floor (``benchmarks/passthrough.py --commit``): the bare pass-through
plus one durable row per request, committed before the reply's last byte, at once when quiet
and grouped on the writer thread under load."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from benchmarks import passthrough
from gateway.standin import standin_thread

BODY = orjson.dumps({"model": "standin", "messages": [{"role": "user", "content": "hello"}]})


async def _serve(upstream: str, db: Path | None, jobs: Any) -> Any:
    runner = web.AppRunner(passthrough.make_app(upstream, db))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
            return await jobs(client)
    finally:
        await runner.cleanup()


async def _post(client: aiohttp.ClientSession, stream: bool) -> tuple[int, bytes]:
    body = orjson.loads(BODY) | {"stream": stream}
    async with client.post("/v1/chat/completions", data=orjson.dumps(body),
                           headers={"Content-Type": "application/json"}) as reply:
        return reply.status, await reply.read()


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Each transaction the floor commits: the thread it ran on and its row count."""
    seen: list[tuple[str, int]] = []
    write = passthrough.Commits._write

    def spy(self: passthrough.Commits, rows: list[passthrough.Row]) -> None:
        write(self, rows)
        seen.append((threading.current_thread().name, len(rows)))
    monkeypatch.setattr(passthrough.Commits, "_write", spy)
    return seen


def test_every_request_commits_one_row_quiet_ones_on_the_loop(tmp_path: Path,
                                                               writes: list[tuple[str, int]]) -> None:
    db = tmp_path / "floor.db"

    async def one_by_one(client: aiohttp.ClientSession) -> list[tuple[int, bytes]]:
        return [await _post(client, stream) for stream in (False, True, False)]

    with standin_thread() as url:
        replies = asyncio.run(_serve(url, db, one_by_one))
    assert [status for status, _ in replies] == [200, 200, 200]
    assert orjson.loads(replies[0][1])["choices"][0]["message"]["role"] == "assistant"
    assert replies[1][1].rstrip().endswith(b"data: [DONE]")  # the held-back last chunk was sent
    assert writes == [("MainThread", 1)] * 3
    rows = sqlite3.connect(db).execute("SELECT status, bytes_out FROM requests").fetchall()
    assert [status for status, _ in rows] == [200, 200, 200]
    assert rows[1][1] == len(replies[1][1])  # the stream's row counts every byte relayed


def test_concurrent_requests_share_commits_on_the_writer_thread(tmp_path: Path,
                                                                 writes: list[tuple[str, int]]) -> None:
    db = tmp_path / "floor.db"

    async def together(client: aiohttp.ClientSession) -> list[tuple[int, bytes]]:
        return await asyncio.gather(*(_post(client, n % 2 == 1) for n in range(40)))

    with standin_thread(latency=0.02) as url:
        replies = asyncio.run(_serve(url, db, together))
    assert all(status == 200 for status, _ in replies)
    assert sum(n for _, n in writes) == 40
    assert any(thread == "passthrough-writer" and n > 1 for thread, n in writes)
    assert sqlite3.connect(db).execute("SELECT count(*) FROM requests").fetchone() == (40,)


def test_without_commit_nothing_is_written(tmp_path: Path, writes: list[tuple[str, int]]) -> None:
    async def one(client: aiohttp.ClientSession) -> tuple[int, bytes]:
        return await _post(client, False)

    with standin_thread() as url:
        status, _ = asyncio.run(_serve(url, None, one))
    assert status == 200
    assert writes == []
