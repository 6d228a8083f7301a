"""A round cut off mid-stream is recorded as incomplete, never lost (SPEC §3): by a client that
hangs up, by an upstream that drops the connection or ends without finishing, and by an upstream
that breaks off a non-streamed body. The partial reply goes to ``full_context`` only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
import openai
import orjson
import pytest
from aiohttp import web

from gateway.audit import entry_fields
from gateway.errors import StoreUnavailable
from gateway.sessions import SessionService
from gateway.store.base import RoundRow
from gateway.store.sqlite import SQLiteStore
from tests.conftest import ACME_KEY, Gateway, _Server

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}
PIECES = [f"w{i} " for i in range(200)]
SENT_BEFORE_DROP = 3


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    event = {"id": "chatcmpl-faulty", "object": "chat.completion.chunk", "model": "faulty",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(event) + b"\n\n"


def completion(text: str) -> dict[str, Any]:
    return {"id": "chatcmpl-faulty", "object": "chat.completion", "model": "faulty", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


@dataclass
class Faulty:
    """An upstream whose behaviour is the request's model: ``slow`` streams 200 pieces 20 ms apart,
    ``drop`` closes the connection after 3 pieces, ``eof`` ends cleanly after 3 pieces without a
    finish or ``[DONE]``, ``half`` sends half a JSON body and closes, ``held`` answers JSON only
    once ``release`` is set. Any other model answers whole, streamed or not. Records every body."""

    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        mode = body["model"]
        if mode == "held":
            self.arrived.set()
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 10)
            return web.json_response(completion("too late"))
        if mode != "half" and not body.get("stream"):
            return web.json_response(completion("plain"))
        if mode == "half":
            payload = orjson.dumps(completion("never whole"))
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = len(payload)
            await resp.prepare(request)
            await resp.write(payload[: len(payload) // 2])
            return self._hang_up(request, resp)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await resp.write(chunk({"role": "assistant", "content": ""}))
            for n, piece in enumerate(PIECES):
                if mode in ("drop", "eof") and n == SENT_BEFORE_DROP:
                    return self._hang_up(request, resp) if mode == "drop" else await self._eof(resp)
                await resp.write(chunk({"content": piece}))
                if mode == "slow":
                    await asyncio.sleep(0.02)
            await resp.write(chunk({}, "stop"))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass
        return resp

    @staticmethod
    def _hang_up(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
        if request.transport is not None:
            request.transport.close()
        resp.force_close()
        return resp

    @staticmethod
    async def _eof(resp: web.StreamResponse) -> web.StreamResponse:
        await resp.write_eof()
        return resp


@pytest.fixture
def faulty() -> Iterator[Faulty]:
    up = Faulty()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", up.chat)
    server = _Server(app)
    up.url = f"http://127.0.0.1:{server.port}/v1"
    yield up
    server.stop()


@pytest.fixture
def gw(make_gateway: Callable[..., Gateway], faulty: Faulty) -> Gateway:
    return make_gateway(upstreams=[{"name": "faulty", "base_url": faulty.url, "models": ["*"]}])


def body(model: str, text: str, stream: bool = True) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]}


def wait_for_session(gateway: Gateway, session: str) -> dict[str, Any]:
    """The exported session once its first round is committed (the gateway settles it after the cut)."""
    deadline = time.monotonic() + 10
    while True:
        resp = httpx.get(f"{gateway.base_url}/sessions/{session}", headers=AUTH)
        if resp.status_code == 200 or time.monotonic() > deadline:
            assert resp.status_code == 200, resp.text
            return dict(resp.json())
        time.sleep(0.05)


def stored(gateway: Gateway) -> tuple[list[RoundRow], list[dict[str, Any]]]:
    """The acme round rows and round audit entries, read through the SQLite store."""

    async def read() -> tuple[list[RoundRow], list[dict[str, Any]]]:
        store = SQLiteStore(gateway.db_path)
        await store.open()
        try:
            rounds = [r async for r in store.iter_rounds("acme")]
            entries = [entry_fields(a) async for a in store.iter_audit("acme")]
        finally:
            await store.close()
        return rounds, [e for e in entries if e["event"] == "round"]

    return asyncio.run(read())


async def read_then_hang_up(url: str, payload: dict[str, Any], headers: dict[str, str], events: int) -> bytes:
    """Read *events* SSE events of a streamed reply, then close the connection."""
    async with aiohttp.ClientSession() as session:
        resp = await session.post(url, json=payload, headers=headers)
        got = b""
        while got.count(b"\n\n") < events:
            more = await resp.content.readany()
            assert more, "the stream ended before the client hung up"
            got += more
        resp.close()
    return got


def test_client_disconnect_mid_stream_records_an_incomplete_round(gw: Gateway, faulty: Faulty) -> None:
    """A client that hangs up after a few chunks leaves a round marked incomplete with the partial reply."""
    got = asyncio.run(read_then_hang_up(f"{gw.base_url}/chat/completions", body("slow", "tell me a long story"),
                                        {**AUTH, "X-Session-Id": "quitter"}, events=4))
    assert b"[DONE]" not in got
    doc = wait_for_session(gw, "quitter")
    user_msg, reply = doc["full_context"]
    assert user_msg == {"role": "user", "content": "tell me a long story"}
    assert reply["role"] == "assistant"
    assert reply["content"].startswith("w0 w1 w2 ") and len(reply["content"]) < len("".join(PIECES))
    assert doc["context_window"] == []
    rounds, entries = stored(gw)
    assert [r.outcome for r in rounds] == ["incomplete"]
    assert [(e["outcome"], e["ended_by"]) for e in entries] == [("incomplete", "client")]
    gw.openai(session="quitter").chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}])
    assert faulty.requests[-1]["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("mode", ["drop", "eof"], ids=["connection-dropped", "ended-unfinished"])
def test_upstream_cut_mid_stream_ends_with_an_error_event(gw: Gateway, mode: str) -> None:
    """An upstream that breaks off mid-stream gives the client an error event, no [DONE], and an incomplete round."""
    resp = httpx.post(f"{gw.base_url}/chat/completions", json=body(mode, "go"),
                      headers={**AUTH, "X-Session-Id": f"cut-{mode}"}, timeout=30)
    assert resp.status_code == 200
    assert b"[DONE]" not in resp.content
    last = resp.content.strip().split(b"\n\n")[-1]
    assert last.startswith(b"data: ")
    error = orjson.loads(last[6:])["error"]
    assert error["code"] == "upstream_incomplete"
    assert error["message"].endswith("the partial round was recorded as incomplete")
    doc = wait_for_session(gw, f"cut-{mode}")
    assert doc["full_context"] == [{"role": "user", "content": "go"}, {"role": "assistant", "content": "w0 w1 w2 "}]
    assert doc["context_window"] == []
    rounds, entries = stored(gw)
    assert [r.outcome for r in rounds] == ["incomplete"]
    assert [(e["outcome"], e["ended_by"]) for e in entries] == [("incomplete", "upstream")]


def test_the_sdk_raises_on_a_stream_the_upstream_dropped(gw: Gateway) -> None:
    """The openai SDK sees the gateway's error event as an APIError instead of a reply that looks whole."""
    client = gw.openai(session="sdk-drop")
    pieces = []
    with pytest.raises(openai.APIError) as caught:
        for event in client.chat.completions.create(**body("drop", "go")):
            pieces.extend(c.delta.content or "" for c in event.choices)
    assert "incomplete" in caught.value.message
    assert "".join(pieces) == "w0 w1 w2 "


