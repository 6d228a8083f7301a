"""The tamper-evident audit trail: a hash chain per tenant, signed checkpoints, verification.

**Entries.** The store calls :func:`seal_entry` inside the transaction that writes the round
(it knows the tenant's current head). An entry's ``body`` is canonical JSON (orjson, sorted
keys) of ``tenant``, ``seq``, ``time``, ``prev_hash`` and the fields below; its ``hash`` is
``sha256(body)`` in hex, and the next entry's ``prev_hash`` is that hash (the first entry's is
:data:`GENESIS`). Entry schema (every field optional except ``event``; unknown names are
refused so that no value can slip in under a new name):

=====================  ===============================================================
``event``              ``round``, ``proxy``, ``policy_reload``, ``key_rotation``,
                       ``erasure``, ``export``, ``import``, ``reset``, ``bounding``,
                       ``purge``, ``quarantine``, ``refusal``, ``release``, ``history`` (a
                       chat-history ``add``/``set``, ``detail.op``), ``memo`` (a memo write),
                       ``console_read`` (an auditor read a session in the console),
                       ``verify`` (an auditor verified the chain in the console),
                       ``rewrap`` (a session's data key re-wrapped under the primary
                       master key, ``detail.from``/``to``) or ``erasure_completed``
``request_id``         the gateway's request id
``session_id``         the session the event concerns (None for tenant-wide events)
``policy_id``          the policy that applied, and ``policy_hash`` its version hash
``route``              the client route, e.g. ``/v1/chat/completions``
``protocol``           the wire protocol of a round: ``chat``, ``responses`` or ``messages``
``model``              the requested model name
``outcome``            ``completed``, ``incomplete``, ``upstream_error`` or ``refused``
``input_keys``         the *names* of the recorded request keys (never values);
``reply_keys``         likewise for the reply
``bytes_in``           sizes of the recorded user and assistant content, in bytes;
``bytes_out``
``ciphertext_sha256``  SHA-256 hex of the stored round ciphertext (not the plaintext, so the
                       chain still verifies after the session's data key is erased)
``detail``             free-form names and hashes for administrative events (a ``purge``
                       lists the deleted round seqs in ``detail.seqs``)
``round_seq``          the session sequence number of the round (``round`` and ``import``)
``state``              the session's rows after the write: ``{sha256, version, next_seq,
                       rounds, data_key}``, added by the store (``gateway.evidence``)
``truncated``          true when the reply was over the recorded-reply cap (round ``incomplete``)
``record_failed``      on a round whose record step failed: the exception's type name (never
                       its text); the round is ``incomplete`` and recorded no text
=====================  ===============================================================

**Entry MACs.** A chain of plain SHA-256 links needs no secret: anyone who can write the
database can append an entry at the head (an ``erasure`` that passes off a deletion) and rehash
nothing. So the store seals every entry with an :class:`EntryKey` as well, an HMAC-SHA256 key
derived (HKDF) from the Ed25519 checkpoint signing key, which is kept in a file apart from the
database and never in it: ``body`` then also holds ``mac``, ``{"hmac_sha256": HMAC of the
canonical JSON of every other field, "key_id": the signing key's key id}``, and ``hash`` covers
it too. Every process that writes the chain (each worker, each replica, each CLI command) derives
the same key from the same signing key file. Verification with the key (:class:`ChainVerifier`
with ``entry_key``) fails an entry whose MAC does not hold (``forged``), and an entry without a
MAC under that key (``unauthenticated``) unless it is *legacy*: written before MACs existed,
which only a signature the database writer cannot make can say. So checkpoints signed by a
gateway that seals MACs are marked (``macs``, in the signed bytes); an entry without a MAC (or
under an earlier signing key) is legacy only when a checkpoint *without* the mark (signed before
entry MACs) for its tenant is at or after its seq, and no keyed entry comes before it
(:func:`legacy_bound`); a note names such entries. A tenant with no old-format checkpoint (one
that first wrote after the upgrade) has no legacy entries. Without the key (an auditor offline
with the public key alone) MACs cannot be checked; the signed checkpoints still commit to every
entry they cover, and the :class:`Checkpointer` checks every entry's MAC before it signs a head.

**Checkpoints.** A :class:`Checkpointer` signs a tenant's chain head (tenant, seq, hash, time)
with an Ed25519 key (:class:`Signer`, a PEM file kept apart from the store) every N entries or
T seconds, and appends it to a JSON-lines file (:class:`CheckpointLog`) an auditor can keep.
Before it signs a head it checks every entry since the last head it checked (links and MACs,
reading the store for entries other processes wrote); a tenant whose chain fails is never
signed again by that process, logged (``checkpoint_refused``) and reported (``/readyz`` lists it,
``sessiongate_audit_chain_refused``); the gateway goes on serving every tenant.
Signatures are made per checkpoint, never per entry. Signed bytes:
``b"sessiongate-checkpoint-v1\\n" + canonical JSON of {hash, key_id, [macs,] seq, tenant, time}``;
``key_id`` is the first 16 hex digits of the SHA-256 of the raw public key; ``macs`` is 1 on every
checkpoint a gateway that seals entry MACs signs, and absent on older ones.

**Verification.** :func:`verify_chain` (and :func:`averify_chain` for an async iterator)
streams a tenant's rows in sequence order, recomputes every hash and link, and checks the
checkpoints that fall in the range. It stops at the first problem and names it in a
:class:`VerifyReport` (``kind`` is one of :data:`ERROR_KINDS`). Memory is constant in the
number of rows. A column (``seq``, ``prev_hash``, ``tenant``, ``created_at``) that disagrees
with the body counts as an edit; ``created_at`` is compared within 1 ms because the body is
authoritative and backends may round times.

Raises: :class:`~gateway.errors.ConfigError` for an unreadable, malformed or too-open key or
checkpoint file; ``ValueError`` for a misuse (unknown entry field, checkpoints without a key).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import stat
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import orjson
import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.background import Backoff, Health
from gateway.errors import ConfigError, IntegrityError, cannot_create
from gateway.logs import error_cause
from gateway.store.base import AuditRow

_log = structlog.get_logger("gateway.audit")
CHECKPOINTER = "checkpointer"
"""The checkpointer's task name in ``Health`` (``/readyz``, ``/metrics``)."""
RETRY = Backoff()

GENESIS = "0" * 64
"""``prev_hash`` of a tenant's first entry."""

EVENTS = frozenset({"round", "proxy", "policy_reload", "key_rotation", "erasure", "export", "import", "reset",
                    "bounding", "purge", "quarantine", "refusal", "release", "console_read", "verify",
                    "erasure_completed", "history", "memo", "rewrap"})
