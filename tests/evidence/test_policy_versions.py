"""The policy that recorded a round governs it (issue 10 §7): export redaction and retention
follow the policy *version* a round was recorded under (kept in the store by its hash), after
the policy file changed and after it was removed; imports record the policy that matches them."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest

from gateway.audit import seal_entry
from gateway.errors import IntegrityError
from gateway.handlers import SERVICES
from gateway.policy import Policy, PolicySet, load_policy_set
from gateway.policy.versions import PolicyVersion, PolicyVersions, VersionMissing, document, legacy_rounds
from gateway.retention import purge_expired
from gateway.store.base import AuditRow, PolicyVersionRow
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import SQLiteStore
from tests.conftest import ACME_KEY, AUDITOR_TOKEN, REPO, Gateway, wait_for
from tests.evidence.conftest import Tables, verify
from tests.test_cli_errors import assert_one_line_error, run
from tests.test_integrity import chat, with_service

V1 = """id: chat
session: {input_keys: null, reply_keys: null, max_length: 12000}
export: {detectors: {email: mask}}
retention: {days: 1}
"""
V2 = """id: chat
session: {input_keys: null, reply_keys: null, max_length: 12000}
export: {redact: [{key: "*", action: keep}]}
"""
REPLACEMENT = """id: other
session: {input_keys: null, reply_keys: null, max_length: 12000}
"""
EMAIL = "alice@example.com"


def _write_policies(folder: Path, name: str, text: str) -> None:
    for old in folder.glob("*.yaml"):
        old.unlink()
    (folder / name).write_text(text)


def _chat_gateway(make_gateway: Callable[..., Gateway], tmp_path: Path, text: str) -> tuple[Gateway, Path, str]:
    """A gateway whose policy folder holds only ``chat.yaml`` = *text*: it, the folder, and the
    version hash the chat policy has."""
    folder = tmp_path / "pol"
    folder.mkdir()
    _write_policies(folder, "chat.yaml", text)
    gw = make_gateway(folder)
    return gw, folder, gw.app[SERVICES].policies.current.get("chat").version_hash


def _swap(gw: Gateway, folder: Path, name: str, text: str, expect: Callable[[PolicySet], bool]) -> None:
    _write_policies(folder, name, text)
    wait_for(lambda: expect(gw.app[SERVICES].policies.current), seconds=10)


def _export_text(gw: Gateway, tmp: Path) -> str:
    r = httpx.get(f"{gw.url}/admin/export?tenant=acme&format=jsonl",
                  headers={"Authorization": f"Bearer {AUDITOR_TOKEN}"}, timeout=30)
    assert r.status_code == 200, r.text
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        tar.extractall(tmp, filter="data")
    return (tmp / "acme-export.jsonl").read_text()


def test_export_redacts_with_the_recording_version_after_edit_and_removal(
        make_gateway: Callable[..., Gateway], tmp_path: Path) -> None:
    """Recorded under v1 (mask e-mails): exported masked after the file becomes v2 (keep all),
    and still masked after the policy is removed for another catch-all."""
    gw, folder, v1 = _chat_gateway(make_gateway, tmp_path, V1)
    chat(gw, "mail", f"write to {EMAIL} please")
    assert EMAIL not in _export_text(gw, tmp_path / "e0")

    _swap(gw, folder, "chat.yaml", V2, lambda s: s.get("chat") is not None and s.get("chat").version_hash != v1)
    text = _export_text(gw, tmp_path / "e1")
    assert EMAIL not in text and "mail" in text
    record = orjson.loads(text.splitlines()[0])
    assert (record["policy_id"], record["policy_hash"]) == ("chat", v1)

    _swap(gw, folder, "other.yaml", REPLACEMENT, lambda s: s.get("chat") is None)
    assert EMAIL not in _export_text(gw, tmp_path / "e2")
    with closing(sqlite3.connect(gw.db_path)) as conn:
        kept = dict(conn.execute("SELECT hash, policy_id FROM policy_versions").fetchall())
    assert kept[v1] == "chat" and len(kept) == 3  # v1, v2 and the replacement


def test_retention_follows_the_recording_version(make_gateway: Callable[..., Gateway], tmp_path: Path) -> None:
    """A round recorded under v1 (1 day) expires after two days although the file now says v2
    (keep forever), and also once the policy is gone."""
    gw, folder, v1 = _chat_gateway(make_gateway, tmp_path, V1)
    chat(gw, "old", "expiring text")
    _swap(gw, folder, "chat.yaml", V2, lambda s: s.get("chat") is not None and s.get("chat").version_hash != v1)
    later = time.time() + 2 * 86400
    totals = with_service(gw, lambda svc: purge_expired(svc, load_policy_set(folder), now=later))
    assert totals["rounds"] == 1
    chat(gw, "new", "fresh text")  # recorded under v2: no retention
    _swap(gw, folder, "other.yaml", REPLACEMENT, lambda s: s.get("chat") is None)
    totals = with_service(gw, lambda svc: purge_expired(svc, load_policy_set(folder), now=later + 86400 * 400))
    assert totals["rounds"] == 0  # v2 keeps its rounds even though the catch-all changed


def test_an_import_records_the_policy_that_matches_it(gateway: Gateway) -> None:
    """A session imported over HTTP records the id and hash of the policy matching its tenant and
    session at import time, not a placeholder."""
    doc = {"id": "acme:imp", "full_context": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}
    r = httpx.put(f"{gateway.base_url}/sessions/acme:imp", json=doc, headers={"Authorization": f"Bearer {ACME_KEY}"})
    assert r.status_code == 200, r.text
    expected = gateway.app[SERVICES].policies.current.match("acme", None, "acme:imp")
    with closing(sqlite3.connect(gateway.db_path)) as conn:
        row = conn.execute("SELECT policy_id, policy_hash FROM rounds WHERE session_id='acme:imp'").fetchone()
    assert row == (expected.id, expected.version_hash) and expected.id == "multi-user-chat"


def _policy(text: str) -> Policy:
    import yaml
    return Policy.model_validate(yaml.safe_load(text))


def test_an_unknown_version_of_a_removed_policy_falls_back_by_match_not_to_the_last_policy() -> None:
    """A round recorded before versions were kept (its entry binds no rows: ``versioned=False``)
    with no kept version and a removed id takes the policy matching its tenant and session (here a
    shadowing higher-priority one), not the lowest-priority catch-all; a round recorded since
    (the default) whose version is not kept is ``VersionMissing``, never today's policy of its id."""
    high = _policy('id: high\npriority: 10\nmatch: {session_ids: ["a:*"]}\n'
                   'session: {input_keys: null, reply_keys: null}\nretention: {days: 7}\n')
    low = _policy("id: low\nsession: {input_keys: null, reply_keys: null}\nretention: {days: 90}\n")
    current = PolicySet([high, low])
    versions = PolicyVersions(store=None)  # type: ignore[arg-type]  # resolve() needs no store
    found = versions.resolve("gone", "", current, tenant="acme", session_id="a:1")
    assert found.id == "high" and found.retention.days == 7
    assert versions.resolve("low", "f" * 64, current, tenant="acme", session_id="a:1", versioned=False).id == "low"
    with pytest.raises(VersionMissing) as info:
        versions.resolve("low", "f" * 64, current, tenant="acme", session_id="a:1")
    assert "version ffffffffffff of policy 'low'" in info.value.detail and "no longer keeps" in info.value.detail
    assert versions.resolve("low", low.version_hash, current, tenant="acme", session_id="a:1").id == "low"


