"""A session's data key row relabelled with another master key id is damage, not a lost key.

An operator with write access to the database (not to the key file) can point a session's data
key at a master key id the key file never held, or at one it retired, and so make the session
unreadable for good without an erasure entry. Every entry that writes a session's rows binds
the data key too (``state.data_key``: its id, master key id and the wrapped bytes' SHA-256, and
a re-wrap is a ``rewrap`` entry), so verification fails such a row (``data_key_altered``) and the
gateway quarantines the session once (a ``quarantine`` entry, then ``refusal`` entries), as for
any other altered row. (A data key the chain vouches for whose master key the key file lacks is
the key file's problem, noted by verification, not quarantined: test_quarantine.)
"""

from __future__ import annotations

import os

from tests.conftest import Gateway
from tests.evidence.conftest import Tables, run_cli, verify
from tests.evidence.test_tamper_data import INTEGRITY, chat, entries, read, record


def events(tables: Tables, session: str) -> list[str]:
    return [e["event"] for e in entries(tables) if e.get("session_id") == session]


def assert_refused_once_quarantined(gw: Gateway, tables: Tables, session: str) -> None:
    """A chat, a read and a chat all get the integrity error: one quarantine, then refusals."""
    for resp in (chat(gw, session, "after"), read(gw, session), chat(gw, session, "again")):
        assert resp.status_code == 500 and resp.json() == {"error": INTEGRITY}, resp.text
    assert events(tables, session)[-3:] == ["quarantine", "refusal", "refusal"], events(tables, session)
    assert chat(gw, "bystander", "fine?").status_code == 200


def test_a_data_key_relabelled_with_an_unknown_master_key_fails_and_quarantines(
        db_gateway: tuple[Gateway, Tables]) -> None:
    """kek_id 'mk-bogus' (never in the key file) with other bytes: verify fails naming it, and the
    session is quarantined (it was a 500 on every request with no entry, and verify passed)."""
    gw, tables = db_gateway
    record(gw, "alice", 2)
    record(gw, "bystander", 1)
    tables.sql("UPDATE data_keys SET kek_id='mk-bogus', wrapped=? WHERE tenant='acme' AND session_id='alice'",
               os.urandom(61))
    code, out = verify(gw)
    assert code == 1, out
    assert "data_key_altered" in out and "tenant acme, session alice" in out and "mk-bogus" in out, out
    assert_refused_once_quarantined(gw, tables, "alice")


def test_a_data_key_relabelled_with_a_retired_master_key_fails(db_gateway: tuple[Gateway, Tables]) -> None:
    """After a rotation (each re-wrap a ``rewrap`` entry; verify passes) and the old key's
    retirement, pointing a session's key row at the retired id fails verification too: the chain
    says which master key wraps it now."""
    gw, tables = db_gateway
    record(gw, "alice", 1)
    record(gw, "bystander", 1)
    (old,), = tables.sql("SELECT kek_id FROM data_keys WHERE tenant='acme' AND session_id='alice'")
    code, out, err = run_cli("--config", str(gw.config_path), "keys", "rotate")
    assert code == 0, err
    assert events(tables, "alice")[-1] == "rewrap"
    code, out, err = run_cli("--config", str(gw.config_path), "keys", "retire", old, "--force")
    assert code == 0, err
    code, out = verify(gw)
    assert code == 0 and "data keys wrapped by a master key" not in out, out

    tables.sql("UPDATE data_keys SET kek_id=?, wrapped=? WHERE tenant='acme' AND session_id='alice'",
               old, os.urandom(61))
    code, out = verify(gw)
    assert code == 1, out
    assert "data_key_altered" in out and "tenant acme, session alice" in out and old in out, out
    assert_refused_once_quarantined(gw, tables, "alice")
