"""The auditor's side of the gateway: checkpoint signing, chain verification and redacted exports.

``AuditTrail`` ties ``gateway.audit`` and ``gateway.export`` to a live store:

- ``ObservedStore`` wraps a store so that every committed audit row reaches the
  ``Checkpointer``, which signs chain heads every N entries or T seconds, off the request path;
- ``verify(tenant)`` streams a tenant's chain from the store through ``ChainVerifier`` with the
  checkpoints kept outside the database and the public key;
- ``export(...)`` decrypts a tenant's (or a session's) rounds, applies the redaction of the
  policy version each round was recorded under (``gateway.policy.versions``) and writes a
  bundle that verifies offline with only the public key. Every export is itself an audit entry.

The pseudonym secret comes from ``audit.export_secret_env`` or, when that is unset, from a
random ``export-secret`` file (mode 0600) beside the signing key.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from gateway.audit import Checkpoint, Checkpointer, CheckpointLog, Signer, VerifyReport, averify_chain
from gateway.errors import ConfigError
from gateway.export import ExportRecord, Progress, export_bundle
from gateway.policy import PolicySet
from gateway.policy.versions import PolicyVersions
from gateway.redact import Redactor, tenant_secret
from gateway.sessions import SessionService
from gateway.settings import Settings
from gateway.store.base import AuditRow, Changes, Plan, Store


class ObservedStore:
    """A store whose committed audit rows are handed to the checkpointer."""

    def __init__(self, inner: Store, checkpointer: Checkpointer) -> None:
        self.inner = inner
        self.checkpointer = checkpointer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def transact(self, tenant: str, session_id: str | None, plan: Plan) -> Changes:
        changes = await self.inner.transact(tenant, session_id, plan)
        if changes.audit_rows:
            self.checkpointer.observe(changes.audit_rows)
        return changes


def export_secret(settings: Settings) -> bytes:
    """The secret behind export pseudonyms (see the module docstring)."""
    if settings.audit.export_secret_env:
        value = os.environ.get(settings.audit.export_secret_env, "")
        if len(value) < 16:
            raise ConfigError(f"environment variable {settings.audit.export_secret_env} must hold at least 16 "
                              "characters", field="audit.export_secret_env")
        return value.encode()
    path = settings.audit.signing_key_file.parent / "export-secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


class AuditTrail:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.signer = Signer.load_or_create(settings.audit.signing_key_file)
        self.log = CheckpointLog(settings.audit.checkpoint_file)
        self.checkpointer = Checkpointer(self.signer, self.log, every_n=settings.audit.checkpoint_every,
                                         every_seconds=settings.audit.checkpoint_seconds)

    def observe(self, store: Store) -> ObservedStore:
        return ObservedStore(store, self.checkpointer)

    async def verify(self, store: Store, tenant: str, *, checkpoints: list[Checkpoint] | None = None,
                     public_key: Any = None) -> VerifyReport:
        """Recompute every link of *tenant*'s chain and check the signed checkpoints."""
        cps = self.log.for_tenant(tenant) if checkpoints is None else [c for c in checkpoints if c.tenant == tenant]
        return await averify_chain(store.iter_audit(tenant), tenant=tenant, checkpoints=cps,
                                   public_key=public_key or self.signer.public_key_pem())

    async def export(self, sessions: SessionService, policies: PolicySet, out: Path, *, tenant: str, fmt: str,
                     session_id: str | None = None, since: float | None = None, until: float | None = None,
                     progress: Progress | None = None) -> dict[str, Any]:
        """Write a redacted, verifiable bundle of *tenant*'s rounds at *out*; returns its manifest."""
        secret = tenant_secret(export_secret(self.settings), tenant)
        store = sessions.store
        versions = await PolicyVersions.load(store)

        def redactor_for(record: ExportRecord) -> Redactor:
            # the version the round was recorded under, not today's policy of that id
            version = versions.resolve(record.policy_id, record.policy_hash, policies, tenant=tenant,
                                       session_id=record.session_id)
            return Redactor(version.export.redact, secret, version.export.detectors,
                            keys=list(version.keys) if version.keys else None)

        async def records() -> AsyncIterator[ExportRecord]:
            async for row, messages in sessions.decrypted_rounds(tenant, session_id, since=since, until=until):
                yield ExportRecord(row.tenant, row.session_id, row.seq, row.created_at, row.request_id,
                                   row.policy_id, row.policy_hash, row.outcome, messages,
                                   hashlib.sha256(row.ct).hexdigest())

        async def append_audit(fields: dict[str, Any]) -> AuditRow:
            changes = await store.transact(tenant, None, lambda cur: Changes(audit=[fields]))
            return changes.audit_rows[-1]

        async def sign_head() -> Checkpoint | None:
            return await self.checkpointer.checkpoint_tenant(tenant)

        filters = {"session_id": session_id, "since": since, "until": until}
        return await export_bundle(records(), out, tenant=tenant, fmt=fmt, redactor_for=redactor_for,
                                   append_audit=append_audit, sign_head=sign_head,
                                   iter_audit=lambda after: store.iter_audit(tenant, after_seq=after),
                                   filters=filters, progress=progress)

