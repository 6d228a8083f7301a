"""The stand-in model speaks the OpenAI wire format: the real ``openai`` SDK is the client."""

from __future__ import annotations

import asyncio
import json
import math
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.standin import default_reply, run_standin, sample_json, standin_thread

AGENTLY_PROMPT = (
    "[INFO]:\n- task: Summarize #0\n\n[INSTRUCT]:\nbe brief\n\n[INPUT]:\nlang: en\nnoise: ignored\n\n\n"
    "[OUTPUT REQUIREMENT]:\nData Format: JSON\nData Structure:\n{\n  \"summary\": <str>,\n"
    "  \"scores\": {\n    \"total\": <int>\n  }\n}\n\n[OUTPUT]:"
)


@pytest.fixture(scope="module")
def seen() -> list[dict[str, Any]]:
    return []


@pytest.fixture(scope="module")
def base_url(seen: list[dict[str, Any]]) -> Iterator[str]:
    with standin_thread(chunks=7, on_request=seen.append) as url:
        yield url


def client(url: str, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, **kw)


def ask(text: str = "hello stand-in") -> list[Any]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


def test_json_completion_parses_with_the_sdk(base_url: str) -> None:
    """A non-streamed reply is a chat.completion carrying the deterministic default text."""
    reply = client(base_url).chat.completions.create(model="standin", messages=ask())
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == (
        "[sessiongate stand-in model] I received 2 messages; your last message was: hello stand-in"
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.total_tokens > 0


def test_stream_parses_with_the_sdk(base_url: str) -> None:
    """A streamed reply is a role chunk, `chunks` content pieces and a finish chunk, without usage."""
    stream = client(base_url).chat.completions.create(model="standin", messages=ask(), stream=True)
    events = list(stream)
    assert events[0].choices[0].delta.role == "assistant"
    pieces = [e.choices[0].delta.content for e in events[1:] if e.choices and e.choices[0].delta.content]
    assert len(pieces) == 7
    assert "".join(pieces) == default_reply({"model": "standin", "messages": ask()})
    assert events[-1].choices[0].finish_reason == "stop"
    assert all(e.usage is None for e in events)


def test_stream_include_usage_adds_a_usage_chunk(base_url: str) -> None:
    """With stream_options.include_usage the last event has no choices and carries usage."""
    stream = client(base_url).chat.completions.create(
        model="standin", messages=ask(), stream=True, stream_options={"include_usage": True})
    events = list(stream)
    assert events[-1].choices == []
    assert events[-1].usage is not None and events[-1].usage.completion_tokens > 0
    assert events[-2].choices[0].finish_reason == "stop"


def test_on_request_sees_the_parsed_body(base_url: str, seen: list[dict[str, Any]]) -> None:
    """on_request receives the request body as sent, extra fields included."""
    client(base_url).chat.completions.create(model="standin", messages=ask("marker-42"),
                                             extra_body={"custom": {"k": 1}})
    assert seen[-1]["messages"][-1]["content"] == "marker-42"
    assert seen[-1]["custom"] == {"k": 1}


def test_agently_json_requirement_gets_a_json_reply(base_url: str) -> None:
    """An Agently JSON output requirement is answered with a fenced object of that structure."""
    reply = client(base_url).chat.completions.create(model="standin", messages=ask(AGENTLY_PROMPT))
    content = reply.choices[0].message.content or ""
    assert content.startswith("```json\n") and content.endswith("\n```")
    assert json.loads(content[8:-4]) == {"summary": "stand-in", "scores": {"total": 50}}


def test_standin_json_model_without_structure_wraps_the_text() -> None:
    """The standin-json model answers a plain prompt with {"reply": <text>} in a fence."""
    content = default_reply({"model": "standin-json", "messages": ask("plain")})
    assert json.loads(content[8:-4])["reply"].endswith("your last message was: plain")


def test_sample_json_reads_lists_comments_and_types() -> None:
    """Comments, `...` list tails and typed placeholders are turned into sample values."""
    prompt = ("[OUTPUT REQUIREMENT]:\nData Format: JSON\nData Structure:\n{\n"
              "  \"tags\": [\n    <str>, // one tag\n    ...\n  ],\n  \"ok\": <bool>,\n"
              "  \"ratio\": <float>, // between 0 and 1\n  \"n\": <int>\n}\n[OUTPUT]:")
    assert sample_json(prompt) == {"tags": ["stand-in"], "ok": True, "ratio": 0.5, "n": 50}


def test_unparsable_structure_falls_back_to_text() -> None:
    """A structure that does not parse gives the plain text reply."""
    prompt = "[OUTPUT REQUIREMENT]:\nData Format: JSON\nData Structure:\n{\n  broken\n}\n[OUTPUT]:"
    assert default_reply({"model": "standin", "messages": ask(prompt)}).startswith("[sessiongate stand-in")


def test_reply_callable_can_return_tool_calls() -> None:
    """A reply dict with tool_calls reaches the SDK whole, streamed or not."""
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\": 1}"}}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    with standin_thread(reply=lambda body: message) as url:
        sdk = client(url)
        reply = sdk.chat.completions.create(model="standin", messages=ask())
        events = list(sdk.chat.completions.create(model="standin", messages=ask(), stream=True))
    assert reply.choices[0].finish_reason == "tool_calls"
    assert reply.choices[0].message.model_dump()["tool_calls"][0]["function"]["name"] == "lookup"
    deltas = [d for e in events if e.choices for d in (e.choices[0].delta.tool_calls or [])]
    assert deltas[0].model_dump()["function"]["arguments"] == "{\"q\": 1}"
    assert events[-1].choices[0].finish_reason == "tool_calls"


