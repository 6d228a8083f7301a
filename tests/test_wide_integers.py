"""Integers beyond 64 bits (above 2**64 - 1, below -2**63) reach the provider and the record
exactly as the client or the model wrote them, on Chat, Responses and Messages, JSON and
streamed, with and without an injected window: orjson alone reads them as floats
(``123456789012345678901`` as ``1.2345678901234568e+20``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from gateway import jsonbody
from gateway.session.record import build_reply_view
from gateway.stages.parse_request import parse_json_object
from tests.conftest import ACME_KEY, Gateway, _Server
from tests.protocols.conftest import anthropic_client
from tests.protocols.upstream import (
    ProtocolUpstream,
    message_object,
    messages_events,
    response_object,
    responses_events,
    responses_plan,
)

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}
SEED = 123456789012345678901  # above 2**64 - 1
MAXIMUM = 99999999999999999999
BELOW = -9223372036854775809  # below -2**63
REPLY_N = 98765432109876543210987
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "maximum": MAXIMUM, "minimum": BELOW}}}


class Provider(ProtocolUpstream):
    """The protocol test upstream (bodies read with the standard library's exact JSON), whose
    chat route also streams and answers ``reply_text``, and whose Responses replies echo no
    wide integer back (its events are written with orjson)."""

    reply_text = "chat says: ok"

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(("/v1/responses", dict(request.headers), body))
        plain = {key: value for key, value in body.items() if key not in ("text", "seed")}
        text, call = responses_plan(plain)
        if not body.get("stream"):
            return web.json_response(response_object(plain, text, call, "0001"))
        return await self._stream(request, responses_events(plain, text, call, "0001"))

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """A request offering the ``count`` tool, whose last turn is text, is answered with a
        ``tool_use`` whose input holds ``SEED`` (written digit for digit, as a provider does)."""
        body = json.loads(await request.read())
        last = body["messages"][-1]["content"]
        if not (body.get("tools") and body["tools"][0]["name"] == "count" and isinstance(last, str)):
            return await super().messages(request)
        self.requests.append(("/v1/messages", dict(request.headers), body))
        call = {"name": "count", "input": {"pad": "x" * 40, "n": "WIDE"}}  # the stream cuts the input in the pad
        if not body.get("stream"):
            raw = json.dumps(message_object(body, None, call, "0001")).replace('"WIDE"', str(SEED))
            return web.Response(body=raw, content_type="application/json")
        events = [e.replace(b'\\"WIDE\\"', str(SEED).encode()) for e in messages_events(body, None, call, "0001")]
        assert any(str(SEED).encode() in e for e in events)
        return await self._stream(request, events)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(("/v1/chat/completions", dict(request.headers), body))
        base = {"id": "chatcmpl-1", "created": 1, "model": body.get("model")}
        if not body.get("stream"):
            return web.json_response({**base, "object": "chat.completion", "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": self.reply_text}}]})
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for delta, finish in (({"role": "assistant", "content": self.reply_text}, None), ({}, "stop")):
            chunk = {**base, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            await out.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out


@pytest.fixture
def provider() -> Iterator[Provider]:
    up = Provider()
    server = _Server(up.app())
    up.url = f"http://127.0.0.1:{server.port}"
    try:
        yield up
    finally:
        server.stop()


@pytest.fixture
def make_gw(make_gateway: Callable[..., Gateway], provider: Provider) -> Callable[..., Gateway]:
    def make(policies: Path | None = None) -> Gateway:
        upstreams = [{"name": "oa", "base_url": f"{provider.url}/v1", "models": ["*"], "protocol": "openai"},
                     {"name": "an", "base_url": f"{provider.url}/v1", "models": ["*"], "protocol": "anthropic"}]
        return make_gateway(policies, upstreams=upstreams)
    return make


def keyed_policy(folder: Path, input_keys: str, reply_keys: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "keyed.yaml").write_text(f"id: keyed\nsession:\n  input_keys: {input_keys}\n  reply_keys: {reply_keys}\n")
    return folder


def full_context(gw: Gateway, session: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{gw.base_url}/sessions/{session}", headers=AUTH, timeout=30)
    assert resp.status_code == 200, resp.text
    return list(resp.json()["full_context"])


def exact(value: Any, expected: int) -> bool:
    return type(value) is int and value == expected


# --- the module ---------------------------------------------------------------------------


def test_dumps_writes_wide_integers_as_they_are() -> None:
    """``jsonbody.dumps`` writes a Python int beyond 64 bits digit for digit, compact and UTF-8, as orjson writes."""
    value = {"a": [SEED, BELOW, 1.5, "é"], "b": None}
    assert jsonbody.dumps(value) == b'{"a":[123456789012345678901,-9223372036854775809,1.5,"\xc3\xa9"],"b":null}'
    assert jsonbody.dumps({"a": 1}) == orjson.dumps({"a": 1})


def test_parse_keeps_wide_integers_and_refuses_what_it_refused() -> None:
    """A request body's wide integers parse exactly; NaN, Infinity, 1e999 and a 5000-digit integer are still refused."""
    body = parse_json_object(b'{"seed":123456789012345678901,"m":-9223372036854775809,"f":1e20}', exact=True)
    assert exact(body["seed"], SEED) and exact(body["m"], BELOW) and body["f"] == 1e20
    for bad in (b'{"a":NaN}', b'{"a":Infinity}', b'{"a":-Infinity}', b'{"a":1e999}', b'{"a":1' + b"0" * 5000 + b"}"):
        for flag in (False, True):
            with pytest.raises(Exception, match="not valid JSON"):
                parse_json_object(bad, exact=flag)


def test_loads_reads_wide_integers_and_deep_text() -> None:
    """``jsonbody.loads`` reads a wide integer exactly, and text nested deeper than orjson writes as orjson reads it."""
    assert exact(jsonbody.loads('{"n": 98765432109876543210987}')["n"], REPLY_N)
    deep = "[" * 600 + "1" + "]" * 600
    assert jsonbody.loads(deep) == orjson.loads(deep)


@pytest.mark.parametrize("text", ["[1.2345678901234568e+20]", "[-9.223372036854776e+18]", '["e+18", 1e+300]',
                                  '["C++ a+b", 9.876543210987654e+22]'])
def test_widened_sees_a_wide_integer_read_as_float(text: str) -> None:
    """orjson's output shows a float that may have been a wide integer by its exponent, 18 or more."""
    assert jsonbody.widened(orjson.dumps(orjson.loads(text)))


@pytest.mark.parametrize("text", ['{"a": 1e+17, "b": "C++", "c": 18446744073709551615}', '["a+b", 1.5e-20]', "[]"])
def test_widened_is_false_without_one(text: str) -> None:
    """No exponent of 18 or more, no wide integer: the fast path stays."""
    assert not jsonbody.widened(orjson.dumps(orjson.loads(text)))


# --- through the gateway ------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_chat_forwards_wide_integers_exactly(make_gw: Callable[..., Gateway], provider: Provider,
                                             stream: bool) -> None:
    """The openai SDK's seed and a tool schema's bounds reach the provider as sent, in the first round and
    in the next, whose body carries the injected window."""
    gw = make_gw()
    client = gw.openai(session=f"wide-chat-{stream}")
    tools = [{"type": "function", "function": {"name": "pick", "parameters": SCHEMA}}]
    for text in ("first", "second"):
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}],
                                               seed=SEED, tools=tools, stream=stream)
        if stream:
            list(reply)
    first, second = provider.bodies("/v1/chat/completions")
    assert len(second["messages"]) == 3  # the window of the first round, then the new message
    for body in (first, second):
        bounds = body["tools"][0]["function"]["parameters"]["properties"]["n"]
        assert exact(body["seed"], SEED) and exact(bounds["maximum"], MAXIMUM) and exact(bounds["minimum"], BELOW)