ENTRY_FIELDS = frozenset({
    "event", "request_id", "session_id", "policy_id", "policy_hash", "route", "model", "outcome",
    "input_keys", "reply_keys", "bytes_in", "bytes_out", "ciphertext_sha256", "detail",
    "ended_by", "upstream_status", "recorded", "round_seq", "messages", "state", "truncated",
    "record_failed", "protocol",
})
_RESERVED = frozenset({"tenant", "seq", "time", "prev_hash", "mac"})
MAC_FIELD = "mac"
"""The body field that holds an entry's MAC (set by :func:`seal_entry`, never by a caller)."""

ERROR_KINDS = (
    "edited",               # body does not match its hash, or a column disagrees with the body
    "gap",                  # entries are missing
    "reordered",            # an entry is out of place
    "inserted",             # an entry that is not part of the chain (duplicate seq, other tenant)
    "bad_link",             # prev_hash is not the previous entry's hash
    "truncated",            # the chain ends before a checkpoint's seq
    "bad_signature",        # a checkpoint's signature does not hold under the public key
    "checkpoint_mismatch",  # the entry at a checkpoint's seq is not the one that was signed
    "forged",               # the entry's MAC does not hold under the gateway's audit key
    "unauthenticated",      # no MAC under the gateway's key, after an entry that had one
    # the stored data against the chain (``gateway.evidence``)
    "round_missing", "round_unrecorded", "round_mismatch", "state_missing", "state_mismatch",
    "state_unrecorded", "round_relabelled", "policy_version_missing", "policy_version_altered",
    "quarantine_lifted", "quarantine_unrecorded", "purge_premature", "data_key_missing", "data_key_mismatch",
    "data_key_altered", "erasure_unmatched",
)

PublicKeyLike = Ed25519PublicKey | bytes | str | Path
"""A public key object, PEM bytes or text, or the path of a PEM file."""

_CHECKPOINT_DOMAIN = b"sessiongate-checkpoint-v1\n"
_ENTRY_MAC_INFO = b"sessiongate-audit-entry-mac-v1"
_TIME_TOLERANCE = 1e-3


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True, slots=True)
class EntryKey:
    """The secret that authenticates audit entries (HMAC-SHA256): see "Entry MACs" in the module
    docstring. ``key_id`` is the signing key's (public) key id, which names it in each MAC."""

    key_id: str
    secret: bytes = field(repr=False)

    def tag(self, unsigned: bytes) -> str:
        """The MAC of an entry's canonical JSON without its ``mac`` field, in hex."""
        return hmac.new(self.secret, unsigned, hashlib.sha256).hexdigest()

    def check(self, doc: Mapping[str, Any]) -> str:
        """How the parsed entry *doc* stands under this key: ``"keyed"`` (its MAC holds),
        ``"forged"`` (a MAC under this key that does not hold, or a ``mac`` field that is not
        one), ``"other"`` (a MAC under another key) or ``"absent"`` (no MAC)."""
        mac = doc.get(MAC_FIELD)
        if mac is None:
            return "absent"
        if not (isinstance(mac, dict) and mac.keys() == {"hmac_sha256", "key_id"}
                and isinstance(mac["hmac_sha256"], str) and isinstance(mac["key_id"], str)):
            return "forged"
        if mac["key_id"] != self.key_id:
            return "other"
        unsigned = orjson.dumps({k: v for k, v in doc.items() if k != MAC_FIELD}, option=orjson.OPT_SORT_KEYS)
        return "keyed" if hmac.compare_digest(self.tag(unsigned), mac["hmac_sha256"]) else "forged"


def seal_entry(tenant: str, seq: int, prev_hash: str, created_at: float,
               fields: Mapping[str, Any], key: EntryKey | None = None) -> AuditRow:
    """Build the audit row ``seq`` of ``tenant`` that follows the entry hashed ``prev_hash``,
    with a MAC under *key* (every store that writes for a gateway passes one; an entry without
    is a legacy entry, see the module docstring).

    ``fields`` follow the entry schema in the module docstring (names and hashes only).
    Raises ``ValueError`` for an unknown field name or event, ``TypeError`` for a value that
    is not JSON-serialisable.
    """
    unknown = fields.keys() - ENTRY_FIELDS
    if unknown:
        raise ValueError(f"unknown audit entry field(s): {', '.join(sorted(unknown))}")
    if fields.get("event") not in EVENTS:
        raise ValueError(f"audit entry event must be one of {sorted(EVENTS)}")
    doc: dict[str, Any] = {**fields, "tenant": tenant, "seq": seq, "time": created_at, "prev_hash": prev_hash}
    body = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    if key is not None:
        doc[MAC_FIELD] = {"hmac_sha256": key.tag(body), "key_id": key.key_id}
        body = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    return AuditRow(tenant=tenant, seq=seq, created_at=created_at, body=body,
                    prev_hash=prev_hash, hash=hashlib.sha256(body).hexdigest())


def entry_fields(row: AuditRow) -> dict[str, Any]:
    """The parsed body of ``row`` (schema fields plus tenant, seq, time, prev_hash)."""
    return orjson.loads(row.body)


def row_from_body(body: bytes) -> AuditRow:
    """Rebuild an audit row from its body alone (as kept in an export bundle).

    The hash is recomputed, so only the links and checkpoints can tell whether it is genuine.
    Raises ``ValueError`` when the body is not an entry.
    """
    try:
        doc = orjson.loads(body)
        return AuditRow(tenant=doc["tenant"], seq=doc["seq"], created_at=doc["time"], body=body,
                        prev_hash=doc["prev_hash"], hash=hashlib.sha256(body).hexdigest())
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError("not an audit entry") from exc


# --------------------------------------------------------------------------- keys


