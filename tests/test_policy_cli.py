"""``sessiongate policy check`` and ``policy explain`` run as real processes (``python -m gateway``) on
edited copies of the example policies: each broken edit is reported as ``file:line:column: error:
field: message`` with exit code 1, a valid folder exits 0, and warnings never fail the check."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.policy import load_policy_set
from tests.conftest import REPO, write_config


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=60)


def edited_policies(tmp_path: Path, name: str, old: str, new: str) -> Path:
    """A copy of ``policies/`` in which *old* is replaced by *new* in file *name*."""
    folder = tmp_path / "policies"
    shutil.copytree(REPO / "policies", folder)
    path = folder / name
    text = path.read_text()
    assert old in text, f"{old!r} not in {name}"
    path.write_text(text.replace(old, new, 1))
    return folder


def line_of(path: Path, fragment: str) -> int:
    """The 1-based number of the first line of *path* containing *fragment*."""
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if fragment in line)


def test_the_example_folder_checks_clean() -> None:
    """The shipped policies pass with exit code 0 and no findings."""
    done = cli("policy", "check", str(REPO / "policies"))
    assert (done.returncode, done.stdout) == (0, "")
    assert "0 error(s), 0 warning(s)" in done.stderr


def test_without_paths_the_configured_folder_is_checked(tmp_path: Path) -> None:
    """With only --config, the policies folder the configuration names is checked."""
    folder = edited_policies(tmp_path, "default.yaml", "priority: 0", "priority: zero")
    config = write_config(tmp_path, None, folder)
    done = cli("--config", str(config), "policy", "check")
    assert done.returncode == 1
    assert done.stdout.startswith(f"{folder / 'default.yaml'}:{line_of(folder / 'default.yaml', 'priority')}:")


BROKEN = [
    pytest.param("compliance-minimal.yaml", '"input.intent"]', '"input.intent"', "reply_keys:", 3,
                 ": invalid YAML: while parsing a flow sequence expected ',' or ']'", id="bad-yaml"),
    pytest.param("default.yaml", "max_length: 12000", "max_lenght: 12000", "max_lenght", 15,
                 ": session.max_lenght: unknown field 'max_lenght'; did you mean 'max_length'?", id="unknown-field"),
    pytest.param("multi-user-chat.yaml", "rounds: 8", 'rounds: "8"', "rounds:", 43,
                 ": session.bounding.rounds: Input should be a valid integer, got a string", id="wrong-type"),
]


@pytest.mark.parametrize(("name", "old", "new", "at", "column", "message"), BROKEN)
def test_a_broken_file_is_reported_at_its_line_and_fails(tmp_path: Path, name: str, old: str, new: str,
                                                         at: str, column: int, message: str) -> None:
    """The one error of the edited file is printed at its file, line and column, and the exit code is 1."""
    folder = edited_policies(tmp_path, name, old, new)
    path = folder / name
    done = cli("policy", "check", str(folder))
    assert done.returncode == 1
    errors = [line for line in done.stdout.splitlines() if ": error: " in line]
    assert len(errors) == 1, done.stdout
    assert errors[0].startswith(f"{path}:{line_of(path, at)}:{column}: error")
    assert message in errors[0]
    assert "1 error(s)" in done.stderr


def test_unimportable_hook_names_the_module(tmp_path: Path) -> None:
    """A hook module that cannot be imported is named in the message, and an importable one passes."""
    text = ("id: hooked\npriority: 3\nmatch: {session_ids: ['fold:*']}\nsession:\n  input_keys: null\n"
            "  reply_keys: null\n  bounding:\n    strategy: hook\n    analysis: MODULE:analysis\n"
            "    execution: {fold: 'tests.session.fold_hook:fold'}\n")
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(text.replace("MODULE", "tests.session.fold_hook"))
    bad.write_text(text.replace("MODULE", "no_such_hooks"))
    config = tmp_path / "sessiongate.yaml"
    config.write_text(yaml.safe_dump({"policies": {"hook_modules": ["tests.session.*", "no_such_hooks"]}}))
    assert cli("policy", "check", "--config", str(config), str(good)).returncode == 0
    done = cli("policy", "check", "--config", str(config), str(bad))
    assert done.returncode == 1
    assert done.stdout.startswith(f"{bad}:9:15: error: session.bounding.analysis: cannot import module "
                                  "'no_such_hooks'")


def test_policy_check_of_an_untrusted_hook_imports_nothing(tmp_path: Path) -> None:
    """With the default (empty) allow-list a hook policy is refused at its line, naming the setting,
    and its module is never imported."""
    marker = tmp_path / "imported"
    (tmp_path / "evil_hooks.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                            "def analysis(a, b, c, d):\n    return None\n")
    path = tmp_path / "hooked.yaml"
    path.write_text("id: hooked\nsession:\n  input_keys: null\n  reply_keys: null\n  bounding:\n"
                    "    strategy: hook\n    analysis: evil_hooks:analysis\n")
    done = subprocess.run([sys.executable, "-m", "gateway", "policy", "check", str(path)], capture_output=True,
                          text=True, cwd=REPO, timeout=60, env={**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}"})
    assert done.returncode == 1
    assert done.stdout.startswith(f"{path}:7:15: error: session.bounding.analysis: hook module 'evil_hooks' "
                                  "is not allowed"), done.stdout
    assert "policies.hook_modules" in done.stdout
    assert not marker.exists()


def test_same_priority_overlap_is_reported_at_the_later_file(tmp_path: Path) -> None:
    """Two example policies moved to one priority that can match one request fail at the priority line."""
    folder = edited_policies(tmp_path, "multi-user-chat.yaml", "priority: 5", "priority: 10")
    path = folder / "multi-user-chat.yaml"
    done = cli("policy", "check", str(folder))
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        f"{path}:{line_of(path, 'priority:')}:11: error: priority: policy 'multi-user-chat' and 'long-conversation' "
        "(long-conversation.yaml) both have priority 10 and can match the same request; give one of them another "
        "priority or make their match sets disjoint"]


def test_keys_that_can_never_match_are_printed_as_warnings(tmp_path: Path) -> None:
    """A reply key on the request and a redaction of an unrecorded key are warnings; the check still passes."""
    folder = edited_policies(tmp_path, "compliance-minimal.yaml", 'reply_keys: ["resolution", "risk_level"]',
                             'reply_keys: ["resolution", "risk_level", ".request.model"]')
    path = folder / "compliance-minimal.yaml"
    text = path.read_text().replace('{key: "resolution", action: mask}', '{key: "resolutoin", action: mask}')
    path.write_text(text)
    done = cli("policy", "check", str(folder))
    assert done.returncode == 0, done.stdout
    assert done.stdout.splitlines() == [
        f"{path}:{line_of(path, 'reply_keys')}:44: warning: session.reply_keys[2]: key '.request.model' addresses "
        "the request, not the reply: it can never match",
        f"{path}:{line_of(path, 'resolutoin')}:13: warning: export.redact[1].key: key 'resolutoin' is not among "
        "session.input_keys or session.reply_keys: this rule can never match"]
    assert "0 error(s), 2 warning(s)" in done.stderr


def test_a_policy_any_client_can_choose_to_record_nothing_is_warned_about_by_check_and_serve(
        tmp_path: Path) -> None:
    """Without its tenants line, the private-sessions policy lets any client of any tenant keep
    its text out of the record: ``policy check`` says so at the match line, and ``serve`` prints
    the same warning in its start-up banner."""
    from tests.hostile.subprocess_gateway import served_gateway

    folder = edited_policies(tmp_path, "record-nothing.yaml", "  tenants: [acme]\n", "")
    path = folder / "record-nothing.yaml"
    done = cli("policy", "check", str(folder))
    assert done.returncode == 0, done.stdout
    [line] = done.stdout.splitlines()
    assert line.startswith(f"{path}:{line_of(path, 'match:')}:1: warning: match: policy 'record-nothing' is chosen "
                           "by the client (its session id ['private:*']) for every tenant")
    assert "any client can keep text out of the record" in line and "match.tenants" in line
    with served_gateway(tmp_path / "gw", policies=folder) as gw:
        banner = gw.stderr()
    assert f"  warning   {line}" in banner


def test_a_missing_path_fails() -> None:
    """Checking a path that does not exist is an error, not an empty success."""
    done = cli("policy", "check", str(REPO / "no-such-policies"))
    assert done.returncode == 1 and "no such file or folder" in done.stdout


def test_explain_shows_what_the_compliance_policy_would_record(tmp_path: Path) -> None:
    """policy explain names the chosen policy with its hash and prints exactly the keyed blocks it would record."""
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": json.dumps(
        {"ticket_id": "T-1001", "intent": "refund", "raw_text": "PII here"})}]}))
    reply = tmp_path / "reply.json"
    reply.write_text(json.dumps({"resolution": "refund approved", "risk_level": "low", "notes": "PII"}))
    done = cli("--config", str(write_config(tmp_path, None, REPO / "policies")), "policy", "explain",
               "--request", str(request), "--reply", str(reply), "--tenant", "acme", "--session", "support:T-1001")
    assert done.returncode == 0, done.stderr
    report = yaml.safe_load(done.stdout)
    policy = load_policy_set(REPO / "policies").get("support-tickets")
    assert policy is not None
    assert (report["policy"]["id"], report["policy"]["version_hash"]) == (policy.id, policy.version_hash)
    assert report["recorded"]["user"] == "[input.ticket_id]:\nT-1001\n[input.intent]:\nrefund"
    assert report["recorded"]["assistant"] == "[resolution]:\nrefund approved\n[risk_level]:\nlow"


def test_policy_check_refuses_a_regex_filter_at_its_key(tmp_path: Path) -> None:
    """A JSONPath key with a =~ filter (a regex run on client text per request) is an error at the key's line."""
    (tmp_path / "p.yaml").write_text("id: p\nsession:\n  input_keys:\n    - \"$.messages[?(@.x =~ '(')]\"\n"
                                     "  reply_keys: null\n")
    done = cli("policy", "check", str(tmp_path / "p.yaml"))
    assert done.returncode == 1
    assert f"{tmp_path / 'p.yaml'}:4:" in done.stdout and "session.input_keys[0]" in done.stdout
    assert "=~" in done.stdout and "not allowed" in done.stdout


