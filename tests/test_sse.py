"""SSE handling: events forwarded unchanged as they complete, [DONE] held back, reply assembled."""

from __future__ import annotations

import orjson
import pytest

from gateway.codecs.responses import ResponsesAssembler
from gateway.sse import EventSplitter, ReplyAssembler, event_data


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
    asm = ReplyAssembler()
    s = EventSplitter(asm.add_event)
    a, b = chunk("Hel"), chunk("lo", finish="stop")
    assert s.feed(a + b[:10]) == a
    assert s.feed(b[10:] + b"data: [DONE]\n\n") == b
    assert s.done and s.held == b"data: [DONE]\n\n" and asm.message()["content"] == "Hello"


def test_assembler_builds_text_and_tool_calls() -> None:
    """The assembled message has the concatenated text and the merged tool-call deltas."""
    asm = ReplyAssembler()
    for c in (chunk("Hel"), chunk("lo"),
              chunk(tool={"index": 0, "id": "t1", "function": {"name": "look", "arguments": "{\"q\":"}}),
              chunk(tool={"index": 0, "function": {"arguments": " 1}"}}, finish="tool_calls")):
        assert asm.add_event(c.strip()) is False
    message = asm.message()
    assert message["content"] == "Hello"
    assert message["tool_calls"][0]["function"] == {"name": "look", "arguments": "{\"q\": 1}"}
    assert asm.finish_reason == "tool_calls" and asm.response()["choices"][0]["message"] == message


def test_assembler_builds_a_custom_tool_call() -> None:
    """A streamed custom tool call (``type: custom``, free-text ``input`` in pieces) is assembled as
    one; it was taken for a function call and its input lost."""
    asm = ReplyAssembler()
    start = {"index": 0, "id": "c1", "type": "custom", "custom": {"name": "apply_patch", "input": "*** Begin"}}
    for c in (chunk(tool=start), chunk(tool={"index": 0, "custom": {"input": " Patch"}}, finish="tool_calls")):
        asm.add_event(c.strip())
    assert asm.message()["tool_calls"] == [
        {"id": "c1", "type": "custom", "custom": {"name": "apply_patch", "input": "*** Begin Patch"}}]


def test_splitter_accepts_crlf_event_boundaries() -> None:
    """Events separated by CRLF blank lines are recognised too."""
    s = EventSplitter(ReplyAssembler().add_event)
    out = s.feed(b'data: {"choices": []}\r\n\r\ndata: [DONE]\r\n\r\n')
    assert out == b'data: {"choices": []}\n\n' and s.done


def test_event_data_reads_an_event_as_the_sse_format_defines() -> None:
    """Data lines joined by newlines, one leading space dropped from each; other fields and
    comments ignored; a bare ``data`` line is an empty value; no data line at all is None."""
    assert event_data(b'data: {"a":') == b'{"a":'
    assert event_data(b'data:{"a": 1}') == b'{"a": 1}'
    assert event_data(b'data:  two spaces') == b" two spaces"
    assert event_data(b": comment\nid: 3\nevent: x\ndata: {\ndata\ndata: }") == b"{\n\n}"
    assert event_data(b'event: x\ndata: {"a": 1}') == b'{"a": 1}'
    assert event_data(b"data: 1\nevent: data\ndata: 2") == b"1\n2"
    assert event_data(b"event: data\ndata:x") == b"x"
    assert event_data(b"event: ping\nretry: 10") is None
    assert event_data(b"datum: no") is None


def test_done_is_read_from_the_data_not_the_first_bytes() -> None:
    """As the ``openai`` SDK reads it: the event's data starts with ``[DONE]``."""
    for done in (b"data:[DONE]", b"id: 9\ndata: [DONE]", b"data: [DONE]", b": ping\ndata: [DONE]"):
        assert ReplyAssembler().add_event(done), done
    for other in (b'data: {"choices": [{"delta": {"content": "data: [DONE]"}}]}', b": [DONE]", b"data:  [DONE]"):
        assert not ReplyAssembler().add_event(other), other


def test_a_final_type_counts_only_at_the_top_of_the_events_data() -> None:
    """A name inside the data (a request's metadata echoed back) is not the event's type."""
    echo = orjson.dumps({"type": "response.created", "response": {"metadata": {"type": "response.completed"}}})
    assert not ResponsesAssembler().add_event(b"data: " + echo)
    assert not ResponsesAssembler().add_event(b"event: response.completed\ndata: " + echo)
    assert ResponsesAssembler().add_event(b'event: x\ndata: {"type": "response.completed", "response": {}}')
    assert ResponsesAssembler().add_event(b'data:{"type":"response.failed",\ndata: "response": {}}')


