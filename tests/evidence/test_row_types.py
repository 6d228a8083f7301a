"""A value of a type the gateway never writes in its column is an altered row, not a crash.

SQLite keeps whatever an edit puts in a column: ``replace()`` on a blob returns text, and
``created_at='yesterday'`` stays text. Such an edit used to crash ``audit verify`` with a Python
traceback naming nothing (the tenants after it unchecked), made ``/admin/audit/verify`` and
``/admin/export`` answer 500 ``internal_error``, and a request on the session 500
``internal_error`` without quarantine. The stores now check each row's value types as they read
it (``gateway.evidence.typed``): verification names the row and the column and goes on to the
next tenant, and the session paths take it as an integrity failure.
"""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import AUDITOR_TOKEN, GLOBEX_KEY, Gateway
from tests.evidence.conftest import Tables, verify
from tests.evidence.test_tamper_data import INTEGRITY, chat, read, record

EDITS = {
    "audit.body": ("UPDATE audit SET body=replace(body, '\"completed\"', '\"failed\"') WHERE tenant='acme' AND seq=2",
                   "edited at seq 2: tenant acme, audit entry 2: its audit row holds text in column body"),
    "rounds.ct": ("UPDATE rounds SET ct='hello' WHERE tenant='acme' AND session_id='alice' AND seq=1",
                  "round_mismatch: tenant acme, session alice, round 1: its rounds row holds text in column ct"),
    "rounds.created_at": ("UPDATE rounds SET created_at='yesterday' WHERE tenant='acme' AND session_id='alice' "
                          "AND seq=1", "round_relabelled: tenant acme, session alice, round 1: its rounds row holds "
                          "text in column created_at, where the gateway stores a number"),
    "sessions.state_ct": ("UPDATE sessions SET state_ct='hello' WHERE tenant='acme' AND session_id='alice'",
                          "state_mismatch: tenant acme, session alice: its sessions row holds text in column state_ct"),
    "data_keys.wrapped": ("UPDATE data_keys SET wrapped='abc' WHERE tenant='acme' AND session_id='alice'",
                          "data_key_altered: tenant acme, session alice: its data_keys row holds text in column "
                          "wrapped"),
}


@pytest.fixture
def recorded(gateway: Gateway) -> tuple[Gateway, Tables]:
    """acme's alice (2 rounds, entries 1 and 2) and bystander, globex's bob; all verify."""
    tables = Tables("sqlite", gateway)
    record(gateway, "alice", 2)
    record(gateway, "bystander", 1)
    assert chat(gateway, "globex:bob", "hello", key=GLOBEX_KEY).status_code == 200
    code, out = verify(gateway)
    assert code == 0, out
    return gateway, tables


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_verify_names_the_row_and_column_and_goes_on(recorded: tuple[Gateway, Tables], edit: str) -> None:
    """``audit verify`` reports the edited row with its column (exit 1, no traceback) and still
    checks the tenant after it."""
    gw, tables = recorded
    statement, expected = EDITS[edit]
    tables.sql(statement)
    code, out = verify(gw)
    assert code == 1, out
    assert "Traceback" not in out and expected in out, out
    assert "OK   tenant globex" in out, out


@pytest.mark.parametrize("edit", ["audit.body", "sessions.state_ct", "data_keys.wrapped"])
def test_a_request_on_the_session_is_refused_and_quarantines_it(recorded: tuple[Gateway, Tables], edit: str) -> None:
    """A chat on the session gets 500 ``integrity_check_failed`` (not ``internal_error``), the
    session is quarantined with a ``quarantine`` entry, and the next request is a refusal."""
    gw, tables = recorded
    if edit == "audit.body":  # alice's head entry, which the load check reads
        head = tables.sql("SELECT bound_seq FROM session_heads WHERE tenant='acme' AND session_id='alice'")[0][0]
        tables.sql("UPDATE audit SET body=CAST(body AS TEXT) WHERE tenant='acme' AND seq=?", head)
    else:
        tables.sql(EDITS[edit][0])
    resp = chat(gw, "alice", "and now?")
    assert resp.status_code == 500 and resp.json() == {"error": INTEGRITY}, resp.text
    ((quarantined,),) = tables.sql("SELECT quarantined_seq FROM session_heads WHERE tenant='acme' "
                                   "AND session_id='alice'")
    assert quarantined is not None
    events = tables.sql("SELECT json_extract(CAST(body AS TEXT), '$.event') FROM audit WHERE tenant='acme' "
                        "AND json_extract(CAST(body AS TEXT), '$.session_id')='alice' ORDER BY seq")
    assert events[-1] == ("quarantine",), events
    resp = chat(gw, "alice", "again?")
    assert resp.status_code == 500 and resp.json() == {"error": INTEGRITY}, resp.text
    assert chat(gw, "bystander", "still fine?").status_code == 200


