"""The request's ``model`` is client text: the audit trail, the logs and ``/metrics`` hold only a
model name the gateway can vouch for (SPEC §3: nothing outside the whitelist is written)."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from gateway.observe import UNLISTED, model_label
from gateway.standin_protocols import reported_model
from tests.conftest import ACME_KEY, Gateway, Upstream

CANARY = "gpt-4o CANARY_MODEL_PII bob@example.com 4111 1111 1111 1111"


def _chat(gw: Gateway, model: str, session: str | None = None) -> None:
    headers = {"Authorization": f"Bearer {ACME_KEY}", **({"X-Session-Id": session} if session else {})}
    resp = httpx.post(f"{gw.base_url}/chat/completions", headers=headers, timeout=30,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200, resp.text


def test_a_client_chosen_model_is_written_nowhere(make_gateway: Callable[..., Gateway]) -> None:
    """A model the upstream names only by a glob reaches the provider, but the audit entries
    (before and after erasure), the log and the metrics say ``unlisted`` or the provider's name."""
    gw = make_gateway()
    _chat(gw, CANARY, session="modeltest")
    _chat(gw, CANARY)
    resp = httpx.delete(f"{gw.base_url}/sessions/modeltest", headers={"Authorization": f"Bearer {ACME_KEY}"},
                        timeout=30)
    assert resp.status_code < 300, resp.text
    metrics = httpx.get(f"{gw.url}/metrics", timeout=30).text
    assert "CANARY" not in metrics
    assert "CANARY" not in gw.log_path.read_text()
    assert b"CANARY" not in gw.stored_bytes()
    rounds = [e for e in gw.audit_entries() if e.get("event") == "round"]
    assert len(rounds) == 2 and {e["model"] for e in rounds} == {"standin"}  # what the stand-in reported


def test_an_exactly_listed_model_is_recorded_by_name(make_gateway: Callable[..., Gateway], upstream: Upstream) -> None:
    """A model an upstream lists without wildcards is the request's model, written as such."""
    gw = make_gateway(upstreams=[{"name": "standin", "base_url": upstream.url, "models": ["exact-model-1", "*"]}])
    _chat(gw, "exact-model-1", session="listed")
    (entry,) = [e for e in gw.audit_entries() if e.get("event") == "round"]
    assert entry["model"] == "exact-model-1"


def test_model_label_vouches_only_for_listed_or_reported_names() -> None:
    """Listed exactly: the request's; else the reply's model; else ``unlisted``; globs vouch for nothing."""

    class Up:
        models = ("gpt-4o", "gpt-4o*", "*")

    assert model_label("gpt-4o", Up()) == "gpt-4o"
    assert model_label("gpt-4o-mini", Up()) == UNLISTED
    assert model_label("gpt-4o*", Up()) == UNLISTED
    assert model_label("gpt-4o-mini", Up(), {"model": "gpt-4o-mini-2024-07-18"}) == "gpt-4o-mini-2024-07-18"
    assert model_label(CANARY, None, {"model": "x\n" * 80}) == UNLISTED
    assert model_label(None, None, None) == UNLISTED


def test_the_standin_reports_its_own_model_names() -> None:
    """The stand-in never echoes a client's model string back as the provider's."""
    assert reported_model("standin-json") == "standin-json"
    assert reported_model(CANARY) == "standin"
    assert reported_model(None) == "standin"
