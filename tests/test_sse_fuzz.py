"""The gateway reads an event stream as the ``openai`` SDK does, whatever legal framing and chunking
a provider uses: a bounded property test with the SDK's own SSE decoder as the oracle.

Each example frames a random list of JSON events (and a final ``[DONE]``) with a random choice per
event: data on one line or spread over several ``data:`` lines, with or without the space after
the colon, comment, ``id:``, ``event:`` and ``retry:`` lines around it, lines ended by LF, CRLF or
a lone CR. The bytes are cut at random points, half of them just after a CR (inside a CRLF, where
a reader could see two line ends). Then:

- the events the gateway's assembler parses are the events the SDK decodes, in order;
- the gateway sees the end of the stream exactly when the SDK does;
- the bytes the gateway relays (what it forwards at once, then what it held back) decode, in the
  SDK, to the same events: nothing the client would read is lost, reordered or added.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder

from gateway.sse import EventAssembler, EventSplitter

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
PAYLOAD = st.fixed_dictionaries({"id": st.integers(0, 10**6), "text": TEXT,
                                 "nested": st.lists(st.dictionaries(st.sampled_from("abc"), TEXT, max_size=2),
                                                    max_size=2)})
FRAMING = st.fixed_dictionaries({
    "multiline": st.booleans(), "space": st.booleans(), "comment": st.booleans(), "id": st.booleans(),
    "name": st.booleans(), "retry": st.booleans(), "eol": st.sampled_from(["\n", "\r\n", "\r"])})


class Recorder(EventAssembler):
    """An assembler that keeps every parsed event (the base class decides what is final)."""

    def __init__(self) -> None:
        super().__init__(None)
        self.seen: list[dict[str, Any]] = []

    def on_event(self, event: dict[str, Any]) -> bool:
        self.seen.append(event)
        return False


def frame(data: str, how: dict[str, Any]) -> bytes:
    eol, sep = how["eol"], ": " if how["space"] else ":"
    lines = []
    if how["comment"]:
        lines.append(": keep-alive")
    if how["id"]:
        lines.append("id: 7")
    if how["name"]:
        lines.append("event: message")
    if how["retry"]:
        lines.append("retry: 1000")
    if how["multiline"] and data != "[DONE]":
        body = json.dumps(json.loads(data), indent=1, ensure_ascii=False).split("\n")
    else:
        body = [data]
    lines += [f"data{sep}{part}" for part in body]
    return (eol.join(lines) + eol + eol).encode()


def sdk_events(chunks: list[bytes]) -> tuple[list[Any], bool]:
    """The JSON events and whether ``[DONE]`` came, as the openai SDK's decoder reads *chunks*."""
    events, done = [], False
    for sse in SSEDecoder().iter_bytes(iter(chunks)):
        if sse.data.startswith("[DONE]"):
            done = True
            break
        if sse.data:
            events.append(json.loads(sse.data))
    return events, done


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(payloads=st.lists(PAYLOAD, min_size=1, max_size=5), framings=st.data(), cuts=st.data())
def test_the_gateway_reads_and_relays_a_stream_as_the_sdk_reads_it(payloads: list[dict[str, Any]],
                                                                   framings: st.DataObject,
                                                                   cuts: st.DataObject) -> None:
    datas = [orjson.dumps(p).decode() for p in payloads] + ["[DONE]"]
    stream = b"".join(frame(d, framings.draw(FRAMING)) for d in datas)
    after_cr = [i + 1 for i, byte in enumerate(stream[:-1]) if byte == 0x0D]  # cuts inside a CRLF, mostly
    anywhere = st.integers(1, len(stream) - 1)
    points = sorted(cuts.draw(st.sets(st.one_of(anywhere, st.sampled_from(after_cr)) if after_cr else anywhere,
                                      max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]

    expected, sdk_done = sdk_events(chunks)
    assert expected == payloads and sdk_done  # the oracle reads what was framed

    recorder = Recorder()
    splitter = EventSplitter(recorder.add_event)
    relayed = b"".join(splitter.feed(chunk) for chunk in chunks)
    assert recorder.seen == expected
    assert splitter.done is sdk_done
    assert sdk_events([relayed + splitter.held]) == (expected, True)


class FinalRecorder(Recorder):
    """A protocol whose JSON event of type ``final`` ends the stream (as Responses' do)."""

    final_types = frozenset({"final"})

    def on_event(self, event: dict[str, Any]) -> bool:
        self.seen.append(event)
        return event.get("type") == "final"


def sdk_json_events(data: bytes) -> list[Any]:
    """The JSON events the openai SDK's decoder reads from *data* (an unended event is dropped)."""
    return [json.loads(sse.data) for sse in SSEDecoder().iter_bytes(iter([data])) if sse.data]


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(payloads=st.lists(PAYLOAD, min_size=1, max_size=4), last=PAYLOAD, framings=st.data(), cuts=st.data(),
       max_event=st.integers(24, 160))
def test_events_longer_than_the_cap_are_relayed_and_a_final_one_still_ends_after_the_commit(
        payloads: list[dict[str, Any]], last: dict[str, Any], framings: st.DataObject, cuts: st.DataObject,
        max_event: int) -> None:
    """With a small ``max_event`` some events (the final one too) are relayed unparsed as they
    arrive: the client still reads every event, in order, once; the stream still ends; and the
    final event is never whole in what goes out before the commit, only with what is held back."""
    events = [{"type": "delta", **p} for p in payloads] + [{"type": "final", **last}]
    # an event: line, when there is one, names the final event as the provider would
    stream = b"".join(frame(orjson.dumps(e).decode(), framings.draw(FRAMING)).replace(
        b"event: message", b"event: " + e["type"].encode()) for e in events)
    points = sorted(cuts.draw(st.sets(st.integers(1, len(stream) - 1), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]

    recorder = FinalRecorder()
    splitter = EventSplitter(recorder.add_event, max_event=max_event, on_oversized=recorder.add_oversized)
    relayed = b"".join(splitter.feed(chunk) for chunk in chunks)
    assert splitter.done and splitter.held
    assert sdk_json_events(relayed + splitter.held) == events
    assert sdk_json_events(relayed) == events[:-1]
    assert all(e in events or e == {"type": "final"} for e in recorder.seen)  # an oversized final: its type alone
