"""``benchmarks.ab``: pairs of runs of two revisions, compared cell by cell."""

from __future__ import annotations

from typing import Any

from benchmarks.ab import compare, report
from benchmarks.load import CellResult
from benchmarks.run import Row, cells, table


def cell(target: str, rps: float, cpu: float | None, added: float | None, mode: str = "json") -> dict[str, Any]:
    return {"target": target, "mode": mode, "concurrency": 64, "rps": rps, "cpu_ms": cpu, "added_ms": added}


def test_pairs_give_medians_the_median_ratio_and_the_pairs_head_won() -> None:
    """Three pairs: head's CPU is lower in two, higher in one; the median of the ratios, not the
    ratio of the medians, is reported; ``direct`` is not compared, and a figure missing in any
    pair (the pass-through's CPU here) is left out rather than compared on fewer pairs."""
    pairs = [
        ([cell("direct", 9000, None, None), cell("gateway", 2000, 0.50, 20.0), cell("passthrough", 7000, 0.1, 4.0)],
         [cell("direct", 9100, None, None), cell("gateway", 2200, 0.40, 18.0), cell("passthrough", 7100, None, 4.0)]),
        ([cell("gateway", 2100, 0.44, 21.0), cell("passthrough", 7000, 0.1, 4.0)],
         [cell("gateway", 2000, 0.46, 22.0), cell("passthrough", 6900, 0.1, 4.0)]),
        ([cell("gateway", 1900, 0.48, 25.0), cell("passthrough", 7000, 0.1, 4.0)],
         [cell("gateway", 2090, 0.42, 20.0), cell("passthrough", 7000, 0.1, 4.0)]),
    ]
    found = {(c.target, c.metric): c for c in compare(pairs)}
    assert set(found) == {("gateway", "rps"), ("gateway", "cpu_ms"), ("gateway", "added_ms"),
                          ("passthrough", "rps"), ("passthrough", "added_ms")}
    cpu = found[("gateway", "cpu_ms")]
    assert (cpu.base, cpu.head, cpu.better, cpu.pairs) == (0.48, 0.42, 2, 3)
    assert abs(cpu.ratio - 0.42 / 0.48) < 1e-9  # ratios 0.8, 1.045, 0.875: the median is the third
    rps = found[("gateway", "rps")]
    assert rps.better == 2 and abs(rps.ratio - 1.1) < 1e-9
    assert found[("passthrough", "rps")].better == 1
    text = report(compare(pairs), "abc123")
    assert "| gateway | json | 64 | CPU ms/req | 0.48 | 0.42 | ×0.875 | 2 of 3 |" in text


def test_run_json_cells_keep_full_precision_and_add_against_the_same_clients_direct_row() -> None:
    """``benchmarks.run --json``: unrounded figures in milliseconds; a cell's added p50 is measured
    against the direct row of the same clients (the table took the last direct row of any
    clients before: the window cells were measured against the history clients' baseline)."""
    def result(p50: float) -> CellResult:
        return CellResult(requested=10, ok=10, elapsed=2.0, latencies=[p50] * 10)
    rows = [Row("direct", False, 64, result(0.001), None, client="window"),
            Row("direct", False, 64, result(0.002), None, client="history"),
            Row("gateway", False, 64, result(0.0103), 0.41234, client="window"),
            Row("gateway", False, 64, result(0.0105), 0.45678, client="history")]
    out = {(c["target"], c["mode"]): c for c in cells(rows)}
    assert out[("gateway", "json")]["cpu_ms"] == 0.41234 and out[("gateway", "json")]["rps"] == 5.0
    assert abs(out[("gateway", "json")]["added_ms"] - 9.3) < 1e-9
    assert abs(out[("gateway", "json (history)")]["added_ms"] - 8.5) < 1e-9
    assert out[("direct", "json")]["added_ms"] is None
    printed = table(rows)  # the Markdown table pairs them the same way
    assert "| gateway | json | 64 | 10 / 0 | 5 | 10.30 | 10.30 | - | +9.30 | 0.41 |" in printed
    assert "| gateway | json (history) | 64 | 10 / 0 | 5 | 10.50 | 10.50 | - | +8.50 | 0.46 |" in printed
