"""The embedded store: one SQLite file in WAL mode, written by one thread with group commit.

Contract: see ``gateway.store.base``. How this backend keeps it:

- One writer thread owns the write connection. Callers hand it plans through a queue; it takes
  every plan waiting (up to ``BATCH``), runs each inside its own SAVEPOINT of one ``BEGIN
  IMMEDIATE`` transaction, commits once with ``synchronous=FULL`` (one fsync for the batch) and
  only then resolves the callers' futures. A failing plan rolls back to its savepoint alone.
- Reads go to one reader thread with its own connection, batched the same way (every read
  waiting is run, then all its callers are woken with one loop callback); nothing blocks the
  event loop.
- ``BEGIN IMMEDIATE`` also serialises writes from other processes (the CLI) on the same file.
- Schema: :data:`SCHEMA` is version 1; :data:`MIGRATIONS` take a file from the version in
  ``meta.schema_version`` to :data:`SCHEMA_VERSION` when it opens (a file from a newer gateway
  is refused). Never edit a migration once released; add the next one.
- Every change that writes a session's rows is bound into its audit entry and the session's
  ``session_heads`` row (``gateway.evidence``) inside the same transaction.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog

from gateway import audit, evidence
from gateway.errors import StoreUnavailable
from gateway.store.base import (
    AuditRow,
    Changes,
    Current,
    DataKeyRow,
    Plan,
    PolicyVersionRow,
    RoundRow,
    SessionRow,
    SessionSummary,
)

T = TypeVar("T")
log = structlog.get_logger("gateway.store.sqlite")
BATCH = 256
PAGE = 500
SCHEMA_VERSION = 3
CHECKPOINT_BUSY_SECONDS = 0.2
"""How long one checkpoint attempt waits for other connections before reporting it is busy."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS data_keys (
  tenant TEXT NOT NULL, session_id TEXT NOT NULL, dk_id BLOB NOT NULL, kek_id TEXT NOT NULL,
  wrapped BLOB NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (tenant, session_id));
CREATE INDEX IF NOT EXISTS data_keys_kek ON data_keys (kek_id);
CREATE TABLE IF NOT EXISTS sessions (
  tenant TEXT NOT NULL, session_id TEXT NOT NULL, version INTEGER NOT NULL, next_seq INTEGER NOT NULL,
  state_ct BLOB NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
  PRIMARY KEY (tenant, session_id));
CREATE TABLE IF NOT EXISTS rounds (
  tenant TEXT NOT NULL, session_id TEXT NOT NULL, seq INTEGER NOT NULL, created_at REAL NOT NULL,
  request_id TEXT NOT NULL, policy_id TEXT NOT NULL, policy_hash TEXT NOT NULL, outcome TEXT NOT NULL,
  kind TEXT NOT NULL, ct BLOB NOT NULL, PRIMARY KEY (tenant, session_id, seq));
CREATE INDEX IF NOT EXISTS rounds_time ON rounds (tenant, created_at);
CREATE TABLE IF NOT EXISTS audit (
  tenant TEXT NOT NULL, seq INTEGER NOT NULL, created_at REAL NOT NULL, body BLOB NOT NULL,
  prev_hash TEXT NOT NULL, hash TEXT NOT NULL, PRIMARY KEY (tenant, seq));
"""

MIGRATIONS: tuple[tuple[int, str], ...] = (
    (2, """
CREATE TABLE IF NOT EXISTS session_heads (
  tenant TEXT NOT NULL, session_id TEXT NOT NULL, bound_seq INTEGER, quarantined_seq INTEGER,
  quarantine_reason TEXT, PRIMARY KEY (tenant, session_id));
"""),
    # configuration, not recorded data: policy documents are kept in plaintext (gateway.policy.versions)
    (3, """
CREATE TABLE IF NOT EXISTS policy_versions (
  hash TEXT PRIMARY KEY, policy_id TEXT NOT NULL, loaded_at REAL NOT NULL, document TEXT NOT NULL);
