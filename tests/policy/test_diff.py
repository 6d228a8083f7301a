"""``sessiongate policy diff OLD NEW``: what a change does, exactly, with every widening of
recording flagged; exit 0 for no difference, 1 for changes, 3 when recording widens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import main
from gateway.policy import Policy
from gateway.policy.diff import compare_policies

DEFAULT = "id: default\nsession: {input_keys: null, reply_keys: null}\nretention: {days: 30}\n"
SUPPORT = """\
id: support
priority: 10
match: {session_ids: ["support:*"]}
session: {input_keys: [input.ticket_id], reply_keys: []}
export:
  redact: [{key: input.ticket_id, action: hash}]
retention: {days: 30}
"""
WIDER = SUPPORT.replace('["support:*"]', '["support:*", "helpdesk:*"]') \
    .replace("[input.ticket_id], reply", "[input.ticket_id, input.email], reply")


def folder(root: Path, name: str, files: dict[str, str]) -> Path:
    path = root / name
    path.mkdir()
    for file, text in files.items():
        (path / file).write_text(text)
    return path


@pytest.fixture
def change(tmp_path: Path) -> tuple[Path, Path]:
    """OLD: a catch-all and a support policy; NEW: support also records input.email and claims helpdesk:*."""
    return (folder(tmp_path, "old", {"default.yaml": DEFAULT, "support.yaml": SUPPORT}),
            folder(tmp_path, "new", {"default.yaml": DEFAULT, "support.yaml": WIDER}))


def test_a_widened_whitelist_and_a_moved_match_are_reported_exactly(change: tuple[Path, Path],
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The added key is flagged WIDENS RECORDING, the helpdesk sessions move from the catch-all to
    support (which records less, so the move is not flagged), and the exit code is 3."""
    old, new = change
    assert main(["policy", "diff", str(old), str(new)]) == 3
    assert capsys.readouterr().out.splitlines() == [
        "*** WIDENS RECORDING: 1 change(s) widen what is recorded or exported ***",
        "changed: support: input_keys: + input.email  <-- WIDENS RECORDING",
        'changed: support: match.session_ids: ["support:*"] -> ["support:*", "helpdesk:*"]',
        "moved: tenant any, model any, session helpdesk:x: default -> support",
        "summary: 0 added [-], 0 removed [-], 1 changed [support], 2 match move(s); widens recording: yes",
    ]


