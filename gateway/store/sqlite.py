"""The embedded store: one SQLite file in WAL mode, written by one thread with group commit.

Contract: see ``gateway.store.base``. How this backend keeps it:

- Writes commit in groups: a batch of plans, each inside its own SAVEPOINT of one ``BEGIN
  IMMEDIATE`` transaction, one commit with ``synchronous=FULL`` (one fsync for the batch), and
  only then the callers' futures resolved. A failing plan rolls back to its savepoint alone.
  Under load every write joins :class:`WriteQueue`, which keeps call order and takes one batch
  at a time: a batch of *bounded* plans (``transact(bounded=True)``: a round, an audit entry)
  runs on the event loop's thread with only its ``COMMIT`` on a commit thread; any other batch
  goes to the writer thread, which owns the write connection and waits for the lock when it
  must (up to ``BATCH`` plans per transaction). The loop never waits for a lock: when another
  connection holds it (another worker, the CLI), the commit thread waits for it and the batch
  is then planned on the loop; when the writer thread is busy, a bounded batch goes to it too.
- Reads go to one reader thread with its own connection, batched the same way (every read
  waiting is run, then all its callers are woken with one loop callback). One exception: a
  *hot* session read (``read_session(hot=True)``: a session this process used a moment ago,
  with at most a few thousand rounds) runs on the event loop, on a third connection that never
  waits for a lock (busy timeout 0; when busy, the read goes to the reader thread instead). It
  is one indexed query over cached pages, tens of microseconds, where a hand-off to a thread
  and back costs hundreds on a small machine (``benchmarks/README.md``). Verification reads
  through :meth:`SQLiteStore.snapshot` instead: a fourth connection holding one read transaction
  for all its reads, so the chain and the rows it checks are one moment's.
- When the gateway is quiet (``quiet()``: the committing request is the only one in flight)
  and the writer thread is idle, a write runs at once on the event loop's thread instead, on
  the same connection (the writer's lock keeps the two apart), never waiting for another
  process's lock (busy: it goes to the writer thread). With nothing else to serve, that loses no
  concurrency and saves the two thread hand-offs (about 0.1 ms of CPU and 0.3 ms of latency each
  round on a small machine); under load every write joins the group commit above.
- **Rows this process wrote.** After each commit the store keeps, per session (LRU,
  ``KNOWN_SESSIONS``), the rows as the commit left them (``evidence.after``), tagged with an
  epoch. The writer's connection asks ``PRAGMA data_version``, which changes exactly when
  *another* connection (a second worker, the CLI, an operator's shell) has committed; then the
  epoch moves on and every kept entry is stale. While it has not, a write plan and a session
  read get the kept rows (``Current.own``) instead of querying: they are byte for byte what is
  stored. The look needs the writer's connection, so a read uses it only when the writer is
  idle or inside a batch that has looked (otherwise it queries). After another connection's
  commit the rows are read again, and when they are byte for byte what this process's commit
  left (another worker wrote other sessions) they count as its own again (``_vouch``), so two
  workers do not re-check each other's sessions on every round. A failed commit keeps nothing
  of its batch, and a commit built on rows that fail the chain check (a quarantine's) keeps
  nothing either.
- **Several gateway processes on one file** (``serve --workers``) take turns through a lock
  file beside it (``<file>-writer.lock``, ``flock``): a writer blocks in the kernel until the
  lock is free and is woken when it is, instead of polling SQLite's write lock with sleeps
  (which starves one process while another commits back to back), and gives up after
  ``BUSY_WAIT_SECONDS`` (a stopped or stuck holder fails writes as unavailable instead of
  freezing them). ``BEGIN IMMEDIATE`` still serialises every writer, and other processes (the
  CLI) wait on it as before.
- Schema: :data:`SCHEMA` is version 1; :data:`MIGRATIONS` take a file from the version in
  ``meta.schema_version`` to :data:`SCHEMA_VERSION` when it opens (a file from a newer gateway
  is refused). Never edit a migration once released; add the next one.
- Every change that writes a session's rows is bound into its audit entry and the session's
  ``session_heads`` row (``gateway.evidence``) inside the same transaction.
- **Pending erasures** (``Changes.erasure``) are rows of ``meta`` named ``erasure_pending
  ["tenant", "request id"]`` whose value is the :class:`~gateway.store.base.PendingErasure` as
  JSON (ids and a time, no content), written in the erasure's transaction and deleted by
  ``Changes.erasure_done``: a record in the file, so the erasure is finished by whichever process
  runs next (another worker, the gateway started later, the CLI run again), not lost with the
  memory of the process that erased. A row so named that does not hold one (not JSON, a field
  missing or of another type, a name its tenant and request id do not give: edited outside the
  gateway) is left out of :meth:`SQLiteStore.pending_erasures` and logged once per process
  (``erasure_pending_malformed``), so it stops no other erasure.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import enum
import fcntl
import functools
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from gateway import audit, evidence
from gateway.audit import AlteredRow
from gateway.crypto import BoundedCache
from gateway.errors import Conflict, StoreUnavailable, cannot_create
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
log = structlog.get_logger("gateway.store.sqlite")
KNOWN_SESSIONS = 1024
"""Sessions whose rows, as this process last committed them, the store keeps (LRU)."""
BATCH = 256
PAGE = 500
SCHEMA_VERSION = 5
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
    # which tenant each provider-held response id belongs to, by the id's SHA-256 (gateway.store.base)
    (4, """
CREATE TABLE IF NOT EXISTS provider_responses (
  tenant TEXT NOT NULL, id_sha256 BLOB NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (tenant, id_sha256))
  WITHOUT ROWID;
"""),
    # ... kept as an HMAC of tenant and id under a key from the signing key file (base.owned_response):
    # a bare hash could be copied to another tenant; rows kept that way cannot be told from such copies
    (5, """
DROP TABLE IF EXISTS provider_responses;
CREATE TABLE provider_responses (
  tenant TEXT NOT NULL, id_mac BLOB NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (tenant, id_mac)) WITHOUT ROWID;
