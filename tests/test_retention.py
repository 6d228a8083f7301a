"""Retention (issue 4 §3): rounds older than their policy's ``retention.days`` are erased.

Rounds are recorded through a real gateway, in the past (the gateway's clock moved back while
they are recorded), or aged by moving a round row's ``created_at`` back in the SQLite file, or
purged with a ``now`` in the future. A session is idle by its last write as the audit chain
records it, so making one idle takes the clock: an edited row cannot (see
``tests/evidence/test_tamper_data.py``). ``sessiongate purge``, the gateway's
periodic purge and ``purge_expired`` delete exactly the expired rounds, erase a session left
empty and idle (its data key bytes leave the files), audit every deletion, and leave rounds of
policies without a retention period alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from gateway.keyring import FileKeyProvider, Keyring
from gateway.policy import load_policy_set
from gateway.retention import DAY, purge_expired
from gateway.sessions import SessionService
from gateway.store.sqlite import SQLiteStore
from tests.conftest import ACME_KEY, REPO, Gateway, Upstream
from tests.test_erasure import audit_events, cli, session_bytes
from tests.test_integrity import chat, get_session


def age(gw: Gateway, session: str, days: float, *, seq: int) -> None:
    """Move one round row's time *days* into the past (the row the purge reads; the session's
    last write stays where the chain has it)."""
    with closing(sqlite3.connect(gw.db_path, isolation_level=None, timeout=30)) as conn:
        conn.execute("UPDATE rounds SET created_at=created_at-? WHERE session_id=? AND seq=?",
                     (days * DAY, session, seq))


@contextlib.contextmanager
def days_ago(monkeypatch: pytest.MonkeyPatch, days: float) -> Iterator[None]:
    """The (in-process) gateway's clock *days* in the past for what is recorded inside."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - days * DAY)
    try:
        yield
    finally:
        monkeypatch.setattr(time, "time", real)


def user_texts(gw: Gateway, session: str) -> list[str]:
    resp = get_session(gw, session)
    assert resp.status_code == 200, resp.text
    return [m["content"] for m in resp.json()["full_context"] if m["role"] == "user"]


def purge_events(gw: Gateway) -> list[str]:
    return [body for body in audit_events(gw, "acme") if '"purge"' in body]


