"""Audit entries carry a MAC no one without the signing key file can make (probe finding F5), on
SQLite and PostgreSQL.

A real gateway records rounds; the adversary then works on its database from a second
connection, without the key files: it deletes a session's rows, appends an ``erasure`` entry at
the head of the tenant's chain with ``gateway.audit.seal_entry`` (hash and link correct) and
moves ``session_heads`` to it, which passed off the deletion as a GDPR erasure. ``audit verify``
and ``/admin/audit/verify`` must name that entry, and the running gateway's checkpointer must
never sign a head that chains through it (``/readyz`` says so). A chain written before entry MACs
still verifies; a keyless entry after keyed ones does not.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.audit import GENESIS, seal_entry
from gateway.handlers import SERVICES
from gateway.store.base import AuditRow
from tests.conftest import ACME_KEY, AUDITOR_TOKEN, Gateway, wait_for
from tests.evidence.conftest import Tables, verify


def chat(gw: Gateway, session: str, text: str) -> httpx.Response:
    return httpx.post(f"{gw.base_url}/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {ACME_KEY}", "X-Session-Id": session},
                      json={"model": "standin", "messages": [{"role": "user", "content": text}]})


def record(gw: Gateway, session: str, turns: int) -> None:
    for i in range(turns):
        assert chat(gw, session, f"turn {i + 1}").status_code == 200


def checkpoints(gw: Gateway, tenant: str = "acme") -> list[dict[str, Any]]:
    path = gw.dir / "checkpoints.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [cp for cp in map(json.loads, filter(None, lines)) if cp["tenant"] == tenant]


def head(tables: Tables, tenant: str = "acme") -> tuple[int, str]:
    rows = tables.sql("SELECT seq, hash FROM audit WHERE tenant=? ORDER BY seq DESC LIMIT 1", tenant)
    return (int(rows[0][0]), rows[0][1]) if rows else (0, GENESIS)


def append(tables: Tables, fields: dict[str, Any], *, mac: dict[str, str] | None = None,
           tenant: str = "acme") -> int:
    """Append an entry at the head the way an adversary can: ``seal_entry`` without a key, or
    with a made-up ``mac`` field added and the entry rehashed; returns its seq."""
    seq, prev = head(tables, tenant)
    row = seal_entry(tenant, seq + 1, prev, time.time(), fields)
    if mac is not None:
        body = orjson.dumps({**orjson.loads(row.body), "mac": mac}, option=orjson.OPT_SORT_KEYS)
        row = AuditRow(row.tenant, row.seq, row.created_at, body, row.prev_hash, hashlib.sha256(body).hexdigest())
    tables.sql("INSERT INTO audit VALUES (?,?,?,?,?,?)", row.tenant, row.seq, row.created_at, row.body,
               row.prev_hash, row.hash)
    return row.seq


def forge_erasure(tables: Tables, session: str, *, mac: dict[str, str] | None = None) -> int:
    """The probe's attack: the session's rows deleted, a forged erasure entry at the head of the
    chain, ``session_heads`` moved to it. Returns the forged entry's seq."""
    for table in ("rounds", "sessions", "data_keys"):
        tables.sql(f"DELETE FROM {table} WHERE tenant='acme' AND session_id=?", session)
    seq = append(tables, {"event": "erasure", "request_id": "f0f0f0f0f0f0f0f0", "session_id": session,
                          "state": {"next_seq": 0, "rounds": 0, "sha256": None, "version": 0}}, mac=mac)
    tables.sql("UPDATE session_heads SET bound_seq=? WHERE tenant='acme' AND session_id=?", seq, session)
    return seq


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fast_checkpoints(request: pytest.FixtureRequest, make_gateway: Callable[..., Gateway],
                     tmp_path: Path) -> tuple[Gateway, Tables]:
    """A gateway whose checkpointer signs a head 0.2 s after it moves, and its tables."""
    if request.param == "sqlite":
        tables = Tables("sqlite", None)  # type: ignore[arg-type]
    else:
        tables = Tables("postgres", None, request.getfixturevalue("pg_dsn"),  # type: ignore[arg-type]
                        request.getfixturevalue("pg_schema"))
    folder = tmp_path / "gw"  # make_gateway's folder
    tables.gateway = make_gateway(**tables.overrides(), audit={
        "signing_key_file": str(folder / "audit-signing.key"), "checkpoint_file": str(folder / "checkpoints.jsonl"),
        "checkpoint_every": 1000, "checkpoint_seconds": 0.2})
    return tables.gateway, tables


def signed_through(gw: Gateway, seq: int) -> bool:
    return any(cp["seq"] >= seq for cp in checkpoints(gw))


