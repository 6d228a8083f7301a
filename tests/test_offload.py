"""Heavy per-request work is fair across tenants (SPEC §3: one client cannot stall the others):
one tenant holds at most ``offload.PER_TENANT`` worker threads, so its slow work queues behind
its own and another tenant's work starts at once."""

from __future__ import annotations

import asyncio
import base64
import gzip
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from gateway import handlers, offload, proxy
from gateway.stages import parse_request
from tests.conftest import ACME_KEY, GLOBEX_KEY, Gateway, wait_for

POOL = min(32, (os.cpu_count() or 1) + 4)  # asyncio's default pool, which every tenant's work shared
HELD = 2 * POOL


class Held:
    """A stand-in for slow work: blocks until released, counting how many run at once (and on which threads)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running = self.most = 0
        self.threads: set[str] = set()

    def __call__(self, value: Any) -> Any:
        with self.lock:
            self.threads.add(threading.current_thread().name)
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

    async def counting_read(request: web.Request, limit: int, tenant: str) -> bytes:
        body = await real_read(request, limit, tenant)
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


BIG_MEMO = {"hold": "x" * 1000}
ZIPPED = gzip.compress(b'{"memo": null, "pad": "' + base64.b64encode(os.urandom(100_000)) + b'"}')
BIG_FORWARD = b'{"model": "m", "input": "' + b"x" * 300_000 + b'"}'


@pytest.mark.parametrize("kind", ["memo", "decode", "forward"])
def test_one_tenants_flood_of_request_work_holds_at_most_its_share(gateway: Gateway, kind: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Twice as many of one tenant's requests as the old shared pool had threads, each with slow
    work off the loop (a memo rendered after ``PUT .../memo``, a compressed body over 64 KB
    decoded, a forwarded JSON body over 256 KB parsed): the work runs on the offload pool, never
    more than ``PER_TENANT`` of it at once, and another tenant's request is answered meanwhile."""
    held = Held()
    arrived: list[int] = []
    real_read, real_memo, real_decode, real_json = (handlers.read_limited, handlers.memo_text,
                                                   parse_request.decode_body, proxy.json_body)

    async def counting_read(request: web.Request, limit: int, tenant: str) -> bytes:
        arrived.append(1)  # the slow decode is inside: count on the way in
        return await real_read(request, limit, tenant)

    async def counting_proxy_read(request: web.Request, limit: int, tenant: str) -> bytes:
        body = await real_read(request, limit, tenant)
        arrived.append(1)
        return body

    real_write = handlers.write_memo

    async def counting_write(*args: Any) -> None:
        await real_write(*args)
        arrived.append(1)

    monkeypatch.setattr(handlers, "memo_text",
                        lambda memo: held(real_memo(memo)) if memo == BIG_MEMO else real_memo(memo))
    monkeypatch.setattr(parse_request, "decode_body", lambda raw, coding, limit: held(real_decode(raw, coding, limit))
                        if len(raw) > 60_000 else real_decode(raw, coding, limit))
    monkeypatch.setattr(proxy, "json_body", lambda body, kind: held(real_json(body, kind))
                        if body and len(body) > 256 * 1024 else real_json(body, kind))
    monkeypatch.setattr(handlers, "read_limited", counting_read if kind == "decode" else real_read)
    monkeypatch.setattr(handlers, "write_memo", counting_write if kind == "memo" else real_write)
    monkeypatch.setattr(proxy, "read_limited", counting_proxy_read if kind == "forward" else real_read)

    def send(key: str, i: int, big: bool) -> int:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        if kind == "forward":
            body = BIG_FORWARD if big else b'{"model": "m", "input": "x"}'
            url = f"{gateway.base_url}/embeddings"
            return httpx.post(url, content=body, headers=headers, timeout=60).status_code
        url = f"{gateway.base_url}/sessions/flood-{i}/memo"
        if kind == "decode":
            body = ZIPPED if big else gzip.compress(b'{"memo": "small"}')
            headers["Content-Encoding"] = "gzip"
        else:
            body = orjson.dumps({"memo": BIG_MEMO if big else {"small": 1}})
        return httpx.put(url, content=body, headers=headers, timeout=60).status_code

    with ThreadPoolExecutor(HELD) as clients:
        slow = [clients.submit(send, ACME_KEY, i, True) for i in range(HELD)]
        try:
            wait_for(lambda: len(arrived) >= HELD and held.running >= offload.PER_TENANT, 30)
            status = send(GLOBEX_KEY, HELD, False)
            assert status < 500 and held.running > 0, (status, held.running)
            running = held.running
        finally:
            held.release.set()
        assert all(future.result() < 500 for future in slow)
    assert running <= offload.PER_TENANT and held.most <= offload.PER_TENANT < POOL, (running, held.most)
    assert all(name.startswith(offload.THREAD_PREFIX) for name in held.threads), held.threads


@pytest.mark.parametrize("route", ["memo", "history"])
def test_a_large_session_route_body_is_read_on_the_offload_pool(gateway: Gateway, route: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``PUT .../memo`` or ``POST .../history`` body over the thread threshold (a few MB take
    tenths of a second to read, look at and read again exactly) is read on the offload pool, as a
    model route's is, not on the event loop; a small one on the loop."""
    read_on: list[tuple[int, str]] = []
    real = handlers._read_session_body

    def spy(raw: bytes) -> dict[str, Any]:
        read_on.append((len(raw), threading.current_thread().name))
        return real(raw)

    monkeypatch.setattr(handlers, "_read_session_body", spy)
    pad = "x" * (parse_request.THREAD_ABOVE_BYTES + 1000)
    bodies = {"memo": ({"memo": "small"}, {"memo": "big", "pad": pad}),
              "history": ({"op": "add", "messages": [{"role": "user", "content": "small"}]},
                          {"op": "add", "messages": [{"role": "user", "content": "big"}], "pad": pad})}[route]
    for body in bodies:
        method, path = ("PUT", "memo") if route == "memo" else ("POST", "history")
        httpx.request(method, f"{gateway.base_url}/sessions/off-{route}/{path}", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {ACME_KEY}"})
    (small, small_thread), (big, big_thread) = read_on
    assert small < parse_request.THREAD_ABOVE_BYTES < big
    assert not small_thread.startswith(offload.THREAD_PREFIX) and big_thread.startswith(offload.THREAD_PREFIX)
