"""Redacted auditor exports that verify offline with only the audit public key.

**Input.** An async iterator of decrypted :class:`ExportRecord` (one per recorded round, grouped
by session in ``(session, seq)`` order, as ``Store.iter_rounds`` yields them) and a
``redactor_for(record) -> Redactor`` callable (see ``gateway.redact``); it is called with the
first record of each policy version (``policy_id``, ``policy_hash``), and whatever it raises
aborts the export. The manifest's ``redaction`` names each version by its policy id, and a
second version of the same id in one export by ``id@hash[:12]``.

**A bundle** is three files next to each other, written under temporary names and renamed
into place only when complete:

- ``OUT``: the records, in one of :data:`FORMATS`:

  - ``jsonl``: one record per line: ``tenant, session_id, seq, created_at`` (ISO 8601 UTC),
    ``request_id, policy_id, policy_hash, outcome, ciphertext_sha256, messages``;
  - ``csv``: one row per message (a record whose messages were all dropped gives one row with
    empty ``message_index, role, content``), header in :data:`CSV_COLUMNS`; content parts are
    written as JSON text. Cells are written as recorded: spreadsheet formulas are not escaped;
  - ``agently``: one Agently session JSON per line, ``{"id", "auto_resize": true,
    "full_context", "context_window": [], "memo": null, "session_settings": {}}``. A
    single-session export is therefore one JSON document that ``Session.load_json`` reads.

- ``OUT.audit.jsonl``: the audit entries' bodies, one per line, from the tenant's first entry
  (or, with a ``since`` filter, an entry at or before it and the first record) through the
  covering checkpoint. Each line's SHA-256 is that entry's hash. They
  are the tenant's entries (names, hashes and ids, never content), other sessions' included,
  because the chain can only be checked link by link.
- ``OUT.manifest.json``: tenant, filters, the records file's SHA-256, size and counts, the
  policy ids and hashes seen, the redaction each policy applied (and its SHA-256), the audit
  range and the export's own audit entry, and the covering checkpoint.

**Why it verifies.** Exporting appends an ``export`` audit entry whose ``detail`` holds the
records' SHA-256 and the redaction's SHA-256, then has the head signed. :func:`verify_bundle`
checks the records against the manifest, every audit link up to the checkpoint, the
checkpoint's signature, that the export entry vouches for these very records and rules, and
(``jsonl``/``csv``) that every record's ciphertext hash is that of a round entry (``round``,
``import`` or ``history``) of its session, with that entry's request id, policy id and version
hash, and outcome, and a time within :data:`~gateway.evidence.TIME_SLACK` of the entry's
(``gateway.evidence.round_columns``). It also proves completeness: every round entry of the bundle's
scope (the export entry's ``filters``) up to ``detail.through_seq`` (the chain head when the
records were read) has its record, unless an ``erasure`` or ``purge`` entry before the export
entry accounts for it. Round entries within ``TIME_SLACK`` seconds after ``since`` are
not required (an entry is sealed just after its round's ``created_at``). Writing streams the
records; checking them (:class:`RoundLabels`) holds one digest, time and set of columns per round
entry in the export's scope (the session's, or the tenant's), as verifying holds one digest per
round entry and per record.

**Before a round is redacted** its row's labels are checked against its round entry
(:class:`RoundLabels`): the redaction follows the row's policy id and version hash, so a row
relabelled to a version that redacts less is refused instead of exported in clear. The version
must be one the store keeps (``gateway.policy.versions.VersionMissing``, an integrity error, when
its row was deleted), unless the round's entry shows it was recorded before versions were kept.

Raises: ``ValueError`` for an unknown format; :class:`~gateway.errors.IntegrityError` when a
round's row disagrees with its audit entry, or when the live chain does not verify up to the
checkpoint (no bundle is left behind then); ``OSError`` for file errors.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.audit import (
    ChainVerifier,
    Checkpoint,
    PublicKeyLike,
    VerifyError,
    VerifyReport,
    aclose,
    load_public_key,
    row_from_body,
)
from gateway.errors import BadRequest, IntegrityError
from gateway.evidence import BINDING, ROUND_EVENTS, TIME_SLACK, relabelled, round_columns
from gateway.redact import Redactor
from gateway.session.model import agently_message
from gateway.store.base import AuditRow

if TYPE_CHECKING:
    from gateway.console.pool import WorkPool

FORMATS = ("jsonl", "csv", "agently")
BUNDLE_VERSION = "sessiongate-export/1"
CSV_COLUMNS = ("tenant", "session_id", "seq", "created_at", "request_id", "policy_id", "policy_hash",
               "outcome", "ciphertext_sha256", "message_index", "role", "content")

HeadSeq = Callable[[], Awaitable[int]]
"""The tenant's current audit chain head seq (0 for an empty chain)."""
AppendAudit = Callable[[dict[str, Any]], Awaitable[AuditRow]]
"""Appends one audit entry (fields per ``gateway.audit``) and returns the sealed row."""
SignHead = Callable[[], Awaitable[Checkpoint | None]]
"""Signs the tenant's current chain head now and returns that checkpoint."""
IterAudit = Callable[[int], AsyncIterator[AuditRow]]
"""The tenant's audit rows after the given seq, in order (``Store.iter_audit``)."""


