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

Structured replies in Agently's other output formats (``flat_markdown``, ``hybrid``,
``xml_field``, ``yaml_literal``): :func:`output_contract` reads which one a request asks for,
:meth:`OutputContract.parse` reads the reply in it (``session.record`` records the data).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import contextlib
import hashlib
import mimetypes
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

from gateway import jsonbody
from gateway.errors import BadRequest
from gateway.paths import MISSING
from gateway.policy import Policy
from gateway.session.record import (
    _PARSE_ERRORS,
    MEDIA_TYPES,
    ParseBudget,
    _fits,
    _load_structure,
    fenced_blocks,
    json_blocks,
    new_messages,
    parse_reply_json,
)

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
    return {key: value if isinstance(value, str) else jsonbody.dumps(value, default=str).decode()}


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


def data_url(url: str) -> tuple[str, bytes] | None:
    """A ``data:`` URL (RFC 2397) as ``(media type, bytes)`` for a placeholder: base64-decoded
    (leniently) with ``;base64``, percent-decoded otherwise; media type ``text/plain`` when it
    names none. None for anything else. A text file's data is read strictly
    (:func:`text_file_data`)."""
    if url[:5].lower() != "data:" or "," not in url:  # a URL's scheme is case-insensitive
        return None
    header, payload = url[5:].split(",", 1)
    fields = [f.strip() for f in header.split(";")]
    encoded = len(fields) > 1 and fields[-1].lower() == "base64"
    raw = _b64(payload) if encoded else urllib.parse.unquote_to_bytes(payload)
    return fields[0] or "text/plain", raw


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
with ``errors="replace"``; ``rot13``, ``base64``; one Python does not know) is refused
(:func:`file_text`): what a provider would read under it is unknown."""


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else jsonbody.dumps(value, default=str).decode()


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
    reference), which stays a media part.

    The record holds one reading of the file, so data a provider could read otherwise is
    refused (``BadRequest``, 400) before anything is forwarded: base64 that is not strictly
    valid (``invalid_file_data``: :func:`strict_b64`), and bytes with another plausible reading
    than the recorded one (``ambiguous_file_text``: :func:`file_text`)."""
    found = _text_file(part)
    if found is None:
        return None
    name, data = found
    charset, raw = text_file_data(data)
    return document_parts("file", name, None, [{"type": "text", "text": file_text(raw, charset)}])


def text_file_data(data: str) -> tuple[str | None, bytes]:
    """A text file's inline *data* (a ``data:`` URL holding a comma, or bare base64) as the
    charset it names (None: none named) and its bytes. Refused (400 ``invalid_file_data``):
    base64 that is not strictly valid, and a ``;base64`` flag that is not the URL's last
    parameter (RFC 2397; a lenient reader decodes what the record would hold as its base64
    text). Two ``charset`` parameters naming different charsets are ``ambiguous_file_text``:
    readers differ on which one counts."""
    if data[:5].lower() != "data:":
        return None, strict_b64(data)
    header, payload = data[5:].split(",", 1)
    params = [p.strip() for p in header.split(";")[1:]]
    encoded = bool(params) and params[-1].lower() == "base64"
    if any(p.lower() == "base64" for p in params[:-1]):
        raise BadRequest("a text file's data: URL has ';base64' before another parameter; it must be the "
                         "last one, just before the comma (data:text/plain;charset=utf-8;base64,...)",
                         code="invalid_file_data")
    charsets = {_unquote(value) for key, eq, value in (p.partition("=") for p in params)
                if eq and key.strip().lower() == "charset"}
    if len({_canonical_name(c) for c in charsets}) > 1:
        raise BadRequest("a text file's data: URL names more than one charset, and readers differ on which "
                         "one counts: name one, or send the file as UTF-8", code="ambiguous_file_text")
    raw = strict_b64(payload) if encoded else urllib.parse.unquote_to_bytes(payload)
    return next(iter(charsets), None), raw


def _unquote(value: str) -> str:
    value = value.strip()
    return value[1:-1].strip() if len(value) > 1 and value[0] == value[-1] == '"' else value


def _canonical_name(charset: str) -> str:
    try:
        return codecs.lookup(charset).name
    except LookupError:  # a charset Python does not know
        return charset.lower()


