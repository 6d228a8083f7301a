"""A change of the policy set is audited once: not again by a second worker or replica reloading
the same change, and not at all by a reload that changes nothing (a file restored after a
refused edit). Real SQLite stores, real policy files."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from gateway.policy import load_policy_set
from gateway.policy.reload_audit import ReloadAudit, set_versions
from gateway.store.base import SYSTEM_TENANT
from gateway.store.sqlite import SQLiteStore
from tests.conftest import Gateway, wait_for
from tests.test_hot_reload import log_events, write_atomically

KEYED = "id: catch-all\nsession: {input_keys: [input.n], reply_keys: []}\nretention: {days: 30}\n"
VIP = "id: vip\npriority: 10\nmatch: {session_ids: ['vip:*']}\nsession: {input_keys: [], reply_keys: []}\n"


def reload_entries(db: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT body FROM audit WHERE tenant=? ORDER BY seq", (SYSTEM_TENANT,)).fetchall()
    return [entry["detail"] for entry in map(json.loads, (body for (body,) in rows))
            if entry["event"] == "policy_reload"]


def test_two_workers_reloading_one_change_audit_it_once(tmp_path: Path) -> None:
    """Two processes' stores on one database, both started on set A: both reload B (one entry,
    with the diff), reload B again (none), then A again (one, naming the removed policy)."""
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "default.yaml").write_text(KEYED)
    set_a = load_policy_set(folder)
    (folder / "vip.yaml").write_text(VIP)
    set_b = load_policy_set(folder)

    async def main() -> list[bool]:
        stores = [SQLiteStore(tmp_path / "s.db"), SQLiteStore(tmp_path / "s.db")]
        for store in stores:
            await store.open()
        try:
            first, second = (ReloadAudit(store, set_a) for store in stores)
            return [await first.record(set_b), await second.record(set_b), await first.record(set_b),
                    await second.record(set_a), await first.record(set_a)]
        finally:
            for store in stores:
                await store.close()

    assert asyncio.run(main()) == [True, False, False, True, False]
    entries = reload_entries(tmp_path / "s.db")
    assert [{k: v for k, v in e.items() if k != "_diff"} for e in entries] == [set_versions(set_b),
                                                                              set_versions(set_a)]
    assert entries[0]["_diff"]["added"] == ["vip"] and entries[1]["_diff"]["removed"] == ["vip"]


def test_a_file_restored_after_a_refused_edit_writes_no_entry(make_gateway: Callable[..., Gateway],
                                                              tmp_path: Path) -> None:
    """An invalid edit is refused; putting the file back as it was reloads the same set: it is
    counted as a reload, but the _system chain gets no policy_reload entry (before: one with an
    empty diff)."""
    folder = tmp_path / "live-policies"
    folder.mkdir()
    (folder / "default.yaml").write_text(KEYED)
    gateway = make_gateway(folder)

    write_atomically(folder / "default.yaml", KEYED + "retention: {days: -1}\n")
    wait_for(lambda: log_events(gateway, "policy_reload_refused"))
    write_atomically(folder / "default.yaml", KEYED)
    wait_for(lambda: 'sessiongate_policy_reloads_total{result="ok"} 1.0' in httpx.get(f"{gateway.url}/metrics").text)
    assert reload_entries(gateway.db_path) == []
