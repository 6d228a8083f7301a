"""Load harness: direct vs a bare pass-through vs the gateway (``python -m benchmarks.run``)."""
