"""The stored data checked against the audit chain: bindings, the check on load, full verification.

The chain proves that its entries were not edited; this module proves that the *rows* are the
ones the entries describe, so a deleted, moved, duplicated or rolled-back row is found.

**Binding.** Every change that writes a session's rows carries an audit entry for that
session, and the store (:func:`bind`, inside the same transaction) adds to it the field
``state``: the session's rows as they are after the change,
``{"sha256": SHA-256 hex of the sealed state (None once the session is deleted), "version",
"next_seq", "rounds": how many round rows the session holds, "data_key": {"id", "kek_id",
"wrapped_sha256"}}`` (``data_key``: its data key row, :func:`key_binding`; absent once the
session is deleted, and in entries written before data keys were bound). Re-wrapping a data key
under another master key is such a change too: a ``rewrap`` entry, binding the state version it
found. The store also points ``session_heads.bound_seq`` at that entry: a per-session index
into the chain.

**On load** (:func:`check`, pure): the state row, the data key row, the round count and the
highest round seq must be the ones the head entry binds. A row deleted, moved, duplicated or rolled back
outside the gateway makes the session fail with an integrity error instead of a silently
shorter history. Writes run the same check inside their transaction, so nothing is recorded
on top of altered rows. Rows that are byte for byte what this process's own commit left
(``Current.own``: the SQLite store keeps them while no other connection commits, ``PRAGMA
data_version``, and compares them with what it reads after one) satisfy the check by
construction and skip it; any difference (an operator's edit included) runs it. The check
is cheap (one indexed query; counting the session's rounds is linear in their number) and
best-effort against an adversary who also rewinds ``session_heads``; :func:`verify_data` is not.
It does not read the rounds' ciphertexts (that would read the whole session on every request):
one edited in place, or swapped for another round's, keeps count and seqs and passes it; it is
found by :func:`verify_data` and fails to decrypt when the round is opened (AEAD bound to
tenant, session and seq).

**Full verification** (:func:`verify_data`): for every session of a tenant, each round entry
(``round`` or ``import`` with ``round_seq`` and ``ciphertext_sha256``) names a stored round with
exactly that ciphertext hash, unless a later ``erasure`` or ``purge`` (``detail.seqs``, or
``detail.session_erased``) accounts for its absence; every stored round has its entry; and
the stored state is the one the session's latest binding describes. The chain itself must
number each session's rounds upwards and bind ever later state versions: a round seq or a state
version that an entry records again with no erasure (or whole-session purge) between them means
the earlier round or state was deleted or rolled back outside the gateway, head pointer and all,
and the number used again by a later write (``round_missing`` naming the earlier entry,
``state_mismatch``). A stored round's plaintext
columns are the entry's too (:func:`round_columns`: kind, request id, policy id and version
hash, outcome; its time within :data:`TIME_SLACK` of the entry's), so a round cannot be moved
out of an export's time range, credited to another request, marked with another outcome or put
under another policy version's redaction and retention. The policy version a round was recorded
under must be kept in ``policy_versions``, its document hashing to its key
(``gateway.policy.versions``), for every round whose entry binds rows (the gateway has kept
versions since it has bound rows), whether or not the round is still stored. A retention purge
is judged by its rounds' entries and versions, and one that erased a session whole by the
session's last write in the chain (``purge_premature``); the store's quarantine marks must be the chain's; and a session
that holds sealed rows must hold the data key they name, the one its latest binding records
(a row relabelled with another master key id, one the key file never held or one it retired,
fails as ``data_key_altered``), and one that unwraps (with ``open_key``). A key whose master key
the key file lacks or has retired is only noted, when the chain vouches for the row or (a
session last written before data keys were bound) the key file knows the id as retired; an id
the key file never held fails. Every ``erasure_completed`` entry must follow the ``erasure``
entry of its request and session (``erasure_unmatched``).
Every mismatch is reported (:class:`DataReport`: the first
:data:`PER_KIND` of each kind, each kind counted), in (session, round) order, with tenant,
session, round and audit entry, so that one planted cheap problem does not hide the others.
Memory holds one hash, one time and the interned columns per live round of the tenant. Sessions
recorded before bindings existed (no entry of theirs has ``state``, and their first entry came
before the chain's first from a gateway that binds every write: one carrying a binding or an
entry MAC) get their rounds checked but not their state, and a note says so; a session begun
after that whose entries bind nothing (it records nothing) must hold no state row
(``state_unrecorded``: one was moved there).

**Row types.** Both stores build every session read (:func:`current`) and every round and audit
row they page through (:func:`typed`) here, checking that each value has the type the gateway
writes in its column. SQLite keeps whatever an edit puts there (``replace()`` on a blob returns
text), so a value of another type is a row edited outside the gateway: a session read gives
:class:`Altered`, which the check on load fails (quarantine), and a paged row raises
``gateway.audit.AlteredRow`` when reached, which verification reports naming the row and the
column, instead of a ``TypeError`` wherever the value is used.

**Quarantine.** A session that failed an integrity check is quarantined (``Changes.quarantine``
and a ``quarantine`` audit entry); until an operator releases it (``sessiongate sessions
release``, a ``release`` entry) or erases it, every request on it is refused with the same
integrity error and each refusal is a ``refusal`` entry. See ``gateway.sessions``. Full
verification checks the store's marks (``session_heads.quarantined_seq``) against the chain: the
mark is the quarantine entry no ``release`` or erasure followed, so clearing or setting one in the
database is found.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeVar

import orjson

from gateway import crypto
from gateway.audit import AlteredRow, VerifyError, aclose
from gateway.errors import IntegrityError, NotFound
from gateway.keyring import MasterKeyUnavailable
from gateway.store.base import AuditRow, Changes, Current, DataKeyRow, RoundRow, SessionRow

BINDING = "state"
"""The audit entry field that binds a session's rows."""

