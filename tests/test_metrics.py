"""``/metrics`` covers every route and every way a request ends, parsed with Prometheus' own
parser: requests by route template, method, status class and outcome; tokens per tenant and
model; time to first streamed byte; store commits; integrity failures. No label carries a
session id or a raw path."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.errors import ConfigError
from gateway.settings import load_settings
from tests.conftest import ACME_KEY, AUDITOR_TOKEN, REPO, Gateway, wait_for, write_config

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}
SESSION = "metrics-canary-session"


def samples(gateway: Gateway) -> list[Any]:
    text = httpx.get(f"{gateway.url}/metrics").text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(found: list[Any], name: str, **labels: str) -> float:
    return sum(s.value for s in found if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_every_route_and_error_class_is_counted(gateway: Gateway) -> None:
    """Chat (JSON, stream, 400, 401), sessions (200, 404), admin (403), health, an unknown path and a
    proxied route each show up under their route template with the right status class and outcome."""
    with httpx.Client(base_url=gateway.url, timeout=30) as c:
        chat = {"model": "standin", "messages": [{"role": "user", "content": "hi"}]}
        assert c.post("/v1/chat/completions", headers={**AUTH, "X-Session-Id": SESSION}, json=chat).status_code == 200
        with c.stream("POST", "/v1/chat/completions", headers={**AUTH, "X-Session-Id": SESSION},
                      json={**chat, "stream": True}) as resp:
            assert resp.status_code == 200 and b"[DONE]" in resp.read()
        assert c.post("/v1/chat/completions", headers=AUTH, content=b"{").status_code == 400
        assert c.post("/v1/chat/completions", json=chat).status_code == 401
        assert c.get(f"/v1/sessions/{SESSION}", headers=AUTH).status_code == 200
        assert c.get("/v1/sessions/nobody-here", headers=AUTH).status_code == 404
        assert c.get("/admin/public-key", headers=AUTH).status_code == 403
        assert c.get("/admin/public-key", headers={"Authorization": f"Bearer {AUDITOR_TOKEN}"}).status_code == 200
        assert c.get("/healthz").status_code == 200
        assert c.get("/no/such/path").status_code == 404
        assert c.get("/v1/models", headers=AUTH).status_code < 500
    total = "sessiongate_requests_total"
    chat_route = {"route": "/v1/chat/completions", "method": "POST"}
    # a stream is counted when its handler returns, which may be just after the client read [DONE]
    wait_for(lambda: value(samples(gateway), total, **chat_route, status_class="2xx", outcome="completed") == 2)
    found = samples(gateway)
    assert value(found, total, **chat_route, status_class="2xx", outcome="completed") == 2
    assert value(found, total, **chat_route, status_class="4xx", outcome="refused") == 2
    assert value(found, total, route="/v1/sessions/{session_id}", method="GET", status_class="2xx") == 1
    assert value(found, total, route="/v1/sessions/{session_id}", method="GET", status_class="4xx") == 1
    assert value(found, total, route="/admin/public-key", status_class="4xx", outcome="refused") == 1
    assert value(found, total, route="/admin/public-key", status_class="2xx", outcome="ok") == 1
    assert value(found, total, route="/healthz", status_class="2xx") == 1
    assert value(found, total, route="unmatched", status_class="4xx") == 1
    assert value(found, total, route="/v1/{tail}", method="GET") == 1
    assert value(found, "sessiongate_request_seconds_count", route="/v1/chat/completions") == 4
    assert value(found, "sessiongate_stream_first_byte_seconds_count") == 1
    assert value(found, "sessiongate_rounds_recorded_total", outcome="completed") == 2
    assert value(found, "sessiongate_store_commit_seconds_count") >= 2
    assert value(found, "sessiongate_store_commit_batch_size_sum") >= 2
    assert value(found, "sessiongate_build_info") == 1
    for s in found:  # bounded label sets: no session id, no raw path
        labels = str(s.labels)
        assert SESSION not in labels and "/no/such/path" not in labels and "nobody-here" not in labels


def test_token_usage_is_counted_per_tenant_and_model(gateway: Gateway) -> None:
    """The usage block of a reply adds to the prompt and completion token counters of its tenant and model."""
    gateway.openai().chat.completions.create(model="standin", messages=[{"role": "user", "content": "count"}])
    found = samples(gateway)
    prompt = value(found, "sessiongate_tokens_total", tenant="acme", kind="prompt")
    completion = value(found, "sessiongate_tokens_total", tenant="acme", kind="completion")
    assert prompt > 0 and completion > 0
    models = {s.labels["model"] for s in found if s.name == "sessiongate_tokens_total"}
    assert models == {"standin"}


def test_integrity_failures_are_counted(gateway: Gateway) -> None:
    """A flipped byte in a stored round makes the export fail with integrity_error, counted once."""
    gateway.openai(session="tamper-me").chat.completions.create(
        model="standin", messages=[{"role": "user", "content": "keep me"}])
    with sqlite3.connect(gateway.db_path) as db:
        (ct,) = db.execute("SELECT state_ct FROM sessions WHERE session_id='tamper-me'").fetchone()
        db.execute("UPDATE sessions SET state_ct=? WHERE session_id='tamper-me'",
                   (ct[:-1] + bytes([ct[-1] ^ 1]),))
    resp = httpx.get(f"{gateway.base_url}/sessions/tamper-me", headers=AUTH)
    assert resp.status_code == 500 and resp.json()["error"]["code"] == "integrity_check_failed"
    assert value(samples(gateway), "sessiongate_integrity_failures_total") == 1


def test_a_metrics_token_keeps_metrics_from_anyone_else(make_gateway: Callable[..., Gateway]) -> None:
    """With ``metrics.token_sha256`` set, /metrics (tenant names, models, token usage) answers only
    its bearer token: no key, a client key or auditor token is 401 as an unknown token (no guess is
    told apart on this unthrottled route), each told that /metrics takes the metrics token named by
    ``metrics.token_sha256``, never to use a client key; the scraper token reaches
    nothing else (client and admin routes refuse it), and a token listed twice is a config error."""
    token = "scrape-me-please-0123456789"
    gw = make_gateway(metrics={"token_sha256": hashlib.sha256(token.encode()).hexdigest()})
    missing = httpx.get(f"{gw.url}/metrics")
    assert missing.status_code == 401 and "metrics.token_sha256" in missing.json()["error"]["message"]
    assert "Authorization: Bearer <metrics token>" in missing.json()["error"]["message"]
    guess = httpx.get(f"{gw.url}/metrics", headers={"Authorization": "Bearer sg-not-a-key"})
    message = guess.json()["error"]["message"]
    assert "metrics.token_sha256" in message and "clients new" not in message and "API key" not in message
    for known in (ACME_KEY, AUDITOR_TOKEN):
        r = httpx.get(f"{gw.url}/metrics", headers={"Authorization": f"Bearer {known}"})
        assert (r.status_code, r.content) == (401, guess.content)
    scraped = httpx.get(f"{gw.url}/metrics", headers={"Authorization": f"Bearer {token}"})
    assert scraped.status_code == 200 and "sessiongate_requests_total" in scraped.text
    as_client = httpx.post(f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {token}"},
                           json={"model": "standin", "messages": [{"role": "user", "content": "hi"}]})
    assert as_client.status_code == 401 and as_client.json()["error"]["code"] == "invalid_api_key", as_client.text
    as_auditor = httpx.get(f"{gw.url}/admin/public-key", headers={"Authorization": f"Bearer {token}"})
    assert as_auditor.status_code == 403
    (gw.dir / "clash").mkdir()
    clash = write_config(gw.dir / "clash", None, REPO / "policies",
                         metrics={"token_sha256": hashlib.sha256(AUDITOR_TOKEN.encode()).hexdigest()})
    with pytest.raises(ConfigError, match="metrics.token_sha256: same key as auditors"):
        load_settings(clash)


def test_metrics_need_no_key_without_a_token(gateway: Gateway) -> None:
    assert httpx.get(f"{gateway.url}/metrics").status_code == 200