def make_private_dir(path: Path) -> None:
    """Create ``path`` and any missing parents with mode 0700; existing ones are left alone."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):
            p.mkdir(mode=0o700)


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the SHA-256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(source: PublicKeyLike) -> Ed25519PublicKey:
    """An Ed25519 public key from a key object, PEM bytes/text, or a PEM file path.

    Raises ``ConfigError`` when it is not an Ed25519 public key in PEM form.
    """
    if isinstance(source, Ed25519PublicKey):
        return source
    where = None
    if isinstance(source, Path):
        where = str(source)
        try:
            source = source.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read public key: {exc.strerror}", file=where) from exc
    data = source.encode() if isinstance(source, str) else source
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError("not a PEM public key", file=where) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError("not an Ed25519 public key", file=where)
    return key


class Signer:
    """The checkpoint signing key: Ed25519, kept in a PEM (PKCS#8) file apart from the store."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_fingerprint(self.public_key)
        raw = private_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                        serialization.NoEncryption())
        self.entry_key = EntryKey(self.key_id, HKDF(hashes.SHA256(), 32, salt=None, info=_ENTRY_MAC_INFO).derive(raw))
        """The key that authenticates audit entries, derived from this one (never stored)."""

    @classmethod
    def load_or_create(cls, path: Path | str) -> Signer:
        """Load the key at ``path``, generating it (mode 0600, new parent dirs 0700) when absent.

        Raises ``ConfigError`` when the file is readable by group or others, or is not an
        Ed25519 private key, or cannot be created (a read-only disk, a full one, no permission).
        """
        path = Path(path)
        if not path.exists():
            try:
                created = cls._create(path)
            except OSError as exc:
                raise cannot_create(exc, path, "audit signing key", "audit.signing_key_file") from exc
            if created is not None:
                return created
        return cls._load(path)

    @classmethod
    def _create(cls, path: Path) -> Signer | None:
        make_private_dir(path.parent)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return None  # another process made it first: load theirs
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
        except OSError:  # a full disk: no empty key file is left to be refused at the next start
            path.unlink(missing_ok=True)
            raise
        return cls(key)

    @classmethod
    def _load(cls, path: Path) -> Signer:
        try:
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(f"signing key is accessible to group or others (mode {mode & 0o777:o}); "
                                  "run chmod 600 on it", file=str(path), field="audit.signing_key_file")
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read signing key: {exc.strerror}", file=str(path),
                              field="audit.signing_key_file") from exc
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError("not an unencrypted PEM private key", file=str(path),
                              field="audit.signing_key_file") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError("not an Ed25519 private key", file=str(path), field="audit.signing_key_file")
        return cls(key)

    def public_key_pem(self) -> bytes:
        """The public key as PEM (SubjectPublicKeyInfo), for auditors."""
        return self.public_key.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign_head(self, tenant: str, seq: int, hash: str, at: float, *, macs: bool = True) -> Checkpoint:
        """Sign the chain head ``(tenant, seq, hash)`` as of time ``at``, marked as signed by a gateway
        that seals entry MACs (``macs=False``: the old format, for tests of an older gateway)."""
        unsigned = Checkpoint(tenant=tenant, seq=seq, hash=hash, time=at, key_id=self.key_id, signature="",
                              macs=macs)
        signature = self._key.sign(unsigned.signed_bytes())
        return replace(unsigned, signature=base64.b64encode(signature).decode())


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement: tenant's chain had entry ``seq`` with hash ``hash`` at ``time``; with
    ``macs``, signed by a gateway that seals entry MACs (and checked them up to ``seq``), else an
    old-format checkpoint, which vouches for the entries up to ``seq`` without a MAC as legacy."""

    tenant: str
    seq: int
    hash: str
    time: float
    key_id: str
    signature: str
    macs: bool = False

    def signed_bytes(self) -> bytes:
        """The exact bytes the signature covers."""
        doc: dict[str, Any] = {"hash": self.hash, "key_id": self.key_id, "seq": self.seq, "tenant": self.tenant,
                               "time": self.time}
        if self.macs:
            doc["macs"] = 1
        return _CHECKPOINT_DOMAIN + orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)

    def verify(self, public_key: Ed25519PublicKey) -> str | None:
        """None when the signature holds under ``public_key``, else why it does not."""
        if self.key_id != key_fingerprint(public_key):
            return f"signed by key {self.key_id}, not by the given key {key_fingerprint(public_key)}"
        try:
            public_key.verify(base64.b64decode(self.signature, validate=True), self.signed_bytes())
        except (InvalidSignature, ValueError):
            return "signature does not verify"
        return None

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        if self.macs:
            doc["macs"] = 1
        else:
            del doc["macs"]  # an old-format checkpoint stays as it was written
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Checkpoint:
        """Raises ``ValueError`` when a field is missing or of the wrong type."""
        macs = doc.get("macs", 0)
        if macs not in (0, 1) or not isinstance(macs, int):
            raise ValueError("not a checkpoint: a field has the wrong type")
        try:
            cp = cls(tenant=doc["tenant"], seq=doc["seq"], hash=doc["hash"], time=doc["time"],
                     key_id=doc["key_id"], signature=doc["signature"], macs=bool(macs))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a checkpoint: missing {exc}") from exc
        types_ok = (isinstance(cp.tenant, str) and isinstance(cp.seq, int) and isinstance(cp.hash, str)
                    and isinstance(cp.time, int | float) and isinstance(cp.key_id, str)
                    and isinstance(cp.signature, str))
        if not types_ok:
            raise ValueError("not a checkpoint: a field has the wrong type")
        return cp


class CheckpointLog:
    """An append-only JSON-lines file of checkpoints, one per line, outside the database.

    An append cut short by a crash (power lost between ``write`` and ``fsync``) can leave a
    torn line: JSON that ends early, or NUL bytes where the file grew but the data never
    landed. Such a line is skipped with a ``checkpoint_torn_line`` warning (it is what removing
    the line would give, which anyone able to write the file can do anyway); the next append
    starts on a line of its own. Any other malformed line is an error naming it.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.torn: set[int] = set()  # line numbers of torn lines seen, each warned about once

    def check_writable(self) -> None:
        """Create the file (mode 0644, new folders 0700) unless it exists, and check that it can be
        appended to, so that a gateway that could never sign a checkpoint does not start. Raises
        ``ConfigError`` naming the file, the setting and what to do."""
        try:
            make_private_dir(self.path.parent)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
        except OSError as exc:
            raise cannot_create(exc, self.path, "checkpoint file", "audit.checkpoint_file", doing="write") from exc

    def append(self, checkpoints: Sequence[Checkpoint]) -> None:
        """Append durably (one write, then fsync). Raises ``OSError`` when the file cannot be written."""
        if not checkpoints:
            return
        data = b"".join(orjson.dumps(cp.to_dict()) + b"\n" for cp in checkpoints)
        make_private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn last line: end it first
                data = b"\n" + data
            view = memoryview(data)
            while view:  # a short write (a disk nearly full) goes on; a failing one raises, leaving a torn line
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def __iter__(self) -> Iterator[Checkpoint]:
        """Every checkpoint in file order; none when the file does not exist.

        Raises ``ConfigError`` naming the line of a malformed entry (torn lines are skipped), or
        the file when it exists but cannot be read.
        """
        try:
            f = self.path.open("rb")
        except (FileNotFoundError, NotADirectoryError):  # no such file (a file where a folder goes: none either)
            return
        except OSError as exc:
            raise ConfigError(f"cannot read the checkpoint file: {exc.strerror}", file=str(self.path)) from exc
        with f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield Checkpoint.from_dict(orjson.loads(line))
                except orjson.JSONDecodeError as exc:
                    if not _torn(line):
                        raise ConfigError(f"malformed checkpoint: {exc}", file=str(self.path),
                                          line=number) from exc
                    if number not in self.torn:
                        self.torn.add(number)
                        _log.warning("checkpoint_torn_line", file=str(self.path), line=number)
                except ValueError as exc:
                    raise ConfigError(f"malformed checkpoint: {exc}", file=str(self.path),
                                      line=number) from exc

    def for_tenant(self, tenant: str) -> list[Checkpoint]:
        """The tenant's checkpoints in file order."""
        return [cp for cp in self if cp.tenant == tenant]

    def latest(self) -> dict[str, Checkpoint]:
        """The highest-seq checkpoint of every tenant in the file."""
        out: dict[str, Checkpoint] = {}
        for cp in self:
            if cp.tenant not in out or cp.seq >= out[cp.tenant].seq:
                out[cp.tenant] = cp
        return out