@pytest.mark.parametrize("mac", [None, "made-up"], ids=["keyless", "made-up-mac"])
def test_a_forged_erasure_fails_verification_and_is_never_signed(
        fast_checkpoints: tuple[Gateway, Tables], mac: str | None) -> None:
    """The probe's forged erasure (no MAC, or a made-up one under the gateway's key id) is named
    by ``audit verify`` and ``/admin/audit/verify``; the checkpointer signs no head at or after it,
    logs it and ``/readyz`` names the tenant while staying ready (200): a refused chain is that
    tenant's evidence, and a replica left behind in a rolling upgrade must not take every replica
    out of service; ``/metrics`` has ``sessiongate_audit_chain_refused``."""
    gw, tables = fast_checkpoints
    record(gw, "victim", 2)
    record(gw, "bystander", 1)
    before = head(tables)[0]
    wait_for(lambda: signed_through(gw, before))
    code, out = verify(gw)
    assert code == 0, out
    key_id = gw.app[SERVICES].audit.signer.key_id
    forged = forge_erasure(tables, "victim",
                           mac=None if mac is None else {"hmac_sha256": "ab" * 32, "key_id": key_id})
    kind = "unauthenticated" if mac is None else "forged"

    code, out = verify(gw)
    assert code == 1, out
    assert "FAIL tenant acme" in out and f"{kind} at seq {forged}" in out, out
    resp = httpx.get(f"{gw.url}/admin/audit/verify", params={"tenant": "acme"}, timeout=30,
                     headers={"Authorization": f"Bearer {AUDITOR_TOKEN}"})
    error = resp.json()["first_error"]
    assert (error["seq"], error["kind"]) == (forged, kind), resp.text

    record(gw, "bystander", 2)  # the gateway chains on after the forged entry
    wait_for(lambda: "checkpoint_refused" in gw.log_path.read_text())
    wait_for(lambda: "acme" in httpx.get(f"{gw.url}/readyz", timeout=30).json().get("audit_chains_refused", []))
    ready = httpx.get(f"{gw.url}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["audit_chains_refused"] == ["acme"], ready.text
    scraped = httpx.get(f"{gw.url}/metrics", timeout=30).text
    assert f'sessiongate_audit_chain_refused{{kind="{kind}",tenant="acme"}} 1.0' in scraped
    time.sleep(0.5)  # several checkpoint periods
    assert not signed_through(gw, forged), checkpoints(gw)
    refusal = next(json.loads(line) for line in gw.log_path.read_text().splitlines()
                   if "checkpoint_refused" in line)
    assert (refusal["tenant"], refusal["seq"], refusal["kind"]) == ("acme", forged, kind)
    # the other tenants are still signed
    other = httpx.post(f"{gw.base_url}/chat/completions", timeout=30,
                       headers={"Authorization": "Bearer sg-demo-globex", "X-Session-Id": "g"},
                       json={"model": "standin", "messages": [{"role": "user", "content": "hi"}]})
    assert other.status_code == 200
    wait_for(lambda: checkpoints(gw, "globex"))


def test_a_chain_from_before_entry_macs_still_verifies(fast_checkpoints: tuple[Gateway, Tables]) -> None:
    """Entries sealed without a MAC (as every gateway before entry MACs did, checkpoints included)
    verify as legacy, with a note, when keyed entries follow them; the checkpointer signs on."""
    gw, tables = fast_checkpoints
    store = gw.app[SERVICES].sessions.store.inner
    key = store.entry_key
    store.entry_key = None  # an older gateway: its store sealed entries without a MAC
    record(gw, "old", 2)
    legacy = head(tables)[0]
    wait_for(lambda: signed_through(gw, legacy))
    store.entry_key = key  # the upgraded gateway
    record(gw, "old", 1)
    record(gw, "new", 1)
    entries = [json.loads(bytes(body)) for (body,) in tables.sql("SELECT body FROM audit WHERE tenant='acme' "
                                                                 "ORDER BY seq")]
    assert ["mac" in e for e in entries] == [False] * legacy + [True] * (len(entries) - legacy)
    code, out = verify(gw)
    assert code == 0, out
    assert f"entries 1..{legacy} carry no MAC" in out, out
    wait_for(lambda: signed_through(gw, len(entries)))
    assert httpx.get(f"{gw.url}/readyz", timeout=30).status_code == 200


def test_a_keyless_entry_after_keyed_ones_fails(fast_checkpoints: tuple[Gateway, Tables]) -> None:
    """Once the chain has a keyed entry, an entry without a MAC after it (an adversary appending
    legacy-looking entries) fails verification, naming it, even when keyed entries follow it."""
    gw, tables = fast_checkpoints
    record(gw, "alice", 2)
    keyless = append(tables, {"event": "reset", "request_id": "0123456789abcdef"})
    record(gw, "bob", 1)  # a genuine entry after it
    code, out = verify(gw)
    assert code == 1, out
    assert f"unauthenticated at seq {keyless}" in out and "carries no MAC" in out, out
