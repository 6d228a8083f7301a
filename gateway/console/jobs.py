"""Verification and export runs started from the console, in the background, with progress.

A job belongs to the auditor who started it (no one else can see it or download its bundle),
runs as an asyncio task, and reports ``checked``/``exported`` counts while it runs. Export
bundles (redacted text, in plaintext) go to a private temporary folder
(``$TMPDIR/sessiongate-console-*``, mode 0700, files 0600: ``gateway.export.PrivateFolder``)
that is removed when the job is dropped or the gateway stops; one a killed gateway left is
removed by the next gateway at start-up. When a session is erased in this process
(:meth:`Jobs.erased`), every export job that covers it (its session, or its whole tenant) is
stopped if running, its bundle deleted, and the job marked failed saying so. Limits are per
auditor token, so no auditor can push another's jobs out: at most ``MAX_RUNNING_PER_AUDITOR``
run at once (starting another raises :class:`TooManyRunning`), and at most
``MAX_JOBS_PER_AUDITOR`` are kept, that auditor's oldest finished going first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import os
import secrets
import tarfile
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import structlog

from gateway.audit import VerifyReport
from gateway.auth import Principal
from gateway.errors import IntegrityError, NotFound
from gateway.export import PrivateFolder, Progress, bundle_paths
from gateway.store.base import AuditRow

log = structlog.get_logger("gateway.console")
MAX_JOBS_PER_AUDITOR = 50
"""Jobs kept per auditor token, running and finished (a finished export holds its bundle)."""
MAX_RUNNING_PER_AUDITOR = 4
"""Verifications and exports one auditor token may have running at once: each reads a whole chain
or a tenant's data."""


class TooManyRunning(Exception):
    """The auditor already has ``MAX_RUNNING_PER_AUDITOR`` jobs running."""


@dataclass
class Job:
    id: str
    kind: str  # "verify" or "export"
    tenant: str
    owner: str  # the console session that started it: the only one that sees it
    auditor: Principal  # whose limits it counts against
    params: dict[str, Any]
    started: float = field(default_factory=time.time)
    status: str = "running"  # running | done | failed
    count: int = 0
    phase: str = "chain"  # verify: "chain", then "data" (stored rows against the chain)
    report: VerifyReport | None = None
    manifest: dict[str, Any] | None = None
    error: str | None = None
    folder: Path | None = None
    out: Path | None = None
    private: PrivateFolder | None = None
    task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.status == "running"

    def bundle(self) -> TarStream:
        """The finished bundle (records, manifest, audit entries) as one tar archive, read from
        disk as it is sent. Raises ``OSError`` when a file is gone."""
        assert self.out is not None
        return TarStream(bundle_paths(self.out))


class TarStream:
    """A ustar/pax archive of some files, made as it is read: the files are opened at once (a
    bundle deleted meanwhile is still sent whole), and read a chunk at a time (``read_chunk`` is
    blocking: call it off the event loop), so a download holds one chunk in memory, not the
    bundle."""

    CHUNK = 256 * 1024

    def __init__(self, paths: Iterable[Path]) -> None:
        self._parts: list[bytes | tuple[BinaryIO, int]] = []
        self.size = 0
        try:
            for path in paths:
                f = path.open("rb")
                self._parts.append((f, 0))  # placeholder until its header is made
                stat = os.fstat(f.fileno())
                info = tarfile.TarInfo(path.name)
                info.size, info.mtime, info.mode = stat.st_size, int(stat.st_mtime), stat.st_mode & 0o7777
                header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
                padding = -stat.st_size % tarfile.BLOCKSIZE
                self._parts[-1:] = [header, (f, stat.st_size), b"\0" * padding]
                self.size += len(header) + stat.st_size + padding
        except BaseException:
            self.close()
            raise
        end = 2 * tarfile.BLOCKSIZE  # two empty blocks end the archive; tarfile pads it to a whole record
        end += -(self.size + end) % tarfile.RECORDSIZE
        self._parts.append(b"\0" * end)
        self.size += end

    def read_chunk(self) -> bytes:
        """The next bytes of the archive, ``b""`` at its end (blocking)."""
        while self._parts:
            part = self._parts[0]
            if isinstance(part, bytes):
                self._parts.pop(0)
                if part:
                    return part
                continue
            f, left = part
            data = f.read(min(self.CHUNK, left))
            if len(data) < min(self.CHUNK, left):
                raise OSError(f"{f.name} got shorter while it was sent")
            left -= len(data)
            if left:
                self._parts[0] = (f, left)
            else:
                f.close()
                self._parts.pop(0)
            if data:
                return data
        return b""

    def close(self) -> None:
        for part in self._parts:
            if isinstance(part, tuple):
                part[0].close()
        self._parts = []