def test_upstream_breaking_off_a_json_body_is_502_and_recorded(gw: Gateway) -> None:
    """A non-streamed body cut in half answers 502 and still records the user's message as an upstream_error round."""
    resp = httpx.post(f"{gw.base_url}/chat/completions", json=body("half", "question", stream=False),
                      headers={**AUTH, "X-Session-Id": "half-body"}, timeout=30)
    assert resp.status_code == 502 and resp.json()["error"]["type"] == "upstream_error"
    doc = wait_for_session(gw, "half-body")
    assert doc["full_context"] == [{"role": "user", "content": "question"}]
    rounds, entries = stored(gw)
    assert [r.outcome for r in rounds] == ["upstream_error"]
    assert entries[0]["outcome"] == "upstream_error"


def test_client_gone_before_a_non_streamed_reply_records_incomplete(gw: Gateway, faulty: Faulty) -> None:
    """A client that hangs up while the upstream is still answering gets an incomplete round, kept out of the window."""

    async def ask_and_hang_up() -> None:
        async with aiohttp.ClientSession() as session:
            task = asyncio.ensure_future(session.post(f"{gw.base_url}/chat/completions", json=body("held", "q", False),
                                                      headers={**AUTH, "X-Session-Id": "impatient"}))
            await asyncio.get_running_loop().run_in_executor(None, faulty.arrived.wait, 10)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        async with aiohttp.ClientSession() as session:  # the gateway has handled the hang-up by now
            for _ in range(3):
                assert (await session.get(f"{gw.url}/healthz")).status == 200

    asyncio.run(ask_and_hang_up())
    faulty.release.set()
    doc = wait_for_session(gw, "impatient")
    assert doc["full_context"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "too late"}]
    assert doc["context_window"] == []
    rounds, entries = stored(gw)
    assert [r.outcome for r in rounds] == ["incomplete"]
    assert [(e["outcome"], e["ended_by"]) for e in entries] == [("incomplete", "client")]
    # a normal event, not an error: the access line says 499 (client closed), nothing logs unhandled_error
    lines = [json.loads(line) for line in gw.log_path.read_text().splitlines() if line.startswith("{")]
    assert not [e for e in lines if e.get("event") == "unhandled_error"], lines
    (line,) = [e for e in lines if e.get("event") == "request" and e.get("session_id") == "impatient"]
    assert line["status"] == 499 and line["ended_by"] == "client", line