DATA_ERROR_KINDS = (
    "round_missing",      # an entry records a round the store no longer holds
    "round_unrecorded",   # the store holds a round no entry records (inserted, duplicated, moved in)
    "round_mismatch",     # the stored round is not the one its entry records
    "state_missing",      # the session's state row is gone while its latest entry says it exists
    "state_mismatch",     # the state row is not the one the latest entry describes (rolled back)
    "state_unrecorded",   # a state row no entry accounts for
    "round_relabelled",   # a stored round's columns (time, request, policy, outcome, kind) are not its entry's
    "policy_version_missing",  # the policy version a round was recorded under is not kept
    "policy_version_altered",  # ... or its kept document does not hash to the version
    "quarantine_lifted",  # the chain's quarantine of a session is not marked in the store (cleared by hand)
    "quarantine_unrecorded",  # the store marks a session quarantined that no entry in force quarantined
    "purge_premature",    # a purge deleted a round its version's retention had not expired (by its entry)
    "data_key_missing",   # a session holds sealed rows but no data key: unreadable, no erasure recorded
    "data_key_mismatch",  # its rows were sealed under another data key than the one stored for it
    "data_key_altered",   # its data key does not unwrap, or is not the one the chain records
    "erasure_unmatched",  # an erasure_completed entry that no erasure entry of its request and session precedes
)

ROUND_EVENTS = ("round", "import", "history")
"""Audit events that record a stored round (imported rounds and edited history are rounds too)."""

TIME_SLACK = 5.0
"""Seconds a round's ``created_at`` and its entry's time may differ: the store reads the clock
for both in the round's one transaction."""

COLUMNS = ("kind", "request_id", "policy_id", "policy_hash", "outcome")
"""A round row's plaintext columns that its entry vouches for, in :func:`round_columns`' order."""
_POLICY_HASH = COLUMNS.index("policy_hash")

_FIXED_OUTCOME = {"import": "imported", "history": "completed"}


def round_columns(doc: dict[str, Any]) -> tuple[str | None, ...]:
    """What the :data:`COLUMNS` of the round *doc* (a round entry's body) records must hold, as
    ``gateway.sessions`` writes them: ``kind`` is the entry's event; ``request_id``,
    ``policy_id`` and ``policy_hash`` are the entry's (None when an older entry lacks the field:
    not checked); ``outcome`` is the entry's for a ``round``, ``imported`` for an ``import``,
    ``completed`` for ``history``."""
    def field_(name: str) -> str | None:
        if name not in doc:
            return None
        return "" if doc[name] is None else str(doc[name])

    event = str(doc.get("event"))
    outcome = field_("outcome") if event == "round" else _FIXED_OUTCOME.get(event)
    return (event, field_("request_id"), field_("policy_id"), field_("policy_hash"), outcome)


def relabelled(want: tuple[str | None, ...], entry_time: float, have: Mapping[str, Any],
               created_at: float | None) -> str | None:
    """How a stored round or an exported record (*have*: its columns by name; those it lacks are
    not compared) disagrees with what its entry records (*want*, from :func:`round_columns`, and
    the entry's time); None when it does not."""
    for name, value in zip(COLUMNS, want, strict=True):
        if value is not None and name in have and have[name] != value:
            return f"its {name} is {have[name]!r} where the entry records {value!r}"
    if created_at is not None and abs(created_at - entry_time) > TIME_SLACK:
        return f"its time is {_iso(created_at)} where the entry's is {_iso(entry_time)}"
    return None


def _intern(value: str | None) -> str | None:
    return None if value is None else sys.intern(value)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- rows as the stores read them

R = TypeVar("R")
_NUMBER = (int, float)
_COLUMNS: dict[type, tuple[tuple[str, type | tuple[type, ...]], ...]] = {
    SessionRow: (("tenant", str), ("session_id", str), ("version", int), ("next_seq", int), ("state_ct", bytes),
                 ("created_at", _NUMBER), ("updated_at", _NUMBER)),
    DataKeyRow: (("tenant", str), ("session_id", str), ("dk_id", bytes), ("kek_id", str), ("wrapped", bytes),
                 ("created_at", _NUMBER)),
    RoundRow: (("tenant", str), ("session_id", str), ("seq", int), ("created_at", _NUMBER), ("request_id", str),
               ("policy_id", str), ("policy_hash", str), ("outcome", str), ("kind", str), ("ct", bytes)),
    AuditRow: (("tenant", str), ("seq", int), ("created_at", _NUMBER), ("body", bytes), ("prev_hash", str),
               ("hash", str)),
}
"""Each row class's columns, in order, with the Python type the gateway writes there."""
_TYPES = {cls: tuple(t for _, t in columns) for cls, columns in _COLUMNS.items()}
_SESSION_TAIL, _KEY_TAIL, _AUDIT_TYPES = _TYPES[SessionRow][2:], _TYPES[DataKeyRow][2:], _TYPES[AuditRow]
_TABLES = {SessionRow: "sessions", DataKeyRow: "data_keys", RoundRow: "rounds", AuditRow: "audit"}
_TYPE_NAMES = {str: "text", bytes: "a blob", int: "an integer", float: "a number", type(None): "NULL"}


def typed(cls: type[R], values: Sequence[Any]) -> R:
    """``cls(*values)`` (a ``SessionRow``, ``DataKeyRow``, ``RoundRow`` or ``AuditRow`` as read
    from its table), after checking that every value has the type the gateway writes in its
    column. SQLite keeps whatever an edit puts in a column (``replace()`` on a blob gives text,
    ``created_at='yesterday'`` stays text), so a value of another type is a row edited outside
    the gateway: :class:`~gateway.audit.AlteredRow`, naming the row and the column, instead of a
    ``TypeError`` wherever the value is used. Both stores read every row through this."""
    if all(map(isinstance, values, _TYPES[cls])):
        return cls(*values)
    raise _altered(cls, values)


def typed_or_altered(cls: type[R], records: Sequence[Sequence[Any]]) -> list[R | AlteredRow]:
    """:func:`typed` of each record of a page, an altered one as its ``AlteredRow`` in its place
    (a page reader raises it when it comes to it, after yielding the rows before it)."""
    out: list[R | AlteredRow] = []
    for values in records:
        try:
            out.append(typed(cls, values))
        except AlteredRow as exc:
            out.append(exc)
    return out


