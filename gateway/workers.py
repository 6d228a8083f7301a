"""``sessiongate serve --workers N``: N gateway processes on one port, under one supervisor.

Contract:

- The **supervisor** (the process ``serve`` was started as) checks the configuration and the
  port, then starts each worker as ``python -m gateway serve ...`` with the same arguments and
  ``SESSIONGATE_WORKER=<index>`` in its environment. It never opens the store or serves a request.
- **Start-up is one at a time**: worker 0 starts alone and is waited for until it listens, so the
  one-time work (creating the keyring, the audit signing key, the SQLite file or the PostgreSQL
  schema, migrations) happens once; the others start after it. A worker tells it listens by
  writing one line to the pipe named by ``SESSIONGATE_READY_FD``. A worker that fails to start
  stops the supervisor, with the worker's exit status when it is 2 (its one-line error names
  unusable input: a file that cannot be created, a missing key file), else 1.
- Each **worker** is a full gateway (its own store connections, policy and key watchers,
  checkpointer) listening with ``SO_REUSEPORT`` on the shared port; the kernel spreads new
  connections over them. Every response of a worker carries ``X-Sessiongate-Worker: <pid>``
  (see ``gateway.server.serve``), and the supervisor logs ``worker_started`` with each worker's
  index and pid: that is how to find them.
- The guarantees are the store's, not the supervisor's: a round commits in one transaction that
  applies the session's plan to the latest rows (SQLite's ``BEGIN IMMEDIATE`` serialises writers
  across processes; PostgreSQL's per-tenant advisory lock does the same), so rounds are neither
  lost nor reordered and each tenant keeps one audit chain. Policy and key files are polled by
  every worker, so a reload or a rotation reaches all of them within their poll interval.
  Checkpoints from all workers go to the one checkpoint file, each batch in a single
  ``write()`` under ``O_APPEND`` (``gateway.audit.CheckpointLog``), so lines never interleave;
  ``audit verify`` sorts them by seq.
- A worker that **dies** (a crash, ``kill -9``) is logged (``worker_exited``, with its exit
  status) and restarted in its slot; a slot that dies more than ``MAX_RESTARTS`` times within
  ``RESTART_WINDOW`` seconds rests (``worker_slot_resting``, with the delay) and is tried again
  after ``REST_FIRST`` seconds, doubling to ``REST_MAX`` while it keeps failing: a cause that
  passes (an invalid policy file being fixed, a database back up) costs the slot a while, never
  for good. When every slot rests at once the supervisor exits with status 1, so a service
  manager restarts the unit.
- A supervisor that dies (even by SIGKILL) takes its workers with it: each asked the kernel
  for SIGTERM on its parent's death (``PR_SET_PDEATHSIG``) and drains as on a normal stop.
- **SIGTERM / SIGINT / SIGHUP** to the supervisor is forwarded to every worker (as SIGTERM; a
  closing terminal sends SIGHUP to them all); each drains as a single
  gateway does (``server.shutdown_timeout``) and the supervisor waits for all of them, killing
  any still running after twice that timeout plus ``KILL_GRACE`` seconds. Exit status 0.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger("gateway.workers")

WORKER_ENV = "SESSIONGATE_WORKER"
"""Set (to the worker's index) in a worker's environment; unset in a single gateway."""
READY_ENV = "SESSIONGATE_READY_FD"
"""The descriptor a worker writes one line to once it listens."""
SUPERVISOR_ENV = "SESSIONGATE_SUPERVISOR"
"""The supervisor's pid, in a worker's environment."""
PR_SET_PDEATHSIG = 1
WORKER_HEADER = "X-Sessiongate-Worker"
READY_TIMEOUT = 60.0
MAX_RESTARTS = 5
RESTART_WINDOW = 30.0
REST_FIRST = 30.0
REST_MAX = 300.0
KILL_GRACE = 5.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""What stops the supervisor, and a gateway, with a drain (``gateway.server.serve``)."""


def worker_index() -> int | None:
    """This process's worker index when it runs under a supervisor, else None."""
    value = os.environ.get(WORKER_ENV)
    return int(value) if value is not None and value.isdigit() else None


def default_workers(backend: str) -> int:
    """The worker count ``serve`` uses without ``--workers``: 1, on either backend.

    Measured (README, "Performance"; 2 cores shared with the clients, the upstream and the
    database): with the machine running fast, a second worker changed throughput by -12% to +11%
    on SQLite or PostgreSQL and cost 13-40% more CPU per request, as there is no idle core for
    it; with it running slow, it added 7-30% for JSON and 0-21% for streams. The gain depends on
    how busy the machine is, so one worker is the default; on SQLite every worker's commits also
    share the one file's write lock (they take turns, ``gateway.store.sqlite``).
    Workers pay off when the gateway has cores of its own and a store that takes concurrent
    writers (PostgreSQL on its own host, several tenants): then pass ``--workers`` with the
    number of those cores."""
    return 1


WORKERS_PER_CPU = 4


def max_workers() -> int:
    """The most workers ``serve --workers`` starts: :data:`WORKERS_PER_CPU` per CPU, at least 8.
    More cannot run at once, and each holds its own store connections (a PostgreSQL pool each) and
    its own caches: a mistyped count would exhaust the database's connections or the memory
    before serving anything."""
    return max(8, WORKERS_PER_CPU * (os.cpu_count() or 1))


def die_with_supervisor() -> None:
    """In a worker: ask the kernel for SIGTERM when the supervisor dies (even by SIGKILL), so no
    worker outlives it holding the port; exit at once when it is already gone. Linux only (a
    no-op elsewhere)."""
    parent = os.environ.get(SUPERVISOR_ENV)
    if parent is None or not parent.isdigit():
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):
        raise SystemExit(0)


