"""``sessiongate policy test``: the shipped cases pass without a server, store or upstream; an
edit that makes a policy record a canary fails its case with file:line; an invalid case file
exits 2 naming file, line and field."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.policy import load_policy_set
from gateway.policy.reload import fingerprint
from tests.conftest import REPO

SUPPORT_CASE = "only the ticket id and intent, and the resolution and risk level, are recorded"


def line_of(path: Path, fragment: str) -> int:
    """The 1-based number of the first line of *path* containing *fragment*."""
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if fragment in line)


def edited_copy(tmp_path: Path, name: str, old: str, new: str) -> Path:
    """A copy of ``policies/`` (cases included) with *old* replaced by *new* in *name*."""
    folder = tmp_path / "policies"
    shutil.copytree(REPO / "policies", folder)
    path = folder / name
    text = path.read_text()
    assert old in text, f"{old!r} not in {name}"
    path.write_text(text.replace(old, new, 1))
    return folder


def test_the_shipped_cases_pass() -> None:
    """Every case in policies/cases passes against policies/, run as a real process."""
    done = subprocess.run([sys.executable, "-m", "gateway", "policy", "test", str(REPO / "policies")],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert (done.returncode, done.stdout) == (0, "")
    cases = sum(path.read_text().count("\n  - name:") for path in (REPO / "policies" / "cases").glob("*.yaml"))
    assert done.stderr == f"{cases} case(s) in 5 file(s): {cases} passed, 0 failed\n"


def test_every_example_policy_has_cases() -> None:
    """Each example policy is the expected policy of at least one shipped case."""
    import yaml

    expected = {case["expect"].get("policy")
                for path in (REPO / "policies" / "cases").glob("*.yaml")
                for case in yaml.safe_load(path.read_text())["cases"]}
    assert {p.id for p in load_policy_set(REPO / "policies")} <= expected


def test_the_cases_folder_is_not_read_as_policies(tmp_path: Path) -> None:
    """The loader and the reload watcher ignore policies/cases: the set is the five examples, and
    editing a case file does not change the folder's fingerprint."""
    folder = edited_copy(tmp_path, "cases/default.yaml", "cases:", "cases:")
    assert sorted(p.id for p in load_policy_set(folder)) == [
        "default", "long-conversation", "multi-user-chat", "record-nothing", "support-tickets"]
    before = fingerprint(folder)
    (folder / "cases" / "default.yaml").write_text("not: [a, case")
    (folder / "cases" / "new.yaml").write_text("cases: []\n")
    assert fingerprint(folder) == before


def test_a_policy_edited_to_record_a_canary_fails_its_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Adding the customer's e-mail to the support whitelist fails the case that lists it as a canary,
    with the case file's line of the canary and a diff of the recorded text; the exit code is 1."""
    folder = edited_copy(tmp_path, "compliance-minimal.yaml", '"input.intent"]',
                         '"input.intent", "input.customer_email"]')
    cases = folder / "cases" / "compliance-minimal.yaml"
    assert main(["policy", "test", str(folder)]) == 1
    out, err = capsys.readouterr()
    case_line = line_of(cases, SUPPORT_CASE)
    head = f"FAIL {SUPPORT_CASE!r} (case at line {case_line})"
    lines = out.splitlines()
    assert f"{cases}:{line_of(cases, 'never_recorded: [bob@example.com')}: {head}: expect.never_recorded[0]: " \
           "canary 'bob@example.com' appears in the recorded user message" in lines
    user_line = line_of(cases, "        user: |-")
    at = lines.index(f"{cases}:{user_line}: {head}: expect.recorded.user")
    assert lines[at + 1:at + 9] == ["    --- expected", "    +++ got", "    @@ -2,3 +2,5 @@", "     T-1001",
                                    "     [input.intent]:", "     refund", "    +[input.customer_email]:",
                                    "    +bob@example.com"]
    assert err.endswith("12 case(s) in 5 file(s): 11 passed, 1 failed\n")


