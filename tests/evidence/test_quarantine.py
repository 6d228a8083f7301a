"""A session that failed an integrity check is quarantined until an operator acts (issue 10 §2).

After a round's ciphertext is damaged, a read fails; from then on a new chat on that session is
refused with the same integrity error before anything reaches the upstream, and each refusal is
an audit entry. The quarantine is stored: another gateway process on the same database (a
restart, a replica) refuses too. ``sessiongate sessions release`` (audited) or an erasure lifts it.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.conftest import ACME_KEY, Gateway, Upstream, wait_for
from tests.evidence.conftest import Tables, run_cli, verify
from tests.evidence.test_tamper_data import INTEGRITY, chat, entries, read, record


def damage_round(tables: Tables, session: str, seq: int) -> bytes:
    """Flip one byte of the round's ciphertext; returns the original bytes."""
    (ct,) = tables.sql("SELECT ct FROM rounds WHERE tenant='acme' AND session_id=? AND seq=?", session, seq)[0]
    ct = bytes(ct)
    bad = ct[:20] + bytes([ct[20] ^ 1]) + ct[21:]
    tables.sql("UPDATE rounds SET ct=? WHERE tenant='acme' AND session_id=? AND seq=?", bad, session, seq)
    return ct


def events(tables: Tables, session: str) -> list[str]:
    return [e["event"] for e in entries(tables) if e.get("session_id") == session]


def assert_integrity(resp: httpx.Response) -> None:
    assert resp.status_code == 500 and resp.json() == {"error": INTEGRITY}, resp.text


def test_damaged_session_refuses_new_rounds_until_released(db_gateway: tuple[Gateway, Tables], upstream: Upstream,
                                                            make_gateway: Any) -> None:
    """Read fails → quarantined; chats are refused (each a refusal entry, no upstream call, no
    round stored), also by a second gateway on the same database; release lifts it."""
    gw, tables = db_gateway
    record(gw, "victim", 2)
    record(gw, "bystander", 1)
    original = damage_round(tables, "victim", 1)

    assert_integrity(read(gw, "victim"))
    assert events(tables, "victim")[-1] == "quarantine"
    calls = len(upstream.requests)
    assert_integrity(chat(gw, "victim", "one more"))
    assert_integrity(chat(gw, "victim", "and another"))
    assert len(upstream.requests) == calls  # refused before the upstream
    assert events(tables, "victim")[-2:] == ["refusal", "refusal"]
    assert tables.sql("SELECT count(*) FROM rounds WHERE tenant='acme' AND session_id='victim'")[0][0] == 2
    assert chat(gw, "bystander", "fine?").status_code == 200

    other = make_gateway(name="gw", **tables.overrides())  # another process on the same files: a restart or a replica
    assert_integrity(chat(other, "victim", "from the replica"))
    assert events(tables, "victim")[-1] == "refusal"

    # the operator repairs the row from a backup and releases the session (audited)
    tables.sql("UPDATE rounds SET ct=? WHERE tenant='acme' AND session_id='victim' AND seq=1", original)
    code, out, err = run_cli("--config", str(gw.config_path), "sessions", "release", "--tenant", "acme", "victim")
    assert code == 0, err
    assert "released acme/victim" in out and "round record seq 1" in out
    release = [e for e in entries(tables) if e["event"] == "release"][-1]
    assert release["session_id"] == "victim" and "round record seq 1" in release["detail"]["reason"]
    assert chat(gw, "victim", "back again").status_code == 200
    assert chat(other, "victim", "and here").status_code == 200
    assert read(gw, "victim").status_code == 200
    code, out = verify(gw)
    assert code == 0, out  # quarantined, then released through the gateway: the store agrees with the chain


def test_a_quarantine_lifted_by_hand_fails_verification(db_gateway: tuple[Gateway, Tables]) -> None:
    """An operator who restores the row and clears the mark in the database, instead of
    ``sessions release``, serves the session again with no release entry: verification says so."""
    gw, tables = db_gateway
    record(gw, "victim", 2)
    original = damage_round(tables, "victim", 1)
    assert_integrity(read(gw, "victim"))
    quarantine = [e for e in entries(tables) if e["event"] == "quarantine"][-1]["seq"]
    tables.sql("UPDATE rounds SET ct=? WHERE tenant='acme' AND session_id='victim' AND seq=1", original)
    tables.sql("UPDATE session_heads SET quarantined_seq=NULL, quarantine_reason=NULL "
               "WHERE tenant='acme' AND session_id='victim'")
    assert chat(gw, "victim", "served again").status_code == 200
    code, out = verify(gw)
    assert code == 1, out
    assert "quarantine_lifted" in out and "tenant acme, session victim" in out, out
    assert f"audit entry {quarantine} quarantined the session" in out, out


