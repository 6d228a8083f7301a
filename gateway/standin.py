"""The built-in stand-in model: a deterministic, offline OpenAI-compatible server on loopback.

Used by ``sessiongate serve`` when no upstream is configured, by the test suite as the upstream,
and by the benchmark as an upstream that costs next to nothing.

Routes (everything else, under ``/v1`` or not, answers an OpenAI-shaped 404):

- ``POST /v1/chat/completions``: a ``chat.completion`` object, or with ``stream: true`` Server-Sent
  Events: one role chunk, the content in ``chunks`` pieces, tool-call deltas when the reply has
  tool calls, a chunk carrying ``finish_reason``, a usage chunk (``choices: []``) when
  ``stream_options.include_usage`` is true, then ``data: [DONE]``. Each event is written on
  its own.
- ``POST /v1/responses`` (OpenAI Responses API): a ``response`` object whose ``output`` holds a
  ``message`` item (one ``output_text`` part) and/or ``function_call`` items, or with ``stream:
  true`` the real event sequence: ``response.created``, ``response.in_progress``, then per item
  ``response.output_item.added``, ``response.content_part.added``, ``response.output_text.delta``
  (``chunks`` pieces), ``response.output_text.done``, ``response.content_part.done`` (or
  ``response.function_call_arguments.delta``/``.done`` for a call), ``response.output_item.done``,
  and ``response.completed``. ``input`` is a string or items. The stand-in keeps no responses: a
  ``previous_response_id`` is answered 400 ``previous_response_not_found``, as the API does for
  an id it does not hold.
- ``POST /v1/messages`` (Anthropic Messages; ``model``, ``max_tokens`` and ``messages`` required):
  a ``message`` with ``text`` and/or ``tool_use`` blocks and ``stop_reason`` ``end_turn`` or
  ``tool_use``, or with ``stream: true`` ``message_start``, ``content_block_start``, ``ping``,
  ``content_block_delta`` (``text_delta`` or ``input_json_delta``), ``content_block_stop``,
  ``message_delta``, ``message_stop``. Errors on this route (and ``/v1/messages/count_tokens``,
  which answers ``{"input_tokens": N}``) have Anthropic's shape ``{"type": "error", "error":
  {"type", "message"}}``.
- ``GET /v1/models``: ``standin`` and ``standin-json``.
- ``POST /v1/embeddings``: small deterministic unit vectors (8 floats, or ``dimensions`` up to
  64), as float lists or base64 as the request asks.

A route the stand-in does not implement answers 404 with code ``not_implemented`` and a message
naming it (``the sessiongate stand-in model does not implement POST /v1/files``). A field the
stand-in reads that has the wrong JSON type (``tools`` not an array of objects, ``tool_choice``,
``response_format``, its ``json_schema``, ``text`` or its ``format`` of the wrong shape, an
embeddings ``input`` that is neither a string nor an array) is answered 400 in the protocol's
error shape, naming the field and never echoing its value, as the real APIs answer it.

The reply is ``reply(body)`` when given (a string is the content, a dict the whole assistant
message, e.g. with ``tool_calls``); for Responses and Messages, ``body`` is the request's *chat
view* (``gateway.standin_protocols``: a Chat Completions body with ``protocol`` set to
``"responses"`` or ``"messages"``), and the message is rendered back in the request's protocol.
Without ``reply``, :func:`default_message` answers: a tool call when asked (tools are offered, the
last message is the user's, and ``tool_choice`` requires a tool, names one, or the user's text names
one; arguments are sample values of the tool's JSON schema), raw JSON when ``response_format``
(Responses: ``text.format``) asks for ``json_object`` or ``json_schema`` (a sample of the schema, or
``{"reply": <text>}``), and otherwise :func:`default_reply`, whose reply is the text
``"[sessiongate stand-in model] I received N messages; your last
message was: <first 200 characters>"``. When the model is ``standin-json`` or the last user
message carries Agently's ``[OUTPUT REQUIREMENT]`` with ``Data Format: JSON``, the default reply
is instead a fenced JSON object built from the requested structure (strings ``"stand-in"``,
ints ``50``, floats ``0.5``, booleans ``true``); a structure that does not parse, or is longer
than ``MAX_STRUCTURE_CHARS``, falls back to the text reply (or, for ``standin-json``, to
``{"reply": <text>}``). Reading a prompt takes time linear in its length (the stand-in runs on
the gateway's event loop).

Fault injection for tests, with the request header ``X-Standin-Fail``:
``500`` and ``429`` answer that status with an OpenAI error body; ``timeout`` waits 30 s (or
until the client hangs up) before answering; ``drop-mid-stream`` sends part of the reply (a few
SSE chunks, or half of a JSON body) and then closes the connection without finishing it.

``on_request(body)`` is called with every parsed chat, responses and messages request body (as
sent, not the view) before anything else happens, failures included; ``on_any(path, body)`` the
same for every parsed POST body (embeddings and count_tokens too) with the request path (e.g.
``/v1/responses``). Both run on the event loop, so they must be quick.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import itertools
import math
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from aiohttp import web

from gateway.standin_protocols import (
    ANTHROPIC_ERROR_TYPES,
    STANDIN_MODELS,
    MessagesReply,
    ResponsesReply,
    anthropic_error,
    messages_view,
    reported_model,
    responses_view,
)

Reply = Callable[[dict[str, Any]], "str | dict[str, Any]"]
OnRequest = Callable[[dict[str, Any]], None]
OnAny = Callable[[str, dict[str, Any]], None]

MODELS = STANDIN_MODELS
TIMEOUT_SECONDS = 30.0
DROP_AFTER_CHUNKS = 3
_DEFAULT_DIMENSIONS = 8
_MAX_DIMENSIONS = 64
_SSE_DONE = b"data: [DONE]\n\n"
_JSON = "application/json"
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


# --- the default reply -----------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"<([^<>\n]*)>")
_SPACES = re.compile(r"\s*+")
MAX_STRUCTURE_CHARS = 65536
"""A ``Data Structure:`` block longer than this is not sampled (the text reply instead): the stand-in
runs on the gateway's event loop, and Agently's structures are a few hundred characters."""
_TRAILING_COMMA = re.compile(r",(\s*[\]}])")
_PLACEHOLDER_VALUES = {"int": "50", "float": "0.5", "number": "0.5", "bool": "true", "boolean": "true"}


def message_text(message: dict[str, Any]) -> str:
    """The text of a message's ``content``: the string itself, or its text parts joined by newlines."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return message_text(message)
    return ""


