"""Background tasks survive their errors: logged retries with backoff, health in /metrics, /readyz
unready while a task cannot do its job and ready again when it recovers."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from gateway import keys as keys_module
from gateway import retention as retention_module
from gateway.background import Background, Backoff, Health
from gateway.handlers import SERVICES
from gateway.policy import reload as reload_module
from tests.conftest import REPO, wait_for

CANARY = "CANARY-4111-1111-1111-1111"
TASKS = ("checkpointer", "keyring-watcher", "policy-watcher", "retention", "window-maintenance")


def _metric(text: str, name: str, task: str) -> float | None:
    prefix = f'{name}{{task="{task}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return None


def _readyz(url: str) -> httpx.Response:
    return httpx.get(f"{url}/readyz", timeout=10)


class _Flaky:
    """Raises ``OSError(EMFILE)`` while ``broken`` is set, else calls *real*; counts calls."""

    def __init__(self, real: Any) -> None:
        self.real, self.broken, self.failures = real, threading.Event(), 0

    def __call__(self, *args: Any, **kw: Any) -> Any:
        if self.broken.is_set():
            self.failures += 1
            raise OSError(errno.EMFILE, f"Too many open files {CANARY}")
        return self.real(*args, **kw)


def test_every_background_task_reports_health_in_metrics(gateway) -> None:
    """A healthy gateway exposes up=1 and zero failures for each of its background tasks."""
    assert _readyz(gateway.url).status_code == 200
    text = httpx.get(f"{gateway.url}/metrics").text
    for task in TASKS:
        assert _metric(text, "sessiongate_background_task_up", task) == 1.0, task
        assert _metric(text, "sessiongate_background_task_failures_total", task) == 0.0, task


def test_policy_watcher_survives_descriptor_exhaustion(make_gateway, monkeypatch, tmp_path: Path) -> None:
    """The watcher's read raising OSError makes /readyz 503 naming it; it retries, recovers, and the
    edit made meanwhile takes effect."""
    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies)
    gw = make_gateway(policies)
    watcher = gw.app[SERVICES].policies
    watcher.backoff = Backoff(0.05, 0.2)
    flaky = _Flaky(reload_module.fingerprint)
    monkeypatch.setattr(reload_module, "fingerprint", flaky)
    with capture_logs() as logs:
        flaky.broken.set()
        ready = wait_for(lambda: (r := _readyz(gw.url)).status_code == 503 and r)
        body = ready.json()
        assert body["status"] == "unavailable"
        assert "policy-watcher" in body["reason"] and "OSError" in body["reason"]
        wait_for(lambda: flaky.failures >= 3)
        text = httpx.get(f"{gw.url}/metrics").text
        assert _metric(text, "sessiongate_background_task_up", "policy-watcher") == 0.0
        assert (_metric(text, "sessiongate_background_task_failures_total", "policy-watcher") or 0) >= 3
        # an edit while the watcher cannot read the folder
        (policies / "zz-extra.yaml").write_text(
            "id: zz-extra\npriority: 50\nmatch: {tenants: [nobody]}\nsession: {input_keys: null, reply_keys: null}\n")
        flaky.broken.clear()
        wait_for(lambda: _readyz(gw.url).status_code == 200)
        wait_for(lambda: watcher.current.get("zz-extra") is not None)
    text = httpx.get(f"{gw.url}/metrics").text
    assert _metric(text, "sessiongate_background_task_up", "policy-watcher") == 1.0
    assert (_metric(text, "sessiongate_background_task_last_success_timestamp_seconds", "policy-watcher")
            or 0) > 0
    retries = [e for e in logs if e["event"] == "background_task_retry" and e.get("task") == "policy-watcher"]
    assert retries and all(e["error"] == "OSError" for e in retries)
    assert CANARY not in repr(logs)


def test_checkpointer_survives_an_unwritable_checkpoint_file(make_gateway) -> None:
    """A checkpoint path that cannot be written makes /readyz 503 naming the checkpointer; once it
    can be written again the pending heads are signed and the gateway is ready."""
    gw = make_gateway(name="cp")
    cp_file = gw.dir / "checkpoints.jsonl"
    gw.app[SERVICES].audit.checkpointer.every_n = 1
    cp_file.unlink(missing_ok=True)
    cp_file.mkdir()  # writing the file now fails with IsADirectoryError, even as root
    client = gw.openai(session="acme:cp")
    client.chat.completions.create(model="standin", messages=[{"role": "user", "content": "one"}])
    ready = wait_for(lambda: (r := _readyz(gw.url)).status_code == 503 and r)
    assert "checkpointer" in ready.json()["reason"]
    text = httpx.get(f"{gw.url}/metrics").text
    assert _metric(text, "sessiongate_background_task_up", "checkpointer") == 0.0
    assert (_metric(text, "sessiongate_background_task_failures_total", "checkpointer") or 0) >= 1
    cp_file.rmdir()
    wait_for(lambda: _readyz(gw.url).status_code == 200, seconds=15)
    assert cp_file.is_file() and '"tenant":"acme"' in cp_file.read_text()
    text = httpx.get(f"{gw.url}/metrics").text
    assert _metric(text, "sessiongate_background_task_up", "checkpointer") == 1.0


def test_keyring_watcher_retries_a_failed_reload(monkeypatch) -> None:
    """A keyring file that cannot be loaded after it changed is retried until it loads; meanwhile the
    watcher is unhealthy, and it never takes the change as seen without loading it."""
    class Ring:
        primary_id = "k1"

        def ids(self) -> list[str]:
            return ["k1"]

    loads = 0

    def load() -> Ring:
        nonlocal loads
        loads += 1
        if loads <= 2:
            raise OSError(errno.EMFILE, CANARY)
        return Ring()

    async def body(path: Path) -> tuple[Health, Any]:
        sessions = SimpleNamespace(keyring=Ring(), store=None)
        watcher = keys_module.KeyringWatcher(path, load, sessions, interval=0.01)  # type: ignore[arg-type]
        watcher.backoff = Backoff(0.01, 0.02)
        health = Health()
        watcher.attach(health)
        path.write_text("changed")
        await watcher.start()
        for _ in range(500):
            await asyncio.sleep(0.01)
            if loads >= 3:
                break
        await asyncio.sleep(0.05)
        await watcher.stop()
        return health, sessions

    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "keys.json"
        path.write_text("x")
        with capture_logs() as logs:
            health, sessions = asyncio.run(body(path))
    assert loads == 3  # two failures, then one load; the change is not reloaded again afterwards
    task = health.snapshot()[0]
    assert task.up and task.failures_total == 2 and task.last_success is not None
    assert CANARY not in repr(logs)


def test_retention_retries_with_backoff(monkeypatch) -> None:
    """A purge that fails is retried soon (not an interval later), and the task recovers."""
    calls = 0

    async def purge(sessions: Any, policies: Any) -> dict[str, int]:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise OSError(errno.EIO, CANARY)
        return {"rounds": 0, "sessions": 0}

    monkeypatch.setattr(retention_module, "purge_expired", purge)

    async def body() -> Health:
        task = retention_module.RetentionTask(None, SimpleNamespace(current=None), interval=3600)  # type: ignore[arg-type]
        task.backoff = Backoff(0.01, 0.02)
        health = Health()
        task.attach(health)
        await task.start()
        for _ in range(300):
            await asyncio.sleep(0.01)
            if calls >= 3:
                break
        await task.stop()
        return health

    health = asyncio.run(body())
    assert calls == 3
    state = health.snapshot()[0]
    assert state.up and state.failures_total == 2


def test_window_maintenance_is_retried_and_reported() -> None:
    """A window-maintenance job that fails is retried with backoff; health shows the failures and the
    recovery; logs carry the exception type, never its text."""
    async def body() -> tuple[Health, int, list[bool]]:
        calls = 0
        seen: list[bool] = []
        health = Health()
        bg = Background(health, backoff=Backoff(0.01, 0.02))

        async def job() -> None:
            nonlocal calls
            calls += 1
            seen.append(health.unready() == [])
            if calls <= 2:
                raise ValueError(f"invalid literal for int(): {CANARY!r}")

        bg.start(("acme", "s"), job)
        for _ in range(300):
            await asyncio.sleep(0.01)
            if calls >= 3 and not bg._tasks:
                break
        await bg.drain()
        return health, calls, seen

    with capture_logs() as logs:
        health, calls, seen = asyncio.run(body())
    assert calls == 3
    assert seen == [True, False, False]  # unready while its last attempt had failed
    state = health.snapshot()[0]
    assert state.name == "window-maintenance" and state.up and state.failures_total == 2
    assert [e["error"] for e in logs if e["event"] == "background_task_retry"] == ["ValueError", "ValueError"]
    assert CANARY not in repr(logs)


def test_a_job_that_keeps_failing_gives_up_and_stays_reported() -> None:
    """After its attempts a failing job gives up (logged) and the task stays unready until a job
    succeeds."""
    async def body() -> Health:
        health = Health()
        bg = Background(health, attempts=3, backoff=Backoff(0.001, 0.002))

        async def bad() -> None:
            raise OSError(errno.EIO, CANARY)

        bg.start("k", bad)
        await asyncio.sleep(0.1)
        await bg.drain()
        return health

    with capture_logs() as logs:
        health = asyncio.run(body())
    state = health.snapshot()[0]
    assert not state.up and state.failures_total == 3
    assert any(e["event"] == "background_task_gave_up" for e in logs)
    assert CANARY not in repr(logs)


@pytest.mark.parametrize("name", ["OSError"])
def test_health_collector_renders_prometheus_text(name: str) -> None:
    """Health is a prometheus collector: up, failures_total and last success per task."""
    from prometheus_client import CollectorRegistry, generate_latest

    health = Health(clock=lambda: 1234.0)
    health.register("a")
    health.failed("b", OSError())
    health.succeeded("c")
    registry = CollectorRegistry()
    registry.register(health)
    text = generate_latest(registry).decode()
    assert _metric(text, "sessiongate_background_task_up", "a") == 1.0
    assert _metric(text, "sessiongate_background_task_up", "b") == 0.0
    assert _metric(text, "sessiongate_background_task_failures_total", "b") == 1.0
    assert _metric(text, "sessiongate_background_task_last_success_timestamp_seconds", "c") == 1234.0
    assert [t.name for t in health.unready()] == ["b"] and health.unready()[0].last_error == name
    assert os.environ is not None
