"""A recording test upstream that speaks OpenAI's Responses API and Anthropic's Messages API,
JSON and SSE, with the event sequences the real APIs send (checked against the ``openai`` and
``anthropic`` SDKs' event types).

``requests`` holds ``(path, headers, body)`` of every request. Model ``cut`` breaks a stream
off after four events; model ``broken`` answers a Responses request with 500; model ``limited``
answers a Messages request with 429, ``retry-after: 7`` and ``x-should-retry: false``. Messages
replies carry Anthropic's ``request-id`` and ``anthropic-ratelimit-*`` headers. The reply is
``"<protocol> says: <last user text>"``; when the request offers tools and its last input is not
a tool result, the reply is a call of the first tool with ``{"city": "Paris"}`` (a Responses
custom tool, ``type: custom``, gets ``custom_tool_call`` with the input ``PATCH_INPUT``); after a
tool result the reply is ``"tool said: <result>"``. Tool calls and results that do not pair get
the provider's 400 (``*_pairing_refusal``), as does a Messages request with tool blocks and no
tools. With ``thinking`` on, a Messages reply starts
with a signed ``thinking`` block, and a request answering a tool call must start that assistant
turn with it, unchanged, or gets Anthropic's 400 (``thinking_refusal``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.conftest import _Server

_ids = itertools.count(1)
PATCH_INPUT = "*** Begin Patch\n*** Add File: CANARY-PATCH-4242.txt\n+hello\n*** End Patch"


def _sse(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p)
    return ""


# --- tool pairing, as the providers check it -----------------------------------------------

def chat_pairing_refusal(body: dict[str, Any]) -> str | None:
    """OpenAI's 400 for a Chat history whose tool calls and results do not pair: each call
    answered by the tool messages right after it, each tool message answering such a call."""
    open_ids: list[str] = []
    for m in body.get("messages") or []:
        if m.get("role") == "tool":
            if m.get("tool_call_id") not in open_ids:
                return ("Invalid parameter: messages with role 'tool' must be a response to a preceeding message "
                        "with 'tool_calls'.")
            open_ids.remove(m["tool_call_id"])
            continue
        if open_ids:
            return ("An assistant message with 'tool_calls' must be followed by tool messages responding to each "
                    "'tool_call_id'. The following tool_call_ids did not have response messages: "
                    + ", ".join(open_ids))
        open_ids = [c.get("id") for c in m.get("tool_calls") or []]
    return None


def messages_pairing_refusal(body: dict[str, Any]) -> str | None:
    """Anthropic's 400 for tool blocks that do not pair (each ``tool_use`` answered by a
    ``tool_result`` in the next message, each ``tool_result`` answering one in the message
    before), or that come in a request defining no tools."""
    messages = body.get("messages") or []
    blocks = [[b for b in m.get("content") or [] if isinstance(b, dict)] if isinstance(m.get("content"), list) else []
              for m in messages]
    if not body.get("tools") and any(b.get("type") in ("tool_use", "tool_result") for bs in blocks for b in bs):
        return "Requests which include `tool_use` or `tool_result` blocks must define tools."
    for i, bs in enumerate(blocks):
        uses = [b.get("id") for b in bs if b.get("type") == "tool_use"]
        answers = [b.get("tool_use_id") for b in blocks[i + 1] if b.get("type") == "tool_result"] \
            if i + 1 < len(blocks) else []
        missing = [u for u in uses if u not in answers]
        if uses and missing and i + 1 < len(blocks):
            return (f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                    f"{', '.join(map(str, missing))}. Each `tool_use` block must have a corresponding "
                    "`tool_result` block in the next message.")
        previous = [b.get("id") for b in blocks[i - 1] if b.get("type") == "tool_use"] if i else []
        for b in bs:
            if b.get("type") == "tool_result" and b.get("tool_use_id") not in previous:
                return (f"messages.{i}.content: unexpected `tool_use_id` found in `tool_result` blocks: "
                        f"{b.get('tool_use_id')}. Each `tool_result` block must have a corresponding `tool_use` "
                        "block in the previous message.")
    return None


def responses_pairing_refusal(body: dict[str, Any]) -> str | None:
    """OpenAI's 400 for a Responses input with a call no output answers (an output of no call
    is let through here, though the API refuses that too)."""
    items: list[dict[str, Any]] = body["input"] if isinstance(body.get("input"), list) else []
    outputs = [i.get("call_id") for i in items if i.get("type") in ("function_call_output", "custom_tool_call_output")]
    for item in items:
        if item.get("type") in ("function_call", "custom_tool_call") and item.get("call_id") not in outputs:
            return f"No tool output found for function call {item.get('call_id')}."
    return None


# --- Responses ------------------------------------------------------------------------------

def responses_plan(body: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    items = body.get("input") or []
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    last = items[-1] if items else {}
    if last.get("type") in ("function_call_output", "custom_tool_call_output"):
        return f"tool said: {last.get('output')}", None
    if body.get("tools"):
        tool = body["tools"][0]
        if tool.get("type") == "custom":
            return None, {"type": "custom_tool_call", "name": tool.get("name"), "input": PATCH_INPUT}
        return None, {"name": tool.get("name"), "arguments": '{"city": "Paris"}'}
    users = [i for i in items if i.get("role") == "user"]
    return f"responses says: {_text_of(users[-1].get('content')) if users else ''}", None


def response_object(body: dict[str, Any], text: str | None, call: dict[str, Any] | None, rid: str,
                    status: str = "completed") -> dict[str, Any]:
    output: list[dict[str, Any]] = []
    if text is not None:
        output.append({"type": "message", "id": f"msg_{rid}", "status": "completed", "role": "assistant",
                       "content": [{"type": "output_text", "text": text, "annotations": []}]})
    if call is not None:
        output.append({"type": "function_call", "id": f"fc_{rid}", "call_id": f"call_{rid}", "status": "completed",
                       **call})
    return {"id": f"resp_up{rid}", "object": "response", "created_at": 1, "status": status,
            "model": body.get("model"), "output": output, "parallel_tool_calls": True, "tool_choice": "auto",
            "tools": body.get("tools") or [], "instructions": body.get("instructions"), "metadata": {},
            "error": None, "incomplete_details": None, "temperature": 1.0, "top_p": 1.0,
            "store": body.get("store", True), "previous_response_id": body.get("previous_response_id"),
            **({"text": body["text"]} if "text" in body else {}),
            "usage": {"input_tokens": 5, "output_tokens": 7, "total_tokens": 12,
                      "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}}


def responses_events(body: dict[str, Any], text: str | None, call: dict[str, Any] | None, rid: str) -> list[bytes]:
    final = response_object(body, text, call, rid)
    start = {**final, "status": "in_progress", "output": [], "usage": None}
    seq = itertools.count()
    out = [_sse("response.created", {"response": start, "sequence_number": next(seq)}),
           _sse("response.in_progress", {"response": start, "sequence_number": next(seq)})]
    for index, item in enumerate(final["output"]):
        if item["type"] == "message":
            out.append(_sse("response.output_item.added", {"output_index": index, "sequence_number": next(seq),
                                                           "item": {**item, "status": "in_progress", "content": []}}))
            part = {"type": "output_text", "text": "", "annotations": []}
            out.append(_sse("response.content_part.added", {"item_id": item["id"], "output_index": index,
                                                            "content_index": 0, "part": part,
                                                            "sequence_number": next(seq)}))
            words = text.split(" ") if text else []
            for i, word in enumerate(words):
                out.append(_sse("response.output_text.delta", {
                    "item_id": item["id"], "output_index": index, "content_index": 0, "logprobs": [],
                    "delta": word if i == 0 else " " + word, "sequence_number": next(seq)}))
            out.append(_sse("response.output_text.done", {"item_id": item["id"], "output_index": index,
                                                          "content_index": 0, "text": text, "logprobs": [],
                                                          "sequence_number": next(seq)}))
            out.append(_sse("response.content_part.done", {"item_id": item["id"], "output_index": index,
                                                           "content_index": 0, "part": item["content"][0],
                                                           "sequence_number": next(seq)}))
        elif item["type"] == "custom_tool_call":
            out.append(_sse("response.output_item.added", {"output_index": index, "sequence_number": next(seq),
                                                           "item": {**item, "input": "", "status": "in_progress"}}))
            out.append(_sse("response.custom_tool_call_input.delta", {
                "item_id": item["id"], "output_index": index, "delta": item["input"], "sequence_number": next(seq)}))
            out.append(_sse("response.custom_tool_call_input.done", {
                "item_id": item["id"], "output_index": index, "input": item["input"], "sequence_number": next(seq)}))
        else:
            out.append(_sse("response.output_item.added", {"output_index": index, "sequence_number": next(seq),
                                                           "item": {**item, "arguments": "",
                                                                    "status": "in_progress"}}))
            out.append(_sse("response.function_call_arguments.delta", {
                "item_id": item["id"], "output_index": index, "delta": item["arguments"],
                "sequence_number": next(seq)}))
            out.append(_sse("response.function_call_arguments.done", {
                "item_id": item["id"], "output_index": index, "arguments": item["arguments"],
                "name": item["name"], "sequence_number": next(seq)}))
        out.append(_sse("response.output_item.done", {"output_index": index, "item": item,
                                                      "sequence_number": next(seq)}))
    out.append(_sse("response.completed", {"response": final, "sequence_number": next(seq)}))
    return out


# --- Messages -------------------------------------------------------------------------------

def messages_plan(body: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    last = body["messages"][-1]
    content = last.get("content")
    if isinstance(content, list):
        results = [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]
        if results:
            return f"tool said: {_text_of(results[-1].get('content'))}", None
    if body.get("tools"):
        return None, {"name": body["tools"][0]["name"], "input": {"city": "Paris"}}
    return f"messages says: {_text_of(content)}", None


def thinking_on(body: dict[str, Any]) -> bool:
    return isinstance(body.get("thinking"), dict) and body["thinking"].get("type") in ("enabled", "adaptive")


def signature(thinking: str) -> str:
    """The provider's signature of a thinking text (Anthropic checks it when the block comes back)."""
    return base64.b64encode(hmac.new(b"fake-anthropic", thinking.encode(), hashlib.sha256).digest()).decode()


