"""Background work: tasks that outlive a request, components that run one task, and their health.

``Background`` runs one task per key at a time and is drained at shutdown (window maintenance
after a round, ``session.bounding.maintain``). ``Worker`` is the start/stop of a component that
repeats one ``step()`` (the policy and keyring watchers, the retention purge). ``Health`` is
where every background task reports, and what ``/readyz`` and ``/metrics`` read.

``Health`` also follows the store's writes (``store_write``, told by ``auditor.ObservedStore``):
a store that answers reads while every write fails (SQLite on a full disk) would otherwise look
ready. After ``STORE_WRITE_FAILURES`` writes in a row failed as unavailable, the last of them less
than ``STORE_WRITE_WINDOW`` seconds ago, ``store_writes_failing()`` says so (and ``/readyz``
answers 503); the next write that commits clears it at once. One transient failure never does,
and a gateway taken out of rotation, which then writes nothing, is ready again once the window
passes, so that it can find out whether writes work again.

Errors never end a background task. A failed step (or job) is logged with the exception's
*type* only (its text may come from code that sees content), counted, and retried after an
exponential backoff (``Backoff``); while a task's last attempt failed, ``Health.unready()``
names it, so ``/readyz`` answers 503 until the task succeeds again. A task whose asyncio task
ended for any other reason is reported down for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import threading
import time
from collections.abc import Callable, Coroutine, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.logs import error_cause, exception_fields

log = structlog.get_logger("gateway.background")

WINDOW_MAINTENANCE = "window-maintenance"
STORE_WRITE_FAILURES = 3
"""Writes in a row that must fail as unavailable before the store's writes count as failing."""
STORE_WRITE_WINDOW = 30.0
"""Seconds after the last such failure that they still count (no write since: none succeeded)."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between retries: ``base`` seconds after the first failure, doubling up to ``cap``."""

    base: float = 0.5
    cap: float = 60.0

    def delay(self, failures: int) -> float:
        """The wait after *failures* consecutive failures (``failures >= 1``)."""
        return min(self.cap, self.base * 2 ** max(0, failures - 1))


@dataclass(slots=True)
class TaskHealth:
    """What is known of one background task. ``up`` is False while its last attempt failed."""

    name: str
    up: bool = True
    failures_total: int = 0
    consecutive_failures: int = 0
    last_success: float | None = None
    last_error: str | None = None
    """The exception type of the last failure (never its text)."""


@dataclass(frozen=True, slots=True)
class WritesFailing:
    """The store's writes fail: how many in a row, how long ago the last, and its cause (the
    store's operator-facing message: it may name the database; logged, never answered)."""

    failures: int
    seconds_ago: float
    detail: str