def _altered(cls: type, values: Sequence[Any]) -> AlteredRow:
    names = dict(zip((name for name, _ in _COLUMNS[cls]), values, strict=False))
    name, want = next((n, t) for (n, t), v in zip(_COLUMNS[cls], values, strict=False) if not isinstance(v, t))
    want_name = _TYPE_NAMES[want[1] if isinstance(want, tuple) else want]
    have = _TYPE_NAMES.get(type(names[name]), type(names[name]).__name__)
    if isinstance(names[name], bytes) and want is str:
        have = "a blob (or text that is not UTF-8)"
    tenant, sid = names.get("tenant"), names.get("session_id")
    seq = names.get("seq") if isinstance(names.get("seq"), int) else None
    where = f"tenant {tenant}" if isinstance(tenant, str) else "a tenant"
    if cls is AuditRow:
        where += f", audit entry {seq}" if seq is not None else ", an audit entry"
    else:
        where += f", session {sid}" if isinstance(sid, str) else ""
        where += f", round {seq}" if cls is RoundRow and seq is not None else ""
    detail = (f"{where}: its {_TABLES[cls]} row holds {have} in column {name}, where the gateway stores "
              f"{want_name}: the row was edited outside the gateway")
    session_id = sid if isinstance(sid, str) else None
    if cls is AuditRow:
        return AlteredRow(detail, "edited", seq=seq)
    if cls is RoundRow:
        kind = "round_mismatch" if name == "ct" else "round_relabelled"
        return AlteredRow(detail, kind, session_id=session_id, round_seq=seq)
    kind = "state_mismatch" if cls is SessionRow else "data_key_altered"
    return AlteredRow(detail, kind, session_id=session_id)


@dataclass(frozen=True, slots=True)
class Altered(Current):
    """A session read (``Store.read_session``) whose rows do not all have the types the gateway
    writes: the rows that do are kept, the others left out (nothing downstream may use their
    values), and :func:`check` fails with :attr:`error`, so a request on the session is refused
    with the integrity error and the session quarantined, like any other altered row. An erasure
    still finds what it deletes."""

    error: AlteredRow | None = None


def current(tenant: str, session_id: str, session: Sequence[Any] | None, data_key: Sequence[Any] | None,
            rounds: Any, max_seq: Any, quarantined_seq: Any, reason: Any, head: Sequence[Any] | None) -> Current:
    """The ``Current`` of one session as a store read it (both stores build it here): *session*
    and *data_key* are the columns of its ``sessions`` and ``data_keys`` rows after tenant and
    session id, *head* the ``audit`` row ``session_heads.bound_seq`` points at (each None when
    absent); *rounds* and *max_seq* its round count and highest round seq; *quarantined_seq* and
    *reason* its ``session_heads`` quarantine. A value of a type the gateway never writes gives
    :class:`Altered`. On every load: the types are checked in one pass of C calls."""
    if ((session is None or all(map(isinstance, session, _SESSION_TAIL)))
            and (data_key is None or all(map(isinstance, data_key, _KEY_TAIL)))
            and (head is None or all(map(isinstance, head, _AUDIT_TYPES)))
            and type(rounds) is int and type(max_seq) is int
            and (quarantined_seq is None
                 or (type(quarantined_seq) is int and (reason is None or type(reason) is str)))):
        return Current(tenant, session_id, SessionRow(tenant, session_id, *session) if session is not None else None,
                       DataKeyRow(tenant, session_id, *data_key) if data_key is not None else None, rounds, max_seq,
                       AuditRow(*head) if head is not None else None,
                       (reason or "quarantined") if quarantined_seq is not None else None)
    return _altered_current(tenant, session_id, session, data_key, rounds, max_seq, quarantined_seq, head)


def _altered_current(tenant: str, session_id: str, session: Sequence[Any] | None, data_key: Sequence[Any] | None,
                     rounds: Any, max_seq: Any, quarantined_seq: Any, head: Sequence[Any] | None) -> Altered:
    """:func:`current` of rows one of which holds a value of a wrong type: the others are kept."""
    problem: AlteredRow | None = None
    srow = krow = hrow = None
    try:
        srow = typed(SessionRow, (tenant, session_id, *session)) if session is not None else None
    except AlteredRow as exc:
        problem = exc
    try:
        krow = typed(DataKeyRow, (tenant, session_id, *data_key)) if data_key is not None else None
    except AlteredRow as exc:
        problem = problem or exc
    try:
        hrow = typed(AuditRow, head) if head is not None else None
    except AlteredRow as exc:
        problem = problem or exc
    if problem is None and not (type(rounds) is int and type(max_seq) is int):
        problem = AlteredRow(f"tenant {tenant}, session {session_id}: a rounds row of the session holds "
                             f"{_TYPE_NAMES.get(type(max_seq), type(max_seq).__name__)} in column seq, where the "
                             "gateway stores an integer: the row was edited outside the gateway",
                             "round_relabelled", session_id=session_id)
    if problem is None:
        problem = AlteredRow(f"tenant {tenant}, session {session_id}: its session_heads row's quarantine columns "
                             "hold values of types the gateway never writes: the row was edited outside the "
                             "gateway", "quarantine_unrecorded", session_id=session_id)
    return Altered(tenant, session_id, srow, krow, rounds if type(rounds) is int else 0,
                   max_seq if type(max_seq) is int else 0, hrow,
                   "quarantined" if quarantined_seq is not None else None, False, problem)


# --------------------------------------------------------------------------- binding (in the store)


def _writes_rows(ch: Changes) -> bool:
    return bool(ch.session is not None or ch.data_key is not None or ch.delete_session or ch.rounds
                or ch.delete_round_seqs)


def key_binding(row: DataKeyRow) -> dict[str, str]:
    """What a binding records of a session's data key row: the data key's id, the master key that
    wraps it and the wrapped bytes' SHA-256 (hex), so a row relabelled with another master key id,
    replaced or rolled back differs."""
    return {"id": bytes(row.dk_id).hex(), "kek_id": row.kek_id,
            "wrapped_sha256": hashlib.sha256(row.wrapped).hexdigest()}


def binding(cur: Current, ch: Changes) -> dict[str, Any] | None:
    """What the session's rows will be after *ch*; None when *ch* does not write them."""
    if cur.session_id is None or not _writes_rows(ch):
        return None
    rounds = 0 if ch.delete_session else cur.rounds
    rounds += len(ch.rounds) - len(ch.delete_round_seqs)
    session = ch.session if ch.session is not None else (None if ch.delete_session else cur.session)
    if session is None:
        return {"sha256": None, "version": 0, "next_seq": 0, "rounds": rounds}
    state: dict[str, Any] = {"sha256": hashlib.sha256(session.state_ct).hexdigest(), "version": session.version,
                             "next_seq": session.next_seq, "rounds": rounds}
    key = ch.data_key if ch.data_key is not None else cur.data_key
    if key is not None:
        state["data_key"] = key_binding(key)
    return state


