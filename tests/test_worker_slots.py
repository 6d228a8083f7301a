"""The supervisor's slots (``gateway.workers.Supervisor``) with stand-in workers: a slot whose
workers keep failing to start rests and is tried again, so a passing cause (an invalid policy
file being fixed, a database coming back) never costs a worker for good. It used to be given up
after about six seconds of failures and never tried again, the gateway serving on with fewer
workers and only a log line saying so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.conftest import wait_for

# A worker that starts (tells the supervisor it listens, then waits for SIGTERM); the one in slot 1
# only while the marker file exists, failing at once otherwise, as a worker refusing an invalid
# policy does. Slot 0 keeps serving (with every slot resting the supervisor exits 1, by design).
WORKER = textwrap.dedent("""
    import os, signal, sys, time
    from gateway.workers import READY_ENV, WORKER_ENV
    if os.environ[WORKER_ENV] == "1" and not os.path.exists(sys.argv[1]):
        sys.exit(2)
    fd = int(os.environ[READY_ENV])
    os.write(fd, f"{os.getpid()}\\n".encode())
    os.close(fd)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(0.05)
""")

SUPERVISOR = textwrap.dedent("""
    import sys
    import gateway.workers as w
    w.MAX_RESTARTS, w.REST_FIRST, w.REST_MAX = 1, 0.3, 0.6
    sys.exit(w.Supervisor([sys.executable, "-c", sys.argv[1], sys.argv[2]], 2, 1.0).run())
""")


def _supervise(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """A supervisor of two stand-in workers: the process, its log and slot 1's marker file."""
    marker = tmp_path / "startable"
    marker.touch()
    out = tmp_path / "supervisor.log"
    with out.open("wb") as sink:
        sup = subprocess.Popen([sys.executable, "-c", SUPERVISOR, WORKER, str(marker)], stdout=sink,
                               stderr=subprocess.STDOUT)
    return sup, out, marker


def test_a_slot_that_keeps_failing_rests_and_comes_back_when_the_cause_is_gone(tmp_path: Path) -> None:
    sup, out, marker = _supervise(tmp_path)
    try:
        wait_for(lambda: "worker_started" in out.read_text(), 20)
        wait_for(lambda: "pids " in out.read_text(), 20)
        second = int(out.read_text().split("pids ")[1].split()[1])
        marker.unlink()  # the cause: slot 1's new workers now fail to start
        os.kill(second, signal.SIGKILL)
        wait_for(lambda: "worker_slot_resting" in out.read_text(), 20)
        rested = out.read_text().count("worker_slot_resting")
        wait_for(lambda: out.read_text().count("worker_slot_resting") > rested, 20)
        assert sup.poll() is None, "a resting slot is not the end of the supervisor"
        marker.touch()  # the cause is gone
        wait_for(lambda: "worker_slot_restored" in out.read_text(), 20)
        assert out.read_text().count("worker_started") >= 3
    finally:
        sup.send_signal(signal.SIGTERM)
        status = sup.wait(20)
    assert status == 0, out.read_text()
    assert "Traceback" not in out.read_text(), out.read_text()


def test_sighup_stops_the_supervisor_and_its_workers_with_a_drain(tmp_path: Path) -> None:
    """SIGHUP (a closing terminal) is a stop like SIGTERM: forwarded, waited for, exit 0."""
    sup, out, _ = _supervise(tmp_path)
    try:
        wait_for(lambda: "pids " in out.read_text(), 20)
        worker = int(out.read_text().split("pids ")[1].split()[0])
        sup.send_signal(signal.SIGHUP)
        status = sup.wait(20)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
    assert status == 0 and "workers_stopped" in out.read_text(), out.read_text()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the worker outlived its supervisor's SIGHUP")
