"""Verifying a tenant the store holds nothing of (a mistyped name) is "no such tenant", not "intact".

``/admin/audit/verify?tenant=acmee`` used to answer 200 ``"ok": true``, and the console's
verification said the chain was intact and then appended its ``verify`` entry to a new chain
for the typo, after which an export of it was no longer refused. The CLI already refused it.
"""

from __future__ import annotations

import httpx

from tests.conftest import AUDITOR_TOKEN, Gateway
from tests.console.test_console_http import verification_page
from tests.evidence.conftest import Tables, run_cli
from tests.evidence.test_tamper_data import record

HEADERS = {"Authorization": f"Bearer {AUDITOR_TOKEN}"}


def test_the_admin_route_answers_404_for_an_unknown_tenant(gateway: Gateway) -> None:
    """404 naming the tenant for the typo, nothing written for it; a real tenant still verifies."""
    record(gateway, "alice", 1)
    resp = httpx.get(f"{gateway.url}/admin/audit/verify", params={"tenant": "acmee"}, headers=HEADERS, timeout=30)
    assert resp.status_code == 404, resp.text
    error = resp.json()["error"]
    assert error["code"] == "not_found" and "no tenant 'acmee'" in error["message"], error
    assert "Traceback" not in resp.text
    assert Tables("sqlite", gateway).sql("SELECT count(*) FROM audit WHERE tenant='acmee'") == [(0,)]
    resp = httpx.get(f"{gateway.url}/admin/audit/verify", params={"tenant": "acme"}, headers=HEADERS, timeout=30)
    assert resp.status_code == 200 and resp.json()["ok"] is True, resp.text


def test_the_console_creates_no_chain_for_an_unknown_tenant(gateway: Gateway) -> None:
    """The console's verification of the typo does not call it intact and starts no chain for it,
    so an export of it is still refused."""
    record(gateway, "alice", 1)
    page = verification_page(gateway, "acmee")
    assert "intact" not in page, page
    assert Tables("sqlite", gateway).sql("SELECT count(*) FROM audit WHERE tenant='acmee'") == [(0,)]
    code, _, err = run_cli("--config", str(gateway.config_path), "export", "--tenant", "acmee", "--format", "jsonl",
                           "--out", str(gateway.dir / "typo.jsonl"))
    assert code == 2 and "acmee" in err, err
