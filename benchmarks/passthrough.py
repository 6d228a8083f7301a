"""A bare pass-through proxy: the baseline the gateway's overhead is measured against.

``POST /v1/chat/completions`` is forwarded to ``<upstream>/chat/completions`` through one shared
``aiohttp.ClientSession`` (keep-alive, no connection limit) and the reply goes back as it
arrives: a body with a Content-Length is read whole, anything else (SSE) is streamed chunk by
chunk. Nothing is parsed, recorded or logged. An unreachable upstream answers 502.

    python benchmarks/passthrough.py --port 9200 --upstream http://127.0.0.1:9100/v1
        [--commit FILE]

With ``--commit FILE`` it is the floor of a durable gateway instead: the same proxy plus one
durable SQLite commit per request (WAL, ``synchronous=FULL``, one small row: time, status,
sizes) before the reply's last byte, as the gateway commits each round. A JSON body is sent
after its commit; a stream's chunks are relayed one behind, and the last goes after the commit.
Commits are as cheap as the gateway's: at once on the event loop when this is the only request
in flight and nothing is queued, otherwise grouped, one transaction and one fsync for every row
waiting, on a writer thread (:class:`Commits`). No parsing, encryption, policy or audit chain:
what the gateway adds beyond this row is its own work.
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
from aiohttp import web

FORWARDED = ("Content-Type", "Authorization", "Accept")
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)

Row = tuple[float, int, int, int]
"""What a request commits: time, status, bytes in, bytes out."""


def open_db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS requests (at REAL, status INTEGER, bytes_in INTEGER, bytes_out INTEGER)")
    return conn


class Commits:
    """Durable commits of one row per request: at once on the loop's thread when quiet (one
    request in flight, the writer idle), else queued for the writer thread, which commits every
    row waiting in one transaction and then wakes their callers."""

    def __init__(self, path: Path) -> None:
        self.conn = open_db(path)
        self.in_flight = 0
        self._lock = threading.Lock()  # held while a transaction runs, on either thread
        self._queue: queue.SimpleQueue[tuple[Row, asyncio.Future[None]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="passthrough-writer", daemon=True)
        self._thread.start()

    def _write(self, rows: list[Row]) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.executemany("INSERT INTO requests VALUES (?,?,?,?)", rows)
            self.conn.execute("COMMIT")
        except sqlite3.Error:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    async def commit(self, row: Row) -> None:
        if self.in_flight == 1 and self._queue.empty() and self._lock.acquire(blocking=False):
            try:
                self._write([row])
                return
            finally:
                self._lock.release()
        done = asyncio.get_running_loop().create_future()
        self._queue.put((row, done))
        await done

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            with self._lock:
                try:
                    self._write([row for row, _ in batch])
                    error: BaseException | None = None
                except sqlite3.Error as exc:
                    error = exc
            for _, done in batch:
                done.get_loop().call_soon_threadsafe(_settle, done, error)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(10)
        self.conn.close()


COMMITS = web.AppKey("commits", Commits)


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    if not done.done():
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)


async def _client(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0)
    app[SESSION] = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
    yield
    await app[SESSION].close()


async def forward(request: web.Request) -> web.StreamResponse:
    """Send the request body upstream and relay the reply's status, type and bytes (with
    ``--commit``: its row committed before the last byte)."""
    commits = request.app.get(COMMITS)
    if commits is not None:
        commits.in_flight += 1
    try:
        return await _forward(request, commits)
    finally:
        if commits is not None:
            commits.in_flight -= 1


async def _forward(request: web.Request, commits: Commits | None) -> web.StreamResponse:
    headers = {name: request.headers[name] for name in FORWARDED if name in request.headers}
    url = request.app[UPSTREAM] + request.path[len("/v1"):]
    data = await request.read()
    try:
        async with request.app[SESSION].post(url, data=data, headers=headers) as upstream:
            content_type = upstream.headers.get("Content-Type", "application/json")
            if upstream.content_length is not None:
                body = await upstream.read()
                if commits is not None:
                    await commits.commit((time.time(), upstream.status, len(data), len(body)))
                return web.Response(status=upstream.status, body=body, headers={"Content-Type": content_type})
            response = web.StreamResponse(status=upstream.status, headers={"Content-Type": content_type})
            await response.prepare(request)
            if commits is None:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
            held, sent = b"", 0
            async for chunk in upstream.content.iter_any():
                if held:
                    await response.write(held)
                held, sent = chunk, sent + len(held)
            await commits.commit((time.time(), upstream.status, len(data), sent + len(held)))
            await response.write_eof(held)
            return response
    except aiohttp.ClientConnectionError as exc:
        raise web.HTTPBadGateway(text=f"upstream unreachable: {exc}") from exc


def _commits(path: Path) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        app[COMMITS] = Commits(path)
        yield
        app[COMMITS].close()
    return ctx


def make_app(upstream: str, commit: Path | None = None) -> web.Application:
    """The proxy application forwarding to ``upstream`` (a base URL ending in ``/v1``); with
    *commit*, a SQLite file, one durable commit per request before its last byte."""
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(_client)
    if commit is not None:
        app.cleanup_ctx.append(_commits(commit))
    for path in ("/v1/chat/completions", "/v1/responses", "/v1/messages"):
        app.router.add_post(path, forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9200)
    parser.add_argument("--upstream", default="http://127.0.0.1:9100/v1", help="base URL, ending in /v1")
    parser.add_argument("--commit", type=Path, help="a SQLite file: commit one row per request before its last byte")
    args = parser.parse_args()
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    web.run_app(make_app(args.upstream, args.commit), host=args.host, port=args.port, access_log=None, print=None,
                loop=loop, shutdown_timeout=1.0)


if __name__ == "__main__":
    main()
