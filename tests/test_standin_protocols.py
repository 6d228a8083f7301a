"""The stand-in model speaks the Responses API and Anthropic's Messages API: the real ``openai`` and
``anthropic`` SDKs are the clients, JSON and streamed, text, tool calls and JSON output."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from gateway.standin import default_message, standin_thread

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                                   "unit": {"type": "string", "enum": ["c", "f"]}},
                  "required": ["city"]}


@pytest.fixture(scope="module")
def seen() -> list[tuple[str, dict[str, Any]]]:
    return []


@pytest.fixture(scope="module")
def bodies() -> list[dict[str, Any]]:
    return []


@pytest.fixture(scope="module")
def base_url(seen: list[tuple[str, dict[str, Any]]], bodies: list[dict[str, Any]]) -> Iterator[str]:
    with standin_thread(chunks=5, on_request=bodies.append, on_any=lambda p, b: seen.append((p, b))) as url:
        yield url


def oa(url: str, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, **kw)


def an(url: str, **kw: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key="unused", max_retries=0, **kw)


EXPECTED = "[sessiongate stand-in model] I received 2 messages; your last message was: hello stand-in"


# --- Responses API ---------------------------------------------------------------------------

def test_responses_json_parses_with_the_sdk(base_url: str, seen: list[tuple[str, dict[str, Any]]],
                                            bodies: list[dict[str, Any]]) -> None:
    """A non-streamed Responses reply is a completed response with one output_text message; the hooks see
    the body as sent."""
    reply = oa(base_url).responses.create(model="standin", instructions="be brief", input="hello stand-in")
    assert reply.object == "response" and reply.status == "completed" and reply.id.startswith("resp_")
    assert reply.output_text == EXPECTED
    assert reply.output[0].type == "message" and reply.output[0].content[0].type == "output_text"
    assert reply.usage is not None and reply.usage.input_tokens > 0 and reply.usage.output_tokens > 0
    assert seen[-1] == ("/v1/responses", bodies[-1]) and bodies[-1]["input"] == "hello stand-in"


def test_responses_input_items_are_read_as_messages(base_url: str) -> None:
    """`input` as items: messages, a function call and its output are counted; the last user text is echoed."""
    items: list[Any] = [
        {"role": "user", "content": [{"type": "input_text", "text": "first"}]},
        {"type": "function_call", "call_id": "call_9", "name": "lookup", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_9", "output": "found"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "second"}]},
    ]
    reply = oa(base_url).responses.create(model="standin", input=items)
    assert reply.output_text.endswith("I received 4 messages; your last message was: second")


def test_responses_stream_has_the_real_event_sequence(base_url: str) -> None:
    """A streamed reply is the Responses event sequence, with increasing sequence numbers; the deltas
    add up to the text."""
    events = list(oa(base_url).responses.create(model="standin", input="hello stand-in", stream=True))
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * 5,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta").endswith("hello stand-in")
    assert events[-1].response.output_text.endswith("hello stand-in")


def test_responses_stream_helper_accumulates_the_final_response(base_url: str) -> None:
    """The SDK's `responses.stream` helper builds the final response from the events."""
    with oa(base_url).responses.stream(model="standin", input="hello stand-in") as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.output_text.endswith("hello stand-in") and final.status == "completed"


