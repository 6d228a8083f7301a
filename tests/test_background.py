"""Keyed background jobs: one at a time per key, and an ask made while busy is never lost."""

from __future__ import annotations

import asyncio

from gateway.background import Background


def test_asks_while_busy_fold_into_one_more_run() -> None:
    """Three asks during a run give exactly one more run, after the first ends."""
    async def body() -> list[str]:
        runs: list[str] = []
        gate = asyncio.Event()

        async def job() -> None:
            runs.append("start")
            await gate.wait()
            runs.append("end")

        bg = Background()
        bg.start("k", job)
        await asyncio.sleep(0)
        for _ in range(3):
            bg.start("k", job)
        gate.set()
        await bg.drain()
        return runs

    assert asyncio.run(body()) == ["start", "end", "start", "end"]


def test_failures_do_not_stop_the_next_run() -> None:
    """A job that raises is logged and the queued run still happens."""
    async def body() -> int:
        calls = 0

        async def job() -> None:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0)
            if calls == 1:
                raise RuntimeError("boom")

        bg = Background()
        bg.start("k", job)
        bg.start("k", job)
        await bg.drain()
        return calls

    assert asyncio.run(body()) == 2
