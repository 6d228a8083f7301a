"""Server-sent events from an OpenAI-compatible stream: cut into events, assembled into a reply.

``EventSplitter.feed(chunk)`` returns the bytes of the complete events in *chunk* (to forward
at once, unchanged), hands each complete event to an assembler, and holds back a trailing
partial event and the final event (Chat's ``data: [DONE]``, Responses' ``response.completed``,
Messages' ``message_stop``), which the gateway sends only after the round is committed.
``ReplyAssembler`` builds the assistant message a Chat stream amounts to; the other protocols'
assemblers live with their codecs (``gateway.codecs``).

Events are read as a client's decoder reads them (WHATWG's event-stream format, as the
``openai`` and ``anthropic`` SDKs implement it): an event's data is the values of its ``data``
lines, each without one leading space, joined by newlines (:func:`event_data`). So JSON a
provider spreads over several ``data:`` lines, ``data:`` without a space, and ``id:``,
``event:``, ``retry:`` and comment lines around the data all assemble, and end a stream, as
they do for the client. Each event's data is parsed once, by the assembler, which also says
whether the event is the final one: ``[DONE]`` (in any protocol's stream), or the protocol's
own final event by the top-level ``type`` of its data (a request's metadata echoed inside
``response.created`` is not the type of that event).

Bounds: ``EventSplitter(max_event=N)`` never holds more than about N bytes of one event: a
longer event is forwarded as it arrives (``oversized`` is set) and is not parsed. Its type is
read from its first bytes instead (``on_oversized``: the data's leading ``"type"``, else its
``event:`` line); when that is the protocol's final type (a Responses reply past the cap ends
with a ``response.completed`` longer than the cap), the event's last byte, the newline that
ends it for a client, is held back like any final event, so the client still sees the end only
after the round is committed, and no "broke off" error follows a stream that did end.
``ReplyAssembler(max_bytes=N)`` keeps the text of events up to N bytes of event data; past it,
text is dropped, ``truncated`` is set, and only the small fields (finish reason, usage, id,
model) are still taken from later events.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar

import orjson
import structlog

log = structlog.get_logger("gateway.sse")

DONE = b"[DONE]"
# The type of an event from its first bytes: its data's leading "type" member, or its event: line.
_LEADING_TYPE = re.compile(rb'\s*\{\s*"type"\s*:\s*"([A-Za-z0-9_.]{1,64})"')
_HEAD_EVENT_NAME = re.compile(rb"^event: ?([A-Za-z0-9_.]{1,64})$", re.MULTILINE)
HEAD_BYTES = 1024
"""How much of an oversized event :func:`head_type` reads."""


def head_type(head: bytes) -> str | None:
    """The type of an event known only by its first bytes (lines split on ``\\n``): the leading
    ``"type"`` member of its data (its ``data`` lines so far, joined as :func:`event_data` joins
    them), else its ``event:`` line's name; None when neither is there."""
    data = event_data(head)
    match = (_LEADING_TYPE.match(data) if data is not None else None) or _HEAD_EVENT_NAME.search(head)
    return match.group(1).decode() if match else None


def event_data(event: bytes) -> bytes | None:
    """The data of one event (its lines split on ``\\n``): its ``data`` lines' values, each
    without one leading space, joined by ``\\n``; None when it has no ``data`` line (a comment,
    or ``event:``/``id:``/``retry:`` lines only). A bare ``data`` line is an empty value."""
    head, named, last = event.rpartition(b"\ndata:")
    if named and b"\n" not in last and b"data" not in head:  # the usual named event: its last line is data
        return last[1:] if last[:1] == b" " else last
    values = [line[5:] if line[:5] == b"data:" else b"" for line in event.split(b"\n")
              if line[:5] == b"data:" or line == b"data"]
    if not values:
        return None
    values = [v[1:] if v[:1] == b" " else v for v in values]
    return values[0] if len(values) == 1 else b"\n".join(values)


