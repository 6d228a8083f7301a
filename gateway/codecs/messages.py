"""The Messages codec (``POST /v1/messages``, Anthropic's Messages API).

Reading: the top-level ``system`` (a string or text blocks) is a system message; ``messages``
become neutral messages: ``text`` blocks → text parts, ``image`` blocks → ``image_url`` parts (a
``data:`` URL for base64 sources), ``document`` blocks with a ``text`` or ``content`` source,
or a ``base64`` source of a text media type holding UTF-8 → the text parts the model read (title
and context included), other ``document`` blocks (binary base64, URL, file sources) → ``file``
parts (and back), an assistant's
``tool_use`` blocks → ``tool_calls`` (arguments as JSON text), a user's ``tool_result`` blocks →
``role: tool`` messages (before the user's own text; ``is_error: true`` kept as is).

Injecting: the window (normalised: it starts with a user message and ends with an assistant one,
as Anthropic requires alternating roles) goes before the request's messages; tool calls become
``tool_use`` blocks (after the ``thinking`` blocks recorded with them, which Anthropic wants back
to continue a tool call made with thinking on) and tool messages ``tool_result`` blocks in a user
message. The memo goes
into the last user message, or at the end of ``system`` (``memo_placement: system``).

Stream: ``message_stop`` is the final event, held back until the round is committed; a round is
completed when it arrived. Errors: ``{"type": "error", "error": {"type", "message"}}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from gateway import jsonbody
from gateway.codecs import references, window_plan
from gateway.errors import BadRequest, UpstreamError
from gateway.session.model import SessionState, memo_section, with_memo
from gateway.session.structured import document_parts, is_text_media, media_object, placeholder, strict_b64
from gateway.sse import EventAssembler, assistant_message

if TYPE_CHECKING:
    from gateway.context import Context
    from gateway.policy import Policy

Message = dict[str, Any]
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 409: "invalid_request_error",
               413: "request_too_large", 415: "invalid_request_error", 429: "rate_limit_error",
               500: "api_error", 502: "api_error", 503: "overloaded_error", 504: "timeout_error",
               529: "overloaded_error"}


# --- reading -------------------------------------------------------------------------------

def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return "" if content is None else jsonbody.dumps(content).decode()


def _part(block: dict[str, Any]) -> Any:
    kind = block.get("type")
    if kind == "text":
        return {"type": "text", "text": block.get("text")}
    if kind == "image":
        source = media_object(block.get("source"), "url")
        if source.get("type") == "base64":
            url = f"data:{source.get('media_type')};base64,{source.get('data')}"
        elif source.get("type") == "file" and source.get("file_id") is not None:
            url = f"file:{source.get('file_id')}"
        else:
            url = str(source.get("url"))
        return {"type": "image_url", "image_url": {"url": url}}
    if kind == "document":  # its source, title, context and citations, for the way back (_block)
        return {"type": "file", "file": {k: v for k, v in block.items() if k != "type"}}
    return block


def _parts(block: dict[str, Any]) -> list[Any]:
    """One block as neutral parts: a ``document`` whose source is text (``text``, or ``content``
    blocks) as the text the model read (``session.structured.document_parts``: a header with its
    title and context, then its text; an image among its content blocks stays an image part);
    any other block as one part (``_part``)."""
    source = block.get("source") if block.get("type") == "document" else None
    if isinstance(source, dict) and (text := _base64_text(source)) is not None:
        return document_parts("document", block.get("title"), block.get("context"), [{"type": "text", "text": text}])
    if not isinstance(source, dict) or source.get("type") not in ("text", "content"):
        return [_part(block)]
    if source["type"] == "text":
        body: list[Any] = [{"type": "text", "text": _doc_text(source.get("data"))}]
    elif isinstance(source.get("content"), list):
        body = [_part(b) if isinstance(b, dict) else {"type": "text", "text": _doc_text(b)}
                for b in source["content"]]
    else:
        body = [{"type": "text", "text": _doc_text(source.get("content"))}]
    return document_parts("document", block.get("title"), block.get("context"), body)


def _base64_text(source: dict[str, Any]) -> str | None:
    """The text of a ``base64`` document source whose media type is text (``text/plain``, JSON
    ...: ``session.structured.is_text_media``): its data base64-decoded (strictly) as UTF-8;
    None for any other source, or data that is not base64 of UTF-8 text (left a placeholder)."""
    data = source.get("data")
    if source.get("type") != "base64" or not isinstance(data, str) or not is_text_media(
            source.get("media_type") if isinstance(source.get("media_type"), str) else None):
        return None
    try:
        return strict_b64(data).decode("utf-8")
    except (BadRequest, UnicodeDecodeError):
        return None


def _doc_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return "" if value is None else jsonbody.dumps(value, default=str).decode()


def _result_of(content: Any) -> Any:
    """A ``tool_result``'s content, neutral: its text when it is text only (blocks joined by
    "\n"), else its blocks as parts (an image, a document, a search result is kept for the
    record's media policy and the whitelist, never dropped)."""
    if isinstance(content, list) and not all(isinstance(b, dict) and b.get("type") == "text" for b in content):
        return [p for b in content for p in (_parts(b) if isinstance(b, dict) else [b])]
    return _text_of(content)


def _simplify(parts: list[Any]) -> Any:
    if len(parts) == 1 and isinstance(parts[0], dict) and parts[0].get("type") == "text":
        return parts[0]["text"]
    return parts


def to_messages(body: dict[str, Any]) -> list[Message]:
    """The request as neutral messages (system first)."""
    out: list[Message] = []
    system = body.get("system")
    if system:
        out.append({"role": "system", "content": _text_of(system)})
    for m in body.get("messages") or ():
        role, content = m.get("role"), m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        parts: list[Any] = []
        calls: list[dict[str, Any]] = []
        for block in content or ():
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_use":
                calls.append({"id": block.get("id"), "type": "function",
                              "function": {"name": block.get("name"),
                                           "arguments": jsonbody.dumps(block.get("input", {})).decode()}})
            elif block.get("type") == "tool_result":
                result: Message = {"role": "tool", "tool_call_id": block.get("tool_use_id"),
                                   "content": _result_of(block.get("content"))}
                if block.get("is_error") is True:  # the tool failed: kept, and sent back with the result
                    result["is_error"] = True
                out.append(result)
            else:
                parts.extend(_parts(block))
        if calls:
            out.append({"role": role, "content": _simplify(parts) if parts else None, "tool_calls": calls})
        elif parts:
            out.append({"role": role, "content": _simplify(parts)})
    return out


# --- writing -------------------------------------------------------------------------------

def _block(part: Any) -> Any:
    if not isinstance(part, dict):
        return part
    if part.get("type") == "text":
        return {"type": "text", "text": part.get("text")}
    if part.get("type") == "image_url":
        url = str(media_object(part.get("image_url"), "url").get("url") or "")
        if url.startswith("data:") and ";base64," in url:
            media, data = url[5:].split(";base64,", 1)
            return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
        if url.startswith("file:"):  # an image by file id (``_part``)
            return {"type": "image", "source": {"type": "file", "file_id": url[5:]}}
        return {"type": "image", "source": {"type": "url", "url": url}}
    if part.get("type") == "file":
        return _document(part)
    return part


def _document(part: dict[str, Any]) -> dict[str, Any]:
    """A neutral ``file`` part as a ``document`` block: an Anthropic document as it came, a Chat
    file's ``data:`` URL as a base64 source; a file only another provider can resolve (a
    ``file_id``) as its placeholder text (``session.structured.placeholder``)."""
    file = media_object(part.get("file"), "file_data")
    if "source" in file:
        return {"type": "document", **file}
    data = str(file.get("file_data") or "")
    if data.startswith("data:") and ";base64," in data:
        media, payload = data[5:].split(";base64,", 1)
        block: dict[str, Any] = {"type": "document",
                                 "source": {"type": "base64", "media_type": media, "data": payload}}
        if file.get("filename"):
            block["title"] = file["filename"]
        return block
    return {"type": "text", "text": placeholder(part)}


def to_anthropic(messages: list[Message], *, thinking: bool = True) -> list[Message]:
    """Neutral messages as Anthropic messages (tool answers as ``tool_result`` blocks; consecutive
    messages of one role merged, as the API wants alternating roles). Without *thinking* (a
    request that turns thinking off, which Anthropic then refuses any thinking block in), the
    thinking recorded with tool calls is left out."""
    out: list[Message] = []
    for m in messages:
        role = str(m.get("role"))
        blocks: list[Any] = []
        if role == "tool":
            role = "user"
            result = m.get("content")
            blocks.append({"type": "tool_result", "tool_use_id": m.get("tool_call_id"),
                           "content": [_block(p) for p in result] if isinstance(result, list) else _text_of(result)})
            if m.get("is_error") is True:
                blocks[-1]["is_error"] = True
        else:
            if thinking and role == "assistant" and m.get("tool_calls"):  # its recorded thinking goes first
                blocks.extend(reasoning_blocks(m.get("reasoning")))
            content = m.get("content")
            if isinstance(content, str) and content:
                blocks.append({"type": "text", "text": content})
            elif isinstance(content, list):
                blocks.extend(_block(p) for p in content)
            for call in m.get("tool_calls") or ():
                if call.get("type") == "custom":  # a free-text custom call: Anthropic's input is an object
                    spec = call.get("custom") or {}
                    blocks.append({"type": "tool_use", "id": call.get("id"), "name": spec.get("name"),
                                   "input": {"input": spec.get("input")}})
                    continue
                fn = call.get("function") or {}
                args = fn.get("arguments")
                try:
                    value = jsonbody.loads(args) if isinstance(args, str) and args else (args or {})
                except orjson.JSONDecodeError:
                    value = {"arguments": args}
                blocks.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": value})
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    for m in out:
        if len(m["content"]) == 1 and m["content"][0].get("type") == "text":
            m["content"] = m["content"][0]["text"]
        elif m["role"] == "assistant" and any(_is_thinking(b) for b in m["content"]):
            # merged with an assistant message before it, its thinking still starts the turn
            m["content"].sort(key=lambda b: not _is_thinking(b))
    return out


def _is_thinking(block: Any) -> bool:
    return isinstance(block, dict) and block.get("type") in THINKING_BLOCKS


def _with_memo(content: Any, memo: Any) -> Any:
    """``with_memo`` for Anthropic content: a message of only ``tool_result`` blocks (which must
    come first) gets the memo as a text block after them."""
    if isinstance(content, list) and content and not any(
            isinstance(b, dict) and b.get("type") == "text" for b in content):
        return [*content, {"type": "text", "text": memo_section(memo)}]
    return with_memo(content, memo)


THINKING_BLOCKS = frozenset({"thinking", "redacted_thinking"})
TOOL_USE_BLOCKS = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})
"""Blocks whose ``input`` a stream sends as ``input_json_delta`` pieces."""