def test_a_read_of_a_session_whose_round_holds_text_is_an_integrity_failure(recorded: tuple[Gateway, Tables]) -> None:
    """Reading the session (its rounds) gets the integrity error and quarantines it."""
    gw, tables = recorded
    tables.sql(EDITS["rounds.ct"][0])
    resp = read(gw, "alice")
    assert resp.status_code == 500 and resp.json() == {"error": INTEGRITY}, resp.text
    assert tables.sql("SELECT quarantined_seq FROM session_heads WHERE tenant='acme' "
                      "AND session_id='alice'")[0][0] is not None


def test_the_admin_routes_report_it_instead_of_an_internal_error(recorded: tuple[Gateway, Tables]) -> None:
    """``/admin/audit/verify`` answers the report naming the entry; ``/admin/export`` the
    integrity error, never 500 ``internal_error``."""
    gw, tables = recorded
    tables.sql(EDITS["audit.body"][0])
    headers = {"Authorization": f"Bearer {AUDITOR_TOKEN}"}
    resp = httpx.get(f"{gw.url}/admin/audit/verify", params={"tenant": "acme"}, headers=headers, timeout=30)
    assert resp.status_code == 200, resp.text
    error = resp.json()["first_error"]
    assert error["kind"] == "edited" and error["seq"] == 2 and "column body" in error["message"], error
    resp = httpx.get(f"{gw.url}/admin/export", params={"tenant": "acme"}, headers=headers, timeout=30)
    assert resp.status_code == 500 and resp.json()["error"]["code"] == "integrity_check_failed", resp.text


# Text that is not UTF-8 makes sqlite3 fail the whole query (quoting the bytes): every read of the
# session or the tenant was a 503 "retry later" for good, and `audit verify` stopped with exit 2.
NOT_UTF8 = {
    "rounds.request_id": ("UPDATE rounds SET request_id=CAST(x'ff00fe' AS TEXT) WHERE tenant='acme' "
                          "AND session_id='alice' AND seq=1",
                          "round_relabelled: tenant acme, session alice, round 1: its rounds row holds a blob (or "
                          "text that is not UTF-8) in column request_id"),
    "data_keys.kek_id": ("UPDATE data_keys SET kek_id=CAST(x'ff00fe' AS TEXT) WHERE tenant='acme' "
                         "AND session_id='alice'",
                         "data_key_altered: tenant acme, session alice: its data_keys row holds a blob (or text "
                         "that is not UTF-8) in column kek_id"),
    "policy_versions.document": ("UPDATE policy_versions SET document=CAST(x'ff' AS TEXT) WHERE policy_id='default'",
                                 "policy_version_altered at seq 1: tenant acme, session alice, round 1"),
    "policy_versions.not_a_policy": ("UPDATE policy_versions SET document='[]', hash="
                                     "'4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945' "
                                     "WHERE policy_id='default'",
                                     "policy_version_missing"),
}


@pytest.mark.parametrize("edit", sorted(NOT_UTF8))
def test_text_that_is_not_utf8_or_not_a_policy_is_an_altered_row(recorded: tuple[Gateway, Tables], edit: str) -> None:
    """Verification names the row (exit 1, no traceback, later tenants checked); an export answers
    the integrity error, never 503 ``store_unavailable`` or 500 ``internal_error``; nothing the
    gateway says repeats the stored bytes."""
    gw, tables = recorded
    statement, expected = NOT_UTF8[edit]
    tables.sql(statement)
    code, out = verify(gw)
    assert code == 1 and "Traceback" not in out and expected in out, out
    assert "OK   tenant globex" in out and "Could not decode" not in out, out
    headers = {"Authorization": f"Bearer {AUDITOR_TOKEN}"}
    resp = httpx.get(f"{gw.url}/admin/export", params={"tenant": "acme"}, headers=headers, timeout=30)
    assert resp.status_code == 500 and resp.json()["error"]["code"] == "integrity_check_failed", resp.text
    assert resp.json()["error"]["message"].startswith("the export stopped: "), resp.text
    if edit.startswith("rounds") or edit.startswith("data_keys"):
        resp = read(gw, "alice")
        assert resp.status_code == 500 and resp.json() == {"error": INTEGRITY}, resp.text
    assert "\ufffd" not in gw.log_path.read_text(errors="replace"), "the log repeats undecodable stored bytes"
