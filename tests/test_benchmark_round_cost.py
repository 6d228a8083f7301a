"""``benchmarks.round_cost`` takes its sessions in turn and times every mode on each."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from benchmarks import round_cost


def test_round_cost_takes_every_session_in_turn(tmp_path: Path) -> None:
    """Three sessions, filled and then timed for 9 rounds per mode: every session gains 12 rounds
    beyond its filling (4 modes × 9 rounds / 3 sessions), and each mode reports a time."""
    results = asyncio.run(round_cost.measure(tmp_path, rounds=9, window_chars=600, fsync=False, count=3))
    assert [mode for mode, _, _ in results] == ["quiet", "shielded", "busy", "read"]
    assert all(p50 > 0 and cpu > 0 for _, p50, cpu in results)
    conn = sqlite3.connect(tmp_path / "round-cost.db")
    try:
        counts = dict(conn.execute("SELECT session_id, COUNT(*) FROM rounds GROUP BY session_id").fetchall())
    finally:
        conn.close()
    assert sorted(counts) == ["bench-0", "bench-1", "bench-2"]
    filled = {sid: n - 12 for sid, n in counts.items()}
    assert len(set(filled.values())) == 1 and min(filled.values()) > 0, counts
