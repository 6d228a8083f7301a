"""Slow and idle clients, replayed over raw sockets against ``sessiongate serve`` with small
configured limits: a head that does not arrive in time, a body that stalls, idle keep-alive
connections, and a connection cap filled with slowloris sockets that still lets a normal
client through."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_for
from tests.hostile.subprocess_gateway import ServedGateway, served_gateway

HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sg-demo-acme\r\n" \
       b"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n"
CAP = 12


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedGateway]:
    limits = {"header_timeout": 0.6, "body_idle_timeout": 0.6, "body_timeout": 1.5, "keepalive_timeout": 0.6,
              "max_connections": CAP}
    with served_gateway(tmp_path_factory.mktemp("slow"), server=limits) as served:
        yield served


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedGateway]:
    """A gateway whose slowloris sockets would hold for 5 s, far longer than a normal request takes."""
    limits = {"header_timeout": 5.0, "body_idle_timeout": 0.6, "body_timeout": 1.5, "max_connections": CAP}
    with served_gateway(tmp_path_factory.mktemp("capped"), server=limits) as served:
        yield served


def read_until_closed(sock: socket.socket, limit: float = 5.0) -> tuple[bytes, float]:
    """Everything the gateway sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    sock.settimeout(limit)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out, time.monotonic() - started


def error_of(raw: bytes) -> tuple[int, dict[str, str]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    doc = orjson.loads(body)
    assert set(doc["error"]) >= {"message", "type", "code"}
    return int(head.split(b" ")[1]), doc["error"]


def closed_counts(gw: ServedGateway) -> dict[str, float]:
    text = httpx.get(f"{gw.url}/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name == "sessiongate_connections_closed":
            return {s.labels["reason"]: s.value for s in family.samples}
    raise AssertionError("no sessiongate_connections_closed in /metrics")


def test_slow_head_gets_408_and_is_closed(gw: ServedGateway) -> None:
    """Part of a request head and then nothing: 408 in OpenAI's shape after the header timeout, then closed."""
    with gw.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Slow: ")
        raw, _ = read_until_closed(sock)
    status, error = error_of(raw)
    assert status == 408 and error["code"] == "request_timeout"


def test_silent_connection_is_closed_after_the_header_timeout(gw: ServedGateway) -> None:
    """A connection that never sends a byte is closed (with nothing written) once the header timeout passes."""
    with gw.connect() as sock:
        raw, _ = read_until_closed(sock)
    assert raw == b""


def test_slowloris_dripping_head_is_closed(gw: ServedGateway) -> None:
    """A head dripped one header at a time never completes, however steadily it drips: closed at the timeout."""
    with gw.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        closed = False
        for i in range(40):
            try:
                sock.sendall(b"X-%d: a\r\n" % i)
            except OSError:
                closed = True
                break
            time.sleep(0.1)
        if not closed:
            sock.settimeout(1)
            try:
                closed = sock.recv(65536) is not None
            except OSError:
                closed = True
    assert closed


def test_stalled_body_gets_408_and_is_closed(gw: ServedGateway) -> None:
    """A complete head and a body that stops: 408 in OpenAI's shape once the body idle timeout passes, then closed."""
    with gw.connect() as sock:
        sock.sendall(HEAD + b'{"model": "standin", ')
        raw, _ = read_until_closed(sock)
    status, error = error_of(raw)
    assert status == 408 and error["type"] == "invalid_request_error"


def test_dripping_body_hits_the_total_body_timeout(gw: ServedGateway) -> None:
    """A body that keeps arriving a byte at a time, never idle for long, is still cut at the total body timeout."""
    with gw.connect() as sock:
        sock.sendall(HEAD)
        raw = b""
        for _ in range(60):
            try:
                sock.sendall(b" ")
            except OSError:
                break
            sock.settimeout(0.1)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            raw += chunk
            if not chunk or b"}}" in raw:
                break
    status, error = error_of(raw)
    assert status == 408 and error["code"] == "request_timeout"


def test_idle_keepalive_connection_is_closed(gw: ServedGateway) -> None:
    """After a response, a keep-alive connection that stays idle is closed by the keep-alive timeout."""
    with gw.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        raw, _ = read_until_closed(sock)
    assert raw.startswith(b"HTTP/1.1 200") and b'"ok"' in raw


@pytest.fixture(scope="module")
def lasting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedGateway]:
    """A gateway whose idle keep-alive connections outlast its header timeout many times over."""
    limits = {"header_timeout": 0.3, "body_idle_timeout": 2.0, "body_timeout": 5.0, "keepalive_timeout": 1.5}
    with served_gateway(tmp_path_factory.mktemp("lasting"), server=limits) as served:
        yield served


CHAT_BODY = orjson.dumps({"model": "standin", "messages": [{"role": "user", "content": "hello there"}]})
CHAT_HEAD = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sg-demo-acme\r\n"
             b"Content-Type: application/json\r\n")