def test_models_lists_both_models(base_url: str) -> None:
    """GET /v1/models lists standin and standin-json."""
    assert [m.id for m in client(base_url).models.list()] == ["standin", "standin-json"]


def test_embeddings_are_deterministic_unit_vectors(base_url: str) -> None:
    """Embeddings come back (base64, as the SDK asks) as the same unit vector for the same text."""
    sdk = client(base_url)
    first = sdk.embeddings.create(model="standin", input=["alpha", "beta"]).data
    again = sdk.embeddings.create(model="standin", input="alpha", encoding_format="float").data
    assert len(first) == 2 and len(first[0].embedding) == 8
    assert first[0].embedding == pytest.approx(again[0].embedding, abs=1e-6)
    assert first[0].embedding != first[1].embedding
    assert math.isclose(sum(x * x for x in again[0].embedding), 1.0, rel_tol=1e-6)


def test_unknown_route_is_an_openai_404(base_url: str) -> None:
    """Any other path answers 404 in OpenAI's error shape."""
    response = httpx.post(f"{base_url}/nothing-here", json={})
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_malformed_json_is_a_400(base_url: str) -> None:
    """A body that is not JSON answers 400 in OpenAI's error shape."""
    response = httpx.post(f"{base_url}/chat/completions", content=b"{nope",
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_fail_500(base_url: str) -> None:
    """X-Standin-Fail: 500 gives the SDK an InternalServerError with an OpenAI error body."""
    with pytest.raises(openai.InternalServerError) as caught:
        client(base_url).chat.completions.create(model="standin", messages=ask(),
                                                 extra_headers={"X-Standin-Fail": "500"})
    assert caught.value.status_code == 500
    assert isinstance(caught.value.body, dict) and caught.value.body["type"] == "server_error"


def test_fail_429(base_url: str) -> None:
    """X-Standin-Fail: 429 gives the SDK a RateLimitError with code rate_limit_exceeded."""
    with pytest.raises(openai.RateLimitError) as caught:
        client(base_url).chat.completions.create(model="standin", messages=ask(),
                                                 extra_headers={"X-Standin-Fail": "429"})
    assert caught.value.code == "rate_limit_exceeded"


def test_fail_timeout(base_url: str) -> None:
    """X-Standin-Fail: timeout holds the reply back until the client gives up."""
    with pytest.raises(openai.APITimeoutError):
        client(base_url, timeout=0.3).chat.completions.create(
            model="standin", messages=ask(), extra_headers={"X-Standin-Fail": "timeout"})


def test_fail_unknown_mode_is_a_400(base_url: str) -> None:
    """An unknown X-Standin-Fail value is refused with a 400 naming the valid modes."""
    with pytest.raises(openai.BadRequestError) as caught:
        client(base_url).chat.completions.create(model="standin", messages=ask(),
                                                 extra_headers={"X-Standin-Fail": "sometimes"})
    assert "drop-mid-stream" in caught.value.message


def test_fail_drop_mid_stream(base_url: str) -> None:
    """X-Standin-Fail: drop-mid-stream sends a few chunks, then the stream breaks without a finish."""
    stream = client(base_url).chat.completions.create(
        model="standin", messages=ask(), stream=True, extra_headers={"X-Standin-Fail": "drop-mid-stream"})
    events = []
    with pytest.raises(openai.APIConnectionError):
        for event in stream:
            events.append(event)
    assert 1 < len(events) < 7
    assert all(e.choices[0].finish_reason is None for e in events)


def test_fail_drop_mid_json(base_url: str) -> None:
    """X-Standin-Fail: drop-mid-stream on a JSON reply cuts the body short."""
    response = None
    with pytest.raises(httpx.RemoteProtocolError):
        response = httpx.post(f"{base_url}/chat/completions", json={"model": "standin", "messages": ask()},
                              headers={"X-Standin-Fail": "drop-mid-stream"})
    assert response is None


def test_the_stand_in_queues_a_burst_of_new_connections_beyond_aiohttps_default_backlog() -> None:
    """300 connections opened at once while the stand-in's loop accepts none: the kernel
    completes each handshake into the listen queue (a full queue drops the connection attempt,
    which then waits a second for its retry: what a gateway opening its upstream pool for a
    burst of clients hit with aiohttp's default of 128)."""
    loop = asyncio.new_event_loop()
    runner, port = loop.run_until_complete(run_standin())
    socks = [socket.socket() for _ in range(300)]
    try:
        for sock in socks:
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
        deadline = time.monotonic() + 2.0
        pending = set(socks)
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], list(pending), [], 0.1)
            pending -= {s for s in writable if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0}
        assert len(socks) - len(pending) == 300
    finally:
        for sock in socks:
            sock.close()
        loop.run_until_complete(runner.cleanup())
        loop.close()


