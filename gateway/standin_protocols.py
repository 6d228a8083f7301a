"""The stand-in model's OpenAI Responses and Anthropic Messages wire formats.

The stand-in builds every reply the same way, whatever the protocol: a request is read into a
*chat view* (a Chat Completions request body: ``model``, ``messages``, ``tools``, ``tool_choice``,
``response_format``, plus ``protocol``), the reply function turns the view into one assistant chat
message (``content`` and/or ``tool_calls``), and this module renders that message back in the
request's protocol, as a JSON body or as the protocol's Server-Sent Events. So a reply function
written for Chat Completions (``body["messages"][-1]["role"] == "user"``) serves all three.

Views (nothing here validates beyond what reading needs; unknown items and parts are skipped):

- Responses: ``instructions`` → a system message; ``input`` as a string → one user message; as
  items: ``message`` items (their text parts joined), ``function_call`` items → an assistant message
  with ``tool_calls`` (consecutive ones merged), ``function_call_output`` → ``tool`` messages;
  ``tools`` of type ``function`` and ``tool_choice`` → their chat forms; ``text.format`` of type
  ``json_object``/``json_schema`` → ``response_format``.
- Messages: top-level ``system`` → a system message; text blocks joined; ``tool_use`` blocks →
  ``tool_calls`` (``input`` as JSON arguments); ``tool_result`` blocks → ``tool`` messages before
  the user's text; ``tools`` (``input_schema``) and ``tool_choice`` (``auto``/``any``/``tool``/
  ``none``) → their chat forms.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson

STANDIN_MODELS = ("standin", "standin-json")


def reported_model(requested: Any) -> str:
    """The model a stand-in reply names: the requested one when it is one of
    :data:`STANDIN_MODELS`, else ``standin``. Never the client's string echoed back: the gateway
    takes a reply's model as the provider's word (``gateway.observe.model_label``)."""
    return requested if requested in STANDIN_MODELS else "standin"



def _text_of(content: Any) -> str:
    """A string content, or the ``text`` of every part that has one, joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


# --- chat views ------------------------------------------------------------------------------

