"""Background work: tasks that outlive a request, and components that run one task.

``Background`` runs one task per key at a time and is drained at shutdown (window maintenance
after a round, ``session.bounding.maintain``); a failure is logged, never swallowed silently and
never raised into a request. ``Worker`` is the start/stop of a component whose ``run()`` loops
until cancelled (the policy and keyring watchers, the retention purge).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Coroutine, Hashable
from typing import Any

import structlog

log = structlog.get_logger("gateway.background")


class Background:
    """Keyed background jobs: at most one task per key runs at a time, and a job asked for while
    its key is busy runs once more after it (several such asks fold into one), so the last ask
    is never lost."""

    def __init__(self) -> None:
        self._tasks: dict[Hashable, asyncio.Task[Any]] = {}
        self._again: dict[Hashable, Callable[[], Coroutine[Any, Any, Any]]] = {}

    def start(self, key: Hashable, job: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run ``job()`` now, or right after the running task of *key* ends."""
        running = self._tasks.get(key)
        if running is not None and not running.done():
            self._again[key] = job
            return
        task = asyncio.get_running_loop().create_task(job())
        self._tasks[key] = task
        task.add_done_callback(functools.partial(self._done, key))

    def _done(self, key: Hashable, task: asyncio.Task[Any]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("background_task_failed", task=str(key)[:80], error=type(exc).__name__, detail=str(exc)[:200])
        again = self._again.pop(key, None)
        if again is not None and not task.cancelled():
            self.start(key, again)

    async def settled(self, key: Hashable, timeout: float) -> bool:
        """Wait until no task of *key* runs or waits to run again (its last ask included), at
        most *timeout* seconds; True when it settled. Never raises the task's error."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (task := self._tasks.get(key)) is not None and not task.done():
            left = deadline - loop.time()
            if left <= 0:
                return False
            await asyncio.wait({task}, timeout=left)
            await asyncio.sleep(0)  # let the done callback start the asked-again run
        return True

    async def drain(self) -> None:
        """Wait for every running task (at shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)


class Worker:
    """A component with one background task: ``start()`` runs ``run()``, ``stop()`` cancels it and
    waits for it to end. Both are idempotent."""

    name = "worker"
    _task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