@pytest.mark.parametrize("stream", [False, True])
def test_responses_tool_call_when_asked(base_url: str, stream: bool) -> None:
    """With tools and tool_choice required, the reply is a function_call item with schema-shaped arguments."""
    tools: Any = [{"type": "function", "name": "get_weather", "parameters": WEATHER_SCHEMA}]
    sdk = oa(base_url)
    if stream:
        with sdk.responses.stream(model="standin", input="weather?", tools=tools, tool_choice="required") as s:
            for _ in s:
                pass
            reply = s.get_final_response()
    else:
        reply = sdk.responses.create(model="standin", input="weather?", tools=tools, tool_choice="required")
    calls = [item for item in reply.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    assert json.loads(calls[0].arguments) == {"city": "stand-in", "days": 50, "unit": "c"}


def test_responses_tool_named_in_the_text_is_called_and_its_output_answered(base_url: str) -> None:
    """A tool the user names is called; once its output is sent back, the reply is text."""
    tools: Any = [{"type": "function", "name": "get_weather", "parameters": WEATHER_SCHEMA}]
    sdk = oa(base_url)
    first = sdk.responses.create(model="standin", input="use get_weather for Oslo", tools=tools)
    call = next(item for item in first.output if item.type == "function_call")
    second = sdk.responses.create(model="standin", tools=tools, input=[
        {"role": "user", "content": "use get_weather for Oslo"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert [item.type for item in second.output] == ["message"]
    plain = sdk.responses.create(model="standin", input="no tool here", tools=tools)
    assert [item.type for item in plain.output] == ["message"]


def test_responses_json_schema_format_gets_matching_json(base_url: str) -> None:
    """text.format json_schema gets a raw JSON sample of the schema; json_object a {"reply": …} object."""
    sdk = oa(base_url)
    reply = sdk.responses.create(model="standin", input="rate it", text={"format": {
        "type": "json_schema", "name": "rating", "schema": {"type": "object", "properties": {
            "score": {"type": "number"}, "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}}}}}})
    assert json.loads(reply.output_text) == {"score": 0.5, "ok": True, "tags": ["stand-in"]}
    loose = sdk.responses.create(model="standin", input="say json", text={"format": {"type": "json_object"}})
    assert json.loads(loose.output_text)["reply"].endswith("say json")


def test_responses_previous_response_id_is_not_found(base_url: str) -> None:
    """The stand-in keeps no responses: a previous_response_id is a 400 previous_response_not_found."""
    with pytest.raises(openai.BadRequestError) as caught:
        oa(base_url).responses.create(model="standin", input="again", previous_response_id="resp_x")
    assert caught.value.code == "previous_response_not_found"


def test_responses_custom_reply_sees_the_chat_view() -> None:
    """A reply function gets the chat view (protocol, system and user messages) and its tool calls are
    rendered as function_call items."""
    views: list[dict[str, Any]] = []
    call = {"id": "call_7", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\": 1}"}}

    def reply(view: dict[str, Any]) -> dict[str, Any]:
        views.append(view)
        return {"role": "assistant", "content": "looking", "tool_calls": [call]}

    with standin_thread(reply=reply) as url:
        out = oa(url).responses.create(model="standin", instructions="sys", input="q?").output
    assert views[0]["protocol"] == "responses"
    assert views[0]["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "q?"}]
    assert [item.type for item in out] == ["message", "function_call"]
    assert out[1].call_id == "call_7" and out[1].arguments == "{\"q\": 1}"  # type: ignore[union-attr]


# --- Anthropic Messages ----------------------------------------------------------------------

def test_messages_create_parses_with_the_sdk(base_url: str, seen: list[tuple[str, dict[str, Any]]]) -> None:
    """messages.create gets a message with one text block, end_turn and usage."""
    reply = an(base_url).messages.create(model="standin", max_tokens=100, system="be brief",
                                         messages=[{"role": "user", "content": "hello stand-in"}])
    assert reply.type == "message" and reply.role == "assistant" and reply.id.startswith("msg_")
    assert reply.content[0].type == "text" and reply.content[0].text == EXPECTED
    assert reply.stop_reason == "end_turn" and reply.usage.input_tokens > 0 and reply.usage.output_tokens > 0
    assert seen[-1][0] == "/v1/messages" and seen[-1][1]["system"] == "be brief"


def test_messages_stream_parses_with_the_sdk(base_url: str) -> None:
    """messages.stream sees the Anthropic event sequence (the SDK swallows `ping`) and accumulates the text."""
    with an(base_url).messages.stream(model="standin", max_tokens=100,
                                      messages=[{"role": "user", "content": "hello stand-in"}]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    raw = [k for k in kinds if k not in ("text",)]
    assert raw == ["message_start", "content_block_start", *["content_block_delta"] * 5,
                   "content_block_stop", "message_delta", "message_stop"]
    assert final.content[0].text.endswith("hello stand-in") and final.stop_reason == "end_turn"  # type: ignore[union-attr]


def test_messages_raw_stream_frames_name_their_events(base_url: str) -> None:
    """Each SSE frame carries `event:` with the same name as its data's type; `ping` follows the first block start."""
    with httpx.stream("POST", f"{base_url}/messages", json={
            "model": "standin", "max_tokens": 10, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}) as response:
        text = "".join(response.iter_text())
    frames = [f for f in text.split("\n\n") if f]
    for frame in frames:
        event, data = frame.split("\n")
        assert event.removeprefix("event: ") == json.loads(data.removeprefix("data: "))["type"]
    names = [f.split("\n")[0].removeprefix("event: ") for f in frames]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]
    assert json.loads(frames[3].split("\n")[1][6:])["delta"]["type"] == "text_delta"


@pytest.mark.parametrize("stream", [False, True])
def test_messages_tool_use_when_asked(base_url: str, stream: bool) -> None:
    """With tools and tool_choice any, the reply is a tool_use block with schema-shaped input and
    stop_reason tool_use; the tool result then gets text."""
    tools: Any = [{"name": "get_weather", "description": "weather", "input_schema": WEATHER_SCHEMA}]
    sdk = an(base_url)
    ask: list[Any] = [{"role": "user", "content": "weather?"}]
    if stream:
        with sdk.messages.stream(model="standin", max_tokens=100, messages=ask, tools=tools,
                                 tool_choice={"type": "any"}) as s:
            reply = s.get_final_message()
    else:
        reply = sdk.messages.create(model="standin", max_tokens=100, messages=ask, tools=tools,
                                    tool_choice={"type": "any"})
    assert reply.stop_reason == "tool_use"
    block = reply.content[-1]
    assert block.type == "tool_use" and block.name == "get_weather" and block.id.startswith("toolu_")
    assert block.input == {"city": "stand-in", "days": 50, "unit": "c"}
    after = sdk.messages.create(model="standin", max_tokens=100, tools=tools, messages=[
        *ask, {"role": "assistant", "content": [block.model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "sunny"}]}])
    assert after.stop_reason == "end_turn" and after.content[0].type == "text"


def test_messages_custom_reply_sees_the_chat_view() -> None:
    """A reply function gets the chat view of blocks: tool_use → tool_calls, tool_result → tool message."""
    views: list[dict[str, Any]] = []
    with standin_thread(reply=lambda view: views.append(view) or "ok") as url:
        an(url).messages.create(model="standin", max_tokens=5, system=[{"type": "text", "text": "sys"}], messages=[
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [{"type": "text", "text": "let me look"},
                                              {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "42"}]}])
    assert views[0]["protocol"] == "messages"
    assert views[0]["messages"] == [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "q"},
        {"role": "assistant", "content": "let me look", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "42"}]


def test_messages_missing_max_tokens_is_an_anthropic_400(base_url: str) -> None:
    """A body without max_tokens is refused in Anthropic's error shape, which the SDK reads."""
    response = httpx.post(f"{base_url}/messages", json={"model": "standin", "messages": []})
    assert response.status_code == 400
    assert response.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                          "message": "max_tokens: Field required"}}


@pytest.mark.parametrize(("mode", "error"), [("500", anthropic.InternalServerError),
                                             ("429", anthropic.RateLimitError)])
def test_messages_fault_injection_in_anthropic_shape(base_url: str, mode: str, error: type[Exception]) -> None:
    """X-Standin-Fail works on /v1/messages and the SDK maps the status to its error class."""
    with pytest.raises(error) as caught:
        an(base_url).messages.create(model="standin", max_tokens=5, messages=[{"role": "user", "content": "x"}],
                                     extra_headers={"X-Standin-Fail": mode})
    assert caught.value.body["error"]["type"] in ("api_error", "rate_limit_error")  # type: ignore[attr-defined]


def test_responses_drop_mid_stream_breaks_the_stream(base_url: str) -> None:
    """X-Standin-Fail: drop-mid-stream cuts a Responses stream before response.completed."""
    stream = oa(base_url).responses.create(model="standin", input="hello", stream=True,
                                           extra_headers={"X-Standin-Fail": "drop-mid-stream"})
    kinds: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        for event in stream:
            kinds.append(event.type)
    assert kinds and "response.completed" not in kinds


def test_count_tokens(base_url: str) -> None:
    """messages.count_tokens answers a positive count."""
    count = an(base_url).messages.count_tokens(model="standin", messages=[{"role": "user", "content": "x" * 40}])
    assert count.input_tokens == 10


# --- the rest --------------------------------------------------------------------------------

def test_unimplemented_route_says_so(base_url: str) -> None:
    """A route the stand-in lacks is a 404 whose error names it and says it is not implemented."""
    response = httpx.post(f"{base_url}/files", json={})
    assert response.status_code == 404
    assert response.json()["error"] == {
        "message": "the sessiongate stand-in model does not implement POST /v1/files",
        "type": "invalid_request_error", "param": None, "code": "not_implemented"}


def test_chat_tool_call_and_json_format_when_asked(base_url: str) -> None:
    """Chat Completions gets the same tool calls and JSON output as the other protocols."""
    sdk = oa(base_url)
    tools: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}]
    called = sdk.chat.completions.create(model="standin", messages=[{"role": "user", "content": "hi"}], tools=tools,
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert called.choices[0].finish_reason == "tool_calls"
    tool_calls = called.choices[0].message.tool_calls or []
    assert json.loads(tool_calls[0].function.arguments)["city"] == "stand-in"  # type: ignore[union-attr]
    formatted = sdk.chat.completions.create(model="standin", messages=[{"role": "user", "content": "hi"}],
                                            response_format={"type": "json_object"})
    assert json.loads(formatted.choices[0].message.content or "")["reply"].endswith("hi")


def test_default_message_without_tools_or_format_is_the_default_reply() -> None:
    """With nothing asked, default_message is default_reply's text."""
    body = {"model": "standin", "messages": [{"role": "user", "content": "q"}], "tools": [], "tool_choice": "none"}
    assert default_message(body)["content"].endswith("your last message was: q")
