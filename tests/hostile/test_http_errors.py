"""aiohttp's own refusals, a non-UTF-8 key, a bad chunked body and a client that hangs up
mid-body, replayed over raw sockets against ``sessiongate serve``: every error is in the shape
of the route's protocol (OpenAI's; Anthropic's on ``/v1/messages``), no header value is echoed,
and nothing of the request (the canary key) reaches the log."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from gateway.errors import InvalidSessionId
from gateway.stages.resolve_session import check_session_id
from tests.hostile.subprocess_gateway import ServedGateway, served_gateway

CANARY = b"sg-CANARY-7f3a9c2e41"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedGateway]:
    with served_gateway(tmp_path_factory.mktemp("http-errors")) as served:
        yield served


def exchange(gw: ServedGateway, *parts: bytes, pause: float = 0.0, close_write: bool = False) -> bytes:
    """Send *parts* (pausing between them), then read until the gateway closes or goes quiet."""
    with gw.connect() as sock:
        for i, part in enumerate(parts):
            if i and pause:
                time.sleep(pause)
            sock.sendall(part)
        if close_write:
            sock.shutdown(socket.SHUT_WR)
        sock.settimeout(3)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and _complete(out):
                    break
        except TimeoutError:
            pass
        return out


def _complete(raw: bytes) -> bool:
    head, _, body = raw.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def error_of(raw: bytes) -> tuple[int, dict[str, str]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    doc = orjson.loads(body)
    assert set(doc) == {"error"} and {"message", "type", "code"} <= set(doc["error"]), doc
    assert all(isinstance(doc["error"][k], str) for k in ("message", "type", "code"))
    return status, doc["error"]


def request(header_value: bytes, path: bytes = b"/v1/sessions") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + header_value + b"\r\n\r\n"


BAD_HEADERS = {
    "control-byte": CANARY + b"\x01",
    "nul": CANARY + b"\x00tail",
    "escape": CANARY + b"\x1b[31m",
    "9kb-junk": CANARY + b"j" * 9 * 1024,
    "bare-cr": CANARY + b"\rX-Other: 1",
    "del": CANARY + b"\x7f",
}


@pytest.mark.parametrize("value", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_invalid_header_bytes_get_openai_shape_without_echo(gw: ServedGateway, value: bytes) -> None:
    """A key followed by a control byte, NUL or 9 KB of junk is refused in OpenAI's shape, echoed nowhere."""
    raw = exchange(gw, request(value))
    status, error = error_of(raw)
    assert status in (400, 401, 431)
    assert CANARY not in raw and b"CANARY" not in raw
    assert "CANARY" not in gw.stderr()


