"""The policy that recorded a round governs it: every policy version is kept, by its hash.

A round records its policy's id and ``version_hash``. Export redaction and retention must follow
the version the round was recorded under, not whatever the policy folder says today, and must
not fall back to some unrelated policy when that policy was edited or removed. So:

- :meth:`PolicyVersions.record` keeps every version of a loaded policy set in the store's
  ``policy_versions`` table (``Store.save_policy_versions``), keyed by version hash, with its
  *document*: the canonical JSON of the validated policy, the exact text ``version_hash`` is the
  SHA-256 of (so a stored document proves itself). It is configuration, not recorded data, and
  is kept in plaintext like the policy files. The gateway records its set at start-up and on
  every reload; the CLI when it imports.
- :meth:`PolicyVersions.resolve` gives a round its :class:`PolicyVersion`, in this order:
  the version with the round's hash (kept, or in the current set); for rounds recorded before
  versions were kept (no stored document): the current policy with the round's id; when that id
  is gone too (a removed policy, an old import): the policy that matches the round's tenant
  and session now (``PolicySet.match``, no model) — never simply the lowest-priority policy.
  Which rounds those are comes from the audit chain, never from the store's tables: a round
  whose entry binds rows (``gateway.evidence``: the gateway has kept versions since it binds
  rows) was recorded under a version the store must keep, so when that version is missing (its
  row deleted) :meth:`~PolicyVersions.resolve` raises :class:`VersionMissing` instead of falling
  back: a weaker redaction or a shorter retention is never taken from today's policy. Retention
  keeps such rounds and exports refuse them (:func:`legacy_rounds` gives the rounds that may
  fall back).

A :class:`PolicyVersion` holds only what governs records after the fact: the redaction rules and
detectors, the recorded key names (redaction applies per key) and the retention. It is read
from the stored document without re-validating the whole policy, so a version whose bounding
hook no longer imports still governs its rounds.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.audit import aclose
from gateway.errors import IntegrityError
from gateway.evidence import BINDING, ROUND_EVENTS
from gateway.policy.matcher import PolicySet
from gateway.policy.model import Export, Policy, Retention
from gateway.store.base import AuditRow, PolicyVersionRow, Store


def proves(row: PolicyVersionRow) -> bool:
    """Whether a kept version's document is the one its key (the version hash) names (never when
    a value is not the text the gateway stores: a row edited outside it)."""
    if not isinstance(row.document, str) or not isinstance(row.hash, str):
        return False
    return hashlib.sha256(row.document.encode("utf-8")).hexdigest() == row.hash


def document(policy: Policy) -> str:
    """The canonical JSON of *policy*: ``sha256(document(p)) == p.version_hash``."""
    return json.dumps(policy.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class PolicyVersion:
    """What governs a round after it was recorded: redaction, recorded keys and retention."""

    id: str
    hash: str
    export: Export
    retention: Retention
    keys: tuple[str, ...] | None
    """``input_keys`` and ``reply_keys`` together; None when both were null (free text)."""

    @classmethod
    def of(cls, policy: Policy) -> PolicyVersion:
        keys = [*(policy.session.input_keys or []), *(policy.session.reply_keys or [])]
        return cls(policy.id, policy.version_hash, policy.export, policy.retention, tuple(keys) or None)

    @classmethod
    def from_document(cls, row: PolicyVersionRow) -> PolicyVersion:
        """Read a stored document; ``ValueError`` when it is not a policy document or does not
        hash to its version hash."""
        if not proves(row):
            raise ValueError(f"stored policy version {row.hash[:12]} of {row.policy_id!r} does not match its hash")
        doc = json.loads(row.document)
        if not isinstance(doc, dict) or not isinstance(doc.get("session") or {}, dict):
            raise ValueError(f"stored policy version {row.hash[:12]} of {row.policy_id!r} is not a policy document")
        session = doc.get("session") or {}
        keys = [*(session.get("input_keys") or []), *(session.get("reply_keys") or [])]
        return cls(str(doc.get("id", row.policy_id)), row.hash, Export.model_validate(doc.get("export") or {}),
                   Retention.model_validate(doc.get("retention") or {}), tuple(keys) or None)


class PolicyVersions:
    """Every policy version kept in a store, with the lookup of a round's version (module docstring)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._by_hash: dict[str, PolicyVersion] = {}
        self._unsaved: dict[str, tuple[PolicyVersionRow, PolicyVersion]] = {}

    @classmethod
    async def load(cls, store: Store) -> PolicyVersions:
        """The versions the store keeps now (other processes' and replicas' included)."""
        versions = cls(store)
        await versions.refresh()
        return versions

    def __iter__(self) -> Any:
        return iter(self._by_hash.values())

    async def refresh(self) -> None:
        """Read every kept version from the store. Raises ``StoreUnavailable``, and
        ``IntegrityError`` for a stored document that is not a policy or does not hash to its
        key (the table was edited)."""
        for row in await self.store.policy_versions():
            if row.hash not in self._by_hash:
                try:
                    version = PolicyVersion.from_document(row)
                except ValueError as exc:
                    raise IntegrityError(f"policy_versions: {exc}") from exc
                self._by_hash[row.hash] = version

    async def record(self, policies: PolicySet) -> None:
        """Keep every version of *policies* (those already kept are left alone). Raises
        ``StoreUnavailable``; versions that could not be saved are saved with the next call."""
        now = time.time()
        for p in policies:
            if p.version_hash not in self._by_hash and p.version_hash not in self._unsaved:
                self._unsaved[p.version_hash] = (PolicyVersionRow(p.version_hash, p.id, now, document(p)),
                                                 PolicyVersion.of(p))
        await self.store.save_policy_versions([row for row, _ in self._unsaved.values()])
        for version_hash, (_, version) in self._unsaved.items():
            self._by_hash[version_hash] = version
        self._unsaved.clear()

    def resolve(self, policy_id: str, policy_hash: str, current: PolicySet, *, tenant: str,
                session_id: str | None, versioned: bool = True) -> PolicyVersion:
        """The version that governs a round recorded under (*policy_id*, *policy_hash*).

        *versioned*: the round's audit entry binds rows, so its version must be kept (False only
        for a round :func:`legacy_rounds` names). Raises :class:`VersionMissing` when it is not
        kept and not in *current*: no fallback for such a round (module docstring)."""
        found = self._by_hash.get(policy_hash) if policy_hash else None
        if found is not None:
            return found
        for policy in current:
            if policy.version_hash == policy_hash:
                return PolicyVersion.of(policy)
        if versioned and policy_hash:
            raise VersionMissing(policy_id, policy_hash, tenant, session_id)
        same_id = current.get(policy_id)
        if same_id is not None:
            return PolicyVersion.of(same_id)
        return PolicyVersion.of(current.match(tenant, None, session_id))


