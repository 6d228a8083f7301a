"""``gateway.console.jobs``: verification and export jobs, limited per auditor token."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from gateway.auth import Principal
from gateway.console import jobs as jobs_module
from gateway.console.jobs import MAX_RUNNING_PER_AUDITOR, Job, Jobs, TooManyRunning
from gateway.export import PrivateFolder
from tests.conftest import REPO, Gateway, wait_for
from tests.console.conftest import login_csrf, signed_in_client
from tests.test_erasure import delete

VICTIM = Principal("demo-auditor", None, "auditor")
NOISY = Principal("acme-auditor", None, "auditor", frozenset({"acme"}))


async def _done(job: Job) -> None:
    return None


def test_one_auditors_jobs_never_push_out_anothers_finished_export() -> None:
    """Another auditor starting hundreds of jobs leaves an auditor's finished export in place,
    where one process-wide list of 200 used to drop it (its download then 404)."""

    async def run() -> None:
        jobs = Jobs()
        kept = jobs.start("export", "globex", "victim-session", VICTIM, {}, _done)
        await kept.task  # type: ignore[misc]
        started = []
        for _ in range(400):
            started.append(jobs.start("verify", "acme", "noisy-session", NOISY, {}, _done))
            await started[-1].task  # type: ignore[misc]
        assert jobs.get(kept.id, "victim-session") is kept and kept.status == "done"
        assert jobs.get(started[-1].id, "noisy-session") is not None
        assert jobs.get(started[0].id, "noisy-session") is None  # its own oldest went first
        await jobs.close()

    asyncio.run(run())


def test_an_auditor_has_a_limited_number_of_jobs_running() -> None:
    """Past ``MAX_RUNNING_PER_AUDITOR`` running jobs an auditor's next start is refused until one
    finishes; another auditor can still start one. (Running jobs used to be unlimited.)"""

    async def run() -> None:
        jobs = Jobs()
        release = asyncio.Event()

        async def held(job: Job) -> None:
            await release.wait()

        running = [jobs.start("verify", "acme", "noisy", NOISY, {}, held) for _ in range(MAX_RUNNING_PER_AUDITOR)]
        with pytest.raises(TooManyRunning):
            jobs.start("verify", "acme", "noisy", NOISY, {}, held)
        other = jobs.start("verify", "globex", "victim", VICTIM, {}, _done)
        release.set()
        await asyncio.gather(*(j.task for j in [*running, other] if j.task is not None))
        jobs.start("verify", "acme", "noisy", NOISY, {}, _done)  # one finished: room again
        await jobs.close()

    asyncio.run(run())


def test_starting_a_job_past_the_running_limit_is_429_saying_to_wait(console_gateway: Gateway,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The console answers a verification or export it cannot start now with a 429 page that says
    to wait for a running one to finish (with Retry-After), not a job."""
    monkeypatch.setattr(jobs_module, "MAX_RUNNING_PER_AUDITOR", 0)
    client = signed_in_client(console_gateway)
    csrf = login_csrf(client.get("/console/overview").text)
    for action in ("/console/verify", "/console/export"):
        resp = client.post(action, data={"csrf": csrf, "tenant": "acme", "format": "jsonl"},
                           headers={"Origin": console_gateway.url})
        assert resp.status_code == 429 and "Retry-After" in resp.headers, resp.text
        assert "Wait for one of them to finish" in resp.text and "/console/jobs/" not in resp.text
    assert httpx.get(f"{console_gateway.url}/healthz", timeout=5).status_code == 200


def _bundle_files(root: Path) -> list[Path]:
    return [p for p in root.glob("sessiongate-*/*") if p.is_file() and p.name != ".owner"]


def test_erasing_a_session_deletes_the_export_bundles_that_hold_it(console_gateway: Gateway, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """An export bundle holding a session, in plaintext in $TMPDIR, is deleted when the session
    is erased: its download is 404 after, and its job page says why."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    client = signed_in_client(console_gateway)
    csrf = login_csrf(client.get("/console/overview").text)
    resp = client.post("/console/export", data={"csrf": csrf, "tenant": "acme", "format": "jsonl",
                                                "session": "console-a"}, headers={"Origin": console_gateway.url})
    assert resp.status_code == 303, resp.text
    job = resp.headers["location"]
    wait_for(lambda: "Done:" in client.get(job).text, seconds=30)
    assert client.get(f"{job}/download").status_code == 200
    assert any(b"second turn" in p.read_bytes() for p in _bundle_files(scratch))

    assert delete(console_gateway, "console-a").status_code == 200
    assert client.get(f"{job}/download").status_code == 404
    assert "was erased" in client.get(job).text
    assert _bundle_files(scratch) == [] and list(scratch.glob("sessiongate-console-*")) == []


def test_a_gateway_sweeps_the_bundle_folders_of_killed_processes_at_start_up(
        make_gateway: Callable[..., Gateway], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A console bundle folder left by a process killed with -9 is removed when a gateway
    starts; one whose owner still runs (another worker) is left alone."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from gateway.export import PrivateFolder; "
         "f = PrivateFolder('console'); (f.path / 'acme-export.jsonl').write_text('plaintext'); "
         "print(f.path, flush=True); time.sleep(60)"],
        cwd=REPO, env={**os.environ, "TMPDIR": str(scratch)}, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        dead = Path(child.stdout.readline().strip())
        assert (dead / "acme-export.jsonl").exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    alive = PrivateFolder("console")  # this process, still running
    try:
        make_gateway()
        assert not dead.exists()
        assert alive.path.exists()
    finally:
        alive.remove()


def test_an_export_of_a_session_the_tenant_never_had_fails_naming_it(console_gateway: Gateway) -> None:
    """The console's export of a misspelt session id said "Done: 0 records from 0 sessions"; its job
    now fails with the message that names the id, and appends no export entry."""
    exports = len([e for e in console_gateway.audit_entries() if e["event"] == "export"])
    client = signed_in_client(console_gateway)
    csrf = login_csrf(client.get("/console/overview").text)
    started = client.post("/console/export", data={"csrf": csrf, "tenant": "acme", "format": "jsonl",
                                                   "session": "acme:nope"}, headers={"Origin": console_gateway.url})
    assert started.status_code == 303, started.text
    page = wait_for(lambda: (lambda p: p if "It failed" in p.text else None)(client.get(started.headers["location"])))
    assert "no session &#39;acme:nope&#39; of tenant &#39;acme&#39;" in page.text, page.text
    assert len([e for e in console_gateway.audit_entries() if e["event"] == "export"]) == exports
