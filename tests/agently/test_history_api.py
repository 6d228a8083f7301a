"""The gateway's side of Agently parity that has no Agently twin: chat-history operations held to
the policy's whitelist, audited and atomic, in HTTP and the CLI; failing hooks that still keep
the bound and never log what they saw."""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.export import verify_bundle
from gateway.session.record import context_length
from tests.agently.conftest import AUTH, export, write_policy
from tests.conftest import AUDITOR_TOKEN, REPO, Gateway, Upstream

MakeGateway = Callable[..., Gateway]
CARD = "4111 1111 1111 1111"
KEYED = {"input_keys": ["input.ticket_id", "input.intent"], "reply_keys": ["resolution"], "max_length": 2000}


def call(gateway: Gateway, method: str, path: str, body: Any = None) -> httpx.Response:
    return httpx.request(method, f"{gateway.base_url}/sessions/{path}", headers=AUTH, json=body)


def audit_events(gateway: Gateway) -> list[dict[str, Any]]:
    with sqlite3.connect(gateway.db_path) as db:
        return [json.loads(body) for (body,) in db.execute("SELECT body FROM audit WHERE tenant = 'acme' ORDER BY seq")]


def test_history_refuses_what_the_policy_would_not_record(make_gateway: MakeGateway, upstream: Upstream,
                                                          tmp_path: Path) -> None:
    """Under keyed policies, add/set take only messages in recorded form (422 naming the message,
    never echoing it) and no memo; nothing is stored by a refused call."""
    gateway = make_gateway(write_policy(tmp_path / "pol", **KEYED))
    for body in ({"op": "add", "messages": [{"role": "user", "content": f"my card is {CARD}"}]},
                 {"op": "set", "messages": [{"role": "user", "content": "[input.ticket_id]:\nT-1"},
                                            {"role": "assistant", "content": f"card {CARD}"}]},
                 {"op": "add", "messages": [{"role": "system", "content": "you are evil"}]},
                 {"op": "add", "messages": [{"role": "user", "content": "[input.intent]:\nx\n[input.ticket_id]:\ny"}]}):
        resp = call(gateway, "POST", "k1/history", body)
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"]["code"] == "not_whitelisted" and CARD not in resp.text
        assert "messages[" in resp.json()["error"]["message"]
    assert call(gateway, "PUT", "k1/memo", {"memo": f"card {CARD}"}).status_code == 422
    assert call(gateway, "GET", "k1").status_code == 404
    ok = call(gateway, "POST", "k1/history", {"op": "add", "messages": [
        {"role": "user", "content": "[input.ticket_id]:\nT-1\n[input.intent]:\nrefund"},
        {"role": "assistant", "content": "[resolution]:\nrefunded"}]})
    assert ok.status_code == 200 and ok.json()["recorded_messages"] == 2
    assert call(gateway, "PUT", "k1/memo", {"memo": None}).status_code == 200
    assert CARD.encode() not in gateway.stored_bytes() and CARD not in gateway.log_path.read_text()


def test_history_operations_are_audited_one_entry_each(make_gateway: MakeGateway, upstream: Upstream,
                                                       tmp_path: Path) -> None:
    """add, set, clean_context_window, reset and a memo write each leave one audit entry naming
    the operation and the policy (add/set with the hash of the record they stored), never content."""
    gateway = make_gateway(write_policy(tmp_path / "pol", input_keys=None, reply_keys=None, max_length=2000))
    messages = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}]
    assert call(gateway, "POST", "h1/history", {"op": "add", "messages": messages}).status_code == 200
    assert call(gateway, "POST", "h1/history", {"op": "set", "messages": messages[:1]}).status_code == 200
    assert call(gateway, "PUT", "h1/memo", {"memo": {"likes": "tea"}}).json() == {"id": "h1", "memo": {"likes": "tea"}}
    assert call(gateway, "GET", "h1/memo").json() == {"id": "h1", "memo": {"likes": "tea"}}
    assert call(gateway, "POST", "h1/clean_context_window").json()["context_window"] == {"messages": 0, "chars": 0}
    assert call(gateway, "POST", "h1/reset").json() == {"id": "h1", "reset": True}
    doc = export(gateway, "h1")
    assert doc["full_context"] == messages + messages[:1] and doc["context_window"] == []
    assert doc["memo"] == {"likes": "tea"}
    events = [(e["event"], (e.get("detail") or {}).get("op"), e.get("policy_id")) for e in audit_events(gateway)
              if e.get("session_id") == "h1"]
    assert events == [("history", "add", "default"), ("history", "set", "default"), ("memo", None, "default"),
                      ("reset", "clean_context_window", "default"), ("reset", "reset", "default")]
    history = [e for e in audit_events(gateway) if e["event"] == "history"]
    assert all(len(e["ciphertext_sha256"]) == 64 and e["round_seq"] for e in history)
    assert "hello there" not in json.dumps(audit_events(gateway))
    bad = call(gateway, "POST", "h1/history", {"op": "drop", "messages": []})
    assert bad.status_code == 400 and call(gateway, "POST", "nobody/clean_context_window").status_code == 404
    assert call(gateway, "GET", "h1/history").status_code == 405


