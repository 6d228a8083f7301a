"""Sessions on top of the store: sealing, unsealing, and every write as one store plan.

``SessionService`` is the only code that turns session plaintext into sealed rows and back.
Each write is a *plan* (see ``gateway.store.base``): a pure function of the rows as they are
inside the transaction, so concurrent rounds on one session apply one after the other to the
latest state and none is lost, whichever process or replica wrote before.

A round appends its messages to ``full_context`` (one ``rounds`` row, sealed with field
``round`` and the round's sequence number) and, when it completed, to the context window,
bounded with the policy's synchronous strategy after each appended message, as Agently resizes
after each (``session.model.appended_bounded``). Incomplete rounds go to
``full_context`` only, marked as such, so a cut-off reply never steers the next turn.

**Evidence and quarantine** (``gateway.evidence``). Loading a session checks its rows against
the audit entry that last bound them, and every write plan runs the same check on the rows
inside its transaction. A session that fails any integrity check (a row that does not open,
or rows that are not the ones the chain binds) is quarantined: a ``quarantine`` audit entry,
stored in ``session_heads`` so it holds across restarts and replicas. From then on every new
round and every write on it (chat, import, reset, memo, bounding) is refused with the same
integrity error (:class:`Quarantined`), each refusal a ``refusal`` audit entry, until an
operator acts (reads are not refused: they run their own checks): ``sessiongate sessions erase`` (the data
is gone for good) or ``sessiongate sessions release`` (:meth:`SessionService.release`, a
``release`` entry: the operator restored the rows or accepts them; a check that fails again
quarantines again). A session that fails again while quarantined (a read) gets a ``refusal``
entry, not another quarantine. A data key wrapped by a master key the keyring lacks or has
retired is a key-file problem, not damage, when the chain vouches for the data key row (its
binding records that master key and those wrapped bytes; for a session last written before data
keys were bound, when the keyring knows the id as retired): it fails without quarantine. A row
relabelled with a master key id, or one that the keyring never held, is damage and quarantines.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from gateway import crypto, evidence
from gateway.erasure import ErasureFinisher
from gateway.errors import Conflict, GatewayError, IntegrityError, NotFound
from gateway.keyring import Keyring, MasterKeyUnavailable
from gateway.session.importing import check_document, check_not_empty, history_difference, hold_to_policy
from gateway.session.model import (
    SYNC_STRATEGIES,
    Message,
    SessionState,
    appended_bounded,
    bound_sync,
    forget_memo_render,
    from_agently,
    over_limit,
    round_messages,
    to_agently,
    with_pending,
)
from gateway.session.record import with_blocks, without_blocks
from gateway.store.base import Changes, Current, DataKeyRow, RoundRow, SessionRow, SessionSummary, Store, StoreReads

if TYPE_CHECKING:
    from gateway.policy import Policy

log = structlog.get_logger("gateway.sessions")


class Quarantined(IntegrityError):
    """A request on a quarantined session: the same integrity error, refused before any work."""


@dataclass(frozen=True, slots=True)
class Bounding:
    """How a round bounds the window: the policy's settings that the store plan needs."""

    max_length: int | None = None
    strategy: str = "simple_cut"
    rounds: int = 0
    settings: dict[str, Any] | None = None  # session_settings to keep for Agently export


@dataclass(frozen=True, slots=True)
class LoadedSession:
    """A session's state as a request loaded it; ``state_ct`` is the sealed form it was read
    from, so a commit that finds the same bytes may reuse the state without opening it again."""

    state: SessionState
    version: int
    next_seq: int
    state_ct: bytes = b""
    dk_id: bytes = b""  # the data key it was sealed with: another one at commit means it was erased meanwhile


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """What the record stage hands to :meth:`SessionService.commit_round`."""

    request_id: str
    policy_id: str
    policy_hash: str
    outcome: str  # completed | incomplete | upstream_error
    user: str | None
    assistant: str | None
    audit: dict[str, Any]
    messages: list[Message] | None = None  # structured messages, recorded instead of the two texts
    provider_responses: tuple[bytes, ...] = ()  # digests of provider-held response ids now the tenant's
    windowed: bool = True  # False: recorded, but its messages stay out of the window (a refused turn)


EXPORT_TRIES = 3
"""How often :meth:`SessionService.export` reads a session that keeps changing under it."""
STATE_CACHE_SIZE = 1024
"""Sessions whose opened state a process keeps (see :class:`StateCache`)."""
HOT_READ_MAX_ROUNDS = 2000
"""A cached session with fewer rounds is read without a thread hand-off (``Store.read_session``
``hot``): counting its rounds, part of the check on load, stays well under a hand-off's cost."""


@dataclass(frozen=True, slots=True)
class _Opened:
    version: int
    state_ct: bytes
    dk_id: bytes
    state: SessionState
    next_seq: int


