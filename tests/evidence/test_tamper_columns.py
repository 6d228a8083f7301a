"""A round row's plaintext columns and the kept policy versions are evidence too, on SQLite and
PostgreSQL.

A round's ciphertext is bound by its audit entry, but the row also holds plaintext columns that
exports and the console show and select by: its time (an export's range), request id, policy id
and version hash (which redaction and retention govern it) and outcome. An adversary with write
access to the database edits one of them, or deletes or edits the kept policy version a round was
recorded under, while the gateway runs. ``audit verify`` must fail naming tenant, session, round
and the column, and a bundle exported after the edit must fail offline verification.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.export import verify_bundle
from tests.conftest import Gateway
from tests.evidence.conftest import Tables, verify
from tests.evidence.test_bundle_completeness import export, public_key
from tests.evidence.test_tamper_data import record, round_entry_seq

ALICE_2 = "tenant='acme' AND session_id='alice' AND seq=2"


def _other_version(tables: Tables) -> tuple[str, str]:
    """Another kept policy version than the one alice's rounds were recorded under."""
    (used,), = tables.sql(f"SELECT policy_hash FROM rounds WHERE {ALICE_2}")
    rows = tables.sql("SELECT policy_id, hash FROM policy_versions WHERE hash <> ? ORDER BY policy_id", used)
    assert rows, "the gateway keeps one policy version only: nothing to relabel with"
    return rows[0][0], rows[0][1]


EDITS = {
    # column -> (the edit, what verify must name)
    "created_at": ("UPDATE rounds SET created_at = created_at - 3600 WHERE " + ALICE_2, "its time is"),
    "request_id": ("UPDATE rounds SET request_id = 'forged' WHERE " + ALICE_2, "its request_id is 'forged'"),
    "outcome": ("UPDATE rounds SET outcome = 'upstream_error' WHERE " + ALICE_2, "its outcome is 'upstream_error'"),
    "kind": ("UPDATE rounds SET kind = 'import' WHERE " + ALICE_2, "its kind is 'import'"),
}


@pytest.mark.parametrize("column", sorted(EDITS))
def test_an_edited_round_column_fails_verification(db_gateway: tuple[Gateway, Tables], column: str) -> None:
    gw, tables = db_gateway
    record(gw, "alice", 3)
    assert verify(gw)[0] == 0
    statement, named = EDITS[column]
    tables.sql(statement)
    code, out = verify(gw)
    assert code == 1, out
    assert "round_relabelled" in out and "tenant acme, session alice, round 2" in out, out
    assert named in out and f"audit entry {round_entry_seq(tables, 'alice', 2)}" in out, out


def test_a_round_put_under_another_policy_version_fails_verification(db_gateway: tuple[Gateway, Tables]) -> None:
    """Another kept version would redact and retain the round by its rules: the row names it,
    the entry does not."""
    gw, tables = db_gateway
    record(gw, "alice", 3)
    policy_id, version = _other_version(tables)
    tables.sql(f"UPDATE rounds SET policy_hash = ? WHERE {ALICE_2}", version)
    code, out = verify(gw)
    assert code == 1 and "round_relabelled" in out and f"its policy_hash is '{version}'" in out, out
    tables.sql(f"UPDATE rounds SET policy_id = ? WHERE {ALICE_2}", policy_id)
    code, out = verify(gw)
    assert code == 1 and f"its policy_id is '{policy_id}'" in out, out


def test_a_deleted_policy_version_fails_verification(db_gateway: tuple[Gateway, Tables]) -> None:
    """Exports and retention fall back to another version when the recorded one is gone."""
    gw, tables = db_gateway
    record(gw, "alice", 2)
    (used,), = tables.sql("SELECT DISTINCT policy_hash FROM rounds WHERE tenant='acme'")
    tables.sql("DELETE FROM policy_versions WHERE hash = ?", used)
    code, out = verify(gw)
    assert code == 1, out
    assert "policy_version_missing" in out and "tenant acme, session alice, round 1" in out, out
    assert f"version {used[:12]}" in out and "no longer keeps" in out, out


