"""The overview's numbers, read from each tenant's audit chain (names and counts only).

:class:`ChainStats` folds a tenant's entries into counts: rounds by outcome, rounds per day by
policy, sessions seen, exports, imports, erasures, purges, verifications, and the last
verification's result. It keeps the last sequence number it read, so a later call reads only
the new entries (one pass over the chain the first time).
"""

from __future__ import annotations

import datetime
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from gateway.audit import entry_fields
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
                self.sessions.add(sid)
        elif event == "erasure" and isinstance(sid, str):
            self.sessions.discard(sid)
        if event == "verify":
            self.last_verify = {"seq": seq, "time": created_at, **(fields.get("detail") or {})}
        if event in ("policy_reload", "key_rotation", "erasure", "purge", "import", "export", "verify", "reset"):
            self.admin.append({"seq": seq, "time": created_at, "event": event, "session_id": sid})
            del self.admin[:-20]

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
