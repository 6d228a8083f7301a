"""Two revisions of the gateway measured in turn: is a change faster, and by how much?

    .venv/bin/python -m benchmarks.ab --base REV [--pairs 10] -- [benchmarks.run arguments]

Checks *REV* out into a scratch worktree (``git worktree add --detach``, removed afterwards) and
runs ``benchmarks.run`` with the given arguments, alternately with ``--gateway-tree`` at that
worktree and at this tree: base, then head, *pairs* times. Only the gateway targets' code
differs between the two sides; the driver, the stand-in, the pass-through, the config and the
policies are this tree's (a base whose settings differ may refuse the config: pick a recent one).

For every cell it prints each side's median, the median of the pairs' ratios (head / base) and in
how many pairs head did better, for req/s, CPU per request and added p50. The pass-through's rows
are the control: both sides run the same pass-through, so its ratios show how far this machine
drifts between two runs. On the project's 2-core machine a change of 5% or less needs ten pairs
or more to show.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("rps", "req/s", True),
    ("cpu_ms", "CPU ms/req", False),
    ("added_ms", "added p50 ms", False),
)
"""(field of ``benchmarks.run --json``, its name in the report, whether higher is better)."""

Cells = list[dict[str, Any]]


@dataclass(frozen=True)
class Comparison:
    target: str
    mode: str
    concurrency: int
    metric: str
    base: float
    head: float
    ratio: float
    """The median of the pairs' ratios, head / base."""
    better: int
    """In how many pairs head did better."""
    pairs: int


def compare(pairs: Sequence[tuple[Cells, Cells]]) -> list[Comparison]:
    """Every (target, mode, concurrency) cell and metric both sides measured in every pair, in
    the order of the first pair's cells (``direct`` has no figures of its own to compare)."""
    def index(cells: Cells) -> dict[tuple[str, str, int], dict[str, Any]]:
        return {(c["target"], c["mode"], c["concurrency"]): c for c in cells if c["target"] != "direct"}

    sides = [(index(base), index(head)) for base, head in pairs]
    out: list[Comparison] = []
    for key in sides[0][0] if sides else []:
        for metric, _name, higher in METRICS:
            values = [(b[key][metric], h[key][metric]) for b, h in sides
                      if key in b and key in h and b[key][metric] is not None and h[key][metric] is not None]
            if len(values) < len(sides) or not values:
                continue
            ratios = [h / b for b, h in values if b]
            if not ratios:
                continue
            better = sum(1 for b, h in values if (h > b if higher else h < b))
            out.append(Comparison(*key, metric, statistics.median(b for b, _ in values),
                                  statistics.median(h for _, h in values), statistics.median(ratios), better,
                                  len(values)))
    return out


def report(comparisons: list[Comparison], base: str) -> str:
    names = {metric: name for metric, name, _ in METRICS}
    lines = [f"head (this tree) against {base}; medians, the median of the pairs' ratios, and the pairs "
             "in which head did better", "",
             "| target | mode | concurrency | figure | base | head | head / base | head better in |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for c in comparisons:
        lines.append(f"| {c.target} | {c.mode} | {c.concurrency} | {names[c.metric]} | {c.base:.4g} | {c.head:.4g} | "
                     f"×{c.ratio:.3f} | {c.better} of {c.pairs} |")
    return "\n".join(lines)


def run_side(tree: Path, run_args: list[str], out: Path) -> Cells:
    """One ``benchmarks.run`` with the gateway of *tree*; its cells."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", *run_args, "--gateway-tree", str(tree),
                           "--json", str(out)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmarks.run failed for {tree}: {done.stderr.strip()[-800:]}")
    cells: Cells = json.loads(out.read_text())
    return cells


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the git revision to compare this tree with")
    parser.add_argument("--pairs", type=int, default=10)
    args = parser.parse_args(own)
    if any(a.startswith(("--gateway-tree", "--json")) for a in run_args):
        parser.error("--gateway-tree and --json are set by benchmarks.ab")
    if any(a.startswith("--repeat") for a in run_args):
        parser.error("--repeat is not for benchmarks.ab: its pairs are the repetitions (--pairs)")
    with tempfile.TemporaryDirectory(prefix="sessiongate-ab-") as name:
        scratch = Path(name)
        worktree = scratch / "base"
        added = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.base],
                               capture_output=True, text=True)
        if added.returncode != 0:
            print(f"cannot check out {args.base}: {added.stderr.strip()}", file=sys.stderr)
            return 2
        try:
            pairs: list[tuple[Cells, Cells]] = []
            for n in range(args.pairs):
                base = run_side(worktree, run_args, scratch / f"base-{n}.json")
                head = run_side(REPO, run_args, scratch / f"head-{n}.json")
                pairs.append((base, head))
                print(f"pair {n + 1} of {args.pairs} done", file=sys.stderr, flush=True)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)],
                           capture_output=True)
    print(report(compare(pairs), args.base))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