def strict_b64(data: str) -> bytes:
    """*data* decoded as strict base64 (RFC 4648 section 4: the standard alphabet, no whitespace,
    padded to a multiple of four characters, nothing after the padding); else 400
    ``invalid_file_data``. Lenient decoders disagree on other data: Python's stops at the first
    padding, GNU ``base64 -d`` reads on past it, Perl's decodes unpadded data a strict one
    refuses, so no record could say which text the model read."""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):  # ValueError: a character outside ASCII
        raise BadRequest("a text file's base64 data is not strictly valid base64: send the standard alphabet "
                         "(A-Z, a-z, 0-9, + and /) padded with '=' to a multiple of 4 characters, without line "
                         "breaks or anything after the padding", code="invalid_file_data") from None


BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
        (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
"""Byte order marks and the encoding each says (UTF-32's first: ``FF FE 00 00`` starts with
UTF-16LE's): a reader that sniffs one reads the bytes after it so, whatever the charset says."""


def file_text(raw: bytes, charset: str | None) -> str:
    """The text a text file's bytes *raw* hold, read in the *charset* it names (UTF-8 when it
    names none), and the only plausible reading of them: else 400 ``ambiguous_file_text``.

    Providers differ in how they read a file, so each reading one may take that succeeds
    (strictly) must be the recorded text: UTF-8 (a provider that ignores the charset), the
    encoding a leading byte order mark says (one that sniffs it), and, for ``utf-16`` or
    ``utf-32`` without a byte order mark, both byte orders (Python reads little-endian, RFC 2781
    big-endian). So ``charset=utf-16`` on ASCII bytes (CJK to Python, English to a UTF-8
    reader) is refused, while Latin-1 bytes that are not UTF-8, and ASCII under any
    ASCII-compatible charset, are one text. A charset the gateway does not read (one outside
    ``SAFE_CHARSETS``: unknown to Python, or no text encoding, such as ``punycode`` or ``idna``)
    has no reading the record could hold, and is refused too. Bytes that are invalid in the
    charset (and in every other reading) are recorded with U+FFFD in their place."""
    try:  # messages name Python's name of a charset, never the client's text
        name = codecs.lookup(charset or "utf-8").name
    except LookupError:
        name = ""
    if name not in SAFE_CHARSETS:
        named = f"charset {name!r}" if name else "a charset"
        raise BadRequest(f"a text file names {named}, which the gateway does not read, so it could not record "
                         "the text the model reads: send the file as UTF-8 (charset=utf-8)",
                         code="ambiguous_file_text")
    text = raw.decode(name, errors="replace")
    readings = [("utf-8", raw, "")]
    bom = next(((mark, encoding) for mark, encoding in BOMS if raw.startswith(mark)), None)
    if bom is not None:
        readings.append((bom[1], raw[len(bom[0]):], " (as its byte order mark says)"))
    elif name in ("utf-16", "utf-32"):
        readings += [(f"{name}-le", raw, " (no byte order mark says which)"),
                     (f"{name}-be", raw, " (no byte order mark says which)")]
    for encoding, data, why in readings:
        try:
            other = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        if other.removeprefix("\ufeff") != text.removeprefix("\ufeff"):
            raise BadRequest(f"a text file's bytes are one text in {name} and another in {encoding}{why}, "
                             "and a provider may read either: send the file as UTF-8 (charset=utf-8)",
                             code="ambiguous_file_text")
    return text


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
            return label, None, jsonbody.dumps(source, default=str), True
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
        return label, parsed[0], parsed[1], True
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
        if is_media and (text := _recorded_text_file(part)) is not None:
            out.extend(text)  # a text file is text the model read, never a placeholder
        elif not is_media or (media.parts == "keep" and part_size(part) <= media.max_bytes):
            out.append(part)
        else:
            out.extend(_document_header(part))
            if media.parts != "drop":
                out.append({"type": "text", "text": placeholder(part)})
    return out


def _recorded_text_file(part: Any) -> list[Any] | None:
    """:func:`text_file_parts` of *part* at record time, None (a media part) for data it refuses.
    A protocol whose requests hold text files reads them before forwarding (``codecs``), so such
    a request never got here; a part seen only now (an Anthropic ``document`` with a
    ``file_data`` member, which Anthropic does not read) must not make recording fail after the
    model has run."""
    try:
        return text_file_parts(part)
    except BadRequest:
        return None


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
        value = jsonbody.dumps(value).decode()
    return {"id": call.get("id"), "type": kind, kind: {"name": spec.get("name"), field: value}}


# --- Agently output formats -------------------------------------------------------------------
#
# Agently 4.1's ``.output({...}, format=...)`` asks for one of five reply shapes, and its
# ``get_data()`` (what its Session records) reads the reply in that shape only. The gateway sees
# the request as Agently rendered it, so it reads which shape was asked for from the
# ``[OUTPUT REQUIREMENT]:`` section (:func:`output_contract`) and the reply the same way
# (:meth:`OutputContract.parse`). Each reader is linear in the reply's length.

_FORMATS = {"JSON": "json", "Structured Markdown": "flat_markdown",
            "Structured Markdown with JSON blocks": "hybrid", "XML-like field envelope": "xml_field",
            "YAML literal document": "yaml_literal"}
"""The ``Data Format:`` line Agently writes for each ``format=`` it sends as a prompt."""

_SECTION = re.compile(r"^\[([A-Za-z][A-Za-z0-9 _-]*)\]:[ \t]*$", re.MULTILINE)
_HYBRID_FIELD = re.compile(r"- (.+?): (text|json)(?:; .*)?")
_XML_PROMPT_FIELD = re.compile(r'<field name="(.+)" type="(text|json)">')
_XML_OPEN = re.compile(r"<agently_output\b[^>]*>", re.IGNORECASE)
_XML_CLOSE = re.compile(r"</agently_output>", re.IGNORECASE)
_XML_FIELD = re.compile(r"""<field\s+name=["']([^"']+)["']\s+type=["'](text|json)["']\s*>""", re.IGNORECASE)
_XML_FIELD_END = re.compile(r"</field\s*>(?=\s*(?:<field\b|</agently_output>))", re.IGNORECASE)
_YAML_BEGIN = re.compile(r"<<<BEGIN\s+AGENTLY_YAML>>>", re.IGNORECASE)
_YAML_END = re.compile(r"<<<END\s+AGENTLY_YAML>>>", re.IGNORECASE)
_YAML_FENCE = re.compile(r"(?:yaml|yml)?[ \t]*\n", re.IGNORECASE)
_FENCE_LINE = re.compile(r"(`{3,}|~{3,})([^\n]*)")
_FENCE_INFO = re.compile(r"[\w.+#-]*")
_SCAFFOLD = re.compile(r"<!--\s*\((?:text|json)\)", re.IGNORECASE)
_COMMENT = re.compile(r"\s*<!--(.*?)-->\s*", re.DOTALL)
_HINT = re.compile(r"placeholder|description|your\s+\w+|todo|字段|描述|说明|内容", re.IGNORECASE)


@dataclass(frozen=True)
class OutputContract:
    """The structured output a request asks for: Agently's ``format`` (``json``,
    ``flat_markdown``, ``hybrid``, ``xml_field``, ``yaml_literal``) and its top-level fields, each
    ``text``, ``json`` or, where Agently's prompt does not say (``flat_markdown``), ``any``."""

    format: str
    fields: tuple[tuple[str, str], ...] = ()

    def parse(self, text: str | None) -> Any:
        """The reply *text* as Agently's ``get_data()`` reads it for this contract; MISSING when
        it does not parse. A non-JSON format that does not parse falls back to a JSON object in
        the text, as Agently does; JSON is read by ``session.record.parse_reply_json``."""
        if not text:
            return MISSING
        if self.format != "json":
            kinds = dict(self.fields)
            reader = {"flat_markdown": _markdown, "hybrid": _markdown, "xml_field": _xml_field,
                      "yaml_literal": _yaml_literal}[self.format]
            try:
                value = reader(text, kinds)
            except _PARSE_ERRORS:
                value = None
            if value:
                return value
        value = parse_reply_json(text)
        return value if self.format == "json" or isinstance(value, dict) else MISSING


def output_contract(text: str) -> OutputContract | None:
    """The output contract of an Agently-rendered prompt *text*: its last ``[OUTPUT
    REQUIREMENT]:`` section (Agently writes it after the input) when the line after the header
    is a ``Data Format:`` Agently parses; None otherwise (plain text, ``markdown text``)."""
    if "[OUTPUT REQUIREMENT]:" not in text:  # one substring search: the sections' scan is ~5 ns a character
        return None
    headers = [h for h in _SECTION.finditer(text) if h.group(1) == "OUTPUT REQUIREMENT"]
    if not headers:
        return None
    header = headers[-1]
    following = _SECTION.search(text, header.end())
    lines = text[header.end() + 1: following.start() if following else len(text)].split("\n")
    kind = _FORMATS.get(lines[0].removeprefix("Data Format:").strip()) if lines[0].startswith("Data Format:") else None
    if kind is None:
        return None
    fields: list[tuple[str, str]] = []
    if kind in ("flat_markdown", "hybrid"):
        listed = lines[lines.index("Required sections:") + 1:] if "Required sections:" in lines else []
        for line in listed:
            if kind == "hybrid" and line == "Response skeleton:":
                break
            if kind == "flat_markdown" and line.startswith("### "):
                fields.append((line[4:], "any"))
            elif kind == "hybrid" and (match := _HYBRID_FIELD.fullmatch(line)):
                fields.append((match.group(1), match.group(2)))
    elif kind == "xml_field":
        fields = [(m.group(1), m.group(2)) for line in lines if (m := _XML_PROMPT_FIELD.fullmatch(line))]
    if kind in ("flat_markdown", "hybrid", "xml_field") and not fields:
        return None  # no field to read: Agently's reader finds nothing either
    return OutputContract(kind, tuple(fields))


def _markdown(text: str, kinds: dict[str, str]) -> dict[str, Any] | None:
    """``flat_markdown`` and ``hybrid``: a ``### field`` line (optionally ``[text]``/``[JSON]``
    after it) opens the field's section, which runs to the next such line. A section that does
    not read as its field's kind makes the whole reply unparsed."""
    found: dict[str, Any] = {}
    name: str | None = None
    body: list[str] = []
    for line in [*text.split("\n"), None]:
        opened = _section_field(line, kinds) if line is not None else None
        if line is not None and opened is None:
            if name is not None:
                body.append(line)
            continue
        if name is not None:
            kind = "json_block" if kinds[name] == "json" else kinds[name]  # only hybrid names json fields
            ok, value = _section_value("\n".join(body).strip(), name, kind)
            if not ok:
                return None
            found[name] = value
        name, body = opened, []
    return found or None


def _section_field(line: str, kinds: dict[str, str]) -> str | None:
    """The field a ``### field`` header line opens, None for any other line."""
    if not line.startswith("###") or line[3:4] not in (" ", "\t"):
        return None
    name = line[3:].strip()
    for tag in ("[text]", "[JSON]"):
        if name.endswith(tag):
            name = name[: -len(tag)].rstrip()
    return name if name in kinds else None


def _section_value(content: str, name: str, kind: str) -> tuple[bool, Any]:
    """One field's value from its section *content*, as Agently reads a field of that *kind*:
    ``text`` is the text, or a JSON scalar when it starts as JSON; ``json`` any JSON value;
    ``json_block`` (a hybrid field) the same, taken from a ```` ```json ```` block it starts with
    or the JSON block in it; ``any`` (``flat_markdown``, whose prompt names no kinds) a JSON
    array or object when it is one, else as ``text``. A value given as ``{"<field>": value}`` is
    that value; a placeholder left from the prompt's skeleton is no value."""
    if kind == "json_block":
        content, kind = _json_block(content), "json"
    raw = _clean(content)
    if (not raw and content.strip()) or _placeholder(raw):
        return False, None
    if kind == "json" or (kind == "any" and raw[:1] in ("{", "[")):
        ok, value = _json5(raw)
        if ok and not (kind == "any" and isinstance(value, dict) and set(value) != {name}):
            value = _unwrap(value, name)
            return not (isinstance(value, str) and _placeholder(value)), value
        if kind == "json" or ok:
            return False, None
    if raw[:1] in ("{", "[", '"'):
        ok, value = _json5(raw)
        if ok:
            if isinstance(value, dict) and set(value) != {name}:
                return False, None
            value = _unwrap(value, name)
            return not (isinstance(value, (dict, list)) or (isinstance(value, str) and _placeholder(value))), value
    return True, raw


def _unwrap(value: Any, name: str) -> Any:
    return value[name] if isinstance(value, dict) and set(value) == {name} else value


def _json_block(content: str) -> str:
    """A ``json`` field's JSON: a fenced block it starts with, else the JSON block in it, else itself."""
    stripped = content.lstrip()
    if stripped.startswith("```"):
        blocks = fenced_blocks(stripped)
        if blocks and blocks[0][0] in ("", "json"):
            return blocks[0][1].strip()
    if stripped[:1] not in ("{", "[") and (found := json_blocks(content)):
        return found[0]
    return content


def _json5(text: str) -> tuple[bool, Any]:
    """*text* as one JSON5 value within the parse bounds."""
    from gateway.session.lenient_json import loads_json5

    try:
        value = loads_json5(text)
    except Exception:  # noqa: BLE001 - any failure is "not JSON5": reply text never raises here
        return False, None
    return _fits(value, ParseBudget()), value


def _clean(content: str) -> str:
    """A section's text without a fence wrapping all of it and without Agently's leading
    ``<!-- (text) ... -->`` scaffold comments."""
    raw = _unfenced(content).strip()
    while scaffold := _SCAFFOLD.match(raw):
        end = raw.find("-->", scaffold.end())  # found, not matched: a lazy pattern here is quadratic
        if end < 0 or not (end == scaffold.end() or raw[scaffold.end()].isspace()):
            break
        raw = raw[end + 3:].strip()
    return raw


def _unfenced(text: str) -> str:
    """The body of *text* when it is wholly one fenced block (its closing fence the last line)."""
    lines = text.strip().split("\n")
    opening = _FENCE_LINE.fullmatch(lines[0]) if len(lines) > 1 else None
    if opening is None or not _FENCE_INFO.fullmatch(opening.group(2).strip()):
        return text
    marker = opening.group(1)
    for index, line in enumerate(lines[1:], start=1):
        closing = _FENCE_LINE.fullmatch(line)
        if (closing and closing.group(1)[0] == marker[0] and len(closing.group(1)) >= len(marker)
                and not closing.group(2).strip()):
            return "\n".join(lines[1:index]) if index == len(lines) - 1 else text
    return text


def _placeholder(value: str) -> bool:
    """A value the model copied from the prompt's skeleton (``<!-- description -->``,
    ``<your answer>``), which Agently does not take as a value."""
    stripped = value.strip()
    if not stripped:
        return False
    if comment := _COMMENT.fullmatch(stripped):
        inner = comment.group(1).strip()
        return bool(_angle(inner, whole=False) or _HINT.search(inner))
    return bool(_angle(stripped, whole=True) and _HINT.search(stripped))


def _angle(text: str, *, whole: bool) -> bool:
    """Whether *text* starts with (*whole*: is) an angle placeholder such as ``(json) <answer>``:
    space, an optional ``(``, an optional ``json`` or ``text``, an optional ``)``, then ``<``, 1 to
    160 characters on one line, ``>``. Read left to right once: as a regular expression of
    optional parts between runs of space (``\\s*\\(?\\s*(?:json|text)?\\s*\\)?\\s*<...>``) it
    backtracked in cubic time over a long run of spaces that ends in no ``<`` (2,500 spaces: 10 s)."""
    rest = text.lstrip()
    if rest[:1] == "(":
        rest = rest[1:].lstrip()
    if rest[:4].casefold() in ("json", "text"):
        rest = rest[4:].lstrip()
    if rest[:1] == ")":
        rest = rest[1:].lstrip()
    if rest[:1] != "<":
        return False
    close = rest.find(">", 1, 162)
    if close < 2 or "\n" in rest[1:close]:
        return False
    return not whole or not rest[close + 1:].strip()


def _xml_field(text: str, kinds: dict[str, str]) -> dict[str, Any] | None:
    """``xml_field``: the ``<field name=... type=text|json>`` blocks between the first
    ``<agently_output>`` and the last ``</agently_output>``; fields the prompt did not ask for are
    skipped."""
    opening = _XML_OPEN.search(text)
    closings = list(_XML_CLOSE.finditer(text, opening.end())) if opening else []
    if opening is None or not closings:
        return None
    target = text[opening.start(): closings[-1].end()]
    found: dict[str, Any] = {}
    position = 0
    while (start := _XML_FIELD.search(target, position)) and (end := _XML_FIELD_END.search(target, start.end())):
        name, kind = start.group(1), start.group(2).lower()
        position = end.end()
        if name not in kinds:
            continue
        ok, value = _section_value(target[start.end(): end.start()].strip(), name, "json" if kind == "json" else "text")
        if not ok:
            return None
        found[name] = value
    return found or None


def _yaml_literal(text: str, kinds: dict[str, str]) -> dict[str, Any] | None:
    """``yaml_literal``: the YAML mapping between ``<<<BEGIN AGENTLY_YAML>>>`` and the next
    ``<<<END AGENTLY_YAML>>>``, else in the first ```` ```yaml ```` (or bare) fenced block."""
    body: str | None = None
    if (begin := _YAML_BEGIN.search(text)) and (end := _YAML_END.search(text, begin.end())):
        body = text[begin.end(): end.start()]
    else:
        position = text.find("```")
        while position >= 0 and body is None:
            if lang := _YAML_FENCE.match(text, position + 3):
                close = text.find("```", lang.end())
                if close >= 0:
                    body = text[lang.end(): close]
            position = text.find("```", position + 3)
    if body is None or not body.strip():
        return None
    value = _load_structure(body.strip())
    return value if isinstance(value, dict) else None
