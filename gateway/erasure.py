"""Erasure that converges: after a session's rows are deleted, its bytes must leave the files.

Deleting a session (``SessionService.erase``) removes its data key and rows in one transaction,
but on SQLite the deleted pages still sit in the write-ahead log until a checkpoint folds the
log into the main file (freed pages are zeroed there: ``secure_delete``) and truncates it. A
checkpoint cannot finish while another connection holds a read transaction on an older snapshot
(a backup, an admin shell, a slow export). So the erasure's own transaction also records it as
*pending* in the store (``Changes.erasure``; :meth:`~gateway.store.base.Store.pending_erasures`),
and ``ErasureFinisher``:

- tries the store's :meth:`~gateway.store.base.Store.checkpoint` once when an erasure is
  committed (``settle``); when it completes, the erasure is final at once and its record is
  removed without an audit entry (its ``erasure`` entry was final when it was answered, 200
  ``purge: complete``);
- otherwise keeps the erasure pending and retries the checkpoint in one background task, with
  backoff (``first_delay`` doubling up to ``max_delay``), until it completes; a failing attempt
  (store down) is logged and retried, never raised;
- in a gateway (``start``), also looks for erasures recorded as pending every ``poll`` seconds,
  starting at start-up: those another process left (``sessiongate sessions erase`` that exited
  3, another worker, a gateway that stopped or was killed with erasures pending) are finished
  the same way;
- when a checkpoint has completed, finishes every erasure recorded as pending *before* it began
  (so the checkpoint folded its deleted pages): one transaction each removes the record and
  appends an ``erasure_completed`` audit entry (its ``request_id`` is the erasure's,
  ``detail.pending_seconds`` how long it waited). Two processes finishing the same erasure
  write one entry: the second finds the record gone (``Conflict``) and writes nothing.

Retention's purge calls ``fold``: the same checkpoint, retried the same way when it cannot
complete (purged rounds must leave the files too), without an audit entry of its own.

``len(finisher)`` is the number of erasures this process knows to be pending (the
``sessiongate_erasures_pending`` gauge): its own and those it found recorded. A store that
records none (PostgreSQL, whose ``VACUUM`` waits for no reader: ``pending_erasures`` is None)
keeps an erasure whose checkpoint failed in this process's memory only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from typing import Any

import structlog

from gateway.errors import Conflict
from gateway.store.base import Changes, Current, PendingErasure, Store

log = structlog.get_logger("gateway.erasure")

POLL_SECONDS = 5.0
"""How often a gateway looks for erasures another process left pending."""


class ErasureFinisher:
    """Retries the store's checkpoint after erasures until the erased bytes are gone; see the
    module docstring."""

    def __init__(self, store: Store, *, first_delay: float = 0.05, max_delay: float = 1.0,
                 poll: float | None = None) -> None:
        self.store = store
        self.first_delay, self.max_delay = first_delay, max_delay
        self.poll = POLL_SECONDS if poll is None else poll
        self._pending: dict[str, PendingErasure] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._unfolded = False  # a purge's checkpoint is still to be completed

    def __len__(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        """Look for erasures recorded as pending now and every ``poll`` seconds (a gateway)."""
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._look(), name="erasure-watch")

    async def settle(self, tenant: str, session_id: str, request_id: str) -> bool:
        """Finish the committed erasure *request_id*: True when its bytes have left the store's
        files, False when it stays pending (retried in the background)."""
        if await self._attempt(quiet=request_id):
            return True
        self._pending.setdefault(request_id, PendingErasure(tenant, session_id, request_id, time.time()))
        self._retry_in_background()
        return False

    async def resume(self, found: list[PendingErasure]) -> bool:
        """Finish erasures recorded as pending earlier (a command run again): True when their
        bytes are gone now (each gets its ``erasure_completed`` entry), False when they stay
        pending (retried in the background)."""
        for item in found:
            self._pending.setdefault(item.request_id, item)
        if await self._attempt() and not any(item.request_id in self._pending for item in found):
            return True
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
        for task in (self._watch, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._watch = self._task = None
        if self._pending:
            log.warning("erasures_pending_at_shutdown", count=len(self._pending),
                        note="they stay recorded in the store: the gateway that runs next (or "
                             "'sessiongate sessions erase' run again) finishes them")

    async def _look(self) -> None:
        while True:
            try:
                found = await self.store.pending_erasures()
            except Exception as exc:  # noqa: BLE001 - logged; the next look retries
                log.error("erasure_lookup_failed", error=type(exc).__name__, detail=str(exc)[:200])
                found = None
            if found:
                for item in found:
                    self._pending.setdefault(item.request_id, item)
                self._retry_in_background()
            await asyncio.sleep(self.poll)

    async def _retry(self) -> None:
        delay = self.first_delay
        while self._pending or self._unfolded:
            await asyncio.sleep(delay)
            await self._attempt()
            delay = min(delay * 2, self.max_delay)

    async def _attempt(self, quiet: str | None = None) -> bool:
        """One checkpoint; when it completes, finish every erasure pending before it began (the
        one of request id *quiet*, just answered, without an audit entry). Never raises."""
        async with self._lock:
            try:
                recorded = await self.store.pending_erasures()  # committed before the checkpoint: folded by it
                folded = await self.store.checkpoint()
            except Exception as exc:  # noqa: BLE001 - logged; the next attempt retries
                log.error("erasure_checkpoint_failed", error=type(exc).__name__, detail=str(exc)[:200])
                return False
            if recorded is not None:
                for item in recorded:
                    if item.request_id != quiet:
                        self._pending.setdefault(item.request_id, item)
            if folded is False:
                return False
            self._unfolded = False
            if recorded is None:  # the store keeps no record: what this process holds
                todo = [(item, False) for item in self._pending.values()]
            else:
                todo = [(item, True) for item in recorded]
                held = {item.request_id for item in recorded}
                for request_id in [r for r in self._pending if r not in held]:  # finished by another process
                    del self._pending[request_id]
            for item, recorded_here in todo:
                entry = None if item.request_id == quiet else {
                    "event": "erasure_completed", "request_id": item.request_id, "session_id": item.session_id,
                    "detail": {"pending_seconds": round(max(0.0, time.time() - item.erased_at), 3)}}
                done = item.request_id if recorded_here else None
                try:
                    await self.store.transact(item.tenant, None, functools.partial(_finished, entry, done))
                except Conflict:
                    pass  # another process finished it first, with its own entry
                except Exception as exc:  # noqa: BLE001 - logged; the next attempt retries
                    log.error("erasure_audit_failed", error=type(exc).__name__, detail=str(exc)[:200])
                    self._retry_in_background()
                    return False
                self._pending.pop(item.request_id, None)
            return True


def _finished(entry: dict[str, Any] | None, done: str | None, _cur: Current) -> Changes:
    return Changes(audit=[entry] if entry is not None else [], erasure_done=done)
