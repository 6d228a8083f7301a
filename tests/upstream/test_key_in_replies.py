"""The provider key never reaches a client, nor a round's record, in any reply byte: a 200
stream's error event (Chat's ``error`` object, Anthropic's ``event: error``, Responses'
``response.failed``), a streamed or JSON reply's text, a key split across network pieces; and
the blanking holds back no byte of an ordinary stream."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator

import httpx
import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.upstream import BLANKED_KEY, KeyBlanker
from tests.conftest import ACME_KEY, Gateway, _Server

KEY = "sk-PROBE-SECRET-123-4f9a"
AUTH = {"Authorization": f"Bearer {ACME_KEY}"}


def chunk(content: str) -> bytes:
    body = {"id": "chatcmpl-k1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": content}, "finish_reason": None}]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


def split_at_key(data: bytes, key: bytes) -> list[bytes]:
    """*data* in pieces cut inside each appearance of *key*."""
    pieces, rest = [], data
    while (at := rest.find(key)) != -1:
        pieces.append(rest[: at + 7])
        rest = rest[at + 7:]
    return [*pieces, rest]


def stream_for(path: str, key: str) -> bytes:
    said = f"the request had Authorization: Bearer {key}"
    if path.endswith("/chat/completions"):
        return (chunk("hello ") + chunk(f"your key is {key} ok") +
                b"data: " + orjson.dumps({"error": {"message": said, "type": "server_error"}}) + b"\n\n"
                + b"data: [DONE]\n\n")
    if path.endswith("/messages"):
        start = {"type": "message_start", "message": {"id": "msg_k1", "type": "message", "role": "assistant",
                                                      "model": "m", "content": [], "stop_reason": None,
                                                      "usage": {"input_tokens": 1, "output_tokens": 0}}}
        error = {"type": "error", "error": {"type": "overloaded_error", "message": said}}
        return (b"event: message_start\ndata: " + orjson.dumps(start) + b"\n\n"
                + b"event: error\ndata: " + orjson.dumps(error) + b"\n\n")
    response = {"id": "resp_k1", "object": "response", "status": "in_progress", "model": "m", "output": []}
    failed = {**response, "status": "failed", "error": {"code": "server_error", "message": said}}
    return (b"event: response.created\ndata: " + orjson.dumps({"type": "response.created", "sequence_number": 0,
                                                                "response": response}) + b"\n\n"
            + b"event: response.failed\ndata: " + orjson.dumps({"type": "response.failed", "sequence_number": 1,
                                                               "response": failed}) + b"\n\n")


def echoing_provider() -> web.Application:
    """A provider whose 200 replies echo the key the request carried, the key cut across pieces."""
    async def answer(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        key = request.headers.get("x-api-key") or request.headers["Authorization"].removeprefix("Bearer ")
        if not body.get("stream"):
            reply = {"id": "chatcmpl-k2", "object": "chat.completion", "created": 1, "model": "m",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": f"your key is {key}"}}]}
            return web.json_response(reply)
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for piece in split_at_key(stream_for(request.path, key), key.encode()):
            await out.write(piece)
            await asyncio.sleep(0.02)  # so the pieces travel apart (the unit test below cuts everywhere)
        await out.write_eof()
        return out
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", answer)
    return app


@pytest.fixture
def gateway(make_gateway: Callable[..., Gateway], monkeypatch: pytest.MonkeyPatch) -> Iterator[Gateway]:
    server = _Server(echoing_provider())
    monkeypatch.setenv("PROBE_KEY", KEY)
    url = f"http://127.0.0.1:{server.port}/v1"
    try:
        yield make_gateway(upstreams=[
            {"name": "oa", "base_url": url, "models": ["*"], "api_key_env": "PROBE_KEY"},
            {"name": "an", "base_url": url, "models": ["*"], "protocol": "anthropic", "api_key_env": "PROBE_KEY"}])
    finally:
        server.stop()


@pytest.mark.parametrize("path, body", [
    ("/chat/completions", {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}),
    ("/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    ("/responses", {"model": "m", "stream": True, "input": "hi"}),
    ("/messages", {"model": "m", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "hi"}]}),
])
def test_a_key_echoed_in_a_200_reply_reaches_neither_client_nor_record(gateway: Gateway, path: str,
                                                                       body: dict[str, object]) -> None:
    """The provider's 200 reply echoes its key (in an error event, in the text, cut across
    pieces): the client gets ``[provider key]`` in its place, and so does the recorded round."""
    session = f"key-{path.strip('/').replace('/', '-')}-{'stream' if body.get('stream') else 'json'}"
    resp = httpx.post(f"{gateway.base_url}{path}", json=body, timeout=30,
                      headers={**AUTH, "X-Session-Id": session, "anthropic-version": "2023-06-01"})
    assert resp.status_code == 200, resp.text
    assert KEY not in resp.text and "PROBE-SECRET" not in resp.text
    assert "[provider key]" in resp.text
    record = httpx.get(f"{gateway.base_url}/sessions/{session}", headers=AUTH, timeout=30)
    assert record.status_code == 200, record.text
    assert "PROBE-SECRET" not in record.text
    if path == "/chat/completions":  # the reply's text is recorded, with the key blanked
        assert "your key is [provider key]" in record.text
    assert "PROBE-SECRET" not in gateway.log_path.read_text()


SECRET = KEY.encode()
BODY = chunk("hi") + chunk(f"a {KEY} b") + b'data: {"error":{"message":"Bearer ' + SECRET + b'"}}\n\n' + SECRET


def _through(pieces: list[bytes]) -> tuple[bytes, list[bytes]]:
    blanker = KeyBlanker(SECRET)
    out = [blanker.feed(p) for p in pieces]
    return b"".join(out) + blanker.end(), out


def test_a_key_cut_anywhere_between_two_pieces_is_blanked() -> None:
    """Every cut of a body holding the key three times (one at its very end) gives the same blanked body."""
    expected = BODY.replace(SECRET, BLANKED_KEY)
    for cut in range(len(BODY) + 1):
        assert _through([BODY[:cut], BODY[cut:]])[0] == expected, cut


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(st.integers(0, len(BODY)), max_size=12))
def test_a_key_in_pieces_of_any_size_is_blanked(cuts: list[int]) -> None:
    """However the body is cut into pieces, the key never comes out, and nothing else changes."""
    bounds = [0, *sorted(cuts), len(BODY)]
    whole, out = _through([BODY[a:b] for a, b in itertools.pairwise(bounds)])
    assert whole == BODY.replace(SECRET, BLANKED_KEY)
    assert all(SECRET not in piece for piece in out)


def test_ordinary_stream_pieces_go_out_at_once() -> None:
    """A whole event, or a piece whose end cannot begin the key, is not held back; only bytes that
    could begin the key wait for the next piece."""
    blanker = KeyBlanker(SECRET)
    event = chunk("sure, s")
    assert blanker.feed(event) == event
    assert blanker.feed(b'data: {"x": "sky') == b'data: {"x": "sky'
    assert blanker.feed(b'data: {"x": "ask-P') == b'data: {"x": "a'
    assert blanker.feed(b'ROBE"}\n\n') == b'sk-PROBE"}\n\n'
    assert blanker.end() == b""


def test_a_key_under_an_encoding_named_on_two_header_lines_is_blanked(make_gateway: Callable[..., Gateway],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``Content-Encoding: gzip`` sent twice, as two header lines, is one list of two codings
    (RFC 9110): both are undone, so the key in the body is blanked. Reading the first line only
    relayed a still-gzipped body, key and all, with no ``Content-Encoding`` left to say so."""
    import gzip

    from multidict import CIMultiDict

    async def content(request: web.Request) -> web.Response:
        body = gzip.compress(gzip.compress(f"file text with {request.headers['Authorization']}".encode()))
        headers = CIMultiDict([("Content-Type", "text/plain"), ("Content-Encoding", "gzip"),
                               ("Content-Encoding", "gzip")])
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_get("/v1/files/{id}/content", content)
    server = _Server(app)
    monkeypatch.setenv("PROBE_KEY", KEY)
    try:
        gateway = make_gateway(upstreams=[{"name": "oa", "base_url": f"http://127.0.0.1:{server.port}/v1",
                                           "models": ["*"], "api_key_env": "PROBE_KEY", "accept_encoding": "gzip",
                                           "forward_routes": ["files"]}])
        resp = httpx.get(f"{gateway.base_url}/files/file-1/content", headers=AUTH, timeout=30)
    finally:
        server.stop()
    assert resp.status_code == 200, resp.text
    assert "content-encoding" not in resp.headers
    assert resp.content == b"file text with Bearer [provider key]", resp.content