def bind(cur: Current, ch: Changes) -> int | None:
    """Add the binding to the last audit entry of *ch* for the session; returns that entry's
    index, None when *ch* writes no session rows. A change that writes a session's rows
    without an entry for it stays unbound: the check on load and :func:`verify_data` then find
    rows that no entry accounts for (every write of ``gateway.sessions`` carries one)."""
    state = binding(cur, ch)
    if state is None:
        return None
    for index in range(len(ch.audit) - 1, -1, -1):
        if ch.audit[index].get("session_id") == cur.session_id:
            ch.audit[index] = {**ch.audit[index], BINDING: state}
            return index
    return None


@dataclass(frozen=True, slots=True)
class HeadUpdate:
    """What a committed change does to the session's ``session_heads`` row."""

    tenant: str
    session_id: str
    bound_seq: int | None          # new head entry, or None to keep it
    quarantine: tuple[int, str] | None = None  # (entry seq, reason) to quarantine
    clear_quarantine: bool = False


def head_update(cur: Current, ch: Changes, rows: list[AuditRow], bound: int | None) -> HeadUpdate | None:
    """The ``session_heads`` change for *ch*, whose audit entries were sealed as *rows*."""
    if cur.session_id is None:
        return None
    bound_seq = rows[bound].seq if bound is not None else None
    quarantine = (rows[-1].seq, ch.quarantine[:200]) if ch.quarantine and rows else None
    clear = ch.release or ch.delete_session
    if bound_seq is None and quarantine is None and not clear:
        return None
    return HeadUpdate(cur.tenant, cur.session_id, bound_seq, quarantine, clear and quarantine is None)


def after(cur: Current, ch: Changes, rows: list[AuditRow], bound: int | None) -> Current:
    """The session as *ch* leaves it (for a backend that stages several plans in memory)."""
    if cur.session_id is None:
        return cur
    session, data_key = cur.session, cur.data_key
    rounds, max_seq = cur.rounds, cur.max_seq
    if ch.delete_session:
        session = data_key = None
        rounds = max_seq = 0
    if ch.data_key is not None:
        data_key = ch.data_key
    if ch.session is not None:
        session = ch.session
    rounds += len(ch.rounds) - len(ch.delete_round_seqs)
    max_seq = max([max_seq, *(r.seq for r in ch.rounds)])
    head = rows[bound] if bound is not None else cur.head
    quarantine = cur.quarantine
    if ch.release or ch.delete_session:
        quarantine = None
    if ch.quarantine:
        quarantine = ch.quarantine[:200]
    return Current(cur.tenant, cur.session_id, session, data_key, rounds, max_seq, head, quarantine, cur.own)


# --------------------------------------------------------------------------- the check on load


def check(cur: Current) -> str | None:
    """None when the session's rows are the ones its head entry binds, else what differs (for
    the operator's log: tenant, session, audit entry; never content)."""
    if cur.own:
        return None  # derived from the binding this process just committed (see Current.own)
    if isinstance(cur, Altered) and cur.error is not None:
        return cur.error.detail  # a row holds a value of a type the gateway never writes
    head = cur.head
    where = f"tenant {cur.tenant}, session {cur.session_id}"
    if head is None:
        return None  # never bound: recorded before bindings existed, or never written
    try:
        doc = orjson.loads(head.body)
        ok = (hashlib.sha256(head.body).hexdigest() == head.hash and doc.get("tenant") == cur.tenant
              and doc.get("session_id") == cur.session_id and isinstance(doc.get(BINDING), dict))
    except orjson.JSONDecodeError:
        ok = False
    if not ok:
        return f"{where}: audit entry {head.seq}, which the session's head points to, does not bind this session"
    state = doc[BINDING]
    at = f"audit entry {head.seq} ({doc.get('event')})"
    if state.get("sha256") is None:
        if cur.session is not None or cur.rounds:
            return f"{where}: the store holds rows of this session but {at} deleted it"
        return None
    if cur.session is None:
        return f"{where}: the session's state row is missing; {at} records version {state.get('version')}"
    problem = key_difference(where, at, state.get("data_key"), cur.data_key)
    if problem is not None:
        return problem
    if (hashlib.sha256(cur.session.state_ct).hexdigest() != state.get("sha256")
            or cur.session.version != state.get("version") or cur.session.next_seq != state.get("next_seq")):
        return (f"{where}: the stored state (version {cur.session.version}) is not the one {at} records "
                f"(version {state.get('version')}): it was rolled back or replaced")
    if cur.rounds != state.get("rounds"):
        return (f"{where}: the store holds {cur.rounds} round(s), {at} records {state.get('rounds')}: "
                "rounds were deleted, moved or added outside the gateway")
    if cur.max_seq >= cur.session.next_seq:
        return f"{where}: the store holds round {cur.max_seq}, which no audit entry records"
    return None


def key_difference(where: str, at: str, bound: Any, row: DataKeyRow | None) -> str | None:
    """How the data key row *row* differs from *bound*, the ``data_key`` binding of the entry
    *at*; None when it is that one, or when the entry binds no data key (written before they were
    bound)."""
    if not isinstance(bound, dict):
        return None
    if row is None:
        return f"{where}: the session's data key row is missing; {at} records data key {bound.get('id')}"
    have = key_binding(row)
    if have == bound:
        return None
    return (f"{where}: its data key row (data key {have['id']}, master key {have['kek_id']!r}, wrapped bytes "
            f"{have['wrapped_sha256'][:16]}) is not the one {at} records (data key {bound.get('id')}, master key "
            f"{bound.get('kek_id')!r}, wrapped bytes {str(bound.get('wrapped_sha256'))[:16]}): it was relabelled, "
            "replaced or rolled back outside the gateway")


def vouches_for_key(cur: Current) -> bool | None:
    """Whether the session's head entry binds its data key row as it is: True or False; None when
    the head binds no data key (never bound, or bound before data keys were)."""
    if cur.head is None or cur.data_key is None:
        return None
    try:
        doc = orjson.loads(cur.head.body)
    except orjson.JSONDecodeError:
        return False
    state = doc.get(BINDING) if isinstance(doc, dict) else None
    bound = state.get("data_key") if isinstance(state, dict) else None
    if not isinstance(bound, dict):
        return None
    return key_binding(cur.data_key) == bound


# --------------------------------------------------------------------------- full verification


DAY = 86400.0


class Kept(NamedTuple):
    """A kept policy version, as verification needs it."""

    proves: bool       # its document hashes to its version hash
    days: int | None   # its retention (None: kept until deleted explicitly)


