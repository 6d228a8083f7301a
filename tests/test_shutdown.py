"""Graceful shutdown never waits for a body nobody will read: after a 413 for a body still
arriving (or stalled), SIGTERM ends ``sessiongate serve`` within a couple of seconds, and the
rounds committed before are in the store. A request whose head came before SIGTERM (or was on its
way: in the listen backlog, or partly sent) still gets its body and its answer, the connection's
last; one still waiting for the provider after
``server.shutdown_timeout`` is cancelled and recorded incomplete, ended by the shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.conftest import ACME_KEY, Upstream, chat_provider, wait_for
from tests.hostile.subprocess_gateway import served_gateway
from tests.provider import Provider, provider  # noqa: F401

LIMIT = 2048
EXIT_BOUND = 5.0
"""A correctness bound (aiohttp's lingering close used to hold shutdown for ten seconds), not a benchmark."""


def chat(url: str, session: str) -> None:
    r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {ACME_KEY}",
                                                          "X-Session-Id": session},
                   json={"model": "standin", "messages": [{"role": "user", "content": "before shutdown"}]}, timeout=30)
    assert r.status_code == 200


def read_response(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    out = b""
    while b"\r\n\r\n" not in out:
        chunk = sock.recv(65536)
        if not chunk:
            break
        out += chunk
    return out


HEADS = {
    "content-length": (b"Content-Length: %d\r\n" % (LIMIT * 50), b"x" * 512),
    "chunked": (b"Transfer-Encoding: chunked\r\n", (b"%x\r\n" % (LIMIT + 512)) + b"x" * (LIMIT + 512) + b"\r\n"),
}


@pytest.mark.parametrize("framing", HEADS.values(), ids=HEADS.keys())
def test_sigterm_after_a_413_for_an_unread_body_exits_promptly(tmp_path: Path, framing: tuple[bytes, bytes]) -> None:
    """A 413 whose body never finishes arriving does not hold SIGTERM; the round committed before is kept."""
    header, body = framing
    # a long grace for in-flight requests: a connection that only lingers over an unread body must not use it
    with served_gateway(tmp_path / "gw", server={"max_body_bytes": LIMIT, "body_idle_timeout": 60,
                                                 "body_timeout": 600, "keepalive_timeout": 60,
                                                 "shutdown_timeout": 10}) as gw:
        chat(gw.url, "kept")
        sock = gw.connect()
        try:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + ACME_KEY.encode()
                         + b"\r\nContent-Type: application/json\r\n" + header + b"\r\n" + body)
            assert read_response(sock).startswith(b"HTTP/1.1 413")
            idle = gw.connect()  # and an idle keep-alive connection, for good measure
            idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
            assert read_response(idle).startswith(b"HTTP/1.1 200")
            took = gw.stop(timeout=30)
            idle.close()
        finally:
            sock.close()
        assert gw.proc.returncode == 0, gw.stderr()[-2000:]
        assert took < EXIT_BOUND, f"shutdown took {took:.1f} s"
    with sqlite3.connect(tmp_path / "gw" / "gateway.db") as conn:
        rows = conn.execute("SELECT COUNT(*) FROM rounds WHERE tenant='acme' AND session_id='kept'").fetchone()
    assert rows[0] == 1


