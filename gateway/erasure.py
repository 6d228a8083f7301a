"""Erasure that converges: after a session's rows are deleted, its bytes must leave the files.

Deleting a session (``SessionService.erase``) removes its data key and rows in one transaction,
but on SQLite the deleted pages still sit in the write-ahead log until a checkpoint folds the
log into the main file (freed pages are zeroed there: ``secure_delete``) and truncates it. A
checkpoint cannot finish while another connection holds a read transaction on an older snapshot
(a backup, an admin shell, a slow export). ``ErasureFinisher`` therefore:

- tries the store's :meth:`~gateway.store.base.Store.checkpoint` once when an erasure is
  committed (``settle``); when it completes, the erasure is final at once;
- otherwise keeps the erasure *pending* and retries the checkpoint in one background task, with
  backoff (``first_delay`` doubling up to ``max_delay``), until it completes; a failing attempt
  (store down) is logged and retried, never raised;
- when a retried checkpoint has completed, appends an ``erasure_completed`` audit entry for
  every pending erasure (its ``request_id`` is the erasure's, ``detail.pending_seconds`` how
  long it waited), so the audit trail says when the bytes were gone. An erasure whose first
  checkpoint completed (the common case, answered 200 ``purge: complete``) gets no second
  entry: its ``erasure`` entry was final when it was answered.

Retention's purge calls ``fold``: the same checkpoint, retried the same way when it cannot
complete (purged rounds must leave the files too), without an audit entry of its own.

``len(finisher)`` is the number of erasures still pending (the ``sessiongate_erasures_pending``
gauge). Pending erasures live in memory: after a restart the store's own open/close checkpoint
folds the log, but no ``erasure_completed`` entry is written for them (a warning is logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from dataclasses import dataclass
from typing import Any

import structlog

from gateway.store.base import Changes, Current, Store

log = structlog.get_logger("gateway.erasure")


@dataclass(frozen=True, slots=True)
class PendingErasure:
    tenant: str
    session_id: str
    request_id: str
    since: float


class ErasureFinisher:
    """Retries the store's checkpoint after erasures until the erased bytes are gone; see the
    module docstring."""

    def __init__(self, store: Store, *, first_delay: float = 0.05, max_delay: float = 1.0) -> None:
        self.store = store
        self.first_delay, self.max_delay = first_delay, max_delay
        self._pending: dict[str, PendingErasure] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._unfolded = False  # a purge's checkpoint is still to be completed

    def __len__(self) -> int:
        return len(self._pending)

    async def settle(self, tenant: str, session_id: str, request_id: str) -> bool:
        """Finish the committed erasure *request_id*: True when its bytes have left the store's
        files (and ``erasure_completed`` is audited), False when it stays pending (retried in
        the background)."""
        if await self._attempt():
            return True
        self._pending[request_id] = PendingErasure(tenant, session_id, request_id, time.monotonic())
        self._retry_in_background()
        return False

    async def fold(self) -> bool:
        """A checkpoint now (retention after a purge); True when it completed. When it did not,
        it is retried in the background like a pending erasure (purged rounds leave the files
        too), without an audit entry of its own. Pending erasures complete with it."""
        if await self._attempt():
            return True
        self._unfolded = True
        self._retry_in_background()
        return False

    def _retry_in_background(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._retry(), name="erasure-finisher")

    async def wait(self, timeout: float) -> bool:
        """Wait up to *timeout* seconds for every pending erasure (the CLI); True when none is left."""
        deadline = time.monotonic() + timeout
        while (self._pending or self._unfolded) and time.monotonic() < deadline:
            await asyncio.sleep(self.first_delay)
            if self._task is None or self._task.done():
                await self._attempt()
        return not (self._pending or self._unfolded)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._pending:
            log.warning("erasures_pending_at_shutdown", count=len(self._pending),
                        note="the store folds its write-ahead log when it closes; no erasure_completed entry "
                             "is written for these")

    async def _retry(self) -> None:
        delay = self.first_delay
        while self._pending or self._unfolded:
            await asyncio.sleep(delay)
            await self._attempt()
            delay = min(delay * 2, self.max_delay)

    async def _attempt(self) -> bool:
        """One checkpoint; on success, audit every pending erasure as completed. Never raises."""
        async with self._lock:
            try:
                folded = await self.store.checkpoint()
            except Exception as exc:  # noqa: BLE001 - logged; the next attempt retries
                log.error("erasure_checkpoint_failed", error=type(exc).__name__, detail=str(exc)[:200])
                return False
            if folded is False:
                return False
            self._unfolded = False
            for request_id, item in list(self._pending.items()):
                entry = {"event": "erasure_completed", "request_id": request_id, "session_id": item.session_id,
                         "detail": {"pending_seconds": round(time.monotonic() - item.since, 3)}}
                try:
                    await self.store.transact(item.tenant, None, functools.partial(_audit_only, entry))
                except Exception as exc:  # noqa: BLE001 - logged; the next attempt retries
                    log.error("erasure_audit_failed", error=type(exc).__name__, detail=str(exc)[:200])
                    return False
                del self._pending[request_id]
            return True


def _audit_only(entry: dict[str, Any], _cur: Current) -> Changes:
    return Changes(audit=[entry])
