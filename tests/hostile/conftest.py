"""Fixtures for the hostile tests: ``capture``, an upstream that keeps every request byte for
byte (it decodes nothing itself) and answers each protocol's route with a minimal reply."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import _Server

REPLIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]},
    "/v1/responses": {
        "id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": "m",
        "output": [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": "ok", "annotations": []}]}]},
    "/v1/messages": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "m", "stop_reason": "end_turn",
        "content": [{"type": "text", "text": "ok"}], "usage": {"input_tokens": 1, "output_tokens": 1}},
}
"""What ``capture`` answers on each model route; any other path gets an empty list."""


@dataclass
class Capture:
    """An upstream that keeps ``(path, headers, body)`` of what reached it, byte for byte."""

    url: str = ""
    seen: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.path, dict(request.headers), await request.read()))
        return web.json_response(REPLIES.get(request.path, {"object": "list", "data": []}))


@pytest.fixture
def capture() -> Iterator[Capture]:
    cap = Capture()
    app = web.Application(handler_args={"auto_decompress": False})
    app.router.add_route("*", "/{tail:.*}", cap.handle)
    server = _Server(app)
    cap.url = f"http://127.0.0.1:{server.port}/v1"
    yield cap
    server.stop()
