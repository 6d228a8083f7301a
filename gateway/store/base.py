"""The Store protocol: what every backend (SQLite, PostgreSQL) provides, and the rows it keeps.

A store keeps bytes it cannot read: every payload arrives already sealed by ``gateway.crypto``
and leaves sealed. The only plaintext columns are identifiers and metadata (tenant, session id,
sequence numbers, times, policy id/hash, outcome, key ids) and audit entries, which by contract
hold names and hashes, never values.

Tables (both backends):

- ``data_keys``  one per session: the session's data key, wrapped by a master key (``kek_id``).
- ``sessions``   one per session: ``version`` (bumped by every write), ``next_seq`` (the next
                 round sequence number) and ``state_ct``, the sealed session state (context
                 window, memo, settings).
- ``rounds``     append-only: one row per recorded round (or imported message pair), sealed.
- ``audit``      append-only, per tenant: the hash chain (see ``gateway.audit``).
- ``session_heads`` one per session ever written: ``bound_seq``, the audit entry that last
                 bound the session's rows (its ``state`` field, see ``gateway.evidence``), and
                 the quarantine (``quarantined_seq``, ``quarantine_reason``; NULL when none).
                 An index into the chain for cheap checks on load; the chain stays authoritative.
- ``policy_versions``  every policy version rounds were recorded under, by version hash, with
                 its document in plaintext (configuration, not recorded data; see
                 ``gateway.policy.versions``).
- ``provider_responses`` one per response id a provider holds for a tenant (an upstream with
                 ``responses_state: provider``): the tenant and ``id_mac``, an HMAC of the tenant
                 and the id's SHA-256 (:func:`owned_response`) under a key derived from the audit
                 signing key, never the id, which continues the conversation at the provider, nor
                 its bare hash. Written with the round that relayed the id; read to refuse another
                 tenant's id (``gateway.codecs.responses``): a row copied to another tenant, or
                 one inserted with an id's hash, matches nothing, as only the gateway's processes
                 can compute the MAC. Metadata, like the audit chain: no content, kept when a
                 session is erased or its rounds expire.

Writes go through :meth:`Store.transact`: the backend opens one transaction, reads the current
rows of the session (locked against other writers, including other processes), calls the
caller's *plan* with them, writes what the plan returns, chains its audit entries, commits
durably, and only then returns. A plan is a plain synchronous function; it may run on another
thread and may run again if the backend retries, so it must not have side effects.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

if TYPE_CHECKING:
    from gateway.audit import EntryKey

SYSTEM_TENANT = "_system"
"""The audit chain of gateway-wide events (policy reloads, key rotation)."""


def provider_id_digest(response_id: str) -> bytes:
    """What callers hand the store for a provider's response id (``Changes.provider_responses``,
    :meth:`Store.holds_provider_response`): its SHA-256, so nothing downstream holds an id that
    would continue the conversation at the provider. The store keeps :func:`owned_response` of it."""
    return hashlib.sha256(response_id.encode()).digest()


_RESPONSE_MAC_INFO = b"sessiongate-provider-response-owner-v1"


@functools.lru_cache(maxsize=8)
def _response_mac_key(entry_secret: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=_RESPONSE_MAC_INFO).derive(entry_secret) if entry_secret else b""


def owned_response(entry_key: EntryKey | None, tenant: str, digest: bytes) -> bytes:
    """What ``provider_responses.id_mac`` holds for the response id of SHA-256 *digest* as
    *tenant*'s: HMAC-SHA256 of the length-prefixed tenant and *digest*, under a key derived
    (HKDF-SHA256) from *entry_key*'s secret, which is itself derived from the audit signing key
    file as audit entry MACs are (``gateway.audit.EntryKey``). Only a process holding that file
    computes it, so a database writer can neither move a row to another tenant nor make one for
    an id. A store opened without an entry key (tests, tools) uses an empty key: bound to the
    tenant, not secret."""
    key = _response_mac_key(entry_key.secret if entry_key is not None else b"")
    name = tenant.encode()
    return hmac.new(key, len(name).to_bytes(4, "big") + name + digest, hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class DataKeyRow:
    """A session's data key, wrapped by the master key ``kek_id``."""

    tenant: str
    session_id: str
    dk_id: bytes
    kek_id: str
    wrapped: bytes
    created_at: float