"""),
)
"""``(version, script)`` applied in order to a file below that version (``SCHEMA`` is version 1)."""

_HEAD = """
SELECT h.quarantined_seq, h.quarantine_reason, a.tenant, a.seq, a.created_at, a.body, a.prev_hash, a.hash
FROM session_heads h LEFT JOIN audit a ON a.tenant = h.tenant AND a.seq = h.bound_seq
WHERE h.tenant = ? AND h.session_id = ?"""
_UPSERT_HEAD = """
INSERT INTO session_heads (tenant, session_id, bound_seq, quarantined_seq, quarantine_reason)
VALUES (:tenant, :sid, :bound, :qseq, :reason)
ON CONFLICT (tenant, session_id) DO UPDATE SET
  bound_seq = coalesce(excluded.bound_seq, bound_seq),
  quarantined_seq = CASE WHEN :qseq IS NOT NULL THEN :qseq WHEN :clear THEN NULL ELSE quarantined_seq END,
  quarantine_reason = CASE WHEN :qseq IS NOT NULL THEN :reason WHEN :clear THEN NULL ELSE quarantine_reason END"""


def migrate(conn: sqlite3.Connection) -> list[int]:
    """Bring the file to :data:`SCHEMA_VERSION`; returns the versions applied."""
    conn.executescript(SCHEMA)
    conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', '1')")
    version = int(conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise StoreUnavailable(f"the SQLite store is at schema version {version}, newer than this gateway knows "
                               f"({SCHEMA_VERSION}): upgrade the gateway")
    applied = []
    for number, script in MIGRATIONS:
        if number > version:
            conn.executescript(f"BEGIN IMMEDIATE;{script}"
                               f"UPDATE meta SET value='{number}' WHERE name='schema_version';COMMIT;")
            applied.append(number)
    return applied


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA secure_delete=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def read_current(conn: sqlite3.Connection, tenant: str, session_id: str | None) -> Current:
    if session_id is None:
        return Current(tenant, None, None, None)
    srow = conn.execute("SELECT version, next_seq, state_ct, created_at, updated_at FROM sessions "
                        "WHERE tenant=? AND session_id=?", (tenant, session_id)).fetchone()
    krow = conn.execute("SELECT dk_id, kek_id, wrapped, created_at FROM data_keys "
                        "WHERE tenant=? AND session_id=?", (tenant, session_id)).fetchone()
    rounds, max_seq = conn.execute("SELECT count(*), coalesce(max(seq), 0) FROM rounds WHERE tenant=? AND "
                                   "session_id=?", (tenant, session_id)).fetchone()
    hrow = conn.execute(_HEAD, (tenant, session_id)).fetchone()
    head = AuditRow(*hrow[2:]) if hrow and hrow[2] is not None else None
    quarantine = (hrow[1] or "quarantined") if hrow and hrow[0] is not None else None
    return Current(tenant, session_id,
                   SessionRow(tenant, session_id, *srow) if srow else None,
                   DataKeyRow(tenant, session_id, *krow) if krow else None,
                   rounds=rounds, max_seq=max_seq, head=head, quarantine=quarantine)


def write_changes(conn: sqlite3.Connection, cur: Current, ch: Changes) -> None:
    """Apply *ch* inside the open transaction and chain its audit entries."""
    tenant, sid = cur.tenant, cur.session_id
    bound = evidence.bind(cur, ch)
    if ch.delete_session:
        for table in ("rounds", "sessions", "data_keys"):
            conn.execute(f"DELETE FROM {table} WHERE tenant=? AND session_id=?", (tenant, sid))
    if ch.delete_round_seqs:
        conn.executemany("DELETE FROM rounds WHERE tenant=? AND session_id=? AND seq=?",
                         [(tenant, sid, seq) for seq in ch.delete_round_seqs])
    if ch.data_key is not None:
        k = ch.data_key
        conn.execute("INSERT OR REPLACE INTO data_keys VALUES (?,?,?,?,?,?)",
                     (k.tenant, k.session_id, k.dk_id, k.kek_id, k.wrapped, k.created_at))
    if ch.session is not None:
        s = ch.session
        conn.execute("INSERT OR REPLACE INTO sessions VALUES (?,?,?,?,?,?,?)",
                     (s.tenant, s.session_id, s.version, s.next_seq, s.state_ct, s.created_at, s.updated_at))
    if ch.rounds:
        conn.executemany("INSERT INTO rounds VALUES (?,?,?,?,?,?,?,?,?,?)",
                         [(r.tenant, r.session_id, r.seq, r.created_at, r.request_id, r.policy_id,
                           r.policy_hash, r.outcome, r.kind, r.ct) for r in ch.rounds])
    if ch.audit:
        head = conn.execute("SELECT seq, hash FROM audit WHERE tenant=? ORDER BY seq DESC LIMIT 1",
                            (tenant,)).fetchone()
        seq, prev = head if head else (0, audit.GENESIS)
        now = time.time()
        for fields in ch.audit:
            seq += 1
            row = audit.seal_entry(tenant, seq, prev, now, fields)
            conn.execute("INSERT INTO audit VALUES (?,?,?,?,?,?)",
                         (row.tenant, row.seq, row.created_at, row.body, row.prev_hash, row.hash))
            ch.audit_rows.append(row)
            prev = row.hash
    update = evidence.head_update(cur, ch, ch.audit_rows[-len(ch.audit):] if ch.audit else [], bound)
    if update is not None:
        q_seq, reason = update.quarantine or (None, None)
        conn.execute(_UPSERT_HEAD, {"tenant": update.tenant, "sid": update.session_id, "bound": update.bound_seq,
                                    "qseq": q_seq, "reason": reason, "clear": update.clear_quarantine})


Job = Callable[[sqlite3.Connection], Any]


class Lane:
    """A thread that owns one connection and runs jobs in batches.

    ``submit(fn)`` queues ``fn(conn)``; the thread takes every job waiting (up to ``BATCH``),
    hands the batch to *run_batch*, which returns one ``(ok, value)`` per job, and wakes all
    the batch's callers with one ``call_soon_threadsafe`` per event loop.
    """

    def __init__(self, name: str, conn: sqlite3.Connection,
                 run_batch: Callable[[sqlite3.Connection, list[Job]], list[tuple[bool, Any]]]) -> None:
        self.conn, self.run_batch = conn, run_batch
        self.on_batch: Callable[[float, int], None] | None = None
        """Told each batch's duration and size (from this thread: keep it cheap and thread-safe)."""
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    async def submit(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, fut, loop))
        return await fut

    async def stop(self) -> None:
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    def _loop(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            started = time.perf_counter()
            outcomes = self.run_batch(self.conn, [fn for fn, _fut, _loop in batch])
            if self.on_batch is not None:
                self.on_batch(time.perf_counter() - started, len(batch))
            by_loop: dict[Any, list[Any]] = {}
            for (_fn, fut, loop), outcome in zip(batch, outcomes, strict=True):
                by_loop.setdefault(loop, []).append((fut, outcome))
            for loop, items in by_loop.items():
                loop.call_soon_threadsafe(_resolve, items)
        self.conn.close()


def run_transaction(conn: sqlite3.Connection, jobs: list[Job]) -> list[tuple[bool, Any]]:
    """One ``BEGIN IMMEDIATE`` transaction, a SAVEPOINT per job, one commit (one fsync)."""
    outcomes: list[tuple[bool, Any]] = []
    try:
        conn.execute("BEGIN IMMEDIATE")
        for fn in jobs:
            conn.execute("SAVEPOINT op")
            try:
                outcomes.append((True, fn(conn)))
                conn.execute("RELEASE op")
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, never swallowed
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                outcomes.append((False, _unavailable(exc, "write")))
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        err = StoreUnavailable(f"the SQLite store failed to commit: {exc}")
        outcomes = [(False, err)] * len(jobs)
    return outcomes


def run_reads(conn: sqlite3.Connection, jobs: list[Job]) -> list[tuple[bool, Any]]:
    """Each read on its own; a database error becomes ``StoreUnavailable`` for that read."""
    outcomes: list[tuple[bool, Any]] = []
    for fn in jobs:
        try:
            outcomes.append((True, fn(conn)))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcomes.append((False, _unavailable(exc, "read")))
    return outcomes


def _unavailable(exc: BaseException, doing: str) -> BaseException:
    """A database error (disk I/O, locked, corrupt file) as ``StoreUnavailable``; anything else
    (a plan's own error) unchanged."""
    if isinstance(exc, sqlite3.Error):
        err = StoreUnavailable(f"the SQLite store failed to {doing}: {exc}")
        err.__cause__ = exc
        return err
    return exc


class SQLiteStore:
    """The Store protocol on one SQLite file. Create, then ``await open()``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._writer: Lane | None = None
        self._reader: Lane | None = None
        self.on_commit: Callable[[float, int], None] | None = None
        """Set before ``open()``: told each write transaction's duration and number of writes."""

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            conn = _connect(self.path)
            migrate(conn)
            reader = _connect(self.path)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open the SQLite store at {self.path}: {exc}") from exc
        self._path_mode()
        self._writer = Lane("sqlite-writer", conn, run_transaction)
        self._writer.on_batch = self.on_commit
        self._reader = Lane("sqlite-reader", reader, run_reads)

    def _path_mode(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                p.chmod(0o600)

    async def close(self) -> None:
        for lane in (self._writer, self._reader):
            if lane is not None:
                await lane.stop()
        self._writer = self._reader = None

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer is None:
            raise StoreUnavailable("the store is not open")
        return await self._writer.submit(fn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._reader is None:
            raise StoreUnavailable("the store is not open")
        return await self._reader.submit(fn)

    async def transact(self, tenant: str, session_id: str | None, plan: Plan) -> Changes:
        def run(conn: sqlite3.Connection) -> Changes:
            cur = read_current(conn, tenant, session_id)
            changes = plan(cur)
            write_changes(conn, cur, changes)
            return changes
        return await self._write(run)

    async def rewrap_data_key(self, old: DataKeyRow, kek_id: str, wrapped: bytes) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            c = conn.execute("UPDATE data_keys SET kek_id=?, wrapped=? WHERE tenant=? AND session_id=? "
                             "AND kek_id=? AND wrapped=?",
                             (kek_id, wrapped, old.tenant, old.session_id, old.kek_id, old.wrapped))
            return c.rowcount == 1
        return await self._write(run)

    async def checkpoint(self) -> bool:
        """Fold the write-ahead log into the main file and truncate it; True when that completed.

        Runs on its own short-lived connection in a worker thread, with a short busy timeout:
        another connection's open read transaction (a backup, an admin shell) keeps the log
        from being truncated, and then this returns False at once instead of blocking a lane;
        the caller retries (``gateway.erasure``). Freed pages are zeroed (``secure_delete``).
        """
        def run() -> tuple[int, int, int]:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=CHECKPOINT_BUSY_SECONDS)
            try:
                conn.execute("PRAGMA secure_delete=ON")
                return conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                conn.close()
        try:
            busy, frames, copied = await asyncio.to_thread(run)
        except sqlite3.Error as exc:
            raise _unavailable(exc, "checkpoint") from exc
        if busy:
            log.warning("checkpoint_incomplete", path=str(self.path), wal_frames=frames, copied=copied,
                        note="another connection holds a read transaction; erased bytes stay in the "
                             "write-ahead log until a checkpoint completes")
        return not busy

    async def save_policy_versions(self, rows: list[PolicyVersionRow]) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT OR IGNORE INTO policy_versions VALUES (?,?,?,?)",
                             [(r.hash, r.policy_id, r.loaded_at, r.document) for r in rows])
        if rows:
            await self._write(run)

    async def policy_versions(self) -> list[PolicyVersionRow]:
        def run(c: sqlite3.Connection) -> list[PolicyVersionRow]:
            rows = c.execute("SELECT hash, policy_id, loaded_at, document FROM policy_versions "
                             "ORDER BY loaded_at, hash").fetchall()
            return [PolicyVersionRow(*r) for r in rows]
        return await self._read(run)

    # --- reads ---------------------------------------------------------------------------

    async def get_session(self, tenant: str, session_id: str) -> tuple[SessionRow | None, DataKeyRow | None]:
        cur = await self._read(lambda c: read_current(c, tenant, session_id))
        return cur.session, cur.data_key

    async def read_session(self, tenant: str, session_id: str) -> Current:
        return await self._read(lambda c: read_current(c, tenant, session_id))

    async def list_sessions(self, tenant: str) -> list[SessionSummary]:
        def run(c: sqlite3.Connection) -> list[SessionSummary]:
            rows = c.execute(
                "SELECT s.session_id, s.version, (SELECT count(*) FROM rounds r WHERE r.tenant=s.tenant "
                "AND r.session_id=s.session_id), s.created_at, s.updated_at FROM sessions s "
                "WHERE s.tenant=? ORDER BY s.updated_at DESC", (tenant,)).fetchall()
            return [SessionSummary(*r) for r in rows]
        return await self._read(run)

    async def page_sessions(self, tenant: str, *, after: str | None, limit: int, prefix: str = "",
                            since: float | None = None, until: float | None = None) -> list[SessionSummary]:
        inclusive = not after or prefix > after  # start at the prefix itself, or just after *after*
        sql = ("SELECT s.session_id, s.version, (SELECT count(*) FROM rounds r WHERE r.tenant=s.tenant "
               "AND r.session_id=s.session_id), s.created_at, s.updated_at FROM sessions s "
               f"WHERE s.tenant=? AND s.session_id{'>=' if inclusive else '>'}?")
        args: list[Any] = [tenant, prefix if inclusive else after]
        if prefix:
            sql += " AND s.session_id<?"
            args.append(prefix + "\U0010ffff")
        if since is not None:
            sql += " AND s.updated_at>=?"
            args.append(since)
        if until is not None:
            sql += " AND s.updated_at<?"
            args.append(until)
        sql += " ORDER BY s.session_id LIMIT ?"
        args.append(limit)

        def run(c: sqlite3.Connection) -> list[SessionSummary]:
            return [SessionSummary(*r) for r in c.execute(sql, args).fetchall()]
        return await self._read(run)

    async def count_rounds_by_policy(self, tenant: str) -> dict[tuple[str, str], int]:
        def run(c: sqlite3.Connection) -> dict[tuple[str, str], int]:
            rows = c.execute("SELECT policy_id, policy_hash, count(*) FROM rounds WHERE tenant=? "
                             "GROUP BY policy_id, policy_hash", (tenant,)).fetchall()
            return {(r[0], r[1]): r[2] for r in rows}
        return await self._read(run)

    async def tenants(self) -> list[str]:
        def run(c: sqlite3.Connection) -> list[str]:
            rows = c.execute("SELECT tenant FROM audit UNION SELECT tenant FROM sessions UNION "
                             "SELECT tenant FROM rounds ORDER BY 1").fetchall()
            return [r[0] for r in rows]
        return await self._read(run)

    async def _pages(self, query: Callable[[sqlite3.Connection, Any], list[Any]]) -> AsyncIterator[Any]:
        """Yield rows page by page; *query* gets the last row of the previous page (or None)."""
        last = None
        while True:
            page = await self._read(functools.partial(_call_with_last, query, last))
            for row in page:
                yield row
            if len(page) < PAGE:
                return
            last = page[-1]

    def iter_rounds(self, tenant: str, session_id: str | None = None, *, since: float | None = None,
                    until: float | None = None) -> AsyncIterator[RoundRow]:
        cond: list[str] = ["tenant=?"]
        args: list[str | float] = [tenant]
        if session_id is not None:
            cond.append("session_id=?")
            args.append(session_id)
        if since is not None:
            cond.append("created_at>=?")
            args.append(since)
        if until is not None:
            cond.append("created_at<?")
            args.append(until)
        where = " AND ".join(cond)

        def query(c: sqlite3.Connection, last: RoundRow | None) -> list[RoundRow]:
            extra, more = "", []
            if last is not None:
                extra, more = " AND (session_id, seq) > (?, ?)", [last.session_id, last.seq]
            rows = c.execute(f"SELECT * FROM rounds WHERE {where}{extra} ORDER BY session_id, seq LIMIT {PAGE}",
                             (*args, *more)).fetchall()
            return [RoundRow(*r) for r in rows]
        return self._pages(query)

    def iter_audit(self, tenant: str, *, after_seq: int = 0) -> AsyncIterator[AuditRow]:
        def query(c: sqlite3.Connection, last: AuditRow | None) -> list[AuditRow]:
            start = last.seq if last is not None else after_seq
            rows = c.execute(f"SELECT * FROM audit WHERE tenant=? AND seq>? ORDER BY seq LIMIT {PAGE}",
                             (tenant, start)).fetchall()
            return [AuditRow(*r) for r in rows]
        return self._pages(query)

    async def audit_head(self, tenant: str) -> int:
        return int(await self._read(lambda c: c.execute("SELECT coalesce(max(seq), 0) FROM audit WHERE tenant=?",
                                                        (tenant,)).fetchone()[0]))

    def iter_data_keys(self) -> AsyncIterator[DataKeyRow]:
        def query(c: sqlite3.Connection, last: DataKeyRow | None) -> list[DataKeyRow]:
            key = (last.tenant, last.session_id) if last is not None else ("", "")
            rows = c.execute("SELECT * FROM data_keys WHERE (tenant, session_id) > (?, ?) "
                             f"ORDER BY tenant, session_id LIMIT {PAGE}", key).fetchall()
            return [DataKeyRow(*r) for r in rows]
        return self._pages(query)

    async def count_data_keys(self, kek_id: str) -> int:
        return await self._read(lambda c: c.execute("SELECT count(*) FROM data_keys WHERE kek_id=?",
                                                    (kek_id,)).fetchone()[0])


def _call_with_last(query: Callable[[sqlite3.Connection, Any], list[Any]], last: Any,
                    conn: sqlite3.Connection) -> list[Any]:
    return query(conn, last)


def _resolve(items: list[tuple[asyncio.Future[Any], tuple[bool, Any]]]) -> None:
    for fut, (ok, value) in items:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

