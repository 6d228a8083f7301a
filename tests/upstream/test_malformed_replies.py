"""A provider's 200 reply with members of types a chat completion never has: a clear 502
``bad_upstream_reply`` for a JSON reply (it was a 500 ``record_failed``, or a record holding
garbage the next turn sent back), and for a stream the events relayed and the record stopped."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from tests.conftest import ACME_KEY, Gateway, chat_provider

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}


@contextlib.contextmanager
def provider(reply: dict[str, Any] | bytes) -> Iterator[str]:
    async def chat(request: web.Request) -> web.StreamResponse:
        if isinstance(reply, bytes):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(reply)
            await resp.write_eof()
            return resp
        return web.json_response(reply)
    with chat_provider(chat) as url:
        yield url


def completion(message: Any) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}


def send(gateway: Gateway, session: str, stream: bool = False) -> httpx.Response:
    return httpx.post(f"{gateway.base_url}/chat/completions", headers={**AUTH, "X-Session-Id": session},
                      json={"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})


@pytest.mark.parametrize("message", [
    "just a string", None, {"role": "assistant", "content": {"x": 1}},
    {"role": "assistant", "content": None, "tool_calls": "zz"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": {"name": 7}}]}])
def test_a_json_reply_of_the_wrong_types_is_a_502_and_records_no_text(
        make_gateway: Callable[..., Gateway], message: Any) -> None:
    with provider(completion(message)) as url:
        gateway = make_gateway(upstreams=[{"name": "odd", "base_url": url, "models": ["*"]}])
        resp = send(gateway, "odd-json")
        assert resp.status_code == 502 and resp.json()["error"]["code"] == "bad_upstream_reply", resp.text
        assert httpx.get(f"{gateway.base_url}/sessions/odd-json", headers=AUTH).json()["context_window"] == []
        assert [e["outcome"] for e in gateway.audit_entries() if e.get("event") == "round"] == ["upstream_error"]


def test_a_json_reply_whose_content_is_text_parts_is_recorded_as_its_text(
        make_gateway: Callable[..., Gateway]) -> None:
    parts = {"role": "assistant", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}
    with provider(completion(parts)) as url:
        gateway = make_gateway(upstreams=[{"name": "parts", "base_url": url, "models": ["*"]}])
        assert send(gateway, "parts").status_code == 200
        window = httpx.get(f"{gateway.base_url}/sessions/parts", headers=AUTH).json()["context_window"]
    assert window[-1] == {"role": "assistant", "content": "Hello"}


def test_a_stream_with_an_event_of_the_wrong_types_reaches_the_client_and_records_what_came_before(
        make_gateway: Callable[..., Gateway]) -> None:
    events = [{"choices": [{"index": 0, "delta": {"content": "ok "}}]}, {"choices": "abc"},
              {"choices": [{"index": 0, "delta": {"content": "more"}, "finish_reason": "stop"}]}]
    body = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    with provider(body) as url:
        gateway = make_gateway(upstreams=[{"name": "odd", "base_url": url, "models": ["*"]}])
        resp = send(gateway, "odd-stream", stream=True)
        assert resp.status_code == 200 and b"internal_error" not in resp.content
        assert resp.content == body
        doc = httpx.get(f"{gateway.base_url}/sessions/odd-stream", headers=AUTH).json()
    assert doc["full_context"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok "}]
    assert doc["context_window"] == []  # an incomplete round stays out of the window
    entry = [e for e in gateway.audit_entries() if e.get("event") == "round"][-1]
    assert entry["outcome"] == "incomplete", entry