def test_policy_check_refuses_jsonpath_arithmetic_at_its_key(tmp_path: Path) -> None:
    """A JSONPath key multiplying two client values (one request could allocate gigabytes) is an error at the
    key's line."""
    (tmp_path / "p.yaml").write_text("id: p\nsession:\n  input_keys:\n    - input.lang\n    - $.a * $.b\n"
                                     "  reply_keys: null\n")
    done = cli("policy", "check", str(tmp_path / "p.yaml"))
    assert done.returncode == 1
    assert f"{tmp_path / 'p.yaml'}:5:" in done.stdout and "session.input_keys[1]" in done.stdout
    assert "arithmetic ('*') is not allowed" in done.stdout


def test_explain_of_a_jsonpath_operator_on_another_type_records_nothing_for_it(tmp_path: Path) -> None:
    """policy explain of a request whose value an operator cannot handle (sorted of a string) shows the key as
    not found instead of a traceback."""
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "p.yaml").write_text("id: p\nsession: {input_keys: [\"$.metadata.`sorted`\", .request.model], "
                                   "reply_keys: []}\n")
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"model": "m", "metadata": "a-string", "messages": [{"role": "user",
                                                                                     "content": "hi"}]}))
    done = cli("--config", str(write_config(tmp_path, None, folder)), "policy", "explain", "--request",
               str(request), "--tenant", "acme", "--session", "s:1")
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["recorded"]["user"] == "[.request.model]:\nm"