@dataclass(frozen=True, slots=True)
class _Entry:
    """What a round entry records of its stored round."""

    digest: str       # ciphertext_sha256
    seq: int          # the entry's seq
    time: float       # the entry's time
    columns: tuple[str | None, ...]  # round_columns, interned
    versioned: bool   # the entry binds rows: its policy version must be kept


@dataclass(slots=True)
class _Session:
    rounds: dict[int, _Entry] = field(default_factory=dict)  # by round seq
    optional: set[int] = field(default_factory=set)     # legacy purges without seqs
    legacy_hashes: set[str] = field(default_factory=set)  # legacy imports without round_seq
    state: tuple[int, str, dict[str, Any]] | None = None  # (entry seq, event, binding)
    written: tuple[int, float] | None = None  # (seq, time) of the last entry that wrote its rows
    quarantined: int | None = None  # the quarantine entry no release or erasure has lifted
    premature: VerifyError | None = None  # the first round purged before its retention expired it
    top: int = 0      # the highest round seq recorded since the session's numbering (re)started
    version: tuple[int, int] = (0, 0)  # (entry seq, state version) of the last binding since then
    reused: VerifyError | None = None  # the first round number or state version the chain records twice
    erasures: set[str] = field(default_factory=set)  # request ids of the session's erasure entries
    seen: bool = False
    since: int | None = None  # the first entry naming the session since its numbering (re)started


PER_KIND = 10
"""How many problems of one kind a report lists (each kind is counted in full)."""


@dataclass(slots=True)
class DataReport:
    """What :func:`verify_data` found: counts, every problem (the first :data:`PER_KIND` of each
    kind, each kind counted in full), the first of them, notes."""

    sessions: int = 0
    rounds: int = 0
    first_error: VerifyError | None = None
    errors: list[VerifyError] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, error: VerifyError | None) -> None:
        """Note *error* (None: nothing)."""
        if error is None:
            return
        self.counts[error.kind] = self.counts.get(error.kind, 0) + 1
        if self.counts[error.kind] <= PER_KIND:
            self.errors.append(error)
        if self.first_error is None:
            self.first_error = error


@dataclass(slots=True)
class _Chain:
    """What the chain says of the tenant as a whole."""

    bound_from: int | None = None
    """The first entry written by a gateway that binds every write of a session's rows (one that
    carries a binding or an entry MAC: MACs came after bindings)."""
    versions: dict[str, tuple[int, str, int, str]] = field(default_factory=dict)
    """Each policy version hash a round entry that binds rows records, with its first such entry
    (entry seq, session, round seq, policy id): those versions must be kept."""


def expect(sessions: dict[str, _Session], row: AuditRow, versions: dict[str, Kept] | None = None,
           chain: _Chain | None = None) -> None:
    """Fold one audit entry into the per-session expectations (with *versions*, a purge of a
    round its version's retention had not yet expired is noted as the session's error), and into
    *chain*'s tenant-wide ones. An entry that is not a JSON object (edited: the chain check names
    it) is skipped."""
    try:
        doc = orjson.loads(row.body)
    except orjson.JSONDecodeError:
        return
    if not isinstance(doc, dict):
        return
    if chain is not None and chain.bound_from is None and (isinstance(doc.get(BINDING), dict) or "mac" in doc):
        chain.bound_from = row.seq
    sid = doc.get("session_id")
    if not isinstance(sid, str):
        return
    s = sessions.setdefault(sid, _Session())
    s.seen = True
    if s.since is None:
        s.since = row.seq
    event, digest, detail = doc.get("event"), doc.get("ciphertext_sha256"), doc.get("detail") or {}
    if event == "purge" and isinstance(detail.get("seqs"), list) and versions is not None and s.premature is None:
        s.premature = (_premature(sid, s, row, detail["seqs"], versions)
                       or (_erased_active(sid, s, row, detail["seqs"], versions) if detail.get("session_erased")
                           else None))
    if event in ROUND_EVENTS and isinstance(digest, str):
        seq = doc.get("round_seq")
        if isinstance(seq, int):
            if seq <= s.top and s.reused is None:
                s.reused = _reused(sid, s, row, seq)
            s.top = max(s.top, seq)
            kind, request_id, *repeated = round_columns(doc)  # intern all but the request id: they repeat
            columns = (_intern(kind), request_id, *map(_intern, repeated))
            versioned = isinstance(doc.get(BINDING), dict)
            s.rounds[seq] = _Entry(digest, row.seq, row.created_at, columns, versioned)
            policy_hash = columns[_POLICY_HASH]
            if chain is not None and versioned and policy_hash and policy_hash not in chain.versions:
                chain.versions[policy_hash] = (row.seq, sid, seq, str(columns[COLUMNS.index("policy_id")]))
        else:
            s.legacy_hashes.add(digest)
    elif event == "erasure_completed":
        if doc.get("request_id") not in s.erasures and s.reused is None:  # the chain contradicts itself
            s.reused = VerifyError(row.seq, "erasure_unmatched", f"session {sid}: audit entry {row.seq} records "
                                   f"erasure {doc.get('request_id')!r} of the session as completed, but no earlier "
                                   "erasure entry of the session has that request id: the pending erasure it "
                                   "finished was written into the database outside the gateway", session_id=sid)
    elif event == "quarantine":
        s.quarantined = row.seq
    elif event == "release":
        s.quarantined = None
    elif event == "erasure" or (event == "purge" and detail.get("session_erased")):
        s.quarantined = None
        if event == "erasure" and isinstance(doc.get("request_id"), str):
            s.erasures.add(doc["request_id"])
        s.top, s.version = 0, (row.seq, 0)  # a new session under this id numbers from 1 again
        s.since = None
        s.rounds.clear()
        s.optional.clear()
        s.legacy_hashes.clear()
    elif event == "purge":
        seqs = detail.get("seqs")
        if isinstance(seqs, list):
            for seq in seqs:
                s.rounds.pop(seq, None)
        else:
            s.optional.update(s.rounds)
    if isinstance(doc.get(BINDING), dict):
        state = doc[BINDING]
        version = state.get("version") if state.get("sha256") is not None else 0
        if isinstance(version, int):
            # a re-wrap writes the data key row alone: it binds the state version it found
            if version and (version < s.version[1] or (version == s.version[1] and event != "rewrap")) \
                    and s.reused is None:
                s.reused = _rolled_back(sid, s, row, str(event), version)
            s.version = (row.seq, version)
        s.state = (row.seq, str(event), state)
        s.written = (row.seq, row.created_at)