@dataclass(frozen=True, slots=True)
class SessionRow:
    """A session's mutable state, sealed. ``version`` increases by one on every write."""

    tenant: str
    session_id: str
    version: int
    next_seq: int
    state_ct: bytes
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class RoundRow:
    """One recorded round, sealed. ``kind`` is ``round`` or ``import``; ``outcome`` is
    ``completed``, ``incomplete``, ``upstream_error`` or ``imported``."""

    tenant: str
    session_id: str
    seq: int
    created_at: float
    request_id: str
    policy_id: str
    policy_hash: str
    outcome: str
    kind: str
    ct: bytes


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One link of a tenant's audit chain. ``body`` is the canonical JSON that ``hash`` covers."""

    tenant: str
    seq: int
    created_at: float
    body: bytes
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class PolicyVersionRow:
    """One version of a policy as it was loaded: ``document`` is the canonical JSON of the
    validated policy, the text ``hash`` (its ``version_hash``) covers. Configuration, not
    recorded data: kept in plaintext, like the policy files themselves."""

    hash: str
    policy_id: str
    loaded_at: float
    document: str


@dataclass(frozen=True, slots=True)
class Current:
    """What a plan sees: the session's rows as they are inside the transaction."""

    tenant: str
    session_id: str | None
    session: SessionRow | None
    data_key: DataKeyRow | None
    rounds: int = 0
    """How many round rows the session has in the store."""
    max_seq: int = 0
    """The highest stored round seq (0 without rounds)."""
    head: AuditRow | None = None
    """The audit entry that last bound the session's rows (``session_heads.bound_seq``)."""
    quarantine: str | None = None
    """Why the session is quarantined (``gateway.evidence``); None when it is not."""
    own: bool = False
    """These are byte for byte the rows this process's own commit left (kept since, or read
    again and found equal; ``SQLiteStore``), built on rows that passed the check: the check on
    load has nothing to find in them."""

    def as_own(self) -> Current:
        """This, with ``own`` set (``dataclasses.replace`` costs several times as much; it runs
        for every committed round)."""
        return Current(self.tenant, self.session_id, self.session, self.data_key, self.rounds, self.max_seq,
                       self.head, self.quarantine, True)


@dataclass(slots=True)
class Changes:
    """What a plan asks the store to write, all in one transaction.

    ``delete_round_seqs`` removes those rounds of the session (retention).
    ``audit`` holds the fields of new audit entries (names and hashes only); the store adds
    ``seq``, time and the chain links and returns the sealed rows in ``audit_rows``. A change
    that writes a session's rows must carry an audit entry for that session: the store binds
    the rows as they are after the change into it (``gateway.evidence.bind``).
    ``quarantine`` (a reason) quarantines the session at the change's last audit entry;
    ``release`` lifts the quarantine. Deleting the session lifts it too.
    ``erasure`` (the erasure's request id, with ``delete_session``) records the erasure as
    pending in the same transaction (:meth:`Store.pending_erasures`), so that whichever process
    runs next finishes it; ``erasure_done`` (a request id; a change without a session) removes
    that record, and raises ``Conflict`` (nothing of the change is written) when it is not
    pending any more: another process finished it first. A backend that keeps no record of
    pending erasures (``pending_erasures`` returns None) ignores both.
    ``provider_responses`` (digests, :func:`provider_id_digest`) makes those provider response
    ids the transaction's tenant's (kept as :func:`owned_response`); one it already has is left
    as it is. A change without a session may carry them.
    """

    data_key: DataKeyRow | None = None
    session: SessionRow | None = None
    rounds: list[RoundRow] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)
    delete_session: bool = False
    delete_round_seqs: list[int] = field(default_factory=list)
    audit_rows: list[AuditRow] = field(default_factory=list)
    result: Any = None
    quarantine: str | None = None
    release: bool = False
    erasure: str | None = None
    erasure_done: str | None = None
    provider_responses: list[bytes] = field(default_factory=list)


Plan = Callable[[Current], Changes]


@dataclass(frozen=True, slots=True)
class PendingErasure:
    """An erasure whose bytes may still be in the store's files (see ``gateway.erasure``):
    recorded with the erasure (``Changes.erasure``), removed once they are gone
    (``Changes.erasure_done``). ``erased_at`` is the erasure's commit time (Unix seconds). A
    record is a database row, so the finisher acts only on one the audit chain vouches for
    (``ErasureFinisher.vouched``)."""

    tenant: str
    session_id: str
    request_id: str
    erased_at: float


@dataclass(frozen=True, slots=True)
class SessionSummary:
    session_id: str
    version: int
    rounds: int
    created_at: float
    updated_at: float