"""),
)
"""``(version, script)`` applied in order to a file below that version (``SCHEMA`` is version 1)."""

_UPSERT_HEAD = """
INSERT INTO session_heads (tenant, session_id, bound_seq, quarantined_seq, quarantine_reason)
VALUES (:tenant, :sid, :bound, :qseq, :reason)
ON CONFLICT (tenant, session_id) DO UPDATE SET
  bound_seq = coalesce(excluded.bound_seq, bound_seq),
  quarantined_seq = CASE WHEN :qseq IS NOT NULL THEN :qseq WHEN :clear THEN NULL ELSE quarantined_seq END,
  quarantine_reason = CASE WHEN :qseq IS NOT NULL THEN :reason WHEN :clear THEN NULL ELSE quarantine_reason END"""


_UPSERT_SESSION = """
INSERT INTO sessions VALUES (?,?,?,?,?,?,?)
ON CONFLICT (tenant, session_id) DO UPDATE SET version = excluded.version, next_seq = excluded.next_seq,
  state_ct = excluded.state_ct, created_at = excluded.created_at, updated_at = excluded.updated_at"""
"""The session's row, written in place when it exists (same rowid and key entry: an ``INSERT OR
REPLACE`` deletes the row and its key entry and inserts both anew, freeing and reallocating the
state's overflow pages on every round)."""


ERASURE_PENDING = "erasure_pending "
"""The prefix of a pending erasure's name in ``meta`` (see the module docstring)."""


def _erasure_name(tenant: str, request_id: str) -> str:
    return ERASURE_PENDING + json.dumps([tenant, request_id])


class _PendingRecord(BaseModel):
    """A pending erasure's record as ``meta`` holds it (what :func:`write_changes` writes)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    tenant: str
    session_id: str
    request_id: str
    erased_at: float


def _pending_record(name: Any, value: Any) -> PendingErasure:
    """The pending erasure the ``meta`` row *name*, *value* records; ``ValueError`` saying why
    it records none (never repeating the value)."""
    if not isinstance(value, str | bytes):
        raise ValueError(f"its value is {type(value).__name__}, not JSON text")
    try:
        record = _PendingRecord.model_validate_json(value)
    except ValidationError as exc:
        raise ValueError("; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}"
                                   for e in exc.errors(include_input=False))) from None
    if name != _erasure_name(record.tenant, record.request_id):
        raise ValueError("its name is not the one its tenant and request id give")
    return PendingErasure(record.tenant, record.session_id, record.request_id, record.erased_at)


def migrate(conn: sqlite3.Connection) -> list[int]:
    """Bring the file to :data:`SCHEMA_VERSION`; returns the versions applied. Raises
    ``StoreUnavailable`` naming the file for a version newer than this gateway knows, or a
    ``meta.schema_version`` that is not a version number (edited outside the gateway)."""
    conn.executescript(SCHEMA)
    conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', '1')")
    value = conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()[0]
    file = conn.execute("PRAGMA database_list").fetchone()[2] or "(in memory)"
    if not (isinstance(value, int) or (isinstance(value, str) and value.isascii() and value.isdecimal())):
        shown = repr(value if not isinstance(value, str | bytes) or len(value) <= 40 else value[:40])
        raise StoreUnavailable(f"the SQLite store {file} holds {shown} in meta.schema_version, which is not a "
                               f"schema version (this gateway writes 1 to {SCHEMA_VERSION}): the row was edited "
                               "outside the gateway; put the version back or restore the file from a backup")
    version = int(value)
    if version > SCHEMA_VERSION:
        raise StoreUnavailable(f"the SQLite store {file} is at schema version {version}, newer than this gateway "
                               f"knows ({SCHEMA_VERSION}): upgrade the gateway")
    applied = []
    for number, script in MIGRATIONS:
        if number > version:
            conn.executescript(f"BEGIN IMMEDIATE;{script}"
                               f"UPDATE meta SET value='{number}' WHERE name='schema_version';COMMIT;")
            applied.append(number)
    return applied


def _connect(path: Path, busy_ms: int = 30000) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_ms / 1000)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA secure_delete=ON")
    conn.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
    return conn


_CURRENT = """
SELECT s.version, s.next_seq, s.state_ct, s.created_at, s.updated_at,
       k.dk_id, k.kek_id, k.wrapped, k.created_at, r.n, r.top,
       h.quarantined_seq, h.quarantine_reason, a.tenant, a.seq, a.created_at, a.body, a.prev_hash, a.hash
FROM (SELECT count(*) AS n, coalesce(max(seq), 0) AS top FROM rounds WHERE tenant = :t AND session_id = :s) r
LEFT JOIN sessions s ON s.tenant = :t AND s.session_id = :s
LEFT JOIN data_keys k ON k.tenant = :t AND k.session_id = :s
LEFT JOIN session_heads h ON h.tenant = :t AND h.session_id = :s
LEFT JOIN audit a ON a.tenant = :t AND a.seq = h.bound_seq"""


def _bytes_unless_utf8(raw: bytes) -> str | bytes:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw


def text_checked(fn: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection) -> T:
    """``fn(conn)`` (a read). A TEXT value that is not UTF-8 (an edit outside the gateway:
    ``CAST(x'ff' AS TEXT)``) makes ``sqlite3`` fail the whole query with a message quoting the
    bytes; then the read runs again with such values read as ``bytes``, which the typed row
    check (``evidence.typed``) reports as the row and column edited. Costs nothing otherwise."""
    try:
        return fn(conn)
    except sqlite3.OperationalError as exc:
        if not str(exc).startswith("Could not decode to UTF-8"):
            raise
    conn.text_factory = _bytes_unless_utf8
    try:
        return fn(conn)
    finally:
        conn.text_factory = str


def _current_row(tenant: str, session_id: str, conn: sqlite3.Connection) -> Any:
    return conn.execute(_CURRENT, {"t": tenant, "s": session_id}).fetchall()[0]  # always one row; none left open


def read_current(conn: sqlite3.Connection, tenant: str, session_id: str | None) -> Current:
    """The session's rows, its round count and highest seq, and its head entry: one query."""
    if session_id is None:
        return Current(tenant, None, None, None)
    row = text_checked(functools.partial(_current_row, tenant, session_id), conn)
    return evidence.current(tenant, session_id, row[0:5] if row[0] is not None else None,
                            row[5:9] if row[5] is not None else None, row[9], row[10], row[11], row[12],
                            row[13:] if row[13] is not None else None)


