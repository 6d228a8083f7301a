"""CLI errors a user can act on: one line on stderr naming what to fix, no traceback, exit 2 for
unusable input and 1 for a refused operation; every option documented in ``--help``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import build_parser
from tests.conftest import REPO, Gateway, write_config


def run(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("sessiongate: error: ") and result.stderr.count("\n") == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def test_every_option_of_every_subcommand_has_a_help_text() -> None:
    """``--help`` describes each argument of each subcommand (argparse prints nothing for one without help)."""
    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif not action.help:
                missing.append(" ".join([*path, *(action.option_strings or [action.dest])]))

    walk(build_parser(), ["sessiongate"])
    assert missing == []


def test_version_prints_the_installed_version() -> None:
    """``sessiongate --version`` prints the package version and exits 0."""
    from importlib.metadata import version

    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"sessiongate {version('sessiongate')}"


def test_serve_on_a_port_in_use_says_which_port_and_writes_nothing(tmp_path: Path) -> None:
    """A port held by another process gives one line naming the port, before any file is created."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        config = write_config(tmp_path, None, REPO / "policies")
        result = run("serve", "--config", str(config), "--port", str(port), timeout=30)
    finally:
        holder.close()
    assert_one_line_error(result, 2, f"--port: port {port}", "in use")
    assert str(config) not in result.stderr  # the flag's port, not the file's
    assert "listening" not in result.stderr
    assert not (tmp_path / "gateway.db").exists() and not (tmp_path / "master-keys.json").exists()


def test_upstream_key_variable_unset_fails_before_anything_is_written(tmp_path: Path) -> None:
    """An upstream whose ``api_key_env`` is not set stops ``serve`` with the variable's name; no store,
    no key file is created."""
    config = write_config(tmp_path, "http://127.0.0.1:9/v1", REPO / "policies")
    data = json.loads(json.dumps(__import__("yaml").safe_load(config.read_text())))
    data["upstreams"][0]["api_key_env"] = "SG_TEST_UNSET_PROVIDER_KEY"
    config.write_text(__import__("yaml").safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k != "SG_TEST_UNSET_PROVIDER_KEY"}
    result = run("serve", "--config", str(config), env=env, timeout=30)
    assert_one_line_error(result, 2, "SG_TEST_UNSET_PROVIDER_KEY", "api_key_env", str(config))
    assert not (tmp_path / "gateway.db").exists() and not (tmp_path / "master-keys.json").exists()


def test_serve_with_an_unusable_store_lock_file_says_which_file(tmp_path: Path) -> None:
    """The SQLite store's lock file (``<db>-writer.lock``) cannot be opened (here a folder sits
    where it goes): ``serve`` stops with one line naming the file, no traceback."""
    config = write_config(tmp_path, None, REPO / "policies")
    (tmp_path / "gateway.db-writer.lock").mkdir()
    result = run("serve", "--config", str(config), "--port", "0", timeout=30)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert "gateway.db-writer.lock" in result.stderr and "lock file" in result.stderr, result.stderr


def test_export_into_a_missing_folder_says_so(gateway: Gateway, tmp_path: Path) -> None:
    """``export --out`` under a folder that does not exist names the folder."""
    out = tmp_path / "no-such-folder" / "acme.jsonl"
    result = run("--config", str(gateway.config_path), "export", "--tenant", "acme", "--out", str(out))
    assert_one_line_error(result, 2, str(out.parent), "does not exist")


def test_export_of_an_empty_range_or_an_unknown_tenant_is_refused_not_written(gateway: Gateway, tmp_path: Path) -> None:
    """A reversed range or a mistyped tenant would export nothing and look like "no records"; the
    tenant's audit chain would also gain an export entry (or a new chain start). Both are refused
    with one line, and no file is written."""
    gateway.openai(session="s").chat.completions.create(model="standin", messages=[{"role": "user", "content": "hi"}])
    before = gateway.audit_entries()
    (tmp_path / "bundle").mkdir()
    out = tmp_path / "bundle" / "out.jsonl"
    config = ("--config", str(gateway.config_path), "export")
    reversed_range = run(*config, "--tenant", "acme", "--since", "2026-12-02", "--until", "2026-12-01",
                         "--out", str(out))
    assert_one_line_error(reversed_range, 2, "'since' (2026-12-02T00:00:00.000000Z) must be before 'until'")
    typo = run(*config, "--tenant", "acmee", "--out", str(out))
    assert_one_line_error(typo, 2, "no tenant 'acmee'")
    assert list(out.parent.iterdir()) == []
    assert gateway.audit_entries() == before and gateway.audit_entries("acmee") == []
    assert run(*config, "--tenant", "acme", "--since", "2026-01-01", "--out", str(out)).returncode == 0