def _reused(sid: str, s: _Session, row: AuditRow, seq: int) -> VerifyError:
    """Entry *row* records round *seq* of the session although an earlier entry recorded a round
    of that number or a later one, with no erasure between them: a session numbers its rounds up
    from 1 and only an erasure (or a purge that erases it whole) starts it again, so the earlier
    round was deleted or rolled back and its number used again."""
    earlier = s.rounds.get(seq)
    what = (f"audit entry {earlier.seq} records this round" if earlier is not None
            else f"an earlier entry recorded rounds up to {s.top}")
    return VerifyError(earlier.seq if earlier is not None else row.seq, "round_missing",
                       f"session {sid}, round {seq}: {what}, but audit entry {row.seq} records round {seq} again "
                       "with no erasure of the session between them: the earlier round was deleted or rolled back "
                       "outside the gateway and its number used again", session_id=sid, round_seq=seq)


def _rolled_back(sid: str, s: _Session, row: AuditRow, event: str, version: int) -> VerifyError:
    """Entry *row* binds a state version no later than one an earlier entry bound, with no
    erasure between them: every write makes the next version, so the state was put back."""
    earlier, had = s.version
    return VerifyError(row.seq, "state_mismatch",
                       f"session {sid}: audit entry {row.seq} ({event}) binds version {version} of the session's "
                       f"state, but audit entry {earlier} had already bound version {had}, with no erasure "
                       "between them: the state was rolled back outside the gateway before entry "
                       f"{row.seq} was written", session_id=sid)


def _erased_active(sid: str, s: _Session, purge: AuditRow, seqs: list[Any],
                   versions: dict[str, Kept]) -> VerifyError | None:
    """A purge that erased the session whole although an entry wrote its rows after the purged
    rounds' retention began to count: idle means unwritten for the longest retention among them
    (as the purge decides), judged by the chain, not by the session row's time. Rounds whose
    version is not kept as recorded, or keeps rounds for good, are left to the other checks."""
    longest = 0.0
    for seq in seqs:
        entry = s.rounds.get(seq) if isinstance(seq, int) else None
        kept = versions.get(entry.columns[_POLICY_HASH] or "") if entry is not None else None
        if entry is None or kept is None or not kept.proves or kept.days is None:
            return None
        longest = max(longest, kept.days)
    if not seqs or s.written is None:
        return None
    idle_since = purge.created_at - longest * DAY
    seq, written_at = s.written
    if written_at <= idle_since + TIME_SLACK:
        return None
    return VerifyError(purge.seq, "purge_premature",
                       f"session {sid}: purge entry {purge.seq} erased it whole at {_iso(purge.created_at)} as idle "
                       f"since {_iso(idle_since)}, but audit entry {seq} wrote it at {_iso(written_at)}; the session "
                       "row's time was changed before the purge", session_id=sid)


def _premature(sid: str, s: _Session, purge: AuditRow, seqs: list[Any],
               versions: dict[str, Kept]) -> VerifyError | None:
    """The first round *purge* deleted before its version's retention expired it, judged by the
    round's entry (its time and version), not by the row the purge read. Rounds whose version is
    not kept as recorded are left to ``policy_version_*``."""
    for seq in seqs:
        entry = s.rounds.get(seq) if isinstance(seq, int) else None
        kept = versions.get(entry.columns[_POLICY_HASH] or "") if entry is not None else None
        if entry is None or kept is None or not kept.proves:
            continue
        due = None if kept.days is None else entry.time + kept.days * DAY
        if due is None or due > purge.created_at + TIME_SLACK:
            until = "it kept rounds until deleted explicitly" if due is None else f"it was not due until {_iso(due)}"
            return VerifyError(purge.seq, "purge_premature",
                               f"session {sid}, round {seq}: purge entry {purge.seq} deleted it at "
                               f"{_iso(purge.created_at)}, but audit entry {entry.seq} recorded it at "
                               f"{_iso(entry.time)} under policy version {(entry.columns[_POLICY_HASH] or '')[:12]} "
                               f"({'no' if kept.days is None else kept.days} days' retention): {until}; the "
                               "row's time or version was changed before the purge", session_id=sid, round_seq=seq)
    return None


async def verify_data(tenant: str, audit_rows: AsyncIterator[AuditRow], stored_rounds: AsyncIterator[RoundRow],
                      state_of: Callable[[str], Awaitable[tuple[SessionRow | None, DataKeyRow | None]]],
                      state_ids: list[str], versions: dict[str, Kept] | None = None,
                      quarantined: dict[str, int] | None = None,
                      open_key: Callable[[DataKeyRow], object] | None = None) -> DataReport:
    """Check *tenant*'s stored rows against its chain (see the module docstring).

    *audit_rows* and *stored_rounds* are ``Store.iter_audit`` and ``Store.iter_rounds`` of the
    tenant; *state_ids* the ids of its state rows; *state_of* reads one session's state and data
    key rows (``Store.get_session``); *versions* the kept policy versions, by hash (``Kept``);
    *quarantined* the store's quarantined sessions (``Store.quarantined``); *open_key* unwraps a
    data key row (``IntegrityError`` when it does not; with ``key_unavailable`` set when its
    master key is not in the key file). Each None: not checked. A row the store reads with a
    value of a type the gateway never writes there (``AlteredRow``) is the report's error.

    Raises ``NotFound`` when the tenant has nothing at all, no entry and no row (a mistyped
    name): an empty chain would otherwise verify as intact. Called after the chain check, which
    fails first for a tenant with signed checkpoints but no entries.
    """
    report = DataReport()
    try:
        return await _verify_data(report, tenant, audit_rows, stored_rounds, state_of, state_ids, versions,
                                  quarantined, open_key)
    except AlteredRow as exc:  # a row of a type the gateway never writes: edited, named by the store
        report.add(exc.error())
        return report


