"""The shared store: PostgreSQL through asyncpg, for several stateless gateway replicas.

Contract: see ``gateway.store.base``; this backend keeps the same tables, columns and row types
as ``gateway.store.sqlite``. How it keeps the contract across processes:

- **Schema.** Everything lives in one PostgreSQL schema (``schema=``, default ``public``); every
  pooled connection has ``search_path`` set to it. :meth:`PostgresStore.migrate` (run by
  :meth:`~PostgresStore.open`, and by ``sessiongate db migrate``) creates the schema when
  missing and applies the pending entries of :data:`MIGRATIONS` in one transaction under a
  transaction-level advisory lock, recording each in ``schema_migrations``; replicas starting
  together therefore migrate once. A database that holds a version this code does not know
  (a newer gateway migrated it) is refused with ``StoreUnavailable``.
- **Writes: one lock per tenant, group commit.** The audit chain is linear per tenant, so a
  tenant's writes are serialised: each write transaction first takes
  ``pg_advisory_xact_lock`` on every tenant it touches, in ascending key order (no deadlocks),
  and holds the locks until it commits. A session belongs to one tenant, so the same lock
  serialises the rounds of a session across replicas: its rows are read after the lock is
  granted (READ COMMITTED), as the previous writer committed them. To pay for the lock and the
  commit once per batch rather than once per round, each process has a few writer *lanes*
  (tenants are spread over them by hash): a lane takes every plan waiting (up to ``BATCH``),
  reads the rows of all their sessions and the tenants' chain heads in one query, runs the
  plans in order on the event loop, each against the rows as the plans before it left them
  (:class:`Staged`), seals their audit entries, writes everything in one statement (several when
  the batch deletes rows or lifts a quarantine), commits once and only then resolves the
  callers. ``BEGIN`` and the locks go in one round trip, so a batch costs four; a pooled
  connection is handed back without asyncpg's reset query (:func:`_keep_session`). Connections
  run with ``plan_cache_mode=force_generic_plan``: every statement is keyed by arrays of
  parameters, and re-planning the batch read on each execution (PostgreSQL's default for a
  prepared statement whose custom plans look cheaper) cost more than running it. A plan that
  raises (or whose audit entry cannot be sealed) stages nothing, and its exception reaches its
  caller unchanged while its neighbours commit. The ``audit`` primary key ``(tenant, seq)``
  guards the chain as well: two writers could never both append the same ``seq``.
- **Errors.** Database and network failures (:data:`_DB_ERRORS`: every asyncpg error, the
  client's internal state errors after a backend was terminated, OS and timeout errors) become
  ``StoreUnavailable`` (``from`` the asyncpg or OS error) for every caller in the failed batch;
  nothing of the batch is committed, except when the connection drops during ``COMMIT`` itself,
  where PostgreSQL alone knows. The message (the operator's log) names the error that ended the
  operation: a batch's clean-up never masks it, and asyncpg's state error on a pooled connection
  the server had ended while idle is named as that (:func:`_cause`). A deadlock (which the lock
  order rules out) is retried, re-running the plans. A lock wait longer than
  :data:`LOCK_WAIT_SECONDS` (a stopped or stuck holder) fails only the jobs of the tenant whose
  lock timed out (:data:`_TAKE_LOCKS` names its key), with a ``store_turn_timeout`` log line
  naming it and the pids holding it (pg_locks); the rest of the batch is run again at once, and
  the lane's next batch runs that tenant's jobs apart, after the others': the other tenants of
  the batch, and those queued behind it in the lane, are delayed by one wait at most, never failed.
- **Reads** use pooled connections one query at a time; the iterators page by key
  (``PAGE`` rows), so an abandoned iterator holds no connection.
- **Erasure.** :meth:`~PostgresStore.checkpoint` runs ``VACUUM`` on ``data_keys`` and ``sessions``
  so the erased (wrapped) data keys leave the live heap pages. PostgreSQL has no single WAL file
  to fold the way SQLite does, and it does not promise to overwrite freed bytes, nor can it reach
  WAL segments, replicas or backups: erasure rests on crypto-shredding. Rotating the master key
  (re-wrapping every live data key) and retiring the old one makes every copy of an erased
  wrapped key unreadable.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import asyncpg
import structlog

from gateway import audit, evidence
from gateway.audit import AlteredRow
from gateway.errors import StoreUnavailable
from gateway.store.base import (
    AuditRow,
    Changes,
    Current,
    DataKeyRow,
    PendingErasure,
    Plan,
    PolicyVersionRow,
    RoundRow,
    SessionRow,
    SessionSummary,
    owned_response,
)

T = TypeVar("T")
BATCH = 256
PAGE = 500
RETRIES = 3
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
log = structlog.get_logger("gateway.store.postgres")

LOCK_WAIT_SECONDS = 30.0
"""How long a write waits for a tenant's lock (``lock_timeout``), and how long a connection may sit
idle inside a transaction (``idle_in_transaction_session_timeout``): a stopped or stuck holder
(a paused process, a partitioned replica) fails the others' writes of that tenant as unavailable,
with a ``store_turn_timeout`` log line, as on SQLite, and then loses its transaction instead of
holding the tenant for as long as its TCP connection lives."""

_DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,          # server errors, incl. PostgresConnectionError, ConnectionDoesNotExistError
    asyncpg.InterfaceError,         # client-side misuse of a connection, e.g. one closed under us
    asyncpg.InternalClientError,    # "cannot switch to state ...": a connection whose backend was terminated
    OSError,                        # network errors; TimeoutError and ConnectionError are OSErrors
)
"""Every failure to reach or use the database: each becomes ``StoreUnavailable`` (503) at this
boundary, so a fail-over never reaches a client as an internal error."""


_ENDED_WHILE_IDLE = ("another operation (2) is in progress", 'protocol is in the "failed" state')
"""asyncpg's words for a pooled connection the server had already ended when a statement was sent
on it: an unexpected message on an idle connection (the server's FATAL 'terminating connection')
left the protocol consuming an error (state 2), or the connection was lost (the "failed" state)."""


def _cause(exc: BaseException) -> str:
    """*exc* for the log, naming the server's ending of the connection when asyncpg reports it only
    as its own state error (the FATAL message itself is gone by then)."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, asyncpg.InternalClientError) and any(words in str(exc) for words in _ENDED_WHILE_IDLE):
        return ("the server ended the connection while it was idle in the pool (a terminated backend, a server "
                f"restart or shutdown, an idle timeout, a network drop) before this statement was sent ({text})")
    return text


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema version: applied once, in a transaction, in ``version`` order."""

    version: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", """
CREATE TABLE data_keys (
  tenant TEXT COLLATE "C" NOT NULL, session_id TEXT COLLATE "C" NOT NULL, dk_id BYTEA NOT NULL,
  kek_id TEXT NOT NULL, wrapped BYTEA NOT NULL, created_at DOUBLE PRECISION NOT NULL,
  PRIMARY KEY (tenant, session_id));
CREATE INDEX data_keys_kek ON data_keys (kek_id);
CREATE TABLE sessions (
  tenant TEXT COLLATE "C" NOT NULL, session_id TEXT COLLATE "C" NOT NULL, version BIGINT NOT NULL,
  next_seq BIGINT NOT NULL, state_ct BYTEA NOT NULL, created_at DOUBLE PRECISION NOT NULL,
  updated_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (tenant, session_id));
CREATE INDEX sessions_updated ON sessions (tenant, updated_at);
CREATE TABLE rounds (
  tenant TEXT COLLATE "C" NOT NULL, session_id TEXT COLLATE "C" NOT NULL, seq BIGINT NOT NULL,
  created_at DOUBLE PRECISION NOT NULL, request_id TEXT NOT NULL, policy_id TEXT NOT NULL,
  policy_hash TEXT NOT NULL, outcome TEXT NOT NULL, kind TEXT NOT NULL, ct BYTEA NOT NULL,
  PRIMARY KEY (tenant, session_id, seq));
CREATE INDEX rounds_time ON rounds (tenant, created_at);
CREATE TABLE audit (
  tenant TEXT COLLATE "C" NOT NULL, seq BIGINT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
  body BYTEA NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL, PRIMARY KEY (tenant, seq));
-- ciphertext does not compress: store it out of line without trying
ALTER TABLE rounds ALTER COLUMN ct SET STORAGE EXTERNAL;
ALTER TABLE sessions ALTER COLUMN state_ct SET STORAGE EXTERNAL;
"""),
    Migration(2, "session heads: state bindings and quarantine", """
CREATE TABLE session_heads (
  tenant TEXT COLLATE "C" NOT NULL, session_id TEXT COLLATE "C" NOT NULL, bound_seq BIGINT,
  quarantined_seq BIGINT, quarantine_reason TEXT, PRIMARY KEY (tenant, session_id));
"""),
    Migration(3, "policy versions", """
-- configuration, not recorded data: the policy documents are kept in plaintext
CREATE TABLE policy_versions (
  hash TEXT COLLATE "C" PRIMARY KEY, policy_id TEXT NOT NULL, loaded_at DOUBLE PRECISION NOT NULL,
  document TEXT NOT NULL);
"""),
    Migration(4, "provider response ids by tenant", """
-- which tenant each provider-held response id belongs to, by the id's SHA-256 (gateway.store.base)
CREATE TABLE provider_responses (
  tenant TEXT COLLATE "C" NOT NULL, id_sha256 BYTEA NOT NULL, created_at DOUBLE PRECISION NOT NULL,
  PRIMARY KEY (tenant, id_sha256));
"""),
    Migration(5, "provider response ids by tenant, keyed", """
-- kept as an HMAC of tenant and id under a key from the signing key file (base.owned_response): a
-- bare hash could be copied to another tenant, and rows kept that way cannot be told from such copies
DROP TABLE IF EXISTS provider_responses;
CREATE TABLE provider_responses (
  tenant TEXT COLLATE "C" NOT NULL, id_mac BYTEA NOT NULL, created_at DOUBLE PRECISION NOT NULL,
  PRIMARY KEY (tenant, id_mac));
"""),
)

SCHEMA_VERSION = MIGRATIONS[-1].version
"""The schema version this code writes; ``schema_migrations`` holds every version applied."""

_DK_COLS = "tenant, session_id, dk_id, kek_id, wrapped, created_at"
_ROUND_COLS = "tenant, session_id, seq, created_at, request_id, policy_id, policy_hash, outcome, kind, ct"
_AUDIT_COLS = "tenant, seq, created_at, body, prev_hash, hash"

_READ_CURRENT = """
SELECT u.t, u.s, s.version, s.next_seq, s.state_ct, s.created_at, s.updated_at,
       k.dk_id, k.kek_id, k.wrapped, k.created_at,
       r.n, r.m, h.quarantined_seq, h.quarantine_reason,
       a.tenant, a.seq, a.created_at, a.body, a.prev_hash, a.hash
FROM unnest($1::text[], $2::text[]) AS u(t, s)
LEFT JOIN LATERAL (SELECT * FROM sessions x WHERE x.tenant = u.t AND x.session_id = u.s LIMIT 1) s ON true
LEFT JOIN LATERAL (SELECT * FROM data_keys x WHERE x.tenant = u.t AND x.session_id = u.s LIMIT 1) k ON true
LEFT JOIN LATERAL (SELECT count(*) AS n, coalesce(max(seq), 0) AS m FROM rounds x
                   WHERE x.tenant = u.t AND x.session_id = u.s) r ON true
LEFT JOIN LATERAL (SELECT * FROM session_heads x WHERE x.tenant = u.t AND x.session_id = u.s LIMIT 1) h ON true
LEFT JOIN LATERAL (SELECT * FROM audit x WHERE x.tenant = u.t AND x.seq = h.bound_seq LIMIT 1) a ON true"""
"""Each part is a ``LIMIT 1`` lookup by primary key for each (tenant, session): the plan stays
index lookups whatever the parameters, so it is planned once (generic plans, see ``open``)."""
_READ_BATCH = f"""
SELECT 's' AS kind, c.* FROM ({_READ_CURRENT}) c
UNION ALL
SELECT 'h', u.t, NULL, NULL, NULL, NULL::bytea, NULL, NULL, NULL, NULL, NULL::bytea, NULL, NULL, NULL, NULL, NULL,
       NULL, a.seq, NULL, NULL::bytea, NULL, a.hash
FROM unnest($3::text[]) AS u(t)
LEFT JOIN LATERAL (SELECT seq, hash FROM audit WHERE tenant = u.t ORDER BY seq DESC LIMIT 1) a ON true"""
"""The rows of a batch's sessions (``kind`` ``s``, as :data:`_READ_CURRENT`) and the chain head of
each of its tenants (``kind`` ``h``: tenant in the second column, seq and hash in the last
columns of the head entry), in one round trip."""
_UPSERT_HEADS = """
INSERT INTO session_heads (tenant, session_id, bound_seq, quarantined_seq, quarantine_reason)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[])
ON CONFLICT (tenant, session_id) DO UPDATE SET
  bound_seq = coalesce(EXCLUDED.bound_seq, session_heads.bound_seq),
  quarantined_seq = coalesce(EXCLUDED.quarantined_seq, session_heads.quarantined_seq),
  quarantine_reason = CASE WHEN EXCLUDED.quarantined_seq IS NOT NULL THEN EXCLUDED.quarantine_reason
                           ELSE session_heads.quarantine_reason END"""
_CLEAR_QUARANTINE = """
UPDATE session_heads x SET quarantined_seq = NULL, quarantine_reason = NULL
FROM unnest($1::text[], $2::text[]) AS u(t, s) WHERE x.tenant = u.t AND x.session_id = u.s"""
_DELETE_SESSIONS = """
WITH u AS (SELECT * FROM unnest($1::text[], $2::text[]) AS u(t, s)),
     r AS (DELETE FROM rounds x USING u WHERE x.tenant = u.t AND x.session_id = u.s),
     s AS (DELETE FROM sessions x USING u WHERE x.tenant = u.t AND x.session_id = u.s)
