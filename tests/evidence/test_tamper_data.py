"""The stored data is checked against the audit chain (issue 10 §1), on SQLite and PostgreSQL.

A real gateway records rounds; the tests then alter its tables from a second connection, as an
adversary with write access to the database would (delete a round, move one to another tenant,
roll the state row back with the later round deleted, delete the state row, duplicate a round).
Each alteration must be found by ``audit verify`` (exit 1, naming tenant, session and round or
audit entry) and when the session is loaded: a chat and a read get the integrity error instead
of a silently shorter history.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from tests.conftest import ACME_KEY, AUDITOR_TOKEN, GLOBEX_KEY, Gateway, wait_for
from tests.evidence.conftest import Tables, verify

INTEGRITY = {"message": "stored data for this session failed an integrity check; the operator has been told",
             "type": "integrity_error", "code": "integrity_check_failed"}


def chat(gw: Gateway, session: str, text: str, key: str = ACME_KEY) -> httpx.Response:
    return httpx.post(f"{gw.base_url}/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {key}", "X-Session-Id": session},
                      json={"model": "standin", "messages": [{"role": "user", "content": text}]})


def read(gw: Gateway, session: str, key: str = ACME_KEY) -> httpx.Response:
    return httpx.get(f"{gw.base_url}/sessions/{session}", headers={"Authorization": f"Bearer {key}"}, timeout=30)


def record(gw: Gateway, session: str, turns: int) -> None:
    for i in range(turns):
        assert chat(gw, session, f"turn {i + 1}").status_code == 200


def entries(tables: Tables, tenant: str = "acme") -> list[dict[str, Any]]:
    rows = tables.sql("SELECT body FROM audit WHERE tenant=? ORDER BY seq", tenant)
    return [json.loads(bytes(body)) for (body,) in rows]


def round_entry_seq(tables: Tables, session: str, round_seq: int) -> int:
    return next(e["seq"] for e in entries(tables) if e.get("session_id") == session
                and e["event"] == "round" and e.get("round_seq") == round_seq)


def assert_refused_on_load(gw: Gateway, session: str) -> None:
    """A chat and a read of the altered session both get the integrity error; a sibling is fine."""
    resp = chat(gw, session, "and now?")
    assert resp.status_code == 500 and resp.json() == {"error": INTEGRITY}, resp.text
    resp = read(gw, session)
    assert resp.status_code == 500 and resp.json() == {"error": INTEGRITY}, resp.text
    assert read(gw, "bystander").status_code == 200
    assert chat(gw, "bystander", "still fine?").status_code == 200


@pytest.fixture
def recorded(db_gateway: tuple[Gateway, Tables]) -> tuple[Gateway, Tables]:
    gw, tables = db_gateway
    record(gw, "alice", 3)
    record(gw, "bystander", 1)
    code, out = verify(gw)
    assert code == 0, out
    return gw, tables


def test_untouched_data_verifies_and_entries_bind_state(recorded: tuple[Gateway, Tables]) -> None:
    """Before any alteration verify passes, and each round entry binds the session's rows."""
    gw, tables = recorded
    last = [e for e in entries(tables) if e.get("session_id") == "alice"][-1]
    assert last["round_seq"] == 3
    assert last["state"]["rounds"] == 3 and last["state"]["next_seq"] == 4
    assert len(last["state"]["sha256"]) == 64


def test_deleted_round_is_found(recorded: tuple[Gateway, Tables]) -> None:
    """A round row deleted outside the gateway: verify names acme/alice round 2; load refuses."""
    gw, tables = recorded
    tables.sql("DELETE FROM rounds WHERE tenant='acme' AND session_id='alice' AND seq=2")
    code, out = verify(gw)
    assert code == 1, out
    assert "round_missing" in out and "tenant acme, session alice, round 2" in out
    assert f"audit entry {round_entry_seq(tables, 'alice', 2)}" in out
    assert_refused_on_load(gw, "alice")


def test_round_moved_to_another_tenant_is_found(recorded: tuple[Gateway, Tables]) -> None:
    """A round relabelled with another tenant is missing from one chain and unrecorded in the other."""
    gw, tables = recorded
    tables.sql("UPDATE rounds SET tenant='globex' WHERE tenant='acme' AND session_id='alice' AND seq=2")
    code, out = verify(gw)
    assert code == 1, out
    assert "tenant acme, session alice, round 2" in out and "round_missing" in out
    assert "tenant globex, session alice, round 2" in out and "round_unrecorded" in out
    assert_refused_on_load(gw, "alice")


