"""Hot reload: edits go live without a restart, invalid edits are refused, requests never fail."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.errors import ConfigError
from gateway.policy import PolicySet, PolicyWatcher

DEFAULT = "id: default\nsession: {input_keys: null, reply_keys: null}\n"
WAIT = 5.0  # generous upper bound for the watcher to notice; reloads take ~2 poll intervals


def _write(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text)


async def _until(condition, timeout: float = WAIT) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


def test_edit_takes_effect_without_restart(tmp_path):
    """Changing a policy file swaps in the new set and calls on_change with it."""
    _write(tmp_path, "default.yaml", DEFAULT)
    seen: list[PolicySet] = []

    async def scenario() -> PolicySet:
        watcher = PolicyWatcher(tmp_path, on_change=seen.append, interval=0.05)
        await watcher.start()
        try:
            _write(tmp_path, "default.yaml", DEFAULT.replace("null, reply", "[input.x], reply"))
            await _until(lambda: bool(seen))
            return watcher.current
        finally:
            await watcher.stop()

    current = asyncio.run(scenario())
    assert current is seen[0]
    assert current.match("acme", None, None).session.input_keys == ["input.x"]


def test_new_and_removed_files_are_picked_up(tmp_path):
    """Adding a file adds its policy; removing it takes the policy away again."""
    _write(tmp_path, "default.yaml", DEFAULT)
    vip = "id: vip\npriority: 1\nmatch: {tenants: [vip]}\nsession: {input_keys: [], reply_keys: []}\n"

    async def scenario() -> tuple[str, str]:
        watcher = PolicyWatcher(tmp_path, interval=0.05)
        await watcher.start()
        try:
            _write(tmp_path, "vip.yaml", vip)
            await _until(lambda: watcher.current.get("vip") is not None)
            added = watcher.current.match("vip", None, None).id
            (tmp_path / "vip.yaml").unlink()
            await _until(lambda: watcher.current.get("vip") is None)
            return added, watcher.current.match("vip", None, None).id
        finally:
            await watcher.stop()

    assert asyncio.run(scenario()) == ("vip", "default")


def test_invalid_edit_is_refused_and_logged_keeping_the_last_good_set(tmp_path):
    """A broken edit leaves the previous set serving and logs the checker's message."""
    _write(tmp_path, "default.yaml", DEFAULT)

    async def scenario(watcher: PolicyWatcher) -> None:
        await watcher.start()
        try:
            _write(tmp_path, "default.yaml", DEFAULT + "priority: urgent\n")
            await _until(lambda: watcher.last_error is not None)
        finally:
            await watcher.stop()

    watcher = PolicyWatcher(tmp_path, interval=0.05)
    before = watcher.current
    with capture_logs() as logs:
        asyncio.run(scenario(watcher))
    assert watcher.current is before
    [refused] = [e for e in logs if e["event"] == "policy_reload_refused"]
    assert refused["log_level"] == "error"
    assert refused["errors"] == [f"{tmp_path / 'default.yaml'}:3:11: error: priority: "
                                 "Input should be a valid integer, got a string"]


def test_fixing_a_refused_edit_reloads(tmp_path):
    """After a refused edit, the next valid edit is taken and clears last_error."""
    _write(tmp_path, "default.yaml", DEFAULT)

    async def scenario() -> tuple[PolicyWatcher, int]:
        watcher = PolicyWatcher(tmp_path, interval=0.05)
        await watcher.start()
        try:
            _write(tmp_path, "default.yaml", "id: [\n")
            await _until(lambda: watcher.last_error is not None)
            _write(tmp_path, "default.yaml", DEFAULT + "priority: 3\n")
            await _until(lambda: watcher.last_error is None)
            return watcher, watcher.current.match("t", None, None).priority
        finally:
            await watcher.stop()

    watcher, priority = asyncio.run(scenario())
    assert priority == 3 and watcher.last_error is None


def test_requests_never_fail_during_reloads(tmp_path):
    """Matching keeps answering with a whole set while files change underneath it."""
    _write(tmp_path, "default.yaml", DEFAULT)
    answers: list[str] = []
    done = asyncio.Event()

    async def scenario() -> None:
        watcher = PolicyWatcher(tmp_path, interval=0.02)
        await watcher.start()

        async def requests() -> None:
            while not done.is_set():
                answers.append(watcher.current.match("acme", "m", "s").id)
                await asyncio.sleep(0)

        async def edits() -> None:
            for n in range(1, 4):
                _write(tmp_path, "default.yaml", DEFAULT.replace("id: default", f"id: default{n}"))
                await _until(lambda n=n: watcher.current.get(f"default{n}") is not None)
                _write(tmp_path, "broken.yaml", "id: [" * n)
                await _until(lambda: watcher.last_error is not None)
                (tmp_path / "broken.yaml").unlink()
            done.set()

        try:
            await asyncio.gather(requests(), edits())
        finally:
            await watcher.stop()

    asyncio.run(scenario())
    assert set(answers) == {"default", "default1", "default2", "default3"}


def test_invalid_folder_fails_at_start(tmp_path):
    """A watcher is never created over an invalid folder: the gateway does not start."""
    _write(tmp_path, "default.yaml", "id: default\n")
    with pytest.raises(ConfigError, match="required field 'session' is missing"):
        PolicyWatcher(tmp_path)


def test_stop_ends_polling(tmp_path):
    """After stop(), further edits are not picked up."""
    _write(tmp_path, "default.yaml", DEFAULT)

    async def scenario() -> PolicyWatcher:
        watcher = PolicyWatcher(tmp_path, interval=0.01)
        await watcher.start()
        await watcher.stop()
        _write(tmp_path, "default.yaml", DEFAULT.replace("id: default", "id: changed"))
        await asyncio.sleep(0.1)
        return watcher

    watcher = asyncio.run(scenario())
    assert watcher.current.get("default") is not None and watcher.current.get("changed") is None
