"""Auditors over HTTP and the CLI: role separation, verifiable exports, tamper detection."""

from __future__ import annotations

import io
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import orjson

from gateway.export import verify_bundle
from tests.conftest import ACME_KEY, AUDITOR_TOKEN, GLOBEX_KEY

AUDITOR = {"Authorization": f"Bearer {AUDITOR_TOKEN}"}


def chat(gw, key: str, session: str, text: str) -> None:
    gw.openai(key=key, session=session).chat.completions.create(
        model="standin", messages=[{"role": "user", "content": text}])


def cli(gw, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "--config", str(gw.config_path), *args],
                          capture_output=True, text=True, timeout=120)


def test_roles_are_separated_both_ways(gateway) -> None:
    """A client key gets 403 on /admin (a throttled route); an auditor token on model and session
    routes, which are not throttled, is answered exactly as an unknown key, so they test no guess."""
    r = httpx.get(f"{gateway.url}/admin/audit/verify?tenant=acme", headers={"Authorization": f"Bearer {ACME_KEY}"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    chat_body = {"model": "standin", "messages": [{"role": "user", "content": "hi"}]}
    unknown = {"Authorization": "Bearer sg-not-a-key-of-this-gateway"}
    for route in ("/chat/completions", "/responses", "/messages"):
        r = httpx.post(f"{gateway.base_url}{route}", headers=AUDITOR, json=chat_body)
        guess = httpx.post(f"{gateway.base_url}{route}", headers=unknown, json=chat_body)
        assert (r.status_code, r.content) == (guess.status_code, guess.content) and r.status_code == 401, route
    r = httpx.get(f"{gateway.base_url}/sessions", headers=AUDITOR)
    assert (r.status_code, r.content) == (401, httpx.get(f"{gateway.base_url}/sessions", headers=unknown).content)
    assert httpx.get(f"{gateway.url}/admin/export?tenant=acme").status_code == 401


def test_admin_refusals_name_the_auditor_token_and_where_it_goes(gateway) -> None:
    """/admin's 401s are written for auditors: no token names the auditor token and the
    Authorization header (not a client key); an auditor token sent in x-api-key is told to go in
    Authorization (it was reported as missing); an unknown token is an unknown auditor token."""
    url = f"{gateway.url}/admin/public-key"
    missing = httpx.get(url).json()["error"]["message"]
    assert "auditor token" in missing and "Authorization: Bearer <auditor token>" in missing
    assert "gateway key" not in missing
    in_api_key = httpx.get(url, headers={"x-api-key": AUDITOR_TOKEN})
    assert in_api_key.status_code == 401
    assert "Authorization: Bearer <auditor token>" in in_api_key.json()["error"]["message"]
    assert "x-api-key" in in_api_key.json()["error"]["message"] and "missing" not in in_api_key.text
    unknown = httpx.get(url, headers={"Authorization": "Bearer sg-not-a-token"}).json()["error"]["message"]
    assert unknown.startswith("unknown auditor token") and "clients new" not in unknown
    assert httpx.get(url, headers=AUDITOR).status_code == 200


def test_http_export_verifies_offline_and_is_itself_audited(gateway, tmp_path: Path) -> None:
    """An auditor's export is a tar bundle that verifies with only the public key, and is an audit entry."""
    chat(gateway, ACME_KEY, "alice", "mail me at alice@example.com")  # the default policy: e-mails hashed
    chat(gateway, GLOBEX_KEY, "globex:bob", "other tenant")
    public_key = httpx.get(f"{gateway.url}/admin/public-key", headers=AUDITOR).content
    r = httpx.get(f"{gateway.url}/admin/export?tenant=acme&format=jsonl", headers=AUDITOR, timeout=30)
    assert r.status_code == 200, r.text
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        tar.extractall(tmp_path, filter="data")
    records = tmp_path / "acme-export.jsonl"
    lines = [orjson.loads(line) for line in records.read_bytes().splitlines()]
    assert [rec["session_id"] for rec in lines] == ["alice"]  # globex's rounds are not in acme's export
    assert "alice@example.com" not in records.read_text() and "pseud:" in records.read_text()
    report = verify_bundle(records, public_key)
    assert report.ok, report.summary()
    verify = httpx.get(f"{gateway.url}/admin/audit/verify?tenant=acme", headers=AUDITOR).json()
    assert verify["ok"] and verify["entries"] >= 2  # the round and the export entry
    events = [orjson.loads(row[0])["event"] for row in sqlite3.connect(gateway.db_path).execute(
        "SELECT body FROM audit WHERE tenant='acme' ORDER BY seq")]
    assert events == ["round", "export"]


def test_offline_bundle_check_catches_an_edited_record(gateway, tmp_path: Path) -> None:
    """Changing one exported record makes the offline check fail."""
    chat(gateway, ACME_KEY, "acme:carol", "hello")
    out = tmp_path / "e.jsonl"
    assert cli(gateway, "export", "--tenant", "acme", "--out", str(out)).returncode == 0
    (tmp_path / "pub.pem").write_text(cli(gateway, "audit", "public-key").stdout)
    ok = cli(gateway, "audit", "verify", "--bundle", str(out), "--public-key", str(tmp_path / "pub.pem"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    out.write_text(out.read_text().replace("hello", "HELLO"))
    bad = cli(gateway, "audit", "verify", "--bundle", str(out), "--public-key", str(tmp_path / "pub.pem"))
    assert bad.returncode == 1 and "FAIL" in bad.stdout


def test_cli_verify_reports_an_edited_audit_entry(gateway) -> None:
    """Editing an audit entry in the database is caught and the broken entry is named."""
    for i in range(3):
        chat(gateway, ACME_KEY, "acme:dave", f"round {i}")
    assert cli(gateway, "audit", "verify", "--tenant", "acme").returncode == 0
    db = sqlite3.connect(gateway.db_path)
    body = db.execute("SELECT body FROM audit WHERE tenant='acme' AND seq=2").fetchone()[0]
    db.execute("UPDATE audit SET body=? WHERE tenant='acme' AND seq=2", (body.replace(b"completed", b"refused__"),))
    db.commit()
    proc = cli(gateway, "audit", "verify", "--tenant", "acme")
    assert proc.returncode == 1
    assert "seq 2" in proc.stdout and "edited" in proc.stdout


def test_erased_session_leaves_the_chain_verifiable(gateway) -> None:
    """After a session is erased the tenant's audit chain still verifies (it hashes ciphertext)."""
    chat(gateway, ACME_KEY, "acme:erin", "to be forgotten")
    chat(gateway, ACME_KEY, "acme:frank", "to be kept")
    r = httpx.delete(f"{gateway.base_url}/sessions/acme:erin", headers={"Authorization": f"Bearer {ACME_KEY}"})
    assert r.status_code == 200
    verify = httpx.get(f"{gateway.url}/admin/audit/verify?tenant=acme", headers=AUDITOR).json()
    assert verify["ok"] and verify["entries"] == 3, verify


def test_a_key_as_the_tenant_parameter_is_refused_without_an_echo(gateway) -> None:
    """``?tenant=<a client key>`` on an admin route used to answer "no tenant '<the key>'": the
    error echoed a key. It is 400 ``key_in_url`` now, and the key is in neither body nor log."""
    for route in ("/admin/export?tenant={}&format=jsonl", "/admin/audit/verify?tenant={}"):
        r = httpx.get(gateway.url + route.format(GLOBEX_KEY), headers=AUDITOR, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "key_in_url", r.text
        assert GLOBEX_KEY not in r.text
    assert GLOBEX_KEY not in gateway.log_path.read_text()


def test_policy_explain_shows_exact_recording(tmp_path: Path) -> None:
    """`policy explain` names the matching policy and prints exactly what would be recorded."""
    request = tmp_path / "req.json"
    request.write_bytes(orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": orjson.dumps(
        {"ticket_id": "T-1001", "intent": "refund", "raw_text": "call 555-0100"}).decode()}]}))
    reply = tmp_path / "reply.json"
    reply.write_bytes(orjson.dumps({"resolution": "refunded", "risk_level": "low", "notes": "secret"}))
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "gateway", "--config", str(repo / "config/sessiongate.yaml"),
                           "policy", "explain", "--request", str(request), "--reply", str(reply),
                           "--tenant", "acme", "--session", "support:7", "--policies", str(repo / "policies")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "id: support-tickets" in proc.stdout
    assert "[input.ticket_id]:\n    T-1001\n    [input.intent]:\n    refund" in proc.stdout
    assert "raw_text" not in proc.stdout.split("recorded:")[1].split("injected:")[0]
    assert "secret" not in proc.stdout.split("recorded:")[1].split("injected:")[0]