@pytest.mark.parametrize("stream", [False, True])
def test_responses_forwards_wide_integers_exactly(make_gw: Callable[..., Gateway], provider: Provider,
                                                  stream: bool) -> None:
    """A Responses request's wide integers (a json_schema's bounds, an extra field) reach the provider as sent,
    with and without the injected window."""
    gw = make_gw()
    client = gw.openai(session=f"wide-resp-{stream}")
    fmt = {"format": {"type": "json_schema", "name": "pick", "schema": SCHEMA}}
    for text in ("first", "second"):
        reply = client.responses.create(model="m", input=text, text=fmt, stream=stream,  # type: ignore[call-overload]
                                        extra_body={"seed": SEED})
        if stream:
            list(reply)
    first, second = provider.bodies("/v1/responses")
    assert len(second["input"]) == 3
    for body in (first, second):
        bounds = body["text"]["format"]["schema"]["properties"]["n"]
        assert exact(body["seed"], SEED) and exact(bounds["maximum"], MAXIMUM) and exact(bounds["minimum"], BELOW)


@pytest.mark.parametrize("stream", [False, True])
def test_messages_forwards_wide_integers_exactly(make_gw: Callable[..., Gateway], provider: Provider,
                                                 stream: bool) -> None:
    """A Messages request's wide integers reach the provider as sent, with and without the injected window."""
    gw = make_gw()
    client = anthropic_client(gw, session=f"wide-msg-{stream}")
    for text in ("first", "second"):
        reply = client.messages.create(model="claude", max_tokens=50, stream=stream,
                                       messages=[{"role": "user", "content": text}],
                                       extra_body={"seed": SEED, "schema": SCHEMA})
        if stream:
            list(reply)
    first, second = provider.bodies("/v1/messages")
    assert len(second["messages"]) == 3
    for body in (first, second):
        bounds = body["schema"]["properties"]["n"]
        assert exact(body["seed"], SEED) and exact(bounds["maximum"], MAXIMUM) and exact(bounds["minimum"], BELOW)


