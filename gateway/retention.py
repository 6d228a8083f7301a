"""Retention: rounds older than their policy's ``retention.days`` are erased.

``purge_expired`` finds the rounds older than the retention of the policy version that recorded
them (``gateway.policy.versions``: kept by hash, so an edited or removed policy still governs
the rounds it recorded), deletes them and takes their messages out of the session's sealed
context window in one transaction per session (each an audit entry), then folds the
write-ahead log so the deleted bytes leave the disk. A session whose rounds all expired and
that is idle since the cut-off is erased whole, its data key included. Text that a memo
absorbed from expired rounds (a summary) stays in the memo: a memo is not traceable to rounds.
A session that is quarantined, or fails the check on load (and is quarantined then), is
skipped and logged (``retention_skipped_quarantined``): its expired rounds stay until an
operator releases or erases it, since purging would rewrite its state from rows the audit
chain does not vouch for, and bind them anew. A round whose recorded policy version the store
no longer keeps (its ``policy_versions`` row deleted; ``VersionMissing``) is kept and logged
(``retention_policy_version_missing``, naming the version): its retention is unknown, and
today's policy of that id is not used in its place. Only a round the audit chain shows was
recorded before versions were kept (``legacy_rounds``) falls back to today's policy.

``RetentionTask`` runs it periodically in a gateway; ``sessiongate purge`` runs it once.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import structlog

from gateway.background import Backoff, Worker
from gateway.errors import IntegrityError
from gateway.policy import PolicySet, PolicyWatcher
from gateway.policy.versions import PolicyVersion, PolicyVersions, VersionMissing, legacy_rounds
from gateway.session.model import Message
from gateway.sessions import SessionService

log = structlog.get_logger("gateway.retention")
DAY = 86400.0


async def purge_expired(sessions: SessionService, policies: PolicySet, *,
                        now: float | None = None) -> dict[str, int]:
    """Purge every policy version's expired rounds; returns totals ``{"rounds": n, "sessions": m,
    "skipped": k, "versions_missing": v}`` (sessions skipped as quarantined; rounds kept because
    the policy version they were recorded under is missing, each such version logged as
    ``retention_policy_version_missing``).

    Each round follows the retention of the policy version it was recorded under
    (``PolicyVersions.resolve``). Per session, one transaction deletes the expired rounds, takes
    their messages out of the sealed window and writes a ``purge`` audit entry; a session whose
    rounds all expired and that has not been written since the cut-off is erased whole instead.
    """
    now = time.time() if now is None else now
    store = sessions.store
    versions = await PolicyVersions.load(store)
    days = [v.retention.days for v in (*versions, *map(PolicyVersion.of, policies))]
    kept = [d for d in days if d is not None]
    if not kept:
        return {"rounds": 0, "sessions": 0, "skipped": 0, "versions_missing": 0}
    latest_cutoff = now - min(kept) * DAY  # no round created after it can have expired
    rounds = erased = skipped = 0
    missing: dict[tuple[str, str, str], list[Any]] = {}  # (tenant, policy, hash) -> [rounds, session, seq]
    for tenant in await store.tenants():
        counts = {s.session_id: s.rounds for s in await store.list_sessions(tenant)}
        async for session_id, expired, policy_ids, cutoff in _expired(sessions, tenant, latest_cutoff,
                                                                       versions, policies, now, missing):
            whole = counts.get(session_id) == len(expired)
            try:
                n, gone = await sessions.drop_rounds(
                    tenant, session_id, expired, policy_id=",".join(sorted(policy_ids)),
                    erase_if_idle_before=cutoff if whole else None)
            except IntegrityError as exc:  # quarantined now or before: kept as it is for the investigation
                skipped += 1
                log.error("retention_skipped_quarantined", tenant=tenant, session_id=session_id,
                          expired_rounds=len(expired), reason=exc.detail[:200])
                continue
            rounds += n
            erased += int(gone)
    for (tenant, policy_id, policy_hash), (count, session_id, seq) in missing.items():
        log.error("retention_policy_version_missing", tenant=tenant, policy_id=policy_id, policy_hash=policy_hash,
                  rounds_kept=count, first_session_id=session_id, first_round_seq=seq,
                  note="the policy version these rounds were recorded under is no longer kept in policy_versions "
                       "(deleted): their retention is unknown, so they are kept; run 'sessiongate audit verify'")
    if rounds:
        await sessions.erasures.fold()
        log.info("retention_purged", rounds=rounds, sessions_erased=erased)
    return {"rounds": rounds, "sessions": erased, "skipped": skipped,
            "versions_missing": sum(count for count, _, _ in missing.values())}


async def _expired(sessions: SessionService, tenant: str, until: float, versions: PolicyVersions,
                   policies: PolicySet, now: float, missing: dict[tuple[str, str, str], list[Any]],
                   ) -> AsyncIterator[tuple[str, list[tuple[int, list[Message]]], set[str], float]]:
    """Per session: its expired rounds as (seq, messages), the policy ids that recorded them and
    the earliest of their cut-offs. A round whose version is missing (``VersionMissing``) is
    counted in *missing*, not yielded."""
    current = ""
    batch: list[tuple[int, list[Message]]] = []
    policy_ids: set[str] = set()
    earliest = now
    legacy: set[tuple[str, str]] | None = None  # read from the chain when a version is first missing
    async for row, messages in sessions.decrypted_rounds(tenant, until=until):
        try:
            version = versions.resolve(row.policy_id, row.policy_hash, policies, tenant=tenant,
                                       session_id=row.session_id)
        except VersionMissing:
            if legacy is None:
                legacy = await legacy_rounds(sessions.store.iter_audit(tenant))
            if (row.session_id, hashlib.sha256(row.ct).hexdigest()) not in legacy:
                missing.setdefault((tenant, row.policy_id, row.policy_hash), [0, row.session_id, row.seq])[0] += 1
                continue
            version = versions.resolve(row.policy_id, row.policy_hash, policies, tenant=tenant,
                                       session_id=row.session_id, versioned=False)
        if version.retention.days is None:
            continue
        cutoff = now - version.retention.days * DAY
        if row.created_at >= cutoff:
            continue
        if row.session_id != current:
            if batch:
                yield current, batch, policy_ids, earliest
            current, batch, policy_ids, earliest = row.session_id, [], set(), now
        batch.append((row.seq, messages))
        policy_ids.add(version.id)
        earliest = min(earliest, cutoff)
    if batch:
        yield current, batch, policy_ids, earliest


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
