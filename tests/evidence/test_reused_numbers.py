"""A round number or state version the chain records twice is found (SPEC §3), on SQLite and PostgreSQL.

A session numbers its rounds up from 1 and every write makes the next state version; only an
erasure (or a purge that erases the session whole) starts them again. An operator who deletes
or rolls back a session's rows, head pointer included, evades the check on load, and the next
write then records the same round number or version again. ``audit verify`` used to keep only
the later entry for a round number and said OK; it must name the earlier entry's round.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import ACME_KEY, Gateway
from tests.evidence.conftest import Tables, run_cli, verify
from tests.evidence.test_tamper_data import chat, entries, record


def round_entries(tables: Tables, session: str, round_seq: int) -> list[int]:
    return [e["seq"] for e in entries(tables) if e.get("session_id") == session
            and e["event"] == "round" and e.get("round_seq") == round_seq]


def snapshot(tables: Tables, session: str) -> tuple[tuple, tuple]:
    """The session's state row and head pointer, as a backup holds them."""
    (state,) = tables.sql("SELECT version, next_seq, state_ct, updated_at FROM sessions "
                          "WHERE tenant='acme' AND session_id=?", session)
    (head,) = tables.sql("SELECT bound_seq FROM session_heads WHERE tenant='acme' AND session_id=?", session)
    return state, head


def restore(tables: Tables, session: str, saved: tuple[tuple, tuple]) -> None:
    state, head = saved
    tables.sql("UPDATE sessions SET version=?, next_seq=?, state_ct=?, updated_at=? "
               "WHERE tenant='acme' AND session_id=?", *state, session)
    tables.sql("UPDATE session_heads SET bound_seq=? WHERE tenant='acme' AND session_id=?", *head, session)


def reuse_round_4(gw: Gateway, tables: Tables) -> None:
    """Alice's round 4 recorded, then rolled back with the state and head pointer (as a restore of
    her rows from a backup does), then round 4 recorded again."""
    record(gw, "alice", 3)
    saved = snapshot(tables, "alice")
    assert chat(gw, "alice", "round 4: the one to be hidden").status_code == 200
    tables.sql("DELETE FROM rounds WHERE tenant='acme' AND session_id='alice' AND seq=4")
    restore(tables, "alice", saved)
    assert chat(gw, "alice", "round 4 again: the replacement").status_code == 200


def test_a_round_rolled_back_and_its_number_used_again_is_found(db_gateway: tuple[Gateway, Tables]) -> None:
    """Round 4 rolled back with the state and head pointer, then round 4 recorded again: verify
    names round 4 and the entry whose round is gone (it used to say OK)."""
    gw, tables = db_gateway
    reuse_round_4(gw, tables)
    first, again = round_entries(tables, "alice", 4)
    code, out = verify(gw)
    assert code == 1, out
    assert "round_missing" in out and "tenant acme, session alice, round 4" in out, out
    assert f"audit entry {first} records this round" in out and f"audit entry {again}" in out, out


def test_a_session_wiped_and_written_again_is_found(db_gateway: tuple[Gateway, Tables]) -> None:
    """Every row of a session deleted (no erasure entry), then as many rounds written anew from
    the CLI: verify names round 1 and its first entry, with the auditor's checkpoints too."""
    gw, tables = db_gateway
    record(gw, "alice", 2)
    first = round_entries(tables, "alice", 1)[0]
    for table in ("rounds", "sessions", "data_keys", "session_heads"):
        tables.sql(f"DELETE FROM {table} WHERE tenant='acme' AND session_id='alice'")
    for i in (1, 2):
        path = gw.dir / f"made-up-{i}.json"
        path.write_text(f'[{{"role": "user", "content": "made up {i}"}}]')
        code, out, err = run_cli("--config", str(gw.config_path), "sessions", "add", "--tenant", "acme",
                                 "alice", str(path))
        assert code == 0, out + err
    code, out = verify(gw)
    assert code == 1, out
    assert "round_missing" in out and "tenant acme, session alice, round 1" in out, out
    assert f"audit entry {first} records this round" in out, out


def test_a_state_version_bound_again_is_found(db_gateway: tuple[Gateway, Tables]) -> None:
    """The state row and head pointer put back one write, then written again (a reset, no round):
    the chain binds the same version twice, and verify reports the rollback (it used to say OK,
    the latest binding matching the rows)."""
    gw, tables = db_gateway
    record(gw, "alice", 1)
    headers = {"Authorization": f"Bearer {ACME_KEY}"}
    saved = snapshot(tables, "alice")
    assert httpx.post(f"{gw.base_url}/sessions/alice/reset", headers=headers, timeout=30).status_code == 200
    restore(tables, "alice", saved)
    assert httpx.post(f"{gw.base_url}/sessions/alice/reset", headers=headers, timeout=30).status_code == 200
    first, again = [e["seq"] for e in entries(tables) if e["event"] == "reset"]
    code, out = verify(gw)
    assert code == 1, out
    assert "state_mismatch" in out and "tenant acme, session alice" in out, out
    assert f"audit entry {again} (reset) binds version 2" in out and f"audit entry {first} had already" in out, out


def test_numbers_used_again_after_an_erasure_still_verify(db_gateway: tuple[Gateway, Tables]) -> None:
    """An erasure starts the numbering again: a new session under the erased id verifies."""
    gw, tables = db_gateway
    record(gw, "alice", 2)
    headers = {"Authorization": f"Bearer {ACME_KEY}"}
    assert httpx.delete(f"{gw.base_url}/sessions/alice", headers=headers, timeout=30).status_code in (200, 202)
    record(gw, "alice", 3)
    assert len(round_entries(tables, "alice", 1)) == 2
    code, out = verify(gw)
    assert code == 0, out


def test_a_bundle_exported_after_a_number_was_used_again_fails_offline(db_gateway: tuple[Gateway, Tables],
                                                                        tmp_path: Path) -> None:
    """The offline check of an auditor's bundle kept only the later entry for a round number too,
    so a bundle exported after round 4 was rolled back and recorded again verified OK: it must
    find the earlier entry's round missing."""
    from gateway.export import verify_bundle
    from tests.evidence.test_bundle_completeness import export, public_key
    gw, tables = db_gateway
    reuse_round_4(gw, tables)
    bundle = tmp_path / "after-reuse.jsonl"
    export(gw, bundle, "--session", "alice")
    report = verify_bundle(bundle, public_key(gw, tmp_path))
    assert not report.ok
    assert report.first_error is not None and report.first_error.kind == "record_missing"
    assert "session alice, round 4" in report.first_error.message