def test_clients_new_refuses_a_tenant_the_configuration_would_refuse() -> None:
    """``clients new --tenant 'a b'`` is refused with the rule; a valid tenant prints a config entry."""
    result = run("clients", "new", "--tenant", "a b")
    assert_one_line_error(result, 2, "'a b'", "tenant")
    assert result.stdout == ""
    reserved = run("clients", "new", "--tenant", "_system")
    assert_one_line_error(reserved, 2, "--tenant", "'_system'", "gateway's own audit chain")
    ok = run("clients", "new", "--tenant", "acme-2")
    assert ok.returncode == 0 and "tenant: acme-2" in ok.stdout


def test_import_conflict_on_the_cli_names_the_cli_command(gateway: Gateway, tmp_path: Path) -> None:
    """A 409-style conflict tells a CLI user the CLI command to run, not an HTTP verb."""
    gateway.openai(session="held").chat.completions.create(
        model="standin", messages=[{"role": "user", "content": "hello"}])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"id": "held", "full_context": [{"role": "user", "content": "different"}]}))
    result = run("--config", str(gateway.config_path), "sessions", "import", "held", str(other), "--tenant", "acme")
    assert_one_line_error(result, 1, "sessiongate sessions erase --tenant acme held")
    assert "DELETE" not in result.stderr


def test_readme_explain_example_files_run() -> None:
    """The example request and reply named in the README explain cleanly under the shipped policies, and
    the ``recorded`` part the README shows is what the command prints: keyed blocks, not two nulls."""
    result = run("policy", "explain", "--request", "config/examples/request.json", "--reply",
                 "config/examples/reply.json", "--tenant", "acme", "--session", "support:42")
    assert result.returncode == 0, result.stderr
    assert "id: support-tickets" in result.stdout and "T-1001" in result.stdout
    readme = (REPO / "README.md").read_text()
    assert "config/examples/request.json" in readme and "config/examples/reply.json" in readme
    shown = readme.split("--tenant acme --session support:42\n```\n", 1)[1].split("```yaml\n", 1)[1]
    shown = shown.split("```", 1)[0]
    assert shown.startswith("recorded:\n") and shown in result.stdout, (shown, result.stdout)
    recorded = __import__("yaml").safe_load(shown)["recorded"]
    assert None not in recorded.values() and "alice@example.com" not in shown


def test_serve_with_no_workers_blames_the_flag_not_the_configuration(tmp_path: Path) -> None:
    """``--workers 0`` is the command line's mistake: the error names the flag, not the config file."""
    config = write_config(tmp_path, None, REPO / "policies")
    result = run("serve", "--config", str(config), "--workers", "0", "--port", "0", timeout=30)
    assert_one_line_error(result, 2, "--workers 0: must be at least 1")
    assert str(config) not in result.stderr


def test_serve_with_more_workers_than_the_machine_can_run_is_refused_before_any_starts(tmp_path: Path) -> None:
    """A mistyped ``--workers 4000`` would start 4000 whole gateways, each with its own store
    connections: refused at once, naming the flag and the most this machine takes."""
    from gateway.workers import max_workers

    config = write_config(tmp_path, None, REPO / "policies")
    result = run("serve", "--config", str(config), "--workers", str(max_workers() + 1), "--port", "0", timeout=30)
    assert_one_line_error(result, 2, f"--workers {max_workers() + 1}: at most {max_workers()} on this machine")
    assert "sessiongate listening" not in result.stderr


