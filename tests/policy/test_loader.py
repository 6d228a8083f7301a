"""Loading and checking policy files: every finding names file:line:column and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.policy import Diagnostic, PolicyConfigError, check, load_policy_set, main_check

DEFAULT = "id: default\nsession: {input_keys: null, reply_keys: null}\n"


def _folder(tmp_path: Path, **files: str) -> Path:
    for name, text in {"default": DEFAULT, **files}.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    return tmp_path


def _errors(path: Path) -> list[Diagnostic]:
    return [d for d in check([path]) if d.severity == "error"]


def test_bad_yaml_reports_the_parser_line(tmp_path):
    """Unparseable YAML is reported at the line the parser stopped on."""
    folder = _folder(tmp_path, bad="id: bad\nsession:\n  input_keys: [a, b\n  reply_keys: null\n")
    [error] = _errors(folder)
    assert (error.file, error.line) == (str(folder / "bad.yaml"), 4)
    assert "invalid YAML" in error.message


def test_unknown_field_is_located_and_suggests_the_right_name(tmp_path):
    """A misspelt field gets its line, column and field path, and the likely intended name."""
    folder = _folder(tmp_path, p="id: p\nmatch:\n  tennants: [acme]\nsession: {input_keys: null, reply_keys: null}\n")
    [error] = _errors(folder)
    assert (error.line, error.column, error.field) == (3, 13, "match.tennants")
    assert "did you mean 'tenants'" in error.message


def test_wrong_type_is_located_at_the_value(tmp_path):
    """A value of the wrong type is reported at the value, naming what was found."""
    folder = _folder(tmp_path, p="id: p\npriority: \"10\"\nsession: {input_keys: null, reply_keys: null}\n")
    [error] = _errors(folder)
    assert str(error) == f"{folder / 'p.yaml'}:2:11: error: priority: Input should be a valid integer, got a string"


def test_error_inside_a_list_names_the_item(tmp_path):
    """An error in the second redaction rule points at that rule's line."""
    text = ("id: p\nsession: {input_keys: [a, b], reply_keys: null}\nexport:\n  redact:\n"
            "    - {key: a, action: hash}\n    - {key: b, action: shred}\n")
    [error] = _errors(_folder(tmp_path, p=text))
    assert (error.line, error.field) == (6, "export.redact[1].action")


def test_missing_field_inside_a_strategy(tmp_path):
    """keep_last without rounds names the missing field under session.bounding."""
    text = "id: p\nsession:\n  input_keys: null\n  reply_keys: null\n  bounding: {strategy: keep_last}\n"
    [error] = _errors(_folder(tmp_path, p=text))
    assert (error.line, error.field) == (5, "session.bounding.rounds")
    assert "missing" in error.message


def test_unknown_strategy_lists_the_choices(tmp_path):
    """A bounding strategy name that does not exist is an error listing the valid ones."""
    text = "id: p\nsession: {input_keys: null, reply_keys: null, bounding: {strategy: forget}}\n"
    [error] = _errors(_folder(tmp_path, p=text))
    assert error.field == "session.bounding" and "keep_last" in error.message


def test_unimportable_hook_is_reported_at_its_field(tmp_path):
    """A hook whose module cannot be imported refuses the file at the hook's line."""
    text = ("id: p\nsession:\n  input_keys: null\n  reply_keys: null\n  bounding:\n    strategy: hook\n"
            "    analysis: no_such_module_xyz:analyse\n")
    [error] = [d for d in check([_folder(tmp_path, p=text)], hook_modules=["no_such_module_*"])
               if d.severity == "error"]
    assert (error.line, error.field) == (7, "session.bounding.analysis")
    assert "cannot import module 'no_such_module_xyz'" in error.message


