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


def test_readyz_is_503_while_every_store_write_fails(make_gateway) -> None:
    """SQLite refusing to grow (SQLITE_FULL, what a full disk gives; here through its own
    max_page_count limit on the store's writing connections) fails every round with 503
    store_unavailable while reads still answer: one failed round leaves /readyz ready, three in
    a row make it 503 saying the writes fail (the cause only in the log), and the next round
    that commits makes it ready again."""
    import json
    import secrets

    from gateway.handlers import SERVICES

    gw = make_gateway()
    store = gw.app[SERVICES].sessions.store.inner
    writers = [store._writer.conn, store._inline]  # every connection the store writes with

    def chat(n: int) -> httpx.Response:
        return httpx.post(f"{gw.base_url}/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {ACME_KEY}", "X-Session-Id": f"acme:full-{n}"},
                          json={"model": "m", "messages": [{"role": "user", "content": secrets.token_urlsafe(30000)}]})

    assert chat(0).status_code == 200
    for conn in writers:
        conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
    try:
        failed = chat(1)
        assert failed.status_code == 503 and failed.json()["error"]["code"] == "store_unavailable"
        assert httpx.get(f"{gw.url}/readyz").status_code == 200  # one failure is not a failing store
        assert [chat(n).status_code for n in (2, 3)] == [503, 503]
        ready = httpx.get(f"{gw.url}/readyz")
        assert ready.status_code == 503, ready.text
        assert "writes are failing (3 in a row" in ready.json()["reason"] and "full" not in ready.text
        assert "sessiongate_store_writes_failing 3.0" in httpx.get(f"{gw.url}/metrics").text
        logged = [json.loads(line) for line in gw.log_path.read_text().splitlines()
                  if '"readiness_store_unavailable"' in line]
        assert logged and "database or disk is full" in logged[-1]["detail"]
    finally:
        for conn in writers:
            conn.execute("PRAGMA max_page_count = 1073741823")
    assert chat(4).status_code == 200
    assert httpx.get(f"{gw.url}/readyz").json()["status"] == "ready"
    assert "sessiongate_store_writes_failing 0.0" in httpx.get(f"{gw.url}/metrics").text


def test_failing_writes_stop_counting_after_the_window() -> None:
    """The failing state needs STORE_WRITE_FAILURES unavailable writes in a row; a committed write
    clears it, another error does not count, and with no write for STORE_WRITE_WINDOW seconds it
    lapses (a gateway out of rotation writes nothing: it must be able to come back)."""
    from gateway.background import STORE_WRITE_FAILURES, STORE_WRITE_WINDOW, Health
    from gateway.errors import IntegrityError, StoreUnavailable

    now = [1000.0]
    health = Health(monotonic=lambda: now[0])
    down = StoreUnavailable("the SQLite store failed to commit: database or disk is full")
    for _ in range(STORE_WRITE_FAILURES - 1):
        health.store_write(down)
    health.store_write(IntegrityError("a refused plan"))
    assert health.store_writes_failing() is None
    health.store_write(down)
    failing = health.store_writes_failing()
    assert failing is not None and failing.failures == STORE_WRITE_FAILURES and "disk is full" in failing.detail
    now[0] += STORE_WRITE_WINDOW + 1
    assert health.store_writes_failing() is None
    health.store_write(down)
    assert health.store_writes_failing() is not None  # still none committed: failing again at once
    health.store_write(None)
    assert health.store_writes_failing() is None
