"""One access line per request, refusals included: a guessed key, a route the operator did not
allow and a session read all leave a line (method, route template, status, code); a model
route and a forwarded request leave their own richer line and no second one. Nothing a client
put in the path, query or headers is written."""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from tests.conftest import ACME_KEY, Gateway, wait_for

SECRET = "sg-guessed-CANARY-7f3a"


def lines(gateway: Gateway) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in gateway.log_path.read_text().splitlines() if line.startswith("{")]


def access(gateway: Gateway) -> list[dict[str, Any]]:
    return [e for e in lines(gateway) if e.get("event") in ("access", "request", "proxy")]


def test_every_request_leaves_one_access_line_and_no_client_text(gateway: Gateway) -> None:
    base = gateway.url
    good = {"Authorization": f"Bearer {ACME_KEY}"}
    calls = [
        httpx.get(f"{base}/v1/models?token=CANARY-QUERY", headers={"Authorization": f"Bearer {SECRET}"}),
        httpx.get(f"{base}/v1/files/CANARY-PATH", headers=good),
        httpx.get(f"{base}/v1/sessions/acme:nobody", headers=good),
        httpx.post(f"{base}/v1/chat/completions", headers=good,
                   json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        httpx.get(f"{base}/v1/models", headers=good),
        httpx.get(f"{base}/no/such/CANARY-UNROUTED"),
        httpx.get(f"{base}/healthz"),
        httpx.get(f"{base}/metrics"),
    ]
    assert [c.status_code for c in calls] == [401, 403, 404, 200, 200, 404, 200, 200]
    found = wait_for(lambda: (a := access(gateway)) and len(a) >= 6 and a)
    assert [(e["event"], e.get("route"), e["status"], e.get("code")) for e in found] == [
        ("access", "/v1/{tail}", 401, "invalid_api_key"),
        ("access", "/v1/{tail}", 403, "route_not_allowed"),
        ("access", "/v1/sessions/{session_id}", 404, "not_found"),
        ("request", None, 200, None),
        ("proxy", "/v1/models", 200, None),
        ("access", "unmatched", 404, "not_found"),
    ]  # probes and scrapes that succeed leave none
    assert all(e["method"] == "GET" and e["latency_ms"] >= 0 for e in found if e["event"] == "access")
    text = gateway.log_path.read_text()
    assert "CANARY" not in text and ACME_KEY not in text


def test_a_round_not_recorded_because_its_session_was_erased_says_so(make_gateway, upstream) -> None:
    """A round in flight while its session is erased is committed as ``erased_meanwhile`` with
    nothing recorded; its ``request`` line and its requests_total outcome say the same, not
    ``completed``."""
    from tests.test_erasure import erase_mid_round

    gw = make_gateway()
    erase_mid_round(gw, upstream, "inflight", "an answer drawn from the erased window")
    rounds = [e for e in gw.audit_entries() if e["event"] == "round" and e.get("session_id") == "inflight"]
    assert [e["outcome"] for e in rounds] == ["completed", "erased_meanwhile"]
    requests = [e for e in lines(gw) if e.get("event") == "request" and e.get("session_id") == "inflight"]
    assert [(e["status"], e["outcome"]) for e in requests] == [(200, "completed"), (200, "erased_meanwhile")]
    text = httpx.get(f"{gw.url}/metrics").text
    chat_route = 'method="POST",outcome="{}",route="/v1/chat/completions",status_class="2xx"'
    assert f'sessiongate_requests_total{{{chat_route.format("erased_meanwhile")}}} 1.0' in text
    assert f'sessiongate_requests_total{{{chat_route.format("completed")}}} 1.0' in text