@dataclass(frozen=True, slots=True)
class ExportRecord:
    """One decrypted round, before redaction. ``messages`` are ``{"role", "content"}`` dicts."""

    tenant: str
    session_id: str
    seq: int
    created_at: float
    request_id: str
    policy_id: str
    policy_hash: str
    outcome: str
    messages: list[dict[str, Any]]
    ciphertext_sha256: str
    protocol: str | None = None  # the wire protocol of the round (chat, responses, messages); None for imports
    kind: str = "round"  # the row's kind: round, import or history
    versioned: bool = True
    """Its audit entry binds rows, so the store must keep its policy version (``RoundLabels``
    clears it for a round recorded before: ``gateway.policy.versions``)."""


def check_range(since: float | None, until: float | None) -> None:
    """BadRequest unless *since* (inclusive) is before *until* (exclusive) when both are given: a
    reversed or empty range would export nothing and look like a tenant without records."""
    if since is not None and until is not None and since >= until:
        raise BadRequest(f"'since' ({_iso(since)}) must be before 'until' ({_iso(until)}): "
                         f"the range holds no time", code="invalid_time_range")


def bundle_paths(out: Path | str) -> tuple[Path, Path, Path]:
    """``(records, manifest, audit)`` paths of the bundle written at ``out``.

    ``out`` may also name the bundle's manifest (``OUT.manifest.json``).
    """
    out = Path(out)
    if out.name.endswith(".manifest.json"):
        out = out.with_name(out.name[: -len(".manifest.json")])
    return out, out.with_name(out.name + ".manifest.json"), out.with_name(out.name + ".audit.jsonl")


# --------------------------------------------------------------------------- writing records


class _HashingFile:
    """Writes bytes through to a binary file while hashing and counting them."""

    def __init__(self, out: BinaryIO) -> None:
        self.out, self.sha256, self.size = out, hashlib.sha256(), 0

    def write(self, data: bytes) -> None:
        self.out.write(data)
        self.sha256.update(data)
        self.size += len(data)


class RecordWriter:
    """Writes redacted records in one format, hashing the bytes as they go (constant memory)."""

    def __init__(self, out: BinaryIO, fmt: str) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.fmt = fmt
        self._out = _HashingFile(out)
        self.count = self.messages = self.sessions = 0
        self._session: str | None = None
        self._first_message = True
        self._csv_buffer = io.StringIO()
        self._csv = csv.writer(self._csv_buffer)
        if fmt == "csv":
            self._csv_row(CSV_COLUMNS)

    @property
    def sha256(self) -> str:
        return self._out.sha256.hexdigest()

    @property
    def size(self) -> int:
        return self._out.size

    def write(self, record: ExportRecord, messages: list[dict[str, Any]]) -> None:
        """Write one record with its already redacted ``messages``."""
        if record.session_id != self._session:
            self.sessions += 1
            self._switch_session(record.session_id)
        self.count += 1
        self.messages += len(messages)
        if self.fmt == "jsonl":
            self._out.write(orjson.dumps(_record_doc(record, messages)) + b"\n")
        elif self.fmt == "csv":
            self._write_csv(record, messages)
        else:
            for message in messages:
                self._out.write((b"" if self._first_message else b",") + orjson.dumps(agently_message(message)))
                self._first_message = False

    def close(self) -> None:
        """Finish the last session (agently); the file itself is the caller's to close."""
        self._switch_session(None)

    def _switch_session(self, session_id: str | None) -> None:
        if self.fmt != "agently":
            self._session = session_id
            return
        if self._session is not None:
            self._out.write(b'],"context_window":[],"memo":null,"session_settings":{}}\n')
        if session_id is not None:
            self._out.write(b'{"id":' + orjson.dumps(session_id) + b',"auto_resize":true,"full_context":[')
        self._session, self._first_message = session_id, True

    def _write_csv(self, record: ExportRecord, messages: list[dict[str, Any]]) -> None:
        head = (record.tenant, record.session_id, record.seq, _iso(record.created_at), record.request_id,
                record.policy_id, record.policy_hash, record.outcome, record.ciphertext_sha256)
        if not messages:
            self._csv_row((*head, "", "", ""))
        for index, message in enumerate(messages):
            content = message.get("content")
            text = content if isinstance(content, str) else orjson.dumps(content).decode()
            self._csv_row((*head, index, message.get("role", ""), text))

    def _csv_row(self, row: tuple[Any, ...]) -> None:
        self._csv.writerow(row)
        self._out.write(self._csv_buffer.getvalue().encode())
        self._csv_buffer.seek(0)
        self._csv_buffer.truncate()