DELETE FROM data_keys x USING u WHERE x.tenant = u.t AND x.session_id = u.s"""
_UPSERT_DATA_KEYS = f"""
INSERT INTO data_keys ({_DK_COLS})
SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::bytea[], $6::float8[])
ON CONFLICT (tenant, session_id) DO UPDATE SET dk_id = EXCLUDED.dk_id, kek_id = EXCLUDED.kek_id,
  wrapped = EXCLUDED.wrapped, created_at = EXCLUDED.created_at"""
_UPSERT_SESSIONS = """
INSERT INTO sessions (tenant, session_id, version, next_seq, state_ct, created_at, updated_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bytea[], $6::float8[], $7::float8[])
ON CONFLICT (tenant, session_id) DO UPDATE SET version = EXCLUDED.version, next_seq = EXCLUDED.next_seq,
  state_ct = EXCLUDED.state_ct, created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at"""
_INSERT_ROUNDS = f"""
INSERT INTO rounds ({_ROUND_COLS})
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::float8[], $5::text[], $6::text[], $7::text[],
                     $8::text[], $9::text[], $10::bytea[])"""
_INSERT_AUDIT = f"""
INSERT INTO audit ({_AUDIT_COLS})
SELECT * FROM unnest($1::text[], $2::bigint[], $3::float8[], $4::bytea[], $5::text[], $6::text[])"""
_INSERT_PROVIDER_RESPONSES = """
INSERT INTO provider_responses (tenant, id_mac, created_at)
SELECT * FROM unnest($1::text[], $2::bytea[], $3::float8[]) ON CONFLICT DO NOTHING"""
_DELETE_ROUNDS = """
DELETE FROM rounds x USING unnest($1::text[], $2::text[], $3::bigint[]) AS u(t, s, q)
WHERE x.tenant = u.t AND x.session_id = u.s AND x.seq = u.q"""


def _shifted(sql: str, by: int) -> str:
    """*sql* with its parameters ``$n`` renumbered ``$(n + by)``."""
    return re.sub(r"\$(\d+)", lambda m: f"${int(m.group(1)) + by}", sql.strip())


_FLUSH_ONE = (f"WITH k AS ({_shifted(_UPSERT_DATA_KEYS, 0)}),\n s AS ({_shifted(_UPSERT_SESSIONS, 6)}),\n"
              f" r AS ({_shifted(_INSERT_ROUNDS, 13)}),\n a AS ({_shifted(_INSERT_AUDIT, 23)})\n"
              f"{_shifted(_UPSERT_HEADS, 29)}")
"""Every insert and upsert of a batch that deletes nothing and lifts no quarantine, in one
statement (one round trip): the data-modifying parts touch different tables, so their order
does not matter. A batch that deletes goes statement by statement, deletes first."""


_TAKE_LOCKS = """DO $$DECLARE k bigint; BEGIN
FOREACH k IN ARRAY ARRAY[KEYS]::bigint[] LOOP PERFORM pg_advisory_xact_lock(k); END LOOP;
EXCEPTION WHEN lock_not_available THEN RAISE lock_not_available USING MESSAGE = SQLERRM, DETAIL = k::text;
END$$;"""
"""Take the advisory locks of ``KEYS`` (a list of integer literals, in ascending order); when one
wait exceeds ``lock_timeout``, the error's detail names its key. A failed statement releases
the locks taken before it at once (the transaction is aborted), so pg_locks cannot tell later."""


def _skip_scan(table: str) -> str:
    """Distinct tenants of *table* by walking its primary-key index (cheap on big tables)."""
    return f"""(WITH RECURSIVE t(tenant) AS (
  (SELECT tenant FROM {table} ORDER BY tenant LIMIT 1)
  UNION ALL
  SELECT (SELECT x.tenant FROM {table} x WHERE x.tenant > t.tenant ORDER BY x.tenant LIMIT 1)
  FROM t WHERE t.tenant IS NOT NULL)
SELECT tenant FROM t WHERE tenant IS NOT NULL)"""


_TENANTS = f"{_skip_scan('audit')} UNION {_skip_scan('sessions')} UNION {_skip_scan('rounds')} ORDER BY 1"


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset of a returned connection, instead of asyncpg's reset query (a round trip
    per use): this store leaves no session state behind (no ``SET``, ``LISTEN``, cursors or
    session-level locks; its advisory locks end with their transaction), and the pool still
    rolls back a transaction left open."""


