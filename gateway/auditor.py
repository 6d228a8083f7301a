"""The auditor's side of the gateway: checkpoint signing, chain verification and redacted exports.

``AuditTrail`` ties ``gateway.audit`` and ``gateway.export`` to a live store:

- ``ObservedStore`` wraps a store so that every committed audit row reaches the
  ``Checkpointer``, which signs chain heads every N entries or T seconds, off the request path,
  once it has checked the entries up to the head (it reads them from the wrapped store);
- ``verify(tenant)`` streams a tenant's chain from the store through ``ChainVerifier`` with the
  checkpoints kept outside the database, the public key and the entry MAC key (derived from the
  signing key, ``gateway.audit.EntryKey``), then checks the stored rounds and state rows against
  the chain (``gateway.evidence.verify_data``);
- ``export(...)`` decrypts a tenant's (or a session's) rounds, applies the redaction of the
  policy version each round was recorded under (``gateway.policy.versions``) and writes a
  bundle that verifies offline with only the public key. Every export is itself an audit entry.

The pseudonym secret comes from ``audit.export_secret_env`` or, when that is unset, from a
random ``export-secret`` file (mode 0600) beside the signing key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson

from gateway.audit import Checkpoint, Checkpointer, CheckpointLog, VerifyReport, aclose, averify_chain
from gateway.errors import ConfigError, NotFound
from gateway.evidence import Kept, verify_data
from gateway.export import ExportRecord, Progress, check_range, export_bundle, names_session
from gateway.keys import load_signer
from gateway.policy import Policy, PolicySet
from gateway.policy.versions import PolicyVersion, PolicyVersions
from gateway.redact import Redactor, tenant_secret
from gateway.sessions import SessionService
from gateway.settings import Settings
from gateway.store.base import AuditRow, Changes, DataKeyRow, Plan, PolicyVersionRow, Store, StoreReads


class ObservedStore:
    """A store whose committed audit rows are handed to the checkpointer."""

    def __init__(self, inner: Store, checkpointer: Checkpointer) -> None:
        self.inner = inner
        self.checkpointer = checkpointer
        self.on_write: Callable[[BaseException | None], None] | None = None
        """Told how each write ended: None when it committed, else its exception
        (``background.Health.store_write``: a store that fails every write is not ready)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def transact(self, tenant: str, session_id: str | None, plan: Plan, *,
                 bounded: bool = False) -> asyncio.Future[Changes]:
        """The inner store's transaction; its audit rows go to the checkpointer when it commits,
        whether or not its caller is still waiting, and before the caller resumes (a commit made
        at once is told at once; a callback added now runs before those its awaiter adds)."""
        fut = self.inner.transact(tenant, session_id, plan, bounded=bounded)
        if fut.done():
            self._committed(fut)
        else:
            fut.add_done_callback(self._committed)
        return fut

    def _committed(self, fut: asyncio.Future[Changes]) -> None:
        if fut.cancelled():
            return
        if self.on_write is not None:
            self.on_write(fut.exception())
        if fut.exception() is not None:
            return
        rows = fut.result().audit_rows
        if rows:
            self.checkpointer.observe(rows)


def export_secret(settings: Settings) -> bytes:
    """The secret behind export pseudonyms (see the module docstring)."""
    if settings.audit.export_secret_env:
        value = os.environ.get(settings.audit.export_secret_env, "")
        if len(value) < 16:
            raise ConfigError(f"environment variable {settings.audit.export_secret_env} must hold at least 16 "
                              "characters", field="audit.export_secret_env")
        return value.encode()
    path = settings.audit.signing_key_file.parent / "export-secret"
    instead = "or set audit.export_secret_env to an environment variable holding the secret"
    try:
        if not path.exists():  # written whole beside it, then linked in: a crash never leaves a part
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            partial = path.with_name(f".export-secret.{secrets.token_hex(8)}")
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(32))
                    f.flush()
                    os.fsync(f.fileno())
                with contextlib.suppress(FileExistsError):  # another process made it first: theirs is kept
                    os.link(partial, path)
            finally:
                partial.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot create the export secret: {exc.strerror or exc} at "
                          f"{os.fsdecode(exc.filename) if exc.filename else path}: let this user write to "
                          f"{path.parent}, {instead}", file=str(path)) from exc
    try:
        secret = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "it is not text"
        raise ConfigError(f"cannot read the export secret: {why}: let this user read it (pseudonyms in exports "
                          f"depend on it), {instead}", file=str(path)) from exc
    if len(secret) < 16:
        raise ConfigError(f"{path} holds {len(secret)} characters, not an export secret: restore it from your "
                          "backup (pseudonyms in exports depend on it)", file=str(path))
    return secret.encode()


