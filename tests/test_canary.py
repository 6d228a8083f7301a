"""Nothing a client sends is written in plaintext anywhere (SPEC §3): a unique canary in a
message is absent from the raw bytes of the database, its WAL and the gateway log, while the
session's export (decrypted) returns it."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import httpx
import pytest
from aiohttp import web

from tests.conftest import ACME_KEY, Gateway, Upstream, _Server

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}


def new_canary() -> str:
    return f"CANARY-{secrets.token_hex(12)}"


def written(gateway: Gateway) -> bytes:
    """Every byte the gateway wrote: database, WAL, shared memory, log, audit checkpoints."""
    extra = [p for p in (gateway.log_path, gateway.dir / "checkpoints.jsonl") if p.exists()]
    return gateway.stored_bytes() + b"".join(p.read_bytes() for p in extra)


def variants(canary: str) -> list[bytes]:
    """The canary as it could appear in a file: UTF-8, UTF-16, upper and lower case."""
    return [canary.encode(), canary.lower().encode(), canary.upper().encode(), canary.encode("utf-16-le")]


def assert_absent(canary: str, data: bytes) -> None:
    for form in variants(canary):
        assert form not in data


def test_canary_is_exported_but_never_stored_in_plaintext(gateway: Gateway, upstream: Upstream) -> None:
    """A canary in plain, streamed and imported messages and in the memo is exported whole and written nowhere."""
    canary = new_canary()
    client = gateway.openai(session="canary-s")
    reply = client.chat.completions.create(
        model="standin", messages=[{"role": "system", "content": f"system {canary}"},
                                   {"role": "user", "content": f"my secret is {canary}"}])
    assert canary in (reply.choices[0].message.content or "")
    list(client.chat.completions.create(model="standin", stream=True,
                                        messages=[{"role": "user", "content": f"again {canary}"}]))
    doc = {"full_context": [{"role": "user", "content": f"imported {canary}"}], "memo": {"note": canary}}
    assert httpx.put(f"{gateway.base_url}/sessions/canary-import", json=doc, headers=AUTH).status_code == 200
    client.chat.completions.create(model="standin", messages=[{"role": "user", "content": "x"}])
    exported = httpx.get(f"{gateway.base_url}/sessions/canary-s", headers=AUTH).text
    assert exported.count(canary) >= 4  # two user messages and two replies that echo them
    assert canary in httpx.get(f"{gateway.base_url}/sessions/canary-import", headers=AUTH).text
    assert_absent(canary, written(gateway))


@pytest.mark.parametrize("body", [
    b'{"messages": [{"role": "user", "content": "CANARY"}',
    b'{"messages": [{"role": 7, "content": "CANARY"}]}',
    b'{"messages": [{"role": "user", "content": "CANARY \xff"}]}',
], ids=["truncated-json", "bad-role", "invalid-utf8"])
def test_canary_in_a_refused_request_is_not_echoed_or_logged(gateway: Gateway, body: bytes) -> None:
    """A refused request's content appears neither in the error message nor in any file."""
    canary = new_canary()
    resp = httpx.post(f"{gateway.base_url}/chat/completions", content=body.replace(b"CANARY", canary.encode()),
                      headers={**AUTH, "X-Session-Id": "refused"})
    assert resp.status_code == 400
    assert canary not in resp.text
    assert_absent(canary, written(gateway))


def test_canary_in_an_upstream_error_is_passed_on_but_not_logged(make_gateway: Callable[..., Gateway]) -> None:
    """An upstream error body reaches the client as is, and nothing of it lands in the store or the log."""
    canary = new_canary()

    async def fail(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": f"bad prompt {canary}", "type": "x", "code": None}},
                                 status=400)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", fail)
    server = _Server(app)
    try:
        gateway = make_gateway(upstreams=[{"name": "picky", "base_url": f"http://127.0.0.1:{server.port}/v1"}])
        resp = httpx.post(f"{gateway.base_url}/chat/completions", headers={**AUTH, "X-Session-Id": "picky"},
                          json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 400 and canary in resp.text
        assert_absent(canary, written(gateway))
    finally:
        server.stop()
