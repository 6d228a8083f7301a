"""SSE handling: events forwarded unchanged as they complete, [DONE] held back, reply assembled."""

from __future__ import annotations

import orjson

from gateway.sse import EventSplitter, ReplyAssembler


def event(data: dict) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def chunk(content: str | None = None, finish: str | None = None, tool: dict | None = None) -> bytes:
    delta: dict = {}
    if content is not None:
        delta["content"] = content
    if tool is not None:
        delta["tool_calls"] = [tool]
    return event({"id": "c1", "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def test_splitter_forwards_complete_events_and_holds_partial_and_done() -> None:
    """Complete events pass through byte for byte; a partial event and [DONE] are held back."""
    s = EventSplitter()
    a, b = chunk("Hel"), chunk("lo", finish="stop")
    assert s.feed(a + b[:10]) == a
    assert s.feed(b[10:] + b"data: [DONE]\n\n") == b
    assert s.done and len(s.events) == 2


def test_assembler_builds_text_and_tool_calls() -> None:
    """The assembled message has the concatenated text and the merged tool-call deltas."""
    asm = ReplyAssembler()
    asm.add_events([c.strip() for c in (
        chunk("Hel"), chunk("lo"),
        chunk(tool={"index": 0, "id": "t1", "function": {"name": "look", "arguments": "{\"q\":"}}),
        chunk(tool={"index": 0, "function": {"arguments": " 1}"}}, finish="tool_calls"))])
    message = asm.message()
    assert message["content"] == "Hello"
    assert message["tool_calls"][0]["function"] == {"name": "look", "arguments": "{\"q\": 1}"}
    assert asm.finish_reason == "tool_calls" and asm.response()["choices"][0]["message"] == message


def test_assembler_builds_a_custom_tool_call() -> None:
    """A streamed custom tool call (``type: custom``, free-text ``input`` in pieces) is assembled as
    one; it was taken for a function call and its input lost."""
    asm = ReplyAssembler()
    asm.add_events([c.strip() for c in (
        chunk(tool={"index": 0, "id": "c1", "type": "custom", "custom": {"name": "apply_patch", "input": "*** Begin"}}),
        chunk(tool={"index": 0, "custom": {"input": " Patch"}}, finish="tool_calls"))])
    assert asm.message()["tool_calls"] == [
        {"id": "c1", "type": "custom", "custom": {"name": "apply_patch", "input": "*** Begin Patch"}}]


def test_splitter_accepts_crlf_event_boundaries() -> None:
    """Events separated by CRLF blank lines are recognised too."""
    s = EventSplitter()
    out = s.feed(b'data: {"choices": []}\r\n\r\ndata: [DONE]\r\n\r\n')
    assert out == b'data: {"choices": []}\n\n' and s.done