class MessagesAssembler(EventAssembler):
    """Builds the assistant message of a Messages stream from its events, and the ``message``
    the stream stands for (``response``: every block as the JSON reply would hold it, thinking,
    signatures, citations and server tools' input included, for ``$`` reply keys)."""

    final_types = frozenset({"message_stop"})

    def __init__(self, max_bytes: int | None = None) -> None:
        super().__init__(max_bytes)
        self.id: str | None = None
        self.start: dict[str, Any] = {}
        self.blocks: dict[int, dict[str, Any]] = {}
        self.stop_reason: str | None = None
        self.usage: dict[str, Any] = {}
        self.stopped = False

    def on_event(self, ev: dict[str, Any]) -> bool:
        """``message_stop`` is the final event."""
        kind = ev.get("type")
        if kind == "message_start" and isinstance(ev.get("message"), dict):
            self.start = ev["message"]
            self.id = self.start.get("id")
            self.usage.update(self.start.get("usage") or {})
        elif kind == "message_delta":
            self.stop_reason = (ev.get("delta") or {}).get("stop_reason") or self.stop_reason
            self.usage.update(ev.get("usage") or {})
        elif kind == "message_stop":
            self.stopped = True
            return True
        if self.truncated:
            return False
        index = ev.get("index")
        if kind == "content_block_start" and isinstance(ev.get("content_block"), dict):
            block = dict(ev["content_block"])
            if block.get("type") in TOOL_USE_BLOCKS:
                block["partial_json"] = ""
            self.blocks[int(index or 0)] = block
        elif kind == "content_block_delta" and isinstance(ev.get("delta"), dict):
            block = self.blocks.setdefault(int(index or 0), {"type": "text", "text": ""})
            delta = ev["delta"]
            change = delta.get("type")
            if change == "text_delta":
                block["text"] = block.get("text", "") + str(delta.get("text", ""))
            elif change == "input_json_delta":
                block["partial_json"] = block.get("partial_json", "") + str(delta.get("partial_json", ""))
            elif change == "thinking_delta":
                block["thinking"] = block.get("thinking", "") + str(delta.get("thinking", ""))
            elif change == "signature_delta":
                block["signature"] = block.get("signature", "") + str(delta.get("signature", ""))
            elif change == "citations_delta":
                block.setdefault("citations", []).append(delta.get("citation"))
        return False

    @property
    def finished(self) -> bool:
        return self.stopped

    @property
    def completed(self) -> bool:
        return self.stopped

    def _content(self) -> list[dict[str, Any]]:
        out = []
        for i in sorted(self.blocks):
            block = dict(self.blocks[i])
            if "partial_json" in block:
                raw = block.pop("partial_json", "")
                try:
                    block["input"] = jsonbody.loads(raw) if raw else block.get("input", {})
                except orjson.JSONDecodeError:
                    block["input"] = {}
            out.append(block)
        return out

    def message(self) -> Message:
        return reply_message({"content": self._content()})

    def response(self) -> dict[str, Any]:
        return {**self.start, "content": self._content(), "stop_reason": self.stop_reason, "usage": self.usage}