def test_sigterm_during_a_stalled_body_exits_promptly(tmp_path: Path) -> None:
    """A request whose body stalls mid-way is cancelled on SIGTERM within the shutdown grace, not after the body
    timeout."""
    with served_gateway(tmp_path / "gw", server={"body_idle_timeout": 60, "body_timeout": 600,
                                                 "shutdown_timeout": 1.0}) as gw:
        with gw.connect() as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
                         + ACME_KEY.encode() + b"\r\nContent-Length: 500\r\n\r\n{\"messages\": ")
            time.sleep(0.2)
            took = gw.stop(timeout=30)
        assert took < EXIT_BOUND, f"shutdown took {took:.1f} s"
        assert "Traceback" not in gw.stderr()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_lets_an_in_flight_round_commit(tmp_path: Path, upstream: Upstream, sig: int) -> None:
    """A chat in flight when SIGTERM arrives finishes within the grace, its client gets the reply, and the round
    is in the store. SIGHUP (a closing terminal or ssh session) drains the same way: it used to end the
    process at once, the round answered by the model in no record and no audit entry."""
    import threading

    from gateway.standin import default_reply

    def slow(body: dict[str, Any]) -> Any:
        time.sleep(0.8)
        return default_reply(body)

    upstream.reply = slow
    result: dict[str, int] = {}
    with served_gateway(tmp_path / "gw", upstream.url, server={"shutdown_timeout": 3.0}) as gw:
        def call() -> None:
            r = httpx.post(f"{gw.url}/v1/chat/completions", timeout=30, headers={
                "Authorization": f"Bearer {ACME_KEY}", "X-Session-Id": "in-flight"},
                json={"model": "standin", "messages": [{"role": "user", "content": "slow one"}]})
            result["status"] = r.status_code

        client = threading.Thread(target=call)
        client.start()
        wait = time.monotonic() + 10
        while not upstream.requests and time.monotonic() < wait:
            time.sleep(0.02)
        took = gw.stop(timeout=30, sig=sig)
        client.join(10)
        assert gw.proc.returncode == 0, gw.proc.returncode
    assert took < EXIT_BOUND
    assert result.get("status") == 200
    with sqlite3.connect(tmp_path / "gw" / "gateway.db") as conn:
        rows = conn.execute("SELECT outcome FROM rounds WHERE tenant='acme' AND session_id='in-flight'").fetchall()
    assert rows == [("completed",)]


def test_a_stream_cut_by_shutdown_is_recorded_with_what_the_client_got(tmp_path: Path,
                                                                       provider: Provider) -> None:  # noqa: F811
    """SIGTERM while a stream is held by the provider: after the grace the stream is cut, and
    the round is stored incomplete with the reply text the client already has (it was stored
    with none), ended by the shutdown."""
    import threading

    received: list[str] = []
    got_some = threading.Event()
    with served_gateway(tmp_path / "gw", provider.url, server={"shutdown_timeout": 0.5}) as gw:
        def call() -> None:
            with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=30, headers={
                    "Authorization": f"Bearer {ACME_KEY}", "X-Session-Id": "cut-by-shutdown"},
                    json={"model": "held", "stream": True, "messages": [{"role": "user", "content": "tell me"}]}) as r:
                try:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            received.append(line)
                            if '"content":"provider' in line.replace(" ", ""):
                                got_some.set()
                except httpx.HTTPError:
                    pass

        client = threading.Thread(target=call)
        client.start()
        assert got_some.wait(15), received
        gw.stop(timeout=30)
        client.join(10)
    provider.release.set()
    with served_gateway(tmp_path / "gw", provider.url) as again:
        full = httpx.get(f"{again.url}/v1/sessions/cut-by-shutdown",
                         headers={"Authorization": f"Bearer {ACME_KEY}"}, timeout=30).json()["full_context"]
    assert full[0] == {"role": "user", "content": "tell me"}
    assert full[1]["role"] == "assistant" and full[1]["content"].startswith("provider")
    with sqlite3.connect(tmp_path / "gw" / "gateway.db") as conn:
        outcomes = conn.execute("SELECT outcome FROM rounds WHERE session_id='cut-by-shutdown'").fetchall()
        bodies = [b for (b,) in conn.execute("SELECT body FROM audit WHERE tenant='acme' ORDER BY seq")]
    assert outcomes == [("incomplete",)]
    assert any(b'"ended_by":"shutdown"' in b for b in bodies)


GRACE = 3.0