def _structure_text(prompt: str) -> str | None:
    """The ``Data Structure:`` block of an Agently JSON output requirement, or None."""
    marker = "Data Structure:\n"
    start = prompt.find(marker)
    if start < 0:
        return None
    lines = prompt[start + len(marker):].split("\n")
    if lines[0] in ("{}", "[]") or not lines[0].startswith(("{", "[")):
        return lines[0]
    block: list[str] = []
    for line in lines:
        block.append(line)
        if line in ("}", "]"):  # Agently closes the top level at column 0
            return "\n".join(block)
    return None


def _placeholder_value(match: re.Match[str]) -> str:
    return _PLACEHOLDER_VALUES.get(match.group(1).strip().lower(), '"stand-in"')


def strip_comments(block: str) -> str:
    """*block* without its ``//`` comments: what ``re.sub(r"\\s+//.*$", "", block, flags=re.M)``
    gives (the white space before a ``//`` and the rest of its line), in linear time. That
    expression, tried at each character of a long run of spaces with no ``//`` after it, read
    the run again from each (quadratic: a 40,000-space line stalled the event loop for 4.5 s)."""
    out, end, low = [], 0, 0  # end: of the last removal; low: no white space run reaches back past it
    q = block.find("//")
    while q >= 0:
        before = block[max(end, low):q]
        start = q - (len(before) - len(before.rstrip()))
        if start < q:
            line_end = block.find("\n", q)
            line_end = len(block) if line_end < 0 else line_end
            out.append(block[end:start])
            end = line_end
            q = block.find("//", line_end)
        else:
            low = q + 2
            q = block.find("//", q + 1)
    out.append(block[end:])
    return "".join(out)