def reply_message(body: dict[str, Any]) -> Message:
    """The assistant message of a ``message`` object: its text and tool calls, and with tool
    calls its ``thinking``/``redacted_thinking`` blocks as ``reasoning`` (:func:`reasoning_blocks`)."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in body["content"]:
        if block.get("type") == "text":
            texts.append(str(block.get("text", "")))
        elif block.get("type") == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"),
                                       "arguments": jsonbody.dumps(block.get("input", {})).decode()}})
    message = assistant_message(texts, calls)
    if calls and (reasoning := reasoning_blocks(body["content"])):
        message["reasoning"] = reasoning
    return message


def thinking_off(body: dict[str, Any]) -> bool:
    """Whether a request turns thinking off (``thinking: {"type": "disabled"}``). Without a
    ``thinking`` member the model's default holds, which is on for recent models, so the
    recorded thinking goes in: it was recorded because the model thought."""
    thinking = body.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") == "disabled"


def reasoning_blocks(content: Any) -> list[dict[str, str]]:
    """The ``thinking`` (text and signature) and ``redacted_thinking`` (data) blocks of a reply's
    content, in order, with only those fields. With thinking on, Anthropic wants them back
    unchanged (the signature is checked) at the start of the assistant turn whose tool calls a
    request answers; so a tool call's are recorded with it (``session.tools.reasoning``)."""
    out: list[dict[str, str]] = []
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        if block.get("type") == "thinking" and isinstance(block.get("thinking"), str) \
                and isinstance(block.get("signature"), str):
            out.append({"type": "thinking", "thinking": block["thinking"], "signature": block["signature"]})
        elif block.get("type") == "redacted_thinking" and isinstance(block.get("data"), str):
            out.append({"type": "redacted_thinking", "data": block["data"]})
    return out


