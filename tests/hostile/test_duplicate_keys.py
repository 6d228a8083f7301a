"""A key sent twice cannot make the model read something other than the record (SPEC §3).

JSON leaves duplicate object keys to each parser: the gateway's (orjson) keeps the last value,
some providers' parsers keep the first. A client that sent the raw bytes through could put text
under the first ``messages`` (or ``content``, ``input``, ``model``) that the model reads and the
record never holds. The gateway forwards the body as it parsed it, so the provider gets each key
once, with the value that was recorded, routed and audited. The upstream here keeps the bytes
that reached it and is read with a first-wins parser, the reading the attack relies on. JSON
the gateway serialised goes as ``application/json`` (UTF-8), whatever charset the client claimed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import ACME_KEY, Gateway
from tests.hostile.conftest import Capture

AUTH = {"Authorization": f"Bearer {ACME_KEY}", "Content-Type": "application/json"}
HIDDEN = "CANARY-dup-5a1e-read-by-a-first-wins-parser"

def first_wins(raw: bytes) -> Any:
    """*raw* read by a parser that keeps the first of duplicate keys."""
    import json

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            out.setdefault(key, value)
        return out

    return json.loads(raw, object_pairs_hook=pairs)


@pytest.fixture
def gw(make_gateway: Callable[..., Gateway], capture: Capture) -> Gateway:
    return make_gateway(upstreams=[
        {"name": "openai", "base_url": capture.url, "models": ["text-embedding-3-small", "*"],
         "forward_routes": ["embeddings"]},
        {"name": "anthropic", "base_url": capture.url, "models": ["*"], "protocol": "anthropic"}])


def post(gw: Gateway, path: str, raw: bytes, session: str | None = None) -> httpx.Response:
    headers = {**AUTH, **({"X-Session-Id": session} if session else {})}
    return httpx.post(gw.url + path, content=raw, headers=headers, timeout=30)


def user_text(forwarded: dict[str, Any], path: str) -> str:
    if path == "/v1/responses":
        return str(forwarded["input"])
    return str(forwarded["messages"][-1]["content"])


# Each body names a key twice: first the hidden text, then the text the gateway keeps.
BODIES: dict[str, list[bytes]] = {
    "/v1/chat/completions": [
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "%s"}],'
        b' "messages": [{"role": "user", "content": "innocent"}]}' % HIDDEN.encode(),
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "%s", "content": "innocent"}]}'
        % HIDDEN.encode(),
        b'{"model": "gpt-4o", "messages": [{"role": "user", "con\\u0074ent": "%s", "content": "innocent"}]}'
        % HIDDEN.encode(),
    ],
    "/v1/responses": [
        b'{"model": "gpt-4o", "input": "%s", "input": "innocent"}' % HIDDEN.encode(),
    ],
    "/v1/messages": [
        b'{"model": "claude-x", "max_tokens": 16, "messages": [{"role": "user", "content": "%s"}],'
        b' "messages": [{"role": "user", "content": "innocent"}]}' % HIDDEN.encode(),
    ],
}
CASES = [(path, i) for path, bodies in BODIES.items() for i in range(len(bodies))]


@pytest.mark.parametrize(("path", "case"), CASES)
def test_the_model_reads_each_key_once_with_the_value_the_gateway_kept(gw: Gateway, capture: Capture,
                                                                        path: str, case: int) -> None:
    raw = BODIES[path][case]
    assert first_wins(raw) != orjson.loads(raw)  # the two readings differ: the attack is real
    resp = post(gw, path, raw)
    assert resp.status_code == 200, resp.text
    (seen_path, _, forwarded), = capture.seen
    assert seen_path == path
    assert HIDDEN.encode() not in forwarded
    assert first_wins(forwarded) == orjson.loads(forwarded)  # one reading, whatever the parser
    assert user_text(orjson.loads(forwarded), path) == "innocent"


def test_a_recorded_session_holds_what_the_model_read(gw: Gateway, capture: Capture) -> None:
    raw = BODIES["/v1/chat/completions"][0]
    assert post(gw, "/v1/chat/completions", raw, session="acme:dup").status_code == 200
    forwarded = first_wins(capture.seen[-1][2])
    exported = httpx.get(f"{gw.base_url}/sessions/acme:dup", headers=AUTH, timeout=30)
    assert exported.status_code == 200, exported.text
    assert HIDDEN not in exported.text
    history = exported.json()["full_context"]
    assert history[0]["content"] == forwarded["messages"][-1]["content"] == "innocent"


def test_a_forwarded_route_sends_the_model_it_routed_and_audited(gw: Gateway, capture: Capture) -> None:
    raw = b'{"model": "%s", "input": "x", "model": "text-embedding-3-small"}' % HIDDEN.encode()
    resp = post(gw, "/v1/embeddings", raw)
    assert resp.status_code == 200, resp.text
    forwarded = capture.seen[-1][2]
    assert HIDDEN.encode() not in forwarded
    assert first_wins(forwarded)["model"] == "text-embedding-3-small"
    (entry,) = [e for e in gw.audit_entries() if e["event"] == "proxy"]
    assert entry["model"] == "text-embedding-3-small"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
def test_json_the_gateway_serialised_goes_as_json_whatever_the_client_claimed(gw: Gateway, capture: Capture,
                                                                              path: str) -> None:
    """A provider that honoured a client's ``charset=utf-16`` would read other text than the
    UTF-8 the gateway recorded and sends."""
    raw = '{"model": "gpt-4o", "input": "é", "messages": [{"role": "user", "content": "héllo"}]}'.encode()
    resp = httpx.post(gw.url + path, content=raw, timeout=30,
                      headers={**AUTH, "Content-Type": "application/json; charset=utf-16"})
    assert resp.status_code == 200, resp.text
    assert [headers["Content-Type"] for _, headers, _ in capture.seen] == ["application/json"]
    assert orjson.loads(capture.seen[-1][2]) == orjson.loads(raw)


def test_a_forwarded_body_that_is_not_json_goes_as_it_came(gw: Gateway, capture: Capture) -> None:
    raw = b"input=x&model=a&model=b"
    resp = httpx.post(gw.url + "/v1/embeddings", content=raw, timeout=30,
                      headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 200, resp.text
    assert capture.seen[-1][2] == raw
    assert [headers["Content-Type"] for _, headers, _ in capture.seen] == ["application/x-www-form-urlencoded"]