def legacy_bound(checkpoints: Iterable[Checkpoint], tenant: str) -> int:
    """The highest seq of *tenant* that an old-format checkpoint (signed before entry MACs, no
    ``macs``) covers, or 0: entries without a MAC are legacy only up to it. The caller must check
    the signature of the checkpoint it relies on (``ChainVerifier`` checks every checkpoint)."""
    return max((cp.seq for cp in checkpoints if cp.tenant == tenant and not cp.macs), default=0)


def _torn(line: bytes) -> bool:
    """Whether a line that failed to parse is what a cut-short append leaves: NUL bytes, or JSON
    that is well formed up to where it ends early."""
    body = line.rstrip(b"\r\n").rstrip(b"\x00")  # the usual shape: what landed, then NULs for the rest
    if not body.strip(b"\x00"):
        return True
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return exc.pos == len(body)
    return False


@dataclass(slots=True)
class _Head:
    seq: int
    hash: str
    checkpointed_seq: int
    pending_since: float | None
    checked_seq: int
    """The last entry known genuine: this process wrote it right after the one before, or the store's
    entries up to it passed :meth:`Checkpointer.check`, or a checkpoint signed it."""
    checked_hash: str
    refused: VerifyError | None = None
    """Why the tenant's chain failed the check before signing: it is never signed again."""
    recheck: bool = False
    """This process committed an entry at or below a seq it had already seen: the chain may have been
    cut back under it, so the entry it last checked is read back even with nothing new to sign."""


EntryReader = Callable[[str, int], AsyncIterator[AuditRow]]
"""``(tenant, after_seq) -> the tenant's stored entries after after_seq, in order`` (``Store.iter_audit``)."""


class ChainRefused(IntegrityError):
    """A tenant's chain holds an entry the gateway's audit key does not vouch for (or one rewritten
    since it was checked), so the checkpointer will not sign its head; ``error`` says which."""

    def __init__(self, tenant: str, error: VerifyError) -> None:
        super().__init__(f"audit chain of tenant {tenant} failed the check before signing: {error.kind} at entry "
                         f"{error.seq}: {error.message}")
        self.tenant, self.error = tenant, error