def chunked(body: bytes, size: int) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                    for i in range(0, len(body), size)) + b"0\r\n\r\n"


@pytest.mark.parametrize("segments", [
    [CHAT_HEAD + b"Content-Length: %d\r\n\r\n" % len(CHAT_BODY), CHAT_BODY],
    [CHAT_HEAD + b"Content-Length: %d\r\n\r\n" % len(CHAT_BODY), CHAT_BODY[:10], CHAT_BODY[10:]],
    [CHAT_HEAD + b"Transfer-Encoding: chunked\r\n\r\n", chunked(CHAT_BODY, 40)],
    [CHAT_HEAD + b"Transfer-Encoding: chunked\r\n\r\n", *(bytes([b]) for b in chunked(CHAT_BODY, 7))],
], ids=["length-head-then-body", "length-body-in-two", "chunked-head-then-body", "chunked-a-byte-at-a-time"])
def test_a_body_in_its_own_segments_leaves_the_idle_connection_alone(lasting: ServedGateway,
                                                                      segments: list[bytes]) -> None:
    """A body sent apart from its head (as the openai SDK sends it) is answered once; the idle keep-alive
    connection then gets nothing more, no 408, until the keep-alive timeout closes it, and no header timeout
    is counted."""
    before = closed_counts(lasting)["header_timeout"]
    with lasting.connect() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for segment in segments:
            sock.sendall(segment)
            time.sleep(0.05 if len(segments) < 5 else 0.001)
        raw, _ = read_until_closed(sock)
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert raw.count(b"HTTP/1.1 ") == 1, raw
    assert closed_counts(lasting)["header_timeout"] == before


def test_a_stalled_head_on_a_keepalive_connection_still_gets_408(lasting: ServedGateway) -> None:
    """After a request with a body, part of a next request head and then nothing: 408 at the header timeout."""
    with lasting.connect() as sock:
        sock.sendall(CHAT_HEAD + b"Content-Length: %d\r\n\r\n" % len(CHAT_BODY) + CHAT_BODY)
        time.sleep(0.1)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Slow: ")
        raw, _ = read_until_closed(sock)
    first, _, second = raw.partition(b"HTTP/1.1 408 ")
    assert first.startswith(b"HTTP/1.1 200 ") and b"request_timeout" in second


def test_cap_full_of_slowloris_sockets_still_serves_a_normal_client(capped: ServedGateway) -> None:
    """With twice the cap in slowloris sockets opened, a normal client is served long before any of them hits the
    header timeout: connections with no request in progress (once past their first second) are the ones closed
    to make room."""
    counts = closed_counts(capped)
    socks = []
    try:
        started = time.monotonic()
        for _ in range(CAP * 2):
            s = capped.connect()
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Slow: ")
            socks.append(s)
        served = None
        while served is None and time.monotonic() - started < 5.0:
            with contextlib.suppress(httpx.HTTPError):
                reply = httpx.get(f"{capped.url}/healthz", timeout=5)
                if reply.status_code == 200:
                    served = time.monotonic() - started
                else:
                    assert reply.status_code == 503 and reply.json()["error"]["code"] == "too_many_connections"
            time.sleep(0.1)
        assert served is not None and served < 5.0  # the header timeout: no slowloris socket had to expire
        after = closed_counts(capped)
        assert after["evicted_at_cap"] >= counts["evicted_at_cap"] + 1
        assert after["header_timeout"] == counts["header_timeout"]
    finally:
        for s in socks:
            s.close()


def test_cap_full_of_busy_requests_refuses_with_503(capped: ServedGateway) -> None:
    """When every connection has a request in progress, a new one gets 503 in OpenAI's shape (and is counted);
    once the stalled bodies time out, clients are served again."""
    before = closed_counts(capped).get("refused_at_cap", 0)
    socks = []
    try:
        for _ in range(CAP):
            s = capped.connect()
            s.sendall(HEAD + b"{")
            socks.append(s)
        time.sleep(0.1)
        with capped.connect() as extra:
            raw, _ = read_until_closed(extra)
        status, error = error_of(raw)
        assert status == 503 and error["code"] == "too_many_connections"
        # the body idle timeout frees the slots
        wait_for(lambda: httpx.get(f"{capped.url}/healthz", timeout=5).status_code == 200)
        assert closed_counts(capped)["refused_at_cap"] >= before + 1
    finally:
        for s in socks:
            s.close()
