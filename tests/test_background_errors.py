"""A background task's failure is logged with what the operator needs to act: for an OSError its
errno name, the system's message and the file (a full disk and a permission error call for
different fixes); it used to be the type alone (``"error": "OSError"``). Never a client's text."""

from __future__ import annotations

import asyncio
import errno

from structlog.testing import capture_logs

from gateway.background import Backoff, Health, Worker
from gateway.errors import BadRequest, StoreUnavailable
from gateway.logs import error_cause


class FullDisk(Worker):
    name = "checkpointer-like"
    interval, first_delay, backoff = 0.01, 0.0, Backoff(0.01, 0.01)

    def __init__(self) -> None:
        self.calls = 0

    async def step(self) -> None:
        self.calls += 1
        if self.calls == 1:
            raise OSError(errno.ENOSPC, "No space left on device", "/var/lib/sessiongate/checkpoints.jsonl")


def test_a_retried_step_logs_the_errno_message_and_file() -> None:
    async def scenario() -> Health:
        worker, health = FullDisk(), Health()
        worker.attach(health)
        await worker.start()
        while worker.calls < 2:
            await asyncio.sleep(0.01)
        await worker.stop()
        return health

    with capture_logs() as logs:
        health = asyncio.run(scenario())
    (line,) = [e for e in logs if e["event"] == "background_task_retry"]
    assert line["error"] == "OSError" and line["errno"] == "ENOSPC", line
    assert line["detail"] == "No space left on device" and line["file"].endswith("checkpoints.jsonl"), line
    assert [t.last_error for t in health.snapshot()] == ["OSError ENOSPC"]


def test_only_operator_facing_text_is_kept() -> None:
    """A client-facing error's message (which may quote what a client sent) is never a log field;
    the store's own operator message is."""
    assert error_cause(BadRequest("field 'x' is 4111 1111 1111 1111")) == {"error": "BadRequest"}
    assert error_cause(StoreUnavailable("the SQLite store failed to commit: disk is full")) == {
        "error": "StoreUnavailable", "detail": "the SQLite store failed to commit: disk is full"}
    assert error_cause(ValueError("my card is 4111")) == {"error": "ValueError"}
    assert error_cause(None) == {"error": None}
