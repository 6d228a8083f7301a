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
  ``detail.pending_seconds`` how long it waited, from the time of its ``erasure`` entry). Two
  processes finishing the same erasure write one entry: the second finds the record gone
  (``Conflict``) and writes nothing.

A record is a row in the database, which its operator can write: the finisher acts only on
one the tenant's chain vouches for (:meth:`ErasureFinisher.vouched`): an ``erasure`` entry of
that request id and session whose MAC holds under the store's entry key, with the session's
rows now the ones the chain binds (gone, or begun anew by a later write), and no
``erasure_completed`` entry for it yet (a finished record written again). Any other record (a
session never erased, a tenant that has no chain) is logged once as
``erasure_pending_unvouched`` and left where it is, with no entry, no chain started for its
tenant and no wait for it; the store reports rows that are not records at all (see
``Store.pending_erasures``). A failing lookup is retried like a failing checkpoint.

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
import dataclasses
import functools
import time
from typing import Any

import orjson
import structlog

from gateway import evidence
from gateway.audit import aclose
from gateway.errors import Conflict
from gateway.store.base import AuditRow, Changes, Current, PendingErasure, Store

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
        self._checked: dict[tuple[str, str], PendingErasure | None] = {}  # vouched (its entry's time) or refused
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
        """Finish the committed erasure *request_id* (this process's own: vouched for): True when
        its bytes have left the store's files, False when it stays pending (retried in the
        background)."""
        own = PendingErasure(tenant, session_id, request_id, time.time())
        self._checked[(tenant, request_id)] = own
        if await self._attempt(quiet=request_id):
            return True
        self._pending.setdefault(request_id, own)
        self._retry_in_background()
        return False

    async def resume(self, found: list[PendingErasure]) -> bool:
        """Finish erasures recorded as pending earlier (a command run again; *found* as
        :meth:`vouched` returns them): True when their bytes are gone now (each gets its
        ``erasure_completed`` entry), False when they stay pending (retried in the background)."""
        for item in found:
            self._pending.setdefault(item.request_id, item)
        if await self._attempt() and not any(item.request_id in self._pending for item in found):
            return True
        self._retry_in_background()
        return False

    async def vouched(self, recorded: list[PendingErasure]) -> list[PendingErasure]:
        """The records of *recorded* that the chain vouches for (see the module docstring), each
        with ``erased_at`` from its ``erasure`` entry; each other one is logged once as
        ``erasure_pending_unvouched``. Raises what the store raises (``StoreUnavailable``)."""
        out = []
        for item in recorded:
            key = (item.tenant, item.request_id)
            if key not in self._checked:
                self._checked[key] = await self._vouch(item)
            found = self._checked[key]
            if found is not None and found.session_id == item.session_id:
                out.append(found)
        return out

    async def _vouch(self, item: PendingErasure) -> PendingErasure | None:
        """*item* with the time of the ``erasure`` entry that vouches for it; None (logged) when
        none does."""
        cur = await self.store.read_session(item.tenant, item.session_id)
        entry = cur.head if cur.head is not None and self._records(cur.head, item) else None
        if entry is None:  # begun anew since (its head is a later write), or never erased
            rows = self.store.iter_audit(item.tenant)
            try:
                async for row in rows:
                    if self._records(row, item):
                        entry = row
                        break
            finally:
                await aclose(rows)
        if entry is None:
            problem: str | None = "no erasure entry of that request and session in the tenant's audit chain"
        else:
            problem = evidence.check(cur) or await self._completed(item, entry.seq)
        if entry is not None and problem is None:
            return dataclasses.replace(item, erased_at=entry.created_at)
        log.error("erasure_pending_unvouched", tenant=item.tenant[:200], session_id=item.session_id[:200],
                  request_id=item.request_id[:200], reason=problem,
                  note="a pending-erasure record was written into the database outside the gateway: no "
                       "erasure_completed entry is written for it; investigate, then delete its row (store table "
                       "meta, name 'erasure_pending [tenant, request id]')")
        return None

    async def _completed(self, item: PendingErasure, after: int) -> str | None:
        """Why *item* is no pending erasure although its ``erasure`` entry (seq *after*) holds: an
        ``erasure_completed`` entry for it follows (the record was written again); None if none."""
        rows = self.store.iter_audit(item.tenant, after_seq=after)
        try:
            async for row in rows:
                if self._records(row, item, "erasure_completed"):
                    return f"audit entry {row.seq} records that erasure as completed already"
        finally:
            await aclose(rows)
        return None

    def _records(self, row: AuditRow, item: PendingErasure, event: str = "erasure") -> bool:
        """Whether *row* is an authentic *event* entry of *item* (its request and session)."""
        try:
            doc = orjson.loads(row.body)
        except orjson.JSONDecodeError:
            return False
        if not (isinstance(doc, dict) and doc.get("event") == event and doc.get("request_id") == item.request_id
                and doc.get("session_id") == item.session_id):
            return False
        key = self.store.entry_key
        return key is None or key.check(doc) == "keyed"

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
            waiting = found and any(self._checked.get((i.tenant, i.request_id), i) is not None for i in found)
            if waiting and (self._task is None or self._task.done()):
                await self._attempt()  # vouches for them; those left pending are retried in the background
                if self._pending:
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
                if recorded is not None:
                    recorded = await self.vouched(recorded)
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
                self._checked.pop((item.tenant, item.request_id), None)  # its record, written again, is checked anew
            return True


def _finished(entry: dict[str, Any] | None, done: str | None, _cur: Current) -> Changes:
    return Changes(audit=[entry] if entry is not None else [], erasure_done=done)
