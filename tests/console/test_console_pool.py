"""The console's own worker threads (``gateway.console.pool``): session pages render there, one
per auditor at a time, never on the threads model requests use."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import pytest

from gateway.console.pool import Busy, WorkPool
from gateway.console.views import CONSOLE, PAGES_PER_AUDITOR
from tests.conftest import Gateway
from tests.console.conftest import signed_in_client


def test_session_pages_render_on_the_console_threads_one_per_auditor(console_gateway: Gateway) -> None:
    """Six views of a session by one auditor render on the console's threads, one at a time, while
    a model request with a large body (parsed in a worker thread) is served; a view past
    ``PAGES_PER_AUDITOR`` is 429 (they took asyncio's default threads: a 300 KB chat took 29 s)."""
    filters = console_gateway.app[CONSOLE].templates.filters
    original, release = filters["visible"], threading.Event()
    lock = threading.Lock()
    inside: list[int] = [0]
    most: list[int] = [0]
    names: set[str] = set()
    entered = threading.Event()

    def held(text: str) -> Any:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            names.add(threading.current_thread().name)
        entered.set()
        release.wait(20)
        with lock:
            inside[0] -= 1
        return original(text)

    browser = signed_in_client(console_gateway)
    filters["visible"] = held
    got: list[int] = []
    readers = [threading.Thread(target=lambda: got.append(browser.get("/console/sessions/acme/console-a").status_code))
               for _ in range(PAGES_PER_AUDITOR)]
    for reader in readers:
        reader.start()
    try:
        assert entered.wait(20), "no page started rendering"
        reply = console_gateway.openai(session="meanwhile", timeout=20).chat.completions.create(
            model="standin", messages=[{"role": "user", "content": "x" * 300_000}, {"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
        assert httpx.get(f"{console_gateway.url}/healthz", timeout=20).status_code == 200
        one_more = httpx.Client(base_url=console_gateway.url, cookies=browser.cookies, timeout=20)
        busy = one_more.get("/console/sessions/acme/console-a")
        assert busy.status_code == 429 and "session pages loading" in busy.text
        assert not got  # every view still waiting
    finally:
        filters["visible"] = original
        release.set()
        for reader in readers:
            reader.join(30)
    assert got == [200] * PAGES_PER_AUDITOR
    assert most == [1]
    assert names and all(name.startswith("sessiongate-console") for name in names), names


def test_the_pool_caps_each_key_and_cancels_what_waits_when_closed() -> None:
    """One key holds at most ``per_key`` threads; ``limit`` refuses more callers; ``close`` cancels
    queued work and leaves the running call's thread behind as a daemon."""
    async def main() -> None:
        pool = WorkPool(threads=2, per_key=1)
        gate = threading.Event()
        running: list[str] = []

        def work(name: str) -> str:
            running.append(name)
            gate.wait(10)
            return name

        first = asyncio.create_task(pool.run("a", work, "a1"))
        second = asyncio.create_task(pool.run("a", work, "a2"))
        other = asyncio.create_task(pool.run("b", work, "b1"))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(running) == 2:
                break
        assert sorted(running) == ["a1", "b1"]  # a2 waits for a's thread
        with pytest.raises(Busy):
            await pool.run("a", work, "a3", limit=2)
        gate.set()
        assert await asyncio.gather(first, second, other) == ["a1", "a2", "b1"]

        gate.clear()
        stuck = asyncio.create_task(pool.run("c", work, "c1"))
        queued = asyncio.create_task(pool.run("d", work, "d1"))
        third = asyncio.create_task(pool.run("e", work, "e1"))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(running) == 5:
                break
        pool.close()
        await asyncio.sleep(0.05)
        assert third.cancelled() or queued.cancelled()
        assert all(t.daemon for t in threading.enumerate() if t.name.startswith("sessiongate-console"))
        with pytest.raises(RuntimeError):
            await pool.run("f", work, "f1")
        gate.set()
        await asyncio.gather(stuck, queued, third, return_exceptions=True)

    asyncio.run(main())
