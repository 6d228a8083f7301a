"""``sessiongate serve --workers 3`` (``gateway.workers``), on SQLite and on PostgreSQL (a fresh
schema; skipped, saying why, when no server answers): concurrent rounds on shared sessions from
several threads while one worker is killed with SIGKILL; every acknowledged round is stored
exactly once and in order, the audit chain verifies, a policy edit and a key rotation reach
every worker, and SIGTERM stops them all."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import yaml

from gateway.workers import WORKER_HEADER
from tests.conftest import ACME_KEY, REPO, Upstream, wait_for, write_config
from tests.store.conftest import pg_dsn, pg_schema  # noqa: F401 - fixtures for the PostgreSQL case

WORKERS = 3
THREADS = 6
SESSIONS = 3  # two threads per session


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args, "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def worker_pids(log: Path) -> dict[int, int]:
    """Each slot's current worker, from the supervisor's ``worker_started`` lines (latest wins)."""
    pids: dict[int, int] = {}
    for line in log.read_text().splitlines():
        if line.startswith("{") and '"worker_started"' in line:
            entry = json.loads(line)
            pids[entry["index"]] = entry["pid"]
    return pids


def alive(pid: int) -> bool:
    """Running (a zombie left for a parent that does not reap it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def fresh(url: str, method: str, path: str, **kw: Any) -> httpx.Response:
    """One request on a new connection, so the kernel may hand it to any worker."""
    with httpx.Client(base_url=url, timeout=15) as client:
        return client.request(method, path, **kw)


def chat(url: str, session: str, text: str) -> httpx.Response:
    return fresh(url, "POST", "/v1/chat/completions", json={
        "model": "standin", "messages": [{"role": "user", "content": text}]},
        headers={"Authorization": f"Bearer {ACME_KEY}", "X-Session-Id": session})


def kek_of(config: Path, session_id: str) -> str | None:
    """The master key that wraps *session_id*'s data key, read from the configured store."""
    store = yaml.safe_load(config.read_text())["store"]
    if store["backend"] == "sqlite":
        with sqlite3.connect(store["path"]) as conn:
            row = conn.execute("SELECT kek_id FROM data_keys WHERE session_id = ?", (session_id,)).fetchone()
        return row[0] if row else None

    async def read() -> str | None:
        conn = await asyncpg.connect(store["dsn"])
        try:
            value = await conn.fetchval(f'SELECT kek_id FROM "{store["schema"]}".data_keys WHERE session_id = $1',
                                        session_id)
            return str(value) if value is not None else None
        finally:
            await conn.close()
    return asyncio.run(read())


@pytest.fixture(params=["sqlite", "postgres"])
def served(request: pytest.FixtureRequest, tmp_path: Path,
           upstream: Upstream) -> Iterator[tuple[str, Path, Path, subprocess.Popen[bytes]]]:
    policies = tmp_path / "policies"
    policies.mkdir()
    for name in ("default.yaml", "policy.schema.json"):
        (policies / name).write_bytes((REPO / "policies" / name).read_bytes())
    store = ({"store": {"backend": "postgres", "dsn": request.getfixturevalue("pg_dsn"),
                        "schema": request.getfixturevalue("pg_schema")}} if request.param == "postgres" else {})
    config = write_config(tmp_path, upstream.url, policies, **store)
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port",
                                 str(port), "--workers", str(WORKERS)], cwd=REPO, stdout=out, stderr=out)
    try:
        wait_for(lambda: "workers, pids" in log.read_text() or proc.poll() is not None, 40)
        assert proc.poll() is None, log.read_text()[-2000:]
        yield f"http://127.0.0.1:{port}", config, log, proc
    finally:
        if proc.poll() is None:
            pids = list(worker_pids(log).values())
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                for pid in pids:
                    if alive(pid):
                        os.kill(pid, signal.SIGKILL)


def answered_by_each(url: str, pids: set[int], probe: Any, seconds: float = 20.0) -> set[int]:
    """Send ``probe()`` on fresh connections until every worker in *pids* answered with a
    response for which it returns True; returns the workers that did."""
    done: set[int] = set()
    deadline = time.monotonic() + seconds
    while done != pids and time.monotonic() < deadline:
        resp = probe()
        pid = int(resp.headers[WORKER_HEADER])
        if pid in pids and resp.status_code == 200 and probe.check(resp):
            done.add(pid)
    return done