def _record_doc(record: ExportRecord, messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"tenant": record.tenant, "session_id": record.session_id, "seq": record.seq,
            "created_at": _iso(record.created_at), "request_id": record.request_id,
            "policy_id": record.policy_id, "policy_hash": record.policy_hash, "outcome": record.outcome,
            "ciphertext_sha256": record.ciphertext_sha256, "messages": messages,
            **({"protocol": record.protocol} if record.protocol is not None else {})}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class Progress:
    """A record counter on stderr, drawn only when it is a terminal (at most 5 times a second)."""

    def __init__(self, stream: TextIO | None = None, label: str = "exported") -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.label, self.count, self._drawn = label, 0, 0.0

    def tick(self, n: int = 1) -> None:
        self.count += n
        if self.enabled and time.monotonic() - self._drawn >= 0.2:
            self._draw()

    def done(self) -> None:
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self) -> None:
        self._drawn = time.monotonic()
        self.stream.write(f"\r{self.label} {self.count:,} records")
        self.stream.flush()


@dataclass(slots=True)
class ExportSummary:
    """What :func:`write_records` wrote."""

    format: str
    sha256: str = ""
    bytes: int = 0
    count: int = 0
    messages: int = 0
    sessions: int = 0
    min_created_at: float | None = None
    policies: set[tuple[str, str]] = field(default_factory=set)
    redaction: dict[str, dict[str, Any]] = field(default_factory=dict)


BATCH = 64
"""Records redacted and written per hop to a worker thread."""


async def write_records(records: AsyncIterable[ExportRecord], out: BinaryIO, *, fmt: str,
                        redactor_for: Callable[[ExportRecord], Redactor],
                        progress: Progress | None = None) -> ExportSummary:
    """Redact and write ``records`` to ``out`` in ``fmt``; the summary feeds the manifest.
    Redacting and writing run in the console's worker threads (``gateway.console.pool``), a batch
    of records at a time, one batch of a tenant at a time: the event loop keeps serving model
    requests while a big tenant is exported."""
    pool = _work_pool()
    writer = RecordWriter(out, fmt)
    summary = ExportSummary(format=fmt)
    redactors: dict[tuple[str, str, bool], Redactor] = {}
    batch: list[tuple[ExportRecord, Redactor]] = []
    async for record in records:
        version = (record.policy_id, record.policy_hash)
        redactor = redactors.get((*version, record.versioned))
        if redactor is None:  # a round recorded since versions are kept asks again: its version must be kept
            redactor = redactors[(*version, record.versioned)] = redactor_for(record)
            if version not in summary.policies:
                name = record.policy_id
                if name in summary.redaction:  # another version of this policy in the same export
                    name = f"{record.policy_id}@{record.policy_hash[:12]}"
                summary.redaction[name] = redactor.describe()
        summary.policies.add(version)
        if summary.min_created_at is None or record.created_at < summary.min_created_at:
            summary.min_created_at = record.created_at
        batch.append((record, redactor))
        if len(batch) == BATCH:
            await pool.run(f"export:{record.tenant}", _write_batch, writer, batch)
            batch = []
            if progress is not None:
                progress.tick(BATCH)
    if batch:
        await pool.run(f"export:{batch[0][0].tenant}", _write_batch, writer, batch)
        if progress is not None:
            progress.tick(len(batch))
    writer.close()
    if progress is not None:
        progress.done()
    summary.sha256, summary.bytes = writer.sha256, writer.size
    summary.count, summary.messages, summary.sessions = writer.count, writer.messages, writer.sessions
    return summary


def _write_batch(writer: RecordWriter, batch: list[tuple[ExportRecord, Redactor]]) -> None:
    """Redact and write *batch* (in a worker thread)."""
    for record, redactor in batch:
        # a round without block boundaries was recorded before they were kept: its values were never vetted
        writer.write(record, redactor.redact_messages(record.messages, legacy=record.kind == "round"))


def _work_pool() -> WorkPool:
    """The console's worker threads (imported here: the console's package imports this module)."""
    from gateway.console.pool import work_pool

    return work_pool()


