"""Retention: rounds older than their policy's ``retention.days`` are erased.

``purge_expired`` finds, per policy with a retention period, the rounds that policy recorded
before its cut-off, deletes them and takes their messages out of the session's sealed context
window in one transaction per session (each an audit entry), then folds the write-ahead log so
the deleted bytes leave the disk. A session whose rounds all expired and that is idle since the
cut-off is erased whole, its data key included. Rounds whose policy id is no longer in the set
(a removed policy, imported rounds) follow the catch-all policy's retention. Text that a memo
absorbed from expired rounds (a summary) stays in the memo: a memo is not traceable to rounds.

``RetentionTask`` runs it periodically in a gateway; ``sessiongate purge`` runs it once.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import structlog

from gateway.background import Backoff, Worker
from gateway.policy import PolicySet, PolicyWatcher
from gateway.session.model import Message
from gateway.sessions import SessionService

log = structlog.get_logger("gateway.retention")
DAY = 86400.0
FALLBACK = "*"
"""Where rounds go whose policy id is not in the current set (removed policies, imports): the
catch-all policy's retention applies to them."""


async def purge_expired(sessions: SessionService, policies: PolicySet, *,
                        now: float | None = None) -> dict[str, int]:
    """Purge every policy's expired rounds; returns totals ``{"rounds": n, "sessions": m}``.

    Per session, one transaction deletes the expired rounds, takes their messages out of the
    sealed window and writes a ``purge`` audit entry; a session whose rounds all expired and
    that has not been written since the cut-off is erased whole instead.
    """
    now = time.time() if now is None else now
    store = sessions.store
    cutoffs = {p.id: now - p.retention.days * DAY for p in policies if p.retention.days is not None}
    fallback = policies.policies[-1]  # the catch-all: rounds of ids no longer in the set, imported ones
    if fallback.retention.days is not None:
        cutoffs[FALLBACK] = now - fallback.retention.days * DAY
    rounds = erased = 0
    if not cutoffs:
        return {"rounds": 0, "sessions": 0}
    for tenant in await store.tenants():
        counts = {s.session_id: s.rounds for s in await store.list_sessions(tenant)}
        async for session_id, expired, policy_ids in _expired(sessions, tenant, cutoffs, {p.id for p in policies}):
            whole = counts.get(session_id) == len(expired)
            n, gone = await sessions.drop_rounds(
                tenant, session_id, expired, policy_id=",".join(sorted(policy_ids)),
                erase_if_idle_before=min(cutoffs[p] for p in policy_ids) if whole else None)
            rounds += n
            erased += int(gone)
    if rounds:
        await store.checkpoint()
        log.info("retention_purged", rounds=rounds, sessions_erased=erased)
    return {"rounds": rounds, "sessions": erased}


async def _expired(sessions: SessionService, tenant: str, cutoffs: dict[str, float], known: set[str],
                   ) -> AsyncIterator[tuple[str, list[tuple[int, list[Message]]], set[str]]]:
    """Per session: its expired rounds as (seq, messages) and the policy ids that recorded them."""
    current = ""
    batch: list[tuple[int, list[Message]]] = []
    policy_ids: set[str] = set()
    async for row, messages in sessions.decrypted_rounds(tenant, until=max(cutoffs.values())):
        policy_id = row.policy_id if row.policy_id in known else FALLBACK
        cutoff = cutoffs.get(policy_id)
        if cutoff is None or row.created_at >= cutoff:
            continue
        if row.session_id != current:
            if batch:
                yield current, batch, policy_ids
            current, batch, policy_ids = row.session_id, [], set()
        batch.append((row.seq, messages))
        policy_ids.add(policy_id)
    if batch:
        yield current, batch, policy_ids


class RetentionTask(Worker):
    """Runs :func:`purge_expired` at start and then every *interval* seconds; a purge that fails
    is retried with backoff (capped at *interval*) and reported unhealthy until one succeeds."""

    name = "retention"
    first_delay = 0.0

    def __init__(self, sessions: SessionService, policies: PolicyWatcher, interval: float = 3600.0) -> None:
        self.sessions, self.policies, self.interval = sessions, policies, interval
        self.backoff = Backoff(min(1.0, interval), interval)

    async def step(self) -> None:
        await purge_expired(self.sessions, self.policies.current)