class EventSplitter:
    """Splits a byte stream on blank lines and hands each complete event (without its blank
    line) to *on_event*, which says whether it is the stream's final event. The final event is
    held back (``held``), with a ``[DONE]`` that comes after it in the same read; any other event
    a provider sends after it is neither handed on nor forwarded (a later read is drained unread
    by the forward stage), so what follows the end never reaches the client or the record."""

    __slots__ = ("_buf", "_cr", "_head", "_max", "_on_event", "_on_oversized", "_skipping", "done", "held",
                 "open_end", "oversized")

    def __init__(self, on_event: Callable[[bytes], bool], max_event: int | None = None,
                 on_oversized: Callable[[bytes], bool] | None = None) -> None:
        """*on_oversized* is given the first bytes of an event longer than *max_event* when it
        ends, and says whether it was the final event (its ending newline is then held back)."""
        self._buf = b""
        self._max = max_event
        self._on_event = on_event
        self._on_oversized = on_oversized
        self._head = b""
        self._cr = False
        self._skipping = False
        self.done = False
        self.oversized = False
        self.held = b""
        """The final event(s) held back, as they came."""
        self.open_end = False
        """``held`` starts with the newline that ends an oversized final event, whose other bytes
        went out: the client's decoder holds that event open, so nothing but ``held`` may follow
        (bytes that arrive after it are held too, unparsed, up to ``max_event``)."""

    def feed(self, chunk: bytes) -> bytes:
        """The complete events of *chunk* as bytes to forward (a final event held back)."""
        if not chunk:
            return b""
        if self.open_end:  # nothing may go out before the open event's end: whatever follows waits too
            self._hold(chunk)
            return b""
        if self.done:  # past the final event: not the stream's, neither relayed nor read
            return b""
        if self._cr and chunk[:1] == b"\n":  # the LF of a CRLF cut between two chunks
            chunk = chunk[1:]
        self._cr = chunk[-1:] == b"\r"
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:  # CRLF or a lone CR ends a line too
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        skipped = b""
        if self._skipping:  # the rest of an oversized event: forwarded, not parsed
            end = buf.find(b"\n\n")
            if end < 0:
                self._buf = buf[-1:]
                self._keep_head(buf[:-1])
                return buf[:-1]
            skipped, buf = buf[: end + 2], buf[end + 2:]
            self._keep_head(skipped)
            self._skipping = False
            if self._on_oversized is not None and self._on_oversized(self._head):
                self.done = self.open_end = True
                self.held = skipped[-1:] + self.held  # the blank line's newline: what makes a client take it
                self._hold(buf)
                self._buf = b""
                return skipped[:-1]
        end = buf.rfind(b"\n\n")
        if end < 0:
            if self._max is not None and len(buf) > self._max:
                self._skipping = self.oversized = True
                self._head = b""
                self._keep_head(buf[:-1])
                self._buf = buf[-1:]
                return skipped + buf[:-1]
            self._buf = buf
            return skipped
        ready, self._buf = buf[: end + 2], buf[end + 2:]
        out, at = ready, 0
        for event in ready.split(b"\n\n"):
            if not event:
                pass
            elif self.done:  # after the final event only a [DONE] is the stream's (held with it)
                if (event_data(event) or b"").startswith(DONE):
                    self.held += event + b"\n\n"
            elif self._on_event(event):  # the final event: held back, and nothing after it goes out
                self.done = True
                self.held += event + b"\n\n"
                self._buf = b""
                out = ready[:at]
            at += len(event) + 2
        return skipped + out

    def _hold(self, data: bytes) -> None:
        """Hold *data* (bytes after an open final event) with it, up to ``max_event`` in all;
        what a provider sends past that after its final event is dropped."""
        room = (self._max if self._max is not None else len(data)) - len(self.held)
        if room > 0:
            self.held += data[:room]

    def _keep_head(self, forwarded: bytes) -> None:
        """Keep the first ``HEAD_BYTES`` of the oversized event being forwarded."""
        if len(self._head) < HEAD_BYTES:
            self._head += forwarded[: HEAD_BYTES - len(self._head)]


def _text(value: object) -> str:
    """*value* when it is a string; ``TypeError`` otherwise (the event cannot be recorded)."""
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


def part_text(parts: list[Any]) -> str:
    """The text of a list of content parts (``{"type": "text", "text": ...}``, or strings) as
    some OpenAI-compatible providers send a reply's content; ``TypeError`` for anything else."""
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") in ("text", "output_text") \
                and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise TypeError("not a text part")
    return "".join(texts)


def assistant_message(texts: list[str], calls: list[dict[str, Any]]) -> dict[str, Any]:
    """The neutral assistant message of a reply: its texts joined (None without any) and, when
    there are any, its tool calls (Chat's ``tool_calls`` form). Every codec's reply ends here."""
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        msg["tool_calls"] = calls
    return msg