def test_serve_with_an_unset_client_or_master_key_variable_names_its_line(tmp_path: Path) -> None:
    """A client's key_env or keys.master_key_env naming an unset variable stops serve with one line naming the
    file, line and field, before anything is opened (no aiohttp 'Unclosed client session' noise)."""
    import yaml

    config = write_config(tmp_path, "http://127.0.0.1:9/v1", REPO / "policies")
    data = yaml.safe_load(config.read_text())
    client = data["clients"][0]
    data["clients"][0] = {"name": data["clients"][0]["name"], "tenant": data["clients"][0]["tenant"],
                          "key_env": "SG_TEST_UNSET_CLIENT_KEY"}
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    line = next(n for n, text in enumerate(config.read_text().splitlines(), 1) if "SG_TEST_UNSET_CLIENT_KEY" in text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SG_TEST_UNSET")}
    result = run("serve", "--config", str(config), env=env, timeout=30)
    assert_one_line_error(result, 2, f"{config}:{line}:", "clients[0].key_env", "SG_TEST_UNSET_CLIENT_KEY")
    data["clients"][0] = client
    data["keys"] = {"master_key_env": "SG_TEST_UNSET_MASTER"}
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    line = next(n for n, text in enumerate(config.read_text().splitlines(), 1) if "SG_TEST_UNSET_MASTER" in text)
    result = run("serve", "--config", str(config), env=env, timeout=30)
    assert_one_line_error(result, 2, f"{config}:{line}:", "keys.master_key_env", "SG_TEST_UNSET_MASTER")


def test_backup_into_a_file_or_an_unwritable_place_says_so(gateway: Gateway, tmp_path: Path) -> None:
    """``backup --out`` naming an existing file, or a place no folder can be made (``/proc``),
    is one line naming the path and what to do, not a traceback."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = run("--config", str(gateway.config_path), "backup", "--out", str(afile))
    assert_one_line_error(result, 2, str(afile), "not a folder")
    result = run("--config", str(gateway.config_path), "backup", "--out", "/proc/nope")
    assert_one_line_error(result, 2, "/proc/nope", "cannot write the backup")


def test_export_into_an_unwritable_folder_says_so(gateway: Gateway) -> None:
    """``export --out`` in a folder where no file can be made (``/proc``) names it, no traceback."""
    from tests.test_integrity import chat

    chat(gateway, "to-export", "hello")
    result = run("--config", str(gateway.config_path), "export", "--tenant", "acme", "--out", "/proc/x.jsonl")
    assert_one_line_error(result, 2, "/proc/x.jsonl", "cannot write the export")


def test_sessions_commands_name_an_invalid_tenant(gateway: Gateway) -> None:
    """``sessions erase --tenant 'bad tenant!'`` says the tenant name is invalid, not 'no session'."""
    result = run("--config", str(gateway.config_path), "sessions", "erase", "--tenant", "bad tenant!", "x")
    assert_one_line_error(result, 2, "'bad tenant!'", "not a valid tenant name")


def test_backup_copies_are_private_from_their_first_byte(gateway: Gateway, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Into an existing empty 0755 folder, each copy is made 0600 (the umask), not made with the
    default mode and narrowed after."""
    from gateway import cli

    modes: dict[str, int] = {}
    real = shutil.copyfile

    def copyfile(src: Any, dst: Any) -> Any:
        done = real(src, dst)
        modes[Path(dst).name] = Path(dst).stat().st_mode & 0o777  # before anything else can change it
        return done

    monkeypatch.setattr(shutil, "copyfile", copyfile)
    out = tmp_path / "backup"
    out.mkdir(mode=0o755)
    umask = os.umask(0o022)
    try:
        assert cli.main(["--config", str(gateway.config_path), "backup", "--out", str(out)]) == 0
    finally:
        os.umask(umask)
    assert modes and set(modes.values()) == {0o600}, modes
    assert all(p.stat().st_mode & 0o077 == 0 for p in out.iterdir())


@pytest.mark.parametrize(("port", "message"), [
    ("84836", "--port 84836: Input should be less than or equal to 65535"),  # 84836 - 65536 = 19300
    ("-1", "--port -1: Input should be greater than or equal to 0")])
def test_serve_refuses_a_port_out_of_range_before_listening(tmp_path: Path, port: str, message: str) -> None:
    """``serve --port`` is validated as ``server.port`` is: out of range is one line naming the flag, before
    anything listens or is written (84836 used to listen on 19300; -1 blamed ``server.host``)."""
    config = write_config(tmp_path, None, REPO / "policies")
    result = run("serve", "--config", str(config), "--port", port, timeout=30)
    assert_one_line_error(result, 2, message, "as server.port in the configuration")
    assert "listening" not in result.stderr and "server.host" not in result.stderr
    assert not (tmp_path / "gateway.db").exists() and not (tmp_path / "master-keys.json").exists()


def test_serve_lists_an_unset_variable_with_the_files_other_errors(tmp_path: Path) -> None:
    """A bad value, an unknown section and an unset ``api_key_env`` are reported in one go, each at its
    line, where the unset variable used to be reported only on the next start."""
    config = tmp_path / "sessiongate.yaml"
    config.write_text("upstreams:\n  - name: up\n    base_url: http://127.0.0.1:9/v1\n    protocol: openaii\n"
                      "    api_key_env: SG_TEST_UNSET_PROBE\nstore2: {}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SG_TEST_UNSET")}
    result = run("serve", "--config", str(config), "--port", "19301", env=env, timeout=30)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert [line.split(": ", 2)[:2] for line in lines] == [
        ["sessiongate", "error"], [f"{config}:5:18", "upstreams[0].api_key_env"], [f"{config}:6:9", "store2"]]
    assert lines[0].startswith(f"sessiongate: error: {config}:4:15: upstreams[0].protocol")
    assert "SG_TEST_UNSET_PROBE is not set" in lines[1]


