"""Retention: rounds older than their policy's ``retention.days`` are erased.

``purge_expired`` asks the store to delete, per policy with a retention period, the rounds that
policy recorded before the cut-off (each deletion is an audit entry), then folds the write-ahead
log so the deleted bytes leave the disk. A session left with no rounds and idle since the
cut-off is erased whole, its data key included. ``RetentionTask`` runs it periodically in a
gateway; ``sessiongate purge`` runs it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from gateway.policy import PolicySet, PolicyWatcher
from gateway.store.base import Store

log = structlog.get_logger("gateway.retention")
DAY = 86400.0


async def purge_expired(store: Store, policies: PolicySet, *, now: float | None = None) -> dict[str, int]:
    """Purge every policy's expired rounds; returns totals ``{"rounds": n, "sessions": m}``."""
    now = time.time() if now is None else now
    rounds = sessions = 0
    for policy in policies:
        days = policy.retention.days
        if days is None:
            continue
        for _tenant, _sid, n, erased in await store.purge(policy.id, now - days * DAY):
            rounds += n
            sessions += int(erased)
    if rounds:
        await store.checkpoint()
        log.info("retention_purged", rounds=rounds, sessions_erased=sessions)
    return {"rounds": rounds, "sessions": sessions}


class RetentionTask:
    def __init__(self, store: Store, policies: PolicyWatcher, interval: float = 3600.0) -> None:
        self.store, self.policies, self.interval = store, policies, interval
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="retention")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                await purge_expired(self.store, self.policies.current)
            except Exception as exc:  # noqa: BLE001 - logged; retried at the next interval
                log.error("retention_failed", error=type(exc).__name__, detail=str(exc)[:200])
            await asyncio.sleep(self.interval)