def test_large_body_keeps_wide_integers(make_gw: Callable[..., Gateway], provider: Provider) -> None:
    """A body over the thread threshold (read, looked at and read again off the event loop) keeps its wide integers."""
    gw = make_gw()
    gw.openai().chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * 300_000}], seed=SEED)
    (body,) = provider.bodies("/v1/chat/completions")
    assert exact(body["seed"], SEED) and len(body["messages"][0]["content"]) == 300_000


def test_structured_input_records_wide_integers_exactly(make_gw: Callable[..., Gateway], provider: Provider,
                                                        tmp_path: Path) -> None:
    """Agently's structured input ``{"id": ...}`` (an object as the message content) is recorded and
    forwarded with its wide integers as sent, the bytes the client sent going out unchanged otherwise."""
    gw = make_gw(keyed_policy(tmp_path / "pol", "[input.id, input.low]", "null"))
    raw = (b'{"model":"m","messages":[{"role":"user","content":{"id":123456789012345678901,'
           b'"low":-9223372036854775809}}]}')
    resp = httpx.post(f"{gw.base_url}/chat/completions", content=raw, timeout=30,
                      headers={**AUTH, "Content-Type": "application/json", "X-Session-Id": "wide-in"})
    assert resp.status_code == 200, resp.text
    (body,) = provider.bodies("/v1/chat/completions")
    assert exact(body["messages"][0]["content"]["id"], SEED) and exact(body["messages"][0]["content"]["low"], BELOW)
    user = full_context(gw, "wide-in")[0]
    assert user["content"] == f"[input.id]:\n{SEED}\n[input.low]:\n{BELOW}"


@pytest.mark.parametrize("stream", [False, True])
def test_reply_with_wide_integer_is_recorded_exactly(make_gw: Callable[..., Gateway], provider: Provider,
                                                     tmp_path: Path, stream: bool) -> None:
    """A model's JSON reply ``{"n": 98765432109876543210987}`` is recorded under its reply key as the model wrote it."""
    gw = make_gw(keyed_policy(tmp_path / "pol", "null", "[n]"))
    provider.reply_text = json.dumps({"n": REPLY_N, "m": BELOW})
    reply = gw.openai(session=f"wide-out-{stream}").chat.completions.create(
        model="m", messages=[{"role": "user", "content": "count"}], stream=stream)
    if stream:
        list(reply)
    assistant = full_context(gw, f"wide-out-{stream}")[1]
    assert assistant["content"] == f"[n]:\n{REPLY_N}"


def test_an_unknown_content_part_with_a_wide_integer_is_recorded_as_sent(make_gw: Callable[..., Gateway],
                                                                         provider: Provider) -> None:
    """A content part of a type the gateway does not know is recorded as its JSON: its wide
    integer as written, not a failed record (500) nor a float."""
    gw = make_gw()
    raw = (b'{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"see"},'
           b'{"type":"weird","n":123456789012345678901}]}]}')
    resp = httpx.post(f"{gw.base_url}/chat/completions", content=raw, timeout=30,
                      headers={**AUTH, "Content-Type": "application/json", "X-Session-Id": "wide-part"})
    assert resp.status_code == 200, resp.text
    (body,) = provider.bodies("/v1/chat/completions")
    assert exact(body["messages"][0]["content"][1]["n"], SEED)
    assert full_context(gw, "wide-part")[0]["content"] == f'see\n{{"type":"weird","n":{SEED}}}'


