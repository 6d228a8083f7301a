"""Stage: parse_request. Reads the body once; sets ``raw``, ``body``, ``model``, ``stream``.

Refuses with 413 when the body (chunked or not) is over ``server.max_body_bytes``, and with 400
for invalid UTF-8, malformed JSON, a body that is not an object, or a chat request without a
non-empty ``messages`` list of objects with a ``role``.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway.context import Context
from gateway.errors import BadRequest, InvalidJSON, PayloadTooLarge


async def read_limited(request: web.Request, limit: int) -> bytes:
    """The request body, refusing it as soon as it passes *limit* bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body is {request.content_length} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(raw: bytes) -> dict:
    """The body as a JSON object; ``InvalidJSON`` says what is wrong."""
    if not raw:
        raise InvalidJSON("request body is empty; send a JSON object")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJSON(f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"request body is not valid JSON: {exc.msg} at line {exc.lineno} "
                          f"column {exc.colno}") from None
    if not isinstance(body, dict):
        raise InvalidJSON("request body must be a JSON object")
    return body


def check_chat(body: dict) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' is required: a non-empty list of chat messages", code="missing_messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"'messages[{i}]' must be an object with a string 'role'", code="invalid_messages")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string", code="invalid_model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise BadRequest("'stream' must be true or false", code="invalid_stream")


async def parse_request(ctx: Context) -> None:
    ctx.raw = await read_limited(ctx.request, ctx.services.settings.server.max_body_bytes)
    ctx.body = parse_json_object(ctx.raw)
    check_chat(ctx.body)
    ctx.model = ctx.body.get("model")
    ctx.stream = bool(ctx.body.get("stream"))