def test_explain_of_a_deeply_nested_request_is_refused_at_its_line(tmp_path: Path) -> None:
    """A request file nested deeper than the gateway accepts is an error at file:line:column, not a traceback."""
    request = tmp_path / "deep.json"
    request.write_text('{"model": "m",\n "messages": ' + "[" * 100_000 + "]" * 100_000 + "}")
    done = cli("--config", str(write_config(tmp_path, None, REPO / "policies")), "policy", "explain",
               "--request", str(request), "--tenant", "acme")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{request}:2:141: nested more than 128 levels deep" in done.stderr


def test_explain_of_an_invalid_request_names_the_file_and_line(tmp_path: Path) -> None:
    """A request the gateway would refuse (a Messages body without max_tokens; a message without a role) is
    an error at the request file and the line of the field, or of the object that lacks it."""
    config = str(write_config(tmp_path, None, REPO / "policies"))
    request = tmp_path / "req2.json"
    request.write_text('{\n  "model": "claude-x",\n  "messages": [{"role": "user", "content": "hi"}]\n}\n')
    done = cli("--config", config, "policy", "explain", "--request", str(request), "--protocol", "messages",
               "--session", "s1")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr == (f"sessiongate: error: {request}:1: 'max_tokens' is required: a whole number (as a "
                           "messages request)\n")
    request.write_text('{\n  "model": "gpt-4o",\n  "messages": [\n    {"role": "user", "content": "hi"},\n'
                       '    {"content": "no role"}\n  ]\n}\n')
    done = cli("--config", config, "policy", "explain", "--request", str(request))
    assert done.returncode == 2 and done.stderr.startswith(
        f"sessiongate: error: {request}:5: 'messages[1]' must be an object with a string 'role'"), done.stderr