def test_rounds_cut_by_shutdown_before_the_reply_are_incomplete_not_upstream_errors(tmp_path: Path) -> None:
    """A non-streamed chat and a stream, both waiting for a provider that has not answered (no headers yet),
    when SIGTERM comes: after ``shutdown_timeout`` they are cancelled and each round is recorded
    ``incomplete``, ``ended_by: shutdown``: the provider did not fail (they were ``upstream_error``, blaming
    it). The cancellation comes after one grace, not two (aiohttp's own shutdown waits the grace twice)."""
    asked: list[bool] = []
    release = threading.Event()

    async def thinking(request: web.Request) -> web.Response:
        asked.append(bool((await request.json()).get("stream")))
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 60)
        return web.json_response({"error": {"message": "too late", "type": "server_error"}}, status=500)

    def call(session: str, stream: bool) -> None:
        with contextlib.suppress(httpx.HTTPError):  # cut off by the shutdown: no reply
            httpx.post(f"{gw.url}/v1/chat/completions", timeout=60, headers={
                "Authorization": f"Bearer {ACME_KEY}", "X-Session-Id": session},
                json={"model": "m", "stream": stream, "messages": [{"role": "user", "content": "think"}]})

    try:
        with chat_provider(thinking) as url, served_gateway(tmp_path / "gw", url,
                                                           server={"shutdown_timeout": GRACE}) as gw:
            clients = [threading.Thread(target=call, args=(f"cut-{kind}", kind == "stream"))
                       for kind in ("json", "stream")]
            for client in clients:
                client.start()
            wait_for(lambda: len(asked) == 2)
            took = gw.stop(timeout=30)
            for client in clients:
                client.join(30)
            assert gw.proc.returncode == 0, gw.stderr()[-2000:]
    finally:
        release.set()
    assert took < 2 * GRACE, f"shutdown took {took:.1f} s"  # cancelled after one grace, then settled at once
    with sqlite3.connect(tmp_path / "gw" / "gateway.db") as conn:
        outcomes = dict(conn.execute("SELECT session_id, outcome FROM rounds WHERE tenant='acme'").fetchall())
        bodies = [json.loads(b) for (b,) in conn.execute("SELECT body FROM audit WHERE tenant='acme' ORDER BY seq")]
    assert outcomes == {"cut-json": "incomplete", "cut-stream": "incomplete"}
    rounds = [b for b in bodies if b.get("event") == "round"]
    assert len(rounds) == 2
    for entry in rounds:
        assert (entry["outcome"], entry["ended_by"], entry.get("upstream_status")) == ("incomplete", "shutdown", None)


def read_to_end(sock: socket.socket) -> bytes:
    """Every byte the gateway sends until it closes the connection."""
    sock.settimeout(15)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def shutting_down(gw: Any) -> bool:
    return '"event":"shutting_down"' in gw.stderr().replace(" ", "")


CHAT_HEAD = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + ACME_KEY.encode()
             + b"\r\nContent-Type: application/json\r\n")
LATE_BODY = json.dumps({"model": "standin", "messages": [{"role": "user", "content": "body after SIGTERM"}]}).encode()
LATE_FRAMING = {
    "content-length": (b"Content-Length: %d\r\n" % len(LATE_BODY), LATE_BODY),
    "chunked": (b"Transfer-Encoding: chunked\r\n", b"%x\r\n%s\r\n0\r\n\r\n" % (len(LATE_BODY), LATE_BODY)),
}


@pytest.mark.parametrize("framing", LATE_FRAMING.values(), ids=LATE_FRAMING.keys())
def test_a_body_arriving_after_sigterm_is_read_and_answered(tmp_path: Path, framing: tuple[bytes, bytes]) -> None:
    """The head of a chat came before SIGTERM (the gateway is handling it: it answered ``100 Continue``), its
    body after the shutdown began: the body is read, the round committed and the client answered, with
    ``Connection: close``. aiohttp dropped every byte that arrived once it was stopping, so such a request
    waited out the grace and its connection was closed with no reply."""
    header, body = framing
    with served_gateway(tmp_path / "gw") as gw:
        with gw.connect() as sock:
            sock.sendall(CHAT_HEAD + b"X-Session-Id: late-body\r\nExpect: 100-continue\r\n" + header + b"\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 100")
            gw.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: shutting_down(gw))
            sock.sendall(body)
            reply = read_to_end(sock)
        gw.proc.wait(30)
        assert gw.proc.returncode == 0, gw.stderr()[-2000:]
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), reply[:300]
    assert b"\r\nConnection: close" in head
    assert "body after SIGTERM" in json.loads(payload)["choices"][0]["message"]["content"]
    with sqlite3.connect(tmp_path / "gw" / "gateway.db") as conn:
        rows = conn.execute("SELECT outcome FROM rounds WHERE tenant='acme' AND session_id='late-body'").fetchall()
    assert rows == [("completed",)]