class Checkpointer:
    """Decides when to sign each tenant's chain head and does it off the request path.

    The store calls :meth:`observe` with the rows of every commit (cheap, thread-safe). A
    tenant is due when ``every_n`` entries have been added since its last checkpoint, or when
    an entry has waited ``every_seconds`` without one. :meth:`run` (start it as a task) signs
    due heads in a worker thread and, when cancelled, signs whatever is pending before it
    stops. With several replicas each signs the heads it saw; any signed head is valid.

    A head is signed only once every entry up to it is known genuine (:meth:`check`): rows this
    process committed, each right after the last known one, are; otherwise (another worker or
    replica wrote in between, or someone wrote around the gateway) the store's entries from the
    last known one up to the head are read (*entries*, ``Store.iter_audit``) and must link, hash
    and carry a MAC under the signing key's :class:`EntryKey` (:class:`ChainVerifier`), and the
    head must be the entry this process observed. Either way, the entry about to be signed is read
    back from the store (one indexed read per signing) and must still be stored with the hash to
    be signed, so entries deleted from the tail (the chain cut back, and maybe written on from
    there) are found at the next signing; so are they when this process commits an entry at a
    seq it has already seen, with nothing new to sign. A tenant that fails is *refused*: logged
    (``checkpoint_refused``), reported to ``health`` (``chain_refused``) and never signed again by this
    process; :meth:`checkpoint_tenant` raises :class:`ChainRefused` for it. Without *entries*
    (tests, tools) observed heads are signed as they are.
    """

    def __init__(self, signer: Signer, log: CheckpointLog, *, every_n: int = 1000,
                 every_seconds: float = 60.0, clock: Any = time.time, entries: EntryReader | None = None) -> None:
        self.signer, self.log = signer, log
        self.every_n, self.every_seconds, self._clock = every_n, every_seconds, clock
        self.entries = entries
        self._heads: dict[str, _Head] = {}
        self._lock = threading.Lock()
        self._sign_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._last: dict[str, Checkpoint] = {}
        old: dict[str, Checkpoint] = {}  # each tenant's highest old-format checkpoint
        for cp in log:
            for latest in (self._last, *((old,) if not cp.macs else ())):
                if cp.tenant not in latest or cp.seq >= latest[cp.tenant].seq:
                    latest[cp.tenant] = cp
        self._legacy: dict[str, int] = {t: cp.seq for t, cp in old.items() if cp.verify(signer.public_key) is None}
        """Per tenant, the last seq an old-format checkpoint vouches for (:func:`legacy_bound`; one
        whose signature does not hold vouches for nothing): entries without a MAC after it are refused."""

    def observe(self, rows: Iterable[AuditRow]) -> None:
        """Note newly committed rows; wakes :meth:`run` when a tenant becomes due or pending."""
        wake = False
        with self._lock:
            for row in rows:
                head = self._heads.get(row.tenant)
                if head is None:
                    last = self._last.get(row.tenant)
                    start = (last.seq, last.hash) if last else (0, GENESIS)
                    head = _Head(0, GENESIS, start[0], None, *start)
                    self._heads[row.tenant] = head
                if row.seq <= head.seq:  # committed out of order (PostgreSQL), or the chain was cut back
                    wake = wake or not head.recheck
                    head.recheck = True
                    continue
                head.seq, head.hash = row.seq, row.hash
                if row.seq == head.checked_seq + 1 and row.prev_hash == head.checked_hash:
                    head.checked_seq, head.checked_hash = row.seq, row.hash  # ours, right after a known one
                if head.pending_since is None:
                    head.pending_since = self._clock()
                    wake = True
                if head.seq - head.checkpointed_seq >= self.every_n:
                    wake = True
        if wake and self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def due(self) -> list[str]:
        """Tenants whose head should be signed now (never a refused one)."""
        now = self._clock()
        with self._lock:
            return [t for t, h in self._heads.items() if h.refused is None and (h.recheck or (
                h.seq > h.checkpointed_seq and (
                    h.seq - h.checkpointed_seq >= self.every_n
                    or (h.pending_since is not None and now - h.pending_since >= self.every_seconds))))]

    def refused(self) -> dict[str, VerifyError]:
        """The tenants whose chain failed the check before signing, and why."""
        with self._lock:
            return {t: h.refused for t, h in self._heads.items() if h.refused is not None}

    async def check(self, tenants: Iterable[str] | None = None) -> None:
        """Make the observed heads of *tenants* (default: all) known genuine by reading the store
        from the last known entry (see the class docstring), or refuse the tenant. Raises the
        store's errors (the heads stay unchecked)."""
        if self.entries is None:
            return
        with self._lock:
            names = list(self._heads) if tenants is None else [t for t in tenants if t in self._heads]
            todo = [(t, h.checked_seq, h.checked_hash, h.seq, h.hash) for t in names
                    for h in (self._heads[t],) if h.refused is None and h.checked_seq < h.seq]
        read: set[str] = set()  # tenants whose stored head was read just now, by the range check
        for tenant, start_seq, start_hash, seq, hash in todo:
            error = await self._check_range(tenant, start_seq, start_hash, seq, hash)
            with self._lock:
                head = self._heads[tenant]
                if error is not None:
                    self._refuse(tenant, head, error)
                elif head.checked_seq < seq:
                    head.checked_seq, head.checked_hash = seq, hash
                    read.add(tenant)
        with self._lock:  # what is about to be signed (or was checked before an entry came again) is still stored
            tails = [(t, h.checked_seq, h.checked_hash) for t in names for h in (self._heads[t],)
                     if h.refused is None and t not in read and h.checked_seq > 0
                     and (h.checked_seq > h.checkpointed_seq or h.recheck)]
        for tenant, seq, hash in tails:
            error = await self._check_stored(tenant, seq, hash)
            with self._lock:
                head = self._heads[tenant]
                head.recheck = False
                if error is not None:
                    self._refuse(tenant, head, error)

    def _refuse(self, tenant: str, head: _Head, error: VerifyError) -> None:
        """Refuse *tenant*'s chain for *error* (the first one stays); call with the lock held."""
        if head.refused is None:
            head.refused = error
            _log.error("checkpoint_refused", tenant=tenant, seq=error.seq, kind=error.kind,
                       detail=error.message, note="this tenant's chain head is not signed: "
                       "run 'sessiongate audit verify' and investigate")

    async def _check_stored(self, tenant: str, seq: int, hash: str) -> VerifyError | None:
        """Whether entry *seq*, which this process wrote or checked, is still stored with *hash*."""
        assert self.entries is not None
        rows = self.entries(tenant, seq - 1)
        try:
            row = await anext(aiter(rows), None)
        except AlteredRow as exc:
            return VerifyError(exc.seq, "edited", exc.detail)
        finally:
            await aclose(rows)
        if row is None or row.seq != seq:
            return VerifyError(seq, "truncated", f"entry {seq}, which this gateway wrote or checked, is no longer "
                               "stored: the chain was cut back (its newest entries deleted) outside the gateway")
        if row.hash != hash:
            return VerifyError(seq, "checkpoint_mismatch", f"entry {seq} is not the entry this gateway wrote or "
                               "checked there: the chain was cut back and written again from an earlier entry")
        return None

    async def _check_range(self, tenant: str, start_seq: int, start_hash: str, seq: int,
                           hash: str) -> VerifyError | None:
        """Check the stored entries after the known one (``start_seq``, ``start_hash``) up to the
        observed head (``seq``, ``hash``); the first problem, or None."""
        assert self.entries is not None
        key = self.signer.entry_key
        with self._lock:
            legacy = self._legacy.get(tenant, 0)
        rows = self.entries(tenant, max(0, start_seq - 1))
        verifier: ChainVerifier | None = None
        if start_seq == 0:
            verifier = ChainVerifier(tenant, entry_key=key, legacy_until=legacy)
        try:
            async for row in rows:
                if verifier is None:  # the known entry itself: is it still there, and was it keyed?
                    if row.seq != start_seq or row.hash != start_hash:
                        return VerifyError(start_seq, "checkpoint_mismatch",
                                           f"entry {start_seq} is not the one this gateway checked or signed (the "
                                           "chain was rewritten from there)")
                    state = key.check(orjson.loads(row.body))
                    if state == "forged":
                        return VerifyError(start_seq, "forged", f"entry {start_seq}'s MAC does not hold")
                    if state != "keyed" and start_seq > legacy:
                        return VerifyError(start_seq, "unauthenticated",
                                           f"entry {start_seq} carries no MAC under this gateway's audit key, and no "
                                           "checkpoint signed before entry MACs covers it")
                    verifier = ChainVerifier(tenant, entry_key=key, after_seq=start_seq, after_hash=start_hash,
                                             keyed=state == "keyed", legacy_until=legacy)
                    continue
                if row.seq > seq or not verifier.feed(row):
                    break
        except AlteredRow as exc:
            return VerifyError(exc.seq, "edited", exc.detail)
        finally:
            await aclose(rows)
        if verifier is None:
            return VerifyError(start_seq, "truncated", f"entry {start_seq}, which this gateway checked or signed, "
                                                       "is no longer stored")
        report = verifier.finish()
        if report.first_error is not None:
            return report.first_error
        if report.last_seq != seq or report.head_hash != hash:
            return VerifyError(seq, "checkpoint_mismatch",
                               f"entry {seq} is not the entry this gateway wrote there (the chain ends at "
                               f"{report.last_seq if report.last_seq is not None else start_seq}, or was rewritten)")
        return None

    def checkpoint_now(self, tenants: Iterable[str] | None = None) -> list[Checkpoint]:
        """Sign and append the heads of ``tenants`` (default: all with pending entries), as far as
        they are known genuine (:meth:`check`); refused tenants are skipped.

        Blocking (an fsync); returns the new checkpoints. Raises ``OSError`` when the
        checkpoint file cannot be written (the heads stay pending).
        """
        with self._sign_lock:
            with self._lock:
                names = list(self._heads) if tenants is None else list(tenants)
                heads = []
                for t in names:
                    h = self._heads.get(t)
                    if h is None or h.refused is not None:
                        continue
                    seq, hash = (h.seq, h.hash) if self.entries is None else (h.checked_seq, h.checked_hash)
                    if seq > h.checkpointed_seq:
                        heads.append((t, seq, hash))
            at = self._clock()
            made = [self.signer.sign_head(t, seq, h, at) for t, seq, h in heads]
            self.log.append(made)
            with self._lock:
                for cp in made:
                    head = self._heads[cp.tenant]
                    head.checkpointed_seq = cp.seq
                    head.pending_since = at if head.seq > cp.seq else None
                    self._last[cp.tenant] = cp
                    if not cp.macs:  # only a signer of the old format (tests of an older gateway)
                        self._legacy[cp.tenant] = max(cp.seq, self._legacy.get(cp.tenant, 0))
            return made

    async def flush(self, tenants: Iterable[str] | None = None) -> list[Checkpoint]:
        """:meth:`check`, then :meth:`checkpoint_now` in a worker thread."""
        names = None if tenants is None else list(tenants)
        await self.check(names)
        return await asyncio.to_thread(self.checkpoint_now, names)

    async def checkpoint_tenant(self, tenant: str) -> Checkpoint | None:
        """Sign ``tenant``'s latest observed head now (an export needs it covered) and return
        the tenant's newest checkpoint; None when nothing was ever observed or signed. Raises
        :class:`ChainRefused` when the tenant's chain failed the check before signing."""
        await self.flush([tenant])
        with self._lock:
            head = self._heads.get(tenant)
            if head is not None and head.refused is not None:
                raise ChainRefused(tenant, head.refused)
            return self._last.get(tenant)

    async def run(self, health: Health | None = None, backoff: Backoff = RETRY) -> None:
        """Sign due heads until cancelled; on cancellation sign all pending heads, then stop.

        A signing that fails (the checkpoint file cannot be written, the store cannot be read)
        leaves the heads pending: it is logged (exception type only), reported to *health* as
        ``checkpointer`` and retried after *backoff*, until a signing succeeds again. A tenant
        refused by :meth:`check` is reported to *health* as that tenant's (``chain_refused``),
        not as the checkpointer failing.
        """
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        failures = 0
        if health is not None:
            health.register(CHECKPOINTER)
        try:
            while True:
                due = self.due()
                if due:
                    try:
                        await self.flush(due)
                    except Exception as exc:  # noqa: BLE001 - logged, reported, retried
                        failures = health.failed(CHECKPOINTER, exc) if health else failures + 1
                        _log.warning("background_task_retry", task=CHECKPOINTER, **error_cause(exc),
                                     attempt=failures, retry_in=backoff.delay(failures))
                        await asyncio.sleep(backoff.delay(failures))
                        continue
                    if failures:
                        _log.info("background_task_recovered", task=CHECKPOINTER, after_failures=failures)
                    failures = 0
                    self._report(health)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self._next_timeout())
                self._wake.clear()
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # Python 3.11's wait_for swallows a cancel that lands as the wake fires
                    raise asyncio.CancelledError
        finally:
            try:  # shutting down: check what others wrote since, so that the newest head can be signed
                await self.check()
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # noqa: BLE001 - the heads checked so far are still signed below
                _log.warning("checkpoint_check_at_shutdown_failed", **error_cause(exc))
            try:
                self.checkpoint_now()
            except Exception as exc:  # noqa: BLE001 - shutting down; the heads stay unsigned
                _log.error("checkpoint_at_shutdown_failed", **error_cause(exc))
            self._loop = self._wake = None

    def _report(self, health: Health | None) -> None:
        """Tell *health* the checkpointer did its job, and of every tenant refused. A refusal is
        that tenant's: the gateway stays ready (a replica left behind in a rolling upgrade, which
        writes entries without a MAC, must not take every replica out of service)."""
        if health is None:
            return
        health.succeeded(CHECKPOINTER)
        for tenant, error in self.refused().items():
            health.chain_refused(tenant, error.kind)

    def _next_timeout(self) -> float | None:
        with self._lock:
            starts = [h.pending_since for h in self._heads.values()
                      if h.pending_since is not None and h.refused is None]
        if not starts:
            return None
        return max(0.0, min(starts) + self.every_seconds - self._clock())


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True, slots=True)
class VerifyError:
    """The first problem found: ``seq`` of the broken entry (None when not about one entry);
    ``session_id`` and ``round_seq`` when it is about a session's stored rows."""

    seq: int | None
    kind: str
    message: str
    session_id: str | None = None
    round_seq: int | None = None


