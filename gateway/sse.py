"""Server-sent events from an OpenAI-compatible stream: cut into events, assembled into a reply.

``EventSplitter.feed(chunk)`` returns the bytes of the complete events in *chunk* (to forward
at once, unchanged) and holds back a trailing partial event and the final ``data: [DONE]``,
which the gateway sends only after the round is committed. ``ReplyAssembler`` decodes the
``data:`` JSON of each event once and builds the assistant message the stream amounts to.
Other protocols (Responses, Messages) end their streams with a final event of their own: an
``is_final`` predicate makes the splitter hold that event back (in ``held``) the same way, and
their assemblers live with their codecs (``gateway.codecs``).

Bounds: ``EventSplitter(max_event=N)`` never holds more than about N bytes of one event: a
longer event is forwarded as it arrives (``oversized`` is set) and is not parsed.
``ReplyAssembler(max_bytes=N)`` keeps the text of events up to N bytes of event data; past it,
text is dropped, ``truncated`` is set, and only the small fields (finish reason, usage, id,
model) are still taken from later events.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

DONE = b"data: [DONE]"


class EventSplitter:
    """Splits a byte stream on blank lines; remembers whether ``[DONE]`` arrived."""

    __slots__ = ("_buf", "_final", "_max", "_skipping", "done", "events", "held", "oversized")

    def __init__(self, max_event: int | None = None, is_final: Callable[[bytes], bool] | None = None) -> None:
        self._buf = b""
        self._max = max_event
        self._final = is_final
        self._skipping = False
        self.done = False
        self.oversized = False
        self.events: list[bytes] = []
        self.held = b""
        """The final event(s) held back (``is_final``; Chat's ``[DONE]`` by default)."""

    def feed(self, chunk: bytes) -> bytes:
        """Complete events of *chunk* as bytes to forward; their payloads go to ``events``."""
        buf = self._buf + chunk if self._buf else chunk
        if b"\r\n" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        skipped = b""
        if self._skipping:  # the rest of an oversized event: forwarded, not parsed
            end = buf.find(b"\n\n")
            if end < 0:
                self._buf = buf[-1:]
                return buf[:-1]
            skipped, buf = buf[: end + 2], buf[end + 2:]
            self._skipping = False
        end = buf.rfind(b"\n\n")
        if end < 0:
            if self._max is not None and len(buf) > self._max:
                self._skipping = self.oversized = True
                self._buf = buf[-1:]
                return skipped + buf[:-1]
            self._buf = buf
            return skipped
        ready, self._buf = buf[: end + 2], buf[end + 2:]
        out = ready
        for event in ready.split(b"\n\n"):
            if not event:
                continue
            if event.startswith(DONE):
                self.done = True
                self.held = DONE + b"\n\n"
                out = out.replace(DONE + b"\n\n", b"")
                continue
            if self._final is not None and self._final(event):
                self.done = True
                self.held += event + b"\n\n"
                out = out.replace(event + b"\n\n", b"", 1)
            self.events.append(event)
        return skipped + out


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
    hands each ``data:`` line that holds a JSON object to :meth:`on_event`; anything else is
    skipped."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self._room = max_bytes
        self.truncated = False

    def add_events(self, events: list[bytes]) -> None:
        for event in events:
            if self._room is not None:
                self._room -= len(event)
                if self._room < 0:
                    self.truncated = True
            if b"\n" not in event:  # the usual event: one data line, no list to split into
                if event.startswith(b"data:"):
                    self._add(event[5:].strip())
                continue
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    self._add(line[5:].strip())

    def _add(self, data: bytes) -> None:
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if isinstance(event, dict):
            self.on_event(event)

    def on_event(self, event: dict[str, Any]) -> None:
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

    def on_event(self, chunk: dict[str, Any]) -> None:
        self.id = self.id or chunk.get("id")
        self.model = self.model or chunk.get("model")
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            if self.truncated:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.content.append(delta["content"])
            if delta.get("refusal"):
                self.refusal.append(delta["refusal"])
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
                            slot.setdefault("custom", {"name": "", "input": ""})[key] += spec[key]
                    if call.get("id"):
                        slot["id"] = call["id"]
                    continue
                slot = self.tool_calls.setdefault(call.get("index", 0), {
                    "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                if call.get("id"):
                    slot["id"] = call["id"]
                fn = call.get("function") or {}
                if fn.get("name"):
                    slot["function"]["name"] += fn["name"]
                if fn.get("arguments"):
                    slot["function"]["arguments"] += fn["arguments"]

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