def test_cli_purge_erases_expired_rounds_and_audits_them(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sessiongate purge` deletes rounds past the default policy's 90 days, erases the session
    left empty (key bytes gone from the files), keeps the fresh round of another session."""
    with days_ago(monkeypatch, 100):
        for text in ("one", "two"):
            chat(gateway, "expired", text)
        chat(gateway, "mixed", "one")
    chat(gateway, "mixed", "two")
    expired_key = session_bytes(gateway, "acme", "expired")[:2]

    done = cli(gateway, "purge")
    assert done.returncode == 0, done.stderr
    assert "purged 3 expired rounds; erased 1 sessions" in done.stdout

    assert get_session(gateway, "expired").status_code == 404
    stored = gateway.stored_bytes()
    assert not any(blob in stored for blob in expired_key)
    assert user_texts(gateway, "mixed") == ["two"]
    events = purge_events(gateway)
    assert len(events) == 2
    assert any('"expired"' in e and '"session_erased":true' in e.replace(" ", "") for e in events)
    assert any('"mixed"' in e and '"rounds_deleted":1' in e.replace(" ", "") for e in events)

    again = cli(gateway, "purge")
    assert "purged 0 expired rounds; erased 0 sessions" in again.stdout
    assert len(purge_events(gateway)) == 2


KEEP_FOREVER = """\
id: keep-forever
description: Legal hold; no retention period.
priority: 50
match:
  session_ids: ["hold:*"]
session:
  input_keys: null
  reply_keys: null
  max_length: null
"""


def test_purge_expired_follows_each_policys_retention(make_gateway: Callable[..., Gateway], tmp_path: Path) -> None:
    """With the clock moved forward, the 30-day policy's rounds go first, then the 90-day one's;
    a policy without retention keeps its rounds forever."""
    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies)
    (policies / "keep-forever.yaml").write_text(KEEP_FOREVER)
    gateway = make_gateway(policies)
    chat(gateway, "longform:essay", "thirty days")
    chat(gateway, "plain", "ninety days")
    chat(gateway, "hold:case-7", "forever")
    policy_set = load_policy_set(policies)
    days = {p.id: p.retention.days for p in policy_set}
    assert (days["long-conversation"], days["default"], days["keep-forever"]) == (30, 90, None)

    async def purge_at(days: float) -> dict[str, int]:
        store = SQLiteStore(gateway.db_path)
        await store.open()
        keyring = Keyring.from_provider(FileKeyProvider(gateway.dir / "master-keys.json"))
        try:
            return await purge_expired(SessionService(store, keyring), policy_set, now=time.time() + days * DAY)
        finally:
            await store.close()

    assert asyncio.run(purge_at(29)) == {"rounds": 0, "sessions": 0, "skipped": 0, "versions_missing": 0}
    assert asyncio.run(purge_at(31)) == {"rounds": 1, "sessions": 1, "skipped": 0, "versions_missing": 0}
    assert get_session(gateway, "longform:essay").status_code == 404
    assert user_texts(gateway, "plain") == ["ninety days"]
    assert asyncio.run(purge_at(91)) == {"rounds": 1, "sessions": 1, "skipped": 0, "versions_missing": 0}
    assert get_session(gateway, "plain").status_code == 404
    assert asyncio.run(purge_at(100_000)) == {"rounds": 0, "sessions": 0, "skipped": 0, "versions_missing": 0}
    assert user_texts(gateway, "hold:case-7") == ["forever"]


def test_periodic_purge_runs_inside_the_gateway(make_gateway: Callable[..., Gateway], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A gateway with a short purge interval erases an expired session on its own."""
    store = {"backend": "sqlite", "path": str(tmp_path / "gw" / "gateway.db"), "purge_interval_seconds": 0.1}
    gw = make_gateway(store=store)
    with days_ago(monkeypatch, 91):
        chat(gw, "stale", "old news")
    chat(gw, "fresh", "new news")
    deadline = time.monotonic() + 20
    while get_session(gw, "stale").status_code != 404:
        assert time.monotonic() < deadline, "the periodic purge never erased the expired session"
        time.sleep(0.05)
    assert user_texts(gw, "fresh") == ["new news"]
    assert any('"stale"' in e for e in purge_events(gw))


def test_expired_round_leaves_the_injected_context_window(gateway: Gateway, upstream: Upstream) -> None:
    """After a purge, an expired round's text is neither in the exported window nor injected upstream."""
    for text in ("expired text", "fresh text"):
        chat(gateway, "window", text)
    age(gateway, "window", 100, seq=1)
    assert cli(gateway, "purge").returncode == 0
    chat(gateway, "window", "next")
    window = get_session(gateway, "window").json()["context_window"]
    injected = upstream.requests[-1]["messages"]
    assert not any("expired text" in m["content"] for m in window + injected)


def test_imported_rounds_follow_the_catch_all_retention(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds with no policy of their own in the set (an import) expire with the catch-all policy."""
    doc = {"full_context": [{"role": "user", "content": "imported text"}, {"role": "assistant", "content": "ok"}]}
    for days in (89, 91):
        with days_ago(monkeypatch, days):
            assert httpx.put(f"{gateway.base_url}/sessions/handed-over-{days}", json=doc,
                             headers={"Authorization": f"Bearer {ACME_KEY}"}).status_code == 200
    assert "purged 1 expired rounds; erased 1 sessions" in cli(gateway, "purge").stdout
    assert get_session(gateway, "handed-over-91").status_code == 404
    assert get_session(gateway, "handed-over-89").status_code == 200


def test_purge_without_any_retention_period_purges_nothing(make_gateway: Callable[..., Gateway],
                                                           tmp_path: Path) -> None:
    """A policy set that keeps everything for good: `sessiongate purge` says so and deletes nothing."""
    folder = tmp_path / "keep-all"
    shutil.copytree(REPO / "policies", folder)
    for path in folder.glob("*.yaml"):
        path.write_text("\n".join(line for line in path.read_text().splitlines() if not line.startswith("retention:")))
    gw = make_gateway(folder)
    chat(gw, "kept", "for good")
    done = cli(gw, "purge")
    assert done.returncode == 0 and "purged 0 expired rounds; erased 0 sessions" in done.stdout, done.stderr
    assert user_texts(gw, "kept") == ["for good"]