async def _verify_data(report: DataReport, tenant: str, audit_rows: AsyncIterator[AuditRow],
                       stored_rounds: AsyncIterator[RoundRow],
                       state_of: Callable[[str], Awaitable[tuple[SessionRow | None, DataKeyRow | None]]],
                       state_ids: list[str], versions: dict[str, Kept] | None, quarantined: dict[str, int] | None,
                       open_key: Callable[[DataKeyRow], object] | None) -> DataReport:
    sessions: dict[str, _Session] = {}
    chain = _Chain()
    entries = 0
    try:
        async for row in audit_rows:
            entries += 1
            expect(sessions, row, versions, chain)
    finally:
        await aclose(audit_rows)
    stored: dict[str, dict[int, str]] = {}
    columns: dict[str, dict[int, VerifyError]] = {}  # (rare) rounds whose columns disagree, by session and seq
    key_ids: dict[str, set[bytes]] = {}  # the data key ids the session's rounds were sealed under
    named: set[str] = set()  # policy versions a stored round's check names as missing or altered
    try:
        async for r in stored_rounds:
            digest = hashlib.sha256(r.ct).hexdigest()
            stored.setdefault(r.session_id, {})[r.seq] = digest
            key_ids.setdefault(r.session_id, set()).add(crypto.key_id_of(r.ct))
            report.rounds += 1
            entry = sessions[r.session_id].rounds.get(r.seq) if r.session_id in sessions else None
            if entry is not None and entry.digest == digest:
                error = _columns_error(tenant, r, entry, versions)
                if error is not None:
                    columns.setdefault(r.session_id, {})[r.seq] = error
                    if error.kind.startswith("policy_version_"):
                        named.add(r.policy_hash)
    finally:
        await aclose(stored_rounds)
    if not (entries or report.rounds or state_ids or quarantined):
        raise NotFound(f"no tenant '{tenant}' in this gateway's store: no audit entry, session or signed checkpoint "
                       "names it, so there is nothing to verify (check the tenant's name)")
    ids = sorted(set(sessions) | set(stored) | set(state_ids) | set(quarantined or ()))
    report.sessions = len(ids)
    legacy = unchecked = 0
    for sid in ids:
        s = sessions.get(sid, _Session())
        if s.reused is not None:
            report.add(replace(s.reused, message=f"tenant {tenant}, {s.reused.message}"))
        for error in _rounds_errors(tenant, sid, s, stored.get(sid, {}), columns.get(sid, {})):
            report.add(error)
        held = s.state is not None or sid in state_ids or sid in stored
        srow, krow = await state_of(sid) if held else (None, None)
        state_error = _state_error(tenant, sid, s, srow, chain.bound_from)
        report.add(state_error)
        # rows of a session no entry ever bound, recorded before bindings (a session that records nothing has none)
        legacy += s.state is None and bool(s.rounds or s.legacy_hashes or held) and state_error is None
        if srow is not None or sid in stored:
            error, lacks_master = _key_error(tenant, sid, srow, krow, key_ids.get(sid, set()), open_key, s.state)
            report.add(error)
            unchecked += lacks_master
        if quarantined is not None:
            report.add(_quarantine_error(tenant, sid, s.quarantined, quarantined.get(sid)))
        if s.premature is not None:
            report.add(replace(s.premature, message=f"tenant {tenant}, {s.premature.message}"))
    for error in _versions_errors(tenant, chain, versions, stored, named):
        report.add(error)
    if legacy:
        report.notes.append(f"{legacy} session(s) were recorded before state bindings: their rounds were "
                            "checked, their state rows were not")
    if unchecked:
        report.notes.append(f"{unchecked} session(s) have data keys wrapped by a master key the key file lacks "
                            "or has retired: those keys were not unwrapped")
    return report


def _versions_errors(tenant: str, chain: _Chain, versions: dict[str, Kept] | None,
                     stored: dict[str, dict[int, str]], named: set[str]) -> Iterator[VerifyError]:
    """Every policy version a round entry that binds rows records must be kept, and prove itself,
    whether or not the round is still stored (purged or erased since): the gateway never deletes
    a kept version, and without it the round's retention and redaction are unknown (retention
    keeps such a round, exports refuse it). Versions a stored round's check already names
    (*named*) are left out."""
    if versions is None:
        return
    for policy_hash, (seq, sid, round_seq, policy_id) in chain.versions.items():
        kept = versions.get(policy_hash)
        if (kept is not None and kept.proves) or policy_hash in named:
            continue
        where = f"tenant {tenant}, session {sid}, round {round_seq}"
        version = f"version {policy_hash[:12]} of policy {policy_id!r}"
        gone = "" if round_seq in stored.get(sid, {}) else " (the round is no longer stored: purged or erased)"
        if kept is None:
            yield VerifyError(seq, "policy_version_missing", f"{where}: audit entry {seq} records it under {version}, "
                              f"which the store's policy_versions table no longer keeps (deleted){gone}: the "
                              "retention and export redaction of that version's rounds cannot be known",
                              session_id=sid, round_seq=round_seq)
        else:
            yield VerifyError(seq, "policy_version_altered", f"{where}: audit entry {seq} records it under {version}, "
                              f"whose kept document no longer hashes to it (edited){gone}",
                              session_id=sid, round_seq=round_seq)


def _key_error(tenant: str, sid: str, srow: SessionRow | None, krow: DataKeyRow | None, round_keys: set[bytes],
               open_key: Callable[[DataKeyRow], object] | None,
               bound: tuple[int, str, dict[str, Any]] | None = None) -> tuple[VerifyError | None, bool]:
    """A session holding sealed rows must hold the data key they were sealed under, the one its
    latest binding (*bound*: entry seq, event, ``state``) records, and it must unwrap: without it
    the rows cannot be read, which is an erasure no entry records. Returns the error and whether
    the key went unchecked for want of its master key (the key file's problem: only when the
    chain vouches for the row, or a session bound before data keys were names a retired key)."""
    where = f"tenant {tenant}, session {sid}"
    if krow is None:
        return VerifyError(None, "data_key_missing", f"{where}: the store holds its sealed rows but not their data "
                           "key, so they can no longer be read, and no erasure entry records that",
                           session_id=sid), False
    sealed = round_keys | ({crypto.key_id_of(srow.state_ct)} if srow is not None else set())
    if sealed - {bytes(krow.dk_id)}:
        return VerifyError(None, "data_key_mismatch", f"{where}: its rows were sealed under data key "
                           f"{min(sealed - {bytes(krow.dk_id)}).hex()}, but the store holds key "
                           f"{bytes(krow.dk_id).hex()} for it (replaced)", session_id=sid), False
    recorded = bound[2].get("data_key") if bound is not None else None
    if bound is not None and isinstance(recorded, dict):
        problem = key_difference(where, f"audit entry {bound[0]} ({bound[1]})", recorded, krow)
        if problem is not None:
            return VerifyError(bound[0], "data_key_altered", problem, session_id=sid), False
    if open_key is not None:
        try:
            open_key(krow)
        except MasterKeyUnavailable as exc:
            if isinstance(recorded, dict) or exc.retired:
                return None, True
            return VerifyError(None, "data_key_altered", f"{where}: its data key names master key {krow.kek_id!r}, "
                               "which the key file has never held (not even as retired), and no audit entry "
                               "records which master key wraps it (the session was last written before entries "
                               "did): the row was relabelled outside the gateway, or this is not the gateway's "
                               "key file", session_id=sid), False
        except IntegrityError:
            return VerifyError(None, "data_key_altered", f"{where}: its data key does not unwrap under master key "
                               f"{krow.kek_id!r} (the wrapped key was altered)", session_id=sid), False
    return None, False