def test_a_short_mismatch_shows_expected_and_got(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A wrong expected policy prints expected and got on two lines, and only that case fails."""
    folder = edited_copy(tmp_path, "cases/multi-user-chat.yaml", "    expect:\n      policy: default",
                         "    expect:\n      policy: multi-user-chat")
    cases = folder / "cases" / "multi-user-chat.yaml"
    assert main(["policy", "test", str(folder), str(cases)]) == 1
    out, err = capsys.readouterr()
    at = line_of(cases, "another tenant's user sessions")
    assert out.splitlines() == [
        f"{cases}:{at + 8}: FAIL \"another tenant's user sessions go to the catch-all\" (case at line {at}): "
        "expect.policy",
        '    expected: "multi-user-chat"',
        '    got:      "default"']
    assert err == "2 case(s) in 1 file(s): 1 passed, 1 failed\n"


CASE = """\
cases:
  - name: a case
    tenant: acme
    session_id: "s-1"
    request:
      model: m
      messages: [{role: user, content: hi}]
    reply: hello
    expect:
      policy: default
"""

INVALID = [
    pytest.param("    reply: hello\n", "    replyy: hello\n", 8,
                 "cases[0].replyy: unknown field 'replyy'; did you mean 'reply'? (allowed: name, tenant, session_id, "
                 "protocol, request, reply, state, expect)",
                 id="unknown-field"),
    pytest.param('    session_id: "s-1"\n', '    session_id: "bad id"\n', 4,
                 "cases[0].session_id: invalid session id: use 1-128 characters from letters, digits and "
                 ". _ : @ + = -, starting with a letter or digit", id="session-id"),
    pytest.param("      messages: [{role: user, content: hi}]\n", "      messages: []\n", 5,
                 "cases[0].request: 'messages' is required: a non-empty list of chat messages", id="request"),
    pytest.param("    reply: hello\n", "    reply: 42\n", 8,
                 "cases[0].reply: the reply must be a chat.completion object, an assistant message, a JSON value "
                 "or a string", id="reply"),
    pytest.param("    reply: hello\n", "", 10,
                 "cases[0].expect.recorded.assistant: expects recorded assistant text, but the case has no reply",
                 id="assistant-without-reply"),
    pytest.param("      policy: default\n", "      polcy: default\n", 10,
                 "cases[0].expect.polcy: unknown field 'polcy'; did you mean 'policy'? (allowed: policy, recorded, "
                 "injected, never_recorded, export)", id="unknown-expectation"),
    pytest.param("    tenant: acme\n", "    tenant: ''\n", 3,
                 "cases[0].tenant: String should have at least 1 character", id="empty-tenant"),
    pytest.param("    expect:\n      policy: default\n      recorded: {assistant: hello}\n", "", 2,
                 "cases[0].expect: required field 'expect' is missing", id="missing-expect"),
]


@pytest.mark.parametrize(("old", "new", "line", "message"), INVALID)
def test_an_invalid_case_file_names_file_line_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        old: str, new: str, line: int, message: str) -> None:
    """An invalid case exits 2 with one error line: file, line, column, field and what is wrong."""
    text = CASE.replace("      policy: default\n", "      policy: default\n      recorded: {assistant: hello}\n")
    assert old in text
    path = tmp_path / "cases.yaml"
    path.write_text(text.replace(old, new, 1))
    assert main(["policy", "test", str(REPO / "policies"), str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    [error] = err.splitlines()
    assert error.startswith(f"sessiongate: error: {path}:{line}:")
    assert error.endswith(f": error: {message}")


def test_bad_yaml_and_a_file_without_cases_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Broken YAML reports the parser's line; a file that is not a mapping with cases is refused at line 1."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(CASE.replace("    request:\n", "    request: [\n"))
    empty = tmp_path / "empty.yaml"
    empty.write_text("cases: []\n")
    assert main(["policy", "test", str(REPO / "policies"), str(broken), str(empty)]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors[0].startswith(f"sessiongate: error: {broken}:7:") and "invalid YAML" in errors[0]
    assert errors[1] == f"{empty}:1:8: error: cases: List should have at least 1 item after validation, not 0"


def test_the_documented_example_is_a_passing_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The case in policies/cases/README.md passes against the shipped policies, so the format
    reference cannot drift from the code."""
    readme = (REPO / "policies" / "cases" / "README.md").read_text()
    example = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "example.yaml"
    path.write_text(example)
    assert main(["policy", "test", str(REPO / "policies"), str(path)]) == 0
    assert capsys.readouterr().err == "1 case(s) in 1 file(s): 1 passed, 0 failed\n"