class StateCache:
    """The opened state of recently used sessions, so a request whose stored state row is still
    the one this process last opened or sealed (same version,
    same bytes, same data key) does not decrypt and parse it again.

    Contract: :meth:`get` returns a state only when the row read now holds *exactly* the bytes
    the entry was made from (``state_ct``, compared in full: any other writer, process or
    replica, changes them, so a stale entry can only miss) under the same data key. It replaces
    the decryption alone: the caller still gets the rows from the store, unwraps the data key (a
    retired or missing master key still fails) and runs the chain-binding check
    (``gateway.evidence``) on them. (The SQLite store may hand back the rows as this process
    committed them instead of reading them, while no other connection has committed since:
    ``Current.own``.) States are never modified in place (every change makes a copy), so one
    object may serve several requests. Bounded (LRU, ``STATE_CACHE_SIZE``); an erased or
    quarantined session's entry is dropped at once.
    """

    def __init__(self, maxsize: int = STATE_CACHE_SIZE) -> None:
        self._items: crypto.BoundedCache[tuple[str, str], _Opened] = crypto.BoundedCache(maxsize)

    def get(self, tenant: str, session_id: str, row: SessionRow, dk_id: bytes) -> SessionState | None:
        entry = self._items.get((tenant, session_id))
        if entry is None or entry.version != row.version or entry.dk_id != dk_id or entry.state_ct != row.state_ct:
            return None
        return entry.state

    def put(self, tenant: str, session_id: str, version: int, state_ct: bytes, dk_id: bytes,
            state: SessionState, next_seq: int) -> None:
        self._items.put((tenant, session_id), _Opened(version, state_ct, dk_id, state, next_seq))

    def hot(self, tenant: str, session_id: str) -> bool:
        """Whether this process used the session lately and it holds under
        ``HOT_READ_MAX_ROUNDS`` rounds (an entry's ``next_seq`` bounds its round count)."""
        entry = self._items.peek((tenant, session_id))
        return entry is not None and entry.next_seq <= HOT_READ_MAX_ROUNDS

    def drop(self, tenant: str, session_id: str) -> None:
        self._items.discard((tenant, session_id))