@dataclass(slots=True)
class VerifyReport:
    """What a verification found. ``ok`` is False exactly when ``first_error`` is set.

    ``errors`` holds every problem found after the first (the stored rows' check reports each
    one, not just the first: a planted cheap error must not hide the rest), up to a bound per
    kind; ``counts`` counts every problem by kind, the first included."""

    tenant: str
    entries: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    head_hash: str | None = None
    checkpoints: int = 0
    records: int | None = None
    first_error: VerifyError | None = None
    notes: list[str] = field(default_factory=list)
    errors: list[VerifyError] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.first_error is None

    def add(self, errors: Iterable[VerifyError], counts: Mapping[str, int]) -> None:
        """Take in the problems another check found (the first of them, and the counts of each
        kind): the first becomes ``first_error`` when there is none yet."""
        if self.first_error is not None and not self.counts:
            self.counts[self.first_error.kind] = 1
        for kind, n in counts.items():
            self.counts[kind] = self.counts.get(kind, 0) + n
        for error in errors:
            if self.first_error is None:
                self.first_error = error
            elif error != self.first_error:
                self.errors.append(error)
            else:  # the same problem seen by both checks (an altered row): counted once
                self.counts[error.kind] -= 1

    def to_dict(self) -> dict[str, Any]:
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        doc["first_error"] = _error_dict(self.first_error) if self.first_error else None
        doc["errors"] = [_error_dict(e) for e in self.errors]
        doc["counts"] = self.counts or ({self.first_error.kind: 1} if self.first_error else {})
        doc["ok"] = self.ok
        return doc

    def summary(self) -> str:
        """One line for a terminal, and one more for each further problem (``also:``), with the
        number of problems of each kind when not all are listed."""
        span = f"{self.entries} entries {self.first_seq}..{self.last_seq}" if self.entries else "no entries"
        base = f"tenant {self.tenant}: {span}, {self.checkpoints} checkpoint(s)"
        if self.first_error is None:
            return f"OK   {base}"
        lines = [f"FAIL {base}: {_error_line(self.first_error)}"]
        lines += [f"     also: {_error_line(e)}" for e in self.errors]
        listed: dict[str, int] = {self.first_error.kind: 1}
        for e in self.errors:
            listed[e.kind] = listed.get(e.kind, 0) + 1
        lines += [f"     ... {n} {kind} problem(s) in all, {listed.get(kind, 0)} listed"
                  for kind, n in sorted(self.counts.items()) if n > listed.get(kind, 0)]
        return "\n".join(lines)