def write_changes(conn: sqlite3.Connection, cur: Current, ch: Changes, key: audit.EntryKey | None = None) -> Current:
    """Apply *ch* inside the open transaction and chain its audit entries (their MACs under *key*,
    which keys its provider response ids too); returns the session's rows as they are now
    (``evidence.after``)."""
    tenant, sid = cur.tenant, cur.session_id
    if ch.erasure_done is not None and conn.execute(
            "DELETE FROM meta WHERE name=?", (_erasure_name(tenant, ch.erasure_done),)).rowcount == 0:
        raise Conflict(f"the erasure {ch.erasure_done} of tenant {tenant} is not pending (finished already)")
    if ch.erasure is not None:
        pending = PendingErasure(tenant, sid or "", ch.erasure, time.time())
        conn.execute("INSERT OR REPLACE INTO meta VALUES (?,?)",
                     (_erasure_name(tenant, ch.erasure), json.dumps(dataclasses.asdict(pending))))
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
        conn.execute(_UPSERT_SESSION,
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
            row = audit.seal_entry(tenant, seq, prev, now, fields, key)
            conn.execute("INSERT INTO audit VALUES (?,?,?,?,?,?)",
                         (row.tenant, row.seq, row.created_at, row.body, row.prev_hash, row.hash))
            ch.audit_rows.append(row)
            prev = row.hash
    if ch.provider_responses:
        now = time.time()
        conn.executemany("INSERT OR IGNORE INTO provider_responses VALUES (?,?,?)",
                         [(tenant, owned_response(key, tenant, digest), now) for digest in ch.provider_responses])
    rows = ch.audit_rows[-len(ch.audit):] if ch.audit else []
    update = evidence.head_update(cur, ch, rows, bound)
    if update is not None:
        q_seq, reason = update.quarantine or (None, None)
        conn.execute(_UPSERT_HEAD, {"tenant": update.tenant, "sid": update.session_id, "bound": update.bound_seq,
                                    "qseq": q_seq, "reason": reason, "clear": update.clear_quarantine})
    return evidence.after(cur, ch, rows, bound)


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
        self._busy = threading.Lock()  # held while a batch runs, on the lane's thread or the caller's
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    async def submit(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self.enqueue(fn)

    def enqueue(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue ``fn(conn)`` now; the future gets its outcome (unless cancelled meanwhile)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, fut, loop))
        return fut

    def run_now(self, fn: Callable[[sqlite3.Connection], Any],
                run: Callable[[sqlite3.Connection, Job], tuple[bool, Any] | None]) -> tuple[bool, Any] | None:
        """``run(conn, fn)`` on the caller's thread when the lane is idle with nothing queued;
        None when it is busy (or *run* declined): then ``submit`` it."""
        if not self._busy.acquire(blocking=False):
            return None
        try:
            if not self._queue.empty():
                return None
            started = time.perf_counter()
            outcome = run(self.conn, fn)
            if outcome is not None and self.on_batch is not None:
                self.on_batch(time.perf_counter() - started, 1)
            return outcome
        finally:
            self._busy.release()

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
            with self._busy:
                started = time.perf_counter()
                outcomes = self.run_batch(self.conn, [fn for fn, _fut, _loop in batch])
            if self.on_batch is not None:
                self.on_batch(time.perf_counter() - started, len(batch))
            by_loop: dict[Any, list[Any]] = {}
            for (_fn, fut, loop), outcome in zip(batch, outcomes, strict=True):
                by_loop.setdefault(loop, []).append((fut, outcome))
            for loop, items in by_loop.items():
                with contextlib.suppress(RuntimeError):  # that loop has closed (a gateway stopped while
                    loop.call_soon_threadsafe(_resolve, items)  # starting, a read in flight): nobody waits
        self.conn.close()


class Begin(enum.Enum):
    """What :class:`WriteQueue`'s *begin* achieved."""

    BEGUN = "begun"
    """A write transaction is open on the caller's thread, the writer's lane held."""
    BLOCKED = "blocked"
    """The lane is held (the writer thread idle, nothing queued for it) but another process holds
    the turn file or SQLite's write lock: *wait* (on a thread) opens the transaction."""
    BUSY = "busy"
    """The writer thread is busy or has work queued: nothing is held."""


class WriteQueue:
    """Every write plan under load, in call order, one batch at a time: a batch of bounded plans
    runs on the event loop's thread and only its ``COMMIT`` (the fsync) goes to a thread; any
    other batch goes to the writer thread.

    ``add(job, bounded)`` queues the job and returns its future. On the loop's next turn the
    jobs queued so far (up to ``BATCH``) form a batch. When all of them are *bounded* (their
    work is bounded by one request: a round, an audit entry) and *begin* opens a transaction at
    once (the writer thread idle, the turn file and SQLite's write lock free), the jobs run on
    the loop's thread (:func:`run_transaction` without committing) and the commit thread runs
    :func:`finish_transaction`, then *end*, which gives the lock back. When only the lock is
    missing (another gateway process or the CLI is writing: :attr:`Begin.BLOCKED`), the commit
    thread waits for it (*wait*, which blocks in the kernel, not on the interpreter lock) and the
    batch then runs on the loop as above, joined by the bounded jobs queued meanwhile (up to
    ``BATCH``); a wait that fails (the lock never came) fails those jobs with its error.
    Otherwise the batch goes to *fallback* (the writer thread, which waits for the lock): a plan
    that may take long (erasing a large session) must not stall every request on the loop. Jobs
    queued meanwhile wait for the batch to end and form the next one, so plans are taken in call
    order across both paths.

    On the loop, a batch's Python work (the plans, sealing, the statements) does not trade the
    interpreter lock back and forth with the loop's own work, as it does on the writer thread
    (about three hand-offs per round under load), and the loop serves requests while the disk
    syncs. Callers' futures are resolved after the commit, as on the writer thread."""

    def __init__(self, conn: sqlite3.Connection, begin: Callable[[], Begin], wait: Callable[[], None],
                 end: Callable[[], None], fallback: Callable[[Job], asyncio.Future[Any]],
                 committing: Callable[[], None], committed: Callable[[], None]) -> None:
        self.conn = conn
        self._begin, self._wait, self._end, self._fallback = begin, wait, end, fallback
        self._committing, self._committed = committing, committed
        self.on_batch: Callable[[float, int], None] | None = None
        """Told each batch's duration and size that ran on the loop (the writer thread tells its own)."""
        self._queued: list[tuple[Job, bool, asyncio.Future[Any]]] = []
        self._scheduled = False
        self._running: asyncio.Future[Any] | None = None
        self._committer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sqlite-commit")

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch running: a write may go ahead of this queue."""
        return self._running is None and not self._queued

    def add(self, job: Job, bounded: bool) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._queued.append((job, bounded, fut))
        if not self._scheduled and self._running is None:
            self._scheduled = True
            loop.call_soon(self._next)
        return fut

    async def close(self) -> None:
        """Let the queued batches run (the writer thread must still be there) and stop the
        commit thread."""
        while not self.idle:
            if self._running is not None:
                await asyncio.wait([self._running])
            else:
                self._next()
        self._committer.shutdown(wait=True)

    def _next(self) -> None:
        self._scheduled = False
        if self._running is not None or not self._queued:
            return
        loop = asyncio.get_running_loop()
        began = self._begin() if all(bounded for _, bounded, _ in self._queued[:BATCH]) else Begin.BUSY
        if began is Begin.BEGUN:
            self._run_begun()
        elif began is Begin.BLOCKED:
            self._running = loop.run_in_executor(self._committer, self._wait)
            self._running.add_done_callback(self._waited)
        else:
            batch, self._queued = self._queued[:BATCH], self._queued[BATCH:]  # as the writer thread: a bounded stall
            inner = [self._fallback(job) for job, _, _ in batch]
            for fut, (_, _, caller) in zip(inner, batch, strict=True):
                fut.add_done_callback(functools.partial(_pass_on, caller))
            self._running = asyncio.gather(*inner, return_exceptions=True)
            self._running.add_done_callback(lambda _: self._ended())

    def _take_bounded(self) -> list[tuple[Job, bool, asyncio.Future[Any]]]:
        """The next batch for the loop: the queue's leading bounded jobs, at most ``BATCH``."""
        n = 0
        while n < min(BATCH, len(self._queued)) and self._queued[n][1]:
            n += 1
        batch, self._queued = self._queued[:n], self._queued[n:]
        return batch

    def _run_begun(self) -> None:
        """Plan the next batch on the loop's thread inside the open transaction; commit it on the
        commit thread."""
        batch = self._take_bounded()
        started = time.perf_counter()
        outcomes = run_transaction(self.conn, [job for job, _, _ in batch], began=True, commit=False)
        if not self.conn.in_transaction:  # rolled back already: nothing to commit
            self._end()
            return self._ran(batch, outcomes, started)
        self._running = asyncio.get_running_loop().run_in_executor(self._committer, self._commit, outcomes)
        self._running.add_done_callback(lambda done: self._ran(batch, _commit_outcomes(done, len(batch)), started))

    def _waited(self, done: asyncio.Future[Any]) -> None:
        """The commit thread's wait for the lock ended: run the batch, or fail it with the
        wait's error (the lock never came)."""
        self._running = None
        error = _commit_error(done)
        if error is None:
            return self._run_begun()
        self._end()
        batch = self._take_bounded()
        _resolve([(caller, (False, error)) for _, _, caller in batch])
        self._ended()

    def _commit(self, outcomes: list[tuple[bool, Any]]) -> list[tuple[bool, Any]]:
        try:
            return finish_transaction(self.conn, outcomes, self._committing, self._committed)
        finally:
            self._end()

    def _ran(self, batch: list[tuple[Job, bool, asyncio.Future[Any]]], outcomes: list[tuple[bool, Any]],
             started: float) -> None:
        if self.on_batch is not None:
            self.on_batch(time.perf_counter() - started, len(batch))
        _resolve([(caller, outcome) for (_, _, caller), outcome in zip(batch, outcomes, strict=True)])
        self._ended()

    def _ended(self) -> None:
        self._running = None
        if self._queued and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._next)


