"""Uploads cut off part-way (the client closes before the body is complete) leave nothing
behind: with the collector as ``serve`` runs it (``settle_heap``: frozen, rarely run; here
disabled outright), the partial bodies are freed by reference counting alone, so repeating
the abort does not grow the process. The gateway runs in this process on a loopback port, so
``tracemalloc`` sees its memory."""

from __future__ import annotations

import asyncio
import gc
import shutil
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from aiohttp import web

from gateway.app import build_app
from gateway.server import GatewayRunner, GatewayServer
from gateway.settings import load_settings
from tests.conftest import ACME_KEY, REPO, write_config

BODY = 1024 * 1024
UPLOADS = 8


@asynccontextmanager
async def gateway_here(directory: Path) -> AsyncIterator[tuple[int, GatewayServer]]:
    """The gateway (stand-in model) served by ``GatewayRunner`` on this loop: its port and server."""
    shutil.copytree(REPO / "policies", directory / "policies")
    settings = load_settings(write_config(directory, None, directory / "policies"))
    runner = GatewayRunner(build_app(settings), settings.server)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        assert isinstance(runner.server, GatewayServer)
        yield int(runner.addresses[0][1]), runner.server
    finally:
        await runner.cleanup()


@contextmanager
def no_collector() -> Iterator[None]:
    """Cyclic garbage collection off for the block: only reference counting frees memory."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.collect()


def abort_uploads(port: int, head: bytes, count: int, size: int) -> None:
    """*count* connections that each send *head* and all but the last byte of a *size*-byte body, then close."""
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head + b"Content-Length: %d\r\n\r\n" % size + b"a" * (size - 1))
            time.sleep(0.05)


async def settled(server: GatewayServer) -> None:
    """Until every aborted connection has been handled and closed (bounded)."""
    deadline = time.monotonic() + 10
    while server.live and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)


def with_traceback(kind: type[BaseException]) -> int:
    """How many live *kind* errors still hold a traceback (and with it the frames that read a body)."""
    return sum(1 for o in gc.get_objects() if isinstance(o, kind) and o.__traceback__ is not None)


CHAT = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + ACME_KEY.encode()
        + b"\r\nContent-Type: application/json\r\n")
LOGIN = b"POST /console/login HTTP/1.1\r\nHost: gw\r\nContent-Type: application/x-www-form-urlencoded\r\n"


def test_aborted_uploads_do_not_stay_in_memory(tmp_path: Path) -> None:
    """Eight 1 MiB chat bodies cut off one byte short, no cyclic collection: memory grows by well under one body."""

    async def run() -> tuple[int, int]:
        async with gateway_here(tmp_path) as (port, server):
            await asyncio.to_thread(abort_uploads, port, CHAT, 1, BODY)  # warm up every code path once
            await settled(server)
            with no_collector():
                tracemalloc.start()
                try:
                    before = tracemalloc.get_traced_memory()[0]
                    await asyncio.to_thread(abort_uploads, port, CHAT, UPLOADS, BODY)
                    await settled(server)
                    grown = tracemalloc.get_traced_memory()[0] - before
                finally:
                    tracemalloc.stop()
                left = with_traceback(ConnectionResetError)
            return grown, left

    grown, left = asyncio.run(run())
    assert grown < BODY // 2, f"{grown} bytes retained after {UPLOADS} aborted uploads of {BODY} bytes"
    assert left == 0


def test_aborted_console_form_posts_leave_no_traceback(tmp_path: Path) -> None:
    """Sign-in forms cut off before their end (read by ``request.post()``, before any credential) leave no error
    holding the frames that read them."""

    async def run() -> int:
        async with gateway_here(tmp_path) as (port, server):
            with no_collector():
                await asyncio.to_thread(abort_uploads, port, LOGIN, UPLOADS, 2000)
                await settled(server)
                return with_traceback(ConnectionResetError)

    assert asyncio.run(run()) == 0