# --- malformed fields are the protocol's 400, never a 500 ---------------------------------------

MALFORMED = [
    ("/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": 5}),
    ("/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}],
                           "response_format": {"type": "json_schema", "json_schema": 5}}),
    ("/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}],
                           "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"function": 5}}),
    ("/chat/completions", {"model": "m", "messages": [5]}),
    ("/responses", {"model": "m", "input": "x", "tools": 5}),
    ("/responses", {"model": "m", "input": "x", "text": {"format": 5}}),
    ("/messages", {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": 5}),
    ("/messages/count_tokens", {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [5]}),
    ("/embeddings", {"model": "m", "input": 5}),
]


def assert_protocol_error(path: str, resp: httpx.Response) -> None:
    assert resp.status_code == 400, (path, resp.status_code, resp.text)
    body = resp.json()
    if path.startswith("/messages"):
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    else:
        assert body["error"]["type"] == "invalid_request_error" and isinstance(body["error"]["message"], str)


@pytest.mark.parametrize(("path", "body"), MALFORMED, ids=[f"{p} {sorted(b)[-1]}" for p, b in MALFORMED])
def test_a_malformed_field_is_the_protocols_400(base_url: str, path: str, body: dict[str, Any]) -> None:
    """A field of the wrong JSON type (``tools: 5``, ``json_schema: 5``) gets the protocol's 400
    error, as from a real provider; it used to be a 500 with a traceback in the gateway's log."""
    assert_protocol_error(path, httpx.post(base_url + path, json=body, timeout=10))


_WORDS = ["user", "assistant", "system", "tool", "function", "json_schema", "json_object", "message",
          "function_call", "function_call_output", "tool_use", "tool_result", "text", "object", "array",
          "string", "integer", "required", "auto", "any", "none", "custom", "standin-json", "f"]
_KEYS = ["role", "content", "type", "text", "function", "name", "parameters", "json_schema", "schema", "format",
         "input", "tool_use_id", "id", "call_id", "arguments", "output", "input_schema", "properties", "items",
         "enum", "const", "anyOf", "include_usage", "tool_calls", "tool_choice", "source"]
_TOP = ["model", "tools", "tool_choice", "response_format", "stream", "stream_options", "instructions", "text",
        "system", "max_tokens", "dimensions", "encoding_format", "metadata", "store", "user", "previous_response_id"]
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(_WORDS) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(_KEYS), inner, max_size=4),
    max_leaves=16)
_BODIES = {
    "/chat/completions": {"messages": st.lists(_VALUES, max_size=3)},
    "/responses": {"input": st.one_of(st.text(max_size=4), st.lists(_VALUES, max_size=3))},
    "/messages": {"model": st.just("m"), "max_tokens": st.just(16), "messages": st.lists(_VALUES, max_size=3)},
    "/messages/count_tokens": {"messages": st.lists(_VALUES, max_size=3)},
    "/embeddings": {},
}


@pytest.mark.parametrize("path", _BODIES)
def test_random_json_bodies_never_get_a_500(base_url: str, path: str) -> None:
    """Random JSON bodies (any top-level value, or an object whose fields hold random values and
    shapes) get a reply or the protocol's 400 on every route, never a 500."""
    optional = {key: _VALUES for key in _TOP + ["input"] if key not in _BODIES[path]}
    bodies = _VALUES | st.fixed_dictionaries(_BODIES[path], optional=optional)

    with httpx.Client(timeout=10, headers={"Content-Type": "application/json"}) as http:

        @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(bodies)
        def check(body: Any) -> None:
            resp = http.post(base_url + path, content=json.dumps(body))
            if resp.status_code != 200:
                assert_protocol_error(path, resp)

        check()
