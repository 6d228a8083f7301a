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
import codecs
import contextlib
import hashlib
import mimetypes
import urllib.parse
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


TEXT_MEDIA = frozenset({"application/json", "application/xml", "application/yaml", "application/x-yaml",
                        "application/javascript", "application/x-javascript", "application/typescript",
                        "application/x-sh", "application/x-python", "application/sql", "application/x-ndjson",
                        "application/csv", "application/markdown"})
"""Media types besides ``text/*`` (and ``+json``/``+xml``) whose bytes a model reads as text."""


def is_text_media(media: str | None) -> bool:
    """Whether a file of media type *media* is text the model reads (``text/plain`` ...)."""
    kind = (media or "").split(";", 1)[0].strip().lower()
    return kind.startswith("text/") or kind in TEXT_MEDIA or kind.endswith(("+json", "+xml"))


def _b64(data: str) -> bytes:
    """*data* base64-decoded as ``base64.b64decode`` decodes it; its own bytes when it is not base64."""
    try:
        return base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        return data.encode("utf-8", "surrogatepass")


def data_url(url: str) -> tuple[str, str, bytes] | None:
    """A ``data:`` URL (RFC 2397) as ``(media type, charset, bytes)``: base64-decoded with
    ``;base64``, percent-decoded otherwise; media type ``text/plain`` when it names none. None
    for anything else."""
    if url[:5].lower() != "data:" or "," not in url:  # a URL's scheme is case-insensitive
        return None
    header, payload = url[5:].split(",", 1)
    fields = [f.strip() for f in header.split(";")]
    encoded = len(fields) > 1 and fields[-1].lower() == "base64"
    charset = next((f.split("=", 1)[1].strip() for f in fields[1:] if f.lower().startswith("charset=")), "utf-8")
    raw = _b64(payload) if encoded else urllib.parse.unquote_to_bytes(payload)
    return fields[0] or "text/plain", charset, raw


def _canonical(names: list[str]) -> frozenset[str]:
    known = set()
    for name in names:
        with contextlib.suppress(LookupError):  # not in this Python's codecs
            known.add(codecs.lookup(name).name)
    return frozenset(known)


SAFE_CHARSETS = _canonical(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le",
                            "utf-32-be", "ascii", *(f"iso8859-{n}" for n in range(1, 17)),
                            *(f"cp{n}" for n in range(1250, 1259)), "cp437", "cp850", "koi8-r", "koi8-u",
                            "mac-roman", "shift_jis", "euc-jp", "iso2022_jp", "gb2312", "gbk", "gb18030", "big5",
                            "euc_kr"])
"""Charsets a client may name for a text file: Python's codecs of real text encodings, each
linear in C. Any other name (``punycode``, quadratic in Python; ``idna``, which raises even
with ``errors="replace"``; ``rot13``, ``base64``) is read as UTF-8."""


def _decode(raw: bytes, charset: str) -> str:
    try:
        name = codecs.lookup(charset).name
    except LookupError:  # a charset Python does not know
        name = "utf-8"
    return raw.decode(name if name in SAFE_CHARSETS else "utf-8", errors="replace")


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value, default=str).decode()


def document_parts(label: str, name: Any, context: Any, body: list[Any]) -> list[Any]:
    """A text document as the text parts the model read: a header naming it (``[document:
    title]``, then ``[context: ...]`` when it has one) and its *body* parts (empty text parts
    left out: Anthropic refuses an empty text block in a window)."""
    header = f"[{label}: {_as_text(name)}]" if name not in (None, "") else f"[{label}]"
    if context not in (None, ""):
        header += f"\n[context: {_as_text(context)}]"
    return [{"type": "text", "text": header},
            *(p for p in body if not (isinstance(p, dict) and p.get("type") == "text" and p.get("text") == ""))]


def text_file_parts(part: Any) -> list[Any] | None:
    """A Chat ``file`` part (or a Responses ``input_file``, read as one) whose inline data is
    text (a ``text/*`` or JSON ``data:`` URL; or base64 of a file whose name says text) as the
    text parts the model read (``document_parts``); None for anything else (a binary file, a
    reference), which stays a media part."""
    found = _text_file(part)
    if found is None:
        return None
    name, data = found
    if data[:5].lower() == "data:":
        _, charset, raw = data_url(data) or ("", "utf-8", b"")
    else:
        charset, raw = "utf-8", _b64(data)
    return document_parts("file", name, None, [{"type": "text", "text": _decode(raw, charset)}])


def is_text_file(part: Any) -> bool:
    """Whether :func:`text_file_parts` reads *part* as text, without decoding anything."""
    return _text_file(part) is not None