def thinking_refusal(body: dict[str, Any]) -> str | None:
    """Anthropic's 400 for a request that continues a tool call made with thinking on without the
    thinking block (unchanged, its signature valid) at the start of that assistant turn, or that
    turns thinking off and still holds a thinking block."""
    messages = body.get("messages") or []
    if (body.get("thinking") or {}).get("type") == "disabled" and any(
            isinstance(m.get("content"), list) and any(isinstance(b, dict) and b.get("type") in (
                "thinking", "redacted_thinking") for b in m["content"]) for m in messages):
        return "When thinking is disabled, an `assistant` message cannot contain `thinking`."
    last = messages[-1] if messages else {}
    answers_tool = isinstance(last.get("content"), list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in last["content"])
    if not thinking_on(body) or not answers_tool or len(messages) < 2:
        return None
    index = len(messages) - 2
    content = messages[index].get("content")
    first = content[0] if isinstance(content, list) and content else {}
    kind = first.get("type") if isinstance(first, dict) else None
    if kind not in ("thinking", "redacted_thinking"):
        return (f"messages.{index}.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
                f"`{kind}`. When `thinking` is enabled, a final `assistant` message must start with a thinking "
                "block (preceeding the lastmost set of `tool_use` and `tool_result` blocks).")
    if kind == "thinking" and first.get("signature") != signature(str(first.get("thinking"))):
        return f"messages.{index}.content.0: Invalid `signature` in `thinking` block"
    return None