class StoreReads(Protocol):
    """The reads of a store, on its own (``Store.snapshot``) or as part of it."""

    async def get_session(self, tenant: str, session_id: str) -> tuple[SessionRow | None, DataKeyRow | None]:
        """The session's state row and data key row, either ``None`` when absent."""

    async def list_sessions(self, tenant: str) -> list[SessionSummary]:
        """The tenant's sessions, newest first."""

    async def page_sessions(self, tenant: str, *, after: str | None, limit: int, prefix: str = "",
                            since: float | None = None, until: float | None = None) -> list[SessionSummary]:
        """At most *limit* of the tenant's sessions in session-id order, starting after the id
        *after* (keyset pagination on the primary key: stable while sessions are written); only
        ids starting with *prefix*, last written in ``[since, until)`` when those are given."""

    async def count_rounds_by_policy(self, tenant: str) -> dict[tuple[str, str], int]:
        """How many stored rounds of *tenant* each policy version recorded: ``{(id, hash): n}``."""

    def iter_rounds(self, tenant: str, session_id: str | None = None, *, since: float | None = None,
                    until: float | None = None, after_seq: int | None = None) -> AsyncIterator[RoundRow]:
        """Rounds of a tenant (or one session) in (session, seq) order, in constant memory; with
        *after_seq*, only those whose seq is greater (a page of one session's rounds)."""

    def iter_audit(self, tenant: str, *, after_seq: int = 0) -> AsyncIterator[AuditRow]:
        """A tenant's audit chain from ``after_seq + 1`` in sequence order, in constant memory."""

    async def quarantined(self, tenant: str) -> dict[str, int]:
        """The tenant's quarantined sessions: ``{session id: seq of the quarantine entry}``."""

    async def audit_head(self, tenant: str) -> int:
        """The seq of the tenant's newest audit entry (0 for an empty chain)."""

    async def tenants(self) -> list[str]:
        """Every tenant that has an audit chain, a session or a round."""

    def iter_data_keys(self) -> AsyncIterator[DataKeyRow]:
        """Every data key row (for master-key rotation)."""

    async def count_data_keys(self, kek_id: str) -> int:
        """How many data keys the master key *kek_id* wraps."""

    async def policy_versions(self) -> list[PolicyVersionRow]:
        """Every policy version kept, oldest first."""

    async def holds_provider_response(self, tenant: str, digest: bytes) -> bool:
        """Whether the provider response id of this digest (:func:`provider_id_digest`) passed
        through the gateway for *tenant* (its :func:`owned_response` row): one primary-key lookup."""


class Store(StoreReads, Protocol):
    """A durable home for sealed session data and the audit chain."""

    on_commit: Callable[[float, int], None] | None
    """Set before ``open()``: told each write transaction's duration in seconds and its number of
    writes (called from the writer; must be cheap and thread-safe)."""

    entry_key: EntryKey | None
    """Seals every audit entry's MAC (``gateway.audit.seal_entry``) and keys ``provider_responses``
    (:func:`owned_response`); None for a store opened without the signing key (tests, tools)."""

    async def open(self) -> None:
        """Create or migrate the schema and start any background workers."""

    async def close(self) -> None:
        """Finish pending writes and release connections."""

    async def read_session(self, tenant: str, session_id: str, *, hot: bool = False) -> Current:
        """The session's rows with their evidence (round count, head entry, quarantine), one read.
        *hot*: the caller used this session a moment ago (its pages are cached) and it holds few
        rounds, so a backend may read it without a thread hand-off (see ``SQLiteStore``)."""

    def transact(self, tenant: str, session_id: str | None, plan: Plan, *,
                 bounded: bool = False) -> asyncio.Future[Changes]:
        """Run *plan* on the current rows in one durable transaction; see the module docstring.

        The plan is handed to the backend when this is called (so calls are taken in call order),
        and the future completes whether or not anyone awaits it: a caller that must not leave a
        transaction unfinished when it is cancelled awaits it inside ``asyncio.shield``, which
        costs no task. A backend may commit at once, before returning (then the future is done).
        With ``session_id`` None only audit entries may be written. Fails with what the plan
        raises (nothing is written then) and ``StoreUnavailable`` when the database fails.
        *bounded*: the plan's work is bounded by one request's size (a round, an audit entry),
        so a backend may run it on the event loop's thread (see ``SQLiteStore``); a plan that
        may take long (erasing or rewriting a large session) leaves it False.
        """

    async def checkpoint(self) -> bool:
        """Fold the write-ahead log into the main file (so erased bytes leave the disk); False
        when another connection kept it from completing (retry later, see ``gateway.erasure``)."""

    async def pending_erasures(self) -> list[PendingErasure] | None:
        """Every erasure recorded as pending (``Changes.erasure``) and not done yet, oldest
        first, of every tenant; None when this backend records none (its checkpoint does not
        wait for other connections' readers: PostgreSQL). A stored record that is not one (edited
        outside the gateway: not JSON, a field missing or of another type, another name than its
        tenant and request id give) is left out, and logged once per process."""

    async def save_policy_versions(self, rows: list[PolicyVersionRow]) -> None:
        """Keep these policy versions; a hash already kept is left as it is (first load wins)."""

    def snapshot(self) -> contextlib.AbstractAsyncContextManager[StoreReads]:
        """Reads that all see the store as it was at one moment (one read transaction, so rows
        committed meanwhile are not half seen): what verification reads, the chain and the rows
        it is checked against. Raises ``StoreUnavailable``."""
