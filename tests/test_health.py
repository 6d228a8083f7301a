"""Health, readiness and Prometheus metrics."""

from __future__ import annotations

import httpx

from tests.conftest import ACME_KEY


def test_health_ready_and_metrics(gateway) -> None:
    """/healthz and /readyz answer without a key; /metrics counts requests, latency and rounds."""
    assert httpx.get(f"{gateway.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway.url}/readyz").json()
    assert ready["status"] == "ready" and ready["policies"] >= 1
    gateway.openai(session="acme:m").chat.completions.create(
        model="standin", messages=[{"role": "user", "content": "count me"}])
    httpx.post(f"{gateway.base_url}/chat/completions", headers={"Authorization": f"Bearer {ACME_KEY}"},
               content=b"{not json")
    text = httpx.get(f"{gateway.url}/metrics").text
    chat = 'method="POST",outcome="{}",route="/v1/chat/completions",status_class="{}"'
    assert f'sessiongate_requests_total{{{chat.format("completed", "2xx")}}} 1.0' in text
    assert f'sessiongate_requests_total{{{chat.format("refused", "4xx")}}} 1.0' in text
    assert 'sessiongate_rounds_recorded_total{outcome="completed"} 1.0' in text
    assert 'sessiongate_request_seconds_count{route="/v1/chat/completions"} 2.0' in text


def test_upstream_errors_are_counted(make_gateway) -> None:
    """An unreachable upstream shows in sessiongate_upstream_errors."""
    gw = make_gateway(upstreams=[{"name": "down", "base_url": "http://127.0.0.1:9/v1", "connect_timeout": 1}])
    r = httpx.post(f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {ACME_KEY}"},
                   json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 502
    assert 'sessiongate_upstream_errors_total{kind="upstream_unreachable"} 1.0' in httpx.get(f"{gw.url}/metrics").text