def test_hook_outside_the_allow_list_is_refused_without_import(tmp_path):
    """Without policies.hook_modules allowing it, a hook's module is refused at its field and never imported."""
    import sys
    marker = tmp_path / "imported"
    (tmp_path / "sg_untrusted_hooks.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef analyse(a, b, c, d):\n    return None\n")
    sys.path.insert(0, str(tmp_path))
    try:
        text = ("id: p\nsession:\n  input_keys: null\n  reply_keys: null\n  bounding:\n    strategy: hook\n"
                "    analysis: sg_untrusted_hooks:analyse\n")
        (tmp_path / "pol").mkdir()
        [error] = _errors(_folder(tmp_path / "pol", p=text))
        assert (error.line, error.field) == (7, "session.bounding.analysis")
        assert "policies.hook_modules" in error.message and "'sg_untrusted_hooks'" in error.message
        [error] = [d for d in check([tmp_path / "pol"], hook_modules=["other", "other.*"]) if d.severity == "error"]
        assert "policies.hook_modules" in error.message
        assert not marker.exists() and "sg_untrusted_hooks" not in sys.modules
    finally:
        sys.path.remove(str(tmp_path))


def test_same_priority_overlap_is_a_load_error(tmp_path):
    """Two policies that can match one request with the same priority are refused at priority."""
    a = "id: a\npriority: 5\nmatch: {models: ['gpt-*']}\nsession: {input_keys: null, reply_keys: null}\n"
    b = "id: b\npriority: 5\nmatch: {tenants: [acme]}\nsession: {input_keys: [], reply_keys: []}\n"
    [error] = _errors(_folder(tmp_path, a=a, b=b))
    assert (Path(error.file).name, error.line, error.field) == ("b.yaml", 2, "priority")
    assert "'a' (a.yaml)" in error.message


def test_same_priority_with_disjoint_globs_is_accepted(tmp_path):
    """Globs with contradicting literal prefixes cannot overlap, so a shared priority is fine."""
    a = "id: a\npriority: 5\nmatch: {models: ['gpt-*']}\nsession: {input_keys: null, reply_keys: null}\n"
    b = "id: b\npriority: 5\nmatch: {models: ['claude-*']}\nsession: {input_keys: null, reply_keys: null}\n"
    assert check([_folder(tmp_path, a=a, b=b)]) == []


def test_duplicate_id_and_duplicate_key(tmp_path):
    """A reused id and a repeated YAML key are both errors at their own lines."""
    same_id = "id: default\npriority: 1\nmatch: {tenants: [a]}\nsession: {input_keys: [], reply_keys: []}\n"
    repeated = "id: r\nsession: {input_keys: null, reply_keys: null}\npriority: 1\npriority: 2\n"
    errors = _errors(_folder(tmp_path, same=same_id, rep=repeated))
    assert [(Path(e.file).name, e.line, e.field) for e in errors] == [("rep.yaml", 4, "priority"),
                                                                        ("same.yaml", 1, "id")]
    assert "duplicate key" in errors[0].message and "duplicate policy id" in errors[1].message


def test_folder_without_catch_all_is_refused(tmp_path):
    """A folder whose every policy has a match restriction leaves requests without a policy."""
    (tmp_path / "a.yaml").write_text("id: a\nmatch: {tenants: [acme]}\nsession: {input_keys: [], reply_keys: []}\n")
    [error] = _errors(tmp_path)
    assert error.file == str(tmp_path) and error.line is None and "catch-all" in error.message


def test_a_single_file_is_checked_without_needing_a_catch_all(tmp_path):
    """Checking one new file alone does not demand a default policy."""
    path = tmp_path / "new.yaml"
    path.write_text("id: a\nmatch: {tenants: [acme]}\nsession: {input_keys: [], reply_keys: []}\n")
    assert check([path]) == []


def test_keys_that_can_never_match_are_warnings(tmp_path):
    """A reply key on the request and a redaction of an unrecorded key warn without failing."""
    text = ("id: p\npriority: 1\nmatch: {tenants: [acme]}\nsession:\n  input_keys: [a]\n"
            "  reply_keys: [.request.model]\nexport:\n  redact: [{key: b, action: drop}]\n")
    findings = check([_folder(tmp_path, p=text)])
    assert [(d.severity, d.line, d.field) for d in findings] == [
        ("warning", 6, "session.reply_keys[0]"), ("warning", 8, "export.redact[0].key")]
    assert main_check([str(tmp_path)]) == 0


