"""Heavy per-request work off the event loop, fair across tenants (SPEC §3: one client cannot
stall the others).

Parsing a large request body (``stages.parse_request``), building a large round's record
(``stages.record``) and reading a session import (``handlers.import_session``) run in a worker
thread, so the event loop keeps serving everyone else. They share a pool of their own,
``THREADS`` threads (asyncio's default pool stays free for the store, key and policy reloads),
and one tenant holds at most ``PER_TENANT`` of its threads at a time: its further work waits, in
the event loop and holding no thread, behind its own. Twelve slow imports from one tenant then
take two threads, and another tenant's chat starts on a free one at once instead of queueing
behind all twelve. The work is mostly pure Python, which holds the GIL: a tenant would gain
little from more threads, and each thread it holds is one more share of the interpreter taken
from everyone else.

One :class:`Offload` per event loop (the way asyncio keeps one default pool per loop), made on
first use: :func:`run` finds it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import os
import weakref
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

THREADS = min(32, (os.cpu_count() or 1) + 4)
"""Threads of the request-work pool (asyncio's default pool size)."""
PER_TENANT = max(1, THREADS // 3)
"""Threads one tenant may hold at once: two tenants at their cap still leave threads free."""
THREAD_PREFIX = "sessiongate-work"


class Offload:
    """A thread pool for request work, with a per-tenant cap on the threads in use."""

    def __init__(self, threads: int = THREADS, per_tenant: int = PER_TENANT) -> None:
        self.per_tenant = per_tenant
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix=THREAD_PREFIX)
        self._slots: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}  # tenant -> (cap, [users])

    async def run(self, tenant: str, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in a pool thread, once *tenant* holds fewer than ``per_tenant`` threads;
        its result, or what it raised. Context variables are carried over, as ``asyncio.to_thread``
        does. A caller cancelled while *fn* runs stops waiting, but the thread stays the tenant's
        until *fn* returns: a client cannot go past its cap by hanging up."""
        slot, users = self._slots.setdefault(tenant, (asyncio.Semaphore(self.per_tenant), [0]))
        users[0] += 1
        try:
            await slot.acquire()
        except BaseException:
            self._leave(tenant, users)
            raise
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        try:
            work = asyncio.get_running_loop().run_in_executor(self._pool, call)
        except BaseException:
            slot.release()
            self._leave(tenant, users)
            raise

        def done(finished: asyncio.Future[T]) -> None:
            if not finished.cancelled():
                finished.exception()  # read here: a caller that was cancelled never reads it
            slot.release()
            self._leave(tenant, users)

        work.add_done_callback(done)
        return await asyncio.shield(work)

    def _leave(self, tenant: str, users: list[int]) -> None:
        users[0] -= 1
        if not users[0]:
            del self._slots[tenant]  # no state is kept for a tenant with nothing running or waiting


_BY_LOOP: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Offload] = weakref.WeakKeyDictionary()


def for_loop(loop: asyncio.AbstractEventLoop) -> Offload:
    """The running loop's :class:`Offload`, made on first use."""
    offload = _BY_LOOP.get(loop)
    if offload is None:
        offload = _BY_LOOP[loop] = Offload()
    return offload


async def run(tenant: str, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a worker thread, fairly among tenants (see the module docstring)."""
    return await for_loop(asyncio.get_running_loop()).run(tenant, fn, *args)
