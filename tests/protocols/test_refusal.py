"""A model's refusal (Chat Completions' ``message.refusal``, content null) is the reply the client
was shown, so a ``null``-keys record holds it as the assistant message, JSON and streamed; the
round used to record no assistant message at all."""

from __future__ import annotations

import pytest

from tests.conftest import Gateway, Upstream
from tests.protocols.conftest import anthropic_client
from tests.protocols.upstream import ProtocolUpstream

REFUSAL = "I can't help with that. CANARY-refusal-2718"


@pytest.mark.parametrize("stream", [False, True])
def test_a_refusal_is_recorded_as_the_reply(gateway: Gateway, upstream: Upstream, stream: bool) -> None:
    upstream.reply = lambda body: {"role": "assistant", "content": None, "refusal": REFUSAL}
    client = gateway.openai(session=f"refused-{stream}")
    if stream:
        chunks = list(client.chat.completions.create(model="m", stream=True,
                                                     messages=[{"role": "user", "content": "do it"}]))
        assert "".join(c.choices[0].delta.refusal or "" for c in chunks if c.choices) == REFUSAL
    else:
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "do it"}])
        assert reply.choices[0].message.refusal == REFUSAL
    full = client.get(f"/sessions/refused-{stream}", cast_to=object)["full_context"]
    assert full == [{"role": "user", "content": "do it"}, {"role": "assistant", "content": REFUSAL}]


def test_a_responses_refusal_is_the_reply_message() -> None:
    """Responses: a ``refusal`` content part (JSON) and ``response.refusal.delta`` events (stream)
    make the recorded reply, as ``output_text`` does."""
    from gateway.codecs.responses import ResponsesAssembler, reply_message

    body = {"output": [{"type": "message", "role": "assistant", "content": [{"type": "refusal", "refusal": REFUSAL}]}]}
    assert reply_message(body)["content"] == REFUSAL
    assembler = ResponsesAssembler()
    for piece in ("I can't help with that.", " CANARY-refusal-2718"):
        assembler.on_event({"type": "response.refusal.delta", "item_id": "m", "output_index": 0,
                            "content_index": 0, "delta": piece})
    assert assembler.message()["content"] == REFUSAL


def test_an_audio_reply_is_recorded_as_its_transcript(gateway: Gateway, upstream: Upstream) -> None:
    """An audio reply (``modalities: ["text", "audio"]``) has no content: its transcript is what
    the record holds as the reply; the audio itself is never stored."""
    audio = {"id": "audio_1", "data": "QVVESU8tQllURVMtOTkx", "expires_at": 1, "transcript": "Hello there, CANARY-t-31"}
    upstream.reply = lambda body: {"role": "assistant", "content": None, "audio": audio}
    client = gateway.openai(session="spoken")
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "say hi"}])
    full = client.get("/sessions/spoken", cast_to=object)["full_context"]
    assert full[1] == {"role": "assistant", "content": "Hello there, CANARY-t-31"}
    assert b"QVVESU8tQllURVMtOTkx" not in gateway.stored_bytes()


def test_a_streamed_audio_reply_keeps_its_transcript_only() -> None:
    from gateway.sse import ReplyAssembler

    assembler = ReplyAssembler()
    for delta in ({"audio": {"id": "a1", "transcript": "Hel", "data": "AAAA"}}, {"audio": {"transcript": "lo"}},
                  {"audio": {"data": "BBBB"}}):
        assembler.on_event({"id": "c1", "choices": [{"index": 0, "delta": delta}]})
    assert assembler.message()["audio"] == {"transcript": "Hello"}


@pytest.mark.parametrize("stream", [False, True])
def test_an_anthropic_refusal_is_recorded_and_kept_out_of_the_window(pgw: Gateway, proto: ProtocolUpstream,
                                                                      stream: bool) -> None:
    """Anthropic's ``stop_reason: "refusal"``: the round is recorded (history, audit entry marked
    ``refusal``), but the turn stays out of the window, as Anthropic asks ("reset the conversation
    context ... or the refusals continue"); the window used to send it back on every later turn."""
    client = anthropic_client(pgw, session=f"refusal-{stream}")
    ask = {"max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    client.messages.create(model="claude-test", **ask)  # type: ignore[arg-type]
    refused = {**ask, "model": "claude-refuses", "messages": [{"role": "user", "content": "do it"}]}
    if stream:
        with client.messages.stream(**refused) as s:  # type: ignore[arg-type]
            assert s.get_final_message().stop_reason == "refusal"
    else:
        assert client.messages.create(**refused).stop_reason == "refusal"  # type: ignore[arg-type]
    client.messages.create(model="claude-test", **{**ask, "messages": [{"role": "user", "content": "next"}]})
    assert proto.bodies("/v1/messages")[-1]["messages"] == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "messages says: hi"},
        {"role": "user", "content": "next"}]
    full = pgw.openai().get(f"/sessions/refusal-{stream}", cast_to=object)["full_context"]
    assert [m["content"] for m in full] == ["hi", "messages says: hi", "do it", "messages says: do it",
                                            "next", "messages says: next"]
    rounds = [e for e in pgw.audit_entries() if e.get("event") == "round"
              and e.get("session_id") == f"refusal-{stream}"]
    assert [(e.get("detail") or {}).get("refusal", False) for e in rounds] == [False, True, False]