def redaction_sha256(redaction: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a manifest's ``redaction`` section."""
    return hashlib.sha256(orjson.dumps(redaction, option=orjson.OPT_SORT_KEYS)).hexdigest()


# --------------------------------------------------------------------------- the bundle


async def export_bundle(records: AsyncIterable[ExportRecord], out: Path | str, *, tenant: str, fmt: str,
                        redactor_for: Callable[[ExportRecord], Redactor], append_audit: AppendAudit,
                        sign_head: SignHead, iter_audit: IterAudit,
                        filters: Mapping[str, Any] | None = None, audit_slack: float = 3600.0,
                        progress: Progress | None = None, head_seq: HeadSeq | None = None) -> dict[str, Any]:
    """Write a verifiable bundle at ``out`` (see the module docstring); returns the manifest.

    ``audit_slack``: the bundle's audit entries start at the first entry whose time is at
    least this many seconds before the oldest record (a round's audit entry must not be older
    than the round by more than that). ``head_seq`` is asked before the records are read: the
    bundle promises every round entry up to it (without it: every entry before the export's).
    """
    records_path, manifest_path, audit_path = bundle_paths(out)
    partial = [p.with_name(f".{p.name}.partial") for p in (records_path, audit_path, manifest_path)]
    try:
        through = await head_seq() if head_seq is not None else None
        session_id = (filters or {}).get("session_id")
        labels = RoundLabels(iter_audit, session_id=session_id if isinstance(session_id, str) else None)
        checked = labels.checked(records)
        try:
            with _private(partial[0]) as f:
                summary = await write_records(checked, f, fmt=fmt, redactor_for=redactor_for, progress=progress)
                await _work_pool().run(f"export:{tenant}", _sync, f)  # a big file's fsync: off the loop too
        finally:  # left early (a refused round): closed now, innermost last, not by the event loop's shutdown
            await aclose(checked)
            await aclose(records)
        redaction = dict(sorted(summary.redaction.items()))
        filters_doc = dict(filters or {})
        detail = {"format": fmt, "records_sha256": summary.sha256, "records": summary.count,
                  "sessions": summary.sessions, "redaction_sha256": redaction_sha256(redaction),
                  "filters": filters_doc}
        if through is not None:
            detail["through_seq"] = through
        export_row = await append_audit({"event": "export", "detail": detail})
        checkpoint = await sign_head()
        if checkpoint is None or checkpoint.tenant != tenant or checkpoint.seq < export_row.seq:
            raise IntegrityError("no checkpoint covers the export's audit entry")
        start_time = (summary.min_created_at - audit_slack if summary.min_created_at is not None
                      else export_row.created_at)
        since = filters_doc.get("since")  # every round entry of the scope must be in the bundle
        start_time = min(start_time, since - audit_slack) if isinstance(since, int | float) else 0.0
        with _private(partial[1]) as f:
            audit = await _write_audit(iter_audit(0), f, tenant=tenant, start_time=start_time,
                                       start_seq=export_row.seq, checkpoint=checkpoint)
            _sync(f)
        manifest = {
            "bundle": BUNDLE_VERSION, "tenant": tenant, "created_at": _iso(time.time()),
            "filters": filters_doc,
            "records": {"file": records_path.name, "format": fmt, "sha256": summary.sha256,
                        "bytes": summary.bytes, "count": summary.count, "messages": summary.messages,
                        "sessions": summary.sessions},
            "policies": [{"policy_id": p, "policy_hash": h} for p, h in sorted(summary.policies)],
            "redaction": redaction, "redaction_sha256": redaction_sha256(redaction),
            "audit": {"file": audit_path.name, **audit, "export_seq": export_row.seq},
            "checkpoint": checkpoint.to_dict(),
        }
        with _private(partial[2]) as f:
            f.write(orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
            _sync(f)
        for tmp, final in zip(partial, (records_path, audit_path, manifest_path), strict=True):
            os.replace(tmp, final)
        return manifest
    finally:
        for tmp in partial:
            tmp.unlink(missing_ok=True)


async def names_session(rows: AsyncIterable[AuditRow], session_id: str) -> bool:
    """Whether an audit entry among *rows* (a tenant's chain) names session *session_id*: an
    export of a session its tenant never had would write an empty bundle and an export entry
    for a misspelt id, while an erased session's entries stay and its id still exports them."""
    needle = orjson.dumps(session_id)
    try:
        async for row in rows:
            if needle not in row.body:
                continue
            try:
                doc = orjson.loads(row.body)
            except orjson.JSONDecodeError:
                continue  # an edited entry: the export's check of the chain names it
            if isinstance(doc, dict) and doc.get("session_id") == session_id:
                return True
        return False
    finally:
        await aclose(rows)


class RoundLabels:
    """A round row's labels checked against its audit entry before its redaction is chosen.

    The redaction applied to a round follows the policy id and version hash in its row, which are
    plaintext columns anyone with database access can edit; verification finds such an edit
    (``round_relabelled``), but only after an export has shown the round under another version's
    redaction. So every round read for an export or the console is first matched to its round
    entry (``round``, ``import`` or ``history`` of its session, by ciphertext hash, as
    :func:`verify_bundle` matches records) and its columns compared with the entry's
    (:func:`gateway.evidence.round_columns`, :func:`gateway.evidence.relabelled`). A round no
    entry records, or whose kind, request id, policy id, version hash, outcome or time (beyond
    :data:`~gateway.evidence.TIME_SLACK`) differ from its entry's, is refused with
    :class:`~gateway.errors.IntegrityError` naming tenant, session, round and entry.

    The chain is read once (only *session_id*'s entries are kept when given: one per round) and
    read on from where it stopped when a round's entry is not found yet: a round committed after
    the first read has its entry committed with it. The chain's own integrity is not judged here
    (exports check it up to the covering checkpoint, ``audit verify`` in full).
    """

    def __init__(self, iter_audit: IterAudit, *, session_id: str | None = None) -> None:
        self._iter_audit = iter_audit
        self._session_id = session_id
        self._needle = orjson.dumps(session_id) if session_id is not None else None
        self._entries: dict[tuple[str, str], tuple[int, float, tuple[str | None, ...], bool]] = {}
        self._after = 0

    async def _read(self) -> None:
        """Fold the entries after the last one read."""
        rows = self._iter_audit(self._after)
        try:
            async for row in rows:
                self._after = max(self._after, row.seq)
                if self._needle is not None and self._needle not in row.body:
                    continue  # another session's entry (a cheap test before parsing)
                doc = orjson.loads(row.body)
                sid, digest = doc.get("session_id"), doc.get("ciphertext_sha256")
                if doc.get("event") not in ROUND_EVENTS or not isinstance(sid, str) or not isinstance(digest, str):
                    continue
                if self._session_id is None or sid == self._session_id:
                    columns = tuple(None if c is None else sys.intern(c) for c in round_columns(doc))
                    bound = isinstance(doc.get(BINDING), dict)
                    self._entries[(sys.intern(sid), digest)] = (row.seq, row.created_at, columns, bound)
        finally:
            await aclose(rows)

    async def problem(self, *, tenant: str, session_id: str, seq: int, ciphertext_sha256: str,
                      columns: Mapping[str, Any], created_at: float) -> str | None:
        """What is wrong with the round's labels (for the operator and the auditor: tenant,
        session, round, entry; never content); None when its entry vouches for them.
        *columns* holds the row's ``kind``, ``request_id``, ``policy_id``, ``policy_hash`` and
        ``outcome`` (those it lacks are not compared)."""
        key = (session_id, ciphertext_sha256)
        if key not in self._entries:
            await self._read()
        where = f"tenant {tenant}, session {session_id}, round {seq}"
        entry = self._entries.get(key)
        if entry is None:
            return (f"{where}: no audit entry records this round (its row was inserted, moved here or its "
                    "ciphertext replaced outside the gateway)")
        how = relabelled(entry[2], entry[1], columns, created_at)
        if how is not None:
            return f"{where}: the stored round is the one audit entry {entry[0]} records, but {how}: its row was edited"
        return None

    def versioned(self, session_id: str, ciphertext_sha256: str) -> bool:
        """Whether the round's entry (after :meth:`problem` found it) binds rows: recorded since
        policy versions are kept, so its version must be kept (True for a round not found)."""
        entry = self._entries.get((session_id, ciphertext_sha256))
        return entry is None or entry[3]

    async def checked(self, records: AsyncIterable[ExportRecord]) -> AsyncIterator[ExportRecord]:
        """*records*, each checked (see the class docstring) before it is yielded, with
        ``versioned`` from its entry."""
        async for record in records:
            problem = await self.problem(tenant=record.tenant, session_id=record.session_id, seq=record.seq,
                                         ciphertext_sha256=record.ciphertext_sha256,
                                         columns=record_columns(record), created_at=record.created_at)
            if problem is not None:
                raise IntegrityError(problem)
            if not self.versioned(record.session_id, record.ciphertext_sha256):
                record = replace(record, versioned=False)
            yield record


def record_columns(record: Any) -> dict[str, Any]:
    """The columns of a round (an :class:`ExportRecord` or a ``RoundRow``) its entry vouches for;
    a record's ``kind`` is not carried (its outcome and entry tell it)."""
    names = ("kind", "request_id", "policy_id", "policy_hash", "outcome")
    return {name: getattr(record, name) for name in names if hasattr(record, name)}


def _private(path: Path) -> BinaryIO:
    """A new file at *path* that only its owner can read or write (0600, whatever the umask);
    a file left there by an earlier run is replaced."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    return os.fdopen(fd, "wb")


def _sync(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())


async def _write_audit(rows: AsyncIterator[AuditRow], out: BinaryIO, *, tenant: str, start_time: float,
                       start_seq: int, checkpoint: Checkpoint) -> dict[str, Any]:
    """Copy entries from the first one at ``start_time`` (or ``start_seq``) through the
    checkpoint, checking their links as they pass. Raises ``IntegrityError`` when they break."""
    verifier: ChainVerifier | None = None
    first: AuditRow | None = None
    count = 0
    try:
        async for row in rows:
            if row.seq > checkpoint.seq:
                break
            if first is None:
                if row.created_at < start_time and row.seq < start_seq:
                    continue
                first = row
                verifier = ChainVerifier(tenant, after_seq=row.seq - 1, after_hash=None)
            assert verifier is not None
            if not verifier.feed(row):
                break
            out.write(row.body + b"\n")
            count += 1
    finally:
        await aclose(rows)
    if verifier is None or first is None:
        raise IntegrityError(f"audit chain of tenant {tenant} ends before checkpoint {checkpoint.seq}")
    report = verifier.finish()
    if not report.ok or report.last_seq != checkpoint.seq or report.head_hash != checkpoint.hash:
        detail = report.summary() if not report.ok else f"chain head does not match checkpoint {checkpoint.seq}"
        raise IntegrityError(detail)
    return {"count": count, "first_seq": first.seq, "last_seq": report.last_seq,
            "first_prev_hash": first.prev_hash}


# --------------------------------------------------------------------------- offline verification


class _BundleError(Exception):
    def __init__(self, kind: str, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.error = VerifyError(seq=seq, kind=kind, message=message)


def verify_bundle(bundle: Path | str, public_key: PublicKeyLike) -> VerifyReport:
    """Verify an export bundle offline with only the audit public key (PEM bytes/text, a PEM
    file ``Path``, or a key). ``bundle`` is the records file or its manifest.

    Returns a report whose ``first_error.kind`` is one of ``gateway.audit.ERROR_KINDS`` or
    ``missing_file``, ``malformed``, ``records_altered``, ``manifest_mismatch``,
    ``not_covered``, ``record_not_covered``, ``record_relabelled``, ``record_missing``. Raises
    ``ConfigError`` for an unreadable key, ``OSError`` for a bundle file that exists but cannot be
    read (a missing one is ``missing_file``).
    """
    key = load_public_key(public_key)
    records_path, manifest_path, audit_path = bundle_paths(bundle)
    report = VerifyReport(tenant="")
    try:
        manifest = _load_manifest(manifest_path)
        report.tenant = manifest["tenant"]
        try:
            checkpoint = Checkpoint.from_dict(manifest["checkpoint"])
        except ValueError as exc:
            raise _BundleError("malformed", f"manifest checkpoint: {exc}") from exc
        # the audit entries first, so a failure of the records file comes with the entries read
        rounds, required = _check_audit(audit_path, manifest, checkpoint, key, report)
        if report.ok:
            _check_records_file(records_path, manifest)
            _check_records(records_path, manifest, rounds, required, report)
    except _BundleError as exc:
        report.first_error = exc.error
    return report


def _load_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = orjson.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise _BundleError("missing_file", f"no manifest at {path}") from exc
    except orjson.JSONDecodeError as exc:
        raise _BundleError("malformed", f"manifest is not JSON: {exc}") from exc
    ok = (isinstance(manifest, dict) and manifest.get("bundle") == BUNDLE_VERSION
          and isinstance(manifest.get("tenant"), str)
          and all(isinstance(manifest.get(k), dict) for k in ("records", "audit", "checkpoint", "redaction")))
    if not ok:
        raise _BundleError("malformed", f"{path.name} is not a {BUNDLE_VERSION} manifest")
    return manifest


def _check_records_file(path: Path, manifest: dict[str, Any]) -> None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError as exc:
        raise _BundleError("missing_file", f"no records file at {path}") from exc
    if digest.hexdigest() != manifest["records"].get("sha256"):
        raise _BundleError("records_altered", f"{path.name} does not match the SHA-256 in the manifest")
    if redaction_sha256(manifest["redaction"]) != manifest.get("redaction_sha256"):
        raise _BundleError("manifest_mismatch", "the manifest's redaction section does not match its hash")


@dataclass(frozen=True, slots=True)
class _RoundEntry:
    seq: int
    session_id: str
    round_seq: int | None
    digest: str
    time: float


Rounds = dict[tuple[Any, str], tuple[int, float, tuple[str | None, ...]]]
"""Round entries by (session id, ciphertext hash): the entry's seq, its time and its
:func:`~gateway.evidence.round_columns`."""


class _Promised:
    """Round entries a bundle must hold records for, net of erasures and purges (in order)."""

    def __init__(self) -> None:
        self.by_session: dict[str, dict[int | str, _RoundEntry]] = {}

    def add(self, row: AuditRow, doc: dict[str, Any]) -> None:
        sid, event = doc.get("session_id"), doc.get("event")
        if not isinstance(sid, str):
            return
        if event in ROUND_EVENTS and isinstance(doc.get("ciphertext_sha256"), str):
            round_seq = doc.get("round_seq") if isinstance(doc.get("round_seq"), int) else None
            entry = _RoundEntry(row.seq, sid, round_seq, doc["ciphertext_sha256"], row.created_at)
            held = self.by_session.setdefault(sid, {})
            key: int | str = round_seq if round_seq is not None else entry.digest
            if key in held:  # a round number used again with no erasure between: both stay required
                earlier = held.pop(key)
                held[f"reused:{earlier.seq}"] = earlier
            held[key] = entry
            return
        detail = doc.get("detail") or {}
        if event == "erasure" or (event == "purge" and (detail.get("session_erased")
                                                        or not isinstance(detail.get("seqs"), list))):
            self.by_session.pop(sid, None)
        elif event == "purge":
            held = self.by_session.get(sid, {})
            for seq in detail["seqs"]:
                held.pop(seq, None)

    def required(self, detail: dict[str, Any], export_seq: int) -> list[_RoundEntry]:
        """The entries in the export's scope (its signed ``filters``) up to ``through_seq``."""
        through = detail.get("through_seq")
        through = through if isinstance(through, int) else export_seq - 1
        filters = detail.get("filters") or {}
        sid, since, until = filters.get("session_id"), filters.get("since"), filters.get("until")
        out = []
        for entries in self.by_session.values():
            for e in entries.values():
                if e.seq > through or (sid is not None and e.session_id != sid):
                    continue
                if isinstance(since, int | float) and e.time < since + TIME_SLACK:
                    continue
                if isinstance(until, int | float) and e.time >= until:
                    continue
                out.append(e)
        return sorted(out, key=lambda e: e.seq)


def _check_audit(path: Path, manifest: dict[str, Any], checkpoint: Checkpoint, key: Ed25519PublicKey,
                 report: VerifyReport) -> tuple[Rounds, list[_RoundEntry]]:
    """Verify the entries up to the checkpoint; returns the round entries by (session,
    ciphertext hash) and those the bundle must hold records for."""
    tenant, audit = manifest["tenant"], manifest["audit"]
    if checkpoint.tenant != tenant:
        raise _BundleError("manifest_mismatch", "the checkpoint is for another tenant")
    first_seq, export_seq = audit.get("first_seq"), audit.get("export_seq")
    verifier = ChainVerifier(tenant, checkpoints=[checkpoint], public_key=key,
                             after_seq=(first_seq or 1) - 1, after_hash=None)
    rounds: Rounds = {}
    promised = _Promised()
    export_detail: dict[str, Any] | None = None
    with contextlib.closing(_audit_rows(path)) as rows:
        for row in rows:
            if row.seq > checkpoint.seq:
                raise _BundleError("not_covered", f"entry {row.seq} lies after the checkpoint "
                                   f"({checkpoint.seq})", row.seq)
            if not verifier.feed(row):
                break
            doc = orjson.loads(row.body)
            if doc.get("event") in ROUND_EVENTS and doc.get("ciphertext_sha256"):
                rounds[(doc.get("session_id"), doc["ciphertext_sha256"])] = (row.seq, row.created_at,
                                                                              round_columns(doc))
            elif row.seq == export_seq and doc.get("event") == "export":
                export_detail = doc.get("detail") or {}
            if isinstance(export_seq, int) and row.seq < export_seq:
                promised.add(row, doc)
    result = verifier.finish()
    report.entries, report.first_seq, report.last_seq = result.entries, result.first_seq, result.last_seq
    report.head_hash, report.checkpoints = result.head_hash, result.checkpoints
    report.notes.extend(result.notes)  # that the entries' MACs could not be checked offline
    if result.first_error is not None:
        report.first_error = result.first_error
        return rounds, []
    if result.first_seq != first_seq:
        raise _BundleError("gap", f"the audit entries start at {result.first_seq}, the manifest says {first_seq}",
                           first_seq)
    if result.checkpoints == 0:
        raise _BundleError("not_covered", "no entry in the bundle is covered by its checkpoint")
    _check_export_entry(export_detail, manifest, export_seq)
    assert export_detail is not None and isinstance(export_seq, int)
    if "through_seq" not in export_detail:
        report.notes.append("the export entry names no through_seq (an older gateway): completeness was "
                            "checked against every round entry before it")
    return rounds, promised.required(export_detail, export_seq)


def _audit_rows(path: Path) -> Generator[AuditRow, None, None]:
    try:
        f = path.open("rb")
    except FileNotFoundError as exc:
        raise _BundleError("missing_file", f"no audit file at {path}") from exc
    with f:
        for number, line in enumerate(f, start=1):
            try:
                yield row_from_body(line.rstrip(b"\n"))
            except ValueError as exc:
                raise _BundleError("malformed", f"{path.name} line {number} is not an audit entry") from exc


def _check_export_entry(detail: dict[str, Any] | None, manifest: dict[str, Any], seq: int | None) -> None:
    if detail is None:
        raise _BundleError("manifest_mismatch", f"entry {seq} is not the export entry the manifest names", seq)
    records = manifest["records"]
    claims = {"records_sha256": records.get("sha256"), "records": records.get("count"),
              "format": records.get("format"), "redaction_sha256": manifest.get("redaction_sha256")}
    for name, value in claims.items():
        if detail.get(name) != value:
            raise _BundleError("manifest_mismatch",
                               f"the export's audit entry {seq} does not vouch for the manifest's {name}", seq)


def _check_records(path: Path, manifest: dict[str, Any], rounds: Rounds,
                   required: list[_RoundEntry], report: VerifyReport) -> None:
    fmt, tenant = manifest["records"].get("format"), manifest["tenant"]
    if fmt == "agently":
        report.records = manifest["records"].get("count")
        report.notes.append("agently format carries no per-record hashes: the records are bound to the "
                            "chain by their file hash only")
        if isinstance(report.records, int) and report.records < len(required):
            e = required[0]
            raise _BundleError("record_missing", f"{report.records} records for {len(required)} round entries in "
                               f"the bundle's scope (the first is session {e.session_id}, entry {e.seq})", e.seq)
        return
    count = 0
    seen: set[tuple[str, str]] = set()
    for record in _record_refs(path, fmt):
        count += 1
        session_id, seq, digest = record["session_id"], record["seq"], record["ciphertext_sha256"]
        entry = rounds.get((session_id, digest))
        if record["tenant"] != tenant or entry is None:
            raise _BundleError("record_not_covered",
                               f"record {count} (session {session_id}, round {seq}) matches no round "
                               "entry in the bundle's audit entries")
        how = relabelled(entry[2], entry[1], record, _timestamp(record["created_at"]))
        if how is not None:
            raise _BundleError("record_relabelled", f"record {count} (session {session_id}, round {seq}) is the "
                               f"round audit entry {entry[0]} records, but {how}", entry[0])
        seen.add((session_id, digest))
    report.records = count
    if count != manifest["records"].get("count"):
        raise _BundleError("manifest_mismatch", f"{count} records, the manifest says "
                           f"{manifest['records'].get('count')}")
    for e in required:
        if (e.session_id, e.digest) not in seen:
            at = f"round {e.round_seq}" if e.round_seq is not None else "an imported round"
            raise _BundleError("record_missing",
                               f"tenant {tenant}, session {e.session_id}, {at}: audit entry {e.seq} records it, "
                               "it lies in the export's scope, and the bundle holds no record of it (left out)",
                               e.seq)


def _record_refs(path: Path, fmt: str) -> Iterator[dict[str, Any]]:
    """Every record's fields but its messages (one per round: a ``csv`` round's rows are one
    record), streaming."""
    try:
        if fmt == "jsonl":
            with path.open("rb") as f:
                for line in f:
                    doc = orjson.loads(line)
                    doc.pop("messages", None)
                    if not all(name in doc for name in _RECORD_REFS):
                        raise KeyError("a record lacks a field the check reads")
                    yield doc
        elif fmt == "csv":
            csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
            with path.open(newline="", encoding="utf-8") as f:
                last = None
                for row in csv.DictReader(f):
                    ref = (row["tenant"], row["session_id"], row["seq"], row["ciphertext_sha256"])
                    if ref != last:
                        yield {k: v for k, v in row.items() if k not in ("message_index", "role", "content")}
                    last = ref
        else:
            raise _BundleError("malformed", f"unknown records format {fmt!r}")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, csv.Error, UnicodeDecodeError) as exc:
        raise _BundleError("malformed", f"{path.name} is not a valid {fmt} export") from exc


_RECORD_REFS = ("tenant", "session_id", "seq", "created_at", "ciphertext_sha256")
"""The fields of a record the offline check reads."""


def _timestamp(text: Any) -> float:
    """A record's ``created_at`` (ISO 8601) as a Unix time."""
    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except ValueError as exc:
        raise _BundleError("malformed", f"record time {text!r} is not ISO 8601") from exc


# --- private folders for bundles in the making -----------------------------------------------

PRIVATE_FOLDER_KINDS = ("console", "export")
"""``$TMPDIR/sessiongate-<kind>-*``: the console's export jobs, ``/admin/export`` on its way out."""
OWNER_FILE = ".owner"


class PrivateFolder:
    """A private temporary folder (``$TMPDIR/sessiongate-<kind>-<random>``, mode 0700) for an
    export bundle, which holds decrypted (redacted) text in plaintext. The process that made it
    holds a lock (``flock``) on its ``.owner`` file for as long as it lives, so after a crash
    (``kill -9``) the next gateway's :func:`sweep_private_folders` can tell it was left behind
    and remove it, while the folders of other live processes sharing the machine are left
    alone. :meth:`remove` deletes it (also on leaving a ``with`` block)."""

    def __init__(self, kind: str) -> None:
        assert kind in PRIVATE_FOLDER_KINDS
        self.path = Path(tempfile.mkdtemp(prefix=f"sessiongate-{kind}-"))  # 0700
        claim = self.path / f".owner.{os.getpid()}"
        self._fd: int | None = os.open(claim, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        claim.rename(self.path / OWNER_FILE)  # only a locked owner file is ever seen by a sweep

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> PrivateFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def sweep_private_folders(root: Path | None = None) -> list[Path]:
    """Remove the :class:`PrivateFolder` folders under *root* (default ``$TMPDIR``) whose owning
    process is gone (its lock on ``.owner`` released); returns them. A folder whose owner still
    holds the lock, or without an owner file (being made, or from a gateway before owner files),
    is left alone."""
    removed = []
    base = Path(root) if root is not None else Path(tempfile.gettempdir())
    for kind in PRIVATE_FOLDER_KINDS:
        for folder in base.glob(f"sessiongate-{kind}-*"):
            try:
                fd = os.open(folder / OWNER_FILE, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its owner is alive
            else:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
            finally:
                os.close(fd)
    return removed