def test_an_edited_policy_version_fails_verification(db_gateway: tuple[Gateway, Tables]) -> None:
    gw, tables = db_gateway
    record(gw, "alice", 2)
    (used,), = tables.sql("SELECT DISTINCT policy_hash FROM rounds WHERE tenant='acme'")
    tables.sql("UPDATE policy_versions SET document = replace(document, '\"export\"', '\"exports\"') WHERE hash = ?",
               used)
    code, out = verify(gw)
    assert code == 1 and "policy_version_altered" in out and "tenant acme, session alice, round 1" in out, out


def test_a_version_no_round_was_recorded_under_may_go(db_gateway: tuple[Gateway, Tables]) -> None:
    """Only the versions rounds name are evidence: deleting another leaves verification green."""
    gw, tables = db_gateway
    record(gw, "alice", 2)
    _, unused = _other_version(tables)
    tables.sql("DELETE FROM policy_versions WHERE hash = ?", unused)
    code, out = verify(gw)
    assert code == 0, out


def test_a_refused_cli_export_prints_one_line_and_no_traceback(db_gateway: tuple[Gateway, Tables],
                                                               tmp_path: Path) -> None:
    """``sessiongate export`` refused midway for integrity (an edited round) says why in one line
    and exits 2; the export's half-read rounds are closed before it returns, not by the event
    loop's shutdown (which printed a traceback, 'aclose(): asynchronous generator is already
    running', before the error: probe F5)."""
    from tests.test_cli_errors import assert_one_line_error, run

    gw, tables = db_gateway
    record(gw, "alice", 3)
    tables.sql(EDITS["request_id"][0])
    out = tmp_path / "refused.jsonl"
    result = run("--config", str(gw.config_path), "export", "--tenant", "acme", "--format", "jsonl", "--out", str(out))
    assert_one_line_error(result, 2, "export refused", "tenant acme, session alice, round 2")
    assert "aclose" not in result.stderr and not out.exists()


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@pytest.mark.parametrize("column", ["created_at", "request_id", "outcome"])
def test_a_bundle_exported_after_an_edit_fails_offline(gateway: Gateway, tmp_path: Path, fmt: str,
                                                       column: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The export refuses the edited row (``gateway.export.RoundLabels``); an exporter without
    that check writes what the row says, the bundle's own audit entries record otherwise, and
    the offline check says which record and column."""
    from gateway.export import RoundLabels
    from tests.evidence.conftest import run_cli

    tables = Tables("sqlite", gateway)
    record(gateway, "alice", 3)
    key = public_key(gateway, tmp_path)
    honest = tmp_path / f"honest.{fmt}"
    export(gateway, honest, "--format", fmt)
    assert verify_bundle(honest, key).ok
    tables.sql(EDITS[column][0])
    edited = tmp_path / f"edited.{fmt}"
    code, _, err = run_cli("--config", str(gateway.config_path), "export", "--tenant", "acme", "--out", str(edited),
                           "--format", fmt)
    assert code == 2 and "tenant acme, session alice, round 2" in err and EDITS[column][1] in err, err
    assert not edited.exists()
    monkeypatch.setattr(RoundLabels, "checked", lambda self, records: records)
    export(gateway, edited, "--format", fmt)
    report = verify_bundle(edited, key)
    assert report.first_error is not None and report.first_error.kind == "record_relabelled", report
    assert "(session alice, round 2)" in report.first_error.message
    assert EDITS[column][1] in report.first_error.message



@pytest.mark.parametrize("field", ["tenant", "created_at", "ciphertext_sha256"])
def test_a_record_without_a_field_the_check_reads_is_malformed(tmp_path: Path, field: str) -> None:
    """Read as malformed where the records are parsed, never a KeyError later (defensive: the
    records' hash, vouched for by the export entry, is checked before)."""
    from gateway.export import _BundleError, _record_refs

    doc = {"tenant": "acme", "session_id": "s", "seq": 1, "created_at": "2026-12-01T00:00:00Z",
           "ciphertext_sha256": "0" * 64, "messages": []}
    del doc[field]
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(doc) + "\n")
    with pytest.raises(_BundleError) as caught:
        list(_record_refs(path, "jsonl"))
    assert caught.value.error.kind == "malformed"