def test_only_round_entries_that_bind_no_rows_may_fall_back() -> None:
    """``legacy_rounds`` names the round entries written before bindings (no ``state``): those
    alone may fall back when their version is not kept; bound ones, and other events, are not."""
    rows, prev = [], "0" * 64
    for seq, fields in enumerate([
            {"event": "round", "session_id": "old", "round_seq": 1, "ciphertext_sha256": "a" * 64},
            {"event": "round", "session_id": "new", "round_seq": 1, "ciphertext_sha256": "b" * 64,
             "state": {"sha256": "c" * 64, "version": 1, "next_seq": 2, "rounds": 1}},
            {"event": "import", "session_id": "imp", "round_seq": 1, "ciphertext_sha256": "d" * 64},
            {"event": "export", "detail": {"records": 1}}], start=1):
        rows.append(seal_entry("acme", seq, prev, 1.0, fields))
        prev = rows[-1].hash

    async def chain() -> AsyncIterator[AuditRow]:
        for row in rows:
            yield row
    assert asyncio.run(legacy_rounds(chain())) == {("old", "a" * 64), ("imp", "d" * 64)}


STRICT = """id: strict
session: {input_keys: null, reply_keys: null, max_length: 12000}
export: {redact: [{key: "*", action: mask}]}
"""
RET_365 = """id: chat
session: {input_keys: null, reply_keys: null, max_length: 12000}
retention: {days: 365}
"""
RET_1 = RET_365.replace("365", "1")


