"""A client cannot stall the gateway, or keep text out of the record, through the size of its
body under a policy with JSONPath keys (SPEC §3): a request whose input key would cost more than
its budget is refused before it reaches the provider (413 ``too_many_values``); a reply key too
costly on the provider's reply leaves the round recorded, ``incomplete``, its audit entry naming
the key."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiohttp import web

from tests.conftest import ACME_KEY, REPO, Gateway, Upstream, serving

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}

POLICY = """\
id: jsonpath-keys
priority: 50
match:
  session_ids: ["jp:*"]
session:
  input_keys: ["$..content", "$.model"]
  reply_keys: ["$.choices[0].logprobs.content[*].token", "$.choices[0].message.content"]
  max_length: 12000
  bounding: {strategy: simple_cut}
"""


def keyed_gateway(make_gateway: Callable[..., Gateway], tmp_path: Path, **overrides: Any) -> Gateway:
    policies = tmp_path / "policies-jp"
    shutil.copytree(REPO / "policies", policies)
    (policies / "jsonpath-keys.yaml").write_text(POLICY)
    return make_gateway(policies, name="gw-jp", **overrides)


def chat(gateway: Gateway, session: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{gateway.base_url}/chat/completions", content=orjson.dumps(body), timeout=60,
                      headers={**AUTH, "X-Session-Id": session, "Content-Type": "application/json"})


def recorded(gateway: Gateway, session: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{gateway.base_url}/sessions/{session}", headers=AUTH)
    assert resp.status_code == 200, resp.text
    return list(resp.json()["full_context"])


def test_a_padded_request_is_refused_before_the_provider(make_gateway: Callable[..., Gateway], tmp_path: Path,
                                                         upstream: Upstream) -> None:
    """60,000 empty lists beside one message: ``$..content`` would visit every one of them (on
    jsonpath-ng, seconds of the event loop), so the request is 413 in OpenAI's error shape,
    saying what to send instead, and nothing reaches the provider or the record."""
    gateway = keyed_gateway(make_gateway, tmp_path)
    body = {"model": "standin", "messages": [{"role": "user", "content": "hi"}], "junk": [[]] * 60_000}
    resp = chat(gateway, "jp:padded", body)
    assert resp.status_code == 413, resp.text
    error = resp.json()["error"]
    assert error["code"] == "too_many_values" and error["type"] == "invalid_request_error"
    assert "fewer" in error["message"] and "$..content" not in error["message"]
    assert upstream.requests == []
    assert not [e for e in gateway.audit_entries() if e["event"] == "round"]


def test_a_normal_request_under_the_same_policy_is_recorded(make_gateway: Callable[..., Gateway],
                                                            tmp_path: Path, upstream: Upstream) -> None:
    """The same keys on an ordinary body record their blocks as before."""
    gateway = keyed_gateway(make_gateway, tmp_path)
    resp = chat(gateway, "jp:normal", {"model": "standin", "messages": [{"role": "user", "content": "hello"}]})
    assert resp.status_code == 200, resp.text
    assert recorded(gateway, "jp:normal")[0]["content"] == "[$..content]:\nhello\n[$.model]:\nstandin"


def test_a_reply_key_over_budget_is_named_in_an_incomplete_round(make_gateway: Callable[..., Gateway],
                                                                 tmp_path: Path) -> None:
    """A reply with 40,000 logprob entries: the token key is left out of the record, the other
    reply key is recorded, the round is ``incomplete`` and ``truncated`` with the key named in
    its audit entry, and the client still gets the whole reply."""
    tokens = [{"token": "a", "logprob": 0.0, "bytes": [97], "top_logprobs": []}] * 40_000
    reply = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
             "choices": [{"index": 0, "finish_reason": "stop", "logprobs": {"content": tokens},
                          "message": {"role": "assistant", "content": "the answer"}}]}

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=orjson.dumps(reply), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    with serving(app) as url:
        gateway = keyed_gateway(make_gateway, tmp_path,
                                upstreams=[{"name": "big", "base_url": f"{url}/v1", "models": ["*"]}])
        resp = chat(gateway, "jp:logprobs", {"model": "standin", "messages": [{"role": "user", "content": "q"}]})
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["choices"][0]["logprobs"]["content"]) == 40_000
    context = recorded(gateway, "jp:logprobs")
    assert context[1] == {"role": "assistant", "content": "[$.choices[0].message.content]:\nthe answer"}
    entry = [e for e in gateway.audit_entries() if e["event"] == "round"][-1]
    assert entry["outcome"] == "incomplete" and entry["truncated"] is True
    assert entry["detail"] == {"keys_over_budget": ["$.choices[0].logprobs.content[*].token"]}
