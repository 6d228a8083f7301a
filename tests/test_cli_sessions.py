"""``sessiongate sessions list|export|import|reset|delete --tenant T`` run as a real process
against the configuration and files of a running gateway, which sees every change at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ACME_KEY, REPO, Gateway, Upstream

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}


def cli(gateway: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "--config", str(gateway.config_path), "sessions", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def export(gateway: Gateway, session: str) -> httpx.Response:
    return httpx.get(f"{gateway.base_url}/sessions/{session}", headers=AUTH)


def test_cli_manages_the_sessions_of_a_running_gateway(gateway: Gateway, upstream: Upstream, tmp_path: Path) -> None:
    """list, export, import, reset and delete from the CLI agree with what the gateway serves over HTTP."""
    client = gateway.openai(session="cli-a")
    for text in ("one", "two"):
        client.chat.completions.create(model="standin", messages=[{"role": "user", "content": text}])

    listed = cli(gateway, "list", "--tenant", "acme")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split("\t")[:2] == ["cli-a", "rounds=2"]

    exported = cli(gateway, "export", "cli-a", "--tenant", "acme")
    assert exported.returncode == 0, exported.stderr
    doc: dict[str, Any] = json.loads(exported.stdout)
    assert doc == export(gateway, "cli-a").json()

    path = tmp_path / "session.json"
    path.write_text(json.dumps({**doc, "memo": "from the cli"}), encoding="utf-8")
    imported = cli(gateway, "import", "cli-b", str(path), "--tenant", "acme")
    assert imported.returncode == 0, imported.stderr
    assert "imported 4 messages" in imported.stdout
    assert export(gateway, "cli-b").json() == {**doc, "id": "cli-b", "memo": "from the cli"}

    reset = cli(gateway, "reset", "cli-a", "--tenant", "acme")
    assert reset.returncode == 0, reset.stderr
    after = export(gateway, "cli-a").json()
    assert after["context_window"] == [] and after["full_context"] == doc["full_context"]

    deleted = cli(gateway, "delete", "cli-a", "--tenant", "acme")
    assert deleted.returncode == 0, deleted.stderr
    assert export(gateway, "cli-a").status_code == 404
    assert export(gateway, "cli-b").status_code == 200


def test_cli_errors_are_one_line_without_a_traceback(gateway: Gateway, tmp_path: Path) -> None:
    """Another tenant's session, a bad id or a bad file exit 2 with one clear line and change nothing."""
    gateway.openai(session="only-acme").chat.completions.create(
        model="standin", messages=[{"role": "user", "content": "hi"}])
    bad = tmp_path / "bad.json"
    bad.write_text('{"full_context": [', encoding="utf-8")
    for args in (("delete", "only-acme", "--tenant", "globex"),
                 ("delete", "has space", "--tenant", "acme"), ("import", "x", str(bad), "--tenant", "acme")):
        result = cli(gateway, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("sessiongate: error: ") and result.stderr.count("\n") == 1
        assert "Traceback" not in result.stderr
    assert export(gateway, "only-acme").status_code == 200


def test_export_escapes_characters_a_terminal_would_hide_or_reorder(gateway: Gateway, upstream: Upstream) -> None:
    """A bidirectional override or Unicode tags in recorded text reach the terminal as JSON
    escapes: the same JSON value, but nothing reordered or invisible on screen."""
    tags = "".join(chr(0xE0000 + ord(c)) for c in "hi")
    text = f"pay \u202e0001\u202c {tags} é 中"
    gateway.openai(session="cli-hidden").chat.completions.create(
        model="standin", messages=[{"role": "user", "content": text}])
    exported = cli(gateway, "export", "cli-hidden", "--tenant", "acme")
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["full_context"][0]["content"] == text
    assert "pay \\u202e0001\\u202c \\udb40\\udc68\\udb40\\udc69 é 中" in exported.stdout
    assert not any(c in exported.stdout for c in ("\u202e", "\u202c", tags[0]))


def test_an_import_the_gateway_refuses_names_the_file_the_line_and_the_field(gateway: Gateway,
                                                                              tmp_path: Path) -> None:
    """A session file whose message is malformed, or that the policy would not record, is refused
    with the file, the line of the message and its field (only the field was named before); a
    JSON5 file, whose lines the check cannot map, gets the file and the field."""
    bad = tmp_path / "tools.json"
    bad.write_text('{\n  "full_context": [\n    {"role": "user", "content": "q"},\n'
                   '    {"role": "assistant", "content": null,\n'
                   '     "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f"}}]}\n  ]\n}\n')
    image = tmp_path / "image.json"
    image.write_text(json.dumps({"full_context": [{"role": "user", "content": "look"}, {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, indent=1))
    lenient = tmp_path / "lenient.json5"
    lenient.write_text("{full_context: [{role: 'tool', content: 'x', tool_call_id: 5,},],}")
    for path, where in ((bad, f"{bad}:5: 'full_context[1].tool_calls[0]' must be"),
                        (image, f"{image}:7: 'full_context[1]' holds a media part"),
                        (lenient, f"{lenient}: 'full_context[0].tool_call_id' must be a string")):
        result = cli(gateway, "import", "cli-refused", str(path), "--tenant", "acme")
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"sessiongate: error: {where}"), result.stderr
        assert result.stderr.count("\n") == 1
    assert export(gateway, "cli-refused").status_code == 404


def test_a_history_file_the_gateway_refuses_names_the_file_and_the_line(gateway: Gateway, tmp_path: Path) -> None:
    """``sessions add`` with a malformed message, or one a keyed policy would not record, names
    the file and the line where that message starts, whether the file is a list, ``{"messages":
    [...]}`` or one message."""
    listed = tmp_path / "list.json"
    listed.write_text('[\n {"role": "user", "content": "ok"},\n {"role": 5, "content": "x"}\n]\n')
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text('{"messages": [\n {"role": "user",\n  "content": "free text"}]}\n')
    single = tmp_path / "single.json"
    single.write_text('{"role": "user",\n "content": 7}\n')
    for path, session, extra, where in (
            (listed, "h-1", (), f"{listed}:3: 'messages[1]' must be"),
            (wrapped, "support:cli", ("--model", "gpt-4o"), f"{wrapped}:2: messages[0] (user) is not in the "
                                                            "recorded form of policy 'support-tickets'"),
            (single, "h-2", (), f"{single}:2: 'messages[0].content' must be")):
        result = cli(gateway, "add", session, str(path), "--tenant", "acme", *extra)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"sessiongate: error: {where}"), result.stderr
        assert export(gateway, session).status_code == 404


def test_list_marks_a_quarantined_session(gateway: Gateway) -> None:
    """A session quarantined after a failed check is marked in ``sessions list``, with its entry,
    and a note on stderr says what to do; the others are not."""
    import sqlite3

    for sid in ("q-a", "q-b"):
        client = gateway.openai(session=sid)
        for text in ("one", "two"):
            client.chat.completions.create(model="standin", messages=[{"role": "user", "content": text}])
    with sqlite3.connect(gateway.db_path) as db:
        db.execute("DELETE FROM rounds WHERE tenant='acme' AND session_id='q-a' AND seq=1")
    assert export(gateway, "q-a").status_code == 500  # the check on load quarantines it
    listed = cli(gateway, "list", "--tenant", "acme")
    assert listed.returncode == 0, listed.stderr
    lines = dict(line.split("\t", 1) for line in listed.stdout.splitlines())
    assert "\tquarantined (audit entry " in lines["q-a"] and "quarantined" not in lines["q-b"]
    assert "1 quarantined session(s) of tenant acme" in listed.stderr


def test_rounds_the_cli_writes_keep_their_policy_version(tmp_path: Path) -> None:
    """``sessions add`` wrote its round under the policy it matched without keeping that policy's
    version in the store (the gateway keeps every version it loads; the CLI import did too), so
    with no gateway started on that policy, ``audit verify`` failed untampered data with
    ``policy_version_missing``."""
    import shutil

    from tests.conftest import write_config
    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies)
    config = write_config(tmp_path, None, policies)
    history = tmp_path / "history.json"
    history.write_text(json.dumps([{"role": "user", "content": "from the cli"}]), encoding="utf-8")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway", "--config", str(config), *args],
                              capture_output=True, text=True, cwd=tmp_path, timeout=60)

    added = run("sessions", "add", "cli-only", str(history), "--tenant", "acme")
    assert added.returncode == 0, added.stderr
    verified = run("audit", "verify", "--tenant", "acme")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "policy_version_missing" not in verified.stdout + verified.stderr


