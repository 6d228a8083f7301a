"""The fields the gateway decides on are read as sent, so a value of another JSON type is refused
(a lenient upstream would coerce it): ``n: 2.0`` on a recorded session would give the client two
replies while the round records one; ``store: "true"`` or ``background: 1`` would have the
provider keep what the gateway's checks let through as not kept."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import ACME_KEY, Gateway, Upstream

AUTH = {"Authorization": f"Bearer {ACME_KEY}", "X-Session-Id": "acme:flags"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
RESPONSES = {"model": "m", "input": "hi"}
MESSAGES = {"model": "claude-x", "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("path", "body", "field", "value"), [
    ("/chat/completions", CHAT, "n", 2.0), ("/chat/completions", CHAT, "n", "2"),
    ("/chat/completions", CHAT, "n", True),
    ("/chat/completions", CHAT, "store", "true"), ("/chat/completions", CHAT, "store", 1),
    ("/chat/completions", CHAT, "stream", "false"),
    ("/responses", RESPONSES, "background", 1), ("/responses", RESPONSES, "background", "true"),
    ("/responses", RESPONSES, "store", "false"), ("/responses", RESPONSES, "stream", 0),
    ("/messages", MESSAGES, "stream", "true"),
])
def test_a_flag_of_another_type_is_refused_before_the_upstream(gateway: Gateway, upstream: Upstream, path: str,
                                                               body: dict[str, Any], field: str, value: Any) -> None:
    before = len(upstream.requests)
    r = httpx.post(f"{gateway.base_url}{path}", json={**body, field: value}, headers=AUTH, timeout=30)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert f"'{field}' must be" in message
    assert len(upstream.requests) == before


@pytest.mark.parametrize(("field", "value"), [("n", 1), ("n", None), ("store", False), ("store", None),
                                              ("stream", None)])
def test_the_canonical_values_still_pass(gateway: Gateway, upstream: Upstream, field: str, value: Any) -> None:
    r = httpx.post(f"{gateway.base_url}/chat/completions", json={**CHAT, field: value}, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
