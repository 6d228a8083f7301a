"""``gateway.console.jobs``: verification and export jobs, limited per auditor token."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from gateway.auth import Principal
from gateway.console import jobs as jobs_module
from gateway.console.jobs import MAX_RUNNING_PER_AUDITOR, Job, Jobs, TooManyRunning
from tests.conftest import Gateway
from tests.console.conftest import login_csrf, signed_in_client

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
