"""Prometheus metrics, served at ``GET /metrics``. One registry per app (no module globals),
so several gateways in one process (the tests) do not share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("sessiongate_requests", "Requests handled, by route and status",
                                ("route", "status"), registry=self.registry)
        self.latency = Histogram("sessiongate_request_seconds", "Time from request to last byte",
                                 ("route",), buckets=BUCKETS, registry=self.registry)
        self.upstream_errors = Counter("sessiongate_upstream_errors", "Upstream failures, by kind",
                                       ("kind",), registry=self.registry)
        self.rounds = Counter("sessiongate_rounds_recorded", "Rounds committed to the store, by outcome",
                              ("outcome",), registry=self.registry)
        self.policy_reloads = Counter("sessiongate_policy_reloads", "Policy reloads, by result",
                                      ("result",), registry=self.registry)
        self.erasures_pending = Gauge("sessiongate_erasures_pending",
                                      "Erased sessions whose bytes may still be in the store's files",
                                      registry=self.registry)

        self.chat_latency = self.latency.labels(route="chat")
        """The chat route's histogram child, looked up once (it is observed on every request)."""

    def render(self) -> bytes:
        return generate_latest(self.registry)