RAW_REQUESTS = {
    "bad-request-line": b"GET /v1/" + CANARY + b" HTTP/1.1 extra\r\nHost: gw\r\n\r\n",
    "bad-method": b"G\x01T /v1/sessions HTTP/1.1\r\nAuthorization: Bearer " + CANARY + b"\r\n\r\n",
    "not-http": b"\x16\x03\x01\x02\x00" + CANARY + b"\r\n\r\n",
    "long-request-line": b"GET /v1/" + CANARY + b"x" * 9000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n",
    "bad-header-name": b"GET /v1/sessions HTTP/1.1\r\nHost: gw\r\nX(" + CANARY + b": 1\r\n\r\n",
    "too-many-headers": b"GET /v1/sessions HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, CANARY) for i in range(200))
                        + b"\r\n",
    "bad-chunk-size": b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
                      b"Authorization: Bearer " + CANARY + b"\r\n\r\nzz\r\n" + CANARY + b"\r\n0\r\n\r\n",
    "conflicting-length": b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n"
                          b"Content-Length: 7\r\nAuthorization: Bearer " + CANARY + b"\r\n\r\nabcdefg",
    "bad-version": b"GET /v1/sessions HTTP/9.Z\r\nAuthorization: Bearer " + CANARY + b"\r\n\r\n",
    # request smuggling: framings a proxy in front of the gateway could read otherwise
    "length-and-chunked": b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n"
                          b"Transfer-Encoding: chunked\r\nAuthorization: Bearer " + CANARY + b"\r\n\r\n0\r\n\r\n"
                          b"GET /v1/sessions HTTP/1.1\r\nHost: gw\r\n\r\n",
    "two-transfer-encodings": b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
                              b"Transfer-Encoding: identity\r\nAuthorization: Bearer " + CANARY
                              + b"\r\n\r\n0\r\n\r\n",
    "unknown-transfer-encoding": b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: xchunked"
                                 b"\r\nAuthorization: Bearer " + CANARY + b"\r\n\r\n0\r\n\r\n",
    "space-before-colon": b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding : chunked"
                          b"\r\nAuthorization: Bearer " + CANARY + b"\r\n\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("raw", RAW_REQUESTS.values(), ids=RAW_REQUESTS.keys())
def test_aiohttp_parser_errors_get_openai_shape_without_echo(gw: ServedGateway, raw: bytes) -> None:
    """Every refusal aiohttp's parser makes is OpenAI's error shape, with nothing of the request in it or the log."""
    reply = exchange(gw, raw)
    status, _ = error_of(reply)
    assert 400 <= status < 500
    assert b"CANARY" not in reply
    assert "CANARY" not in gw.stderr()


@pytest.mark.parametrize("suffix", ["é€".encode(), "é".encode("latin-1"), b"\xff\xfe\x80"],
                         ids=["utf8-non-latin1", "latin1", "invalid-utf8"])
def test_non_ascii_authorization_is_a_401_not_a_500(gw: ServedGateway, suffix: bytes) -> None:
    """Bytes outside ASCII in Authorization are an unknown or malformed key (401), never a 500."""
    reply = exchange(gw, request(CANARY + suffix))
    status, error = error_of(reply)
    assert status == 401 and error["type"] == "authentication_error"
    assert b"CANARY" not in reply
    assert "CANARY" not in gw.stderr()


def test_bad_chunk_after_the_head_is_a_400(gw: ServedGateway) -> None:
    """Broken chunked framing that arrives while the handler reads the body is a 400 in shape, not a 500."""
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sg-demo-acme\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n")
    reply = exchange(gw, head, b"zz-" + CANARY + b"\r\n", pause=0.3)
    status, error = error_of(reply)
    assert status == 400 and error["type"] == "invalid_request_error"
    assert b"CANARY" not in reply
    stderr = gw.stderr()
    assert "CANARY" not in stderr and "Traceback" not in stderr and "unhandled_error" not in stderr


def test_bad_chunk_on_messages_is_a_400_in_anthropics_shape(gw: ServedGateway) -> None:
    """The same on ``/v1/messages``: the refusal is in Anthropic's shape, which its SDK parses."""
    head = (b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: sg-demo-acme\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n")
    reply = exchange(gw, head, b"zz-" + CANARY + b"\r\n", pause=0.3)
    head_part, _, body = reply.partition(b"\r\n\r\n")
    doc = orjson.loads(body)
    assert int(head_part.split(b" ")[1]) == 400
    assert doc == {"type": "error", "error": {"type": "invalid_request_error", "message": doc["error"]["message"]}}
    assert "chunked" in doc["error"]["message"] and b"CANARY" not in reply


def test_client_that_hangs_up_mid_body_is_a_quiet_info_line(gw: ServedGateway) -> None:
    """Half a body then a closed socket: a ``client_disconnected`` info line, no traceback, no error log."""
    before = gw.stderr()
    with gw.connect() as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sg-demo-acme\r\n"
                     b"X-Session-Id: hangup\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n"
                     b'{"model": "standin", "messages": [{"role": "user", "content": "' + CANARY)
        time.sleep(0.3)
    deadline = time.monotonic() + 5
    while "client_disconnected" not in gw.stderr()[len(before):] and time.monotonic() < deadline:
        time.sleep(0.05)
    new = gw.stderr()[len(before):]
    assert "client_disconnected" in new
    assert "Traceback" not in new and "unhandled_error" not in new and '"level":"error"' not in new
    assert "CANARY" not in new


@pytest.mark.parametrize("value", ["abc\n", "abc\r\n", "a\nb", "abc\x00"])
def test_session_id_must_match_in_full(value: str) -> None:
    """A trailing newline (which ``$`` lets through) or any control character makes an id invalid."""
    with pytest.raises(InvalidSessionId):
        check_session_id(value)
    assert check_session_id("abc") == "abc"


def test_session_id_with_a_newline_is_refused_over_http(gw: ServedGateway) -> None:
    """``/v1/sessions/abc%0A`` is a 400 ``invalid_session_id``, not the session ``abc\\n``."""
    reply = exchange(gw, request(b"sg-demo-acme", path=b"/v1/sessions/abc%0A"))
    status, error = error_of(reply)
    assert status == 400 and error["code"] == "invalid_session_id"


def test_log_files_hold_no_canary(gw: ServedGateway, tmp_path: Path) -> None:
    """After every case above, nothing the gateway wrote (db, WAL, logs) holds the canary."""
    assert b"CANARY" not in gw.written()