def test_import_takes_the_model_that_chooses_the_policy(gateway: Gateway, tmp_path: Path) -> None:
    """``sessions import --model gpt-4o`` holds a support:* import of acme to support-tickets (free
    text refused, naming the file and line); without a model, where the policy depends on it, the
    import and ``sessions add``/``set``/``memo`` exit 2 saying to pass --model, and store nothing."""
    free = tmp_path / "free.json"
    free.write_text(json.dumps({"full_context": [{"role": "user", "content": "my password is hunter2"}]}, indent=1))
    refused = cli(gateway, "import", "--tenant", "acme", "support:4", str(free), "--model", "gpt-4o")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith(f"sessiongate: error: {free}:3: 'full_context[0]' (user) is not in the form "
                                     "policy 'support-tickets' records"), refused.stderr
    messages = tmp_path / "messages.json"
    messages.write_text(json.dumps([{"role": "user", "content": "free text secret"}]))
    for args in (("import", "support:4", str(free)), ("add", "support:4", str(messages)),
                 ("set", "support:4", str(messages)), ("memo", "support:4", str(messages))):
        result = cli(gateway, *args, "--tenant", "acme")
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("sessiongate: error: session 'support:4' is held to policy "
                                        "'support-tickets' for models gpt-4o*"), result.stderr
        assert "pass the model its rounds use (--model)" in result.stderr and result.stderr.count("\n") == 1
    assert export(gateway, "support:4").status_code == 404
    keyed = tmp_path / "keyed.json"
    keyed.write_text(json.dumps({"model": "gpt-4o", "full_context": [
        {"role": "user", "content": "[input.ticket_id]:\nT-4\n[input.intent]:\nrefund"}]}))
    clash = cli(gateway, "import", "support:4", str(keyed), "--tenant", "acme", "--model", "gpt-4o-mini")
    assert clash.returncode == 2 and "--model is 'gpt-4o-mini'" in clash.stderr, clash.stderr
    imported = cli(gateway, "import", "support:4", str(keyed), "--tenant", "acme")  # the file's model
    assert imported.returncode == 0, imported.stderr
    assert [e["policy_id"] for e in gateway.audit_entries() if e["event"] == "import"] == ["support-tickets"]