class EventAssembler:
    """Base of the per-protocol reply assemblers (Chat's below, Responses' and Messages' in
    ``gateway.codecs``): counts event bytes against ``max_bytes`` (``truncated`` once past it) and
    hands each event whose data (:func:`event_data`) is a JSON object to :meth:`on_event`;
    anything else is skipped. An event too long to parse reaches :meth:`on_event` as its type
    alone (``{"type": ...}``, see :meth:`add_oversized`) when that type is in ``final_types``."""

    final_types: ClassVar[frozenset[str]] = frozenset()
    """The types of the protocol's final JSON events (none for Chat, whose stream ends with ``[DONE]``)."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self._room = max_bytes
        self.truncated = False
        self.last_seq: int | None = None
        """The ``sequence_number`` of the last event that had one (Responses numbers its events)."""
        self.errored = False
        """The last event parsed was the provider's error event (``"type": "error"``, or an
        ``error`` member without ``choices`` as OpenAI-compatible Chat streams send one)."""

    def add_event(self, event: bytes) -> bool:
        """Take one complete event; True when it is the stream's final event: ``[DONE]``, or
        one :meth:`on_event` calls final."""
        if self._room is not None:
            self._room -= len(event)
            if self._room < 0:
                self.truncated = True
        if event[:5] == b"data:" and b"\n" not in event:  # the usual event: one data line
            data: bytes | None = event[6:] if event[5:6] == b" " else event[5:]
        else:
            data = event_data(event)
        if not data:
            return False
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            return data.startswith(DONE)  # as the openai SDK reads it
        if not isinstance(parsed, dict):
            return False
        self.errored = parsed.get("type") == "error" or ("error" in parsed and "choices" not in parsed)
        try:
            return self.on_event(parsed)
        except (AttributeError, TypeError, KeyError, ValueError):  # a member of a type the protocol never sends
            self.truncated = True  # the client got this event and the record cannot hold it: incomplete
            log.warning("upstream_event_unreadable", protocol=type(self).__name__)
            return False

    def add_oversized(self, head: bytes) -> bool:
        """Take an event too long to parse, by its first bytes: the reply is ``truncated``; True
        when its type (:func:`head_type`) is one of ``final_types``."""
        self.truncated = True
        kind = head_type(head)
        return kind in self.final_types and self.on_event({"type": kind})

    def on_event(self, event: dict[str, Any]) -> bool:
        """Take one parsed event; True when it is the protocol's final event."""
        raise NotImplementedError


class ReplyAssembler(EventAssembler):
    """Builds the assistant message of choice 0 from ``chat.completion.chunk`` events."""

    def __init__(self, max_bytes: int | None = None) -> None:
        super().__init__(max_bytes)
        self.content: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.model: str | None = None
        self.id: str | None = None
        self.refusal: list[str] = []
        self.transcript: list[str] = []

    def on_event(self, chunk: dict[str, Any]) -> bool:
        """Chat has no final JSON event: its stream ends with ``[DONE]``."""
        self.id = self.id or chunk.get("id")
        self.model = self.model or chunk.get("model")
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
            if self.truncated:
                continue
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if isinstance(content, list):  # content parts, as some compatible providers stream them
                content = part_text(content)
            if content:
                self.content.append(_text(content))
            if delta.get("refusal"):
                self.refusal.append(_text(delta["refusal"]))
            audio = delta.get("audio")
            if isinstance(audio, dict) and isinstance(audio.get("transcript"), str):
                self.transcript.append(audio["transcript"])  # the audio itself is not kept
            for call in delta.get("tool_calls") or ():
                if call.get("type") == "custom" or "custom" in call:  # a free-text custom tool's call
                    slot = self.tool_calls.setdefault(call.get("index", 0), {
                        "id": None, "type": "custom", "custom": {"name": "", "input": ""}})
                    spec = call.get("custom") or {}
                    for key in ("name", "input"):
                        if spec.get(key):
                            slot.setdefault("custom", {"name": "", "input": ""})[key] += _text(spec[key])
                    if call.get("id"):
                        slot["id"] = call["id"]
                    continue
                slot = self.tool_calls.setdefault(call.get("index", 0), {
                    "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                if call.get("id"):
                    slot["id"] = call["id"]
                fn = call.get("function") or {}
                if fn.get("name"):
                    slot["function"]["name"] += _text(fn["name"])
                if fn.get("arguments"):
                    slot["function"]["arguments"] += _text(fn["arguments"])
        return False

    def message(self) -> dict[str, Any]:
        msg = assistant_message(self.content, [self.tool_calls[i] for i in sorted(self.tool_calls)])
        if self.refusal:
            msg["refusal"] = "".join(self.refusal)
        if self.transcript:
            msg["audio"] = {"transcript": "".join(self.transcript)}
        return msg

    def response(self) -> dict[str, Any]:
        """The stream as one ``chat.completion`` body (what JSONPath reply keys address)."""
        return {"id": self.id, "object": "chat.completion", "model": self.model,
                "choices": [{"index": 0, "message": self.message(), "finish_reason": self.finish_reason}],
                "usage": self.usage}