def test_state_rolled_back_with_later_round_deleted_is_found(db_gateway: tuple[Gateway, Tables]) -> None:
    """The state row put back to an earlier version, the later round deleted: both are found."""
    gw, tables = db_gateway
    record(gw, "alice", 2)
    record(gw, "bystander", 1)
    (saved,) = tables.sql("SELECT version, next_seq, state_ct, updated_at FROM sessions "
                          "WHERE tenant='acme' AND session_id='alice'")
    record(gw, "alice", 1)
    tables.sql("UPDATE sessions SET version=?, next_seq=?, state_ct=?, updated_at=? "
               "WHERE tenant='acme' AND session_id='alice'", *saved)
    tables.sql("DELETE FROM rounds WHERE tenant='acme' AND session_id='alice' AND seq=3")
    code, out = verify(gw)
    assert code == 1, out
    assert "tenant acme, session alice, round 3" in out and "round_missing" in out
    assert f"audit entry {round_entry_seq(tables, 'alice', 3)}" in out
    assert_refused_on_load(gw, "alice")


def test_state_rolled_back_alone_is_found(db_gateway: tuple[Gateway, Tables]) -> None:
    """Only the state row rolled back (rounds intact): verify reports the state of acme/alice."""
    gw, tables = db_gateway
    record(gw, "alice", 1)
    record(gw, "bystander", 1)
    (saved,) = tables.sql("SELECT version, state_ct FROM sessions WHERE tenant='acme' AND session_id='alice'")
    tables.sql("UPDATE sessions SET version=?, state_ct=? WHERE tenant='acme' AND session_id='alice'", *saved)
    assert chat(gw, "alice", "a window-changing turn").status_code == 200
    tables.sql("UPDATE sessions SET version=?, state_ct=? WHERE tenant='acme' AND session_id='alice'", *saved)
    code, out = verify(gw)
    assert code == 1, out
    assert "state_mismatch" in out and "tenant acme, session alice" in out and "rolled back" in out
    assert_refused_on_load(gw, "alice")


def test_deleted_state_row_is_found(recorded: tuple[Gateway, Tables]) -> None:
    """The session's state row deleted (rounds kept): verify names it; a read is not a 404."""
    gw, tables = recorded
    last = [e for e in entries(tables) if e.get("session_id") == "alice"][-1]["seq"]
    tables.sql("DELETE FROM sessions WHERE tenant='acme' AND session_id='alice'")
    code, out = verify(gw)
    assert code == 1, out
    assert "state_missing" in out and "tenant acme, session alice" in out and f"audit entry {last}" in out
    assert_refused_on_load(gw, "alice")


def test_whole_session_deleted_is_found(recorded: tuple[Gateway, Tables]) -> None:
    """All of a session's rows deleted without an erasure: it does not come back as a new session."""
    gw, tables = recorded
    for table in ("rounds", "sessions", "data_keys"):
        tables.sql(f"DELETE FROM {table} WHERE tenant='acme' AND session_id='alice'")
    code, out = verify(gw)
    assert code == 1 and "tenant acme, session alice, round 1" in out, out
    assert_refused_on_load(gw, "alice")


def test_a_tenant_whose_every_row_was_deleted_is_still_verified_and_fails(db_gateway: tuple[Gateway, Tables]) -> None:
    """Delete everything of one tenant (its chain, rounds, sessions, keys, heads): it is gone from
    the store's tenant list, but its signed checkpoints are not, so ``audit verify`` of all
    tenants still checks it and fails (it used to verify the other tenants and exit 0)."""
    gw, tables = db_gateway
    record(gw, "alice", 1)
    for i in range(6):  # checkpoint_every is 5 in the test configuration
        assert chat(gw, "globex:bob", f"turn {i}", key=GLOBEX_KEY).status_code == 200
    checkpoints = gw.dir / "checkpoints.jsonl"
    wait_for(lambda: checkpoints.exists() and '"globex"' in checkpoints.read_text())
    code, out = verify(gw)
    assert code == 0 and "OK   tenant globex" in out, out
    for table in ("audit", "rounds", "sessions", "data_keys", "session_heads"):
        tables.sql(f"DELETE FROM {table} WHERE tenant=?", "globex")
    code, out = verify(gw)
    assert code == 1, out
    assert "OK   tenant acme" in out
    assert "FAIL tenant globex" in out and "truncated" in out and "checkpoint" in out, out