def test_the_json_form_lists_every_change_and_move(change: tuple[Path, Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """--format json carries each change with its old and new value and each moved request."""
    old, new = change
    assert main(["policy", "diff", str(old), str(new), "--format", "json"]) == 3
    report = json.loads(capsys.readouterr().out)
    assert report == {
        "added": [], "removed": [],
        "changed": [
            {"policy": "support", "field": "input_keys", "old": None, "new": "input.email",
             "text": "support: input_keys: + input.email", "widens": True},
            {"policy": "support", "field": "match.session_ids", "old": ["support:*"],
             "new": ["support:*", "helpdesk:*"],
             "text": 'support: match.session_ids: ["support:*"] -> ["support:*", "helpdesk:*"]', "widens": False}],
        "moves": [
            {"tenant": "(other)", "model": "(other)", "session_id": "helpdesk:x", "old": "default", "new": "support",
             "widens": False},
            {"tenant": "(other)", "model": None, "session_id": "helpdesk:x", "old": "default", "new": "support",
             "widens": False}],
        "cases": [],
        "widens_recording": True,
        "widening": ["support: input_keys: + input.email"],
        "exit_code": 3,
    }


def test_cases_show_what_a_change_records_side_by_side(change: tuple[Path, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """With --cases, a case whose recorded text changes is shown old beside new, and flagged; a
    helpdesk case that moves to support records less and is not."""
    old, new = change
    cases = tmp_path / "cases.yaml"
    cases.write_text("""\
cases:
  - name: support ticket
    session_id: "support:1"
    request:
      messages: [{role: user, content: '{"ticket_id": "T-1", "email": "a@example.com"}'}]
    expect: {}
  - name: helpdesk chat
    session_id: "helpdesk:1"
    request:
      messages: [{role: user, content: 'hello'}]
    expect: {}
""")
    assert main(["policy", "diff", str(old), str(new), "--cases", str(cases)]) == 3
    lines = capsys.readouterr().out.splitlines()
    at = lines.index(f"case {cases}:2 'support ticket': recorded.user changed  <-- WIDENS RECORDING")
    assert [line.rstrip() for line in lines[at + 1:at + 6]] == [
        "    old" + " " * 45 + " | new",
        "    " + "-" * 49 + "+" + "-" * 49,
        "    [input.ticket_id]:" + " " * 30 + " | [input.ticket_id]:",
        "    T-1" + " " * 45 + " | T-1",
        "    " + " " * 49 + "| [input.email]:",
    ]
    assert f"case {cases}:7 'helpdesk chat': policy changed" in lines
    assert f"case {cases}:7 'helpdesk chat': recorded.user changed" in lines
    assert "moved: tenant any, model any, session helpdesk:x|helpdesk:1: default -> support" in lines


def test_no_difference_exits_0_and_a_narrowing_exits_1(change: tuple[Path, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The same folder twice is no difference; removing a key and shortening retention are changes
    that do not widen recording."""
    old, _ = change
    assert main(["policy", "diff", str(old), str(old)]) == 0
    assert capsys.readouterr().out == "no difference\n"
    narrower = folder(tmp_path, "narrower", {"default.yaml": DEFAULT.replace("days: 30", "days: 7"),
                                             "support.yaml": SUPPORT.replace("[input.ticket_id], reply", "[], reply")})
    assert main(["policy", "diff", str(old), str(narrower)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "changed: default: retention: 30 days -> 7 days",
        "changed: support: input_keys: - input.ticket_id",
        "changed: support: records_nothing: false -> true",
        "summary: 0 added [-], 0 removed [-], 2 changed [default,support], 0 match move(s); widens recording: no",
    ]


def test_added_and_removed_policies_and_their_moves(change: tuple[Path, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Removing support sends its sessions to the catch-all, which records the whole text: that move widens."""
    old, _ = change
    vip = "id: vip\npriority: 5\nmatch: {tenants: [vip]}\nsession: {input_keys: [], reply_keys: []}\n"
    new = folder(tmp_path, "other", {"default.yaml": DEFAULT, "vip.yaml": vip})
    assert main(["policy", "diff", str(old), str(new)]) == 3
    assert capsys.readouterr().out.splitlines() == [
        "*** WIDENS RECORDING: 1 change(s) widen what is recorded or exported ***",
        "added: vip (vip.yaml)",
        "removed: support (support.yaml)",
        "moved: tenant vip, model any, session support:x: support -> vip",
        "moved: tenant vip, model any, session (other)|(none): default -> vip",
        "moved: tenant (other), model any, session support:x: support -> default  <-- WIDENS RECORDING",
        "summary: 1 added [vip], 1 removed [support], 0 changed [-], 8 match move(s); widens recording: yes",
    ]


def policy(text: str) -> Policy:
    return Policy.model_validate(yaml.safe_load(text))


BASE = """\
id: p
session: {input_keys: [a, b], reply_keys: [r]}
export:
  redact: [{key: a, action: drop}, {key: "*", action: mask}]
  detectors: {email: mask}
retention: {days: 30}
"""


@pytest.mark.parametrize(("old", "new", "text", "widens"), [
    ("[a, b], reply", "null, reply", "p: input_keys: [a, b] -> null (the whole text)", True),
    ("null, reply", "[a], reply", "p: input_keys: null (the whole text) -> [a]", False),
    ("{key: a, action: drop}, ", "", "p: redaction of a: drop -> mask", True),
    ('{key: "*", action: mask}', '{key: "*", action: keep}', "p: redaction of *: mask -> keep", True),
    ("action: drop}", "action: hash}", "p: redaction of a: drop -> hash", True),
    ("action: mask}]", "action: drop}]", "p: redaction of *: mask -> drop", False),
    ("email: mask", "email: hash", "p: detector email: mask -> hash", True),
    ("{email: mask}", "{}", "p: detector email: mask -> off", True),
    ("retention: {days: 30}", "retention: {days: 31}", "p: retention: 30 days -> 31 days", True),
    ("retention: {days: 30}", "", "p: retention: 30 days -> null (kept until deleted)", True),
    ("retention: {days: 30}", "retention: {days: 1}", "p: retention: 30 days -> 1 days", False),
    ("reply_keys: [r]}", "reply_keys: [r], max_length: 5, bounding: {strategy: keep_last, rounds: 2}}",
     'p: bounding: {"strategy": "simple_cut"} -> {"strategy": "keep_last", "rounds": 2}', False),
    ("reply_keys: [r]}", "reply_keys: [r], inject: {memo_placement: system}}",
     'p: inject.memo_placement: "user_section" -> "system"', False),
])
def test_each_kind_of_change_is_named_and_widenings_are_flagged(old: str, new: str, text: str,
                                                               widens: bool) -> None:
    """One edit of a policy gives a change with this text, flagged as widening or not."""
    base = BASE.replace("[a, b], reply", "null, reply") if old == "null, reply" else BASE
    before, after = policy(base), policy(base.replace(old, new, 1))
    found = {c.text: c.widens for c in compare_policies(before, after)}
    assert found.get(text) is widens, found


def test_turning_records_nothing_off_widens() -> None:
    """A policy that recorded nothing and now records a key is flagged twice: the key and records_nothing."""
    before = policy("id: p\nsession: {input_keys: [], reply_keys: []}\n")
    after = policy("id: p\nsession: {input_keys: [a], reply_keys: []}\n")
    assert [(c.text, c.widens) for c in compare_policies(before, after)] == [
        ("p: input_keys: + a", True), ("p: records_nothing: true -> false", True)]


FREE = "id: p\nsession: {input_keys: null, reply_keys: null, tools: {arguments: redact, results: drop}, " \
       "media: {parts: drop}}\n"


@pytest.mark.parametrize(("old", "new", "text", "widens"), [
    ("arguments: redact, results: drop", "arguments: keep, results: redact",
     'p: session.tools.arguments: "redact" -> "keep"', True),
    ("results: drop", "results: redact", 'p: session.tools.results: "drop" -> "redact"', True),
    ("arguments: redact", "arguments: drop", 'p: session.tools.arguments: "redact" -> "drop"', False),
    ("results: drop}", "results: drop, reasoning: drop}", 'p: session.tools.reasoning: "keep" -> "drop"', False),
    ("parts: drop}", "parts: placeholder}", 'p: session.media.parts: "drop" -> "placeholder"', True),
    ("parts: drop}", "parts: keep}", 'p: session.media.parts: "drop" -> "keep"', True),
    ("parts: drop}", "parts: drop, max_bytes: 5}", "p: session.media.max_bytes: 1048576 -> 5 bytes", False),
])
def test_tool_and_media_recording_changes_are_named_and_widenings_flagged(old: str, new: str, text: str,
                                                                         widens: bool) -> None:
    """Keeping more of tool calls, tool results or media widens recording; keeping less does not."""
    found = {c.text: c.widens for c in compare_policies(policy(FREE), policy(FREE.replace(old, new, 1)))}
    assert found.get(text) is widens, found


@pytest.mark.parametrize(("old", "new", "text"), [
    ("{arguments: redact, results: redact, reasoning: drop}", "{arguments: redact, results: redact, reasoning: keep}",
     'p: session.tools.reasoning: "drop" -> "keep"'),
    ("{arguments: drop, results: redact}", "{arguments: drop, results: keep}",
     'p: session.tools.results: "redact" -> "keep"'),
    ("{arguments: redact, results: drop}", "{arguments: keep, results: drop}",
     'p: session.tools.arguments: "redact" -> "keep"'),
    ("{arguments: keep, results: drop, reasoning: drop}", "{arguments: keep, results: drop, reasoning: keep}",
     'p: session.tools.reasoning: "drop" -> "keep"'),
])
def test_a_tool_setting_that_records_nothing_more_in_effect_does_not_widen(tmp_path: Path, old: str, new: str,
                                                                           text: str,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Reasoning kept while arguments are redacted, or results kept while calls are dropped, records
    nothing more: the change is listed, and policy diff exits 1, not 3."""
    base = "id: p\nsession: {input_keys: null, reply_keys: null, tools: TOOLS}\n"
    before, after = base.replace("TOOLS", old), base.replace("TOOLS", new)
    assert [(c.text, c.widens) for c in compare_policies(policy(before), policy(after))] == [(text, False)]
    olds, news = folder(tmp_path, "old", {"p.yaml": before}), folder(tmp_path, "new", {"p.yaml": after})
    assert main(["policy", "diff", str(olds), str(news)]) == 1
    assert "widens recording: no" in capsys.readouterr().out


def test_a_tool_edit_that_lets_reasoning_through_widens_on_the_setting_that_does_it() -> None:
    """arguments redact -> keep under reasoning: keep records the calls' arguments and their reasoning: that
    change widens; results keep -> redact in the same edit narrows and is not flagged."""
    base = "id: p\nsession: {input_keys: null, reply_keys: null, tools: TOOLS}\n"
    before = base.replace("TOOLS", "{arguments: redact, results: keep, reasoning: keep}")
    after = base.replace("TOOLS", "{arguments: keep, results: redact, reasoning: keep}")
    assert [(c.text, c.widens) for c in compare_policies(policy(before), policy(after))] == [
        ('p: session.tools.arguments: "redact" -> "keep"', True),
        ('p: session.tools.results: "keep" -> "redact"', False)]


def test_a_larger_media_limit_widens_only_while_media_is_kept() -> None:
    """media.max_bytes raised under parts: keep records larger parts: widening; under drop it is not."""
    kept = FREE.replace("parts: drop}", "parts: keep}")
    found = [(c.text, c.widens) for c in compare_policies(policy(kept), policy(kept.replace("}}", ", max_bytes: 9}}")))]
    assert found == [("p: session.media.max_bytes: 1048576 -> 9 bytes", False)]
    bigger = kept.replace("parts: keep}", "parts: keep, max_bytes: 50000000}")
    assert [(c.text, c.widens) for c in compare_policies(policy(kept), policy(bigger))] == [
        ("p: session.media.max_bytes: 1048576 -> 50000000 bytes", True)]


def test_widening_tools_and_media_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """policy diff of a folder whose policy now keeps tool arguments, results and media fails the CI gate."""
    keep = FREE.replace("redact", "keep").replace("results: drop", "results: keep").replace("parts: drop",
                                                                                         "parts: keep")
    old, new = folder(tmp_path, "old", {"p.yaml": FREE}), folder(tmp_path, "new", {"p.yaml": keep})
    assert main(["policy", "diff", str(old), str(new)]) == 3
    assert "WIDENS RECORDING: 3 change(s)" in capsys.readouterr().out


def test_every_setting_of_the_policy_model_is_compared() -> None:
    """Each field of the policy model has a comparison in COMPARED_FIELDS, so a new setting cannot be
    left out of the diff; a field with none would be reported as widening."""
    from gateway.policy.diff import COMPARED_FIELDS, policy_fields

    fields = policy_fields()
    assert "session.tools.arguments" in fields and "session.media.max_bytes" in fields
    assert sorted(fields) == sorted(COMPARED_FIELDS)


def test_every_setting_change_is_reported() -> None:
    """Changing any one setting of the policy model to another valid value gives at least one change."""
    from gateway.policy.diff import policy_fields

    base = policy(FREE.replace("id: p", "id: p\nmatch: {tenants: [a]}"))
    doc = base.model_dump(mode="json")
    others: dict[str, Any] = {
        "id": None, "description": "x", "priority": 5, "match.tenants": ["b"], "match.models": ["m"],
        "match.session_ids": ["s"], "session.input_keys": ["a"], "session.reply_keys": ["r"],
        "session.max_length": 7, "session.bounding": {"strategy": "keep_last", "rounds": 2},
        "session.inject.context_window": False, "session.inject.memo": False,
        "session.inject.memo_placement": "system", "session.tools.arguments": "keep",
        "session.tools.results": "keep", "session.tools.reasoning": "drop", "session.media.parts": "keep",
        "session.media.max_bytes": 5, "export.redact": [{"key": "*", "action": "drop"}],
        "export.detectors": {"email": "mask"}, "retention.days": 3}
    assert sorted(others) == sorted(policy_fields())
    for name, value in others.items():
        if value is None:
            continue
        changed = json.loads(json.dumps(doc))
        *parents, last = name.split(".")
        target = changed
        for part in parents:
            target = target[part]
        target[last] = value
        assert compare_policies(base, Policy.model_validate(changed)), name


def test_reordered_redaction_rules_are_a_change_not_a_widening() -> None:
    """Rules reordered without changing any key's effective action still show (the version changed)."""
    before = policy(BASE)
    after = policy(BASE.replace('{key: a, action: drop}, {key: "*", action: mask}',
                                '{key: "*", action: mask}, {key: a, action: drop}'))
    found = compare_policies(before, after)
    assert [c.field for c in found] == ["export.redact"] and not found[0].widens
