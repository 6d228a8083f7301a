"""A policy, policy-test case or configuration file nobody vetted cannot take the checker, a CI
runner or the gateway down: an alias bomb, a recursive alias or deep nesting is refused while the
YAML is composed, as an error at file:line, before anything is expanded; a file that is not UTF-8
is refused at the line and column of its first bad byte."""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.diagnostics import MAX_ALIAS_NODES, MAX_DEPTH, YAMLLimitError, parse_yaml
from gateway.errors import ConfigError
from gateway.policy import PolicyWatcher, check
from gateway.policy.cases import CaseFileError, load_case_file
from gateway.settings import load_settings

DEFAULT = "id: default\nsession: {input_keys: null, reply_keys: null}\n"


def bomb(levels: int, head: str = "") -> str:
    """Nine items per level, each level nine aliases of the previous one: 9**levels nodes expanded.
    Tests parse 6 levels in process (531,441 nodes, refused at x5: about 150 MB even without the
    limit) and the 7-level one only in a child process held to 1 GiB."""
    lines = [head + "x0: &x0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    lines += [f"x{i}: &x{i} [" + ",".join([f"*x{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


SELFREF = "id: selfref\nsession: &s {input_keys: null, reply_keys: null, x: *s}\n"
DEEP = "id: deep\nsession: {input_keys: null, reply_keys: null}\nx: " + "[" * 5000 + "]" * 5000 + "\n"


@pytest.mark.parametrize(("text", "line", "words"), [
    (DEFAULT + bomb(6), 8, f"aliases expand to more than {MAX_ALIAS_NODES} nodes"),
    (SELFREF, 2, "recursive alias"),
    (DEEP, 3, f"more than {MAX_DEPTH} levels deep"),
])
def test_policy_check_refuses_hostile_yaml_at_its_line(tmp_path: Path, text: str, line: int, words: str) -> None:
    """policy check reports the bomb, the self-reference or the nesting as one error at its line."""
    (tmp_path / "p.yaml").write_text(text)
    [error] = check([tmp_path / "p.yaml"])
    assert (error.severity, error.file, error.line) == ("error", str(tmp_path / "p.yaml"), line)
    assert words in error.message


def test_the_alias_limit_counts_expanded_nodes_before_expanding() -> None:
    """The refusal comes from the composer's count (it is refused at the first alias that crosses the
    limit, whatever follows), while a few anchors reused are read as usual."""
    with pytest.raises(YAMLLimitError) as caught:
        parse_yaml(bomb(6))
    assert caught.value.problem_mark is not None and caught.value.problem_mark.line == 5  # x5 = 9**6 nodes
    data, _, _ = parse_yaml("a: &a {k: [1, 2]}\nb: *a\nc: {<<: *a, j: 3}\n")
    assert data == {"a": {"k": [1, 2]}, "b": {"k": [1, 2]}, "c": {"k": [1, 2], "j": 3}}
    nested = "x: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n"  # the top mapping is a level
    assert parse_yaml(nested)[0]["x"] is not None


def test_a_bomb_is_refused_under_a_memory_limit(tmp_path: Path) -> None:
    """policy check of a 440-byte, 9**7-node bomb finishes with its error in a process held to 1 GiB."""
    (tmp_path / "bomb.yaml").write_text(DEFAULT + bomb(7))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    done = subprocess.run([sys.executable, "-m", "gateway", "policy", "check", str(tmp_path / "bomb.yaml")],
                          capture_output=True, text=True, preexec_fn=limit, check=False)
    assert done.returncode == 1, done.stderr
    assert "bomb.yaml:8:" in done.stdout and "aliases expand" in done.stdout
    assert "Traceback" not in done.stderr


def shared_history_cases(turns: int, reuses: int) -> str:
    """A case file as people write them: one long history anchored once, reused by many cases."""
    history = "".join(f"        - {{role: {'user' if i % 2 == 0 else 'assistant'}, content: 'turn {i}'}}\n"
                      for i in range(turns))
    case = ("  - name: {name}\n    request: {request}\n    state: {state}\n    reply: ok\n"
            "    expect: {{policy: default}}\n")
    text = "cases:\n" + case.format(name="base", request="&req {model: m, messages: [{role: user, content: q}]}",
                                     state="&hist\n      context_window:\n" + history.rstrip("\n"))
    return text + "".join(case.format(name=f"case {n}", request="*req", state="*hist") for n in range(reuses))


def test_a_long_history_anchored_once_and_reused_by_30_cases_loads(tmp_path: Path) -> None:
    """One 100-turn history reused by 30 cases (about 15,000 nodes added by aliases) is read as written."""
    (tmp_path / "c.yaml").write_text(shared_history_cases(100, 30))
    cases = load_case_file(tmp_path / "c.yaml")
    assert len(cases) == 31
    assert all(loaded.case.state is not None and len(loaded.case.state.context_window) == 100 for loaded in cases)


@pytest.mark.parametrize(("extra", "refused"), [(0, False), (1, True)])
def test_nesting_added_through_an_alias_counts_toward_the_depth_limit(extra: int, refused: bool) -> None:
    """An alias nests its anchor's levels where it stands: past the limit it is refused at the alias's line."""
    anchored = "[" * 10 + "]" * 10
    below = MAX_DEPTH - 1 - 10 + extra  # the top mapping is a level, the anchor adds 10
    text = f"a: &a {anchored}\nb: " + "[" * below + "*a" + "]" * below + "\n"
    if not refused:
        assert parse_yaml(text)[0]["b"] is not None
        return
    with pytest.raises(YAMLLimitError, match=f"more than {MAX_DEPTH} levels deep") as caught:
        parse_yaml(text)
    assert caught.value.problem_mark is not None and caught.value.problem_mark.line == 1


def test_a_chain_of_aliases_nesting_1200_deep_is_refused_at_the_alias() -> None:
    """Anchors that each wrap the previous one in 100 levels are refused at the first alias over the limit,
    not at 1:1 after a RecursionError."""
    lines = ["x:", "  - &a0 [v]"]
    lines += [f"  - &a{i} " + "[" * 100 + f"*a{i - 1}" + "]" * 100 for i in range(1, 13)]
    with pytest.raises(YAMLLimitError, match="levels deep") as caught:
        parse_yaml("\n".join(lines) + "\n")
    assert caught.value.problem_mark is not None and caught.value.problem_mark.line == 3  # &a2 holds *a1


@pytest.mark.parametrize(("text", "line"), [
    ("cases:\n  - name: x\n    request: &r {model: m, messages: [], extra: *r}\n", 3),
    ("cases:\n  - name: x\n    request: " + "[" * 3000 + "]" * 3000 + "\n", 3),
    (bomb(6, "cases: []\n"), 7),
])
def test_a_hostile_case_file_is_a_case_file_error_at_its_line(tmp_path: Path, text: str, line: int) -> None:
    """policy test's case files get the same limits, as a CaseFileError at file:line."""
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(CaseFileError) as caught:
        load_case_file(tmp_path / "c.yaml")
    [error] = caught.value.diagnostics
    assert (error.file, error.line) == (str(tmp_path / "c.yaml"), line)


@pytest.mark.parametrize(("text", "line"), [
    ("server: &s {port: 8787, x: *s}\n", 1),
    ("server:\n  port: " + "[" * 3000 + "]" * 3000 + "\n", 2),
    (bomb(6, "logging: {level: info}\n"), 7),
])
def test_a_hostile_config_file_is_a_config_error_at_its_line(tmp_path: Path, text: str, line: int) -> None:
    """The configuration file gets the same limits, as a ConfigError at file:line."""
    (tmp_path / "sg.yaml").write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path / "sg.yaml")
    assert (caught.value.file, caught.value.line) == (str(tmp_path / "sg.yaml"), line)


@pytest.mark.parametrize("text", [SELFREF, DEEP, DEFAULT + bomb(6)])
def test_a_hostile_edit_is_a_refused_reload(tmp_path: Path, text: str) -> None:
    """The reload of such a file is refused with its file:line (a ConfigError), and the last good set serves."""
    (tmp_path / "default.yaml").write_text(DEFAULT)

    async def scenario() -> tuple[bool, PolicyWatcher]:
        watcher = PolicyWatcher(tmp_path)
        (tmp_path / "default.yaml").write_text(text)
        return await watcher.reload(), watcher

    taken, watcher = asyncio.run(scenario())
    assert not taken
    assert watcher.last_error is not None and f"{tmp_path / 'default.yaml'}:" in str(watcher.last_error)
    assert [p.id for p in watcher.current] == ["default"]


@pytest.mark.parametrize("kind", ["policy", "case", "config"])
def test_a_file_that_is_not_utf8_is_refused_at_its_line_and_column(tmp_path: Path, kind: str) -> None:
    """A byte that is not UTF-8 is reported at its line and column, not at a byte offset."""
    path = tmp_path / "f.yaml"
    path.write_bytes(b"\xef\xbb\xbfid: x\ndescription: \"caf\xff\"\n")
    if kind == "policy":
        [error] = check([path])
        where, message = (error.file, error.line, error.column), error.message
    else:
        with pytest.raises(ConfigError) as caught:
            load_case_file(path) if kind == "case" else load_settings(path)
        exc = caught.value
        if isinstance(exc, CaseFileError):
            where, message = (exc.diagnostics[0].file, exc.diagnostics[0].line, exc.diagnostics[0].column), str(exc)
        else:
            where, message = (exc.file, exc.line, exc.column), str(exc)
    assert where == (str(path), 2, 18)
    assert "not UTF-8" in message and "position" not in message