def _commit_error(done: asyncio.Future[Any]) -> BaseException | None:
    """The error a commit-thread call ended with (None when it returned)."""
    if done.cancelled():
        return StoreUnavailable("the SQLite store failed to commit")
    return done.exception()


def _commit_outcomes(done: asyncio.Future[Any], jobs: int) -> list[tuple[bool, Any]]:
    """The outcomes the commit thread returned, or a failure for every job when it broke."""
    if done.cancelled() or done.exception() is not None:
        return [(False, StoreUnavailable("the SQLite store failed to commit"))] * jobs
    return done.result()  # type: ignore[no-any-return]


def _pass_on(caller: asyncio.Future[Any], done: asyncio.Future[Any]) -> None:
    """*done*'s outcome to *caller* (unless the caller is settled already)."""
    if caller.done():
        return
    if done.cancelled():
        caller.cancel()
    elif done.exception() is not None:
        caller.set_exception(done.exception())  # type: ignore[arg-type]
    else:
        caller.set_result(done.result())


def run_transaction(conn: sqlite3.Connection, jobs: list[Job], *, began: bool = False, commit: bool = True,
                    committing: Callable[[], None] | None = None,
                    committed: Callable[[], None] | None = None) -> list[tuple[bool, Any]]:
    """One ``BEGIN IMMEDIATE`` transaction (unless it *began* already), a SAVEPOINT per job (none
    for a lone job: its failure rolls the transaction back instead), then
    :func:`finish_transaction`; a failed commit fails every job. Without *commit* the
    transaction is left open for the caller to finish (unless it was rolled back: then
    ``conn.in_transaction`` is False and the outcomes say why)."""
    outcomes: list[tuple[bool, Any]] = []
    try:
        if not began:
            begin_waiting(conn)
        if len(jobs) == 1:  # no neighbour to keep apart from: a failure rolls everything back
            try:
                outcomes.append((True, jobs[0](conn)))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, never swallowed
                if conn.in_transaction:  # SQLite rolls back by itself on some errors (SQLITE_FULL)
                    conn.execute("ROLLBACK")
                return [(False, _unavailable(exc, "write"))]
        else:
            for fn in jobs:
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, fn(conn)))
                    conn.execute("RELEASE op")
                except BaseException as exc:  # noqa: BLE001 - handed to the caller, never swallowed
                    if isinstance(exc, sqlite3.Error) and not conn.in_transaction:
                        return _rolled_back(conn, exc, len(jobs))  # SQLite rolled back every job (SQLITE_FULL)
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.append((False, _unavailable(exc, "write")))
    except sqlite3.Error as exc:
        return _rolled_back(conn, exc, len(jobs))
    return finish_transaction(conn, outcomes, committing, committed) if commit else outcomes