def test_a_forwarded_route_keeps_wide_integers(make_gateway: Callable[..., Gateway]) -> None:
    """A forwarded route's JSON body (read for its model, then written again) reaches the provider
    with its wide integers as sent."""
    seen: list[Any] = []

    async def embeddings(request: web.Request) -> web.Response:
        seen.append(json.loads(await request.read()))
        return web.json_response({"object": "list", "data": [], "model": "m"})

    app = web.Application()
    app.router.add_post("/v1/embeddings", embeddings)
    server = _Server(app)
    try:
        gw = make_gateway(upstreams=[{"name": "oa", "base_url": f"http://127.0.0.1:{server.port}/v1",
                                      "models": ["*"], "forward_routes": ["embeddings"]}])
        resp = httpx.post(f"{gw.base_url}/embeddings", timeout=30, headers={**AUTH, "Content-Type": "application/json"},
                          content=b'{"model":"m","input":"x","dimensions":123456789012345678901}')
        assert resp.status_code == 200, resp.text
    finally:
        server.stop()
    assert exact(seen[0]["dimensions"], SEED)


COUNT_TOOL = {"name": "count", "description": "count", "input_schema": {"type": "object"}}


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_use_with_a_wide_integer_is_recorded_and_sent_back_exactly(make_gw: Callable[..., Gateway],
                                                                         provider: Provider, stream: bool) -> None:
    """A Claude ``tool_use`` whose input holds a wide integer is recorded as the model wrote it (JSON
    and streamed), and the recorded call goes back to the provider in the window the same."""
    gw = make_gw()
    session = f"wide-tool-{stream}"
    client = anthropic_client(gw, session=session)
    reply = client.messages.create(model="claude", max_tokens=50, stream=stream, tools=[COUNT_TOOL],
                                   messages=[{"role": "user", "content": "count"}])
    if stream:
        list(reply)
    call = full_context(gw, session)[1]["tool_calls"][0]
    assert exact(json.loads(call["function"]["arguments"])["n"], SEED), call
    client.messages.create(model="claude", max_tokens=50, tools=[COUNT_TOOL], messages=[{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": call["id"], "content": "counted"}]}])
    sent = provider.bodies("/v1/messages")[1]["messages"]
    (use,) = [b for m in sent if isinstance(m["content"], list) for b in m["content"] if b["type"] == "tool_use"]
    assert exact(use["input"]["n"], SEED), use


def test_reply_keys_read_a_chat_tool_calls_wide_integer_exactly() -> None:
    """Reply keys on a Chat tool call's arguments (``tool_calls[0].function.arguments.n``) read its
    wide integer as written."""
    view = build_reply_view({"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": f'{{"n":{SEED}}}'}}]})
    assert exact(view.tool_calls[0]["function"]["arguments"]["n"], SEED)


def test_a_memo_or_history_with_a_wide_integer_is_refused_not_changed(make_gw: Callable[..., Gateway]) -> None:
    """``PUT .../memo`` and ``POST .../history`` refuse a wide integer (400 ``invalid_session``, naming
    where it is) rather than storing it, and having the model read it, as a float; a 64-bit one stays."""
    gw = make_gw()
    url = f"{gw.base_url}/sessions/wide-memo"
    memo = httpx.put(f"{url}/memo", headers={**AUTH, "Content-Type": "application/json"}, timeout=30,
                     content=b'{"memo":{"n":123456789012345678901}}')
    history = httpx.post(f"{url}/history", headers={**AUTH, "Content-Type": "application/json"}, timeout=30,
                         content=b'{"op":"add","messages":[{"role":"user","content":[{"type":"weird",'
                                 b'"n":-9223372036854775809}]}]}')
    for resp, where in ((memo, "memo.n"), (history, "messages[0].content[0].n")):
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["code"] == "invalid_session" and f"'{where}'" in error["message"], error
    fine = httpx.put(f"{url}/memo", headers={**AUTH, "Content-Type": "application/json"}, timeout=30,
                     content=b'{"memo":{"n":18446744073709551615}}')
    assert fine.status_code == 200 and exact(fine.json()["memo"]["n"], 2**64 - 1), fine.text


def test_dumps_of_a_value_nested_too_deep_raises_its_documented_error() -> None:
    """A value orjson refuses for its depth, holding a wide integer deep inside (a model's tool
    input nested 1000 levels: orjson reads 1024, writes 255), raises ``JSONEncodeError`` (a
    ``TypeError``, which callers translate, e.g. into 502 ``bad_upstream_reply``), never the
    ``RecursionError`` of the digits' walk (a 500)."""
    deep: Any = [SEED]
    for _ in range(1000):
        deep = [deep]
    with pytest.raises(orjson.JSONEncodeError):
        jsonbody.dumps(deep)
