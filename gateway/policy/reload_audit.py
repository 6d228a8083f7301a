"""The ``policy_reload`` entry of the ``_system`` audit chain: one for each change of the policy set.

Reads the ``_system`` chain's latest entries (``Store.audit_head``, ``Store.iter_audit``) and
writes one audit entry (``Store.transact``); raises ``StoreUnavailable`` when either fails, so
the watcher's poll fails and the reload is retried (``gateway.policy.reload``).

A reload is audited when it gives a set (policy ids and version hashes) other than the one this
process last audited, or started on. It is not audited when nothing changed (a file saved
again as it was, a file restored after a refused edit), nor when the latest ``policy_reload``
entry among the chain's last :data:`TAIL` entries already records this very set: another worker
or replica, watching the same folder, audited the change first. The entry's ``detail`` is
``{policy id: version hash, ..., "_diff": what changed since the set this process last audited}``
(names only, :meth:`gateway.policy.diff.PolicyDiff.audit_detail`; None when the diff failed).
A retry after a failed write therefore still carries the change, not an empty diff.

Limit: the check and the write are two steps, not one transaction (the store has no
insert-once for audit entries), so two processes that reload the same change within the same few
milliseconds can both write it: two entries recording the same set.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from gateway.audit import entry_fields
from gateway.policy.diff import diff_sets
from gateway.policy.matcher import PolicySet
from gateway.store.base import SYSTEM_TENANT, Changes, Store

log = structlog.get_logger("sessiongate.policy")

TAIL = 256
"""How many of the ``_system`` chain's latest entries are searched for the latest ``policy_reload``."""


def set_versions(policies: PolicySet) -> dict[str, str]:
    """What a ``policy_reload`` entry records of a set: each policy's id and version hash."""
    return {p.id: p.version_hash for p in policies}


class ReloadAudit:
    """Audits the policy set's changes once: create with the set the process starts on."""

    def __init__(self, store: Store, current: PolicySet) -> None:
        self.store = store
        self._audited = current

    async def record(self, new: PolicySet) -> bool:
        """Write the ``policy_reload`` entry for *new* when it is a change no process has audited
        yet (module docstring); returns whether this call wrote it."""
        versions = set_versions(new)
        if versions == set_versions(self._audited):
            return False
        if await self.latest() == versions:
            log.info("policy_reload_audited_elsewhere", policies={k: v[:12] for k, v in versions.items()})
            self._audited = new
            return False
        try:
            diff: dict[str, Any] | None = (await asyncio.to_thread(diff_sets, self._audited, new)).audit_detail()
        except Exception:  # noqa: BLE001 - the change is still audited, without its summary
            diff = None
            log.exception("policy_diff_failed")
        detail = {**versions, "_diff": diff}  # no policy id starts with "_"
        await self.store.transact(SYSTEM_TENANT, None, lambda cur: Changes(audit=[{
            "event": "policy_reload", "detail": detail}]))
        self._audited = new
        return True

    async def latest(self) -> dict[str, str] | None:
        """The set the latest ``policy_reload`` entry among the ``_system`` chain's last
        :data:`TAIL` entries records; None when there is none."""
        head = await self.store.audit_head(SYSTEM_TENANT)
        found = None
        async for row in self.store.iter_audit(SYSTEM_TENANT, after_seq=max(0, head - TAIL)):
            try:
                fields = entry_fields(row)
            except ValueError:  # an altered body: verification reports it; it records no set
                continue
            detail = fields.get("detail")
            if fields.get("event") == "policy_reload" and isinstance(detail, dict):
                found = {k: v for k, v in detail.items() if not k.startswith("_")}
        return found