def responses_view(body: dict[str, Any]) -> dict[str, Any]:
    """The chat view of a Responses API request body (see the module docstring)."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list):
        for item in items:
            if not isinstance(item, dict):
                continue
            kind = item.get("type", "message")
            if kind == "message":
                messages.append({"role": item.get("role", "user"), "content": _text_of(item.get("content"))})
            elif kind == "function_call":
                call = {"id": item.get("call_id"), "type": "function",
                        "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":
                    last.setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "function_call_output":
                output = item.get("output")
                messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                                 "content": output if isinstance(output, str) else _text_of(output)})
    tools = [{"type": "function", "function": {"name": t.get("name"), "description": t.get("description", ""),
                                               "parameters": t.get("parameters") or {}}}
             for t in body.get("tools") or () if isinstance(t, dict) and t.get("type") == "function"]
    view: dict[str, Any] = {"protocol": "responses", "model": body.get("model"), "messages": messages,
                            "stream": body.get("stream") is True}
    if tools:
        view["tools"] = tools
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        view["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif isinstance(choice, str):
        view["tool_choice"] = choice
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        view["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        view["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema") or {}}}
    return view


def messages_view(body: dict[str, Any]) -> dict[str, Any]:
    """The chat view of an Anthropic Messages request body (see the module docstring)."""
    messages: list[dict[str, Any]] = []
    system = _text_of(body.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        role, content = message.get("role"), message.get("content")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        blocks = [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []
        for block in blocks:
            if block.get("type") == "tool_result":
                messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                                 "content": _text_of(block.get("content"))})
        calls = [{"id": b.get("id"), "type": "function",
                  "function": {"name": b.get("name"), "arguments": _dumps(b.get("input", {}))}}
                 for b in blocks if b.get("type") == "tool_use"]
        text = "\n".join(b["text"] for b in blocks if b.get("type") == "text" and isinstance(b.get("text"), str))
        if calls:
            messages.append({"role": role, "content": text or None, "tool_calls": calls})
        elif text or not any(b.get("type") == "tool_result" for b in blocks):
            messages.append({"role": role, "content": text})
    tools = [{"type": "function", "function": {"name": t.get("name"), "description": t.get("description", ""),
                                               "parameters": t.get("input_schema") or {}}}
             for t in body.get("tools") or ()
             if isinstance(t, dict) and t.get("type", "custom") == "custom" and isinstance(t.get("name"), str)]
    view: dict[str, Any] = {"protocol": "messages", "model": body.get("model"), "messages": messages,
                            "stream": body.get("stream") is True}
    if tools:
        view["tools"] = tools
    choice = body.get("tool_choice")
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool":
        view["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}  # type: ignore[union-attr]
    elif kind in ("auto", "none"):
        view["tool_choice"] = kind
    elif kind == "any":
        view["tool_choice"] = "required"
    return view


def _usage_counts(view: dict[str, Any], message: dict[str, Any]) -> tuple[int, int]:
    """(input, output) token estimates: a quarter of the characters, at least 1 each."""
    chars = sum(len(_text_of(m.get("content"))) for m in view["messages"])
    out = len(message.get("content") or "") + sum(len(c["function"].get("arguments") or "")
                                                  for c in message.get("tool_calls") or ())
    return max(1, chars // 4), max(1, out // 4)


def _split(text: str, pieces: int) -> list[str]:
    if not text:
        return []
    n = min(pieces, len(text))
    return [text[i * len(text) // n:(i + 1) * len(text) // n] for i in range(n)]


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


# --- Responses -------------------------------------------------------------------------------

class ResponsesReply:
    """One Responses API reply: ``body()`` (the ``response`` object) or ``events(chunks)`` (its SSE)."""

    def __init__(self, request: dict[str, Any], view: dict[str, Any], message: dict[str, Any], n: int) -> None:
        self.request, self.view, self.message = request, view, message
        self.id = f"resp_standin{n:08d}"
        self.created = int(time.time())
        self.content = message.get("content") or ""
        self.items: list[dict[str, Any]] = []
        if self.content or not message.get("tool_calls"):
            self.items.append({"id": f"msg_standin{n:08d}", "type": "message", "status": "completed",
                               "role": "assistant", "content": [self._part(self.content)]})
        for i, call in enumerate(message.get("tool_calls") or ()):
            function = call.get("function") or {}
            self.items.append({"id": f"fc_standin{n:08d}_{i}", "type": "function_call", "status": "completed",
                               "call_id": call.get("id"), "name": function.get("name"),
                               "arguments": function.get("arguments") or ""})

    @staticmethod
    def _part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def body(self, status: str = "completed") -> dict[str, Any]:
        done = status == "completed"
        prompt, completion = _usage_counts(self.view, self.message)
        request = self.request
        fmt = (request.get("text") or {}).get("format") if isinstance(request.get("text"), dict) else None
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "background": False, "error": None, "incomplete_details": None,
            "instructions": request.get("instructions"), "max_output_tokens": request.get("max_output_tokens"),
            "model": reported_model(request.get("model")), "output": self.items if done else [],
            "parallel_tool_calls": request.get("parallel_tool_calls", True),
            "previous_response_id": request.get("previous_response_id"), "reasoning": {"effort": None, "summary": None},
            "store": request.get("store", True), "temperature": request.get("temperature", 1.0),
            "text": {"format": fmt if isinstance(fmt, dict) else {"type": "text"}},
            "tool_choice": request.get("tool_choice", "auto"), "tools": request.get("tools") or [],
            "top_p": request.get("top_p", 1.0), "truncation": request.get("truncation", "disabled"),
            "usage": {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": prompt + completion} if done else None,
            "user": request.get("user"), "metadata": request.get("metadata") or {},
        }

    def events(self, chunks: int) -> Iterator[bytes]:
        """``response.created`` … ``response.completed``, each with its ``sequence_number``."""
        seq = iter(range(1 << 30))

        def event(kind: str, **data: Any) -> bytes:
            return _event(kind, {"type": kind, "sequence_number": next(seq), **data})

        yield event("response.created", response=self.body("in_progress"))
        yield event("response.in_progress", response=self.body("in_progress"))
        for index, item in enumerate(self.items):
            ident = item["id"]
            if item["type"] == "message":
                yield event("response.output_item.added", output_index=index,
                            item={**item, "status": "in_progress", "content": []})
                yield event("response.content_part.added", item_id=ident, output_index=index, content_index=0,
                            part=self._part(""))
                for piece in _split(self.content, chunks):
                    yield event("response.output_text.delta", item_id=ident, output_index=index, content_index=0,
                                delta=piece, logprobs=[])
                yield event("response.output_text.done", item_id=ident, output_index=index, content_index=0,
                            text=self.content, logprobs=[])
                yield event("response.content_part.done", item_id=ident, output_index=index, content_index=0,
                            part=self._part(self.content))
            else:
                yield event("response.output_item.added", output_index=index,
                            item={**item, "status": "in_progress", "arguments": ""})
                for piece in _split(item["arguments"], chunks):
                    yield event("response.function_call_arguments.delta", item_id=ident, output_index=index,
                                delta=piece)
                yield event("response.function_call_arguments.done", item_id=ident, output_index=index,
                            name=item["name"], arguments=item["arguments"])
            yield event("response.output_item.done", output_index=index, item=item)
        yield event("response.completed", response=self.body())


# --- Messages --------------------------------------------------------------------------------

class MessagesReply:
    """One Anthropic Messages reply: ``body()`` (the ``message`` object) or ``events(chunks)`` (its SSE)."""

    def __init__(self, request: dict[str, Any], view: dict[str, Any], message: dict[str, Any], n: int) -> None:
        self.request, self.view, self.message = request, view, message
        self.id = f"msg_standin{n:08d}"
        content = message.get("content") or ""
        calls = message.get("tool_calls") or []
        self.blocks: list[dict[str, Any]] = []
        if content or not calls:
            self.blocks.append({"type": "text", "text": content})
        for call in calls:
            function = call.get("function") or {}
            try:
                arguments = orjson.loads(function.get("arguments") or "{}")
            except orjson.JSONDecodeError:
                arguments = {}
            self.blocks.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"),
                                "input": arguments if isinstance(arguments, dict) else {}})
        self.stop_reason = "tool_use" if calls else "end_turn"
        self.input_tokens, self.output_tokens = _usage_counts(view, message)

    def _head(self, content: list[dict[str, Any]], stop_reason: str | None, output_tokens: int) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant",
                "model": reported_model(self.request.get("model")),
                "content": content, "stop_reason": stop_reason, "stop_sequence": None,
                "usage": {"input_tokens": self.input_tokens, "output_tokens": output_tokens,
                          "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}

    def body(self) -> dict[str, Any]:
        return self._head(self.blocks, self.stop_reason, self.output_tokens)

    def events(self, chunks: int) -> Iterator[bytes]:
        """``message_start``, ``content_block_start``, ``ping``, deltas, … ``message_stop``."""
        yield _event("message_start", {"type": "message_start", "message": self._head([], None, 1)})
        for index, block in enumerate(self.blocks):
            if block["type"] == "text":
                yield _event("content_block_start", {"type": "content_block_start", "index": index,
                                                     "content_block": {"type": "text", "text": ""}})
                deltas = [{"type": "text_delta", "text": p} for p in _split(block["text"], chunks)]
            else:
                yield _event("content_block_start", {"type": "content_block_start", "index": index,
                                                     "content_block": {**block, "input": {}}})
                deltas = [{"type": "input_json_delta", "partial_json": p}
                          for p in _split(_dumps(block["input"]), chunks)]
            if index == 0:
                yield _event("ping", {"type": "ping"})
            for delta in deltas:
                yield _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
            yield _event("content_block_stop", {"type": "content_block_stop", "index": index})
        yield _event("message_delta", {"type": "message_delta",
                                       "delta": {"stop_reason": self.stop_reason, "stop_sequence": None},
                                       "usage": {"output_tokens": self.output_tokens}})
        yield _event("message_stop", {"type": "message_stop"})


def anthropic_error(status: int, message: str, type_: str) -> bytes:
    """Anthropic's error body: ``{"type": "error", "error": {"type": …, "message": …}}``."""
    return orjson.dumps({"type": "error", "error": {"type": type_, "message": message}})


ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                         429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}