def test_a_done_after_a_protocols_final_event_is_held_with_it() -> None:
    """Both held events go out, in order; a ``[DONE]`` used to replace what was held before it."""
    s = EventSplitter(ResponsesAssembler().add_event)
    final = b'data: {"type":"response.completed","response":{}}\n\n'
    assert s.feed(b'data: {"type":"response.created"}\n\n' + final + b"data:[DONE]\n\n") == \
        b'data: {"type":"response.created"}\n\n'
    assert s.done and s.held == final + b"data:[DONE]\n\n"


def test_splitter_accepts_lone_cr_line_endings_even_split_across_chunks() -> None:
    """The SSE format ends lines with LF, CRLF or a lone CR; a CRLF cut between two chunks is one
    line ending, not two."""
    asm = ReplyAssembler()
    s = EventSplitter(asm.add_event)
    stream = b'data: {"choices": [{"delta": {"content": "Hi"}}]}\r\r' + b'id: 1\r\ndata: {"choices": []}\r\n\r\n'
    out = (s.feed(stream[:51]) + s.feed(stream[51:-3]) + s.feed(b"")  # an empty read between CR and LF
           + s.feed(stream[-3:-2]) + s.feed(stream[-2:] + b"data:[DONE]\r\r"))
    assert out == b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\nid: 1\ndata: {"choices": []}\n\n'
    assert s.done and asm.message()["content"] == "Hi"


def test_a_crlf_inside_an_event_cut_by_an_empty_read_is_one_line_end() -> None:
    """JSON over two data lines whose CRLF is cut, with an empty read between CR and LF: still one
    event (two line ends there would end the event early and lose it)."""
    asm = ReplyAssembler()
    s = EventSplitter(asm.add_event)
    parts = [b'data: {"choices": [{"delta":\r', b"", b'\ndata: {"content": "Hi"}}]}\r\n\r\n']
    assert b"".join(s.feed(p) for p in parts) == b'data: {"choices": [{"delta":\ndata: {"content": "Hi"}}]}\n\n'
    assert asm.message()["content"] == "Hi"


def test_events_after_the_final_event_go_nowhere() -> None:
    """An event a provider sends after ``[DONE]`` in the same read went out before the held
    ``[DONE]`` and into the record (in a later read it was dropped): it goes nowhere now."""
    asm = ReplyAssembler()
    s = EventSplitter(asm.add_event)
    first = b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n'
    after = b'data: {"choices": [{"delta": {"content": " EXTRA"}}]}\n\n'
    assert s.feed(first + b"data: [DONE]\n\n" + after + b"data: [DONE]\n\n") == first
    assert s.done and s.held == b"data: [DONE]\n\ndata: [DONE]\n\n"
    assert s.feed(after) == b"" and asm.message()["content"] == "Hi"


@pytest.mark.parametrize("event", [
    b'{"choices": "abc"}', b'{"choices": [5]}', b'{"choices": [{"delta": "str"}]}',
    b'{"choices": [{"delta": {"content": 5}}]}', b'{"choices": [{"delta": {"refusal": ["x"]}}]}',
    b'{"choices": [{"delta": {"tool_calls": [{"function": {"name": 7}}]}}]}',
    b'{"choices": [{"delta": {"tool_calls": "zz"}}]}'])
def test_an_event_of_types_chat_never_sends_ends_the_record_not_the_stream(event: bytes) -> None:
    """Such an event raised out of the relay (the client got ``internal_error`` and lost what
    came in the same read). The events still go out; the record stops there, truncated."""
    asm = ReplyAssembler()
    s = EventSplitter(asm.add_event)
    first = b'data: {"choices": [{"delta": {"content": "ok "}}]}\n\n'
    last = b'data: {"choices": [{"delta": {"content": "more"}}]}\n\n'
    assert s.feed(first + b"data: " + event + b"\n\n" + last + b"data: [DONE]\n\n") == \
        first + b"data: " + event + b"\n\n" + last
    assert s.done and asm.truncated and asm.message()["content"] == "ok "


def test_content_streamed_as_parts_is_recorded_as_its_text() -> None:
    """Some OpenAI-compatible providers stream ``delta.content`` as a list of text parts."""
    asm = ReplyAssembler()
    s = EventSplitter(asm.add_event)
    s.feed(b'data: {"choices": [{"delta": {"content": [{"type": "text", "text": "Hel"}, "lo"]}}]}\n\n'
           b"data: [DONE]\n\n")
    assert asm.message()["content"] == "Hello" and not asm.truncated