def lock_key(*parts: str) -> int:
    """A signed 64-bit advisory-lock key for *parts* (stable across processes and versions)."""
    digest = hashlib.blake2b("\x00".join(("sessiongate", *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def describe_dsn(dsn: str) -> str:
    """``host:port/database`` of a DSN, for messages: never the user's password."""
    try:
        parts = urlsplit(dsn)
        if parts.scheme.startswith("postgres"):
            return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or ''}"
    except ValueError:
        pass
    return "the configured DSN"


def application_name(dsn: str) -> str:
    """The ``application_name`` a DSN gives (``?application_name=replica-a``), else ``sessiongate``:
    how ``pg_stat_activity`` tells this gateway's connections from another replica's or deployment's."""
    try:
        named = parse_qs(urlsplit(dsn).query).get("application_name")
    except ValueError:
        named = None
    return named[-1] if named and named[-1] else "sessiongate"


Key = tuple[str, str]
Outcome = tuple[bool, Any]


def _current(r: Any) -> Current:
    """A :data:`_READ_CURRENT` row as a ``Current``."""
    return evidence.current(r[0], r[1], r[2:7] if r[2] is not None else None, r[7:11] if r[7] is not None else None,
                            int(r[11]), int(r[12]), r[13], r[14], r[15:21] if r[15] is not None else None)


async def read_current(conn: asyncpg.Connection, keys: list[Key]) -> dict[Key, Current]:
    """The rows of the sessions *keys* (tenant, session id) as this transaction sees them."""
    rows = await conn.fetch(_READ_CURRENT, [k[0] for k in keys], [k[1] for k in keys])
    return {(r[0], r[1]): _current(r) for r in rows}


async def read_batch(conn: asyncpg.Connection, keys: list[Key],
                     tenants: list[str]) -> tuple[dict[Key, Current], dict[str, tuple[int, str]]]:
    """:func:`read_current` of *keys* and the chain head (``seq``, ``hash``; ``(0, GENESIS)`` for an
    empty chain) of each of *tenants*, in one round trip."""
    rows = await conn.fetch(_READ_BATCH, [k[0] for k in keys], [k[1] for k in keys], tenants)
    current = {(r[1], r[2]): _current(r[1:]) for r in rows if r[0] == "s"}
    heads = {r[1]: (r[17], r[21]) if r[17] is not None else (0, audit.GENESIS) for r in rows if r[0] == "h"}
    return current, heads


def seal_audit(tenant: str, entries: list[dict[str, Any]], head: tuple[int, str],
               key: audit.EntryKey | None = None) -> list[AuditRow]:
    """Chain *entries* after *head* (``seq``, ``hash``), with MACs under *key*; pure, raises
    ValueError for a bad entry."""
    seq, prev = head
    now = time.time()
    rows: list[AuditRow] = []
    for fields in entries:
        seq += 1
        row = audit.seal_entry(tenant, seq, prev, now, fields, key)
        rows.append(row)
        prev = row.hash
    return rows


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Row tuples turned into one list per column, for ``unnest`` of arrays."""
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


class Staged:
    """One batch's writes: plans run in order against the rows as the previous plans left them
    (kept here, in memory), and everything is written at the end in at most five statements.

    A plan writes only its own session's rows (``Changes.data_key``/``session`` belong to the
    transacted session). A deleted session loses its stored rows first, so the same batch may
    erase a session and start it again.
    """

    def __init__(self, current: dict[Key, Current], heads: dict[str, tuple[int, str]]) -> None:
        self.current, self.heads = current, heads
        self.deleted: set[Key] = set()
        self.new_keys: set[Key] = set()
        self.new_sessions: set[Key] = set()
        self.rounds: list[RoundRow] = []
        self.dropped_rounds: list[tuple[str, str, int]] = []
        self.audit: list[AuditRow] = []
        self.entry_key: audit.EntryKey | None = None
        self.head_updates: dict[Key, evidence.HeadUpdate] = {}
        self.provider_responses: list[tuple[str, bytes, float]] = []

    @classmethod
    async def load(cls, conn: asyncpg.Connection, keys: set[Key], tenants: set[str]) -> Staged:
        return cls(*await read_batch(conn, sorted(keys), sorted(tenants)))

    def view(self, tenant: str, session_id: str | None) -> Current:
        if session_id is None:
            return Current(tenant, None, None, None)
        return self.current[(tenant, session_id)]

    def run(self, tenant: str, session_id: str | None, plan: Plan) -> Outcome:
        """Run *plan* and stage what it returns; a plan's (or its audit entries') error stages nothing."""
        cur = self.view(tenant, session_id)
        try:
            ch = plan(cur)
            if session_id is None and (ch.session or ch.data_key or ch.delete_session):
                raise ValueError("a plan without a session may write audit entries and rounds only")
            bound = evidence.bind(cur, ch)
            rows = seal_audit(tenant, ch.audit, self.heads[tenant], self.entry_key) if ch.audit else []
        except Exception as exc:  # noqa: BLE001 - handed to the caller unchanged
            return False, exc
        self.stage(cur, ch, rows)
        if session_id is not None:
            self.current[(tenant, session_id)] = evidence.after(cur, ch, rows, bound)
            update = evidence.head_update(cur, ch, rows, bound)
            if update is not None:
                self.head_updates[(tenant, session_id)] = _merge_heads(self.head_updates.get((tenant, session_id)),
                                                                       update)
        ch.audit_rows.extend(rows)
        return True, ch

    def stage(self, cur: Current, ch: Changes, rows: list[AuditRow]) -> None:
        if cur.session_id is not None:
            key = (cur.tenant, cur.session_id)
            session, data_key = cur.session, cur.data_key
            if ch.delete_session:
                self.deleted.add(key)
                self.rounds = [r for r in self.rounds if (r.tenant, r.session_id) != key]
                session = data_key = None
            if ch.data_key is not None:
                data_key = ch.data_key
                self.new_keys.add(key)
            if ch.session is not None:
                session = ch.session
                self.new_sessions.add(key)
            self.current[key] = Current(cur.tenant, cur.session_id, session, data_key)
            self.dropped_rounds.extend((cur.tenant, cur.session_id, seq) for seq in ch.delete_round_seqs)
        self.rounds.extend(ch.rounds)
        if ch.provider_responses:
            now = time.time()
            self.provider_responses.extend((cur.tenant, owned_response(self.entry_key, cur.tenant, digest), now)
                                           for digest in ch.provider_responses)
        self.audit.extend(rows)
        if rows:
            self.heads[cur.tenant] = (rows[-1].seq, rows[-1].hash)

    async def flush(self, conn: asyncpg.Connection) -> None:
        """Write the staged rows inside the open transaction: in one statement when the batch
        deletes nothing and lifts no quarantine (:data:`_FLUSH_ONE`), else one per kind; provider
        response ids (rare: only rounds through a provider-held Responses upstream) in one more."""
        if self.provider_responses:
            await conn.execute(_INSERT_PROVIDER_RESPONSES, *_columns(self.provider_responses, 3))
        updates = [u for _, u in sorted(self.head_updates.items())]
        if not (self.deleted or self.dropped_rounds or any(u.clear_quarantine for u in updates)):
            keys = [k for k in (self.current[key].data_key for key in sorted(self.new_keys)) if k is not None]
            sessions = [s for s in (self.current[key].session for key in sorted(self.new_sessions)) if s is not None]
            await conn.execute(
                _FLUSH_ONE,
                *_columns([(k.tenant, k.session_id, k.dk_id, k.kek_id, k.wrapped, k.created_at) for k in keys], 6),
                *_columns([(s.tenant, s.session_id, s.version, s.next_seq, s.state_ct, s.created_at, s.updated_at)
                           for s in sessions], 7),
                *_columns([(r.tenant, r.session_id, r.seq, r.created_at, r.request_id, r.policy_id, r.policy_hash,
                            r.outcome, r.kind, r.ct) for r in self.rounds], 10),
                *_columns([(a.tenant, a.seq, a.created_at, a.body, a.prev_hash, a.hash) for a in self.audit], 6),
                *_columns([(u.tenant, u.session_id, u.bound_seq, *(u.quarantine or (None, None))) for u in updates],
                          5))
            return
        if self.deleted:
            await conn.execute(_DELETE_SESSIONS, *_columns(sorted(self.deleted), 2))
        if self.dropped_rounds:
            await conn.execute(_DELETE_ROUNDS, *_columns(self.dropped_rounds, 3))
        keys = [k for k in (self.current[key].data_key for key in sorted(self.new_keys)) if k is not None]
        if keys:
            await conn.execute(_UPSERT_DATA_KEYS, *_columns(
                [(k.tenant, k.session_id, k.dk_id, k.kek_id, k.wrapped, k.created_at) for k in keys], 6))
        sessions = [s for s in (self.current[key].session for key in sorted(self.new_sessions)) if s is not None]
        if sessions:
            await conn.execute(_UPSERT_SESSIONS, *_columns(
                [(s.tenant, s.session_id, s.version, s.next_seq, s.state_ct, s.created_at, s.updated_at)
                 for s in sessions], 7))
        if self.rounds:
            await conn.execute(_INSERT_ROUNDS, *_columns(
                [(r.tenant, r.session_id, r.seq, r.created_at, r.request_id, r.policy_id, r.policy_hash,
                  r.outcome, r.kind, r.ct) for r in self.rounds], 10))
        if self.audit:
            await conn.execute(_INSERT_AUDIT, *_columns(
                [(a.tenant, a.seq, a.created_at, a.body, a.prev_hash, a.hash) for a in self.audit], 6))
        updates = [u for _, u in sorted(self.head_updates.items())]
        cleared = [(u.tenant, u.session_id) for u in updates if u.clear_quarantine]
        if cleared:
            await conn.execute(_CLEAR_QUARANTINE, *_columns(cleared, 2))
        if updates:
            await conn.execute(_UPSERT_HEADS, *_columns(
                [(u.tenant, u.session_id, u.bound_seq, *(u.quarantine or (None, None))) for u in updates], 5))


def _merge_heads(old: evidence.HeadUpdate | None, new: evidence.HeadUpdate) -> evidence.HeadUpdate:
    """Two plans of one batch on one session: the later one wins where it says something."""
    if old is None:
        return new
    quarantine = new.quarantine or (None if new.clear_quarantine else old.quarantine)
    return evidence.HeadUpdate(new.tenant, new.session_id, new.bound_seq if new.bound_seq is not None
                               else old.bound_seq, quarantine,
                               quarantine is None and (new.clear_quarantine or old.clear_quarantine))


@dataclass(slots=True)
class _Job:
    tenant: str
    session_id: str | None
    plan: Plan
    future: asyncio.Future[Changes]


class _LockTimedOut(Exception):
    """A batch's wait for a tenant lock timed out (``lock_timeout``): *tenants* are the ones whose
    lock it waited for (one, unless their keys collide or the key is unknown), *holders* the
    server pids holding that lock."""

    def __init__(self, tenants: set[str], holders: list[int]) -> None:
        super().__init__(sorted(tenants))
        self.tenants, self.holders = tenants, holders


class Reads:
    """Every read of the Store protocol but ``read_session``, as queries run by ``_call``: each on
    a pooled connection (:class:`PostgresStore`), or all in one transaction (:class:`Snapshot`)."""

    entry_key: audit.EntryKey | None = None
    """Keys ``provider_responses`` (``base.owned_response``): the store's, in its snapshots too."""

    async def _call(self, fn: Callable[[asyncpg.Connection], Awaitable[T]], doing: str = "read from") -> T:
        raise NotImplementedError

    async def policy_versions(self) -> list[PolicyVersionRow]:
        rows = await self._fetch("SELECT hash, policy_id, loaded_at, document FROM policy_versions "
                                 "ORDER BY loaded_at, hash")
        return [PolicyVersionRow(*r) for r in rows]

    async def holds_provider_response(self, tenant: str, digest: bytes) -> bool:
        mac = owned_response(self.entry_key, tenant, digest)
        return bool(await self._call(lambda c: c.fetchval(
            "SELECT EXISTS (SELECT 1 FROM provider_responses WHERE tenant = $1 AND id_mac = $2)", tenant, mac)))

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return await self._call(lambda c: c.fetch(query, *args))

    async def get_session(self, tenant: str, session_id: str) -> tuple[SessionRow | None, DataKeyRow | None]:
        found = await self._call(lambda c: read_current(c, [(tenant, session_id)]))
        cur = found[(tenant, session_id)]
        if isinstance(cur, evidence.Altered) and cur.error is not None:
            raise cur.error
        return cur.session, cur.data_key

    async def list_sessions(self, tenant: str) -> list[SessionSummary]:
        rows = await self._fetch(
            "SELECT s.session_id, s.version, (SELECT count(*) FROM rounds r WHERE r.tenant = s.tenant "
            "AND r.session_id = s.session_id), s.created_at, s.updated_at FROM sessions s "
            "WHERE s.tenant = $1 ORDER BY s.updated_at DESC", tenant)
        return [SessionSummary(*r) for r in rows]

    async def page_sessions(self, tenant: str, *, after: str | None, limit: int, prefix: str = "",
                            since: float | None = None, until: float | None = None) -> list[SessionSummary]:
        inclusive = not after or prefix > after  # start at the prefix itself, or just after *after*
        sql = ("SELECT s.session_id, s.version, (SELECT count(*) FROM rounds r WHERE r.tenant = s.tenant "
               "AND r.session_id = s.session_id), s.created_at, s.updated_at FROM sessions s "
               f"WHERE s.tenant = $1 AND s.session_id {'>=' if inclusive else '>'} $2")
        args: list[Any] = [tenant, prefix if inclusive else after]
        if prefix:
            args.append(prefix + "\U0010ffff")
            sql += f" AND s.session_id < ${len(args)}"
        if since is not None:
            args.append(since)
            sql += f" AND s.updated_at >= ${len(args)}"
        if until is not None:
            args.append(until)
            sql += f" AND s.updated_at < ${len(args)}"
        args.append(limit)
        sql += f" ORDER BY s.session_id LIMIT ${len(args)}"
        return [SessionSummary(*r) for r in await self._fetch(sql, *args)]

    async def count_rounds_by_policy(self, tenant: str) -> dict[tuple[str, str], int]:
        rows = await self._fetch("SELECT policy_id, policy_hash, count(*) FROM rounds WHERE tenant = $1 "
                                 "GROUP BY policy_id, policy_hash", tenant)
        return {(r[0], r[1]): int(r[2]) for r in rows}

    async def tenants(self) -> list[str]:
        return [r[0] for r in await self._fetch(_TENANTS)]

    async def count_data_keys(self, kek_id: str) -> int:
        return int(await self._call(lambda c: c.fetchval("SELECT count(*) FROM data_keys WHERE kek_id = $1",
                                                          kek_id)))

    async def _pages(self, query: Callable[[Any], Awaitable[list[Any]]]) -> AsyncIterator[Any]:
        """Yield rows page by page; *query* gets the last row of the previous page (or None)."""
        last = None
        while True:
            page = await query(last)
            for row in page:
                if isinstance(row, AlteredRow):
                    raise row
                yield row
            if len(page) < PAGE:
                return
            last = page[-1]

    def iter_rounds(self, tenant: str, session_id: str | None = None, *, since: float | None = None,
                    until: float | None = None, after_seq: int | None = None) -> AsyncIterator[RoundRow]:
        cond: list[str] = ["tenant = $1"]
        args: list[Any] = [tenant]
        for clause, value in (("session_id = ", session_id), ("created_at >= ", since), ("created_at < ", until),
                              ("seq > ", after_seq)):
            if value is not None:
                args.append(value)
                cond.append(f"{clause}${len(args)}")
        where = " AND ".join(cond)
        n = len(args)

        async def query(last: RoundRow | None) -> list[RoundRow | AlteredRow]:
            if last is None:
                rows = await self._fetch(f"SELECT {_ROUND_COLS} FROM rounds WHERE {where} "
                                         f"ORDER BY session_id, seq LIMIT {PAGE}", *args)
            else:
                rows = await self._fetch(f"SELECT {_ROUND_COLS} FROM rounds WHERE {where} AND (session_id, seq) > "
                                         f"(${n + 1}, ${n + 2}) ORDER BY session_id, seq LIMIT {PAGE}",
                                         *args, last.session_id, last.seq)
            return evidence.typed_or_altered(RoundRow, rows)
        return self._pages(query)

    def iter_audit(self, tenant: str, *, after_seq: int = 0) -> AsyncIterator[AuditRow]:
        async def query(last: AuditRow | None) -> list[AuditRow | AlteredRow]:
            start = last.seq if last is not None else after_seq
            rows = await self._fetch(f"SELECT {_AUDIT_COLS} FROM audit WHERE tenant = $1 AND seq > $2 "
                                     f"ORDER BY seq LIMIT {PAGE}", tenant, start)
            return evidence.typed_or_altered(AuditRow, rows)
        return self._pages(query)

    async def quarantined(self, tenant: str) -> dict[str, int]:
        rows = await self._fetch("SELECT session_id, quarantined_seq FROM session_heads "
                                 "WHERE tenant = $1 AND quarantined_seq IS NOT NULL", tenant)
        return {r[0]: int(r[1]) for r in rows}

    async def audit_head(self, tenant: str) -> int:
        return int(await self._call(lambda c: c.fetchval("SELECT coalesce(max(seq), 0) FROM audit WHERE tenant = $1",
                                                          tenant)))

    def iter_data_keys(self) -> AsyncIterator[DataKeyRow]:
        async def query(last: DataKeyRow | None) -> list[DataKeyRow]:
            key = (last.tenant, last.session_id) if last is not None else ("", "")
            rows = await self._fetch(f"SELECT {_DK_COLS} FROM data_keys WHERE (tenant, session_id) > ($1, $2) "
                                     f"ORDER BY tenant, session_id LIMIT {PAGE}", *key)
            return [DataKeyRow(*r) for r in rows]
        return self._pages(query)