def test_no_request_starts_on_a_connection_after_sigterm(tmp_path: Path) -> None:
    """Two pipelined chats, the first waiting for the provider when SIGTERM comes: the first is answered
    (``Connection: close``) and the connection closes; the second is never started, never sent upstream
    and never recorded."""
    asked: list[str] = []
    release = threading.Event()

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        asked.append(body["messages"][-1]["content"])
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 30)
        return web.json_response({"id": "c1", "object": "chat.completion", "created": 1, "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "answer"}, "finish_reason": "stop"}]})

    def request(text: str) -> bytes:
        payload = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()
        return (CHAT_HEAD + b"X-Session-Id: pipelined\r\nContent-Length: %d\r\n\r\n" % len(payload)) + payload

    try:
        with chat_provider(chat) as url, served_gateway(tmp_path / "gw", url, server={"shutdown_timeout": 20}) as gw:
            with gw.connect() as sock:
                sock.sendall(request("first") + request("second"))
                wait_for(lambda: asked)
                gw.proc.send_signal(signal.SIGTERM)
                wait_for(lambda: shutting_down(gw))
                release.set()
                reply = read_to_end(sock)
            gw.proc.wait(30)
            assert gw.proc.returncode == 0, gw.stderr()[-2000:]
    finally:
        release.set()
    assert reply.count(b"HTTP/1.1 ") == 1, reply[:600]
    assert reply.startswith(b"HTTP/1.1 200") and b"\r\nConnection: close" in reply.partition(b"\r\n\r\n")[0]
    assert asked == ["first"]
    with sqlite3.connect(tmp_path / "gw" / "gateway.db") as conn:
        rows = conn.execute("SELECT outcome FROM rounds WHERE tenant='acme' AND session_id='pipelined'").fetchall()
    assert rows == [("completed",)]


def late_chat(session: str) -> bytes:
    """A whole chat request (head and body) for *session*."""
    return (CHAT_HEAD + b"X-Session-Id: %s\r\nContent-Length: %d\r\n\r\n" % (session.encode(), len(LATE_BODY))
            + LATE_BODY)


def completed_rounds(directory: Path) -> list[str]:
    with sqlite3.connect(directory / "gateway.db") as conn:
        return [s for (s,) in conn.execute("SELECT session_id FROM rounds WHERE tenant='acme' AND outcome='completed' "
                                           "ORDER BY session_id")]


def test_a_head_on_its_way_at_sigterm_is_served(tmp_path: Path) -> None:
    """Part of a request head has come when SIGTERM arrives, the rest after: the head may still complete (within
    its header timeout and the grace), and the request is answered, the connection's last. It was closed at once
    with no reply, as an idle connection."""
    request = late_chat("head-on-its-way")
    cut = request.index(b"Content-Length")
    with served_gateway(tmp_path / "gw", server={"shutdown_timeout": 10}) as gw:
        with gw.connect() as sock:
            sock.sendall(request[:cut])
            gw.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: shutting_down(gw))
            sock.sendall(request[cut:])
            reply = read_to_end(sock)
        gw.proc.wait(30)
        assert gw.proc.returncode == 0, gw.stderr()[-2000:]
    head = reply.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 200") and b"\r\nConnection: close" in head, reply[:300]
    assert completed_rounds(tmp_path / "gw") == ["head-on-its-way"]


def test_connections_in_the_listen_backlog_at_sigterm_are_served(tmp_path: Path) -> None:
    """Clients that connected and sent their request while the gateway could not accept them (the process
    stopped: the kernel completes connections into the listen backlog) before SIGTERM are answered: the backlog
    is taken before the listener closes. Closing the listener reset them."""
    sessions = [f"queued-{i}" for i in range(6)]
    with served_gateway(tmp_path / "gw") as gw:
        socks = []
        gw.proc.send_signal(signal.SIGSTOP)
        try:
            for session in sessions:
                socks.append(gw.connect())
                socks[-1].sendall(late_chat(session))
            gw.proc.send_signal(signal.SIGTERM)
        finally:
            gw.proc.send_signal(signal.SIGCONT)
        replies = []
        for sock in socks:
            with sock:
                try:
                    replies.append(read_to_end(sock)[:12])
                except ConnectionResetError:
                    replies.append(b"reset")
        gw.proc.wait(30)
        assert gw.proc.returncode == 0, gw.stderr()[-2000:]
    assert replies == [b"HTTP/1.1 200"] * len(sessions)
    assert completed_rounds(tmp_path / "gw") == sessions