class MessagesCodec:
    name = "messages"
    protocol = "anthropic"
    upstream_path = "/messages"

    def check(self, body: dict[str, Any]) -> None:
        from gateway.stages.parse_request import check_flags, check_model, require_model

        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' is required: a non-empty list of messages", code="missing_messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") \
                    or not isinstance(m.get("content"), (str, list)):
                raise BadRequest(f"'messages[{i}]' must be an object with 'role' user or assistant and a "
                                 "'content' string or list of blocks", code="invalid_messages")
            for j, block in enumerate(m["content"] if isinstance(m["content"], list) else ()):
                if not isinstance(block, dict):  # Anthropic refuses it; a lenient server may read it
                    raise BadRequest(f"'messages[{i}].content[{j}]' must be a content block object (such as "
                                     "{\"type\": \"text\", \"text\": ...})", code="invalid_content")
        system = body.get("system")
        if system is not None and not isinstance(system, (str, list)):
            raise BadRequest("'system' must be a string or a list of text blocks", code="invalid_system")
        if not isinstance(body.get("max_tokens"), int):
            raise BadRequest("'max_tokens' is required: a whole number", code="missing_max_tokens")
        require_model(body)
        check_model(body.get("model"))
        check_flags(body)

    def messages(self, body: dict[str, Any]) -> list[Message]:
        return to_messages(body)

    def implied_session(self, ctx: Context) -> tuple[str | None, str]:
        return None, ""

    async def check_references(self, ctx: Context) -> None:
        """Files, containers and custom skills named by id only where the upstream forwards their
        routes (``gateway.codecs.references``)."""
        assert ctx.upstream is not None
        references.refuse(references.references_messages(ctx.body), ctx.upstream)

    def held_by_provider(self, ctx: Context) -> tuple[str, ...]:
        return ()

    def forward_body(self, ctx: Context, policy: Policy | None, state: SessionState | None) -> bytes | None:
        if state is None or policy is None:
            return None
        opts = policy.session.inject
        # Anthropic refuses tool blocks in a request that defines no tools
        window, add_memo = window_plan(ctx.messages, state, window=opts.context_window, memo=opts.memo,
                                       tools=bool(ctx.body.get("tools")))
        if not window and not add_memo:
            return None
        body = dict(ctx.body)
        rest = list(body["messages"])
        if add_memo and opts.memo_placement == "system":
            system = body.get("system")
            section = memo_section(state.memo)
            if isinstance(system, list):
                body["system"] = [*system, {"type": "text", "text": section}]
            else:
                body["system"] = f"{system}\n\n{section}" if system else section
        elif add_memo:
            for i in range(len(rest) - 1, -1, -1):
                if rest[i].get("role") == "user":
                    rest[i] = {**rest[i], "content": _with_memo(rest[i].get("content"), state.memo)}
                    break
        body["messages"] = to_anthropic(window, thinking=not thinking_off(body)) + rest
        return jsonbody.dumps(body)

    def parse_reply(self, body: Any) -> Message:
        try:
            return reply_message(body)
        except (KeyError, TypeError, AttributeError) as exc:
            raise UpstreamError("upstream sent a reply that is not a message", code="bad_upstream_reply") from exc

    def failed(self, body: dict[str, Any]) -> bool:
        """A message never reports a failure in a 200 reply."""
        return False

    def refused(self, body: dict[str, Any] | None) -> bool:
        """``stop_reason: "refusal"``: Claude declined (a streamed reply may stop mid-text), and
        Anthropic says to take that turn out of the conversation before going on, or the
        refusals continue."""
        return body is not None and body.get("stop_reason") == "refusal"

    def assembler(self, max_bytes: int | None) -> MessagesAssembler:
        return MessagesAssembler(max_bytes)

    def reply_prefix(self, prefix: bytes) -> str | None:
        return None

    def error_body(self, body: dict[str, Any], status: int) -> dict[str, Any]:
        err = body.get("error") or {}
        return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error" if status >= 500
                                                                    else "invalid_request_error"),
                                           "message": err.get("message", "")}}

    def stream_error(self, body: dict[str, Any], after: int | None = None) -> bytes:
        return b"event: error\ndata: " + orjson.dumps(self.error_body(body, 500)) + b"\n\n"


MESSAGES = MessagesCodec()
