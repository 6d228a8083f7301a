"""The overview's numbers, read from each tenant's audit chain (names and counts only).

:class:`ChainStats` folds a tenant's entries into counts: rounds by outcome, rounds per day by
policy, the sessions the store holds (those the Sessions page lists: see
``ChainStats._track_session``), exports, imports, erasures, purges, verifications, and the last
verification's result. It keeps the last sequence number it read, so a later call reads only
the new entries (one pass over the chain the first time).
"""

from __future__ import annotations

import datetime
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from gateway.audit import entry_fields
from gateway.evidence import BINDING, ROUND_EVENTS
from gateway.store.base import Store

DAYS_SHOWN = 14


@dataclass
class ChainStats:
    tenant: str
    through_seq: int = 0
    entries: int = 0
    events: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    by_day: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    policies: Counter[str] = field(default_factory=Counter)
    sessions: set[str] = field(default_factory=set)
    last_verify: dict[str, Any] | None = None
    last_time: float | None = None
    admin: list[dict[str, Any]] = field(default_factory=list)

    def add(self, seq: int, created_at: float, fields: dict[str, Any]) -> None:
        self.through_seq, self.entries, self.last_time = seq, self.entries + 1, created_at
        event = str(fields.get("event"))
        self.events[event] += 1
        sid = fields.get("session_id")
        if event == "round":
            self.outcomes[str(fields.get("outcome"))] += 1
            policy = str(fields.get("policy_id"))
            self.policies[policy] += 1
            day = datetime.datetime.fromtimestamp(created_at, datetime.UTC).date().isoformat()
            self.by_day[day][policy] += 1
        if isinstance(sid, str):
            self._track_session(event, sid, fields)
        if event == "verify":
            self.last_verify = {"seq": seq, "time": created_at, **(fields.get("detail") or {})}
        if event in ("policy_reload", "key_rotation", "erasure", "purge", "import", "export", "verify", "reset"):
            self.admin.append({"seq": seq, "time": created_at, "event": event, "session_id": sid})
            del self.admin[:-20]

    def _track_session(self, event: str, sid: str, fields: dict[str, Any]) -> None:
        """Keep ``sessions`` to those with a stored state, as the Sessions page lists them,
        whatever wrote them (a round, an import, a history operation, a memo): an entry that
        writes a session's rows binds them (``state``, whose ``sha256`` is null once there is no
        state row); an erasure, or a purge that erases the session whole, ends it. A round entry
        from before bindings counts its session when it recorded a round."""
        detail = fields.get("detail")
        state = fields.get(BINDING)
        if event == "erasure" or (event == "purge" and isinstance(detail, dict) and detail.get("session_erased")):
            self.sessions.discard(sid)
        elif isinstance(state, dict):
            if state.get("sha256") is not None:
                self.sessions.add(sid)
            else:
                self.sessions.discard(sid)
        elif event in ROUND_EVENTS and fields.get("ciphertext_sha256"):
            self.sessions.add(sid)

    def days(self) -> list[tuple[str, Counter[str]]]:
        """The last ``DAYS_SHOWN`` days that had rounds, oldest first."""
        return sorted(self.by_day.items())[-DAYS_SHOWN:]


class StatsCache:
    """One :class:`ChainStats` per tenant, brought up to date on each read."""

    def __init__(self) -> None:
        self._by_tenant: dict[str, ChainStats] = {}

    async def get(self, store: Store, tenant: str) -> ChainStats:
        stats = self._by_tenant.setdefault(tenant, ChainStats(tenant))
        async for row in store.iter_audit(tenant, after_seq=stats.through_seq):
            stats.add(row.seq, row.created_at, entry_fields(row))
        return stats