def test_workers_keep_every_round_through_a_kill(served: tuple[str, Path, Path, subprocess.Popen[bytes]]) -> None:
    url, config, log, proc = served
    first = worker_pids(log)
    assert len(first) == WORKERS and all(alive(pid) for pid in first.values())

    acked: dict[int, list[str]] = {t: [] for t in range(THREADS)}
    answered_by: set[int] = set()
    stop = threading.Event()

    def client(t: int) -> None:
        session = f"shared-{t % SESSIONS}"
        i = 0
        while not stop.is_set() and i < 60:
            text = f"t{t}-r{i}"
            i += 1
            try:
                resp = chat(url, session, text)
            except httpx.HTTPError:
                continue  # not acknowledged: the worker died under it
            if resp.status_code == 200:
                acked[t].append(text)
                answered_by.add(int(resp.headers[WORKER_HEADER]))

    threads = [threading.Thread(target=client, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    wait_for(lambda: sum(map(len, acked.values())) >= 30, 30)
    victim = first[1]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: sum(map(len, acked.values())) >= 90, 40)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert len(answered_by) >= 2, "the kernel spread the connections over the workers"

    # the supervisor noticed and restarted the slot
    restarted = wait_for(lambda: (p := worker_pids(log)).get(1) not in (None, victim) and p, 20)
    assert '"worker_exited"' in log.read_text()
    live = set(restarted.values())
    assert len(live) == WORKERS and all(alive(pid) for pid in live)

    # every acknowledged round exactly once, each client's rounds in the order it sent them
    for s in range(SESSIONS):
        resp = fresh(url, "GET", f"/v1/sessions/shared-{s}", headers={"Authorization": f"Bearer {ACME_KEY}"})
        assert resp.status_code == 200, resp.text
        users = [m["content"] for m in resp.json()["full_context"] if m["role"] == "user"]
        assert len(users) == len(set(users)), "no round is stored twice"
        for t in range(s, THREADS, SESSIONS):
            mine = [u for u in users if u.startswith(f"t{t}-")]
            assert set(acked[t]) <= set(mine), f"lost rounds of thread {t}"
            assert mine == sorted(mine, key=lambda u: int(u.split("-r")[1])), f"thread {t} out of order"

    # a policy edit reaches every worker (each polls the folder)
    policies = config.parent / "policies"
    (policies / "extra.yaml").write_text((policies / "default.yaml").read_text().replace(
        "id: default", "id: extra").replace("priority: 0", "priority: 1"))

    def readyz() -> httpx.Response:
        return fresh(url, "GET", "/readyz")
    readyz.check = lambda resp: resp.json().get("policies") == 2  # type: ignore[attr-defined]
    assert answered_by_each(url, live, readyz) == live

    # a key rotation reaches every worker: the sessions each one starts afterwards use the new key
    rotated = cli(config, "keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    new_key = rotated.stdout.split("new primary master key ")[1].split(";")[0]
    counter = iter(range(10_000))

    def new_session() -> httpx.Response:
        sid = f"after-rotate-{next(counter)}"
        resp = chat(url, sid, "hello")
        resp.extensions["sid"] = sid
        return resp

    def under_new_key(resp: httpx.Response) -> bool:
        return kek_of(config, resp.extensions["sid"]) == new_key
    new_session.check = under_new_key  # type: ignore[attr-defined]
    assert answered_by_each(url, live, new_session) == live

    # SIGTERM stops the supervisor and every worker; the chain verifies
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not any(alive(pid) for pid in live)
    verified = cli(config, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_workers_stop_when_the_supervisor_is_killed(served: tuple[str, Path, Path, subprocess.Popen[bytes]]) -> None:
    url, _config, log, proc = served
    pids = set(worker_pids(log).values())
    assert len(pids) == WORKERS
    proc.kill()  # SIGKILL: no chance to forward anything
    proc.wait(10)
    wait_for(lambda: not any(alive(pid) for pid in pids), 20)
    with pytest.raises(httpx.ConnectError):
        fresh(url, "GET", "/healthz")