def strip_ellipsis_lines(block: str) -> str:
    """*block* without its ``...`` lines: what ``re.sub(r"^\\s*\\.\\.\\.\\s*$\\n?", "", block,
    flags=re.M)`` gives (a ``...`` alone on its line, with the blank lines around it), in linear
    time; that expression read a long run of blank lines again from each of its line starts."""
    out, end, low = [], 0, 0
    q = block.find("...")
    while q >= 0:
        start = q
        lo = max(end, low)
        if lo <= q:
            before = block[lo:q]
            start = q - (len(before) - len(before.rstrip()))  # the white space run before "..."
        if start > 0 and block[start - 1] != "\n":  # the first line start in that run, if any
            newline = block.find("\n", start, q)
            start = newline + 1 if newline >= 0 else -1
        after = _SPACES.match(block, q + 3).end()  # type: ignore[union-attr]
        stop = len(block) if after == len(block) else block.rfind("\n", q + 3, after) + 1
        if start >= 0 and stop > 0:
            out.append(block[end:start])
            end = stop
            q = block.find("...", stop)
        else:
            low = q + 3
            q = block.find("...", q + 1)
    out.append(block[end:])
    return "".join(out)


def sample_json(prompt: str) -> Any | None:
    """A value shaped like the JSON structure an Agently prompt asks for, or None when unparsable."""
    block = _structure_text(prompt)
    if block is None or len(block) > MAX_STRUCTURE_CHARS:
        return None
    block = strip_comments(block)
    block = strip_ellipsis_lines(block)
    block = _PLACEHOLDER.sub(_placeholder_value, block)
    block = _TRAILING_COMMA.sub(r"\1", block)
    try:
        return orjson.loads(block)
    except orjson.JSONDecodeError:
        return None


def _wants_json(model: Any, prompt: str) -> bool:
    return model == "standin-json" or ("[OUTPUT REQUIREMENT]" in prompt and "Data Format: JSON" in prompt)


