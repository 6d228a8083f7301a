"""Erasure is crypto-shredding (issue 4 §3): the session's data key and rows are destroyed.

After ``DELETE /v1/sessions/{id}`` or ``sessiongate sessions erase`` the session is gone (404),
and the bytes of its data key (wrapped key and key id) and of its sealed records no longer occur
anywhere in the database files, WAL included. Other sessions, of the same tenant and of other
tenants, still read; the erasure is in the audit chain.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import crypto, erasure
from gateway.app import build_app
from gateway.handlers import SERVICES
from gateway.keyring import FileKeyProvider, Keyring
from gateway.settings import load_settings
from tests.conftest import ACME_KEY, GLOBEX_KEY, REPO, Gateway, Upstream, serving, wait_for
from tests.test_integrity import chat, get_session


def session_bytes(gw: Gateway, tenant: str, session: str) -> list[bytes]:
    """The data key id, wrapped data key, sealed state and sealed rounds of one session."""
    with closing(sqlite3.connect(gw.db_path)) as conn:
        dk_id, wrapped = conn.execute("SELECT dk_id, wrapped FROM data_keys WHERE tenant=? AND session_id=?",
                                      (tenant, session)).fetchone()
        (state,) = conn.execute("SELECT state_ct FROM sessions WHERE tenant=? AND session_id=?",
                                (tenant, session)).fetchone()
        rounds = [r[0] for r in conn.execute("SELECT ct FROM rounds WHERE tenant=? AND session_id=?",
                                             (tenant, session))]
    return [dk_id, wrapped, state, *rounds]


def audit_events(gw: Gateway, tenant: str) -> list[str]:
    with closing(sqlite3.connect(gw.db_path)) as conn:
        return [bytes(r[0]).decode() for r in conn.execute("SELECT body FROM audit WHERE tenant=? ORDER BY seq",
                                                           (tenant,))]


def delete(gw: Gateway, session: str, key: str = ACME_KEY) -> httpx.Response:
    return httpx.delete(f"{gw.base_url}/sessions/{session}", headers={"Authorization": f"Bearer {key}"})


def cli_at(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m gateway --config CONFIG ARGS...`` in a separate process."""
    return subprocess.run([sys.executable, "-m", "gateway", "--config", str(config), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def cli(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return cli_at(gw.config_path, *args)


def test_delete_endpoint_shreds_the_data_key_from_the_database_files(gateway: Gateway) -> None:
    """After DELETE the session is 404 and its key and record bytes are gone from gateway.db and
    its WAL, with no manual checkpoint; a sibling session still reads."""
    for text in ("one", "two"):
        chat(gateway, "doomed", text)
        chat(gateway, "survivor", text)
    doomed = session_bytes(gateway, "acme", "doomed")
    assert all(blob in gateway.stored_bytes() for blob in doomed[:2])

    resp = delete(gateway, "doomed")
    assert resp.status_code == 200 and resp.json() == {"id": "doomed", "deleted": True, "purge": "complete"}

    assert get_session(gateway, "doomed").status_code == 404
    stored = gateway.stored_bytes()
    for name, blob in zip(("dk_id", "wrapped", "state", "round 1", "round 2"), doomed, strict=True):
        assert blob not in stored, f"{name} of the erased session is still on disk"
    survivor = get_session(gateway, "survivor")
    assert survivor.status_code == 200
    assert [m["content"] for m in survivor.json()["full_context"] if m["role"] == "user"] == ["one", "two"]
    assert any('"erasure"' in body and '"doomed"' in body for body in audit_events(gateway, "acme"))


def test_delete_leaves_the_same_id_of_another_tenant_alone(gateway: Gateway) -> None:
    """Erasing acme's session 'shared' leaves globex's session 'shared' readable."""
    chat(gateway, "shared", "acme text", ACME_KEY)
    chat(gateway, "shared", "globex text", GLOBEX_KEY)
    globex_key_bytes = session_bytes(gateway, "globex", "shared")[:2]
    assert delete(gateway, "shared", ACME_KEY).status_code == 200
    assert get_session(gateway, "shared", ACME_KEY).status_code == 404
    other = get_session(gateway, "shared", GLOBEX_KEY)
    assert other.status_code == 200
    assert other.json()["full_context"][0]["content"] == "globex text"
    assert all(blob in gateway.stored_bytes() for blob in globex_key_bytes)


def test_deleting_an_unknown_session_is_404(gateway: Gateway) -> None:
    """DELETE of a session that does not exist is a 404, and nothing is audited as erased."""
    resp = delete(gateway, "never-was")
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "not_found_error"
    assert not any('"erasure"' in body for body in audit_events(gateway, "acme"))


def test_cli_erase_shreds_while_the_gateway_runs(gateway: Gateway) -> None:
    """`sessiongate sessions erase` beside a running gateway removes the session's key bytes from
    the files; the gateway then reports it gone and still serves the other session."""
    chat(gateway, "cli-doomed", "bye")
    chat(gateway, "cli-survivor", "stay")
    doomed = session_bytes(gateway, "acme", "cli-doomed")

    done = cli(gateway, "sessions", "erase", "cli-doomed", "--tenant", "acme")
    assert done.returncode == 0, done.stderr
    assert "erased acme/cli-doomed" in done.stdout

    assert get_session(gateway, "cli-doomed").status_code == 404
    stored = gateway.stored_bytes()
    assert not any(blob in stored for blob in doomed)
    assert get_session(gateway, "cli-survivor").status_code == 200
    assert "stay" in chat(gateway, "cli-survivor", "stay")

    again = cli(gateway, "sessions", "erase", "cli-doomed", "--tenant", "acme")
    assert again.returncode == 2
    assert "no session 'cli-doomed'" in again.stderr


def test_a_session_failing_its_integrity_check_can_still_be_erased(gateway: Gateway) -> None:
    """Erasure never needs to decrypt: a session whose data key names an unknown master key is
    a 500 to read but is erased cleanly, and its rows are gone."""
    chat(gateway, "broken", "hello")
    with closing(sqlite3.connect(gateway.db_path, isolation_level=None)) as conn:
        conn.execute("UPDATE data_keys SET kek_id='mk-19990101-dead' WHERE session_id='broken'")
    assert get_session(gateway, "broken").status_code == 500
    assert delete(gateway, "broken").status_code == 200
    assert get_session(gateway, "broken").status_code == 404
    with closing(sqlite3.connect(gateway.db_path)) as conn:
        left = [conn.execute(f"SELECT count(*) FROM {t} WHERE session_id='broken'").fetchone()[0]
                for t in ("data_keys", "sessions", "rounds")]
    assert left == [0, 0, 0]


def test_erase_drops_the_data_key_from_the_gateways_memory(gateway: Gateway) -> None:
    """After DELETE neither the unwrapped-key cache nor the cipher cache of the running gateway
    still holds the erased session's data key (white-box: these caches are not public)."""
    chat(gateway, "cached", "hello")
    with closing(sqlite3.connect(gateway.db_path)) as conn:
        kek_id, dk_id, wrapped = conn.execute(
            "SELECT kek_id, dk_id, wrapped FROM data_keys WHERE session_id='cached'").fetchone()
    dk = Keyring.from_provider(FileKeyProvider(gateway.dir / "master-keys.json")).unwrap(kek_id, dk_id, wrapped)
    live_keyring = gateway.app[SERVICES].sessions.keyring
    assert crypto._ciphers.get(dk.key) is not None
    assert live_keyring._data_keys.get((kek_id, dk_id, wrapped)) == dk
    assert delete(gateway, "cached").status_code == 200
    assert crypto._ciphers.get(dk.key) is None
    assert live_keyring._data_keys.get((kek_id, dk_id, wrapped)) is None


def hold_reader(gw: Gateway) -> sqlite3.Connection:
    """A connection holding a read transaction on the store (a backup, an admin shell)."""
    reader = sqlite3.connect(gw.db_path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM sessions").fetchone()
    return reader


def completed_erasures(gw: Gateway, tenant: str = "acme") -> list[str]:
    return [e["session_id"] for e in gw.audit_entries(tenant) if e["event"] == "erasure_completed"]


@pytest.fixture
def quick_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gateways built after this look for erasures left pending every 0.1 s."""
    monkeypatch.setattr(erasure, "POLL_SECONDS", 0.1, raising=False)


def test_a_cli_erasure_left_pending_is_finished_by_the_running_gateway(
        make_gateway: Callable[..., Gateway], quick_poll: None) -> None:
    """`sessions erase` that exits 3 (a reader holds the WAL) records the erasure in the store: the
    running gateway finishes it once the reader ends (bytes gone, `erasure_completed` entry)."""
    gw = make_gateway()
    chat(gw, "cliq", "the distinctive secret okapi-5512")
    doomed = session_bytes(gw, "acme", "cliq")
    reader = hold_reader(gw)
    try:
        done = cli(gw, "sessions", "erase", "--tenant", "acme", "--wait", "0", "cliq")
        assert done.returncode == 3, done.stderr
        assert "recorded as pending" in done.stderr and "a running gateway finishes it" in done.stderr
        assert any(blob in gw.stored_bytes() for blob in doomed[:2])
    finally:
        reader.execute("COMMIT")
        reader.close()
    wait_for(lambda: not any(blob in gw.stored_bytes() for blob in doomed), seconds=20)
    wait_for(lambda: completed_erasures(gw) == ["cliq"], seconds=20)


def test_a_pending_cli_erasure_is_finished_when_the_command_runs_again(tmp_path: Path) -> None:
    """With no gateway running, the same `sessions erase` run again after the reader ended
    finishes the pending erasure (exit 0, bytes gone, one `erasure_completed`), not 'no session';
    a third run, with nothing pending, is 'no session' again."""
    gw = _seeded_store(tmp_path, "again")
    doomed = session_bytes(gw, "acme", "again")
    keeper = sqlite3.connect(gw.db_path, isolation_level=None)  # idle: the last to close would fold the log
    keeper.execute("SELECT count(*) FROM meta").fetchone()
    try:
        reader = hold_reader(gw)
        try:
            first = cli(gw, "sessions", "erase", "--tenant", "acme", "--wait", "0", "again")
            assert first.returncode == 3, first.stderr
        finally:
            reader.execute("COMMIT")
            reader.close()
        assert any(blob in gw.stored_bytes() for blob in doomed[:2])

        second = cli(gw, "sessions", "erase", "--tenant", "acme", "again")
        assert second.returncode == 0, second.stderr
        assert "erased acme/again" in second.stdout
        assert not any(blob in gw.stored_bytes() for blob in doomed)
    finally:
        keeper.close()
    assert completed_erasures(gw) == ["again"]

    third = cli(gw, "sessions", "erase", "--tenant", "acme", "again")
    assert third.returncode == 2 and "no session 'again'" in third.stderr


def test_a_gateway_started_with_an_erasure_pending_finishes_it(
        make_gateway: Callable[..., Gateway], tmp_path: Path) -> None:
    """An erasure left pending by the CLI while no gateway ran is finished by the next gateway at
    start-up: its `erasure_completed` entry is written (it was not after a restart before)."""
    seeded = _seeded_store(tmp_path, "restart", name="gw")
    reader = hold_reader(seeded)
    try:
        assert cli(seeded, "sessions", "erase", "--tenant", "acme", "--wait", "0", "restart").returncode == 3
    finally:
        reader.execute("COMMIT")
        reader.close()
    gw = make_gateway()  # the same folder and store
    assert gw.db_path == seeded.db_path
    wait_for(lambda: completed_erasures(gw) == ["restart"], seconds=20)


def _seeded_store(tmp_path: Path, session: str, *, name: str = "seeded") -> Gateway:
    """A store folder holding one recorded round on *session*, with no gateway left running."""
    from tests.conftest import standin_thread, write_config

    directory = tmp_path / name
    directory.mkdir(exist_ok=True)
    policies = directory / "policies"
    shutil.copytree(REPO / "policies", policies, dirs_exist_ok=True)
    with standin_thread() as url:
        config = write_config(directory, url, policies)
        app = build_app(load_settings(config))
        with serving(app) as base:
            gw = Gateway(base, directory, config, directory / "gateway.db", directory / "gateway.log", app)
            chat(gw, session, f"text of {session}")
    return gw


def erase_mid_round(gw: Gateway, upstream: Upstream, session: str, answer: str) -> str:
    """One round on *session* (after a first one) whose session is erased while the model is
    still answering; the reply the client got."""
    chat(gw, session, "the first turn")
    arrived, release = threading.Event(), threading.Event()

    def slow(body: dict[str, Any]) -> str:
        arrived.set()
        release.wait(30)
        return answer

    upstream.reply = slow
    result: dict[str, Any] = {}
    caller = threading.Thread(target=lambda: result.update(reply=chat(gw, session, "the second turn")))
    caller.start()
    try:
        assert arrived.wait(30)
        assert delete(gw, session).status_code == 200
    finally:
        release.set()
        caller.join(30)
    return str(result["reply"])


def test_a_round_in_flight_when_its_session_is_erased_records_nothing(
        make_gateway: Callable[..., Gateway], upstream: Upstream) -> None:
    """A round that loaded a session erased while the model was still answering is audited
    (outcome `erased_meanwhile`, nothing recorded) but creates no new session: its reply, which
    may echo the erased memo, is nowhere in the store."""
    gw = make_gateway()
    reply = erase_mid_round(gw, upstream, "inflight", "an answer drawn from the erased window: walrus-7781")
    assert "walrus-7781" in reply  # the client had its answer

    assert get_session(gw, "inflight").status_code == 404
    assert b"walrus-7781" not in gw.stored_bytes()
    with closing(sqlite3.connect(gw.db_path)) as conn:
        assert conn.execute("SELECT count(*) FROM data_keys WHERE session_id='inflight'").fetchone()[0] == 0
    rounds = [e for e in gw.audit_entries() if e["event"] == "round" and e.get("session_id") == "inflight"]
    assert [(e["outcome"], e["recorded"], e.get("round_seq")) for e in rounds] == [
        ("completed", ["user", "assistant"], 1), ("erased_meanwhile", [], None)]


def _forge_pending(gw: Gateway, tenant: str, request_id: str, value: str) -> None:
    """A row in ``meta`` as a pending erasure's is named, holding *value* (written around the gateway)."""
    from gateway.store.sqlite import _erasure_name

    with closing(sqlite3.connect(gw.db_path, isolation_level=None, timeout=30)) as conn:
        conn.execute("INSERT INTO meta VALUES (?, ?)", (_erasure_name(tenant, request_id), value))


def _log_events(gw: Gateway, event: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in gw.log_path.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


def test_a_forged_pending_erasure_writes_no_audit_entry(make_gateway: Callable[..., Gateway]) -> None:
    """A pending-erasure row written into the database for a session never erased, for a tenant
    that does not exist, or again for an erasure already completed, is no erasure: the gateway
    writes no ``erasure_completed`` for it (it wrote an authentic one, and started a chain for the
    made-up tenant), logs it, and the session is untouched. A real erasure beside them completes."""
    gw = make_gateway()
    chat(gw, "carol", "carol's history")
    chat(gw, "doomed", "to be erased")
    chat(gw, "finished", "erased before")
    reader = hold_reader(gw)
    try:
        assert delete(gw, "finished").status_code == 202
    finally:
        reader.execute("COMMIT")
        reader.close()
    wait_for(lambda: completed_erasures(gw) == ["finished"], seconds=20)
    (finished,) = [e["request_id"] for e in gw.audit_entries() if e["event"] == "erasure"]
    _forge_pending(gw, "acme", finished, json.dumps(
        {"tenant": "acme", "session_id": "finished", "request_id": finished, "erased_at": 1000.0}))
    _forge_pending(gw, "acme", "forged-req-1", json.dumps(
        {"tenant": "acme", "session_id": "carol", "request_id": "forged-req-1", "erased_at": 1000.0}))
    _forge_pending(gw, "newtenant", "forged-req-2", json.dumps(
        {"tenant": "newtenant", "session_id": "anything at all", "request_id": "forged-req-2", "erased_at": 1000.0}))
    resp = delete(gw, "doomed")  # its settle finishes every erasure recorded as pending
    assert resp.status_code == 200 and resp.json()["purge"] == "complete", resp.text
    assert completed_erasures(gw) == ["finished"]
    assert gw.audit_entries("newtenant") == []
    assert get_session(gw, "carol").status_code == 200
    refused = {(line["tenant"], line["request_id"]) for line in _log_events(gw, "erasure_pending_unvouched")}
    assert refused == {("acme", "forged-req-1"), ("newtenant", "forged-req-2"), ("acme", finished)}


def test_an_erasure_completed_without_its_erasure_fails_verification(gateway: Gateway) -> None:
    """An authentic ``erasure_completed`` entry (as an older gateway wrote for a forged pending
    row) with no earlier ``erasure`` entry of that request and session fails ``audit verify``."""
    import asyncio

    from gateway.keys import load_signer
    from gateway.store.base import Changes
    from gateway.store.sqlite import SQLiteStore

    chat(gateway, "carol", "carol's history")

    async def append() -> None:
        store = SQLiteStore(gateway.db_path, entry_key=load_signer(load_settings(gateway.config_path)).entry_key)
        await store.open()
        try:
            await store.transact("acme", None, lambda cur: Changes(audit=[{
                "event": "erasure_completed", "request_id": "forged-req-1", "session_id": "carol",
                "detail": {"pending_seconds": 1.7e9}}]))
        finally:
            await store.close()
    asyncio.run(append())
    done = cli(gateway, "audit", "verify", "--tenant", "acme")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "erasure_unmatched" in done.stdout and "tenant acme, session carol" in done.stdout, done.stdout
    assert "forged-req-1" in done.stdout


def test_malformed_pending_erasure_rows_stop_no_erasure(make_gateway: Callable[..., Gateway],
                                                         tmp_path: Path) -> None:
    """Rows named as pending erasures that do not hold one (a time that is text, a field missing,
    not JSON) are reported once each and skipped: the gateway started over them still finishes a
    real erasure left pending (the finisher died at start-up with a TypeError, and every erasure
    after stayed pending for good, its key bytes in the log)."""
    seeded = _seeded_store(tmp_path, "victim", name="gw")
    doomed = session_bytes(seeded, "acme", "victim")
    _forge_pending(seeded, "acme", "bad-1", json.dumps(
        {"tenant": "acme", "session_id": "victim", "request_id": "bad-1", "erased_at": "x"}))
    _forge_pending(seeded, "acme", "bad-2", json.dumps({"tenant": "acme", "request_id": "bad-2"}))
    _forge_pending(seeded, "acme", "bad-3", "not json")
    _forge_pending(seeded, "acme", "bad-4", json.dumps(
        {"tenant": "globex", "session_id": "victim", "request_id": "bad-4", "erased_at": 1.0}))  # not its name
    gw = make_gateway()  # the same folder and store: the finisher reads the rows at start-up
    reader = hold_reader(gw)
    try:
        resp = delete(gw, "victim")
        assert resp.status_code == 202 and resp.json()["purge"] == "pending", resp.text
    finally:
        reader.execute("COMMIT")
        reader.close()
    wait_for(lambda: completed_erasures(gw) == ["victim"], seconds=20)
    assert not any(blob in gw.stored_bytes() for blob in doomed)
    bad = [line["name"] for line in _log_events(gw, "erasure_pending_malformed")]
    assert sorted(bad) == sorted(set(bad)) and len(bad) == 4, bad
    assert all(f'"bad-{i}"' in " ".join(bad) for i in range(1, 5)), bad