def finish_transaction(conn: sqlite3.Connection, outcomes: list[tuple[bool, Any]],
                       committing: Callable[[], None] | None = None,
                       committed: Callable[[], None] | None = None) -> list[tuple[bool, Any]]:
    """*committing()*, ``COMMIT`` (one fsync), *committed()*: the jobs' *outcomes*, or, when the
    commit fails, ``StoreUnavailable`` for every job (and the transaction rolled back)."""
    try:
        if committing is not None:
            committing()
        conn.execute("COMMIT")
        if committed is not None:
            committed()
    except sqlite3.Error as exc:
        return _rolled_back(conn, exc, len(outcomes))
    return outcomes


def _rolled_back(conn: sqlite3.Connection, exc: sqlite3.Error, jobs: int) -> list[tuple[bool, Any]]:
    if conn.in_transaction:
        conn.execute("ROLLBACK")
    err = StoreUnavailable(f"the SQLite store failed to commit: {exc}")
    return [(False, err)] * jobs


BUSY_WAIT_SECONDS = 30.0
"""How long a write waits for another process (the CLI, another worker) to give up the lock."""


def begin_waiting(conn: sqlite3.Connection) -> None:
    """``BEGIN IMMEDIATE``, waiting (sleeping, with backoff) while another connection holds the
    write lock. The writer's connection has no busy timeout of its own: only this statement may
    wait, so ``run_transaction_now`` can try it once without waiting."""
    deadline = time.monotonic() + BUSY_WAIT_SECONDS
    delay = 0.0005
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def run_transaction_now(conn: sqlite3.Connection, job: Job, committing: Callable[[], None] | None = None,
                        committed: Callable[[], None] | None = None) -> tuple[bool, Any] | None:
    """:func:`run_transaction` of one job, or None when another connection holds the write lock
    (it is not waited for here)."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError:
        return None
    return run_transaction(conn, [job], began=True, committing=committing, committed=committed)[0]


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
        said = str(exc).split(" with text '", 1)[0]  # sqlite3 quotes a value it could not decode: never repeat it
        err = StoreUnavailable(f"the SQLite store failed to {doing}: {said}")
        err.__cause__ = exc
        return err
    return exc


class Reads:
    """Every read of the Store protocol but ``read_session``, as queries run by ``_read``: on the
    store's reader thread (:class:`SQLiteStore`), or all in one read transaction
    (:class:`Snapshot`)."""

    entry_key: audit.EntryKey | None = None
    """Keys ``provider_responses`` (``base.owned_response``): the store's, in its snapshots too."""

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    async def policy_versions(self) -> list[PolicyVersionRow]:
        def run(c: sqlite3.Connection) -> list[PolicyVersionRow]:
            rows = c.execute("SELECT hash, policy_id, loaded_at, document FROM policy_versions "
                             "ORDER BY loaded_at, hash").fetchall()
            return [PolicyVersionRow(*r) for r in rows]
        return await self._read(run)


    async def holds_provider_response(self, tenant: str, digest: bytes) -> bool:
        mac = owned_response(self.entry_key, tenant, digest)

        def run(c: sqlite3.Connection) -> bool:
            return c.execute("SELECT 1 FROM provider_responses WHERE tenant=? AND id_mac=?",
                             (tenant, mac)).fetchone() is not None
        return await self._read(run)

    async def get_session(self, tenant: str, session_id: str) -> tuple[SessionRow | None, DataKeyRow | None]:
        cur = await self._read(lambda c: read_current(c, tenant, session_id))
        if isinstance(cur, evidence.Altered) and cur.error is not None:
            raise cur.error
        return cur.session, cur.data_key

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
        """Yield rows page by page; *query* gets the last row of the previous page (or None). A
        row read as an ``AlteredRow`` (``evidence.typed_or_altered``) is raised when reached."""
        last = None
        while True:
            page = await self._read(functools.partial(_call_with_last, query, last))
            for row in page:
                if isinstance(row, AlteredRow):
                    raise row
                yield row
            if len(page) < PAGE:
                return
            last = page[-1]

    def iter_rounds(self, tenant: str, session_id: str | None = None, *, since: float | None = None,
                    until: float | None = None, after_seq: int | None = None) -> AsyncIterator[RoundRow]:
        cond: list[str] = ["tenant=?"]
        args: list[str | float] = [tenant]
        if session_id is not None:
            cond.append("session_id=?")
            args.append(session_id)
        if after_seq is not None:
            cond.append("seq>?")
            args.append(after_seq)
        if since is not None:
            cond.append("created_at>=?")
            args.append(since)
        if until is not None:
            cond.append("created_at<?")
            args.append(until)
        where = " AND ".join(cond)

        def query(c: sqlite3.Connection, last: RoundRow | None) -> list[RoundRow | AlteredRow]:
            extra, more = "", []
            if last is not None:
                extra, more = " AND (session_id, seq) > (?, ?)", [last.session_id, last.seq]
            rows = c.execute(f"SELECT * FROM rounds WHERE {where}{extra} ORDER BY session_id, seq LIMIT {PAGE}",
                             (*args, *more)).fetchall()
            return evidence.typed_or_altered(RoundRow, rows)
        return self._pages(query)

    def iter_audit(self, tenant: str, *, after_seq: int = 0) -> AsyncIterator[AuditRow]:
        def query(c: sqlite3.Connection, last: AuditRow | None) -> list[AuditRow | AlteredRow]:
            start = last.seq if last is not None else after_seq
            rows = c.execute(f"SELECT * FROM audit WHERE tenant=? AND seq>? ORDER BY seq LIMIT {PAGE}",
                             (tenant, start)).fetchall()
            return evidence.typed_or_altered(AuditRow, rows)
        return self._pages(query)

    async def quarantined(self, tenant: str) -> dict[str, int]:
        rows = await self._read(lambda c: c.execute("SELECT session_id, quarantined_seq FROM session_heads "
                                                    "WHERE tenant=? AND quarantined_seq IS NOT NULL",
                                                    (tenant,)).fetchall())
        return {r[0]: r[1] for r in rows}

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