def default_reply(body: dict[str, Any]) -> str:
    """The stand-in's own reply to a chat request (see the module docstring)."""
    messages = body["messages"]
    last = _last_user_text(messages)
    text = (
        f"[sessiongate stand-in model] I received {len(messages)} messages; "
        f"your last message was: {last[:200]}"
    )
    if not _wants_json(body.get("model"), last):
        return text
    value = sample_json(last)
    if value is None:
        if body.get("model") != "standin-json":
            return text
        value = {"reply": text}
    return "```json\n" + orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n```"


def sample_schema(schema: Any, depth: int = 0) -> Any:
    """A value that fits the JSON schema *schema*: its first ``enum`` or ``const``, every property of
    an object, one item of an array, ``"stand-in"``, ``50``, ``0.5`` or ``true`` (depth-bounded)."""
    if not isinstance(schema, dict) or depth > 8:
        return "stand-in"
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return sample_schema(schema[key][0], depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and isinstance(schema.get("properties"), dict)):
        properties = schema.get("properties")
        return {k: sample_schema(v, depth + 1) for k, v in properties.items()} if isinstance(properties, dict) else {}
    if kind == "array":
        return [sample_schema(schema.get("items"), depth + 1)]
    return {"integer": 50, "number": 0.5, "boolean": True, "null": None}.get(str(kind), "stand-in")


def _requested_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    """The function tool a request asks to be called, or None (see the module docstring)."""
    raw = body.get("tools")
    tools = [t["function"] for t in (raw if isinstance(raw, list) else ())
             if isinstance(t, dict) and isinstance(t.get("function"), dict)
             and isinstance(t["function"].get("name"), str)]
    messages = body.get("messages") or []
    choice = body.get("tool_choice")
    if not tools or choice == "none" or not messages or not isinstance(messages[-1], dict) \
            or messages[-1].get("role") != "user":
        return None
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        return next((t for t in tools if t["name"] == name), None)
    if choice == "required":
        return tools[0]
    text = message_text(messages[-1])
    return next((t for t in tools if t["name"] in text), None)


def default_message(body: dict[str, Any]) -> dict[str, Any]:
    """The stand-in's own assistant message for a chat request or view: a tool call or JSON when
    asked, else :func:`default_reply` (see the module docstring)."""
    tool = _requested_tool(body)
    if tool is not None:
        arguments = orjson.dumps(sample_schema(tool.get("parameters") or {"type": "object"})).decode()
        digest = hashlib.sha256(f"{tool['name']}\0{len(body['messages'])}".encode()).hexdigest()[:24]
        prefix = "toolu_" if body.get("protocol") == "messages" else "call_"
        call = {"id": prefix + digest, "type": "function", "function": {"name": tool["name"], "arguments": arguments}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("json_object", "json_schema"):
        spec = fmt.get("json_schema") if isinstance(fmt, dict) else None
        schema = spec.get("schema") if kind == "json_schema" and isinstance(spec, dict) else None
        value = sample_schema(schema) if isinstance(schema, dict) else None
        if value is None or kind == "json_object":
            messages = body.get("messages") or []
            value = {"reply": f"[sessiongate stand-in model] I received {len(messages)} messages; "
                              f"your last message was: {_last_user_text(messages)[:200]}"}
        return {"role": "assistant", "content": orjson.dumps(value).decode()}
    return {"role": "assistant", "content": default_reply(body)}


# --- response shapes -------------------------------------------------------------------------

def _error(status: int, message: str, type_: str, code: str | None = None,
           param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type=_JSON)


async def _not_found(request: web.Request) -> web.Response:
    route = f"{request.method} {request.path}"[:200]
    return _error(404, f"the sessiongate stand-in model does not implement {route}", "invalid_request_error",
                  "not_implemented")


def _anthropic(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=anthropic_error(status, message, ANTHROPIC_ERROR_TYPES[status]),
                        content_type=_JSON)


def _usage(body: dict[str, Any], content: str) -> dict[str, int]:
    prompt_chars = sum(len(message_text(m)) for m in body["messages"] if isinstance(m, dict))
    prompt, completion = max(1, prompt_chars // 4), max(1, len(content) // 4)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _split(text: str, pieces: int) -> list[str]:
    """``text`` cut into ``pieces`` nearly equal parts (fewer when it is shorter)."""
    if not text:
        return []
    n = min(pieces, len(text))
    size = len(text)
    return [text[i * size // n:(i + 1) * size // n] for i in range(n)]


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


class _Round:
    """One chat request's reply: the assistant message and the fields every event repeats."""

    def __init__(self, body: dict[str, Any], message: dict[str, Any], ident: str) -> None:
        self.body = body
        self.message = message
        self.content = message.get("content") or ""
        self.tool_calls = message.get("tool_calls") or []
        self.finish_reason = "tool_calls" if self.tool_calls else "stop"
        model = reported_model(body.get("model"))
        self.head = {"id": ident, "object": "", "created": int(time.time()), "model": model}

    def completion(self) -> dict[str, Any]:
        choice = {"index": 0, "message": self.message, "logprobs": None, "finish_reason": self.finish_reason}
        return {**self.head, "object": "chat.completion", "choices": [choice],
                "usage": _usage(self.body, self.content)}

    def events(self, chunks: int) -> Iterator[bytes]:
        """Every SSE event of the streamed reply, ``[DONE]`` included."""
        options = self.body.get("stream_options")
        with_usage = isinstance(options, dict) and options.get("include_usage") is True
        head = {**self.head, "object": "chat.completion.chunk"}
        if with_usage:
            head["usage"] = None

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return _sse({**head, "choices": [choice]})

        yield chunk({"role": "assistant", "content": ""})
        for piece in _split(self.content, chunks):
            yield chunk({"content": piece})
        if isinstance(self.message.get("refusal"), str):
            yield chunk({"refusal": self.message["refusal"]})
        if self.tool_calls:
            yield chunk({"tool_calls": [{"index": i, **call} for i, call in enumerate(self.tool_calls)]})
        yield chunk({}, self.finish_reason)
        if with_usage:
            yield _sse({**head, "choices": [], "usage": _usage(self.body, self.content)})
        yield _SSE_DONE


# --- the application -------------------------------------------------------------------------

class _Standin:
    """The request handlers, configured once by :func:`make_app`."""

    def __init__(self, chunks: int, reply: Reply | None, on_request: OnRequest | None,
                 latency: float, on_any: OnAny | None = None) -> None:
        if chunks < 1:
            raise ValueError("chunks must be at least 1")
        self.chunks = chunks
        self.reply: Reply = reply or default_message
        self.on_request = on_request
        self.on_any = on_any
        self.latency = latency
        self.ids = itertools.count(1)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(400, "'messages' is a required property", "invalid_request_error", param="messages")
        self._seen(request, body)
        problem = _chat_problem(body)
        if problem is not None:
            return _error(400, problem[0], "invalid_request_error", param=problem[1])
        fail = request.headers.get("X-Standin-Fail")
        if fail is not None and fail not in ("timeout", "drop-mid-stream"):
            return _failure(fail)
        if fail == "timeout":
            await _wait_for_hang_up(request, TIMEOUT_SECONDS)
        if self.latency:
            await asyncio.sleep(self.latency)
        answer = self.reply(body)
        message = {"role": "assistant", "content": answer} if isinstance(answer, str) else answer
        round_ = _Round(body, message, f"chatcmpl-standin-{next(self.ids)}")
        drop = fail == "drop-mid-stream"
        if body.get("stream") is True:
            return await self._stream(request, round_, drop)
        if drop:
            return await _drop_json(request, orjson.dumps(round_.completion()))
        return web.Response(body=orjson.dumps(round_.completion()), content_type=_JSON)

    def _seen(self, request: web.Request, body: dict[str, Any], model_call: bool = True) -> None:
        if model_call and self.on_request is not None:
            self.on_request(body)
        if self.on_any is not None:
            self.on_any(request.path, body)

    async def _message(self, view: dict[str, Any]) -> dict[str, Any]:
        if self.latency:
            await asyncio.sleep(self.latency)
        answer = self.reply(view)
        return {"role": "assistant", "content": answer} if isinstance(answer, str) else answer

    async def responses(self, request: web.Request) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
        if not isinstance(body, dict):
            return _error(400, "'input' is required: a string or a list of items", "invalid_request_error",
                          param="input")
        self._seen(request, body)  # a body without input reached the model route too (a prompt template)
        if not isinstance(body.get("input"), (str, list)):
            return _error(400, "'input' is required: a string or a list of items (the stand-in model has no "
                               "prompt templates)", "invalid_request_error", param="input")
        problem = _responses_problem(body)
        if problem is not None:
            return _error(400, problem[0], "invalid_request_error", param=problem[1])
        previous = body.get("previous_response_id")
        if previous is not None:
            return _error(400, f"Previous response with id {str(previous)[:64]!r} not found (the sessiongate "
                               "stand-in model keeps no responses).", "invalid_request_error",
                          "previous_response_not_found", param="previous_response_id")
        return await self._reply(request, body, responses_view(body), ResponsesReply, _failure)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _anthropic(400, "The request body is not valid JSON.")
        problem = _messages_problem(body)
        if problem is not None:
            return _anthropic(400, problem)
        self._seen(request, body)
        return await self._reply(request, body, messages_view(body), MessagesReply, _anthropic_failure)

    async def _reply(self, request: web.Request, body: dict[str, Any], view: Any, reply_type: Any,
                     failure: Callable[[str], web.Response]) -> web.StreamResponse:
        """A Responses or Messages reply (JSON or SSE), honouring ``X-Standin-Fail``."""
        fail = request.headers.get("X-Standin-Fail")
        if fail is not None and fail not in ("timeout", "drop-mid-stream"):
            return failure(fail)
        if fail == "timeout":
            await _wait_for_hang_up(request, TIMEOUT_SECONDS)
        reply = reply_type(body, view, await self._message(view), next(self.ids))
        drop = fail == "drop-mid-stream"
        if body.get("stream") is True:
            return await self._stream_events(request, reply.events(self.chunks), drop)
        if drop:
            return await _drop_json(request, orjson.dumps(reply.body()))
        return web.Response(body=orjson.dumps(reply.body()), content_type=_JSON)

    async def count_tokens(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _anthropic(400, "The request body is not valid JSON.")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _anthropic(400, "messages: Field required")
        self._seen(request, body, model_call=False)
        problem = _anthropic_fields_problem(body)
        if problem is not None:
            return _anthropic(400, problem)
        view = messages_view(body)
        chars = sum(len(message_text(m)) for m in view["messages"])
        return web.Response(body=orjson.dumps({"input_tokens": max(1, chars // 4)}), content_type=_JSON)

    async def _stream(self, request: web.Request, round_: _Round, drop: bool) -> web.StreamResponse:
        return await self._stream_events(request, round_.events(self.chunks), drop)

    async def _stream_events(self, request: web.Request, events: Iterator[bytes], drop: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        for n, event in enumerate(events):
            if drop and n > DROP_AFTER_CHUNKS:
                return _hang_up(request, response)
            await response.write(event)
        await response.write_eof()
        return response

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "sessiongate"} for m in MODELS]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type=_JSON)

    async def embeddings(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
        if isinstance(body, dict):
            self._seen(request, body, model_call=False)
        inputs = body.get("input") if isinstance(body, dict) else None
        if inputs is None or inputs == [] or inputs == "":
            return _error(400, "'input' is a required property", "invalid_request_error", param="input")
        if not isinstance(inputs, (str, list)):
            return _error(400, f"Invalid type for 'input': expected a string or an array, got {_json_type(inputs)}.",
                          "invalid_request_error", param="input")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        dims = body.get("dimensions")
        dims = dims if isinstance(dims, int) and 1 <= dims <= _MAX_DIMENSIONS else _DEFAULT_DIMENSIONS
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, item in enumerate(inputs):
            vector = embed(str(item), dims)
            encoded: Any = (base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
                            if as_base64 else vector)
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = sum(max(1, len(str(item)) // 4) for item in inputs)
        result = {"object": "list", "data": data, "model": reported_model(body.get("model")),
                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return web.Response(body=orjson.dumps(result), content_type=_JSON)


def embed(text: str, dims: int = _DEFAULT_DIMENSIONS) -> list[float]:
    """A deterministic unit vector of ``dims`` floats derived from the SHA-256 of ``text``."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [(digest[i % len(digest)] - 127.5) / 127.5 for i in range(dims)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def _messages_problem(body: Any) -> str | None:
    """Why an Anthropic Messages body is refused (the fields the API requires), or None."""
    if not isinstance(body, dict):
        return "The request body must be a JSON object."
    if not isinstance(body.get("model"), str):
        return "model: Field required"
    if not isinstance(body.get("max_tokens"), int) or isinstance(body.get("max_tokens"), bool):
        return "max_tokens: Field required"
    if not isinstance(body.get("messages"), list):
        return "messages: Field required"
    return _anthropic_fields_problem(body)


def _json_type(value: Any) -> str:
    """The JSON name of *value*'s type, for an error message (never the value itself)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _typed(body: dict[str, Any], field: str, types: tuple[type, ...], expected: str) -> tuple[str, str] | None:
    """``(message, param)`` when *field* is present, not null and not of *types*."""
    value = body.get(field)
    if value is None or isinstance(value, types):
        return None
    return f"Invalid type for '{field}': expected {expected}, but got {_json_type(value)} instead.", field


def _items_problem(body: dict[str, Any], field: str) -> tuple[str, str] | None:
    """``(message, param)`` when *field* is present and not a list of objects."""
    problem = _typed(body, field, (list,), "an array of objects")
    if problem is not None:
        return problem
    for index, item in enumerate(body.get(field) or ()):
        if not isinstance(item, dict):
            return (f"Invalid type for '{field}[{index}]': expected an object, but got {_json_type(item)} instead.",
                    f"{field}[{index}]")
    return None


def _chat_problem(body: dict[str, Any]) -> tuple[str, str] | None:
    """Why a Chat Completions body is refused with 400 (a field of the wrong JSON type), as
    ``(message, param)``, or None. The real API refuses these; the stand-in must not fail on them."""
    for field in ("messages", "tools"):
        if problem := _items_problem(body, field):
            return problem
    for index, tool in enumerate(body.get("tools") or ()):
        if tool.get("function") is not None and not isinstance(tool["function"], dict):
            return f"Invalid type for 'tools[{index}].function': expected an object.", f"tools[{index}].function"
    if problem := (_typed(body, "tool_choice", (str, dict), "a string or an object")
                   or _typed(body, "response_format", (dict,), "an object")
                   or _typed(body, "stream_options", (dict,), "an object")):
        return problem
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and (problem := _typed(choice, "function", (dict,), "an object")):
        return problem[0].replace("'function'", "'tool_choice.function'"), "tool_choice.function"
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and (problem := _typed(fmt, "json_schema", (dict,), "an object")):
        return problem[0].replace("'json_schema'", "'response_format.json_schema'"), "response_format.json_schema"
    return None


def _responses_problem(body: dict[str, Any]) -> tuple[str, str] | None:
    """Why a Responses body is refused with 400 (a field of the wrong JSON type), or None."""
    if problem := (_items_problem(body, "tools") or _typed(body, "tool_choice", (str, dict), "a string or an object")
                   or _typed(body, "text", (dict,), "an object")):
        return problem
    text = body.get("text")
    if isinstance(text, dict) and (problem := _typed(text, "format", (dict,), "an object")):
        return problem[0].replace("'format'", "'text.format'"), "text.format"
    return None


def _anthropic_fields_problem(body: dict[str, Any]) -> str | None:
    """Why a Messages (or count_tokens) body's optional fields are refused with 400, or None."""
    problem = _items_problem(body, "tools") or _typed(body, "tool_choice", (dict,), "an object") \
        or _typed(body, "system", (str, list), "a string or an array")
    return f"{problem[1]}: {problem[0]}" if problem else None


def _anthropic_failure(mode: str) -> web.Response:
    if mode == "500":
        return _anthropic(500, "The stand-in model failed on purpose (X-Standin-Fail: 500).")
    if mode == "429":
        return _anthropic(429, "Rate limit reached for the stand-in model (X-Standin-Fail: 429).")
    return _anthropic(400, f"Unknown X-Standin-Fail mode {mode[:40]!r}; use 500, 429, timeout or drop-mid-stream.")


def _failure(mode: str) -> web.Response:
    if mode == "500":
        return _error(500, "The stand-in model failed on purpose (X-Standin-Fail: 500).", "server_error")
    if mode == "429":
        return _error(429, "Rate limit reached for the stand-in model (X-Standin-Fail: 429).", "requests",
                      "rate_limit_exceeded")
    message = f"Unknown X-Standin-Fail mode {mode[:40]!r}; use 500, 429, timeout or drop-mid-stream."
    return _error(400, message, "invalid_request_error", param="X-Standin-Fail")


async def _wait_for_hang_up(request: web.Request, seconds: float) -> None:
    """Sleep up to ``seconds``, returning early when the client closes the connection."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(0.05)


def _hang_up(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Close the connection after what was written so far; the reply stays unfinished."""
    if request.transport is not None:
        request.transport.close()
    response.force_close()
    return response


async def _drop_json(request: web.Request, payload: bytes) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": _JSON})
    response.content_length = len(payload)
    await response.prepare(request)
    await response.write(payload[: len(payload) // 2])
    return _hang_up(request, response)


def make_app(*, chunks: int = 20, reply: Reply | None = None, on_request: OnRequest | None = None,
             latency: float = 0.0, on_any: OnAny | None = None) -> web.Application:
    """The stand-in as an aiohttp application.

    Args:
        chunks: how many content pieces a streamed reply is cut into (at least 1).
        reply: builds the reply from the request body (for Responses and Messages, its chat
            view): a string (the content) or a dict (the whole assistant message, e.g. with
            ``tool_calls``). Default: :func:`default_message`.
        on_request: called with every parsed chat, responses and messages request body; must be quick.
        latency: seconds to wait before each model reply starts.
        on_any: called with ``(path, body)`` for every parsed POST body; must be quick.

    Raises:
        ValueError: ``chunks`` is below 1.
    """
    standin = _Standin(chunks, reply, on_request, latency, on_any)
    app = web.Application(client_max_size=64 * 1024 * 1024)  # any body a gateway forwards (a real API takes MBs)
    app.router.add_post("/v1/chat/completions", standin.chat)
    app.router.add_post("/v1/responses", standin.responses)
    app.router.add_post("/v1/messages", standin.messages)
    app.router.add_post("/v1/messages/count_tokens", standin.count_tokens)
    app.router.add_get("/v1/models", standin.models)
    app.router.add_post("/v1/embeddings", standin.embeddings)
    app.router.add_route("*", "/{tail:.*}", _not_found)
    return app


BACKLOG = 1024
"""The listen backlog, as the gateway's own listener: a burst of new connections (the gateway
opening its upstream connections for a burst of clients) is queued, not dropped. aiohttp's
default of 128 dropped the rest, and each dropped connection waited a second for its retry."""


async def run_standin(host: str = "127.0.0.1", port: int = 0, **kw: Any) -> tuple[web.AppRunner, int]:
    """Start the stand-in on ``host:port`` (0 picks a free port) in the running loop.

    ``kw`` goes to :func:`make_app`. Returns the runner (``await runner.cleanup()`` stops it)
    and the bound port.
    """
    runner = web.AppRunner(make_app(**kw), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=BACKLOG).start()
    return runner, runner.addresses[0][1]


@contextlib.contextmanager
def standin_thread(**kw: Any) -> Iterator[str]:
    """Run the stand-in on its own event loop in a background thread (for sync tests).

    ``kw`` goes to :func:`run_standin`. Yields the base URL, ``http://127.0.0.1:<port>/v1``;
    the server is stopped and the thread joined on exit.
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="standin", daemon=True)
    thread.start()
    try:
        runner, port = asyncio.run_coroutine_threadsafe(run_standin(**kw), loop).result(10)
        try:
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def main(argv: list[str] | None = None) -> None:
    """``python -m gateway.standin [--host H] [--port P] [--chunks N] [--latency S]``."""
    parser = argparse.ArgumentParser(prog="python -m gateway.standin", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--chunks", type=int, default=20, help="content pieces per streamed reply")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each chat reply")
    args = parser.parse_args(argv)
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    app = make_app(chunks=args.chunks, latency=args.latency)
    print(f"sessiongate stand-in model on http://{args.host}:{args.port}/v1", flush=True)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, loop=loop, backlog=BACKLOG,
                shutdown_timeout=1.0)


if __name__ == "__main__":
    main()
