"""Several ``sessiongate serve`` processes on one PostgreSQL schema behave as one gateway.

Each test starts two real replicas (``python -m gateway serve``, each with its built-in
stand-in model) on free loopback ports, sharing the schema, the keyring file and the policy
folder, and ends them by PID when it finishes. Skipped, saying why, when PostgreSQL is not
reachable.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway import audit
from gateway.keyring import FileKeyProvider, Keyring, ensure
from gateway.policy import load_policy_set
from gateway.store.postgres import PostgresStore

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parents[2]
ACME_KEY = "sg-demo-acme"
HEADERS = {"Authorization": f"Bearer {ACME_KEY}"}
SESSIONS, ROUNDS = 20, 10
START_TIMEOUT = 30.0
RUN_TIMEOUT = 120.0


@dataclass
class Replica:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@dataclass
class Cluster:
    replicas: list[Replica]
    dsn: str
    schema: str
    config: Path
    policies: Path
    key_file: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_config(directory: Path, name: str, dsn: str, schema: str, policies: Path, key_file: Path) -> Path:
    config: dict[str, Any] = yaml.safe_load((REPO / "config/sessiongate.yaml").read_text())
    own = directory / name
    own.mkdir()
    config.update(
        upstreams=[],
        store={"backend": "postgres", "dsn": dsn, "schema": schema, "pool_size": 4},
        keys={"master_key_file": str(key_file)},
        policies={"path": str(policies), "reload_interval": 0.2},
        audit={"signing_key_file": str(own / "audit-signing.key"), "checkpoint_file": str(own / "checkpoints.jsonl")},
        logging={"level": "warning", "format": "json"},
    )
    path = own / "sessiongate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _start(config: Path) -> Replica:
    port = _free_port()
    log = config.parent / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port",
                                 str(port)], stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    return Replica(f"http://127.0.0.1:{port}", proc, log)


def _stop(replica: Replica) -> None:
    if replica.proc.poll() is None:
        os.kill(replica.proc.pid, signal.SIGTERM)
        try:
            replica.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(replica.proc.pid, signal.SIGKILL)
            replica.proc.wait(timeout=15)


async def _wait_healthy(replicas: list[Replica]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    async with aiohttp.ClientSession() as http:
        for replica in replicas:
            while True:
                if replica.proc.poll() is not None:
                    pytest.fail(f"replica exited with {replica.proc.returncode}:\n{replica.log_tail()}")
                try:
                    async with http.get(f"{replica.url}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"replica not healthy after {START_TIMEOUT}s:\n{replica.log_tail()}")
                await asyncio.sleep(0.1)


@pytest.fixture
def cluster(tmp_path: Path, pg_dsn: str, pg_schema: str) -> Iterator[Cluster]:
    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies)
    key_file = tmp_path / "master-keys.json"
    ensure(key_file)
    asyncio.run(PostgresStore(pg_dsn, schema=pg_schema).migrate())
    configs = [_write_config(tmp_path, f"replica{i}", pg_dsn, pg_schema, policies, key_file) for i in range(2)]
    replicas: list[Replica] = []
    try:
        for config in configs:
            replicas.append(_start(config))
        asyncio.run(_wait_healthy(replicas))
        yield Cluster(replicas, pg_dsn, pg_schema, configs[0], policies, key_file)
    finally:
        for replica in replicas:
            _stop(replica)


async def _chat(http: aiohttp.ClientSession, replica: Replica, session_id: str, content: str) -> dict[str, Any]:
    body = {"model": "stand-in", "messages": [{"role": "user", "content": content}]}
    async with http.post(f"{replica.url}/v1/chat/completions", json=body,
                         headers={**HEADERS, "X-Session-Id": session_id}) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


async def _export(http: aiohttp.ClientSession, replica: Replica, session_id: str) -> dict[str, Any]:
    async with http.get(f"{replica.url}/v1/sessions/{session_id}", headers=HEADERS) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


async def _audit_rows(cluster: Cluster, tenant: str) -> tuple[audit.VerifyReport, list[dict[str, Any]]]:
    store = PostgresStore(cluster.dsn, schema=cluster.schema, pool_size=2)
    await store.open()
    try:
        report = await audit.averify_chain(store.iter_audit(tenant), tenant=tenant)
        entries = [audit.entry_fields(row) async for row in store.iter_audit(tenant)]
    finally:
        await store.close()
    return report, entries


def test_concurrent_rounds_across_two_replicas_are_never_lost_or_reordered(cluster: Cluster) -> None:
    """200 rounds over 20 sessions, alternating replicas, all land in order in one verifiable chain."""
    replicas = cluster.replicas

    async def converse(http: aiohttp.ClientSession, s: int) -> list[str]:
        acknowledged = []
        for i in range(ROUNDS):
            marker = f"marker s{s} r{i}"
            await _chat(http, replicas[(s + i) % 2], f"rep-{s}", marker)
            acknowledged.append(marker)
        return acknowledged

    async def body() -> None:
        async with aiohttp.ClientSession() as http:
            acked = await asyncio.gather(*(converse(http, s) for s in range(SESSIONS)))
            for s, markers in enumerate(acked):
                exported = await _export(http, replicas[s % 2], f"rep-{s}")
                users = [m["content"] for m in exported["full_context"] if m["role"] == "user"]
                assert users == markers
        report, entries = await _audit_rows(cluster, "acme")
        assert report.ok, report.summary()
        rounds = [(e["session_id"], e["round_seq"]) for e in entries if e["event"] == "round"]
        assert sorted(rounds) == sorted((f"rep-{s}", n) for s in range(SESSIONS) for n in range(1, ROUNDS + 1))

    asyncio.run(asyncio.wait_for(body(), RUN_TIMEOUT))


async def _eventually(check: Any, what: str, timeout: float = 20.0) -> Any:
    """Poll ``await check()`` until it returns something truthy; fail naming *what* after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.2)