def test_a_quarantine_mark_set_by_hand_fails_verification(db_gateway: tuple[Gateway, Tables]) -> None:
    """A mark no quarantine entry put there refuses a healthy session's rounds: verification
    names it as a change made outside the gateway."""
    gw, tables = db_gateway
    record(gw, "healthy", 1)
    (seq,), = tables.sql("SELECT max(seq) FROM audit WHERE tenant='acme'")
    tables.sql("UPDATE session_heads SET quarantined_seq=?, quarantine_reason='forged' "
               "WHERE tenant='acme' AND session_id='healthy'", seq)
    assert_integrity(chat(gw, "healthy", "refused now"))
    code, out = verify(gw)
    assert code == 1, out
    assert "quarantine_unrecorded" in out and "tenant acme, session healthy" in out, out


def test_failed_state_check_quarantines_every_write(db_gateway: tuple[Gateway, Tables]) -> None:
    """A session whose rows do not match the chain refuses import and reset as well as chat."""
    gw, tables = db_gateway
    record(gw, "victim", 2)
    tables.sql("DELETE FROM rounds WHERE tenant='acme' AND session_id='victim' AND seq=1")
    assert_integrity(chat(gw, "victim", "hello?"))
    assert "quarantine" in events(tables, "victim")
    headers = {"Authorization": f"Bearer {ACME_KEY}"}
    assert_integrity(httpx.post(f"{gw.base_url}/sessions/victim/reset", headers=headers))
    doc = {"id": "victim", "full_context": []}
    assert_integrity(httpx.put(f"{gw.base_url}/sessions/victim", headers=headers, json=doc))
    assert events(tables, "victim")[-2:] == ["refusal", "refusal"]


def test_erasure_ends_the_quarantine(gateway: Gateway) -> None:
    """Erasing a quarantined session is the other operator action: the id starts afresh."""
    tables = Tables("sqlite", gateway)
    record(gateway, "victim", 1)
    damage_round(tables, "victim", 1)
    assert_integrity(read(gateway, "victim"))
    assert_integrity(chat(gateway, "victim", "refused"))
    code, _, err = run_cli("--config", str(gateway.config_path), "sessions", "erase", "--tenant", "acme", "victim")
    assert code == 0, err
    assert chat(gateway, "victim", "a new start").status_code == 200
    assert [m["content"] for m in read(gateway, "victim").json()["full_context"] if m["role"] == "user"] == \
        ["a new start"]


def test_release_of_a_healthy_session_is_refused(gateway: Gateway) -> None:
    """``sessions release`` on a session that is not quarantined changes nothing and exits 2."""
    record(gateway, "fine", 1)
    code, _, err = run_cli("--config", str(gateway.config_path), "sessions", "release", "--tenant", "acme", "fine")
    assert code == 2 and "not quarantined" in err
    tables = Tables("sqlite", gateway)
    assert "release" not in [e["event"] for e in entries(tables)]


def test_missing_master_key_does_not_quarantine(gateway: Gateway) -> None:
    """The key file loses the master key that wraps a session's data key (the operator's mistake;
    the rows are the ones the chain records): reads and chats fail, but nothing is quarantined,
    verification passes with a note, and the session works again once the key file is back. (An
    edit of the row's master key id in the database instead is damage: test_data_key_relabel.)"""
    tables = Tables("sqlite", gateway)
    record(gateway, "orphan", 1)
    key_file = gateway.dir / "master-keys.json"
    kept = key_file.read_text()
    doc = json.loads(kept)
    doc["keys"] = [{**doc["keys"][0], "id": "mk-20990101-0000", "key": "A" * 43 + "="}]
    key_file.write_text(json.dumps(doc))
    wait_for(lambda: read(gateway, "orphan").status_code == 500)  # the gateway follows the key file
    assert_integrity(chat(gateway, "orphan", "refused"))
    assert "quarantine" not in events(tables, "orphan") and "refusal" not in events(tables, "orphan")
    code, out = verify(gateway)
    assert code == 0, out
    assert "1 session(s) have data keys wrapped by a master key the key file lacks or has retired" in out, out
    key_file.write_text(kept)
    wait_for(lambda: read(gateway, "orphan").status_code == 200)
    assert chat(gateway, "orphan", "still mine").status_code == 200


def test_a_session_that_fails_to_open_is_quarantined_once(db_gateway: tuple[Gateway, Tables]) -> None:
    """A round that fails to open quarantines its session with one entry: the reads and chats
    after it are refusals, each a ``refusal`` entry (each read wrote another ``quarantine``)."""
    gw, tables = db_gateway
    record(gw, "victim", 2)
    damage_round(tables, "victim", 1)
    for resp in (read(gw, "victim"), read(gw, "victim"), chat(gw, "victim", "x"), read(gw, "victim")):
        assert_integrity(resp)
    assert events(tables, "victim")[2:] == ["quarantine", "refusal", "refusal", "refusal"], events(tables, "victim")
    (marked,), = tables.sql("SELECT quarantined_seq FROM session_heads WHERE tenant='acme' AND session_id='victim'")
    assert marked == [e for e in entries(tables) if e["event"] == "quarantine"][0]["seq"]
    code, out = verify(gw)
    assert code == 1 and "round_mismatch" in out, out
