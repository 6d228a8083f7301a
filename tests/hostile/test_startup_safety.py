"""A missing key file is never silently replaced by a new keyring over a store that holds data
keys: the gateway (and the CLI) refuse to start and name the file; only a fresh store gets a
generated keyring."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from gateway.app import build_app
from gateway.errors import ConfigError, cannot_create
from gateway.policy.hooks import resolve_hook
from gateway.settings import load_settings
from tests.conftest import REPO, write_config


def _start(config: Path) -> None:
    """Start and stop the app in-process (start-up runs the store, key and policy set-up)."""
    async def run() -> None:
        runner = web.AppRunner(build_app(load_settings(config)))
        await runner.setup()
        await runner.cleanup()
    asyncio.run(run())


def _gateway_dir(tmp_path: Path) -> Path:
    config = write_config(tmp_path, None, REPO / "policies")
    return config


def test_a_fresh_store_gets_a_generated_keyring(tmp_path: Path) -> None:
    """With no data keys in the store, a missing key file is generated (0600)."""
    config = _gateway_dir(tmp_path)
    _start(config)
    key_file = tmp_path / "master-keys.json"
    assert key_file.is_file() and key_file.stat().st_mode & 0o777 == 0o600


def test_a_missing_key_file_over_stored_data_keys_refuses_to_start(tmp_path: Path, gateway) -> None:
    """After data keys were written, deleting the key file makes start-up fail with a ConfigError
    naming the file and the setting; no new key file appears."""
    gateway.openai(session="acme:kept").chat.completions.create(
        model="standin", messages=[{"role": "user", "content": "keep me"}])
    key_file = gateway.dir / "master-keys.json"
    key_file.unlink()
    with pytest.raises(ConfigError) as caught:
        _start(gateway.config_path)
    message = str(caught.value)
    assert str(key_file) in message and "keys.master_key_file" in message and "backup" in message
    assert not key_file.exists()


def test_serve_and_cli_print_one_line_and_exit_2(tmp_path: Path, gateway) -> None:
    """``serve`` and ``sessions list`` say which file is missing and exit 2, with no traceback."""
    gateway.openai(session="acme:kept").chat.completions.create(
        model="standin", messages=[{"role": "user", "content": "keep me"}])
    key_file = gateway.dir / "master-keys.json"
    key_file.unlink()
    for args in (["serve", "--port", "0"], ["sessions", "list", "--tenant", "acme"]):
        run = subprocess.run([sys.executable, "-m", "gateway", "--config", str(gateway.config_path), *args],
                             capture_output=True, text=True, timeout=30, cwd=tmp_path)
        assert run.returncode == 2, (args, run.stdout, run.stderr)
        assert str(key_file) in run.stderr and "Traceback" not in run.stderr
    assert not key_file.exists()


HOOK_POLICY = """\
id: default
session:
  input_keys: null
  reply_keys: null
  bounding:
    strategy: hook
    analysis: fold_hook:analysis
    execution: {fold: 'fold_hook:fold'}
"""


def test_a_hook_policy_needs_the_operators_allow_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A policy naming a hook module that policies.hook_modules does not allow refuses start-up with a
    ConfigError naming the file, the line, the field and the setting; allowed, the gateway starts."""
    import sys
    monkeypatch.syspath_prepend(str(REPO / "tests" / "session"))
    monkeypatch.delitem(sys.modules, "fold_hook", raising=False)
    resolve_hook.cache_clear()  # a hook resolved by an earlier test would not be imported again
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "default.yaml").write_text(HOOK_POLICY)
    config = write_config(tmp_path, None, folder)
    with pytest.raises(ConfigError) as caught:
        _start(config)
    message = str(caught.value)
    assert f"{folder / 'default.yaml'}:7:" in message and "session.bounding.analysis" in message
    assert "policies.hook_modules" in message
    assert "fold_hook" not in sys.modules  # refused before anything was imported
    _start(write_config(tmp_path, None, folder, hook_modules=["fold_hook"]))
    assert "fold_hook" in sys.modules


def _error_line(run: subprocess.CompletedProcess[str]) -> str:
    """The one ``sessiongate: error:`` line of a run that exited 2 without a traceback."""
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    (line,) = [line for line in run.stderr.splitlines() if line.startswith("sessiongate: error: ")]
    return line


@pytest.mark.parametrize("setting", ["audit.signing_key_file", "store.path", "keys.master_key_file",
                                     "audit.checkpoint_file"])
def test_a_file_that_cannot_be_created_is_one_line_naming_it(tmp_path: Path, setting: str) -> None:
    """A data file whose folder cannot be made (here a regular file stands where the folder goes)
    stops ``serve``, ``serve --workers 2`` and the CLI with one line naming the file, the setting
    and what to do, exit 2: never an OSError traceback."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file, not a folder")
    config = write_config(tmp_path, None, REPO / "policies")
    section, name = setting.split(".")
    doc = yaml.safe_load(config.read_text())
    target = blocker / "data" / Path(str(doc[section][name])).name
    doc[section][name] = str(target)
    config.write_text(yaml.safe_dump(doc))
    commands = [["serve", "--port", "0"], ["serve", "--port", "0", "--workers", "2"]]
    if setting != "audit.checkpoint_file":  # written by a running gateway only; checked as it starts
        commands += [["keys", "list"], ["audit", "verify"], ["sessions", "list", "--tenant", "acme"]]
    for args in commands:
        run = subprocess.run([sys.executable, "-m", "gateway", "--config", str(config), *args],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
        line = _error_line(run)
        assert f"{target}: {setting}: cannot " in line and f"{blocker}" in line, (args, line)
        assert "is a file, not a folder" in line and f"set {setting} to a path the gateway can write" in line


@pytest.mark.parametrize(("code", "says"), [
    (errno.EROFS, "/srv/ro is on a read-only filesystem: mount it read-write, or set keys.master_key_file"),
    (errno.EACCES, "permission denied at /srv/ro: let the gateway's user write there, or set"),
    (errno.ENOSPC, "no space left on the disk of /srv/ro: free some, or set"),
])
def test_why_a_file_cannot_be_created_says_what_to_do(code: int, says: str) -> None:
    """A read-only filesystem, a permission and a full disk (conditions a test running as root
    cannot make on its own disk) each get their own fix, naming the path the system refused."""
    error = cannot_create(OSError(code, os.strerror(code), "/srv/ro"), "/srv/ro/keys.json", "key file",
                          "keys.master_key_file")
    assert str(error).startswith("/srv/ro/keys.json: keys.master_key_file: cannot create the key file: ")
    assert says in str(error) and "\n" not in str(error)