class AuditTrail:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.signer = load_signer(settings)  # refused when missing or replaced over existing checkpoints
        self.log = CheckpointLog(settings.audit.checkpoint_file)
        self.checkpointer = Checkpointer(self.signer, self.log, every_n=settings.audit.checkpoint_every,
                                         every_seconds=settings.audit.checkpoint_seconds)

    def observe(self, store: Store) -> ObservedStore:
        """*store* with its commits told to the checkpointer, which reads its entries to check them."""
        self.checkpointer.entries = lambda tenant, after: store.iter_audit(tenant, after_seq=after)
        return ObservedStore(store, self.checkpointer)

    async def tenants(self, store: Store, checkpoints: list[Checkpoint] | None = None) -> list[str]:
        """Every tenant to verify: those with data in *store* and those with a signed checkpoint
        (the log's, or *checkpoints*). A tenant whose rows were all deleted has none in the store
        but keeps its checkpoints, so it is still verified, and fails."""
        signed = self.log if checkpoints is None else checkpoints
        return sorted(set(await store.tenants()) | {c.tenant for c in signed})

    async def verify(self, store: Store, tenant: str, *, checkpoints: list[Checkpoint] | None = None,
                     public_key: Any = None, data: bool = True,
                     open_key: Callable[[DataKeyRow], object] | None = None,
                     watch: Callable[[AsyncIterator[AuditRow]], AsyncIterator[AuditRow]] | None = None,
                     on_data: Callable[[], None] | None = None) -> VerifyReport:
        """Recompute every link of *tenant*'s chain and check the signed checkpoints; then, with
        *data*, that the stored rows are the ones the chain records (with *open_key*,
        ``SessionService.unwrap``, also that each session's data key unwraps), also when the chain
        failed (its entries still say what the rows must be: a planted chain error must not hide
        the rows'). The first problem is the report's ``first_error``, the chain's when it failed;
        every other one is in ``errors`` (data problems name session and round).
        Chain and rows are read as of one moment (``Store.snapshot``), so rounds committed
        meanwhile do not look like tampering. *watch* wraps the chain's rows (a progress count),
        *on_data* is told when the data check starts."""
        cps = self.log.for_tenant(tenant) if checkpoints is None else [c for c in checkpoints if c.tenant == tenant]
        async with store.snapshot() as view:
            rows = view.iter_audit(tenant)
            report = await averify_chain(watch(rows) if watch is not None else rows, tenant=tenant,
                                         checkpoints=cps, public_key=public_key or self.signer.public_key_pem(),
                                         entry_key=self.signer.entry_key)
            if data:
                if on_data is not None:
                    on_data()
                try:
                    await check_data(view, tenant, report, open_key)
                except NotFound:
                    if report.ok:
                        raise
                    # nothing of the tenant is stored but its checkpoints: the chain's error says so
        return report

    async def redactors(self, store: Store, policies: PolicySet, tenant: str) -> Callable[..., Redactor]:
        """``redactor_for(round, versioned=None)``: the export redaction of the policy version a
        round (an ``ExportRecord`` or a ``RoundRow``: its ``policy_id``, ``policy_hash`` and
        ``session_id``) was recorded under, for *tenant*. Exports and the console show rounds
        through it. *versioned* (default: the record's ``versioned``, else True) says the round's
        entry binds rows (``RoundLabels.versioned``): then a version the store no longer keeps
        raises ``VersionMissing`` (an integrity error) instead of falling back to today's policy."""
        secret = tenant_secret(export_secret(self.settings), tenant)
        versions = await PolicyVersions.load(store)

        def redactor_for(record: Any, versioned: bool | None = None) -> Redactor:
            # the version the round was recorded under, not today's policy of that id
            bound = getattr(record, "versioned", True) if versioned is None else versioned
            version = versions.resolve(record.policy_id, record.policy_hash, policies, tenant=tenant,
                                       session_id=record.session_id, versioned=bound)
            return Redactor(version.export.redact, secret, version.export.detectors,
                            keys=list(version.keys) if version.keys else None)

        return redactor_for

    async def export(self, sessions: SessionService, policies: PolicySet, out: Path, *, tenant: str, fmt: str,
                     session_id: str | None = None, since: float | None = None, until: float | None = None,
                     progress: Progress | None = None) -> dict[str, Any]:
        """Write a redacted, verifiable bundle of *tenant*'s rounds at *out*; returns its manifest.
        BadRequest for a range that holds no time; NotFound for a tenant the store has nothing of
        (a typo would otherwise export nothing, and start an audit chain for it), and for a
        session the tenant neither holds nor ever had (no audit entry names it; an erased
        session's id still exports its entries)."""
        store = sessions.store
        check_range(since, until)
        if tenant not in await store.tenants():
            raise NotFound(f"no tenant '{tenant}' in this gateway's store (no audit chain, no sessions)")
        if session_id is not None and (await store.get_session(tenant, session_id))[0] is None \
                and not await names_session(store.iter_audit(tenant), session_id):
            raise NotFound(f"no session '{session_id}' of tenant '{tenant}' in this gateway's store (nothing stored "
                           "and no audit entry names it): check the session id")
        redactor_for = await self.redactors(store, policies, tenant)

        protocols = await round_protocols(store, tenant)

        async def records() -> AsyncIterator[ExportRecord]:
            checked: str | None = None
            rounds = sessions.decrypted_rounds(tenant, session_id, since=since, until=until)
            try:
                async for row, messages in rounds:
                    if row.session_id != checked:  # the rows must be the ones the chain records
                        await sessions.check(tenant, row.session_id, for_round=False)
                        checked = row.session_id
                    yield ExportRecord(row.tenant, row.session_id, row.seq, row.created_at, row.request_id,
                                       row.policy_id, row.policy_hash, row.outcome, messages,
                                       hashlib.sha256(row.ct).hexdigest(),
                                       protocols.get((row.session_id, row.seq), "chat") if row.kind == "round"
                                       else None, kind=row.kind)
            finally:  # an export refused midway closes it now, not the event loop's shutdown (a traceback)
                await aclose(rounds)

        async def append_audit(fields: dict[str, Any]) -> AuditRow:
            changes = await store.transact(tenant, None, lambda cur: Changes(audit=[fields]))
            return changes.audit_rows[-1]

        async def sign_head() -> Checkpoint | None:
            return await self.checkpointer.checkpoint_tenant(tenant)

        filters = {"session_id": session_id, "since": since, "until": until}
        return await export_bundle(records(), out, tenant=tenant, fmt=fmt, redactor_for=redactor_for,
                                   append_audit=append_audit, sign_head=sign_head,
                                   iter_audit=lambda after: store.iter_audit(tenant, after_seq=after),
                                   filters=filters, progress=progress,
                                   head_seq=lambda: store.audit_head(tenant))


