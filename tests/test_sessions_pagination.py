"""``GET /v1/sessions`` and ``sessiongate sessions list`` page through a tenant's sessions in id
order with ``limit`` and ``after``; every session appears exactly once across the pages."""

from __future__ import annotations

import subprocess
import sys

import httpx

from tests.conftest import ACME_KEY, GLOBEX_KEY, REPO, Gateway

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}
COUNT = 250


def _fill(gateway: Gateway, count: int) -> list[str]:
    """*count* sessions of tenant acme, one chat round each, through the chat route."""
    ids = [f"s{i:05d}" for i in range(count)]
    with httpx.Client(timeout=30) as client:
        for sid in ids:
            resp = client.post(f"{gateway.base_url}/chat/completions", headers={**AUTH, "X-Session-Id": sid},
                               json={"model": "standin", "messages": [{"role": "user", "content": "hi"}]})
            assert resp.status_code == 200, resp.text
    return ids


def test_http_pages_cover_every_session_once(gateway: Gateway) -> None:
    """Pages of 100 with ``after`` return all 250 sessions in order, ``has_more`` false on the last."""
    ids = _fill(gateway, COUNT)
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        params = {"limit": "100", **({"after": after} if after else {})}
        page = httpx.get(f"{gateway.base_url}/sessions", headers=AUTH, params=params).json()
        pages += 1
        seen += [s["id"] for s in page["data"]]
        assert page["last_id"] == page["data"][-1]["id"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert pages == 3 and seen == ids


def test_http_default_page_is_bounded_and_other_tenants_see_nothing(gateway: Gateway) -> None:
    """Without ``limit`` a page holds 100 sessions; another tenant's list is empty; a bad limit is 400."""
    _fill(gateway, 120)
    page = httpx.get(f"{gateway.base_url}/sessions", headers=AUTH).json()
    assert len(page["data"]) == 100 and page["has_more"] is True
    other = httpx.get(f"{gateway.base_url}/sessions", headers={"Authorization": f"Bearer {GLOBEX_KEY}"}).json()
    assert other["data"] == [] and other["has_more"] is False
    for bad in ("0", "1001", "x", "-5"):
        resp = httpx.get(f"{gateway.base_url}/sessions", headers=AUTH, params={"limit": bad})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_limit"


def test_cli_list_pages_with_limit_and_after(gateway: Gateway) -> None:
    """``sessions list --limit 100`` prints 100 lines and says how to get the next page."""
    ids = _fill(gateway, 130)
    base = [sys.executable, "-m", "gateway", "--config", str(gateway.config_path), "sessions", "list",
            "--tenant", "acme"]
    first = subprocess.run([*base, "--limit", "100"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == ids[:100]
    assert f"--after {ids[99]}" in first.stderr
    second = subprocess.run([*base, "--after", ids[99]], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert [line.split("\t")[0] for line in second.stdout.splitlines()] == ids[100:]
    assert "--after" not in second.stderr
