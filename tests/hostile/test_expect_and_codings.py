"""What a request head alone decides is refused before the body is read: ``Expect: 100-continue``
gets no ``100 Continue`` for a missing or unknown key or a Content-Length over the limit, and a
transfer coding other than a lone ``chunked`` is 501 (RFC 9112 §6.1), never forwarded. Replayed
over raw sockets, each refusal in the error shape of the route's protocol."""

from __future__ import annotations

import gzip
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from tests.conftest import ACME_KEY, Gateway, Upstream

CHAT = orjson.dumps({"model": "standin", "messages": [{"role": "user", "content": "hi"}]})
MESSAGES = orjson.dumps({"model": "claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})


def open_socket(gateway: Gateway) -> socket.socket:
    target = urlsplit(gateway.url)
    return socket.create_connection((target.hostname, target.port), timeout=10)


def read_until_closed(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length, read without waiting for the connection to close."""
    out = b""
    while b"\r\n\r\n" not in out:
        chunk = sock.recv(65536)
        assert chunk, out
        out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    length = next(int(line.partition(b":")[2]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def parse(raw: bytes) -> tuple[int, dict[str, str], Any]:
    """Status, headers (lower-case names) and JSON body of the one response in *raw*."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:]))
    return int(lines[0].split(" ")[1]), headers, orjson.loads(body)


def expect_head(path: str, credentials: bytes, length: int) -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: gw\r\n" + credentials
            + b"Content-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % length)


@pytest.mark.parametrize(("path", "credentials", "body"), [
    ("/v1/chat/completions", b"", CHAT),
    ("/v1/chat/completions", b"Authorization: Bearer sg-not-a-key\r\n", CHAT),
    ("/v1/messages", b"x-api-key: sg-not-a-key\r\n", MESSAGES),
    ("/v1/sessions/s1", b"Authorization: Bearer sg-not-a-key\r\n", b'{"full_context": []}'),
], ids=["chat-missing", "chat-unknown", "messages-unknown", "session-import-unknown"])
def test_expect_continue_without_a_valid_key_is_401_before_any_100(gateway: Gateway, upstream: Upstream, path: str,
                                                                   credentials: bytes, body: bytes) -> None:
    """A missing or unknown key with ``Expect: 100-continue`` is answered 401 at once, in the route's
    protocol's shape, with no ``100 Continue`` first, and the connection is to close, its body never sent."""
    method = b"PUT " if path.startswith("/v1/sessions/") else b"POST "
    with open_socket(gateway) as sock:
        sock.sendall(expect_head(path, credentials, len(body)).replace(b"POST ", method, 1))
        raw = read_response(sock)
    assert not raw.startswith(b"HTTP/1.1 100")
    status, headers, doc = parse(raw)
    assert status == 401 and headers["connection"] == "close"
    if path == "/v1/messages":
        assert doc["type"] == "error" and doc["error"]["type"] == "authentication_error"
    else:
        assert doc["error"]["code"] == "invalid_api_key"
    assert b"sg-not-a-key" not in raw
    assert upstream.requests == []


def test_expect_continue_over_the_size_limit_is_413_before_any_100(make_gateway: Callable[..., Gateway],
                                                                   upstream: Upstream) -> None:
    """A Content-Length over ``server.max_body_bytes`` with ``Expect: 100-continue`` is answered 413 at once,
    with no ``100 Continue`` first."""
    gateway = make_gateway(server={"host": "127.0.0.1", "port": 0, "max_body_bytes": 2048})
    with open_socket(gateway) as sock:
        sock.sendall(expect_head("/v1/chat/completions", f"Authorization: Bearer {ACME_KEY}\r\n".encode(), 99_999_999))
        raw = read_response(sock)
    assert not raw.startswith(b"HTTP/1.1 100")
    status, headers, doc = parse(raw)
    assert status == 413 and doc["error"]["code"] == "payload_too_large" and headers["connection"] == "close"
    assert upstream.requests == []


def test_expect_continue_with_a_valid_key_gets_100_then_its_answer(gateway: Gateway, upstream: Upstream) -> None:
    """With a valid key and a body within the limit the client gets ``100 Continue``, sends, and is answered."""
    with open_socket(gateway) as sock:
        sock.sendall(expect_head("/v1/chat/completions", f"Authorization: Bearer {ACME_KEY}\r\n".encode(), len(CHAT))
                     .replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        assert sock.recv(25).startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(CHAT)
        raw = read_until_closed(sock)
    assert raw.lstrip(b"\r\n").startswith(b"HTTP/1.1 200")
    assert len(upstream.requests) == 1


def test_expect_continue_on_a_path_without_a_route_gets_one_100_at_most(gateway: Gateway) -> None:
    """A 404 or 405 (aiohttp's own routes, whose handler sends the 100) is preceded by one ``100 Continue`` at
    most, never two."""
    for method, path in ((b"POST", b"/nothing"), (b"DELETE", b"/healthz")):
        with open_socket(gateway) as sock:
            sock.sendall(method + b" " + path + b" HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\n"
                         b"Content-Length: 2\r\n\r\n")
            raw = b""
            while b"{" not in raw:
                raw += sock.recv(65536)
        assert raw.count(b"100 Continue") <= 1 and (b" 404 " in raw or b" 405 " in raw)


def chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


@pytest.mark.parametrize("codings", [
    [b"gzip, chunked"],
    [b"deflate,chunked"],
], ids=["gzip-chunked", "deflate-chunked"])
@pytest.mark.parametrize(("path", "body", "credentials"), [
    ("/v1/chat/completions", CHAT, b"Authorization: Bearer " + ACME_KEY.encode() + b"\r\n"),
    ("/v1/messages", MESSAGES, b"x-api-key: " + ACME_KEY.encode() + b"\r\n"),
], ids=["chat", "messages"])
def test_a_transfer_coding_other_than_chunked_is_501_and_never_forwarded(
        gateway: Gateway, upstream: Upstream, codings: list[bytes], path: str, body: bytes, credentials: bytes) -> None:
    """``Transfer-Encoding: gzip, chunked`` (or any coding besides a lone ``chunked``) is 501 in the route's
    protocol's shape, naming no value, with ``x-should-retry: false``; nothing reaches the upstream."""
    te = b"".join(b"Transfer-Encoding: " + c + b"\r\n" for c in codings)
    with open_socket(gateway) as sock:
        sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: gw\r\n" + credentials
                     + b"Content-Type: application/json\r\nConnection: close\r\n" + te + b"\r\n"
                     + chunked(gzip.compress(body)))
        raw = read_until_closed(sock)
    status, headers, doc = parse(raw)
    assert status == 501 and headers["x-should-retry"] == "false"
    if path == "/v1/messages":
        assert doc["type"] == "error" and "Transfer-Encoding" in doc["error"]["message"]
    else:
        assert doc["error"]["code"] == "unsupported_transfer_encoding"
    assert b"gzip" not in raw.partition(b"\r\n\r\n")[2] and b"deflate" not in raw
    assert upstream.requests == []


@pytest.mark.parametrize("coding", [b"chunked", b"Chunked"])
def test_a_lone_chunked_is_still_taken(gateway: Gateway, upstream: Upstream, coding: bytes) -> None:
    """``Transfer-Encoding: chunked`` alone, in any case, is framing the gateway undoes: answered as usual."""
    with open_socket(gateway) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + ACME_KEY.encode()
                     + b"\r\nContent-Type: application/json\r\nConnection: close\r\nTransfer-Encoding: " + coding
                     + b"\r\n\r\n" + chunked(CHAT))
        raw = read_until_closed(sock)
    assert raw.startswith(b"HTTP/1.1 200")
    assert len(upstream.requests) == 1
