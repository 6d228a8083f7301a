"""A read racing an erasure is never taken for damage (probe finding F2): ``full_context`` (GET
/v1/sessions/{id}, import) and ``decrypted_rounds`` (exports, the console's session page) read
the session's data key and its rounds as one moment's, so an erasure and a new round landing
between the two reads give the old session (or the new one, or none), never a quarantine."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.keyring import Keyring, new_master_key
from gateway.sessions import Bounding, RoundRecord, SessionService
from gateway.store import sqlite
from gateway.store.sqlite import SQLiteStore


def record(text: str) -> RoundRecord:
    return RoundRecord(f"req-{text}", "default", "h", "completed", text, f"re: {text}", {"event": "round"})


def erased_between_reads(monkeypatch: pytest.MonkeyPatch, svc: SessionService, *, before: bool = False) -> None:
    """Around the next read of session s1's data key (by the store or a snapshot of it: just
    after it, or with *before* just before it), s1 is erased and begun anew (another data key, a
    round 1 of its own)."""
    real = sqlite.Reads.get_session
    armed = [True]

    async def erase_and_begin_anew(tenant: str, session_id: str) -> None:
        if armed[0] and session_id == "s1":
            armed[0] = False
            await svc.erase(tenant, session_id, "req-erase")
            await svc.commit_round(tenant, session_id, record("new"), Bounding())

    async def get_session(self: Any, tenant: str, session_id: str) -> Any:
        if before:
            await erase_and_begin_anew(tenant, session_id)
        found = await real(self, tenant, session_id)
        await erase_and_begin_anew(tenant, session_id)
        return found

    monkeypatch.setattr(sqlite.Reads, "get_session", get_session)


def run(path: Path, fn: Callable[[SessionService], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        store = SQLiteStore(path)
        await store.open()
        svc = SessionService(store, Keyring([new_master_key()]))
        try:
            for text in ("one", "two"):
                await svc.commit_round("acme", "s1", record(text), Bounding())
            return await fn(svc), await store.quarantined("acme")
        finally:
            await svc.erasures.stop()
            await store.close()
    return asyncio.run(go())


def test_full_context_racing_an_erasure_reads_the_new_session(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's history read while it is erased and begun anew is the new one, whole (the
    rounds no longer open under the key read first, and the key row changed: read again), and
    the session is not quarantined."""
    async def read(svc: SessionService) -> list[str]:
        erased_between_reads(monkeypatch, svc)
        return [m["content"] for m in await svc.full_context("acme", "s1")]

    texts, quarantined = run(tmp_path / "x.db", read)
    assert texts == ["new", "re: new"] and quarantined == {}


def test_decrypted_rounds_racing_an_erasure_read_the_old_session(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An export's rounds read while the session is erased and begun anew are the old session's,
    and the session is not quarantined."""
    async def read(svc: SessionService) -> list[tuple[int, str]]:
        erased_between_reads(monkeypatch, svc, before=True)  # the rounds read first, then the key
        return [(row.seq, messages[0]["content"]) async for row, messages in svc.decrypted_rounds("acme", "s1")]

    rows, quarantined = run(tmp_path / "x.db", read)
    assert rows == [(1, "one"), (2, "two")] and quarantined == {}


def test_a_clients_reads_of_its_session_take_no_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``full_context`` and ``session_rounds`` (GET /v1/sessions/{id}, a gateway-held response)
    read through the store's own connections: a snapshot is a connection of its own (on
    PostgreSQL one outside the pool, opened per call), which a client's reads must not cost."""
    def no_snapshot(self: Any) -> Any:
        raise AssertionError("a snapshot was taken")

    async def read(svc: SessionService) -> tuple[list[str], list[int]]:
        monkeypatch.setattr(SQLiteStore, "snapshot", no_snapshot)
        texts = [m["content"] for m in await svc.full_context("acme", "s1")]
        return texts, [row.seq for row, _ in await svc.session_rounds("acme", "s1")]

    (texts, seqs), quarantined = run(tmp_path / "x.db", read)
    assert texts == ["one", "re: one", "two", "re: two"] and seqs == [1, 2] and quarantined == {}


def test_a_retention_purge_tells_the_erase_listeners(tmp_path: Path) -> None:
    """Export bundles are dropped through ``on_erase`` (the console's jobs listen); a purge of a
    session's expired rounds, or of the whole session, told no one, so a bundle holding the
    expired text outlived it."""
    async def purge(svc: SessionService) -> list[tuple[str, str]]:
        told: list[tuple[str, str]] = []
        svc.on_erase.append(lambda tenant, sid: told.append((tenant, sid)))
        rounds = [(row.seq, messages) for row, messages in await svc.session_rounds("acme", "s1")]
        assert await svc.drop_rounds("acme", "s1", rounds[:1], policy_id="default", erase_if_idle_before=None) \
            == (1, False)
        assert await svc.drop_rounds("acme", "s1", rounds[1:], policy_id="default",
                                     erase_if_idle_before=float("inf")) == (1, True)
        return told

    told, quarantined = run(tmp_path / "x.db", purge)
    assert told == [("acme", "s1"), ("acme", "s1")] and quarantined == {}