def notify_ready() -> None:
    """In a worker: tell the supervisor it listens (a no-op in a single gateway)."""
    fd = os.environ.pop(READY_ENV, None)
    if fd is None or not fd.isdigit():
        return
    try:
        os.write(int(fd), f"{os.getpid()}\n".encode())
        os.close(int(fd))
    except OSError:
        pass


@dataclass
class Slot:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    deaths: list[float] = field(default_factory=list)
    abandoned: bool = False
    """Resting after dying too often: no worker until ``retry_at``."""
    retry_at: float = 0.0
    rest: float = 0.0


class Supervisor:
    """Starts, watches and stops the workers (see the module docstring)."""

    def __init__(self, argv: Sequence[str], count: int, shutdown_timeout: float) -> None:
        self.argv = list(argv)
        self.slots = [Slot(i) for i in range(count)]
        self.shutdown_timeout = shutdown_timeout
        self.stopping = False

    def _spawn(self, slot: Slot) -> bool:
        """Start the slot's worker and wait until it listens; False when it exited first or timed out."""
        read_fd, write_fd = os.pipe()
        env = {**os.environ, WORKER_ENV: str(slot.index), READY_ENV: str(write_fd),
               SUPERVISOR_ENV: str(os.getpid())}
        try:
            slot.proc = subprocess.Popen(self.argv, env=env, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        try:
            deadline = time.monotonic() + READY_TIMEOUT
            while not self.stopping:
                ready, _, _ = select.select([read_fd], [], [], 0.2)
                if ready:
                    if os.read(read_fd, 64):
                        log.info("worker_started", index=slot.index, pid=slot.proc.pid)
                        return True
                    return False  # the pipe closed without a line: the worker exited
                if slot.proc.poll() is not None or time.monotonic() > deadline:
                    return False
            return False
        finally:
            os.close(read_fd)

    def _stop(self, _sig: int, _frame: object) -> None:
        self.stopping = True

    def run(self) -> int:
        """Blocking: start every worker, restart those that die, stop all on SIGTERM/SIGINT/SIGHUP."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._stop)
        try:
            for slot in self.slots:
                if not self._spawn(slot) and not self.stopping:
                    status = None
                    if slot.proc is not None:  # it closed its pipe as it exits: its status says why
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            status = slot.proc.wait(timeout=KILL_GRACE)
                    log.error("worker_failed_to_start", index=slot.index, status=status)
                    return 2 if status == 2 else 1  # 2: the worker's one-line error is about unusable input
            pids = [s.proc.pid for s in self.slots if s.proc is not None]
            print(f"sessiongate: {len(pids)} workers, pids {' '.join(map(str, pids))}", file=sys.stderr, flush=True)
            while not self.stopping:
                time.sleep(0.2)
                for slot in self.slots:
                    if not self.stopping:
                        self._check(slot)
                if all(s.abandoned for s in self.slots):
                    log.error("all_workers_abandoned")
                    return 1
            return 0
        finally:
            self._shutdown()

    def _check(self, slot: Slot) -> None:
        now = time.monotonic()
        if slot.abandoned:
            if now >= slot.retry_at:
                self._retry(slot, now)
            return
        proc = slot.proc
        if proc is None or proc.poll() is None:
            return
        slot.deaths = [t for t in slot.deaths if now - t < RESTART_WINDOW] + [now]
        log.warning("worker_exited", index=slot.index, pid=proc.pid, status=proc.returncode)
        if len(slot.deaths) > MAX_RESTARTS:
            slot.abandoned, slot.rest = True, REST_FIRST
            slot.retry_at = now + slot.rest
            log.error("worker_slot_resting", index=slot.index, deaths=len(slot.deaths),
                      window_seconds=RESTART_WINDOW, retry_in=slot.rest,
                      note="its workers keep failing to start or dying: their own log lines say why")
            return
        if not self._spawn(slot) and not self.stopping:
            log.error("worker_restart_failed", index=slot.index)

    def _retry(self, slot: Slot, now: float) -> None:
        """Try a resting slot again: back in service when its worker starts, else rest longer."""
        if self._spawn(slot):
            slot.abandoned, slot.deaths, slot.rest = False, [], 0.0
            log.info("worker_slot_restored", index=slot.index)
        elif not self.stopping:
            slot.rest = min(slot.rest * 2, REST_MAX)
            slot.retry_at = time.monotonic() + slot.rest
            log.error("worker_slot_resting", index=slot.index, retry_in=slot.rest,
                      status=slot.proc.poll() if slot.proc else None)

    def _shutdown(self) -> None:
        live = [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 2 * self.shutdown_timeout + KILL_GRACE
        for proc in live:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker_killed", pid=proc.pid, reason="did not stop in time")
                proc.kill()
                proc.wait()
        log.info("workers_stopped", count=len(live))


def worker_argv() -> list[str]:
    """The command line a worker runs: this interpreter, ``-m gateway``, and the same arguments."""
    return [sys.executable, "-m", "gateway", *sys.argv[1:]]