def _error_line(error: VerifyError) -> str:
    at = f" at seq {error.seq}" if error.seq is not None else ""
    return f"{error.kind}{at}: {error.message}"


def _error_dict(error: VerifyError) -> dict[str, Any]:
    """A problem as JSON: session fields only when it is about a session's rows."""
    return {k: v for k, v in asdict(error).items() if v is not None or k not in ("session_id", "round_seq")}


class ChainVerifier:
    """Streaming verifier of one tenant's chain: :meth:`feed` rows in order, then :meth:`finish`.

    ``after_seq``/``after_hash`` say where the rows start: by default at the genesis. With
    ``after_hash`` None the first row's ``prev_hash`` is taken on trust (a bundle that covers
    part of the chain; the signed checkpoint at its end still commits to every entry in it).

    With ``entry_key`` every entry's MAC is checked (``forged``, ``unauthenticated``); an entry
    without one is legacy only at a seq up to ``legacy_until`` (default: :func:`legacy_bound` of
    *checkpoints*, whose signatures are checked here) and before the first keyed entry, or never
    when ``keyed`` (the rows start after a keyed entry). Without it, MACs are not checked and a
    note says how many entries carry one.
    """

    def __init__(self, tenant: str, *, checkpoints: Iterable[Checkpoint] = (),
                 public_key: PublicKeyLike | None = None,
                 after_seq: int = 0, after_hash: str | None = GENESIS,
                 entry_key: EntryKey | None = None, keyed: bool = False,
                 legacy_until: int | None = None) -> None:
        theirs = [cp for cp in checkpoints if cp.tenant == tenant]
        mine = sorted((cp for cp in theirs if cp.seq > after_seq), key=lambda cp: cp.seq)
        if mine and public_key is None:
            raise ValueError("checkpoints need the public key to be verified")
        self._public_key = load_public_key(public_key) if public_key is not None else None
        self._checkpoints = mine
        self._cp_index = 0
        self.report = VerifyReport(tenant=tenant)
        self._tenant = tenant
        self._expected = after_seq + 1
        self._prev_hash = after_hash
        self._prev_seq: int | None = None
        self._pending_gap: int | None = None  # sealed seq of an entry that came too early
        self._entry_key = entry_key
        self._keyed: int | None = after_seq if keyed else None  # seq of the first keyed entry
        self._legacy_until = legacy_bound(theirs, tenant) if legacy_until is None else legacy_until
        self._legacy: list[int] = []  # [first, last] seq of the entries accepted as legacy
        self._unchecked = 0  # entries with a MAC seen without the key

    @property
    def failed(self) -> bool:
        return self.report.first_error is not None

    def feed(self, row: AuditRow) -> bool:
        """Check the next row; False once a problem was found (further rows are ignored)."""
        if self.failed:
            return False
        if self._pending_gap is not None:
            self._resolve_gap(row)
            return False
        error = self._check(row)
        if error is not None:
            self._fail(*error)
            return False
        if self._pending_gap is not None:
            return True
        self._accept(row)
        return not self.failed

    def finish(self) -> VerifyReport:
        """Report, after checking that no checkpoint lies beyond the last entry."""
        if self._pending_gap is not None:
            self._resolve_gap(None)
        if self._legacy and not self.failed:
            first, last = self._legacy[0], self._legacy[-1]
            span = f"entry {first} carries" if first == last else f"entries {first}..{last} carry"
            self.report.notes.append(
                f"{span} no MAC under this gateway's audit key (written before entry MACs, or under an earlier "
                f"signing key): only their links and the checkpoint signed before entry MACs at entry "
                f"{self._legacy_until} vouch for them")
        if self._unchecked and not self.failed:
            self.report.notes.append(
                f"the MACs of {self._unchecked} entries were not checked (that needs the gateway's audit key, "
                "which 'sessiongate audit verify' on the gateway uses); the signed checkpoint covers them, and the "
                "gateway checks every entry's MAC before it signs a checkpoint")
        while not self.failed and self._cp_index < len(self._checkpoints):
            cp = self._checkpoints[self._cp_index]
            self._cp_index += 1
            problem = cp.verify(self._public_key)  # type: ignore[arg-type]
            if problem:
                self._fail(cp.seq, "bad_signature", f"checkpoint for seq {cp.seq}: {problem}")
            else:
                last = self.report.last_seq if self.report.last_seq is not None else self._expected - 1
                self._fail(last + 1, "truncated",
                           f"the chain ends at seq {last} but a checkpoint signed at {_when(cp.time)} "
                           f"shows it reached seq {cp.seq}")
        return self.report

    def _check(self, row: AuditRow) -> tuple[int, str, str] | None:
        digest = hashlib.sha256(row.body).hexdigest()
        if digest != row.hash:
            return row.seq, "edited", f"entry {row.seq} does not match its hash (its content was changed)"
        try:
            doc = orjson.loads(row.body)
            b_tenant, b_seq, b_prev, b_time = doc["tenant"], doc["seq"], doc["prev_hash"], doc["time"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return row.seq, "edited", f"entry {row.seq} is not a well-formed entry"
        if b_tenant != self._tenant:
            return row.seq, "inserted", f"entry {row.seq} belongs to another tenant's chain"
        position = self._position(row.seq, b_seq)
        if position is not None:
            return position
        if self._pending_gap is not None:
            return None
        if b_prev != self._prev_hash and self._prev_hash is not None:
            prev = f"entry {b_seq - 1}" if b_seq > 1 else "the genesis"
            return b_seq, "bad_link", (f"entry {b_seq} does not link to {prev} (one of them was "
                                       "altered and rehashed, or replaced)")
        if (row.seq, row.prev_hash, row.tenant) != (b_seq, b_prev, b_tenant) or \
                abs(row.created_at - b_time) > _TIME_TOLERANCE:
            return b_seq, "edited", f"entry {b_seq}'s stored columns disagree with its hashed content"
        return self._check_mac(doc, b_seq)

    def _check_mac(self, doc: dict[str, Any], seq: int) -> tuple[int, str, str] | None:
        """The entry's MAC against the key (see the class docstring); notes legacy entries."""
        if self._entry_key is None:
            self._unchecked += MAC_FIELD in doc
            return None
        state = self._entry_key.check(doc)
        if state == "keyed":
            if self._keyed is None:
                self._keyed = seq
            return None
        if state == "forged":
            return seq, "forged", (f"entry {seq}'s MAC does not hold under this gateway's audit key: the gateway "
                                   "did not write it (it was appended or rewritten around the gateway)")
        if self._keyed is not None:
            which = "no MAC" if state == "absent" else "a MAC under another key"
            return seq, "unauthenticated", (f"entry {seq} carries {which}, but entry {self._keyed} before it carries "
                                            "one under this gateway's audit key, and the gateway gives every entry "
                                            "after that a MAC: it was appended around the gateway")
        if seq > self._legacy_until:
            which = "no MAC" if state == "absent" else "a MAC under another key"
            vouched = (f"the last checkpoint signed before entry MACs covers entries up to {self._legacy_until}"
                       if self._legacy_until else "no checkpoint signed before entry MACs covers this tenant's entries")
            return seq, "unauthenticated", (f"entry {seq} carries {which}, and {vouched}: it was written around the "
                                            "gateway (or by an older gateway after its last checkpoint)")
        self._legacy = [self._legacy[0] if self._legacy else seq, seq]
        return None

    def _position(self, col_seq: int, b_seq: Any) -> tuple[int, str, str] | None:
        """Where the entry (by the seq it was sealed with) stands against the expected one."""
        if not isinstance(b_seq, int):
            return col_seq, "edited", f"entry {col_seq} is not a well-formed entry"
        expected = self._expected
        if b_seq == expected:
            return None
        if self._prev_seq is not None and b_seq == self._prev_seq:
            return b_seq, "inserted", (f"two entries claim seq {b_seq}: one of them was inserted "
                                       f"(the second is stored at seq {col_seq})")
        if b_seq < expected:
            return b_seq, "reordered", f"entry {b_seq} appears after entry {expected - 1}"
        self._pending_gap = b_seq
        return None

    def _resolve_gap(self, row: AuditRow | None) -> None:
        found, expected = self._pending_gap or 0, self._expected
        self._pending_gap = None
        if row is not None and _sealed_seq(row) == expected:
            self._fail(expected, "reordered", f"entry {expected} appears after entry {found}")
            return
        missing = f"entry {expected} is" if found == expected + 1 else f"entries {expected}..{found - 1} are"
        self._fail(expected, "gap", f"{missing} missing (the next entry is {found})")

    def _accept(self, row: AuditRow) -> None:
        report = self.report
        report.entries += 1
        if report.first_seq is None:
            report.first_seq = row.seq
        report.last_seq, report.head_hash = row.seq, row.hash
        self._prev_seq, self._prev_hash, self._expected = row.seq, row.hash, row.seq + 1
        while self._cp_index < len(self._checkpoints) and self._checkpoints[self._cp_index].seq <= row.seq:
            cp = self._checkpoints[self._cp_index]
            self._cp_index += 1
            problem = cp.verify(self._public_key)  # type: ignore[arg-type]
            if problem:
                self._fail(cp.seq, "bad_signature", f"checkpoint for seq {cp.seq}: {problem}")
                return
            if cp.hash != row.hash:
                self._fail(cp.seq, "checkpoint_mismatch",
                           f"entry {cp.seq} is not the entry signed at {_when(cp.time)} "
                           "(the chain was rewritten up to here)")
                return
            report.checkpoints += 1

    def _fail(self, seq: int | None, kind: str, message: str) -> None:
        if self.report.first_error is None:
            self.report.first_error = VerifyError(seq=seq, kind=kind, message=message)


class AlteredRow(IntegrityError):
    """A stored row holds a value of a type the gateway never writes in its column (SQLite keeps
    whatever an edit puts there: ``replace()`` on a blob gives text): the row was edited outside
    the gateway. Raised by the stores as they read rows (``gateway.evidence.typed``); on a
    session path it is an integrity failure like any other (quarantine), and verification
    reports it as :attr:`kind` (one of :data:`ERROR_KINDS`) at entry :attr:`seq` (an audit row)
    or for :attr:`session_id` and :attr:`round_seq`, naming the column in ``detail``."""

    def __init__(self, detail: str, kind: str, *, seq: int | None = None, session_id: str | None = None,
                 round_seq: int | None = None) -> None:
        super().__init__(detail)
        self.kind, self.seq, self.session_id, self.round_seq = kind, seq, session_id, round_seq

    def error(self) -> VerifyError:
        """What verification reports for it."""
        return VerifyError(self.seq, self.kind, self.detail, session_id=self.session_id, round_seq=self.round_seq)


def _sealed_seq(row: AuditRow) -> int | None:
    try:
        seq = orjson.loads(row.body)["seq"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return seq if isinstance(seq, int) else None


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def verify_chain(rows: Iterable[AuditRow], *, tenant: str, checkpoints: Iterable[Checkpoint] = (),
                 public_key: PublicKeyLike | None = None,
                 after_seq: int = 0, after_hash: str | None = GENESIS,
                 entry_key: EntryKey | None = None) -> VerifyReport:
    """Verify ``tenant``'s chain from ``rows`` (in seq order) against ``checkpoints`` (and, with
    ``entry_key``, every entry's MAC).

    Stops at the first problem. Raises ``ValueError`` when checkpoints are given without a
    public key, ``ConfigError`` when the public key cannot be read.
    """
    verifier = ChainVerifier(tenant, checkpoints=checkpoints, public_key=public_key,
                             after_seq=after_seq, after_hash=after_hash, entry_key=entry_key)
    for row in rows:
        if not verifier.feed(row):
            break
    return verifier.finish()


async def averify_chain(rows: AsyncIterable[AuditRow], *, tenant: str,
                        checkpoints: Iterable[Checkpoint] = (),
                        public_key: PublicKeyLike | None = None,
                        after_seq: int = 0, after_hash: str | None = GENESIS,
                        entry_key: EntryKey | None = None) -> VerifyReport:
    """:func:`verify_chain` over an async iterator such as ``Store.iter_audit``; a row the store
    cannot read as an entry (:class:`AlteredRow`) is reported as ``edited`` at its seq."""
    verifier = ChainVerifier(tenant, checkpoints=checkpoints, public_key=public_key,
                             after_seq=after_seq, after_hash=after_hash, entry_key=entry_key)
    try:
        async for row in rows:
            if not verifier.feed(row):
                break
    except AlteredRow as exc:  # the next row could not be read as an entry: it was edited
        verifier._fail(exc.seq, "edited", exc.detail)
    finally:
        await aclose(rows)
    return verifier.finish()


async def aclose(iterable: AsyncIterable[Any]) -> None:
    """Close an async generator left early (releases a store cursor); no-op for other iterables."""
    close = getattr(iterable, "aclose", None)
    if close is not None:
        await close()
