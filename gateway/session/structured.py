"""Structured recording: tool calls, tool results and media parts kept as messages (pure).

Under ``null`` input and reply keys, a round that carries tool calls (the reply's
``tool_calls``), tool results (``role: tool`` messages answering them) or media parts (images,
files) is recorded as structured messages in the neutral form (``gateway.codecs``): the user's
messages with their parts, each tool result with its ``tool_call_id``, and the assistant message
with its ``tool_calls`` (and, from Anthropic with thinking on, the ``thinking`` blocks that came
with them as ``reasoning``: ``codecs.messages.reasoning_blocks``; an Anthropic tool result that
reports a failure keeps ``is_error: true``). The window injected from it is
then a sequence the provider accepts: a client that sends only its tool result continues the
conversation the upstream knows. Only the Messages codec injects ``reasoning`` and
``is_error``; the other protocols leave them out (``session.model.openai_form``).

The policy decides (``session.tools``, ``session.media``): tool arguments and results kept,
redacted or dropped (dropping either drops both, since a call without its result, or a result
without its call, is an invalid history); the thinking with a call kept or dropped (kept only
with its arguments); media parts kept (up to ``max_bytes``), replaced by a
placeholder text part (default) or dropped. Any other round keeps the text form
(``session.record``), byte for byte as before.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any

import orjson

from gateway.policy import Policy
from gateway.session.record import MEDIA_TYPES, new_messages

Message = dict[str, Any]
REDACTED_ARGUMENTS = '{"redacted": true}'
REDACTED_RESULT = "[redacted tool result]"


def _has_media(content: Any) -> bool:
    return isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in MEDIA_TYPES for p in content)


def needs_structure(messages: list[Message], reply: Message | None) -> bool:
    """True when the round carries tool calls, tool results or media parts."""
    if reply is not None and reply.get("tool_calls"):
        return True
    return any(m.get("role") in ("tool", "function") or m.get("tool_output") or _has_media(m.get("content"))
               for m in new_messages(messages))


def media_object(value: Any, key: str) -> dict[str, Any]:
    """A media part's inner object (``image_url``, ``file``, an Anthropic ``source``) as an object
    whatever a client sent: an object as it is, a string as ``{key: string}``, nothing as ``{}``,
    any other value as ``{key: its JSON text}``. Readers of parts go through this, so no shape a
    client sends makes recording fail after the model has run."""
    if isinstance(value, dict):
        return value
    if value is None or value == "":
        return {}
    return {key: value if isinstance(value, str) else orjson.dumps(value, default=str).decode()}


def placeholder(part: dict[str, Any]) -> str:
    """``[image: image/png, 12345 bytes, sha256 3f2a…]``: what a media part was, never its content."""
    kind = part.get("type")
    if kind == "image_url":
        url = str(media_object(part.get("image_url"), "url").get("url") or "")
        label = "image"
    elif kind == "file":
        file = media_object(part.get("file"), "file_data")
        url = str(file.get("file_data") or file.get("url") or file.get("file_id") or file.get("source") or "")
        label = "file"
    else:
        url = str(part.get("input_audio") or "")
        label = "audio"
    if url.startswith("data:") and ";base64," in url:
        media, data = url[5:].split(";base64,", 1)
        try:
            raw = base64.b64decode(data, validate=False)
        except (binascii.Error, ValueError):
            raw = data.encode()
        return f"[{label}: {media}, {len(raw)} bytes, sha256 {hashlib.sha256(raw).hexdigest()}]"
    return f"[{label}: {len(url)} bytes of reference, sha256 {hashlib.sha256(url.encode()).hexdigest()}]"


def part_size(part: dict[str, Any]) -> int:
    return len(str(part.get("image_url") or part.get("file") or part.get("input_audio") or ""))


def media_content(content: Any, policy: Policy) -> Any:
    """*content* with its media parts kept, placeholdered or dropped as the policy says."""
    if not _has_media(content):
        return content
    media = policy.session.media
    out: list[Any] = []
    for part in content:
        is_media = isinstance(part, dict) and part.get("type") in MEDIA_TYPES
        if not is_media or (media.parts == "keep" and part_size(part) <= media.max_bytes):
            out.append(part)
        elif media.parts != "drop":
            out.append({"type": "text", "text": placeholder(part)})
    return out


def structured_round(policy: Policy, messages: list[Message], reply: Message | None,
                     reply_text: str | None) -> list[Message] | None:
    """The round's messages with their structure, or None when the text form applies (keys are
    not ``null``, or the round has no tool call, tool result or media part). *reply_text* is the
    recorded text of the reply (``session.record.render_reply``), its content here."""
    if policy.input_paths is not None or policy.reply_paths is not None or not needs_structure(messages, reply):
        return None
    tools = policy.session.tools
    drop_tools = "drop" in (tools.arguments, tools.results)
    out: list[Message] = []
    for m in new_messages(messages):
        role = m.get("role")
        if role in ("tool", "function"):
            if drop_tools:
                continue
            content = REDACTED_RESULT if tools.results == "redact" else media_content(m.get("content"), policy)
            result: Message = {"role": "tool", "tool_call_id": m.get("tool_call_id"), "content": content}
            if m.get("is_error") is True:  # an Anthropic tool_result that reports a failure
                result["is_error"] = True
            out.append(result)
            continue
        if m.get("tool_output"):  # a built-in tool's result (gateway.codecs.responses), as user content
            if drop_tools:
                continue
            if tools.results == "redact":
                out.append({"role": "user", "content": REDACTED_RESULT})
                continue
        content = media_content(m.get("content"), policy)
        if content in (None, "", []):
            continue
        out.append({"role": "user", "content": content})
    if reply is not None:
        calls = [] if drop_tools else [_call(call, tools.arguments) for call in reply.get("tool_calls") or ()]
        text = reply_text if not reply.get("tool_calls") else (reply.get("content") or None)
        if calls:
            message: Message = {"role": "assistant", "content": text if isinstance(text, str) and text else None,
                                "tool_calls": calls}
            if reply.get("reasoning") and tools.reasoning == "keep" and tools.arguments == "keep":
                message["reasoning"] = reply["reasoning"]
            out.append(message)
        elif text:
            out.append({"role": "assistant", "content": text})
    return out


def _call(call: Any, arguments: str) -> Any:
    """*call* in the form Chat Completions writes (``id``, ``type``, and ``function: {name,
    arguments}`` or ``custom: {name, input}``; any other key a provider added is not recorded),
    its arguments (a custom tool's free-text ``input``) redacted when the policy says so."""
    if not isinstance(call, dict):
        return call
    kind = "custom" if call.get("type") == "custom" else "function"
    raw = call.get(kind)
    spec: dict[str, Any] = raw if isinstance(raw, dict) else {}
    field = "input" if kind == "custom" else "arguments"
    value = spec.get(field)
    if arguments == "redact":
        value = REDACTED_ARGUMENTS
    elif value is not None and not isinstance(value, str):
        value = orjson.dumps(value).decode()
    return {"id": call.get("id"), "type": kind, kind: {"name": spec.get("name"), field: value}}