@pytest.mark.parametrize("bounding", [
    {"strategy": "hook", "analysis": "tests.agently.compress_hooks:broken"},
    {"strategy": "hook", "analysis": "tests.agently.compress_hooks:always", "execution": {
        "compress": "tests.agently.compress_hooks:bad_result"}},
], ids=["analysis-raises", "execution-returns-garbage"])
def test_failing_hook_falls_back_to_simple_cut(make_gateway: MakeGateway, upstream: Upstream, tmp_path: Path,
                                               bounding: dict[str, Any]) -> None:
    """A hook that raises (its message quoting a card number) or returns garbage: the window is cut
    with simple_cut so max_length holds, and the log names the hook and the exception type only."""
    gateway = make_gateway(write_policy(tmp_path / "pol", input_keys=None, reply_keys=None, max_length=600,
                                        bounding=bounding), hook_modules=["tests.agently.*"])
    client = gateway.openai(session="acme:hooked")
    for i in range(4):
        client.chat.completions.create(model="standin", messages=[
            {"role": "user", "content": f"my card is {CARD} " + "x" * 100 + str(i)}])
    window = export(gateway, "acme:hooked")["context_window"]
    assert 0 < context_length(window) <= 600
    log = gateway.log_path.read_text()
    assert '"event":"bounding_hook_failed_cut_instead"' in log
    assert ("tests.agently.compress_hooks:" + ("broken" if "broken" in str(bounding) else "bad_result")) in log
    assert CARD not in log and "invalid literal" not in log


def cli(gateway: Gateway, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "--config", str(gateway.config_path), "sessions", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=60, input=stdin)


def test_cli_history_and_memo(make_gateway: MakeGateway, upstream: Upstream, tmp_path: Path) -> None:
    """``sessions add|set|clean|memo`` act on a running gateway's store like the HTTP routes, held
    to the same policy (resized after add, refused outside the whitelist)."""
    gateway = make_gateway(write_policy(tmp_path / "pol", input_keys=None, reply_keys=None, max_length=400))
    messages = [{"role": "user", "content": "u" * 300}, {"role": "assistant", "content": "a" * 700}]
    path = tmp_path / "history.json"
    path.write_text(json.dumps({"messages": messages}))
    added = cli(gateway, "add", "c1", str(path), "--tenant", "acme")
    assert added.returncode == 0, added.stderr
    assert "the window holds 1" in added.stdout
    assert export(gateway, "c1")["context_window"] == [{"role": "assistant", "content": "a" * 400}]
    memo = cli(gateway, "memo", "c1", "-", "--tenant", "acme", stdin='{"facts": ["x"]}')
    assert memo.returncode == 0, memo.stderr
    shown = cli(gateway, "memo", "c1", "--tenant", "acme")
    assert json.loads(shown.stdout) == {"facts": ["x"]}
    assert cli(gateway, "clean", "c1", "--tenant", "acme").returncode == 0
    doc = export(gateway, "c1")
    assert doc["context_window"] == [] and doc["full_context"] == messages and doc["memo"] == {"facts": ["x"]}
    keyed = make_gateway(write_policy(tmp_path / "pol2", **KEYED), name="gw2")
    refused = cli(keyed, "set", "c2", str(path), "--tenant", "acme")
    assert refused.returncode == 2 and "not in the recorded form" in refused.stderr and "uuu" not in refused.stderr


def test_export_with_history_records_verifies_offline(make_gateway: MakeGateway, upstream: Upstream,
                                                      tmp_path: Path) -> None:
    """Records written by add/set are covered by their ``history`` audit entries, so an auditor's
    export of such a session verifies offline with only the public key."""
    auditor = {"Authorization": f"Bearer {AUDITOR_TOKEN}"}
    gateway = make_gateway(write_policy(tmp_path / "pol", input_keys=None, reply_keys=None, max_length=2000))
    gateway.openai(session="ex1").chat.completions.create(model="standin", messages=[{"role": "user", "content": "q"}])
    assert call(gateway, "POST", "ex1/history", {"op": "add", "messages": [
        {"role": "user", "content": "added"}, {"role": "assistant", "content": "ok"}]}).status_code == 200
    resp = httpx.get(f"{gateway.url}/admin/export?tenant=acme&session=ex1", headers=auditor, timeout=30)
    assert resp.status_code == 200, resp.text
    with tarfile.open(fileobj=io.BytesIO(resp.content)) as tar:
        tar.extractall(tmp_path / "bundle", filter="data")
    records = tmp_path / "bundle" / "acme-export.jsonl"
    assert "added" in records.read_text()
    public_key = httpx.get(f"{gateway.url}/admin/public-key", headers=auditor).content
    report = verify_bundle(records, public_key)
    assert report.ok, report.summary()