class Snapshot(Reads):
    """The store as one moment saw it (``PostgresStore.snapshot``): every read on one connection
    inside one read-only ``REPEATABLE READ`` transaction, one at a time."""

    def __init__(self, conn: asyncpg.Connection, guard: Callable[[Awaitable[Any], str], Awaitable[Any]],
                 entry_key: audit.EntryKey | None = None) -> None:
        self._conn = conn
        self._guard = guard
        self.entry_key = entry_key

    async def _call(self, fn: Callable[[asyncpg.Connection], Awaitable[T]], doing: str = "read from") -> T:
        result: T = await self._guard(fn(self._conn), doing)
        return result


class PostgresStore(Reads):
    """The Store protocol on a PostgreSQL schema shared by every replica. Create, then ``await open()``.

    ``dsn`` is an asyncpg/libpq DSN; its ``application_name`` (default ``sessiongate``; snapshots
    add ``-verify``) names the connections in ``pg_stat_activity``; ``pool_size`` bounds this
    process's connections (the writer lanes and the readers share them). Raises ``ValueError``
    for a schema name that is not ``[a-z_][a-z0-9_]*`` (at most 63 characters).
    """

    def __init__(self, dsn: str, *, schema: str = "public", pool_size: int = 10, writers: int | None = None,
                 entry_key: audit.EntryKey | None = None) -> None:
        if not _SCHEMA_NAME.match(schema):
            raise ValueError(f"invalid PostgreSQL schema name {schema!r}")
        self.dsn, self.schema, self.pool_size = dsn, schema, pool_size
        self.application_name = application_name(dsn)
        self.entry_key = entry_key
        """Seals every audit entry's MAC (``gateway.audit.seal_entry``)."""
        self.writers = writers or max(1, min(4, pool_size // 2))
        self._pool: asyncpg.Pool | None = None
        self._lanes: list[asyncio.Queue[_Job | None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.on_commit: Callable[[float, int], None] | None = None
        """Told each batch's commit duration and number of writes."""

    # --- lifecycle ---------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        """Create the schema if missing and apply pending migrations; returns the versions applied."""
        conn = await self._guard(asyncpg.connect(
            self.dsn, timeout=10, server_settings={"application_name": self.application_name}), "connect to")
        try:
            return await self._guard(self._migrate(conn), "migrate")
        finally:
            await conn.close()

    async def _migrate(self, conn: asyncpg.Connection) -> list[int]:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key("migrate", self.schema))
            if not await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", self.schema):
                await conn.execute(f'CREATE SCHEMA "{self.schema}"')
            await conn.execute(f'SET LOCAL search_path TO "{self.schema}"')
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                               "name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            unknown = done - {m.version for m in MIGRATIONS}
            if unknown:
                raise StoreUnavailable(
                    f"the PostgreSQL schema '{self.schema}' is at version {max(unknown)}, newer than this "
                    f"gateway knows ({SCHEMA_VERSION}): upgrade the gateway")
            applied = []
            for m in MIGRATIONS:
                if m.version not in done:
                    await conn.execute(m.sql)
                    await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                                       m.version, m.name)
                    applied.append(m.version)
            return applied

    async def open(self) -> None:
        await self.migrate()
        self._pool = await self._guard(asyncpg.create_pool(
            self.dsn, min_size=1, max_size=self.pool_size, timeout=10, command_timeout=60, reset=_keep_session,
            server_settings={"search_path": self.schema, "application_name": self.application_name,
                             "plan_cache_mode": "force_generic_plan",
                             "idle_in_transaction_session_timeout": f"{int(LOCK_WAIT_SECONDS * 1000)}"}),
            "connect to")
        self._lanes = [asyncio.Queue() for _ in range(self.writers)]
        self._tasks = [asyncio.create_task(self._lane(q), name=f"pg-writer-{i}") for i, q in enumerate(self._lanes)]

    async def close(self) -> None:
        for q in self._lanes:
            q.put_nowait(None)
        if self._tasks:
            await asyncio.gather(*self._tasks)
        self._lanes, self._tasks = [], []
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _guard(self, aw: Awaitable[T], doing: str) -> T:
        """Await *aw*, turning database and network failures into ``StoreUnavailable``."""
        try:
            return await aw
        except _DB_ERRORS as exc:
            raise self._unavailable(doing, exc) from exc

    # --- writes --------------------------------------------------------------------------

    def transact(self, tenant: str, session_id: str | None, plan: Plan, *,
                 bounded: bool = False) -> asyncio.Future[Changes]:
        """Queued for the tenant's writer lane at once (never committed before returning: every
        write is a round trip to the server; *bounded* changes nothing here)."""
        fut: asyncio.Future[Changes] = asyncio.get_running_loop().create_future()
        if not self._lanes:
            fut.set_exception(StoreUnavailable("the store is not open"))
            return fut
        lane = self._lanes[zlib.crc32(tenant.encode()) % len(self._lanes)]
        lane.put_nowait(_Job(tenant, session_id, plan, fut))
        return fut

    async def _lane(self, q: asyncio.Queue[_Job | None]) -> None:
        """One writer: take every job waiting, commit them as one batch, repeat until told to stop.

        The jobs of tenants whose lock wait timed out in the previous batch go in a batch of their
        own, after the others: a tenant stuck on another process delays the rest of the lane by one
        wait at most, not one per batch its clients keep sending."""
        stop = False
        stuck: set[str] = set()
        while not stop:
            first = await q.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < BATCH and not q.empty():
                nxt = q.get_nowait()
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            suspects, stuck = stuck, set()
            for part in ([j for j in batch if j.tenant not in suspects], [j for j in batch if j.tenant in suspects]):
                if part:
                    await self._settle(part, stuck)

    async def _settle(self, batch: list[_Job], stuck: set[str]) -> None:
        """Commit *batch* and resolve its callers; adds to *stuck* the tenants whose lock timed out."""
        started = time.perf_counter()
        outcomes = await self._run_batch(batch, stuck)
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started, len(batch))
        for job, (ok, value) in zip(batch, outcomes, strict=True):
            if job.future.done():
                continue
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)

    async def _run_batch(self, batch: list[_Job], stuck: set[str]) -> list[Outcome]:
        for attempt in range(RETRIES):
            try:
                return await self._commit(batch)
            except asyncpg.DeadlockDetectedError as exc:
                if attempt == RETRIES - 1:
                    return [(False, self._unavailable("commit to", exc))] * len(batch)
            except _LockTimedOut as exc:
                stuck |= exc.tenants
                return await self._without_stuck(batch, exc, stuck)
            except _DB_ERRORS as exc:
                return [(False, self._unavailable("commit to", exc))] * len(batch)
            except Exception as exc:  # noqa: BLE001 - a bug in here: every caller gets it, the lane lives on
                return [(False, exc)] * len(batch)
        raise AssertionError("unreachable")

    async def _without_stuck(self, batch: list[_Job], timed_out: _LockTimedOut, stuck: set[str]) -> list[Outcome]:
        """Fail the jobs of the tenants whose lock *timed_out* names, and run the rest of *batch*
        again at once (their locks were free, or held only briefly)."""
        stuck = timed_out.tenants
        log.error("store_turn_timeout", tenants=sorted(stuck), holder_pids=timed_out.holders,
                  waited_s=LOCK_WAIT_SECONDS,
                  note="another gateway process holds these tenants' write lock: is one stopped or stuck? "
                       "(pg_locks and pg_stat_activity show the holder)")
        err = StoreUnavailable(f"the store is busy: another gateway process has held the write lock of "
                               f"tenant {', '.join(sorted(stuck))} for over {LOCK_WAIT_SECONDS:g} s")
        err.__cause__ = timed_out.__cause__
        rest = [job for job in batch if job.tenant not in stuck]
        done = iter(await self._run_batch(rest, stuck) if rest else [])
        return [(False, err) if job.tenant in stuck else next(done) for job in batch]

    def _unavailable(self, doing: str, exc: BaseException) -> StoreUnavailable:
        """``StoreUnavailable`` caused by *exc*, naming host, database and schema (never a password)."""
        err = StoreUnavailable(f"cannot {doing} the PostgreSQL store at {describe_dsn(self.dsn)} "
                               f"(schema {self.schema}): {_cause(exc)}")
        err.__cause__ = exc
        return err

    async def _commit(self, batch: list[_Job]) -> list[Outcome]:
        assert self._pool is not None
        tenants = {job.tenant for job in batch}
        keys = sorted({lock_key("tenant", self.schema, t) for t in tenants})
        async with self._pool.acquire() as conn:
            # BEGIN and the tenant locks in one round trip (the keys are integers made here);
            # the rows are read by the next statement, whose snapshot follows the locks
            try:
                # one tenant (every batch of a quiet gateway): a plain call, whose timeout can only be its key
                take = (f"SELECT pg_advisory_xact_lock({int(keys[0])});" if len(keys) == 1 else
                        _TAKE_LOCKS.replace("KEYS", ",".join(str(int(k)) for k in keys)))
                await conn.execute(f"BEGIN;SET LOCAL lock_timeout = {int(LOCK_WAIT_SECONDS * 1000)};" + take)
            except asyncpg.LockNotAvailableError as exc:
                with contextlib.suppress(*_DB_ERRORS):
                    await conn.execute("ROLLBACK")
                raise await self._timed_out(conn, tenants, exc) from exc
            try:
                staged = await Staged.load(
                    conn, {(j.tenant, j.session_id) for j in batch if j.session_id is not None}, tenants)
                staged.entry_key = self.entry_key
                outcomes = [staged.run(job.tenant, job.session_id, job.plan) for job in batch]
                await staged.flush(conn)
                await conn.execute("COMMIT")
            except BaseException:
                # a connection the server ended is already back in the pool (its proxy refuses every
                # call): the error raised above, not this clean-up's, says what happened
                with contextlib.suppress(*_DB_ERRORS):
                    if not conn.is_closed() and conn.is_in_transaction():
                        await conn.execute("ROLLBACK")
                raise
            return outcomes

    async def _timed_out(self, conn: asyncpg.Connection, tenants: set[str],
                         exc: asyncpg.LockNotAvailableError) -> _LockTimedOut:
        """The tenants of the key whose wait *exc* ended (:data:`_TAKE_LOCKS` names it; a batch of one
        tenant takes its lock plainly), and the
        pids holding it, read from pg_locks on *conn* once rolled back. Every one of *tenants*
        when the key is not named; no pids when pg_locks cannot be read."""
        keys = {t: lock_key("tenant", self.schema, t) for t in tenants}
        try:
            waited = int(exc.detail or "")
        except ValueError:  # a plain lock call (one tenant) names no key: it waited for that one
            if len(keys) != 1:
                return _LockTimedOut(tenants, [])
            waited = next(iter(keys.values()))
        stuck = {t for t, k in keys.items() if k == waited} or tenants
        try:
            rows = await conn.fetch("SELECT DISTINCT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 "
                                    "AND granted AND ((classid::bigint << 32) | objid::bigint) = $1 AND database = "
                                    "(SELECT oid FROM pg_database WHERE datname = current_database())", waited)
        except _DB_ERRORS:
            return _LockTimedOut(stuck, [])
        return _LockTimedOut(stuck, sorted(int(r[0]) for r in rows))

    async def checkpoint(self) -> bool:
        """``VACUUM`` the tables that held erased keys and state; see the module docstring.
        True once it ran: what remains (WAL segments, replicas, backups) is the operator's."""
        await self._call(lambda c: c.execute("VACUUM data_keys, sessions"), "vacuum")
        return True

    async def pending_erasures(self) -> list[PendingErasure] | None:
        """None: no erasure waits for another connection here (the ``VACUUM`` does not), so none
        is recorded as pending (``Changes.erasure`` is ignored); one whose ``VACUUM`` failed (the
        database down) is retried by the process that erased (``gateway.erasure``)."""
        return None

    async def save_policy_versions(self, rows: list[PolicyVersionRow]) -> None:
        if rows:
            await self._call(lambda c: c.execute(
                "INSERT INTO policy_versions (hash, policy_id, loaded_at, document) "
                "SELECT * FROM unnest($1::text[], $2::text[], $3::float8[], $4::text[]) "
                "ON CONFLICT (hash) DO NOTHING", *_columns(
                    [(r.hash, r.policy_id, r.loaded_at, r.document) for r in rows], 4)), "write to")

    # --- reads ---------------------------------------------------------------------------

    async def _call(self, fn: Callable[[asyncpg.Connection], Awaitable[T]], doing: str = "read from") -> T:
        if self._pool is None:
            raise StoreUnavailable("the store is not open")
        pool = self._pool

        async def run() -> T:
            async with pool.acquire() as conn:
                return await fn(conn)
        return await self._guard(run(), doing)

    async def read_session(self, tenant: str, session_id: str, *, hot: bool = False) -> Current:
        found = await self._call(lambda c: read_current(c, [(tenant, session_id)]))
        return found[(tenant, session_id)]

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[Snapshot]:
        """Reads that all see the database as it was when the first of them ran: one read-only
        ``REPEATABLE READ`` transaction on a connection of its own, outside the pool, so that
        verifications however long or many never take connections the requests need."""
        if self._pool is None:
            raise StoreUnavailable("the store is not open")
        conn = await self._guard(asyncpg.connect(
            self.dsn, timeout=10, command_timeout=60,
            server_settings={"search_path": self.schema, "application_name": f"{self.application_name}-verify"}),
            "connect to")
        try:
            await self._guard(conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"), "read from")
            yield Snapshot(conn, self._guard, self.entry_key)
        finally:
            with contextlib.suppress(*_DB_ERRORS):
                await conn.close()