class Health:
    """The health of every background task, read by ``/readyz`` and collected into ``/metrics``.

    Thread-safe (the checkpointer reports from worker threads' callers). Metrics:
    ``sessiongate_background_task_up{task}`` (1/0), ``sessiongate_background_task_failures_total{task}``
    and ``sessiongate_background_task_last_success_timestamp_seconds{task}`` (absent until a
    first success).
    """

    def __init__(self, clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._tasks: dict[str, TaskHealth] = {}
        self._chains: dict[str, str] = {}
        self._lock = threading.Lock()
        self._clock, self._monotonic = clock, monotonic
        self._write_failures, self._write_failed_at, self._write_detail = 0, 0.0, ""

    def store_write(self, exc: BaseException | None) -> None:
        """The outcome of one store write: None when it committed, else its exception. Only a
        ``StoreUnavailable`` counts as the store failing; another error (a plan's refusal, an
        integrity error) is the request's, and tells nothing about the store."""
        from gateway.errors import StoreUnavailable

        with self._lock:
            if exc is None:
                self._write_failures = 0
            elif isinstance(exc, StoreUnavailable):
                self._write_failures += 1
                self._write_failed_at, self._write_detail = self._monotonic(), exc.message

    def store_writes_failing(self) -> WritesFailing | None:
        """The store's writes, when they are failing (see the module docstring), else None."""
        with self._lock:
            ago = self._monotonic() - self._write_failed_at
            if self._write_failures < STORE_WRITE_FAILURES or ago > STORE_WRITE_WINDOW:
                return None
            return WritesFailing(self._write_failures, ago, self._write_detail)

    def chain_refused(self, tenant: str, kind: str) -> None:
        """The checkpointer will not sign *tenant*'s chain (a forged or unkeyed entry, of *kind*).
        That tenant's evidence, not the gateway: ``/readyz`` lists it and stays ready, and
        ``sessiongate_audit_chain_refused{tenant,kind}`` is 1 while it lasts."""
        with self._lock:
            self._chains[tenant] = kind

    def refused_chains(self) -> dict[str, str]:
        """Tenants whose chains the checkpointer refused, with the kind of the first problem."""
        with self._lock:
            return dict(self._chains)

    def register(self, name: str) -> None:
        """Make *name* known (up, no failures) so that it shows in ``/metrics`` from the start."""
        with self._lock:
            self._tasks.setdefault(name, TaskHealth(name))

    def succeeded(self, name: str) -> None:
        with self._lock:
            task = self._tasks.setdefault(name, TaskHealth(name))
            task.up, task.consecutive_failures, task.last_success = True, 0, self._clock()

    def failed(self, name: str, exc: BaseException) -> int:
        """Count a failure of *name*; returns its number of consecutive failures."""
        with self._lock:
            task = self._tasks.setdefault(name, TaskHealth(name))
            task.up = False
            task.failures_total += 1
            task.consecutive_failures += 1
            task.last_error = type(exc).__name__ + (f" {errno.errorcode.get(exc.errno, exc.errno)}"
                                                    if isinstance(exc, OSError) and exc.errno else "")
            return task.consecutive_failures

    def snapshot(self) -> list[TaskHealth]:
        """A copy of every task's health, by name."""
        with self._lock:
            return [TaskHealth(t.name, t.up, t.failures_total, t.consecutive_failures, t.last_success,
                               t.last_error) for _, t in sorted(self._tasks.items())]

    def unready(self) -> list[TaskHealth]:
        """The tasks that cannot do their job now (their last attempt failed)."""
        return [t for t in self.snapshot() if not t.up]

    def collect(self) -> Iterator[Metric]:
        """The prometheus_client collector protocol (``registry.register(health)``)."""
        tasks = self.snapshot()
        up = GaugeMetricFamily("sessiongate_background_task_up",
                               "1 while a background task does its job, 0 while it fails and retries",
                               labels=["task"])
        failures = CounterMetricFamily("sessiongate_background_task_failures",
                                       "Failed attempts of a background task", labels=["task"])
        success = GaugeMetricFamily("sessiongate_background_task_last_success_timestamp_seconds",
                                    "Unix time of a background task's last successful run", labels=["task"])
        for t in tasks:
            up.add_metric([t.name], 1.0 if t.up else 0.0)
            failures.add_metric([t.name], float(t.failures_total))
            if t.last_success is not None:
                success.add_metric([t.name], t.last_success)
        failing = self.store_writes_failing()
        writes = GaugeMetricFamily("sessiongate_store_writes_failing",
                                   "Store writes failed as unavailable in a row, while they count as failing "
                                   "(/readyz 503); 0 otherwise")
        writes.add_metric([], float(failing.failures if failing else 0))
        refused = GaugeMetricFamily("sessiongate_audit_chain_refused",
                                    "1 for a tenant whose audit chain the checkpointer refuses to sign",
                                    labels=["tenant", "kind"])
        for tenant, kind in sorted(self.refused_chains().items()):
            refused.add_metric([tenant, kind], 1.0)
        yield up
        yield failures
        yield success
        yield writes
        yield refused


class Background:
    """Keyed background jobs: at most one task per key runs at a time, and a job asked for while
    its key is busy runs once more after it (several such asks fold into one), so the last ask
    is never lost. A failed job is retried with backoff up to ``attempts`` times (unless a newer
    ask for its key is waiting, which runs instead) and reported to ``health`` as ``name``."""

    def __init__(self, health: Health | None = None, *, name: str = WINDOW_MAINTENANCE, attempts: int = 5,
                 backoff: Backoff = Backoff(0.5, 8.0)) -> None:
        self._tasks: dict[Hashable, asyncio.Task[Any]] = {}
        self._again: dict[Hashable, Callable[[], Coroutine[Any, Any, Any]]] = {}
        self.health = health if health is not None else Health()
        self.name, self.attempts, self.backoff = name, attempts, backoff
        self.health.register(name)
        self._closing: asyncio.Event | None = None

    def start(self, key: Hashable, job: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run ``job()`` now, or right after the running task of *key* ends."""
        running = self._tasks.get(key)
        if running is not None and not running.done():
            self._again[key] = job
            return
        task = asyncio.get_running_loop().create_task(self._supervised(key, job))
        self._tasks[key] = task
        task.add_done_callback(functools.partial(self._done, key))

    async def _supervised(self, key: Hashable, job: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        if self._closing is None:
            self._closing = asyncio.Event()
        failures = 0
        while True:
            try:
                result = await job()
            except Exception as exc:
                failures = self.health.failed(self.name, exc)
                if failures >= self.attempts or key in self._again or self._closing.is_set():
                    log.error("background_task_gave_up", task=self.name, **error_cause(exc), attempts=failures)
                    return None
                delay = self.backoff.delay(failures)
                log.warning("background_task_retry", task=self.name, **error_cause(exc), attempt=failures,
                            retry_in=delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), delay)
                continue
            self.health.succeeded(self.name)
            return result

    def _done(self, key: Hashable, task: asyncio.Task[Any]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled() and (exc := task.exception()) is not None:  # only a BaseException gets here
            log.error("background_task_failed", task=self.name, **exception_fields(exc))  # no text: saw content
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
        """Wait for every running task (at shutdown); jobs waiting for a retry give up."""
        if self._closing is None:
            self._closing = asyncio.Event()
        self._closing.set()
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)


class Worker:
    """A component with one background task that repeats :meth:`step`.

    ``start()`` runs the loop, ``stop()`` cancels it and waits for it to end (both idempotent).
    The loop waits ``interval`` seconds (``first_delay`` before the first step), runs ``step()``,
    and on an exception logs its type, reports it to ``health`` and waits ``backoff`` instead;
    the first step that succeeds again reports the task healthy.
    """

    name = "worker"
    interval: float = 1.0
    first_delay: float | None = None
    """Seconds before the first step; None: ``interval``."""
    backoff: Backoff = Backoff()
    health: Health | None = None
    _task: asyncio.Task[None] | None = None

    async def step(self) -> None:
        """One unit of the task's work; raises when it could not be done (it is retried)."""
        raise NotImplementedError

    def attach(self, health: Health) -> None:
        """Report to *health* from now on."""
        self.health = health
        health.register(self.name)

    async def run(self) -> None:
        failures = 0
        delay = self.interval if self.first_delay is None else self.first_delay
        while True:
            await asyncio.sleep(delay)
            try:
                await self.step()
            except Exception as exc:
                failures = self.health.failed(self.name, exc) if self.health else failures + 1
                delay = self.backoff.delay(failures)
                log.warning("background_task_retry", task=self.name, **error_cause(exc), attempt=failures,
                            retry_in=delay)
                continue
            if failures:
                log.info("background_task_recovered", task=self.name, after_failures=failures)
                failures = 0
            if self.health is not None:
                self.health.succeeded(self.name)
            delay = self.interval

    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=self.name)
            self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._task is not task:
            return
        exc = task.exception()
        log.error("background_task_ended", task=self.name, **error_cause(exc))
        if self.health is not None:
            self.health.failed(self.name, exc or RuntimeError("ended"))

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