def test_explain_says_which_keys_a_keyed_policy_found_nothing_of(tmp_path: Path) -> None:
    """When the keyed support policy records no message, the note names the keys it looked for; when it
    records both, there is no note."""
    config = str(write_config(tmp_path, None, REPO / "policies"))
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "My ticket is "
                                                                     "T-1001. Where is my refund?"}]}))
    reply = tmp_path / "reply.json"
    reply.write_text(json.dumps("It was sent on Monday."))
    args = ("--config", config, "policy", "explain", "--request", str(request), "--tenant", "acme", "--session",
            "support:42")
    done = cli(*args, "--reply", str(reply))
    assert done.returncode == 0, done.stderr
    recorded = yaml.safe_load(done.stdout)["recorded"]
    assert (recorded["user"], recorded["assistant"]) == (None, None)
    assert recorded["note"].splitlines() == [
        "no user message is recorded, as the policy records only the input keys input.ticket_id, input.intent and "
        "the request's new input holds none of them (they are read from an Agently [INPUT] section or a JSON "
        "object message, see policies/README.md)",
        "no assistant message is recorded, as the policy records only the reply keys resolution, risk_level and the "
        "reply holds none of them (they are read from the reply's JSON)"]
    request.write_text(json.dumps({"model": "gpt-4o", "messages": [
        {"role": "user", "content": "[INPUT]:\nticket_id: T-1001\nintent: refund"}]}))
    reply.write_text(json.dumps({"resolution": "sent", "risk_level": "low"}))
    recorded = yaml.safe_load(cli(*args, "--reply", str(reply)).stdout)["recorded"]
    assert recorded == {"user": "[input.ticket_id]:\nT-1001\n[input.intent]:\nrefund",
                        "assistant": "[resolution]:\nsent\n[risk_level]:\nlow"}
    private = yaml.safe_load(cli(*args[:-1], "private:1").stdout)["recorded"]
    assert private["note"] == "no user message is recorded, as the policy's input_keys is []"
