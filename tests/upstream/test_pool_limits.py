"""``upstreams[].max_connections`` is each upstream's own connection pool: one upstream never has
more connections open than its own setting, and one whose connections are all busy does not hold
back another's requests. Fake upstreams on loopback count the requests they hold at once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from aiohttp import web
from multidict import CIMultiDict

from gateway.settings import UpstreamSettings
from gateway.upstream import Upstream, Upstreams
from tests.conftest import _Server


class Holding:
    """An upstream that holds every request until :meth:`release`, counting how many it holds at once."""

    def __init__(self) -> None:
        self.active = self.peak = 0
        self.gate = asyncio.Event()

        async def hold(_request: web.Request) -> web.Response:
            self.active += 1
            self.peak = max(self.peak, self.active)
            try:
                await self.gate.wait()
            finally:
                self.active -= 1
            return web.json_response({"object": "list", "data": []})

        async def answer(_request: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": []})

        app = web.Application()
        app.router.add_get("/v1/hold", hold)
        app.router.add_get("/v1/answer", answer)
        self.server = _Server(app)
        self.url = f"http://127.0.0.1:{self.server.port}/v1"

    def release(self) -> None:
        self.server.loop.call_soon_threadsafe(self.gate.set)


@pytest.fixture
def providers() -> Iterator[tuple[Holding, Holding]]:
    a, b = Holding(), Holding()
    try:
        yield a, b
    finally:
        a.release()
        b.release()
        a.server.stop()
        b.server.stop()


def test_each_upstream_has_its_own_connection_limit(providers: tuple[Holding, Holding]) -> None:
    """Five held requests to an upstream of max_connections 2 reach it two at a time, and an
    upstream of max_connections 3 still answers meanwhile (one shared pool let the first use 3
    connections and starved the second)."""
    a, b = providers

    async def main() -> None:
        upstreams = Upstreams([UpstreamSettings(name="a", base_url=a.url, models=["a-*"], max_connections=2),
                               UpstreamSettings(name="b", base_url=b.url, models=["b-*"], max_connections=3)])
        await upstreams.start()
        up_a, up_b = upstreams.route("a-1"), upstreams.route("b-1")

        async def get(up: Upstream, path: str) -> bytes:
            async with upstreams.open(up, "GET", path, body=None, headers=CIMultiDict()) as reply:
                return await reply.read()
        try:
            held = [asyncio.create_task(get(up_a, "/hold")) for _ in range(5)]
            for _ in range(1000):  # until the first requests have reached the upstream
                if a.active >= 2:
                    break
                await asyncio.sleep(0.01)
            assert a.active >= 2, "the held requests never reached the upstream"
            # the other upstream answers while the first one's connections are all busy
            assert b"list" in await asyncio.wait_for(get(up_b, "/answer"), 10)
            assert a.peak == 2, f"upstream a (max_connections 2) held {a.peak} requests at once"
            a.release()
            assert all(b"list" in body for body in await asyncio.wait_for(asyncio.gather(*held), 30))
            assert a.peak == 2
        finally:
            await upstreams.close()
    asyncio.run(main())
