"""What finds a round whose ciphertext was edited in place (README "Audit trail and auditor exports").

The check on load compares the state row, the round count and the highest round seq with the
chain; it does not read round ciphertexts (that would read the whole session on every request).
An edited or swapped ciphertext is found by ``audit verify`` and fails to decrypt when the round
is opened; a chat request, which sends the window from the state row, is still served. These
tests pin exactly that, so the README's description stays true.
"""

from __future__ import annotations

import httpx

from tests.conftest import AUDITOR_TOKEN, Gateway
from tests.evidence.conftest import Tables, verify
from tests.evidence.test_tamper_data import INTEGRITY, chat, read, record


def test_a_swapped_round_ciphertext_is_found_by_verify_and_by_a_read(db_gateway: tuple[Gateway, Tables]) -> None:
    """Round 1's ciphertext copied over round 2: verify names round 2 (round_mismatch); a chat is
    served (the load check does not read rounds); a read of the history gets the integrity error
    and quarantines the session, so the next chat is refused."""
    gw, tables = db_gateway
    record(gw, "alice", 3)
    (ct,) = tables.sql("SELECT ct FROM rounds WHERE tenant='acme' AND session_id='alice' AND seq=1")[0]
    tables.sql("UPDATE rounds SET ct=? WHERE tenant='acme' AND session_id='alice' AND seq=2", bytes(ct))
    code, out = verify(gw)
    assert code == 1 and "round_mismatch" in out and "tenant acme, session alice, round 2" in out, out
    assert chat(gw, "alice", "served: the check on load does not read round ciphertexts").status_code == 200
    resp = read(gw, "alice")
    assert resp.status_code == 500 and resp.json() == {"error": INTEGRITY}, resp.text
    assert tables.sql("SELECT quarantined_seq FROM session_heads WHERE tenant='acme' "
                      "AND session_id='alice'")[0][0] is not None
    resp = chat(gw, "alice", "refused now")
    assert resp.status_code == 500 and resp.json() == {"error": INTEGRITY}, resp.text


def test_a_swapped_round_ciphertext_found_by_an_export_quarantines_the_session(
        db_gateway: tuple[Gateway, Tables]) -> None:
    """An auditor's export that meets a round failing to open refuses (the integrity error) and
    quarantines the session, as any other read does: the next chat is refused, not served on."""
    gw, tables = db_gateway
    record(gw, "alice", 3)
    (ct,) = tables.sql("SELECT ct FROM rounds WHERE tenant='acme' AND session_id='alice' AND seq=1")[0]
    tables.sql("UPDATE rounds SET ct=? WHERE tenant='acme' AND session_id='alice' AND seq=2", bytes(ct))
    headers = {"Authorization": f"Bearer {AUDITOR_TOKEN}"}
    resp = httpx.get(f"{gw.url}/admin/export", params={"tenant": "acme", "format": "jsonl"}, headers=headers,
                     timeout=30)
    assert resp.status_code == 500 and resp.json()["error"]["code"] == "integrity_check_failed", resp.text
    said = resp.json()["error"]["message"]  # the auditor is told what failed, as the CLI would say
    assert said.startswith("the export stopped: ") and "round record seq 2" in said, said
    assert "sessiongate audit verify --tenant acme" in said, said
    assert tables.sql("SELECT quarantined_seq FROM session_heads WHERE tenant='acme' "
                      "AND session_id='alice'")[0][0] is not None
    resp = chat(gw, "alice", "refused now")
    assert resp.status_code == 500 and resp.json() == {"error": INTEGRITY}, resp.text