def _text_file(part: Any) -> tuple[Any, str] | None:
    """A text file part's name and inline data; None for anything else. A ``data:`` URL's media
    type decides, unless it is a generic binary one (``application/octet-stream``, or none given
    with a name): then, as for bare base64, the file's name does (a provider may go by it)."""
    if not isinstance(part, dict) or part.get("type") != "file":
        return None
    file = media_object(part.get("file"), "file_data")
    data, name = file.get("file_data"), file.get("filename")
    if not isinstance(data, str) or not data or "source" in file:
        return None
    if data[:5].lower() == "data:":
        if "," not in data:
            return None
        media = data[5:data.find(",")].split(";", 1)[0].strip().lower()
        if is_text_media(media or "text/plain"):
            return name, data
        if media not in GENERIC_MEDIA:
            return None  # binary (a PDF, an image): decoded only for its placeholder
    guessed = mimetypes.guess_type(name)[0] if isinstance(name, str) else None
    return (name, data) if is_text_media(guessed) else None


GENERIC_MEDIA = frozenset({"application/octet-stream", "binary/octet-stream", "application/unknown"})
"""Media types that say nothing of a file's bytes: its name decides whether it is text."""


def _source(part: dict[str, Any]) -> tuple[str, str | None, bytes, bool]:
    """``(label, media type, bytes, inline)`` of a media part: the bytes its data decodes to
    (a ``data:`` URL, an Anthropic base64 source, Chat's ``input_audio``), or, for a reference
    (a URL, a file id), the reference's own text."""
    kind = part.get("type")
    if kind == "image_url":
        ref: Any = media_object(part.get("image_url"), "url").get("url")
        label = "image"
        if isinstance(ref, str) and ref.startswith("file:"):  # an image by file id (the codecs' form)
            ref = ref[5:]
    elif kind == "file":
        file = media_object(part.get("file"), "file_data")
        label = "file"
        source = file.get("source")
        if isinstance(source, dict) and source.get("type") == "base64" and isinstance(source.get("data"), str):
            return label, str(source.get("media_type") or "") or None, _b64(source["data"]), True
        if isinstance(source, dict) and isinstance(source.get("url"), str):
            ref = source["url"]
        elif isinstance(source, dict) and isinstance(source.get("file_id"), str):
            ref = source["file_id"]
        elif source is not None:  # a text or content source read as a file, or a shape of its own
            return label, None, orjson.dumps(source, default=str), True
        elif isinstance(file.get("file_data"), str) and file["file_data"] and data_url(file["file_data"]) is None:
            return label, None, _b64(file["file_data"]), True  # inline base64 without a data: URL
        else:
            ref = file.get("file_data") or file.get("file_url") or file.get("url") or file.get("file_id")
    else:
        audio = media_object(part.get("input_audio"), "data")
        label = "audio"
        if isinstance(audio.get("data"), str) and data_url(audio["data"]) is None:
            fmt = audio.get("format")
            return label, f"audio/{fmt}" if isinstance(fmt, str) and fmt else None, _b64(audio["data"]), True
        ref = audio.get("data") or audio.get("url")
    text = "" if ref is None else _as_text(ref)
    if (parsed := data_url(text)) is not None:
        return label, parsed[0], parsed[2], True
    return label, None, text.encode("utf-8", "surrogatepass"), False


def placeholder(part: dict[str, Any]) -> str:
    """``[image: image/png, 12345 bytes, sha256 3f2a…]`` (a file with its name: ``[file: scan.pdf,
    application/pdf, ...]``): what a media part was, never its content.
    The size and sha256 are of the bytes the model was given (base64 decoded) for inline data,
    and of the reference itself (a URL, a file id) for a reference, so an auditor holding the
    file (or the URL) can show which one it was."""
    label, media, raw, inline = _source(part)
    digest = hashlib.sha256(raw).hexdigest()
    name = media_object(part.get("file"), "file_data").get("filename") if part.get("type") == "file" else None
    fields = [] if name in (None, "") else [_as_text(name)]  # a file's name is text the model read too
    if not inline:
        fields.append(f"{len(raw)} bytes of reference")
    else:
        fields.extend([media] if media else [])
        fields.append(f"{len(raw)} bytes")
    return f"[{label}: {', '.join(fields)}, sha256 {digest}]"


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
        if is_media and (text := text_file_parts(part)) is not None:
            out.extend(text)  # a text file is text the model read, never a placeholder
        elif not is_media or (media.parts == "keep" and part_size(part) <= media.max_bytes):
            out.append(part)
        else:
            out.extend(_document_header(part))
            if media.parts != "drop":
                out.append({"type": "text", "text": placeholder(part)})
    return out


def _document_header(part: dict[str, Any]) -> list[Any]:
    """An Anthropic document's ``title`` and ``context`` (text the model read beside a binary
    document) as a text part; nothing for a part that has neither."""
    file = media_object(part.get("file"), "file_data") if part.get("type") == "file" else {}
    if "source" not in file or (file.get("title") in (None, "") and file.get("context") in (None, "")):
        return []
    return document_parts("document", file.get("title"), file.get("context"), [])


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
