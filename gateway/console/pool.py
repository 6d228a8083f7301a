"""Threads for auditor work: rendering console pages and writing exports, off the event loop and
apart from the threads that serve model requests (SPEC §3: one client cannot stall the others).

Redacting a page of a heavy session or a whole tenant's export is pure Python that can run for
seconds. On asyncio's default pool it took threads the store, key and policy reloads need, and
six views of a heavy session kept a chat waiting 29 s. Here it runs on ``THREADS`` threads of its
own, and one key (an auditor's name, an export's tenant) holds at most ``PER_KEY`` of them: its
further work waits in the event loop, holding no thread, so one auditor cannot keep the others'
pages waiting.

The threads are daemon threads, and nothing waits for them at shutdown: a page being rendered
cannot be interrupted, and a gateway told to stop (SIGTERM) must not wait for it past its grace
period (asyncio waits for every thread of its default pool, and Python for every
``ThreadPoolExecutor`` thread, at exit). :meth:`WorkPool.close` cancels what is queued and lets
a running call finish, its result unread.

One :class:`WorkPool` per event loop, made on first use: :func:`work_pool` finds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

THREADS = 2
"""Threads for auditor work: redaction holds the GIL, so more would take turns from request work."""
PER_KEY = 1
"""Threads one auditor (or one tenant's export) may hold at once."""
THREAD_PREFIX = "sessiongate-console"
IDLE_SECONDS = 30.0
"""A thread with nothing to do for this long ends (a later call starts another)."""

class Busy(Exception):
    """The key already has as many calls running or waiting as the caller allows."""


_Item = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[], Any], Callable[[], None]]
"""The caller's loop, the future it awaits, the call, and what frees the key's slot (on the loop)."""


class WorkPool:
    """Daemon worker threads with a per-key cap on the threads in use."""

    def __init__(self, threads: int = THREADS, per_key: int = PER_KEY) -> None:
        self.threads, self.per_key = threads, per_key
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._slots: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}  # key -> (cap, [users])
        self._closed = False
        self._lock = threading.Lock()

    async def run(self, key: str, fn: Callable[..., T], *args: object, limit: int | None = None) -> T:
        """``fn(*args)`` in a pool thread once *key* holds fewer than ``per_key`` threads; its
        result, or what it raised. Context variables are carried over, as ``asyncio.to_thread``
        does. A caller cancelled while *fn* runs stops waiting; the thread stays *key*'s until
        *fn* returns. Raises :class:`Busy` when *key* already has *limit* calls running or
        waiting, ``RuntimeError`` after :meth:`close`."""
        if self._closed:
            raise RuntimeError("the console's work pool is closed: the gateway is stopping")
        held = self._slots.get(key)
        if limit is not None and held is not None and held[1][0] >= limit:
            raise Busy(key)
        slot, users = self._slots.setdefault(key, (asyncio.Semaphore(self.per_key), [0]))
        users[0] += 1
        try:
            await slot.acquire()
        except BaseException:
            self._leave(key, users)
            raise
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def release() -> None:  # when the call has returned (or was dropped unrun), not when its caller left
            slot.release()
            self._leave(key, users)

        self._queue.put((loop, done, functools.partial(contextvars.copy_context().run, fn, *args), release))
        self._start_worker()  # after the put: a thread ending as idle checks the queue under the lock
        return await done

    def close(self) -> None:
        """Take no more work, cancel what waits in the queue, and let the threads end after their
        current call (nothing waits for them)."""
        with self._lock:
            self._closed = True
            workers = len(self._workers)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                _settle(item[0], item[1].cancel)
                _settle(item[0], item[3])
        for _ in range(workers):
            self._queue.put(None)

    def _start_worker(self) -> None:
        with self._lock:
            if len(self._workers) >= self.threads or self._closed:
                return
            worker = threading.Thread(target=self._work, name=f"{THREAD_PREFIX}-{len(self._workers)}", daemon=True)
            self._workers.append(worker)
        worker.start()

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            try:
                item = self._queue.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._workers.remove(me)
                        return
                continue
            if item is None:
                return
            loop, done, call, release = item
            if done.cancelled():  # its caller gave up while it was queued
                _settle(loop, release)
                continue
            try:
                result = call()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, whatever it is
                _settle(loop, functools.partial(_set, done, None, exc))
            else:
                _settle(loop, functools.partial(_set, done, result, None))
            _settle(loop, release)

    def _leave(self, key: str, users: list[int]) -> None:
        users[0] -= 1
        if not users[0]:
            del self._slots[key]  # nothing kept for a key with nothing running or waiting


def _set(done: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if done.cancelled():
        return
    if exc is not None:
        done.set_exception(exc)
    else:
        done.set_result(result)


def _settle(loop: asyncio.AbstractEventLoop, callback: Callable[[], Any]) -> None:
    """Run *callback* on *loop*; a loop already closed has no one left to tell."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)


_POOLS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WorkPool] = weakref.WeakKeyDictionary()


def work_pool() -> WorkPool:
    """The running event loop's pool, made on first use."""
    loop = asyncio.get_running_loop()
    pool = _POOLS.get(loop)
    if pool is None:
        pool = _POOLS[loop] = WorkPool()
    return pool


def close_pool(loop: asyncio.AbstractEventLoop) -> None:
    """Close *loop*'s pool, if it has one (see :meth:`WorkPool.close`)."""
    pool = _POOLS.pop(loop, None)
    if pool is not None:
        pool.close()