def test_duplicated_round_is_found(recorded: tuple[Gateway, Tables]) -> None:
    """A round row copied under the next sequence number: verify names round 4; load refuses."""
    gw, tables = recorded
    tables.sql("INSERT INTO rounds (tenant, session_id, seq, created_at, request_id, policy_id, policy_hash, "
               "outcome, kind, ct) SELECT tenant, session_id, 4, created_at, request_id, policy_id, policy_hash, "
               "outcome, kind, ct FROM rounds WHERE tenant='acme' AND session_id='alice' AND seq=1")
    code, out = verify(gw)
    assert code == 1, out
    assert "round_unrecorded" in out and "tenant acme, session alice, round 4" in out
    assert_refused_on_load(gw, "alice")


def test_legitimate_removals_still_verify(recorded: tuple[Gateway, Tables]) -> None:
    """Erasure, reset and import are audited events: the data still matches the chain after them."""
    gw, tables = recorded
    headers = {"Authorization": f"Bearer {ACME_KEY}"}
    assert httpx.delete(f"{gw.base_url}/sessions/alice", headers=headers).status_code in (200, 204)
    assert httpx.post(f"{gw.base_url}/sessions/bystander/reset", headers=headers).status_code in (200, 204)
    doc = {"id": "imported", "full_context": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]}
    assert httpx.put(f"{gw.base_url}/sessions/imported", headers=headers, json=doc).status_code in (200, 201)
    record(gw, "alice", 1)  # a new session under the erased id
    code, out = verify(gw)
    assert code == 0, out
    imported = [e for e in entries(tables) if e["event"] == "import"][-1]
    assert imported["round_seq"] == 1 and imported["state"]["rounds"] == 1
    assert read(gw, "imported").status_code == 200 and read(gw, "alice").status_code == 200


def test_rebinding_the_rolled_back_state_breaks_the_chain(recorded: tuple[Gateway, Tables]) -> None:
    """The binding is inside the hashed body: rewriting it to match altered rows breaks the chain."""
    gw, tables = recorded
    seq, body = tables.sql("SELECT seq, body FROM audit WHERE tenant='acme' ORDER BY seq DESC LIMIT 1")[0]
    doc = json.loads(bytes(body))
    assert doc["state"]["rounds"] >= 1
    doc["state"]["rounds"] -= 1
    tables.sql("UPDATE audit SET body=? WHERE tenant='acme' AND seq=?",
               json.dumps(doc, sort_keys=True, separators=(",", ":")).encode(), seq)
    code, out = verify(gw)
    assert code == 1 and f"edited at seq {seq}" in out, out


def test_file_from_before_bindings_migrates_and_loads(gateway: Gateway) -> None:
    """A SQLite file at schema version 1 (no ``session_heads``) is migrated when opened, and its
    sessions, which no head points at yet, still load; verify passes."""
    import asyncio

    from gateway.keyring import FileKeyProvider, Keyring
    from gateway.sessions import SessionService
    from gateway.store.sqlite import SCHEMA_VERSION, SQLiteStore

    tables = Tables("sqlite", gateway)
    record(gateway, "old", 2)
    tables.sql("DROP TABLE session_heads")
    tables.sql("UPDATE meta SET value='1' WHERE name='schema_version'")

    async def reopen() -> Any:
        store = SQLiteStore(gateway.db_path)
        await store.open()
        try:
            svc = SessionService(store, Keyring.from_provider(FileKeyProvider(gateway.dir / "master-keys.json")))
            return await svc.load("acme", "old")
        finally:
            await store.close()

    loaded = asyncio.run(reopen())
    assert loaded is not None and loaded.next_seq == 3
    assert tables.sql("SELECT value FROM meta WHERE name='schema_version'") == [(str(SCHEMA_VERSION),)]
    assert tables.sql("SELECT count(*) FROM session_heads") == [(0,)]
    code, out = verify(gateway)
    assert code == 0, out


