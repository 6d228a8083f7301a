"""Prometheus metrics, served at ``GET /metrics``. One registry per app (no module globals),
so several gateways in one process (the tests) do not share counters.

Every label set is bounded: routes are the router's templates (``/v1/sessions/{session_id}``,
never a raw path), methods outside the standard ones count as ``other``, tenants come from the
configuration, and model names are kept to the first ``MAX_MODELS`` seen (later ones count as
``other``), since a client chooses them. No session id is ever a label.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MAX_MODELS = 64


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, version: str = "") -> None:
        self.in_flight = 0
        """Requests inside the middleware now (on the event loop's thread only)."""
        self.registry = r = CollectorRegistry()
        self.requests = Counter("sessiongate_requests", "Requests answered, by route template, method, status "
                                "class and outcome", ("route", "method", "status_class", "outcome"), registry=r)
        self.latency = Histogram("sessiongate_request_seconds", "Time from request to last byte, by route template",
                                 ("route",), buckets=BUCKETS, registry=r)
        self.first_byte = Histogram("sessiongate_stream_first_byte_seconds",
                                    "Time from request to the first byte of a streamed reply", buckets=BUCKETS,
                                    registry=r)
        self.upstream_errors = Counter("sessiongate_upstream_errors", "Upstream failures, by kind",
                                       ("kind",), registry=r)
        self.rounds = Counter("sessiongate_rounds_recorded", "Rounds committed to the store, by outcome",
                              ("outcome",), registry=r)
        self.tokens = Counter("sessiongate_tokens", "Tokens the upstream reported in its replies, by tenant, "
                              "model and kind (prompt, completion)", ("tenant", "model", "kind"), registry=r)
        self.policy_reloads = Counter("sessiongate_policy_reloads", "Policy reloads, by result",
                                      ("result",), registry=r)
        self.integrity_failures = Counter("sessiongate_integrity_failures",
                                          "Stored data that failed an integrity check when read", registry=r)
        self.commit_seconds = Histogram("sessiongate_store_commit_seconds",
                                        "Time the store took to commit one batch of writes", buckets=FAST_BUCKETS,
                                        registry=r)
        self.commit_batch = Histogram("sessiongate_store_commit_batch_size", "Writes committed per transaction",
                                      buckets=BATCH_BUCKETS, registry=r)
        self.erasures_pending = Gauge("sessiongate_erasures_pending",
                                      "Erased sessions whose bytes may still be in the store's files", registry=r)
        Gauge("sessiongate_build_info", "The running version", ("version",), registry=r).labels(
            version=version or "unknown").set(1)
        self._models: set[str] = set()
        self._lock = threading.Lock()
        self._children: dict[tuple[Any, ...], Any] = {}
        """Labelled children by (metric, labels...): ``labels()`` validates and locks on every
        call; the label sets are bounded (see the module docstring), so this is too."""

    def _child(self, metric: Any, *values: str) -> Any:
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def round_recorded(self, outcome: str) -> None:
        """Count one committed round (*outcome*: completed, incomplete, upstream_error)."""
        self._child(self.rounds, outcome).inc()

    def quiet(self) -> bool:
        """Whether at most one request is in flight (``observe.metrics_middleware`` counts them)."""
        return self.in_flight <= 1

    def request(self, route: str, method: str, status: int, outcome: str, seconds: float) -> None:
        """Count one answered request (any route, refusals included)."""
        self._child(self.requests, route, method if method in METHODS else "other", f"{status // 100}xx",
                    outcome).inc()
        self._child(self.latency, route).observe(seconds)

    def usage(self, tenant: str, model: Any, usage: Any) -> None:
        """Add a reply's ``usage`` (OpenAI's ``prompt_tokens``/``completion_tokens``, or Anthropic's
        ``input_tokens``/``output_tokens``) to the token counters; anything else is ignored."""
        if not isinstance(usage, dict):
            return
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens"))
        label = self._model(model)
        for kind, value in (("prompt", prompt), ("completion", completion)):
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                self._child(self.tokens, tenant or "none", label, kind).inc(value)

    def commit(self, seconds: float, batch: int) -> None:
        """One store transaction committed (called from the store's writer; thread-safe)."""
        self.commit_seconds.observe(seconds)
        self.commit_batch.observe(batch)

    def _model(self, model: Any) -> str:
        if not isinstance(model, str) or not model or len(model) > 128 or not model.isprintable():
            return "unknown"
        with self._lock:
            if model in self._models:
                return model
            if len(self._models) < MAX_MODELS:
                self._models.add(model)
                return model
        return "other"

    def render(self) -> bytes:
        return generate_latest(self.registry)