async def check_data(store: StoreReads, tenant: str, report: VerifyReport,
                     open_key: Callable[[DataKeyRow], object] | None = None) -> None:
    """Check *tenant*'s stored rows against its chain into *report* (``records``, ``notes``,
    ``first_error`` when it has none yet, ``errors`` and ``counts``); see
    ``gateway.evidence.verify_data``."""
    async def state_of(session_id: str) -> Any:
        return await store.get_session(tenant, session_id)

    ids = [s.session_id for s in await store.list_sessions(tenant)]
    versions = {row.hash: kept(row) for row in await store.policy_versions()}
    found = await verify_data(tenant, store.iter_audit(tenant), store.iter_rounds(tenant), state_of, ids, versions,
                              await store.quarantined(tenant), open_key)
    report.records = found.rounds
    report.notes.extend(found.notes)
    report.add(found.errors, found.counts)


def kept(row: PolicyVersionRow) -> Kept:
    """A kept policy version as verification needs it: whether its document proves its hash,
    and its retention."""
    try:
        return Kept(True, PolicyVersion.from_document(row).retention.days)
    except ValueError:  # does not hash to its key, or is not a policy document
        return Kept(False, None)


def policy_redactor(policy: Policy, secret: bytes) -> Redactor:
    """The redactor an export applies to *policy*'s records, under the tenant key *secret*."""
    keys = [*(policy.session.input_keys or []), *(policy.session.reply_keys or [])]
    return Redactor(policy.export.redact, secret, policy.export.detectors, keys=keys or None)


async def round_protocols(store: Store, tenant: str) -> dict[tuple[str, int], str]:
    """``(session id, round seq) -> protocol`` from the tenant's round audit entries (names only).
    A round whose entry names none was recorded before there were several (Chat Completions)."""
    out: dict[tuple[str, int], str] = {}
    async for row in store.iter_audit(tenant):
        try:
            doc = orjson.loads(row.body)
        except orjson.JSONDecodeError:
            continue  # an edited entry: the export's check of the chain names it
        if not isinstance(doc, dict):
            continue
        if doc.get("event") == "round" and isinstance(doc.get("round_seq"), int) and doc.get("protocol"):
            out[(str(doc.get("session_id")), doc["round_seq"])] = str(doc["protocol"])
    return out