def test_a_round_that_cannot_be_stored_never_looks_complete(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the store fails, a plain reply becomes a 503 and a stream ends with an error event and no [DONE]."""

    async def store_down(*args: Any, **kwargs: Any) -> None:
        raise StoreUnavailable("the store is down (test)")

    monkeypatch.setattr(SessionService, "commit_round", store_down)
    plain = httpx.post(f"{gw.base_url}/chat/completions", json=body("fast", "q", False),
                       headers={**AUTH, "X-Session-Id": "unstored"})
    assert plain.status_code == 503 and plain.json()["error"]["code"] == "store_unavailable"
    streamed = httpx.post(f"{gw.base_url}/chat/completions", json=body("fast", "q"),
                          headers={**AUTH, "X-Session-Id": "unstored"})
    assert b"[DONE]" not in streamed.content
    last = streamed.content.strip().split(b"\n\n")[-1]
    assert orjson.loads(last.removeprefix(b"data: "))["error"]["code"] == "store_unavailable"
    with pytest.raises(openai.APIError):
        list(gw.openai(session="unstored").chat.completions.create(**body("fast", "q")))


def test_upstream_cut_without_a_session_does_not_claim_a_recorded_round(gw: Gateway) -> None:
    """Without a session nothing is recorded, and the error event does not say it was (it used to
    say "the partial round was recorded as incomplete" to every client)."""
    resp = httpx.post(f"{gw.base_url}/chat/completions", json=body("drop", "go"), headers=AUTH, timeout=30)
    error = orjson.loads(resp.content.strip().split(b"\n\n")[-1][6:])["error"]
    assert error["code"] == "upstream_incomplete"
    assert "recorded as incomplete" not in error["message"] and "nothing of it was recorded" in error["message"]
    assert [(e["outcome"], e["ended_by"]) for e in stored(gw)[1]] == [("incomplete", "upstream")]
