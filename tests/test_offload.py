"""Heavy per-request work is fair across tenants (SPEC §3: one client cannot stall the others):
one tenant holds at most ``offload.PER_TENANT`` worker threads, so its slow work queues behind
its own and another tenant's work starts at once."""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway import handlers, offload
from tests.conftest import ACME_KEY, GLOBEX_KEY, Gateway, wait_for

POOL = min(32, (os.cpu_count() or 1) + 4)  # asyncio's default pool, which every tenant's work shared
HELD = 2 * POOL


class Held:
    """A stand-in for slow work: blocks until released, counting how many run at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running = self.most = 0

    def __call__(self, value: Any) -> Any:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            self.release.wait(30)
        finally:
            with self.lock:
                self.running -= 1
        return value


def test_one_tenant_holds_at_most_its_share_of_threads() -> None:
    """With one tenant's work held at its cap, its next waits and another tenant's runs at once."""
    held = Held()

    async def scenario() -> tuple[list[Any], Any]:
        pool = offload.Offload(threads=4, per_tenant=2)
        slow = [asyncio.ensure_future(pool.run("acme", held, i)) for i in range(6)]
        while held.running < 2:
            await asyncio.sleep(0.01)
        other = await asyncio.wait_for(pool.run("globex", str.upper, "ok"), 30)
        assert held.running == 2 and not any(task.done() for task in slow)
        held.release.set()
        return await asyncio.gather(*slow), other

    results, other = asyncio.run(scenario())
    assert results == list(range(6)) and other == "OK" and held.most == 2


def test_a_cancelled_caller_keeps_its_thread_counted() -> None:
    """A caller that stops waiting (a client that hung up) does not free its tenant's slot early."""
    held = Held()

    async def scenario() -> int:
        pool = offload.Offload(threads=4, per_tenant=1)
        first = asyncio.ensure_future(pool.run("acme", held, 1))
        while held.running < 1:
            await asyncio.sleep(0.01)
        first.cancel()
        second = asyncio.ensure_future(pool.run("acme", held, 2))
        await asyncio.sleep(0.2)
        most = held.most
        held.release.set()
        assert await second == 2
        return most

    assert asyncio.run(scenario()) == 1


def test_one_tenants_slow_imports_do_not_hold_up_another_tenant(gateway: Gateway,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Twice as many slow session imports from acme as the old shared pool had threads: globex's
    import is answered while they are still held, and acme never holds more than its share."""
    held = Held()
    arrived: list[str] = []
    real_read, real_parse = handlers.read_limited, handlers.parse_session_document

    async def counting_read(request: web.Request, limit: int) -> bytes:
        body = await real_read(request, limit)
        arrived.append(request.headers["Authorization"])
        return body

    def parse(raw: bytes) -> Any:
        return held(real_parse(b"{}")) if raw.startswith(b'{"hold"') else real_parse(raw)

    monkeypatch.setattr(handlers, "read_limited", counting_read)
    monkeypatch.setattr(handlers, "parse_session_document", parse)

    def put(key: str, session: str, body: bytes) -> int:
        resp = httpx.put(f"{gateway.base_url}/sessions/{session}", content=body, timeout=60,
                         headers={"Authorization": f"Bearer {key}"})
        return resp.status_code

    with ThreadPoolExecutor(HELD) as clients:
        slow = [clients.submit(put, ACME_KEY, f"acme:j{i}", b'{"hold": 1}') for i in range(HELD)]
        try:
            wait_for(lambda: len(arrived) == HELD, 30)
            status = httpx.put(f"{gateway.base_url}/sessions/globex:x", content=b'{"full_context": []}',
                               timeout=15, headers={"Authorization": f"Bearer {GLOBEX_KEY}"}).status_code
            assert status < 500 and held.running > 0, (status, held.running)
        finally:
            held.release.set()
        assert all(future.result() < 500 for future in slow)
    assert held.most <= offload.PER_TENANT < POOL
