"""A hot reload says what it changed: the ``policy_reloaded`` log line carries the diff's one-line
summary, and the ``policy_reload`` audit entry of the ``_system`` chain carries the diff by name
(ids, fields, key names), never a tenant, a session id or a value."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.policy import PolicyWatcher
from gateway.store.base import SYSTEM_TENANT
from tests.conftest import Gateway, wait_for
from tests.test_hot_reload import log_events, wait_for_reload, write_atomically

KEYED = "id: catch-all\nsession: {input_keys: [input.n], reply_keys: []}\nretention: {days: 30}\n"
WIDER = "id: catch-all\nsession: {input_keys: [input.n, input.secret], reply_keys: []}\nretention: {days: 30}\n"
VIP = "id: vip\npriority: 10\nmatch: {session_ids: ['vip:*']}\nsession: {input_keys: [], reply_keys: []}\n"


def reload_details(gateway: Gateway) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{gateway.db_path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT body FROM audit WHERE tenant=? ORDER BY seq", (SYSTEM_TENANT,)).fetchall()
    finally:
        conn.close()
    return [entry["detail"] for entry in map(json.loads, (body for (body,) in rows))
            if entry["event"] == "policy_reload"]


def test_a_reload_audits_and_logs_what_it_changed(make_gateway: Callable[..., Gateway], tmp_path: Path) -> None:
    """Widening the whitelist is audited with widens_recording true and the key's name; adding a
    policy that records nothing is audited as an added policy with its moves, not widening."""
    folder = tmp_path / "live-policies"
    folder.mkdir()
    (folder / "default.yaml").write_text(KEYED)
    gateway = make_gateway(folder)

    write_atomically(folder / "default.yaml", WIDER)
    first = wait_for_reload(gateway, 1)
    assert first["diff"] == ("0 added [-], 0 removed [-], 1 changed [catch-all], 0 match move(s); "
                             "widens recording: yes")
    assert first["widens_recording"] is True

    write_atomically(folder / "vip.yaml", VIP)
    second = wait_for_reload(gateway, 2)
    assert second["diff"] == "1 added [vip], 0 removed [-], 0 changed [-], 2 match move(s); widens recording: no"

    details = wait_for(lambda: (found := reload_details(gateway)) and len(found) == 2 and found)
    assert details[0]["_diff"] == {
        "added": [], "removed": [], "changed": {"catch-all": ["input_keys"]}, "moves": [],
        "widens_recording": True, "widening": ["catch-all: input_keys: + input.secret"]}
    assert details[1]["_diff"] == {
        "added": ["vip"], "removed": [], "changed": {}, "moves": [{"from": "catch-all", "to": "vip", "count": 2}],
        "widens_recording": False, "widening": []}
    assert set(details[1]) == {"catch-all", "vip", "_diff"}
    assert "vip:x" not in json.dumps(details) and "(other)" not in json.dumps(details)
    assert not log_events(gateway, "policy_reload_refused")


def test_the_watcher_keeps_the_last_diff(tmp_path: Path) -> None:
    """PolicyWatcher.reload sets last_diff to the difference from the set it replaced."""
    (tmp_path / "default.yaml").write_text(WIDER)

    async def scenario() -> Any:
        watcher = PolicyWatcher(tmp_path)
        assert watcher.last_diff is None
        (tmp_path / "default.yaml").write_text(KEYED.replace("days: 30", "days: 7"))
        assert await watcher.reload()
        return watcher.last_diff

    diff = asyncio.run(scenario())
    assert [c.text for c in diff.changes] == ["catch-all: input_keys: - input.secret",
                                              "catch-all: retention: 30 days -> 7 days"]
    assert not diff.widens_recording


def test_a_reload_that_keeps_tool_results_is_audited_as_widening(tmp_path: Path) -> None:
    """The reload's diff (its audit detail) names session.tools and session.media changes and flags them."""
    free = ("id: catch-all\nsession: {input_keys: null, reply_keys: null, tools: {results: drop}, "
            "media: {parts: drop}}\n")
    (tmp_path / "default.yaml").write_text(free)

    async def scenario() -> Any:
        watcher = PolicyWatcher(tmp_path)
        (tmp_path / "default.yaml").write_text(free.replace("drop", "keep"))
        assert await watcher.reload()
        return watcher.last_diff

    detail = asyncio.run(scenario()).audit_detail()
    assert detail["changed"] == {"catch-all": ["session.media.parts", "session.tools.results"]}
    assert detail["widens_recording"] is True
