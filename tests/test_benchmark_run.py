"""``benchmarks.run --repeat``: the medians table takes each figure's median over the passes, and
each share of the pass-through and each added p50 within its own pass."""

from __future__ import annotations

import pytest

from benchmarks.load import CellResult
from benchmarks.run import Row, medians, parse_args


def row(target: str, rps: float, p50: float, cpu: float | None, repeat: int) -> Row:
    return Row(target, False, 64, CellResult(requested=10, ok=10, elapsed=10 / rps, latencies=[p50] * 10), cpu,
               repeat=repeat)


def test_medians_take_shares_and_added_p50_within_each_pass() -> None:
    """Three passes in which the machine's speed drifts: the gateway's share of the pass-through
    is 25%, 50% and 40% pass by pass, so its median is 40%; the ratio of the median req/s
    (200 / 800) would say 25%. Its added p50 is taken against each pass's own direct row."""
    passes = [((4000, 0.001), (800, 0.002, 0.1), (200, 0.006, 0.5)),
              ((2000, 0.004), (400, 0.005, 0.2), (200, 0.008, 0.6)),
              ((3000, 0.002), (1000, 0.003, 0.1), (400, 0.005, 0.4))]
    rows = [r for k, (direct, floor, gateway) in enumerate(passes)
            for r in (row("direct", *direct, None, k), row("passthrough", *floor, k), row("gateway", *gateway, k))]
    printed = medians(rows)
    assert printed.startswith("Medians of 3 passes:")
    # req/s median 200; share median(25, 50, 40) = 40%; p50 median 6 ms; added median(5, 4, 3) = 4 ms
    assert "| gateway | json | 64 | 30 / 0 | 200 | 40% | 6.00 | - | +4.00 | 0.50 |" in printed
    assert "| passthrough | json | 64 | 30 / 0 | 800 | 100% | 3.00 | - | +1.00 | 0.10 |" in printed
    assert printed.count("| gateway |") == 1


def test_medians_without_a_pass_through_row_show_no_share() -> None:
    rows = [row("gateway", 200, 0.006, 0.5, 0), row("gateway", 300, 0.004, 0.4, 1)]
    assert "| gateway | json | 64 | 20 / 0 | 250 | - | 5.00 | - | - | 0.45 |" in medians(rows)


def test_medians_carry_the_database_cpu_when_asked() -> None:
    rows = [row("gateway-pg", 200, 0.006, 0.5, 0), row("gateway-pg", 300, 0.004, 0.4, 1)]
    rows[0].db_cpu_ms_per_request, rows[1].db_cpu_ms_per_request = 0.2, 0.3
    printed = medians(rows, db_column=True)
    assert "PostgreSQL CPU ms/req |" in printed
    assert "| gateway-pg | json | 64 | 20 / 0 | 250 | - | 5.00 | - | - | 0.45 | 0.25 |" in printed


def test_repeat_must_be_at_least_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["--repeat", "3"]).repeat == 3
    with pytest.raises(SystemExit):
        parse_args(["--repeat", "0"])
    assert "--repeat takes a count of 1 or more" in capsys.readouterr().err