def test_the_help_of_each_command_names_all_its_subcommands() -> None:
    """``sessiongate --help`` lists each command's subcommands (``policy`` said "check and explain" and left
    out ``test`` and ``diff``)."""
    parser = build_parser()
    top = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help or "" for choice in top._choices_actions}
    missing = []
    for name, sub in top.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{name} {child}" for child in action.choices if child not in helps[name]]
    assert missing == []
    assert "policy files: check, explain, test, diff" in run("--help").stdout


def test_sessions_list_of_an_unknown_tenant_is_refused_naming_the_known(gateway: Gateway) -> None:
    """``sessions list --tenant acmee`` exits 2 naming the tenants there are, as ``audit verify`` and
    ``export`` do, where it printed nothing and exited 0 like an empty tenant."""
    gateway.openai(session="s").chat.completions.create(model="standin", messages=[{"role": "user", "content": "hi"}])
    config = ("--config", str(gateway.config_path), "sessions", "list")
    result = run(*config, "--tenant", "acmee")
    assert_one_line_error(result, 2, "no tenant 'acmee'", "tenants: ", "acme")
    assert result.stdout == ""
    known = run(*config, "--tenant", "acme")
    assert known.returncode == 0 and known.stdout.startswith("s\t"), known.stderr


def test_verify_of_a_missing_bundle_is_unusable_input(gateway: Gateway, tmp_path: Path) -> None:
    """A ``--bundle`` that does not exist (or is a folder) exits 2 naming it, as a missing ``--checkpoints``
    file does, not 1 with "FAIL tenant : no entries"; a tampered records file fails (1) saying how many audit
    entries were read, not "no entries"."""
    from tests.evidence.test_bundle_completeness import export, public_key
    from tests.evidence.test_tamper_data import record

    record(gateway, "alice", 2)
    key = public_key(gateway, tmp_path)
    missing = run("audit", "verify", "--bundle", str(tmp_path / "nope.jsonl"), "--public-key", str(key))
    assert_one_line_error(missing, 2, f"--bundle {tmp_path / 'nope.jsonl'}: not found")
    assert missing.stdout == ""
    folder = run("audit", "verify", "--bundle", str(tmp_path), "--public-key", str(key))
    assert_one_line_error(folder, 2, f"--bundle {tmp_path}: is a folder")
    out = tmp_path / "acme.jsonl"
    export(gateway, out)
    out.write_text(out.read_text().replace("turn 1", "turn X"))
    bad = run("audit", "verify", "--bundle", str(out), "--public-key", str(key))
    assert bad.returncode == 1, bad.stderr
    assert bad.stdout.startswith("FAIL tenant acme: 3 entries 1..3, 1 checkpoint(s): records_altered"), bad.stdout