class SessionService:
    """Sealed sessions over a store. ``reload_keyring`` (optional) re-reads the keyring when a
    data key names a master key this process does not know yet (another process rotated)."""

    def __init__(self, store: Store, keyring: Keyring,
                 reload_keyring: Callable[[], Keyring] | None = None) -> None:
        self.store = store
        self.keyring = keyring
        self.reload_keyring = reload_keyring
        self.erasures = ErasureFinisher(store)
        self.states = StateCache()
        self.on_erase: list[Callable[[str, str], None]] = []
        """Told ``(tenant, session_id)`` of each session this process erases, once its rows are
        gone (the console drops the export bundles that hold it)."""

    # --- keys and sealing ---------------------------------------------------------------

    def _data_key(self, row: DataKeyRow) -> crypto.DataKey:
        keyring = self.keyring
        if keyring.state(row.kek_id) is None and self.reload_keyring is not None:
            keyring = self.keyring = self.reload_keyring()
        return keyring.unwrap(row.kek_id, row.dk_id, row.wrapped)

    def unwrap(self, row: DataKeyRow) -> crypto.DataKey:
        """A data key row's key: ``IntegrityError`` when it does not unwrap,
        ``MasterKeyUnavailable`` when its master key is missing from the key file or retired."""
        return self._data_key(row)

    async def rewrap(self, row: DataKeyRow) -> bool:
        """Re-wrap the data key *row* under the primary master key, if the session's row is still
        *row* (False when it was erased or re-wrapped meanwhile), in one transaction with a
        ``rewrap`` audit entry that binds the session's rows with the new wrapping (so the chain
        always says which master key wraps a session's data key). ``IntegrityError`` when the key
        does not unwrap or the session's rows fail the check on load (they are not bound anew)."""
        kek_id, wrapped = self.keyring.rewrap(row.kek_id, row.dk_id, row.wrapped)
        self.keyring.forget(row.kek_id, row.dk_id, row.wrapped)  # cached again under the new wrap only
        new = replace(row, kek_id=kek_id, wrapped=wrapped)

        def plan(cur: Current) -> Changes:
            have = cur.data_key
            if have is None or (bytes(have.dk_id), have.kek_id, bytes(have.wrapped)) != (
                    bytes(row.dk_id), row.kek_id, bytes(row.wrapped)):
                return Changes(result=False)
            _raise_if_altered(cur)
            if cur.session is None:
                raise IntegrityError(f"session {cur.tenant}/{cur.session_id} has a data key but no state row")
            return Changes(data_key=new, result=True, audit=[{
                "event": "rewrap", "session_id": row.session_id, "detail": {"from": row.kek_id, "to": kek_id}}])
        return bool((await self.store.transact(row.tenant, row.session_id, plan)).result)

    def _forget(self, row: DataKeyRow) -> None:
        """Drop an erased session's data key from both in-memory caches (unwrapped key, cipher).
        A key that cannot be unwrapped was never cached, so there is nothing to drop then."""
        with contextlib.suppress(IntegrityError):
            crypto.forget(self.keyring.unwrap(row.kek_id, row.dk_id, row.wrapped))
        self.keyring.forget(row.kek_id, row.dk_id, row.wrapped)

    def _forget_memo(self, cur: Current) -> None:
        """Drop the rendering of an erased session's memo kept in this process (read from its
        state, which is being deleted: one decryption per erasure); nothing when the state cannot
        be opened."""
        with contextlib.suppress(IntegrityError):
            state = self._unseal(cur)[1]
            if state is not None:
                forget_memo_render(state.memo)

    def _new_data_key(self, tenant: str, session_id: str) -> tuple[crypto.DataKey, DataKeyRow]:
        dk = crypto.new_data_key()
        kek_id, wrapped = self.keyring.wrap(dk)
        return dk, DataKeyRow(tenant, session_id, dk.id, kek_id, wrapped, time.time())

    def _open_state(self, dk: crypto.DataKey, row: SessionRow) -> SessionState:
        plain = crypto.open_sealed(dk, row.state_ct, tenant=row.tenant, session_id=row.session_id,
                                   seq=row.version, field="state")
        return SessionState.from_dict(orjson.loads(plain))

    def _seal_state(self, dk: crypto.DataKey, tenant: str, sid: str, version: int, state: SessionState) -> bytes:
        return crypto.seal(dk, state.to_json(), tenant=tenant, session_id=sid,
                           seq=version, field="state")

    def _unseal(self, cur: Current) -> tuple[crypto.DataKey, SessionState | None]:
        """The session's data key and its current state (None without a state row); an
        ``IntegrityError`` when the data key is missing or anything fails to open."""
        if cur.data_key is None:
            raise IntegrityError(f"session {cur.tenant}/{cur.session_id} has a state row but no data key")
        dk = self._data_key(cur.data_key)
        return dk, self._open_state(dk, cur.session) if cur.session else None

    def _write_state(self, cur: Current, ch: Changes, dk: crypto.DataKey, state: SessionState,
                     rounds: list[list[Message]], meta: RoundMeta) -> None:
        """Add the session row and one sealed round row per message group to *ch*."""
        assert cur.session_id is not None
        now = time.time()
        version = (cur.session.version if cur.session else 0) + 1
        seq = cur.session.next_seq if cur.session else 1
        for messages in rounds:
            ct = crypto.seal(dk, orjson.dumps(messages), tenant=cur.tenant, session_id=cur.session_id,
                             seq=seq, field="round")
            ch.rounds.append(RoundRow(cur.tenant, cur.session_id, seq, now, meta.request_id, meta.policy_id,
                                      meta.policy_hash, meta.outcome, meta.kind, ct))
            seq += 1
        ch.session = SessionRow(cur.tenant, cur.session_id, version, seq,
                                self._seal_state(dk, cur.tenant, cur.session_id, version, state),
                                cur.session.created_at if cur.session else now, now)

    # --- reads ---------------------------------------------------------------------------

    async def load(self, tenant: str, session_id: str, request_id: str | None = None, *,
                   for_round: bool = False) -> LoadedSession | None:
        """The session's state, unsealed and checked against the audit chain; None when the
        session does not exist. ``IntegrityError`` (and quarantine) when it fails a check. With
        *for_round* (a new round will follow), :class:`Quarantined` (and a ``refusal`` entry)
        when the session is quarantined; a read alone is not refused, it checks for itself."""
        async with self._guarded(tenant, session_id, request_id):
            cur = await self.store.read_session(tenant, session_id, hot=self.states.hot(tenant, session_id))
            if for_round:
                _refuse_quarantined(cur)
            srow, krow = cur.session, cur.data_key
            if srow is None:
                _raise_if_altered(cur)
                return None
            if krow is None:
                raise IntegrityError(f"session {tenant}/{session_id} has no data key")
            dk = self._data_key(krow)
            state = self.states.get(tenant, session_id, srow, dk.id)
            if state is None:
                state = self._open_state(dk, srow)
                self.states.put(tenant, session_id, srow.version, srow.state_ct, dk.id, state, srow.next_seq)
            _raise_if_altered(cur)
            return LoadedSession(state, srow.version, srow.next_seq, srow.state_ct, dk.id)

    async def check(self, tenant: str, session_id: str, request_id: str | None = None, *,
                    for_round: bool = True) -> None:
        """The check of :meth:`load` without opening anything (by default for a new round)."""
        async with self._guarded(tenant, session_id, request_id):
            cur = await self.store.read_session(tenant, session_id)
            if for_round:
                _refuse_quarantined(cur)
            _raise_if_altered(cur)

    async def full_context(self, tenant: str, session_id: str) -> list[Message]:
        """The session's recorded history ([] when it does not exist); see :meth:`session_rounds`."""
        return [m for _, messages in await self.session_rounds(tenant, session_id) for m in without_blocks(messages)]

    async def session_rounds(self, tenant: str, session_id: str) -> list[tuple[RoundRow, list[Message]]]:
        """One session's rounds, opened ([] when it does not exist): what a client reads of its
        own sessions (``GET /v1/sessions/{id}``, a gateway-held response). The data key and the
        rounds are two reads, so an erasure (and a new round under a new key) can land between
        them: a round that fails to open is damage only when the session's key row is still the
        one read first; otherwise the session changed under the read, which is read again
        (once: a session that keeps changing is read in one ``Store.snapshot``). The rounds are
        the old session's, the new one's, or none, and a client's read never opens a connection
        of its own (a snapshot's, on PostgreSQL)."""
        async with self._guarded(tenant, session_id, None):
            for _ in range(2):
                _, krow = await self.store.get_session(tenant, session_id)
                if krow is None:
                    return []
                try:
                    return await self._opened(self.store, tenant, session_id, krow)
                except IntegrityError:
                    if (await self.store.get_session(tenant, session_id))[1] == krow:
                        raise
            async with self.store.snapshot() as snap:
                _, krow = await snap.get_session(tenant, session_id)
                return [] if krow is None else await self._opened(snap, tenant, session_id, krow)

    async def _opened(self, reads: StoreReads, tenant: str, session_id: str,
                      krow: DataKeyRow) -> list[tuple[RoundRow, list[Message]]]:
        dk = self._data_key(krow)
        return [(row, self.open_round(dk, row)) async for row in reads.iter_rounds(tenant, session_id)]

    @contextlib.asynccontextmanager
    async def _guarded(self, tenant: str, session_id: str | None, request_id: str | None) -> AsyncIterator[None]:
        """Quarantine the session when the body fails an integrity check (see the module
        docstring); the error itself always propagates."""
        try:
            yield
        except IntegrityError as exc:
            if session_id is not None:
                self.states.drop(tenant, session_id)
                await self._note_failure(tenant, session_id, exc, request_id)
            raise

    async def _note_failure(self, tenant: str, session_id: str, exc: IntegrityError, request_id: str | None) -> None:
        """Quarantine the session for *exc* (a ``quarantine`` entry), or, when it is quarantined
        already, record the refusal (a ``refusal`` entry); nothing for a master key the key file
        lacks when the chain vouches for the data key row (:meth:`_key_file_problem`)."""
        if isinstance(exc, MasterKeyUnavailable) and await self._key_file_problem(tenant, session_id, exc):
            return
        refusal = {"event": "refusal", "session_id": session_id, "request_id": request_id, "outcome": "refused"}
        quarantine = {"event": "quarantine", "session_id": session_id, "request_id": request_id,
                      "detail": {"reason": exc.detail[:200]}}

        def plan(cur: Current) -> Changes:
            if isinstance(exc, Quarantined) or cur.quarantine is not None:  # quarantined once, refused since
                return Changes(audit=[refusal])
            return Changes(audit=[quarantine], quarantine=exc.detail[:200])
        try:
            await asyncio.shield(self.store.transact(tenant, session_id, plan))
        except GatewayError as err:  # the integrity error still reaches the caller
            log.error("quarantine_not_recorded", tenant=tenant, session_id=session_id, error=type(err).__name__)

    async def _key_file_problem(self, tenant: str, session_id: str, exc: MasterKeyUnavailable) -> bool:
        """Whether *exc* (a master key missing from the key file, or retired) is the key file's
        problem rather than damage: the session's rows pass the check on load and its head entry
        binds this very data key row, or (a session last written before data keys were bound)
        the keyring knows the id as retired. Otherwise *exc* is made to say why it is damage."""
        cur = await self.store.read_session(tenant, session_id)
        problem = evidence.check(cur)
        if problem is None:
            vouched = evidence.vouches_for_key(cur)
            if vouched or (vouched is None and exc.retired):
                return True
            problem = (f"tenant {tenant}, session {session_id}: its data key names master key {exc.kek_id!r}, which "
                       "the key file has never held (not even as retired), and no audit entry records which "
                       "master key wraps it: the row was relabelled outside the gateway")
        exc.detail, exc.key_unavailable = problem, False
        return False

    async def release(self, tenant: str, session_id: str, request_id: str) -> str:
        """Lift the session's quarantine (an operator's decision, audited as ``release``);
        returns the reason it was quarantined. ``Conflict`` when it is not quarantined."""
        def plan(cur: Current) -> Changes:
            if cur.quarantine is None:
                raise Conflict(f"session '{session_id}' is not quarantined")
            return Changes(audit=[{"event": "release", "request_id": request_id, "session_id": session_id,
                                   "detail": {"reason": cur.quarantine}}], release=True, result=cur.quarantine)
        return str((await self.store.transact(tenant, session_id, plan)).result)

    def open_round(self, dk: crypto.DataKey, row: RoundRow) -> list[Message]:
        """A round record's messages as sealed: a text round's carry their ``blocks``
        (``session.record.with_blocks``), which only export redaction reads."""
        return orjson.loads(crypto.open_sealed(dk, row.ct, tenant=row.tenant, session_id=row.session_id,
                                               seq=row.seq, field="round"))

    async def decrypted_rounds(self, tenant: str, session_id: str | None = None, *, since: float | None = None,
                               until: float | None = None,
                               after_seq: int | None = None) -> AsyncIterator[tuple[RoundRow, list[Message]]]:
        """Every round of a tenant (or one session; after *after_seq*) with its messages, in
        constant memory. A round that fails to open quarantines its session, as a failed load
        does, and the ``IntegrityError`` ends the iteration. Rounds and data keys are read in one
        snapshot (``Store.snapshot``, held while the iteration runs), so a session erased (and
        begun anew) meanwhile is read as it was, never taken for damage."""
        keys: dict[str, crypto.DataKey] = {}
        async with self.store.snapshot() as snap:
            async for row in snap.iter_rounds(tenant, session_id, since=since, until=until, after_seq=after_seq):
                async with self._guarded(tenant, row.session_id, None):
                    dk = keys.get(row.session_id)
                    if dk is None:
                        keys.clear()
                        _, krow = await snap.get_session(tenant, row.session_id)
                        if krow is None:
                            raise IntegrityError(f"session {tenant}/{row.session_id} has rounds but no data key")
                        dk = keys[row.session_id] = self._data_key(krow)
                    messages = self.open_round(dk, row)
                yield row, messages

    async def export(self, tenant: str, session_id: str) -> dict[str, Any]:
        """The session in Agently's JSON form; ``NotFound`` when it does not exist. The state and
        the history are two reads: when a round (or any write) lands between them, they are read
        again, so the window and memo are those of the history's last round (a few tries; the
        last one's reads are returned)."""
        for _ in range(EXPORT_TRIES):
            loaded = await self.load(tenant, session_id)
            if loaded is None:
                raise NotFound(f"no session '{session_id}' for this tenant")
            state, full = loaded.state, await self.full_context(tenant, session_id)
            again = await self.load(tenant, session_id)
            if again is not None and again.version == loaded.version:
                break
        return to_agently(session_id, full, state)

    async def list_sessions(self, tenant: str) -> list[SessionSummary]:
        return await self.store.list_sessions(tenant)

    async def page_sessions(self, tenant: str, *, after: str | None = None, limit: int = 100, prefix: str = "",
                            since: float | None = None, until: float | None = None) -> list[SessionSummary]:
        """One page of the tenant's sessions in id order (see ``Store.page_sessions``)."""
        return await self.store.page_sessions(tenant, after=after, limit=limit, prefix=prefix, since=since,
                                              until=until)

    # --- writes --------------------------------------------------------------------------

    async def commit_round(self, tenant: str, session_id: str | None, rec: RoundRecord,
                           bounding: Bounding, loaded: LoadedSession | None = None) -> Changes:
        """Record one round and its audit entry in one durable transaction. *loaded* is the state
        the request loaded (never modified here); when the stored state is still byte for byte
        the one it was opened from, it is not opened again. The returned
        changes' ``result`` is True when the window is still over ``max_length`` afterwards
        (an asynchronous strategy has work to do).

        When the session *loaded* is no longer there at commit (erased while the round was in
        flight; or erased and begun anew by another request: another data key), nothing of the
        round is recorded and no session is created: its reply may be drawn from the erased
        window and memo. Its audit entry alone is written, with outcome ``erased_meanwhile``
        and nothing ``recorded``.

        A cancelled caller never leaves a round half done: the wait for the store's transaction
        is shielded, so the round is still committed (and the caller gets ``CancelledError``).
        When the store commits at once (SQLite while the gateway is quiet) nothing waits: no
        task, no turn of the event loop."""
        meta = RoundMeta(rec.request_id, rec.policy_id, rec.policy_hash, rec.outcome, "round")
        messages = rec.messages if rec.messages is not None else round_messages(rec.user, rec.assistant)
        # a text round's record keeps where each keyed block's value is (session.record.KeyedText)
        record = messages if rec.messages is not None else with_blocks(messages)

        def plan(cur: Current) -> Changes:
            ch = Changes(provider_responses=list(rec.provider_responses))
            audit = dict(rec.audit)
            if cur.session_id is not None:
                _refuse_quarantined(cur)
                _raise_if_altered(cur)
                audit["session_id"] = cur.session_id
            if loaded is not None and (cur.data_key is None or cur.data_key.dk_id != loaded.dk_id):
                audit["outcome"], audit["recorded"] = "erased_meanwhile", []
                ch.audit.append(audit)
                return ch
            if cur.session_id is not None and messages:
                if cur.data_key is None:
                    dk, ch.data_key = self._new_data_key(cur.tenant, cur.session_id)
                    state = None
                elif loaded is not None and cur.session is not None and cur.session.state_ct == loaded.state_ct:
                    dk, state = self._data_key(cur.data_key), loaded.state  # the bytes this request opened
                else:
                    dk, state = self._unseal(cur)
                state = state or SessionState(settings=dict(bounding.settings or {}))
                if rec.outcome == "completed" and rec.windowed:
                    # Agently resizes after each append: the user message, then the reply (a
                    # synchronous strategy here, the hooks' analyses replayed from ``pending``)
                    state = appended_bounded(state, messages, bounding.strategy, bounding.max_length,
                                             bounding.rounds)
                    if bounding.settings is not None and state.settings != bounding.settings:
                        state = state.with_settings(dict(bounding.settings))
                    state = with_pending(state, bounding.strategy, [1] * len(messages))
                self._write_state(cur, ch, dk, state, [record], meta)
                assert ch.session is not None
                sealed.append((ch.session.version, ch.session.state_ct, dk.id, state, ch.session.next_seq))
                # only the asynchronous strategies (summarize, hooks) can leave the window over the limit
                ch.result = bounding.strategy not in SYNC_STRATEGIES and over_limit(state, bounding.max_length)
                audit["round_seq"] = ch.rounds[0].seq
                audit["ciphertext_sha256"] = hashlib.sha256(ch.rounds[0].ct).hexdigest()
            ch.audit.append(audit)
            return ch

        sealed: list[tuple[int, bytes, bytes, SessionState, int]] = []  # the last run of the plan is the one committed
        async with self._guarded(tenant, session_id, rec.request_id):
            pending = self.store.transact(tenant, session_id, plan, bounded=True)
            try:
                changes = await asyncio.shield(pending)
            except asyncio.CancelledError:  # the commit goes on; its outcome is logged, as no caller hears it
                pending.add_done_callback(functools.partial(_log_orphaned_round, tenant, session_id, rec.request_id))
                raise
        if sealed and session_id is not None:
            self.states.put(tenant, session_id, *sealed[-1])
        return changes

    async def update_state(self, tenant: str, session_id: str,
                           change: Callable[[SessionState], SessionState | None], audit: dict[str, Any]) -> bool:
        """Apply *change* to the latest state in one transaction; False when the session is gone
        or *change* returned None (nothing written)."""
        def plan(cur: Current) -> Changes:
            ch = Changes(result=False)
            _refuse_quarantined(cur)
            _raise_if_altered(cur)
            if cur.session is None:
                return ch
            dk, state = self._unseal(cur)
            assert state is not None
            new = change(state)
            if new is None:
                return ch
            self._write_state(cur, ch, dk, new, [], RoundMeta("", "", "", "", ""))
            ch.audit.append({**audit, "session_id": session_id})
            ch.result = True
            return ch

        async with self._guarded(tenant, session_id, audit.get("request_id")):
            return bool((await self.store.transact(tenant, session_id, plan)).result)

    async def reset(self, tenant: str, session_id: str, request_id: str) -> None:
        """Clear the context window; ``full_context`` and memo stay."""
        ok = await self.update_state(tenant, session_id, lambda s: s.with_window([], 0),
                                     {"event": "reset", "request_id": request_id})
        if not ok:
            raise NotFound(f"no session '{session_id}' for this tenant")

    async def import_agently(self, tenant: str, session_id: str, data: Any, request_id: str,
                             policy: Policy | None = None) -> int:
        """Load Agently JSON. A new session takes it whole; an existing one must hold a prefix
        of the imported ``full_context`` (recorded history is append-only), and gains the rest.
        With *policy* (the session's, matched at import time) the import is held to it first
        (``session.importing.hold_to_policy``: ``ImportNotWhitelisted`` for what it would not
        record). The imported round carries that policy's id and version hash, so that version
        governs its redaction and retention. Returns how many messages were appended.
        ``InvalidSession`` for a field Agently's form lacks, or a document with nothing to import
        into a session with no history (``session.importing.check_document``)."""
        policy_id, policy_hash = (policy.id, policy.version_hash) if policy is not None else ("import", "")
        full, state = from_agently(data)
        check_document(data)
        await self.check(tenant, session_id, request_id)  # never import into a quarantined or altered session
        existing = await self.full_context(tenant, session_id)
        check_not_empty(full, state, existing)
        if full[: len(existing)] != existing:
            raise Conflict(f"session '{session_id}' already holds a different history: "
                           f"{history_difference(existing, full)}; recorded history is append-only, so DELETE the "
                           "session first or import into a new id")
        if policy is not None:
            state = hold_to_policy(full, state, policy, stored=existing)
        added = full[len(existing):]
        meta = RoundMeta(request_id, policy_id, policy_hash, "imported", "import")

        def plan(cur: Current) -> Changes:
            ch = Changes(result=len(added))
            _refuse_quarantined(cur)
            _raise_if_altered(cur)
            if cur.data_key is None:
                dk, ch.data_key = self._new_data_key(cur.tenant, session_id)
            else:
                dk, _ = self._unseal(cur)
            self._write_state(cur, ch, dk, state, [added] if added else [], meta)
            ch.audit.append({"event": "import", "request_id": request_id, "session_id": session_id,
                             "policy_id": policy_id, "policy_hash": policy_hash, "messages": len(added),
                             "round_seq": ch.rounds[0].seq if ch.rounds else None,
                             "ciphertext_sha256": hashlib.sha256(ch.rounds[0].ct).hexdigest() if ch.rounds else None})
            return ch

        async with self._guarded(tenant, session_id, request_id):
            return int((await self.store.transact(tenant, session_id, plan)).result)

    async def drop_rounds(self, tenant: str, session_id: str, rounds: list[tuple[int, list[Message]]], *,
                          policy_id: str, erase_if_idle_before: float | None) -> tuple[int, bool]:
        """Retention: delete *rounds* (seq, messages) of a session and take their messages out of
        the sealed window too, so expired text is neither kept nor injected again. When they are
        all the session has and it has not been written since *erase_if_idle_before*, the whole
        session is erased instead (data key included). Returns (rounds deleted, session erased).

        A session whose rows fail the check on load is quarantined (``IntegrityError``) and a
        quarantined one raises :class:`Quarantined` (no ``refusal`` entry): its rows stay as
        they are for whoever investigates, as a purge would rewrite its state from rows the chain
        does not vouch for and bind them anew."""
        seqs = [seq for seq, _ in rounds]
        expired = [m for _, messages in rounds for m in without_blocks(messages)]

        def plan(cur: Current) -> Changes:
            if cur.quarantine is not None:
                return Changes(result=cur.quarantine)  # nothing written: raised below, outside _guarded
            _raise_if_altered(cur)
            if cur.session is None:
                return Changes(result=(0, False))
            detail: dict[str, Any] = {"rounds_deleted": len(seqs), "seqs": seqs, "before": erase_if_idle_before}
            audit = {"event": "purge", "session_id": session_id, "policy_id": policy_id, "detail": detail}
            # the last write, by the row and by the chain's head entry (an edited row cannot make it older)
            written = max(cur.session.updated_at, cur.head.created_at if cur.head is not None else 0.0)
            if erase_if_idle_before is not None and written < erase_if_idle_before:
                if cur.data_key is not None:
                    self._forget_memo(cur)
                    self._forget(cur.data_key)
                detail["session_erased"] = True
                return Changes(delete_session=True, audit=[audit], result=(len(seqs), True))
            dk, state = self._unseal(cur)
            assert state is not None
            window = list(state.context_window)
            for message in expired:
                if message in window:
                    window.remove(message)
            ch = Changes(delete_round_seqs=seqs, result=(len(seqs), False))
            self._write_state(cur, ch, dk, state.with_window(window), [], RoundMeta("", "", "", "", ""))
            detail["session_erased"] = False
            ch.audit.append(audit)
            return ch

        async with self._guarded(tenant, session_id, None):
            result = (await self.store.transact(tenant, session_id, plan)).result
        if isinstance(result, str):
            raise Quarantined(f"session {tenant}/{session_id} is quarantined ({result})")
        deleted, erased = result
        if deleted or erased:  # an export bundle holding what expired must not outlive it
            for listener in self.on_erase:
                listener(tenant, session_id)
        return int(deleted), bool(erased)

    async def erase(self, tenant: str, session_id: str, request_id: str) -> bool:
        """Crypto-shred a session: its data key and rows go in one transaction, with the erasure
        recorded as pending, then the store folds its write-ahead log so the erased bytes leave
        the disk. Returns True when they have; False when the purge is pending (another
        connection holds an old snapshot) and :attr:`erasures` retries it in the background (see
        ``gateway.erasure``). A session already erased whose erasure is still pending (this
        command run again; a record the chain vouches for) is not ``NotFound``: that erasure is
        finished now, or retried."""
        def plan(cur: Current) -> Changes:
            if cur.session is None and cur.data_key is None:
                raise NotFound(f"no session '{session_id}' for this tenant")
            if cur.data_key is not None:
                self._forget_memo(cur)
                self._forget(cur.data_key)
            self.states.drop(tenant, session_id)
            return Changes(delete_session=True, erasure=request_id,
                           audit=[{"event": "erasure", "request_id": request_id, "session_id": session_id}])

        try:
            await self.store.transact(tenant, session_id, plan)
        except NotFound:
            left = await self.erasures.vouched([p for p in await self.store.pending_erasures() or ()
                                                if p.tenant == tenant and p.session_id == session_id])
            if not left:  # nothing pending, or only a record the chain does not vouch for (logged)
                raise
            return await self.erasures.resume(left)
        for listener in self.on_erase:
            listener(tenant, session_id)
        return await self.erasures.settle(tenant, session_id, request_id)

    # --- Agently's chat-history operations (gateway.session.history drives them) ----------

    async def edit_history(self, tenant: str, session_id: str, op: str, messages: list[Message],
                           bounding: Bounding, audit: dict[str, Any]) -> SessionState:
        """Agently's ``add_chat_history`` / ``set_chat_history`` / ``reset_chat_history`` /
        ``clean_context_window`` as one transaction with its audit entry; returns the new state.

        ``add`` appends *messages* to ``full_context`` (one sealed record, kind ``history``) and
        to the window; ``set`` appends them to ``full_context`` the same way and makes them the
        whole window; ``reset`` and ``clean_context_window`` empty the window. The memo is never
        touched; recorded history stays append-only. Then the window is resized as Agently does
        after each of these (``bound_sync``; under hooks, one pending analysis). ``add`` and
        ``set`` create a missing session; the others raise ``NotFound``.
        """
        meta = RoundMeta(str(audit.get("request_id", "")), str(audit.get("policy_id", "")),
                         str(audit.get("policy_hash", "")), "completed", "history")
        kept = op in ("add", "set")

        def plan(cur: Current) -> Changes:
            ch = Changes()
            _refuse_quarantined(cur)
            _raise_if_altered(cur)
            if cur.session is None and not kept:
                raise NotFound(f"no session '{session_id}' for this tenant")
            if cur.data_key is None:
                dk, ch.data_key = self._new_data_key(cur.tenant, session_id)
                state = None
            else:
                dk, state = self._unseal(cur)
            state = state or SessionState(settings=dict(bounding.settings or {}))
            if op == "add":
                state = with_pending(state.appended(messages), bounding.strategy, [len(messages)])
            else:
                window = list(messages) if op == "set" else []
                state = with_pending(replace(state.with_window(window), pending=[]), bounding.strategy,
                                     [len(window)])
            if bounding.settings is not None:
                state = state.with_settings(dict(bounding.settings))
            if state.auto_resize:
                state = bound_sync(state, bounding.strategy, bounding.max_length, bounding.rounds)
            self._write_state(cur, ch, dk, state, [messages] if kept and messages else [], meta)
            entry = {**audit, "session_id": session_id, "messages": len(messages), "detail": {"op": op}}
            if ch.rounds:
                entry["round_seq"] = ch.rounds[0].seq
                entry["ciphertext_sha256"] = hashlib.sha256(ch.rounds[0].ct).hexdigest()
            ch.audit.append(entry)
            ch.result = state
            return ch

        async with self._guarded(tenant, session_id, audit.get("request_id")):
            result = (await self.store.transact(tenant, session_id, plan)).result
        assert isinstance(result, SessionState)
        return result

    async def write_memo(self, tenant: str, session_id: str, memo: Any, settings: dict[str, Any] | None,
                         audit: dict[str, Any]) -> None:
        """Set the memo (a string, a mapping, a list or None) in one transaction with its audit
        entry (which holds no memo text); creates a missing session."""
        def plan(cur: Current) -> Changes:
            ch = Changes()
            _refuse_quarantined(cur)
            _raise_if_altered(cur)
            if cur.data_key is None:
                dk, ch.data_key = self._new_data_key(cur.tenant, session_id)
                state = None
            else:
                dk, state = self._unseal(cur)
            state = replace(state or SessionState(settings=dict(settings or {})), memo=memo)
            self._write_state(cur, ch, dk, state, [], RoundMeta("", "", "", "", ""))
            ch.audit.append({**audit, "session_id": session_id, "detail": {"memo": type(memo).__name__}})
            return ch

        async with self._guarded(tenant, session_id, audit.get("request_id")):
            await self.store.transact(tenant, session_id, plan)


def _log_orphaned_round(tenant: str, session_id: str | None, request_id: str, done: asyncio.Future[Changes]) -> None:
    """How a round whose request was cancelled mid-commit ended: committed after all (the
    request's own log line says ``not_recorded``, written before this was known), or not."""
    if done.cancelled() or done.exception() is not None:
        exc = None if done.cancelled() else done.exception()
        log.error("round_not_recorded", tenant=tenant, session_id=session_id, request_id=request_id,
                  cancelled_caller=True, error=type(exc).__name__ if exc is not None else "CancelledError")
    else:
        log.info("round_recorded_after_cancel", tenant=tenant, session_id=session_id, request_id=request_id)


def _refuse_quarantined(cur: Current) -> None:
    if cur.quarantine is not None:
        raise Quarantined(f"tenant {cur.tenant}, session {cur.session_id} is quarantined (an operator must "
                          f"release or erase it) since: {cur.quarantine}")


def _raise_if_altered(cur: Current) -> None:
    problem = evidence.check(cur)
    if problem is not None:
        raise IntegrityError(problem)


@dataclass(frozen=True, slots=True)
class RoundMeta:
    request_id: str
    policy_id: str
    policy_hash: str
    outcome: str
    kind: str
