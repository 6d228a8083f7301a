"""Background work that outlives a request: one task per key at a time, awaited at shutdown.

Used for window maintenance after a round (``session.bounding.maintain``) and for master-key
re-wrapping. A failure is logged, never swallowed silently and never raised into a request.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Coroutine, Hashable
from typing import Any

import structlog

log = structlog.get_logger("gateway.background")


class Background:
    def __init__(self) -> None:
        self._tasks: dict[Hashable, asyncio.Task[Any]] = {}

    def start(self, key: Hashable, coro: Coroutine[Any, Any, Any]) -> bool:
        """Run *coro* unless a task with *key* is still running (then *coro* is dropped)."""
        running = self._tasks.get(key)
        if running is not None and not running.done():
            coro.close()
            return False
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks[key] = task
        task.add_done_callback(functools.partial(self._done, key))
        return True

    def _done(self, key: Hashable, task: asyncio.Task[Any]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("background_task_failed", task=str(key)[:80], error=type(exc).__name__, detail=str(exc)[:200])

    async def drain(self) -> None:
        """Wait for every running task (at shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)