def test_an_import_file_with_a_misspelt_field_is_refused_naming_it(gateway: Gateway, tmp_path: Path) -> None:
    """A misspelt top-level field would have imported an empty session: exit 2 naming the file, the
    line and the field; nothing is stored."""
    typo = tmp_path / "typo.json"
    typo.write_text('{\n  "id": "j",\n  "full_contxt": [{"role": "user", "content": "hi"}]\n}\n')
    result = cli(gateway, "import", "acme:j10", str(typo), "--tenant", "acme")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"sessiongate: error: {typo}:3: 'full_contxt' is not a field of an Agently "
                                    "session document"), result.stderr
    assert export(gateway, "acme:j10").status_code == 404


@pytest.mark.parametrize("model", ["nomodel", "GPT-4o"], ids=["made-up", "wrong-case"])
def test_a_cli_session_write_must_name_a_model_a_round_could_use(make_gateway: Callable[..., Gateway],
                                                                 upstream: Upstream, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, model: str) -> None:
    """``sessions import|add|memo`` with a model no upstream of the settings serves (made up, or a
    served one in another case) held free text to multi-user-chat in acme's support:* session,
    whose gpt-4o rounds run under support-tickets: now exit 2 naming --model or the file's
    ``model``, in a round's words, and nothing is stored. The CLI reads no provider key for this."""
    monkeypatch.setenv("SG_TEST_PROVIDER_KEY", "sk-test-provider-key")
    gateway = make_gateway(upstreams=[{"name": "openai", "base_url": upstream.url, "models": ["gpt-4o*"],
                                       "api_key_env": "SG_TEST_PROVIDER_KEY"}])
    no_key = {k: v for k, v in os.environ.items() if k != "SG_TEST_PROVIDER_KEY"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway", "--config", str(gateway.config_path), "sessions",
                               *args, "--tenant", "acme"], capture_output=True, text=True, cwd=REPO, timeout=60,
                              env=no_key)

    says = f"no upstream serves model '{model}'; configured upstreams: openai"
    doc = tmp_path / "doc.json"
    doc.write_text(json.dumps({"full_context": [{"role": "user", "content": "SECRET free text"},
                                                {"role": "assistant", "content": "ok"}], "memo": "free memo text"}))
    in_file = tmp_path / "in-file.json"
    in_file.write_text(json.dumps({"model": model, "full_context": [{"role": "user", "content": "SECRET"}]}))
    messages = tmp_path / "messages.json"
    messages.write_text(json.dumps([{"role": "user", "content": "SECRET free text"}]))
    for args, where in ((("import", "--model", model, "support:cli1", str(doc)), "--model"),
                        (("import", "support:cli1", str(in_file)), f"{in_file}: model"),
                        (("add", "--model", model, "support:cli1", str(messages)), "--model"),
                        (("memo", "--model", model, "support:cli1", str(messages)), "--model")):
        result = run(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr == f"sessiongate: error: {where}: {says}\n", result.stderr
    assert export(gateway, "support:cli1").status_code == 404
    keyed = tmp_path / "keyed.json"
    keyed.write_text(json.dumps({"full_context": [
        {"role": "user", "content": "[input.ticket_id]:\nT-4\n[input.intent]:\nrefund"}]}))
    imported = run("import", "--model", "gpt-4o", "support:cli1", str(keyed))  # a served model, no key read
    assert imported.returncode == 0, imported.stderr


def test_with_no_upstream_configured_the_cli_takes_any_model(tmp_path: Path) -> None:
    """With no upstream configured the gateway routes every model to the built-in stand-in, so a
    round could use any name: ``sessions add --model`` takes one."""
    import shutil

    from tests.conftest import write_config
    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies)
    config = write_config(tmp_path, None, policies)
    history = tmp_path / "history.json"
    history.write_text(json.dumps([{"role": "user", "content": "from the cli"}]), encoding="utf-8")
    added = subprocess.run([sys.executable, "-m", "gateway", "--config", str(config), "sessions", "add", "acme:s1",
                            str(history), "--tenant", "acme", "--model", "made-up"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert added.returncode == 0, added.stderr


def test_sessions_memo_over_the_memo_limit_is_refused_as_over_http(gateway: Gateway, tmp_path: Path) -> None:
    """``sessions memo`` holds a memo to the limit ``PUT .../memo`` does (it goes with every request
    of its session): one line naming the size and the limit, exit 2, nothing stored."""
    from gateway.session.model import MEMO_MAX_BYTES

    memo = tmp_path / "memo.json"
    memo.write_text(json.dumps({"a": [[1]] * (MEMO_MAX_BYTES // 3)}))
    result = cli(gateway, "memo", "cli-memo", str(memo), "--tenant", "acme")
    assert result.returncode == 2, result.stderr
    assert "sessiongate: error: " in result.stderr and f"at most {MEMO_MAX_BYTES} bytes" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert export(gateway, "cli-memo").status_code == 404