class Counting:
    """Wraps an async iterator of audit rows and counts them into a job."""

    def __init__(self, rows: AsyncIterator[AuditRow], job: Job) -> None:
        self._rows, self._job = rows, job

    def __aiter__(self) -> Counting:
        return self

    async def __anext__(self) -> AuditRow:
        row = await self._rows.__anext__()
        self._job.count += 1
        if self._job.count % 500 == 0:
            await asyncio.sleep(0)  # let pages that poll the progress be served
        return row

    async def aclose(self) -> None:
        closer = getattr(self._rows, "aclose", None)
        if closer is not None:
            await closer()


class JobProgress(Progress):
    """The export's record counter, written into the job instead of a terminal."""

    def __init__(self, job: Job) -> None:
        super().__init__(stream=io.StringIO())
        self.job = job

    def tick(self, n: int = 1) -> None:
        super().tick(n)
        self.job.count = self.count


class Jobs:
    def __init__(self) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    def start(self, kind: str, tenant: str, owner: str, auditor: Principal, params: dict[str, Any],
              work: Callable[[Job], Awaitable[None]]) -> Job:
        """Run *work* as a new job of *auditor*'s console session *owner*. Raises
        :class:`TooManyRunning` when *auditor* has ``MAX_RUNNING_PER_AUDITOR`` jobs running."""
        if sum(1 for j in self._jobs.values() if j.auditor == auditor and j.running) >= MAX_RUNNING_PER_AUDITOR:
            raise TooManyRunning()
        job = Job(secrets.token_urlsafe(12), kind, tenant, owner, auditor, params)
        self._jobs[job.id] = job
        self._evict(auditor)

        async def run() -> None:
            try:
                await work(job)
                job.status = "done"
            except NotFound as exc:  # a session (or tenant) that is not there: the message names it
                job.status, job.error = "failed", exc.message
                log.info("console_job_failed", kind=kind, tenant=tenant, error="NotFound")
            except IntegrityError as exc:  # what differs names tenant, session, round and entry, never content
                job.status, job.error = "failed", f"the stored data failed an integrity check: {exc.detail}"
                log.error("console_job_failed", kind=kind, tenant=tenant, error="IntegrityError", detail=exc.detail)
            except Exception as exc:  # noqa: BLE001 - shown on the job page by type; details logged
                job.status, job.error = "failed", type(exc).__name__
                log.error("console_job_failed", kind=kind, tenant=tenant, error=type(exc).__name__)

        job.task = asyncio.create_task(run(), name=f"console-{kind}")
        return job

    def get(self, job_id: str, owner: str) -> Job | None:
        job = self._jobs.get(job_id)
        return job if job is not None and job.owner == owner else None

    def private_folder(self, job: Job) -> Path:
        job.private = PrivateFolder("console")
        job.folder = job.private.path
        return job.folder

    def erased(self, tenant: str, session_id: str) -> None:
        """Session *session_id* of *tenant* was erased: stop every export job that covers it
        (that session, or the whole tenant), delete its bundle, and mark it failed."""
        for job in self._jobs.values():
            covered = job.params.get("session") in (None, session_id)
            if job.kind != "export" or job.tenant != tenant or not covered:
                continue
            if job.private is None and not job.running:
                continue  # failed before it wrote anything
            if job.task is not None and not job.task.done():
                job.task.cancel()
                job.task.add_done_callback(functools.partial(_remove_after, job))
            _remove(job)
            job.status, job.out = "failed", None
            job.error = (f"session {session_id} of tenant {tenant}, which this export covered, was erased: its "
                         "bundle was deleted. Export again for a bundle without it.")
            log.info("console_export_dropped", tenant=tenant, session_id=session_id, reason="erasure")

    def _evict(self, auditor: Principal) -> None:
        """Drop *auditor*'s oldest finished jobs past ``MAX_JOBS_PER_AUDITOR`` (never another's)."""
        mine = [j for j in self._jobs.values() if j.auditor == auditor]
        finished = [j for j in mine if not j.running]
        for job in finished[:max(0, len(mine) - MAX_JOBS_PER_AUDITOR)]:
            self._drop(job)

    def _drop(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        _remove(job)

    async def close(self) -> None:
        for job in list(self._jobs.values()):
            if job.task is not None and not job.task.done():
                job.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await job.task
            self._drop(job)


def _remove(job: Job) -> None:
    """Delete the job's bundle folder, if it has one."""
    if job.private is not None:
        job.private.remove()


def _remove_after(job: Job, _task: asyncio.Task[None]) -> None:
    _remove(job)