def _columns_error(tenant: str, r: RoundRow, entry: _Entry, versions: dict[str, Kept] | None) -> VerifyError | None:
    """A stored round whose ciphertext is its entry's but whose columns are not, or whose policy
    version is not kept as recorded."""
    where = f"tenant {tenant}, session {r.session_id}, round {r.seq}"
    have = {"kind": r.kind, "request_id": r.request_id, "policy_id": r.policy_id, "policy_hash": r.policy_hash,
            "outcome": r.outcome}
    how = relabelled(entry.columns, entry.time, have, r.created_at)
    if how is not None:
        return VerifyError(entry.seq, "round_relabelled", f"{where}: the stored round is the one audit entry "
                           f"{entry.seq} records, but {how}: its row was edited", session_id=r.session_id,
                           round_seq=r.seq)
    if versions is None or not entry.versioned or not r.policy_hash:
        return None
    kept = versions.get(r.policy_hash)
    if kept is not None and kept.proves:
        return None
    version = f"version {r.policy_hash[:12]} of policy {r.policy_id!r}"
    if kept is None:
        return VerifyError(entry.seq, "policy_version_missing", f"{where}: audit entry {entry.seq} records it under "
                           f"{version}, which the store's policy_versions table no longer keeps (deleted): its "
                           "export redaction and retention would follow another version",
                           session_id=r.session_id, round_seq=r.seq)
    return VerifyError(entry.seq, "policy_version_altered", f"{where}: audit entry {entry.seq} records it under "
                       f"{version}, whose kept document no longer hashes to it (edited)",
                       session_id=r.session_id, round_seq=r.seq)


def _rounds_errors(tenant: str, sid: str, s: _Session, stored: dict[int, str],
                   columns: dict[int, VerifyError]) -> Iterator[VerifyError]:
    """Each round of the session that its entries and the store disagree on, in seq order."""
    where = f"tenant {tenant}, session {sid}, round"
    for seq in sorted(s.rounds.keys() | stored.keys()):
        entry, have = s.rounds.get(seq), stored.get(seq)
        if entry is not None and have is None:
            if seq in s.optional:
                continue
            yield VerifyError(entry.seq, "round_missing",
                              f"{where} {seq}: audit entry {entry.seq} records this round but the store no longer "
                              "holds it (deleted or moved), and no erasure or purge entry accounts for it",
                              session_id=sid, round_seq=seq)
        elif entry is None and have is not None:
            if have in s.legacy_hashes:
                continue
            yield VerifyError(None, "round_unrecorded",
                              f"{where} {seq}: the store holds this round but no audit entry records it "
                              "(inserted, duplicated or moved here)", session_id=sid, round_seq=seq)
        elif entry is not None and have is not None and entry.digest != have:
            yield VerifyError(entry.seq, "round_mismatch",
                              f"{where} {seq}: the stored round is not the one audit entry {entry.seq} records "
                              "(its ciphertext hash differs)", session_id=sid, round_seq=seq)
        elif seq in columns:
            yield columns[seq]


def _quarantine_error(tenant: str, sid: str, chain: int | None, store: int | None) -> VerifyError | None:
    """The store's quarantine mark against the chain's: only a ``release`` or erasure entry lifts one."""
    where = f"tenant {tenant}, session {sid}"
    if chain == store:
        return None
    if store is None:
        return VerifyError(chain, "quarantine_lifted", f"{where}: audit entry {chain} quarantined the session and "
                           "no release or erasure entry follows, but the store no longer marks it quarantined: "
                           "the mark was cleared outside the gateway", session_id=sid)
    in_force = f"entry {chain}" if chain is not None else "none"
    return VerifyError(store, "quarantine_unrecorded", f"{where}: the store's quarantine mark points at audit entry "
                       f"{store}, but the quarantine in force in the chain is {in_force}: the mark was set outside "
                       "the gateway", session_id=sid)


def _state_error(tenant: str, sid: str, s: _Session, srow: SessionRow | None,
                 bound_from: int | None = None) -> VerifyError | None:
    """The session's state row against its latest binding. A session no entry binds may hold a
    state row only when it was begun before bindings: its first entry (since an erasure) came
    before *bound_from*, the chain's first entry from a gateway that binds every write."""
    where = f"tenant {tenant}, session {sid}"
    if s.state is None:
        if srow is not None and not s.seen:
            return VerifyError(None, "state_unrecorded", f"{where}: the store holds a state row for a session "
                               "no audit entry mentions (inserted or moved here)", session_id=sid)
        if srow is not None and bound_from is not None and s.since is not None and s.since >= bound_from:
            return VerifyError(None, "state_unrecorded", f"{where}: the store holds a state row for it, but no "
                               f"audit entry binds the session's rows, and its entries (from entry {s.since}) were "
                               "written by a gateway that binds every write of them: the row was inserted or moved "
                               "here (a session that records nothing has none)", session_id=sid)
        return None
    seq, event, state = s.state
    at = f"audit entry {seq} ({event})"
    if state.get("sha256") is None:
        if srow is not None:
            return VerifyError(seq, "state_unrecorded", f"{where}: the store holds a state row but {at} deleted "
                               "the session", session_id=sid)
        return None
    if srow is None:
        return VerifyError(seq, "state_missing", f"{where}: the session's state row is missing; {at} records "
                           f"version {state.get('version')}", session_id=sid)
    if (hashlib.sha256(srow.state_ct).hexdigest() != state.get("sha256") or srow.version != state.get("version")
            or srow.next_seq != state.get("next_seq")):
        return VerifyError(seq, "state_mismatch", f"{where}: the stored state (version {srow.version}) is not the "
                           f"one {at} records (version {state.get('version')}): it was rolled back or replaced",
                           session_id=sid, round_seq=state.get("next_seq", 1) - 1)
    return None