def test_policy_reload_and_key_rotation_reach_every_replica(cluster: Cluster) -> None:
    """An edited policy and a rotated master key take effect on both replicas, on one audit chain."""
    replicas = cluster.replicas
    for path in cluster.policies.glob("*.yaml"):
        path.write_text(path.read_text().replace("description: ", "description: (edited) ", 1))
    new_hashes = {p.id: p.version_hash for p in load_policy_set(cluster.policies)}
    probes = iter(range(10_000))

    async def policy_applied(http: aiohttp.ClientSession, store: PostgresStore, r: int) -> bool:
        sid = f"probe-{r}-{next(probes)}"
        await _chat(http, replicas[r], sid, "which policy?")
        entries = [audit.entry_fields(row) async for row in store.iter_audit("acme")]
        mine = [e for e in entries if e.get("session_id") == sid]
        return bool(mine) and mine[-1]["policy_hash"] == new_hashes[mine[-1]["policy_id"]]

    async def body() -> None:
        store = PostgresStore(cluster.dsn, schema=cluster.schema, pool_size=2)
        await store.open()
        try:
            async with aiohttp.ClientSession() as http:
                await _chat(http, replicas[0], "before-rotation", "kept across rotation")
                for r in range(2):
                    await _eventually(lambda r=r: policy_applied(http, store, r), f"policy reload on replica {r}")
                rotate = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "gateway", "--config", str(cluster.config), "keys", "rotate",
                    cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
                out, _ = await asyncio.wait_for(rotate.communicate(), 60)
                assert rotate.returncode == 0, out.decode(errors="replace")
                primary = Keyring([*FileKeyProvider(cluster.key_file).load()]).primary_id

                async def new_key_used(r: int) -> bool:
                    sid = f"rotated-{r}-{next(probes)}"
                    await _chat(http, replicas[r], sid, "which key?")
                    _, key_row = await store.get_session("acme", sid)
                    return key_row is not None and key_row.kek_id == primary
                for r in range(2):
                    await _eventually(lambda r=r: new_key_used(r), f"key rotation on replica {r}")
                    kept = await _export(http, replicas[r], "before-rotation")
                    assert kept["full_context"][0]["content"] == "kept across rotation"

            async def all_rewrapped() -> bool:
                return await store.count_data_keys(primary) == len([k async for k in store.iter_data_keys()])
            await _eventually(all_rewrapped, "re-wrapping every data key under the new primary")
            for tenant in await store.tenants():
                report = await audit.averify_chain(store.iter_audit(tenant), tenant=tenant)
                assert report.ok, report.summary()
            system = [audit.entry_fields(row)["event"] async for row in store.iter_audit("_system")]
            # one policy edit: the replica that reloads it second finds it audited (rarely, both write it)
            assert "key_rotation" in system and 1 <= system.count("policy_reload") <= 2
        finally:
            await store.close()

    asyncio.run(asyncio.wait_for(body(), RUN_TIMEOUT))
