"""Durable before the last byte, in every protocol: when the client reads a stream's final event
(``response.completed``, ``message_stop``), the round is already committed."""

from __future__ import annotations

import sqlite3
from typing import Any

import httpx
import pytest

from tests.conftest import ACME_KEY, Gateway


def _rounds(gw: Gateway, sid: str) -> int:
    with sqlite3.connect(gw.db_path) as db:
        return int(db.execute("SELECT count(*) FROM rounds WHERE session_id = ?", (sid,)).fetchone()[0])


@pytest.mark.parametrize(("path", "body", "final"), [
    ("/v1/responses", {"model": "m", "input": "hi", "stream": True}, b"event: response.completed"),
    ("/v1/messages", {"model": "c", "max_tokens": 9, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
     b"event: message_stop"),
])
def test_final_event_arrives_after_the_commit(pgw: Gateway, path: str, body: dict[str, Any], final: bytes) -> None:
    """The final event is held back until the round is on disk; everything before it streams."""
    sid = "durable-" + path.rsplit("/", 1)[1]
    seen = b""
    with httpx.stream("POST", f"{pgw.url}{path}", json=body, timeout=10,
                      headers={"Authorization": f"Bearer {ACME_KEY}", "X-Session-Id": sid}) as r:
        for chunk in r.iter_raw():
            seen += chunk
            if final in seen:
                assert _rounds(pgw, sid) == 1
                break
    assert final in seen