class Snapshot(Reads):
    """The store as one moment saw it: every read in a single read transaction on a connection
    of its own (``SQLiteStore.snapshot``), run on that connection's own thread, one at a time."""

    def __init__(self, conn: sqlite3.Connection, lane: concurrent.futures.Executor,
                 entry_key: audit.EntryKey | None = None) -> None:
        self._conn = conn
        self._lane = lane
        self.entry_key = entry_key

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._lane, text_checked, fn, self._conn)
        except sqlite3.Error as exc:
            raise _unavailable(exc, "read") from exc


class SQLiteStore(Reads):
    """The Store protocol on one SQLite file. Create, then ``await open()``. Audit entries are
    sealed with *entry_key* (``gateway.audit.seal_entry``)."""

    def __init__(self, path: Path, *, entry_key: audit.EntryKey | None = None) -> None:
        self.path = Path(path)
        self.entry_key = entry_key
        self._writer: Lane | None = None
        self._reader: Lane | None = None
        self._writes: WriteQueue | None = None
        self._inline: sqlite3.Connection | None = None
        self._turns: int | None = None
        """The lock file's descriptor: whose turn it is to write, among this file's gateways."""
        self.on_commit: Callable[[float, int], None] | None = None
        """Set before ``open()``: told each write transaction's duration and number of writes."""
        self._epoch = 0
        self._data_version: int | None = None
        self._known: BoundedCache[tuple[str, str], tuple[int, Current]] = BoundedCache(KNOWN_SESSIONS)
        self._staged: dict[tuple[str, str], Current | None] = {}
        self._batch_epoch: int | None = None
        self._locked = False
        """True while a write transaction holds the lock *and* has looked at ``data_version``:
        nobody else can commit, and ``_epoch`` is up to date."""
        self._generation = 0
        """Moves on each time ``_locked`` turns False (read around a lock-free lookup)."""
        self._malformed: set[str] = set()
        """Names of ``meta`` rows that are not pending erasures, logged already."""
        self.quiet: Callable[[], bool] | None = None
        """Whether nothing but the caller is in flight, so a write may run on the event loop
        (see the module docstring); None: every write goes to the writer thread."""

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        try:  # made here, not by SQLite, whose "unable to open database file" does not say why
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not self.path.exists():
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))  # an empty file is an empty database
        except OSError as exc:  # a read-only or full disk, no permission, a file where a folder goes
            raise cannot_create(exc, self.path, "SQLite store", "store.path") from exc
        try:
            conn = _connect(self.path)
            try:
                migrate(conn)
            except StoreUnavailable:  # a file this gateway cannot use: left as it is
                conn.close()
                raise
            conn.execute("PRAGMA busy_timeout=0")  # the writer waits in begin_waiting only
            reader = _connect(self.path)
            self._inline = _connect(self.path, busy_ms=0)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open the SQLite store at {self.path}: {exc}") from exc
        lock = Path(str(self.path) + "-writer.lock")
        try:
            self._turns = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            for c in (conn, reader, self._inline):
                c.close()
            self._inline = None
            raise StoreUnavailable(f"cannot open the SQLite store's lock file {lock}: {exc.strerror}; "
                                   "the gateway needs to create and write it beside the database") from exc
        self._path_mode()
        self._writer = Lane("sqlite-writer", conn, self._write_batch)
        self._writer.on_batch = self.on_commit
        self._reader = Lane("sqlite-reader", reader, run_reads)
        self._writes = WriteQueue(conn, self._begin_now, self._begin_waiting, self._end_now, self._writer.enqueue,
                                  committing=self._unlocking, committed=self._committed)
        self._writes.on_batch = self.on_commit

    def _path_mode(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                p.chmod(0o600)

    async def close(self) -> None:
        if self._writes is not None:  # before the writer thread goes: its last batches may need it
            await self._writes.close()
            self._writes = None
        for lane in (self._writer, self._reader):
            if lane is not None:
                await lane.stop()
        self._writer = self._reader = None
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        if self._turns is not None:
            os.close(self._turns)
            self._turns = None

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer is None:
            raise StoreUnavailable("the store is not open")
        return await self._writer.submit(fn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._reader is None:
            raise StoreUnavailable("the store is not open")
        return await self._reader.submit(functools.partial(text_checked, fn))

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[Snapshot]:
        """Reads that all see the database as it was when the first of them ran (one read
        transaction on a connection of its own; WAL keeps that version while writers go on).

        Everything done on that connection, its closing included, runs on one thread of its own,
        in order: a reader cancelled while a query runs (a verification stopped, the gateway
        shutting down) has the connection closed after that query, never under it from another
        thread."""
        if self._reader is None:
            raise StoreUnavailable("the store is not open")
        lane = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sessiongate-snapshot")
        loop = asyncio.get_running_loop()
        try:
            try:
                conn = await loop.run_in_executor(lane, _connect, self.path)
            except sqlite3.Error as exc:
                raise _unavailable(exc, "read") from exc
            try:
                await loop.run_in_executor(lane, conn.execute, "BEGIN")
                yield Snapshot(conn, lane, self.entry_key)
            finally:
                await asyncio.wrap_future(lane.submit(_end_snapshot, conn))  # queued behind any read still running
        finally:
            lane.shutdown(wait=False)

    # --- rows this process wrote (see the module docstring) --------------------------------

    def _observe(self, conn: sqlite3.Connection) -> int:
        """The epoch, moved on when another connection committed since the last look. Runs on
        the writer's connection, with its lane's lock held (in a batch, or ``Lane.run_now``)."""
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:
            self._data_version = version
            self._epoch += 1
        return self._epoch

    def _current(self, conn: sqlite3.Connection, tenant: str, session_id: str | None) -> Current:
        """The session's rows inside the open write transaction: as this process's own commit
        (or an earlier job of this batch) left them when nobody else has committed since, else
        read (:func:`read_current`)."""
        if self._batch_epoch is None:  # once per transaction: nobody else can commit inside it
            self._batch_epoch = self._observe(conn)
            self._locked = True
        epoch = self._batch_epoch
        if session_id is not None:
            key = (tenant, session_id)
            if key in self._staged:
                staged = self._staged[key]
                if staged is not None:
                    return staged
            else:
                known = self._known.peek(key)
                if known is not None:
                    if known[0] == epoch:
                        return known[1]
                    return self._vouch(key, read_current(conn, tenant, session_id), epoch)
        return read_current(conn, tenant, session_id)

    def _vouch(self, key: tuple[str, str], fresh: Current, epoch: int | None) -> Current:
        """*fresh* (rows just read) as this process's own when they are byte for byte the rows its
        last commit of the session left (then the check on load has nothing to find in them
        either); with *epoch* (read inside the write lock) the kept entry is current again, or
        dropped when the rows differ (without: a commit may have moved on since the read)."""
        known = self._known.get(key)
        if known is None:
            return fresh
        kept = known[1]
        if fresh.as_own() != kept:
            if epoch is not None:  # read under the lock: the kept rows are not the stored ones
                self._known.discard(key)
            return fresh
        if epoch is not None:
            self._known.put(key, (epoch, kept))
        return kept

    def _stage(self, tenant: str, session_id: str | None, cur: Current | None) -> None:
        if session_id is not None:
            self._staged[(tenant, session_id)] = cur

    def _write_batch(self, conn: sqlite3.Connection, jobs: list[Job]) -> list[tuple[bool, Any]]:
        self._staged, self._batch_epoch = {}, None
        if not self._take_turn(wait=True):
            return [(False, self._turn_timeout())] * len(jobs)
        try:
            return run_transaction(conn, jobs, committing=self._unlocking, committed=self._committed)
        finally:
            self._unlocking()
            self._give_turn()

    def _write_now(self, conn: sqlite3.Connection, job: Job) -> tuple[bool, Any] | None:
        self._staged, self._batch_epoch = {}, None
        if not self._take_turn(wait=False):
            return None  # another gateway process is writing: queue for the writer thread
        try:
            return run_transaction_now(conn, job, committing=self._unlocking, committed=self._committed)
        finally:
            self._unlocking()
            self._give_turn()

    def _begin_now(self) -> Begin:
        """A write transaction opened on the caller's thread without waiting (``WriteQueue``):
        the writer thread idle, the turn file and SQLite's write lock free. When only the lock is
        taken (another process is writing), the writer's lane stays held and
        :meth:`_begin_waiting` opens the transaction. Held until :meth:`_end_now`."""
        lane = self._writer
        if lane is None or not lane._busy.acquire(blocking=False):
            return Begin.BUSY
        if not lane._queue.empty():  # the writer thread has work it has not started: it goes first
            lane._busy.release()
            return Begin.BUSY
        self._staged, self._batch_epoch = {}, None
        if self._take_turn(wait=False):
            try:
                lane.conn.execute("BEGIN IMMEDIATE")
                return Begin.BEGUN
            except sqlite3.OperationalError:  # another connection (the CLI) holds SQLite's lock
                self._give_turn()
        return Begin.BLOCKED

    def _begin_waiting(self) -> None:
        """After :attr:`Begin.BLOCKED`, on the commit thread: wait for the turn file and SQLite's
        write lock, as the writer thread does, and open the transaction; ``StoreUnavailable``
        when they do not come (the lane stays held: :meth:`_end_now` gives it back)."""
        assert self._writer is not None
        if not self._take_turn(wait=True):
            raise self._turn_timeout()
        try:
            begin_waiting(self._writer.conn)
        except sqlite3.Error as exc:
            self._give_turn()
            raise _unavailable(exc, "write") from exc

    def _turn_timeout(self) -> StoreUnavailable:
        log.error("store_turn_timeout", lock=f"{self.path}-writer.lock", waited_s=BUSY_WAIT_SECONDS,
                  note="another gateway process holds the write turn: is one stopped or stuck?")
        return StoreUnavailable(f"the store is busy: another gateway process has held the write turn "
                                f"for over {BUSY_WAIT_SECONDS:g} s")

    def _end_now(self) -> None:
        """The transaction :meth:`_begin_now` opened is over (committed or rolled back): give the
        lock up (from whichever thread)."""
        self._unlocking()
        self._give_turn()
        assert self._writer is not None
        self._writer._busy.release()

    def _take_turn(self, wait: bool) -> bool:
        """Take the lock file (see the module docstring). Without *wait*, False at once when
        another process holds it; with it (from the writer thread), False only after
        ``BUSY_WAIT_SECONDS``. The wait blocks in ``flock`` itself, so the kernel wakes it the
        moment the lock is free (polling with sleeps lets a busy holder starve the others); it
        runs in a helper thread so that it can be given up, and a turn taken after it was given
        up is handed straight back."""
        fd = self._turns
        if fd is None:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if not wait:
                return False
        got, settled = threading.Event(), threading.Lock()
        abandoned = False

        def block() -> None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                return  # the store closed its descriptor meanwhile
            with settled:
                if not abandoned:
                    got.set()
                    return
            with contextlib.suppress(OSError):  # closed meanwhile: the lock went with the file
                fcntl.flock(fd, fcntl.LOCK_UN)

        threading.Thread(target=block, name="sqlite-turn", daemon=True).start()
        if got.wait(BUSY_WAIT_SECONDS):
            return True
        with settled:
            if got.is_set():
                return True
            abandoned = True
        return False

    def _give_turn(self) -> None:
        if self._turns is not None:
            fcntl.flock(self._turns, fcntl.LOCK_UN)

    def _unlocking(self) -> None:
        """The write lock is about to go (``COMMIT``): from now on another connection may commit."""
        if self._locked:
            self._locked = False
            self._generation += 1

    def _committed(self) -> None:
        """The batch is durable: what it staged is now the rows as they are."""
        for key, cur in self._staged.items():
            if cur is None:
                self._known.discard(key)
            else:
                self._known.put(key, (self._epoch, cur.as_own()))
        self._staged = {}

    def _known_now(self, tenant: str, session_id: str) -> Current | None:
        """The session's rows as this process last committed them, when no other connection
        has committed since; None when unknown or changed, or when that cannot be told now.

        Two ways to tell. With the writer idle: ask its connection (``PRAGMA data_version``).
        With the writer inside a transaction that has already looked (``_locked``): nobody else
        can have committed since that look, as long as the lock is still held after the lookup
        (``_generation`` unchanged; it moves on just before ``COMMIT`` gives the lock up)."""
        lane = self._writer
        if lane is None or self._known.peek((tenant, session_id)) is None:
            return None
        if lane._busy.acquire(blocking=False):
            try:
                epoch = self._observe(lane.conn)
            except sqlite3.Error:
                return None  # busy (another connection recovering the log): read the rows instead
            finally:
                lane._busy.release()
        else:
            generation = self._generation
            if not self._locked:
                return None
            epoch = self._epoch
            known = self._known.get((tenant, session_id))
            if self._generation != generation:
                return None
            return known[1] if known is not None and known[0] == epoch else None
        known = self._known.get((tenant, session_id))
        return known[1] if known is not None and known[0] == epoch else None

    def _transaction(self, tenant: str, session_id: str | None, plan: Plan) -> Job:
        """The writer's job of one ``transact``: the plan on the current rows, its writes, and
        the rows it leaves staged for :meth:`_committed`."""
        def run(conn: sqlite3.Connection) -> Changes:
            cur = self._current(conn, tenant, session_id)
            changes = plan(cur)
            after = write_changes(conn, cur, changes, self.entry_key)
            exact = not (changes.delete_round_seqs or changes.delete_session)  # after() keeps max_seq then
            # kept as this process's own only when built on rows that pass the check themselves
            # (a quarantine's commit, say, is built on rows that failed it)
            sound = cur.own or evidence.check(cur) is None
            self._stage(tenant, session_id, after if exact and sound else None)
            return changes
        return run

    def transact(self, tenant: str, session_id: str | None, plan: Plan, *,
                 bounded: bool = False) -> asyncio.Future[Changes]:
        """Committed at once, on the event loop's thread, when the gateway is quiet, the writer
        thread idle, no write queued and no other process holding the write lock (the future is
        done on return); otherwise queued in call order (:class:`WriteQueue`): a *bounded* plan
        in a batch on the event loop's thread with its ``COMMIT`` on a thread, any other on the
        writer thread."""
        loop = asyncio.get_running_loop()
        if self._writer is None or self._writes is None:
            return _settled(loop, (False, StoreUnavailable("the store is not open")))
        job = self._transaction(tenant, session_id, plan)
        if self.quiet is not None and self.quiet() and self._writes.idle:
            outcome = self._writer.run_now(job, self._write_now)
            if outcome is not None:
                return _settled(loop, outcome)
        return self._writes.add(job, bounded)

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

    async def pending_erasures(self) -> list[PendingErasure] | None:
        def run(c: sqlite3.Connection) -> list[tuple[Any, Any]]:
            return c.execute("SELECT name, value FROM meta WHERE substr(name, 1, ?) = ?",
                             (len(ERASURE_PENDING), ERASURE_PENDING)).fetchall()
        found = []
        for name, value in await self._read(run):
            try:
                found.append(_pending_record(name, value))
            except ValueError as exc:  # a row edited outside the gateway: it must not stop the others
                if name not in self._malformed:
                    self._malformed.add(name)
                    log.error("erasure_pending_malformed", name=str(name)[:200], reason=str(exc)[:300],
                              note="a row named as a pending erasure does not hold one (edited outside the "
                                   "gateway); it is skipped: investigate, then delete it from table meta")
        return sorted(found, key=lambda p: (p.erased_at, p.tenant, p.request_id))

    async def save_policy_versions(self, rows: list[PolicyVersionRow]) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT OR IGNORE INTO policy_versions VALUES (?,?,?,?)",
                             [(r.hash, r.policy_id, r.loaded_at, r.document) for r in rows])
        if rows:
            await self._write(run)

    # --- reads ---------------------------------------------------------------------------

    async def read_session(self, tenant: str, session_id: str, *, hot: bool = False) -> Current:
        known = self._known_now(tenant, session_id)
        if known is not None:
            return known
        key = (tenant, session_id)
        if hot and self._inline is not None:
            try:
                return self._vouch(key, read_current(self._inline, tenant, session_id), None)
            except sqlite3.OperationalError:
                pass  # busy (another connection recovering the log, say): the reader thread may wait
        return self._vouch(key, await self._read(lambda c: read_current(c, tenant, session_id)), None)


def _end_snapshot(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        conn.execute("ROLLBACK")
    conn.close()


def _call_with_last(query: Callable[[sqlite3.Connection, Any], list[Any]], last: Any,
                    conn: sqlite3.Connection) -> list[Any]:
    return query(conn, last)


def _settled(loop: asyncio.AbstractEventLoop, outcome: tuple[bool, Any]) -> asyncio.Future[Any]:
    """A future already holding *outcome* (``(True, value)`` or ``(False, exception)``)."""
    fut = loop.create_future()
    _resolve([(fut, outcome)])
    return fut


def _resolve(items: list[tuple[asyncio.Future[Any], tuple[bool, Any]]]) -> None:
    for fut, (ok, value) in items:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