def test_shadowed_policy_warns(tmp_path):
    """A policy a higher-priority one always takes first can never match, and says so."""
    a = "id: a\npriority: 5\nmatch: {models: ['gpt-*']}\nsession: {input_keys: null, reply_keys: null}\n"
    b = "id: b\npriority: 1\nmatch: {models: ['gpt-4o']}\nsession: {input_keys: [], reply_keys: []}\n"
    [warning] = check([_folder(tmp_path, a=a, b=b)])
    assert (warning.severity, Path(warning.file).name, warning.field) == ("warning", "b.yaml", "match")


def test_load_policy_set_raises_config_error_listing_every_error(tmp_path):
    """load_policy_set refuses an invalid folder with a ConfigError naming each error's place."""
    folder = _folder(tmp_path, a="id: a\nsession: {input_keys: null}\n", b="id: [b]\n")
    with pytest.raises(ConfigError) as info:
        load_policy_set(folder)
    assert isinstance(info.value, PolicyConfigError)
    lines = str(info.value).splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"{folder / 'a.yaml'}:2:")
    assert info.value.file == str(folder / "a.yaml") and info.value.field == "session.reply_keys"


def test_main_check_prints_and_fails_on_error(tmp_path, capsys):
    """main_check prints each finding and returns 1 when there is any error."""
    folder = _folder(tmp_path, p="id: p\nsession: {input_keys: null, reply_keys: null, colour: red}\n")
    assert main_check([str(folder)]) == 1
    assert "p.yaml:2:" in capsys.readouterr().out


def test_missing_path_is_an_error(tmp_path):
    """A path that does not exist is reported, not silently skipped."""
    [error] = check([tmp_path / "nope"])
    assert error.severity == "error" and "no such" in error.message


def test_non_mapping_file_is_refused(tmp_path):
    """A file that holds a list instead of one policy mapping is refused at line 1."""
    [error] = _errors(_folder(tmp_path, lst="- id: a\n- id: b\n"))
    assert (error.line, error.column) == (1, 1) and "one mapping" in error.message


@pytest.mark.parametrize(("field", "glob", "why"), [
    ("session_ids", "support/*", "a value cannot contain '/'"),
    ("session_ids", "../../etc", "a value cannot begin with '.'"),
    ("session_ids", "[]", "a value cannot contain '['"),
    ("tenants", "ａcme", "a value cannot contain 'ａ'"),
    ("tenants", "ac[me", "a value cannot contain '['"),
    ("tenants", "[:/]*", "the class [:/] holds no character"),
    ("session_ids", "?" * 129, "at most 128 characters"),
])
def test_a_glob_that_can_never_match_is_a_warning_at_its_line(tmp_path, field, glob, why):
    """A tenant or session-id glob that no valid tenant or session id matches is a warning at the glob."""
    folder = _folder(tmp_path, p=f"id: p\npriority: 5\nmatch:\n  {field}: [ok, {glob!r}]\n"
                                 "session: {input_keys: null, reply_keys: null}\n")
    [warning] = [d for d in check([folder]) if d.severity == "warning"]
    assert (warning.file, warning.line, warning.field) == (str(folder / "p.yaml"), 4, f"match.{field}[1]")
    assert f"glob {glob!r} can never match" in warning.message and why in warning.message


@pytest.mark.parametrize("glob", ["*", "acme-?", "[a-c]*", "[!x]y", "x[.]", "*.eu"])
def test_globs_that_can_match_get_no_warning(tmp_path, glob):
    """Ordinary globs are not warned about."""
    folder = _folder(tmp_path, p=f"id: p\npriority: 5\nmatch: {{tenants: [{glob!r}], session_ids: [{glob!r}, "
                                 "'support:*']}\nsession: {input_keys: null, reply_keys: null}\n")
    assert [d for d in check([folder]) if "can never match" in d.message] == []
