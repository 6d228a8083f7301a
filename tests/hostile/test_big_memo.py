"""A memo is sent with every request of its session: one too large to render and send is refused
where it is written, with the limit named, instead of freezing the gateway (a 750 KB memo of small
items took 11 s to render on the event loop, for every request of its session, stalling every
tenant's requests meanwhile)."""

from __future__ import annotations

import httpx

from gateway.session.model import MEMO_MAX_BYTES
from tests.conftest import ACME_KEY, Gateway, Upstream


def test_a_memo_over_the_limit_is_refused_naming_the_limit(gateway: Gateway, upstream: Upstream) -> None:
    with httpx.Client(base_url=gateway.base_url, headers={"Authorization": f"Bearer {ACME_KEY}"},
                      timeout=60) as acme:
        big = acme.put("/sessions/acme:memo2/memo", json={"memo": {"a": [[1]] * 150000}})
        assert big.status_code == 400, big.text[:200]
        error = big.json()["error"]
        assert error["code"] == "memo_too_large" and str(MEMO_MAX_BYTES) in error["message"]
        imported = acme.put("/sessions/acme:memo3", json={"full_context": [], "memo": {"a": [[1]] * 150000}})
        assert imported.status_code == 400 and str(MEMO_MAX_BYTES) in imported.json()["error"]["message"]
        assert acme.get("/sessions/acme:memo2/memo").status_code == 404  # nothing was written

        within = {"notes": ["fact " + "x" * 90] * 500}  # about 50 KB: accepted, rendered, sent
        assert acme.put("/sessions/acme:memo2/memo", json={"memo": within}).status_code == 200
        for _ in range(2):
            reply = acme.post("/chat/completions", headers={"X-Session-Id": "acme:memo2"},
                              json={"model": "standin", "messages": [{"role": "user", "content": "hi"}]})
            assert reply.status_code == 200, reply.text
            assert upstream.requests[-1]["messages"][-1]["content"].startswith(
                "[CHAT SESSION MEMO]:\nnotes:\n- fact xxx")
