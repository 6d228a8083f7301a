"""Request bodies dripped a byte at a time, replayed over raw sockets against ``sessiongate
serve`` with a scaled-down connection cap: drippers that hold every slot (signed-in clients on
the model routes, and anyone at all on the console's sign-in form) do not keep a normal client
out, a body under ``server.body_min_rate`` is cut long before the idle or total body timeout,
and the console reads no more than a sign-in form's worth from someone who has not signed in."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from tests.conftest import ACME_KEY, GLOBEX_KEY
from tests.hostile.subprocess_gateway import ServedGateway, served_gateway
from tests.hostile.test_slow_clients import closed_counts, error_of, read_until_closed

CAP = 12
CHAT = b'{"model": "standin", "messages": [{"role": "user", "content": "hi"}]}'
DRIP_HEADS = (
    b"POST /console/login HTTP/1.1\r\nHost: gw\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    b"Content-Length: 5000\r\n\r\nt",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + GLOBEX_KEY.encode()
    + b"\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{",
)


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedGateway]:
    """A small cap, and body timeouts (the defaults: 30 s idle, 300 s in all) no dripper reaches during a test."""
    with served_gateway(tmp_path_factory.mktemp("drip"), server={"max_connections": CAP}) as served:
        yield served


@pytest.fixture(scope="module")
def floored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedGateway]:
    """A rate floor of 500 bytes/s after one second; the idle and total body timeouts far off."""
    limits = {"body_min_rate": 500, "body_rate_grace": 1.0, "body_idle_timeout": 30, "body_timeout": 300}
    with served_gateway(tmp_path_factory.mktemp("floor"), server=limits) as served:
        yield served


class Drippers:
    """*count* connections each sending a request head and then one body byte every *every* seconds,
    reconnecting when the gateway closes one (as an attacker would), until stopped."""

    def __init__(self, gw: ServedGateway, count: int, every: float = 0.25) -> None:
        self.gw, self.every = gw, every
        self.socks: list[socket.socket | None] = [None] * count
        self.reconnects = 0
        self._stop = threading.Event()
        for i in range(count):
            self.socks[i] = self._open(i)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _open(self, i: int) -> socket.socket | None:
        try:
            sock = self.gw.connect(timeout=2)
            sock.sendall(DRIP_HEADS[i % len(DRIP_HEADS)])
            return sock
        except OSError:
            return None

    def _run(self) -> None:
        deadline = time.monotonic() + 60  # stops by itself whatever happens to the test
        while not self._stop.wait(self.every) and time.monotonic() < deadline:
            for i, sock in enumerate(self.socks):
                try:
                    if sock is None:
                        raise OSError
                    sock.sendall(b" ")
                except OSError:
                    if sock is not None:
                        sock.close()
                    self.socks[i] = self._open(i)
                    self.reconnects += 1

    def halt(self) -> None:
        """Stop dripping; the connections stay open."""
        self._stop.set()
        self._thread.join(10)

    def stop(self) -> None:
        self.halt()
        for sock in self.socks:
            if sock is not None:
                sock.close()


def test_drippers_holding_the_cap_do_not_keep_a_client_out(capped: ServedGateway) -> None:
    """With more drippers than the cap (a client key on the chat route, no credentials at all on the console's
    sign-in form), a normal chat request is served every time: the slowest body is closed to make room."""
    before = closed_counts(capped).get("slow_body_evicted_at_cap", 0)
    drippers = Drippers(capped, CAP + 4)
    try:
        time.sleep(1.5)  # every dripper is past its first second: none is protected as a newcomer
        statuses = []
        for _ in range(4):
            with contextlib.suppress(httpx.HTTPError):
                reply = httpx.post(f"{capped.url}/v1/chat/completions", content=CHAT, timeout=10,
                                   headers={"Authorization": f"Bearer {ACME_KEY}", "Content-Type": "application/json"})
                statuses.append(reply.status_code)
            time.sleep(0.3)
    finally:
        drippers.stop()
    assert statuses == [200] * 4
    assert closed_counts(capped)["slow_body_evicted_at_cap"] >= before + 4


def test_evicted_dripper_gets_408_in_the_error_shape(capped: ServedGateway) -> None:
    """The dripper closed to make room is told why: 408 ``request_timeout``, in OpenAI's shape, then closed."""
    drippers = Drippers(capped, CAP)
    answers = []
    try:
        time.sleep(1.5)
        drippers.halt()
        with capped.connect() as sock:
            sock.sendall(DRIP_HEADS[1])  # the newcomer: it pushes out the slowest (every other one is as slow)
            time.sleep(0.5)
            for s in drippers.socks:
                if s is None:
                    continue
                s.setblocking(False)
                try:
                    pending = s.recv(1, socket.MSG_PEEK)
                except OSError:
                    pending = b""
                s.setblocking(True)
                if pending:
                    answers.append(error_of(read_until_closed(s)[0]))
    finally:
        drippers.stop()
    assert any(status == 408 and error["code"] == "request_timeout" and "connection limit" in error["message"]
               for status, error in answers), answers


def test_body_under_the_minimum_rate_is_cut_before_the_idle_timeout(floored: ServedGateway) -> None:
    """A body dripped a byte every 0.2 s (never idle for long) gets 408 once past the grace, long before the
    30 s idle or 300 s total body timeout."""
    before = closed_counts(floored).get("body_min_rate", 0)
    with floored.connect() as sock:
        sock.sendall(DRIP_HEADS[1])
        started, raw = time.monotonic(), b""
        sock.settimeout(0.2)
        while time.monotonic() - started < 10 and b"}}" not in raw:
            try:
                sock.sendall(b" ")
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            raw += chunk
        took = time.monotonic() - started
    status, error = error_of(raw)
    assert status == 408 and error["code"] == "request_timeout"
    assert took < 10
    assert closed_counts(floored)["body_min_rate"] >= before + 1


def test_body_above_the_minimum_rate_is_served(floored: ServedGateway) -> None:
    """A body sent at about 2 KB/s for two seconds, four times the floor, is read whole and answered."""
    body = CHAT[:-1] + b" " * 4000 + b"}"
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + ACME_KEY.encode()
            + b"\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
    with floored.connect() as sock:
        sock.sendall(head)
        for i in range(0, len(body), 400):
            sock.sendall(body[i:i + 400])
            time.sleep(0.2)
        raw, _ = read_until_closed(sock, 10)
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]


def test_console_sign_in_refuses_a_large_body_before_reading_it(capped: ServedGateway) -> None:
    """A sign-in post announcing 100 KB (no credentials, no cookie) gets 413 at once, without the gateway
    waiting for the body; the limit is a login form's worth."""
    with capped.connect() as sock:
        sock.sendall(b"POST /console/login HTTP/1.1\r\nHost: gw\r\nContent-Type: application/x-www-form-urlencoded"
                     b"\r\nContent-Length: 100000\r\n\r\ntoken=")
        sock.settimeout(3)
        raw = sock.recv(65536)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert orjson.loads(body)["error"]["code"] == "payload_too_large"


def test_console_sign_in_refuses_a_large_chunked_body(capped: ServedGateway) -> None:
    """The same limit holds for a chunked sign-in post, which announces no length: 413 once past it."""
    chunk = b"a" * 4096
    with capped.connect() as sock:
        sock.sendall(b"POST /console/login HTTP/1.1\r\nHost: gw\r\nContent-Type: application/x-www-form-urlencoded"
                     b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(4):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sock.settimeout(3)
        raw = sock.recv(65536)
    assert raw.startswith(b"HTTP/1.1 413")