class VersionMissing(IntegrityError):
    """A round recorded under a policy version the store no longer keeps (its ``policy_versions``
    row was deleted), although its audit entry says the gateway kept it: its redaction and
    retention are unknown, so it is neither exported nor purged."""

    def __init__(self, policy_id: str, policy_hash: str, tenant: str, session_id: str | None) -> None:
        super().__init__(f"tenant {tenant}, session {session_id}: a round was recorded under version "
                         f"{policy_hash[:12]} of policy {policy_id!r}, which the store's policy_versions table "
                         "no longer keeps (deleted): its export redaction and retention are unknown, and "
                         "today's policy is not used in their place")
        self.policy_id, self.policy_hash = policy_id, policy_hash


async def legacy_rounds(rows: AsyncIterator[AuditRow]) -> set[tuple[str, str]]:
    """``(session id, ciphertext SHA-256)`` of the round entries among *rows* (a tenant's chain)
    that bind no rows: recorded before bindings, and so before versions were kept, these alone
    may fall back to today's policy when their version is not kept. Reads the chain once."""
    found: set[tuple[str, str]] = set()
    try:
        async for row in rows:
            if b'"ciphertext_sha256"' not in row.body:
                continue  # not a round entry (a cheap test before parsing)
            try:
                doc = orjson.loads(row.body)
            except orjson.JSONDecodeError:
                continue  # an edited entry: verification names it
            if (isinstance(doc, dict) and doc.get("event") in ROUND_EVENTS and BINDING not in doc
                    and isinstance(doc.get("session_id"), str) and isinstance(doc.get("ciphertext_sha256"), str)):
                found.add((doc["session_id"], doc["ciphertext_sha256"]))
    finally:
        await aclose(rows)
    return found
