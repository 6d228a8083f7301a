"""A gateway with the console, two auditors (one scoped to tenant globex) and some recorded
rounds, among them one whose content is hostile HTML."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import AUDITOR_TOKEN, GLOBEX_KEY, Gateway

SCOPED_TOKEN = "sg-test-globex-auditor"
HOSTILE = 'see <script>window.__pwned=1</script> and "><img src=x onerror="window.__pwned=2">'


@pytest.fixture
def console_gateway(make_gateway: Callable[..., Gateway]) -> Gateway:
    auditors = [{"name": "demo-auditor", "token_sha256": hashlib.sha256(AUDITOR_TOKEN.encode()).hexdigest()},
                {"name": "globex-auditor", "token_sha256": hashlib.sha256(SCOPED_TOKEN.encode()).hexdigest(),
                 "tenants": ["globex"]}]
    gateway = make_gateway(auditors=auditors)
    client = gateway.openai(session="console-a")
    client.chat.completions.create(model="standin", messages=[{"role": "user", "content": HOSTILE}])
    client.chat.completions.create(model="standin", messages=[{"role": "user", "content": "second turn"}])
    gateway.openai(key=GLOBEX_KEY, session="globex-1").chat.completions.create(
        model="standin", messages=[{"role": "user", "content": "globex says hi"}])
    return gateway


def login_csrf(html: str) -> str:
    import re
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF field on the page"
    return match.group(1)


def signed_in_client(gateway: Gateway, token: str = AUDITOR_TOKEN) -> Any:
    """An httpx client that signed in through the login form like a browser would."""
    import httpx
    client = httpx.Client(base_url=gateway.url, follow_redirects=False, timeout=30)
    form = client.get("/console/login")
    resp = client.post("/console/login", data={"token": token, "csrf": login_csrf(form.text)},
                       headers={"Origin": gateway.url})
    assert resp.status_code == 303 and resp.headers["location"] == "/console/overview", resp.text
    return client