def _cli_days_on(days: float, *args: str) -> subprocess.CompletedProcess[str]:
    """``sessiongate ARGS`` in a process whose clock reads *days* later than now."""
    code = ("import sys, time; real = time.time; time.time = lambda: real() + float(sys.argv[1]) * 86400; "
            "from gateway.cli import main; sys.exit(main(sys.argv[2:]))")
    return subprocess.run([sys.executable, "-c", code, str(days), *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def strict_gateway(request: pytest.FixtureRequest, make_gateway: Callable[..., Gateway],
                   tmp_path: Path) -> tuple[Gateway, Tables, Path]:
    """A gateway on SQLite or PostgreSQL whose one policy masks every exported value, its tables
    and its policy folder."""
    folder = tmp_path / "pol"
    folder.mkdir()
    _write_policies(folder, "strict.yaml", STRICT)
    if request.param == "sqlite":
        tables = Tables("sqlite", None)  # type: ignore[arg-type]
    else:
        tables = Tables("postgres", None, request.getfixturevalue("pg_dsn"),  # type: ignore[arg-type]
                        request.getfixturevalue("pg_schema"))
    tables.gateway = make_gateway(folder, **tables.overrides())
    return tables.gateway, tables, folder


def test_an_export_refuses_a_round_whose_kept_version_was_deleted(
        strict_gateway: tuple[Gateway, Tables, Path], tmp_path: Path) -> None:
    """Recorded under a masking version, the policy then edited to keep everything: the export
    masks; once the masking version's row is deleted, ``/admin/export`` and ``sessiongate export``
    refuse (500 / exit 2, one line, no traceback) naming the version, instead of exporting in clear
    under today's policy, and verify names it (probe F2)."""
    gw, tables, folder = strict_gateway
    v1 = gw.app[SERVICES].policies.current.get("strict").version_hash
    chat(gw, "s1", "ticket SECRET-4471 for bob")
    _swap(gw, folder, "strict.yaml", STRICT.replace("mask", "keep"),
          lambda s: s.get("strict") is not None and s.get("strict").version_hash != v1)
    text = _export_text(gw, tmp_path / "e0")
    assert "SECRET-4471" not in text and orjson.loads(text.splitlines()[0])["policy_hash"] == v1

    tables.sql("DELETE FROM policy_versions WHERE hash=?", v1)
    resp = httpx.get(f"{gw.url}/admin/export", params={"tenant": "acme", "format": "jsonl"}, timeout=30,
                     headers={"Authorization": f"Bearer {AUDITOR_TOKEN}"})
    assert resp.status_code == 500 and resp.json()["error"]["code"] == "integrity_check_failed", resp.text
    said = resp.json()["error"]["message"]
    assert said.startswith("the export stopped: ") and f"version {v1[:12]} of policy 'strict'" in said, said
    assert "SECRET-4471" not in resp.text
    out = tmp_path / "cli.jsonl"
    result = run("--config", str(gw.config_path), "export", "--tenant", "acme", "--format", "jsonl",
                 "--out", str(out))
    assert_one_line_error(result, 2, "export refused", f"version {v1[:12]} of policy 'strict'")
    assert not out.exists()
    code, said = verify(gw)
    assert code == 1 and "policy_version_missing" in said and v1[:12] in said, said


def test_retention_keeps_a_round_whose_kept_version_was_deleted(make_gateway: Callable[..., Gateway],
                                                               tmp_path: Path) -> None:
    """Recorded under a 365-day version, the policy then edited to 1 day: the round is not due.
    Once that version's row is deleted, a purge two days on still keeps it (counted, and logged
    naming the version) instead of purging it under today's 1-day policy, and verify names the
    missing version (probe F1)."""
    gw, folder, v1 = _chat_gateway(make_gateway, tmp_path, RET_365)
    tables = Tables("sqlite", gw)
    chat(gw, "kept", "a year's text")
    _swap(gw, folder, "chat.yaml", RET_1, lambda s: s.get("chat") is not None and s.get("chat").version_hash != v1)
    later = time.time() + 2 * 86400
    totals = with_service(gw, lambda svc: purge_expired(svc, load_policy_set(folder), now=later))
    assert totals == {"rounds": 0, "sessions": 0, "skipped": 0, "versions_missing": 0}

    tables.sql("DELETE FROM policy_versions WHERE hash=?", v1)
    totals = with_service(gw, lambda svc: purge_expired(svc, load_policy_set(folder), now=later))
    assert totals == {"rounds": 0, "sessions": 0, "skipped": 0, "versions_missing": 1}
    assert tables.sql("SELECT count(*) FROM rounds WHERE session_id='kept'") == [(1,)]
    logged = [json.loads(line) for line in gw.log_path.read_text().splitlines()
              if "retention_policy_version_missing" in line]
    assert [(e["policy_hash"], e["rounds_kept"]) for e in logged] == [(v1, 1)], logged
    code, out = verify(gw)
    assert code == 1 and "policy_version_missing" in out and "session kept, round 1" in out, out


def test_verify_names_a_deleted_version_whose_rounds_were_purged(make_gateway: Callable[..., Gateway],
                                                                tmp_path: Path) -> None:
    """A version's row deleted after its rounds were purged (the session erased whole) leaves no
    round row to flag, but the chain still records rounds under it: verify names it (probe F1)."""
    gw, folder, v1 = _chat_gateway(make_gateway, tmp_path, RET_1)
    tables = Tables("sqlite", gw)
    chat(gw, "gone", "a day's text")
    purged = _cli_days_on(2, "--config", str(gw.config_path), "purge")  # a purge that writes its entry then
    assert purged.returncode == 0 and "purged 1 expired rounds; erased 1 sessions" in purged.stdout, purged
    code, out = verify(gw)
    assert code == 0, out
    tables.sql("DELETE FROM policy_versions WHERE hash=?", v1)
    code, out = verify(gw)
    assert code == 1 and "policy_version_missing" in out, out
    assert f"version {v1[:12]} of policy 'chat'" in out and "no longer stored" in out, out


def test_a_kept_document_proves_itself(tmp_path: Path) -> None:
    """A stored version is read back by hash; an edited document is refused."""
    policy = _policy(V1)
    row = PolicyVersionRow(policy.version_hash, "chat", 0.0, document(policy))
    assert PolicyVersion.from_document(row).export.detectors == {
        "email": "mask"}

    async def main() -> None:
        store = SQLiteStore(tmp_path / "v.db")
        await store.open()
        try:
            await store.save_policy_versions([PolicyVersionRow(policy.version_hash, "chat", 1.0,
                                                               document(policy).replace("mask", "hash"))])
            with pytest.raises(IntegrityError) as info:
                await PolicyVersions.load(store)
            assert "does not match its hash" in info.value.detail
        finally:
            await store.close()
    asyncio.run(main())


@pytest.mark.postgres
def test_postgres_keeps_policy_versions_once(tmp_path: Path) -> None:
    """On PostgreSQL (migration 2) a version is kept once, first load wins, and reads back."""
    from tests.evidence.test_failover import PG_DSN, _execute

    try:
        asyncio.run(_execute("SELECT 1"))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        pytest.skip(f"PostgreSQL not reachable: {type(exc).__name__}: {exc}")
    schema = f"sg_pv_{time.time_ns() % 10**12}"
    policy = _policy(V1)

    async def main() -> list[PolicyVersionRow]:
        store = PostgresStore(PG_DSN, schema=schema, pool_size=2)
        await store.open()
        try:
            row = PolicyVersionRow(policy.version_hash, "chat", 1.0, document(policy))
            await store.save_policy_versions([row])
            await store.save_policy_versions([PolicyVersionRow(policy.version_hash, "chat", 2.0, document(policy))])
            versions = await PolicyVersions.load(store)
            assert [v.id for v in versions] == ["chat"]
            return await store.policy_versions()
        finally:
            await store.close()
            await _execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    rows = asyncio.run(main())
    assert [(r.hash, r.loaded_at) for r in rows] == [(policy.version_hash, 1.0)]