@pytest.mark.parametrize(("value", "said"), [
    ("abc", "holds 'abc' in meta.schema_version, which is not a schema version"),
    ("99", "is at schema version 99, newer than this gateway knows")])
def test_an_edited_schema_version_is_a_one_line_error_naming_the_file(gateway: Gateway, value: str,
                                                                      said: str) -> None:
    """``meta.schema_version`` edited to text that is not a version, or to one from the future:
    the CLI exits 2 with one line naming the file and the value, never a traceback (probe F5)."""
    from tests.test_cli_errors import assert_one_line_error, run

    tables = Tables("sqlite", gateway)
    record(gateway, "alice", 1)
    tables.sql("UPDATE meta SET value=? WHERE name='schema_version'", value)
    result = run("--config", str(gateway.config_path), "sessions", "list", "--tenant", "acme")
    assert_one_line_error(result, 2, f"SQLite store {gateway.db_path} ", said)


def test_retention_purge_is_accounted_for(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds a retention purge deleted (listed in the purge entry), old by their audit entries,
    are not missing; the session still loads and records."""
    from tests.evidence.conftest import run_cli

    tables = Tables("sqlite", gateway)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 100 * 86400)  # rounds 1 and 2 recorded 100 days ago
    record(gateway, "mixed", 2)
    monkeypatch.setattr(time, "time", real)
    record(gateway, "mixed", 1)
    code, out, err = run_cli("--config", str(gateway.config_path), "purge")
    assert code == 0 and "purged 2 expired rounds" in out, err
    purge = [e for e in entries(tables) if e["event"] == "purge"][-1]
    assert purge["detail"]["seqs"] == [1, 2] and purge["state"]["rounds"] == 1
    code, out = verify(gateway)
    assert code == 0, out
    assert read(gateway, "mixed").status_code == 200
    assert chat(gateway, "mixed", "after the purge").status_code == 200


def test_a_purge_made_early_by_an_edited_time_fails_verification(db_gateway: tuple[Gateway, Tables]) -> None:
    """An operator moves rounds' times back so that the gateway's own retention purge deletes
    them with a proper purge entry: verification judges the purge by the rounds' entries."""
    from tests.evidence.conftest import run_cli

    gw, tables = db_gateway
    record(gw, "young", 3)
    tables.sql("UPDATE rounds SET created_at=created_at-? WHERE session_id='young' AND seq IN (1, 2)", 100 * 86400)
    code, out, err = run_cli("--config", str(gw.config_path), "purge")
    assert code == 0 and "purged 2 expired rounds" in out, err
    purge = [e for e in entries(tables) if e["event"] == "purge"][-1]["seq"]
    code, out = verify(gw)
    assert code == 1, out
    assert "purge_premature" in out and "tenant acme, session young, round 1" in out, out
    assert f"purge entry {purge} deleted it" in out, out
    assert f"audit entry {round_entry_seq(tables, 'young', 1)} recorded it" in out, out


def test_a_deleted_data_key_fails_verification(recorded: tuple[Gateway, Tables]) -> None:
    """Deleting a session's data key erases its rows for good, with no erasure entry."""
    gw, tables = recorded
    tables.sql("DELETE FROM data_keys WHERE tenant='acme' AND session_id='alice'")
    code, out = verify(gw)
    assert code == 1, out
    assert "data_key_missing" in out and "tenant acme, session alice" in out, out
    assert_refused_on_load(gw, "alice")


def test_a_data_key_swapped_for_another_sessions_fails_verification(recorded: tuple[Gateway, Tables]) -> None:
    """Another session's key (which unwraps fine) is not the key alice's rows were sealed under."""
    gw, tables = recorded
    (dk_id, kek_id, wrapped), = tables.sql("SELECT dk_id, kek_id, wrapped FROM data_keys "
                                           "WHERE tenant='acme' AND session_id='bystander'")
    tables.sql("UPDATE data_keys SET dk_id=?, kek_id=?, wrapped=? WHERE tenant='acme' AND session_id='alice'",
               bytes(dk_id), kek_id, bytes(wrapped))
    code, out = verify(gw)
    assert code == 1, out
    assert "data_key_mismatch" in out and "tenant acme, session alice" in out and bytes(dk_id).hex() in out, out


def test_an_altered_wrapped_data_key_fails_verification(recorded: tuple[Gateway, Tables]) -> None:
    gw, tables = recorded
    (wrapped,), = tables.sql("SELECT wrapped FROM data_keys WHERE tenant='acme' AND session_id='alice'")
    bad = bytes(wrapped)[:-1] + bytes([bytes(wrapped)[-1] ^ 1])
    tables.sql("UPDATE data_keys SET wrapped=? WHERE tenant='acme' AND session_id='alice'", bad)
    code, out = verify(gw)
    assert code == 1, out
    assert "data_key_altered" in out and "tenant acme, session alice" in out, out


def test_a_purge_never_launders_a_rolled_back_state(db_gateway: tuple[Gateway, Tables],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator rolls a session's state row back; the next retention purge would rewrite that
    state without its expired rounds and bind it anew, after which verification passed. The purge
    checks the rows first: the session is quarantined and skipped (its rows kept for the
    investigation), the other sessions are purged, and verification still fails."""
    from tests.evidence.conftest import run_cli

    gw, tables = db_gateway
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 100 * 86400)  # past the default 90 days
    record(gw, "rolled", 2)
    record(gw, "bystander", 2)
    monkeypatch.setattr(time, "time", real)
    record(gw, "rolled", 1)
    old = tables.sql("SELECT state_ct, version, next_seq FROM sessions WHERE session_id='rolled'")[0]
    record(gw, "rolled", 1)
    tables.sql("UPDATE sessions SET state_ct=?, version=?, next_seq=? WHERE session_id='rolled'", *old)

    code, out, err = run_cli("--config", str(gw.config_path), "purge")
    assert code == 0 and "purged 2 expired rounds; erased 1 sessions" in out, (out, err)
    assert "skipped 1 quarantined session(s)" in err, err
    assert tables.sql("SELECT count(*) FROM rounds WHERE session_id='rolled'") == [(4,)]
    assert [e["event"] for e in entries(tables) if e.get("session_id") == "rolled"][-1] == "quarantine"
    code, out = verify(gw)
    assert code == 1 and "state_mismatch" in out and "session rolled" in out, out

    before = len(entries(tables))
    code, out, err = run_cli("--config", str(gw.config_path), "purge")  # quarantined: skipped quietly
    assert code == 0 and "purged 0 expired rounds" in out and "skipped 1" in err, (out, err)
    assert len(entries(tables)) == before


def test_an_edited_session_time_does_not_erase_an_active_session(db_gateway: tuple[Gateway, Tables],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator moves a session row's last-write time back so that the retention purge erases
    it whole, memo and key included, as idle. The purge judges idleness by the chain's head entry
    as well: only the expired rounds go, the memo written today stays, and verification passes."""
    from tests.evidence.conftest import run_cli

    gw, tables = db_gateway
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 100 * 86400)
    record(gw, "active", 2)
    monkeypatch.setattr(time, "time", real)
    memo = httpx.put(f"{gw.base_url}/sessions/active/memo", json={"memo": "written today"},
                     headers={"Authorization": f"Bearer {ACME_KEY}"})
    assert memo.status_code == 200, memo.text
    tables.sql("UPDATE sessions SET updated_at=0 WHERE session_id='active'")

    code, out, err = run_cli("--config", str(gw.config_path), "purge")
    assert code == 0 and "purged 2 expired rounds; erased 0 sessions" in out, (out, err)
    kept = httpx.get(f"{gw.base_url}/sessions/active/memo", headers={"Authorization": f"Bearer {ACME_KEY}"})
    assert kept.status_code == 200 and kept.json()["memo"] == "written today"
    code, out = verify(gw)
    assert code == 0, out


def test_a_whole_session_purge_of_an_active_session_fails_verification(db_gateway: tuple[Gateway, Tables],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A purge entry that erased a session whole although the chain shows a write within the
    purged rounds' retention (as the purge before this fix did after an edited row time) fails as
    purge_premature, judged by the entries, not by the cut-off the purge entry states."""
    import asyncio

    from gateway.cli import _with_sessions
    from gateway.sessions import SessionService
    from gateway.settings import load_settings

    gw, tables = db_gateway
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 100 * 86400)
    record(gw, "active", 2)
    monkeypatch.setattr(time, "time", real)
    assert httpx.put(f"{gw.base_url}/sessions/active/memo", json={"memo": "written today"},
                     headers={"Authorization": f"Bearer {ACME_KEY}"}).status_code == 200
    settings = load_settings(gw.config_path)

    async def purge_as_if_idle(svc: SessionService) -> None:
        rounds = [(row.seq, messages) async for row, messages in svc.decrypted_rounds("acme", "active")]
        await svc.drop_rounds("acme", "active", rounds, policy_id="default", erase_if_idle_before=real() + 60)

    asyncio.run(_with_sessions(settings, purge_as_if_idle))
    assert tables.sql("SELECT count(*) FROM sessions WHERE session_id='active'") == [(0,)]
    code, out = verify(gw)
    assert code == 1 and "purge_premature" in out and "session active: purge entry" in out, out
    assert "erased it whole" in out, out


def test_a_state_row_moved_into_a_session_that_records_nothing_is_found(recorded: tuple[Gateway, Tables]) -> None:
    """A session under the record-nothing policy has audit entries that never bind rows; alice's
    state row and data key copied there are ``state_unrecorded`` (the chain was written by a
    gateway that binds every write), not a note about sessions from before bindings (probe F3)."""
    gw, tables = recorded
    assert chat(gw, "private:x", "off the record").status_code == 200
    assert tables.sql("SELECT count(*) FROM sessions WHERE session_id='private:x'") == [(0,)]
    code, out = verify(gw)
    assert code == 0 and "before state bindings" not in out, out
    tables.sql("INSERT INTO sessions (tenant, session_id, version, next_seq, state_ct, created_at, updated_at) "
               "SELECT tenant, 'private:x', version, next_seq, state_ct, created_at, updated_at FROM sessions "
               "WHERE tenant='acme' AND session_id='alice'")
    tables.sql("INSERT INTO data_keys (tenant, session_id, dk_id, kek_id, wrapped, created_at) "
               "SELECT tenant, 'private:x', dk_id, kek_id, wrapped, created_at FROM data_keys "
               "WHERE tenant='acme' AND session_id='alice'")
    code, out = verify(gw)
    assert code == 1, out
    assert "state_unrecorded" in out and "tenant acme, session private:x" in out, out
    assert "before state bindings" not in out, out


def test_every_problem_of_a_tenant_is_reported_not_only_the_first(recorded: tuple[Gateway, Tables]) -> None:
    """A cheap planted problem (a quarantine mark set on alice) does not hide the others: a round
    of bystander deleted and a state row moved into a new session are reported too, each kind
    with its count, by the CLI and ``/admin/audit/verify``; the exit code stays 1 (probe F5)."""
    gw, tables = recorded
    record(gw, "carol", 2)
    (seq,) = tables.sql("SELECT max(seq) FROM audit WHERE tenant='acme'")[0]
    tables.sql("UPDATE session_heads SET quarantined_seq=?, quarantine_reason='planted' "
               "WHERE tenant='acme' AND session_id='alice'", seq)
    tables.sql("DELETE FROM rounds WHERE tenant='acme' AND session_id='bystander' AND seq=1")
    tables.sql("DELETE FROM rounds WHERE tenant='acme' AND session_id='carol'")
    code, out = verify(gw)
    assert code == 1, out
    assert "FAIL tenant acme" in out and "quarantine_unrecorded" in out and "session alice" in out, out
    assert "also: round_missing" in out and "session bystander, round 1" in out, out
    assert "session carol, round 1" in out and "session carol, round 2" in out, out
    resp = httpx.get(f"{gw.url}/admin/audit/verify", params={"tenant": "acme"}, timeout=30,
                     headers={"Authorization": f"Bearer {AUDITOR_TOKEN}"})
    report = resp.json()
    assert report["first_error"]["kind"] == "quarantine_unrecorded", report
    assert report["counts"] == {"quarantine_unrecorded": 1, "round_missing": 3}, report
    assert [(e["kind"], e["session_id"], e.get("round_seq")) for e in report["errors"]] == [
        ("round_missing", "bystander", 1), ("round_missing", "carol", 1), ("round_missing", "carol", 2)], report
