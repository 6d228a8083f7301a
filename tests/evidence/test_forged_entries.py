"""Audit entries carry a MAC no one without the signing key file can make (probe finding F5), on
SQLite and PostgreSQL.

A real gateway records rounds; the adversary then works on its database from a second
connection, without the key files: it deletes a session's rows, appends an ``erasure`` entry at
the head of the tenant's chain with ``gateway.audit.seal_entry`` (hash and link correct) and
moves ``session_heads`` to it, which passed off the deletion as a GDPR erasure. ``audit verify``
and ``/admin/audit/verify`` must name that entry, and the running gateway's checkpointer must
never sign a head that chains through it (``/readyz`` says so). A chain written before entry MACs
still verifies as far as a checkpoint signed before entry MACs vouches for it; a keyless entry
after that, or after keyed ones, or in a tenant's chain begun since entry MACs, does not.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.audit import GENESIS, Signer, seal_entry
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


def _checkpointing(request: pytest.FixtureRequest, make_gateway: Callable[..., Gateway], tmp_path: Path,
                   seconds: float) -> tuple[Gateway, Tables]:
    if request.param == "sqlite":
        tables = Tables("sqlite", None)  # type: ignore[arg-type]
    else:
        tables = Tables("postgres", None, request.getfixturevalue("pg_dsn"),  # type: ignore[arg-type]
                        request.getfixturevalue("pg_schema"))
    folder = tmp_path / "gw"  # make_gateway's folder
    tables.gateway = make_gateway(**tables.overrides(), audit={
        "signing_key_file": str(folder / "audit-signing.key"), "checkpoint_file": str(folder / "checkpoints.jsonl"),
        "checkpoint_every": 1000, "checkpoint_seconds": seconds})
    return tables.gateway, tables


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fast_checkpoints(request: pytest.FixtureRequest, make_gateway: Callable[..., Gateway],
                     tmp_path: Path) -> tuple[Gateway, Tables]:
    """A gateway whose checkpointer signs a head 0.2 s after it moves, and its tables."""
    return _checkpointing(request, make_gateway, tmp_path, 0.2)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def slow_checkpoints(request: pytest.FixtureRequest, make_gateway: Callable[..., Gateway],
                     tmp_path: Path) -> tuple[Gateway, Tables]:
    """A gateway whose checkpointer signs a head only after an hour (or when asked: an export)."""
    return _checkpointing(request, make_gateway, tmp_path, 3600)


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


@contextlib.contextmanager
def older_gateway(gw: Gateway) -> Iterator[None]:
    """The running gateway as one from before entry MACs: its store seals entries without a MAC
    and its checkpointer signs old-format checkpoints (no ``macs`` mark)."""
    services = gw.app[SERVICES]
    store, signer = services.sessions.store.inner, services.audit.signer
    key = store.entry_key
    store.entry_key = None
    signer.sign_head = functools.partial(Signer.sign_head, signer, macs=False)  # type: ignore[method-assign]
    try:
        yield
    finally:
        store.entry_key = key
        del signer.sign_head


def legacy_prefix(gw: Gateway, tables: Tables) -> int:
    """Rounds recorded by an older gateway, signed by its old-format checkpoint; their last seq."""
    with older_gateway(gw):
        record(gw, "old", 2)
        legacy = head(tables)[0]
        wait_for(lambda: signed_through(gw, legacy))
    assert "macs" not in checkpoints(gw)[-1]  # the old format
    return legacy


def test_a_chain_from_before_entry_macs_still_verifies(fast_checkpoints: tuple[Gateway, Tables]) -> None:
    """Entries sealed without a MAC by an older gateway, and signed by its (old-format) checkpoint,
    verify as legacy, with a note, when keyed entries follow them; the checkpointer signs on, marking
    its checkpoints (``macs``)."""
    gw, tables = fast_checkpoints
    legacy = legacy_prefix(gw, tables)
    record(gw, "old", 1)  # the upgraded gateway
    record(gw, "new", 1)
    entries = [json.loads(bytes(body)) for (body,) in tables.sql("SELECT body FROM audit WHERE tenant='acme' "
                                                                 "ORDER BY seq")]
    assert ["mac" in e for e in entries] == [False] * legacy + [True] * (len(entries) - legacy)
    code, out = verify(gw)
    assert code == 0, out
    assert f"entries 1..{legacy} carry no MAC" in out, out
    wait_for(lambda: signed_through(gw, len(entries)))
    assert checkpoints(gw)[-1].get("macs") == 1
    assert httpx.get(f"{gw.url}/readyz", timeout=30).json().get("audit_chains_refused") is None


def test_a_keyless_entry_after_the_last_old_format_checkpoint_fails(fast_checkpoints: tuple[Gateway, Tables]) -> None:
    """An entry without a MAC appended after the entries an older gateway signed (probe finding F1 on
    a tenant idle since the upgrade: no keyed entry yet) fails verification, naming it, and the
    checkpointer refuses the chain once the gateway writes after it."""
    gw, tables = fast_checkpoints
    legacy = legacy_prefix(gw, tables)
    forged = forge_erasure(tables, "old")
    assert forged == legacy + 1
    code, out = verify(gw)
    assert code == 1, out
    assert f"unauthenticated at seq {forged}" in out and f"covers entries up to {legacy}" in out, out
    record(gw, "bystander", 1)
    wait_for(lambda: "acme" in httpx.get(f"{gw.url}/readyz", timeout=30).json().get("audit_chains_refused", []))
    time.sleep(0.5)
    assert not signed_through(gw, forged), checkpoints(gw)


def test_a_new_tenants_chain_forged_without_macs_fails_and_is_never_signed(
        fast_checkpoints: tuple[Gateway, Tables]) -> None:
    """Probe finding F1: a tenant with no entry yet (globex) given a forged ``erasure`` entry without
    a MAC, as someone with the database but not the key file can: no checkpoint signed before entry
    MACs vouches for it, so ``audit verify`` names it (exit 1), and after one real globex request the
    checkpointer refuses the chain instead of signing a checkpoint over it."""
    gw, tables = fast_checkpoints
    record(gw, "alice", 1)  # acme: keyed, signed
    wait_for(lambda: signed_through(gw, head(tables)[0]))
    forged = append(tables, {"event": "erasure", "request_id": "feedfacefeedface", "session_id": "globex:ghost"},
                    tenant="globex")
    assert forged == 1
    code, out = verify(gw, "--tenant", "globex")
    assert code == 1, out
    assert "FAIL tenant globex" in out and "unauthenticated at seq 1" in out, out
    assert "no checkpoint signed before entry MACs" in out, out
    resp = httpx.post(f"{gw.base_url}/chat/completions", timeout=30,
                      headers={"Authorization": "Bearer sg-demo-globex", "X-Session-Id": "g1"},
                      json={"model": "standin", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200
    wait_for(lambda: "globex" in httpx.get(f"{gw.url}/readyz", timeout=30).json().get("audit_chains_refused", []))
    refusal = next(json.loads(line) for line in gw.log_path.read_text().splitlines()
                   if "checkpoint_refused" in line)
    assert (refusal["tenant"], refusal["seq"], refusal["kind"]) == ("globex", 1, "unauthenticated")
    time.sleep(0.5)  # several checkpoint periods
    assert checkpoints(gw, "globex") == []
    code, out = verify(gw, "--tenant", "acme")
    assert code == 0, out


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


def cut_tail(tables: Tables, session: str) -> int:
    """The probe's truncation: the newest entry (the session's last round) deleted with its round
    row, the session's head pointer put back on the entry before. Returns the deleted entry's seq."""
    seq, _ = head(tables)
    (body,) = tables.sql("SELECT body FROM audit WHERE tenant='acme' AND seq=?", seq)[0]
    doc = json.loads(bytes(body))
    assert (doc["event"], doc["session_id"]) == ("round", session)
    tables.sql("DELETE FROM audit WHERE tenant='acme' AND seq=?", seq)
    tables.sql("DELETE FROM rounds WHERE tenant='acme' AND session_id=? AND seq=?", session, doc["round_seq"])
    tables.sql("UPDATE session_heads SET bound_seq=? WHERE tenant='acme' AND session_id=?", seq - 1, session)
    return seq


def refusal_of(gw: Gateway) -> dict[str, Any]:
    return next(json.loads(line) for line in gw.log_path.read_text().splitlines() if "checkpoint_refused" in line)


def test_entries_cut_from_the_tail_of_a_running_gateways_chain_are_found_by_the_checkpointer(
        slow_checkpoints: tuple[Gateway, Tables]) -> None:
    """Probe F4: the newest entry and its round deleted while the gateway runs, and one more round
    written (at the deleted entry's seq): the checkpointer does not sign the deleted entry's hash
    (it reads back what it signs); it logs ``checkpoint_refused`` and ``/readyz`` names the tenant."""
    gw, tables = slow_checkpoints
    record(gw, "bystander", 1)
    record(gw, "victim", 2)
    cut = cut_tail(tables, "victim")
    record(gw, "bystander", 1)  # written at seq `cut` again, linked to the entry before it
    assert head(tables)[0] == cut
    wait_for(lambda: "acme" in httpx.get(f"{gw.url}/readyz", timeout=30).json().get("audit_chains_refused", []))
    refusal = refusal_of(gw)
    assert (refusal["tenant"], refusal["seq"], refusal["kind"]) == ("acme", cut, "checkpoint_mismatch"), refusal
    resp = httpx.get(f"{gw.url}/admin/export", params={"tenant": "acme", "session": "bystander", "format": "jsonl"},
                     timeout=30, headers={"Authorization": f"Bearer {AUDITOR_TOKEN}"})
    assert resp.status_code == 500 and "failed the check before signing" in resp.json()["error"]["message"]
    assert checkpoints(gw) == []


def test_a_head_deleted_before_it_is_signed_is_not_signed(slow_checkpoints: tuple[Gateway, Tables]) -> None:
    """The newest entry deleted while the gateway runs: the export that asks for a checkpoint (its
    own entry taking the deleted one's seq) is refused and no checkpoint covers the deleted entry
    (the checkpointer reads back the entry it is about to sign), with ``checkpoint_refused``."""
    gw, tables = slow_checkpoints
    record(gw, "bystander", 1)
    record(gw, "victim", 2)
    cut = cut_tail(tables, "victim")
    resp = httpx.get(f"{gw.url}/admin/export", params={"tenant": "acme", "session": "bystander", "format": "jsonl"},
                     timeout=30, headers={"Authorization": f"Bearer {AUDITOR_TOKEN}"})
    assert resp.status_code == 500 and "failed the check before signing" in resp.json()["error"]["message"]
    assert not signed_through(gw, cut), checkpoints(gw)
    refusal = refusal_of(gw)
    assert (refusal["tenant"], refusal["seq"], refusal["kind"]) == ("acme", cut, "checkpoint_mismatch"), refusal