def message_object(body: dict[str, Any], text: str | None, call: dict[str, Any] | None, rid: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if thinking_on(body):
        thought = "The tool answered; I can reply." if text is not None else "I need the tool for this."
        content.append({"type": "thinking", "thinking": thought, "signature": signature(thought)})
    if text is not None:
        content.append({"type": "text", "text": text})
    if call is not None:
        content.append({"type": "tool_use", "id": f"toolu_{rid}", **call})
    stop = "refusal" if body.get("model") == "claude-refuses" else "tool_use" if call else "end_turn"
    return {"id": f"msg_up{rid}", "type": "message", "role": "assistant", "model": body.get("model"),
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 5, "output_tokens": 7}}


def messages_events(body: dict[str, Any], text: str | None, call: dict[str, Any] | None, rid: str) -> list[bytes]:
    final = message_object(body, text, call, rid)
    start = {**final, "content": [], "stop_reason": None, "usage": {"input_tokens": 5, "output_tokens": 1}}
    out = [_sse("message_start", {"message": start}), _sse("ping", {})]
    for index, block in enumerate(final["content"]):
        if block["type"] == "thinking":
            out.append(_sse("content_block_start", {"index": index, "content_block": {
                "type": "thinking", "thinking": "", "signature": ""}}))
            for i, word in enumerate(block["thinking"].split(" ")):
                out.append(_sse("content_block_delta", {"index": index, "delta": {
                    "type": "thinking_delta", "thinking": word if i == 0 else " " + word}}))
            out.append(_sse("content_block_delta", {"index": index, "delta": {
                "type": "signature_delta", "signature": block["signature"]}}))
        elif block["type"] == "text":
            out.append(_sse("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}}))
            for i, word in enumerate(block["text"].split(" ")):
                out.append(_sse("content_block_delta", {"index": index, "delta": {
                    "type": "text_delta", "text": word if i == 0 else " " + word}}))
        else:
            out.append(_sse("content_block_start", {"index": index, "content_block": {**block, "input": {}}}))
            raw = orjson.dumps(block["input"]).decode()
            for piece in (raw[: len(raw) // 2], raw[len(raw) // 2:]):
                out.append(_sse("content_block_delta", {"index": index, "delta": {
                    "type": "input_json_delta", "partial_json": piece}}))
        out.append(_sse("content_block_stop", {"index": index}))
    out.append(_sse("message_delta", {"delta": {"stop_reason": final["stop_reason"], "stop_sequence": None},
                                      "usage": {"output_tokens": 7}}))
    out.append(_sse("message_stop", {}))
    return out


@dataclass
class ProtocolUpstream:
    url: str = ""
    requests: list[tuple[str, dict[str, str], dict[str, Any]]] = field(default_factory=list)

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [body for p, _, body in self.requests if p == path]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_route("*", "/v1/responses/{tail:.+}", self.responses_by_id)
        return app

    async def responses_by_id(self, request: web.Request) -> web.StreamResponse:
        """A forwarded route below ``/v1/responses/`` (retrieve, delete, input_items, cancel,
        input_tokens): recorded with its method, answered with a small object naming the path."""
        body = await request.json() if request.can_read_body else {}
        self.requests.append((f"{request.method} {request.raw_path}", dict(request.headers), body))
        return web.json_response({"object": "forwarded", "path": request.raw_path})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(("/v1/chat/completions", dict(request.headers), body))
        if (refusal := chat_pairing_refusal(body)) is not None:
            return web.json_response({"error": {"message": refusal, "type": "invalid_request_error",
                                                "param": "messages", "code": None}}, status=400)
        text = f"chat says: {_text_of(body['messages'][-1].get('content'))}"
        return web.json_response({"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                                  "model": body.get("model"), "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": text}}]})

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(("/v1/responses", dict(request.headers), body))
        if body.get("model") == "broken":
            return web.json_response({"error": {"message": "broken", "type": "server_error", "code": None}},
                                     status=500)
        if (refusal := responses_pairing_refusal(body)) is not None:
            return web.json_response({"error": {"message": refusal, "type": "invalid_request_error",
                                                "param": "input", "code": None}}, status=400)
        text, call = responses_plan(body)
        rid = f"{next(_ids):04d}"
        if not body.get("stream"):
            return web.json_response(response_object(body, text, call, rid))
        return await self._stream(request, responses_events(body, text, call, rid), cut=body.get("model") == "cut")

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(("/v1/messages", dict(request.headers), body))
        rid = f"{next(_ids):04d}"
        headers = {"request-id": f"req_{rid}", "anthropic-ratelimit-requests-remaining": "49"}
        if body.get("model") == "limited":  # a 429 the provider says not to retry
            return web.json_response({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}},
                                     status=429, headers={**headers, "retry-after": "7", "x-should-retry": "false"})
        if (refusal := messages_pairing_refusal(body) or thinking_refusal(body)) is not None:
            return web.json_response({"type": "error", "error": {"type": "invalid_request_error", "message": refusal},
                                      "request_id": f"req_{rid}"}, status=400, headers=headers)
        text, call = messages_plan(body)
        if not body.get("stream"):
            return web.json_response(message_object(body, text, call, rid), headers=headers)
        return await self._stream(request, messages_events(body, text, call, rid), cut=body.get("model") == "cut",
                                  headers=headers)

    async def _stream(self, request: web.Request, events: list[bytes], cut: bool = False,
                      headers: dict[str, str] | None = None) -> web.StreamResponse:
        """The events in writes of 97 bytes; with *cut*, the first four events, then the connection
        is closed (an upstream that breaks off mid-stream)."""
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                          **(headers or {})})
        await out.prepare(request)
        if cut:
            await out.write(b"".join(events[:4]))
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.close()
            return out
        blob = b"".join(events)
        for i in range(0, len(blob), 97):  # writes that do not follow event boundaries
            await out.write(blob[i:i + 97])
        await out.write_eof()
        return out


def start_upstream() -> tuple[ProtocolUpstream, _Server]:
    up = ProtocolUpstream()
    server = _Server(up.app())
    up.url = f"http://127.0.0.1:{server.port}"
    return up, server
