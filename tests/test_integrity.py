"""Stored records are sealed and tamper-evident (issue 4 §1, §4), tested on real rows.

A real gateway records rounds into its SQLite file; the tests then change those rows with
``sqlite3`` directly (flip a byte, move a record to another session, tenant or sequence number,
point a data key at an unknown master key) and read them back through the HTTP API or a
``SessionService`` on the same files. Every tampering must give an integrity error for that
session only: a 500 with the fixed message, an ``integrity_error`` log line, and other sessions
and the process keep working.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from contextlib import closing, contextmanager
from typing import Any, TypeVar

import httpx
import pytest

from gateway.errors import IntegrityError
from gateway.keyring import FileKeyProvider, Keyring, MasterKey
from gateway.sessions import SessionService
from gateway.store.sqlite import SQLiteStore
from tests.conftest import ACME_KEY, GLOBEX_KEY, Gateway, Upstream

T = TypeVar("T")
FIXED_MESSAGE = "stored data for this session failed an integrity check; the operator has been told"


# --- helpers ------------------------------------------------------------------------------------

def chat(gw: Gateway, session: str, text: str, key: str = ACME_KEY) -> str:
    reply = gw.openai(key, session=session).chat.completions.create(
        model="standin", messages=[{"role": "user", "content": text}])
    return str(reply.choices[0].message.content)


def get_session(gw: Gateway, session: str, key: str = ACME_KEY) -> httpx.Response:
    return httpx.get(f"{gw.base_url}/sessions/{session}", headers={"Authorization": f"Bearer {key}"})


@contextmanager
def db(gw: Gateway) -> Iterator[sqlite3.Connection]:
    with closing(sqlite3.connect(gw.db_path, isolation_level=None, timeout=30)) as conn:
        yield conn


def execute(gw: Gateway, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with db(gw) as conn:
        return conn.execute(sql, args).fetchall()


def keyring_of(gw: Gateway) -> Keyring:
    return Keyring.from_provider(FileKeyProvider(gw.dir / "master-keys.json"))


def with_service(gw: Gateway, fn: Callable[[SessionService], Awaitable[T]], keyring: Keyring | None = None) -> T:
    """Run *fn* on a SessionService over the gateway's own database and key files."""
    async def run() -> T:
        store = SQLiteStore(gw.db_path)
        await store.open()
        try:
            return await fn(SessionService(store, keyring or keyring_of(gw)))
        finally:
            await store.close()
    return asyncio.run(run())


def assert_integrity_response(resp: httpx.Response) -> None:
    assert resp.status_code == 500, resp.text
    assert resp.json() == {"error": {"message": FIXED_MESSAGE, "type": "integrity_error",
                                     "code": "integrity_check_failed"}}


def integrity_log_lines(gw: Gateway) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in gw.log_path.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "integrity_error"]


def flipped(blob: bytes, i: int) -> bytes:
    return blob[:i] + bytes([blob[i] ^ 0x01]) + blob[i + 1:]


def read_fails(gw: Gateway, svc_call: Callable[[SessionService], Awaitable[Any]]) -> str:
    """The detail of the IntegrityError *svc_call* raises on the gateway's files."""
    with pytest.raises(IntegrityError) as info:
        with_service(gw, svc_call)
    return info.value.detail


# --- the tests ----------------------------------------------------------------------------------

def test_stored_bytes_differ_from_plaintext(gateway: Gateway) -> None:
    """Neither the user's text nor the reply appears in any byte of the database files."""
    secret = "the vault combination is 31-41-59-26"
    reply = chat(gateway, "plain", secret)
    with db(gateway) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        ct = conn.execute("SELECT ct FROM rounds WHERE session_id='plain'").fetchone()[0]
    stored = gateway.stored_bytes()
    assert secret in reply  # the stand-in echoes it, so the reply is secret too
    assert ct and ct in stored
    for text in (secret, reply, "31-41-59-26"):
        assert text.encode() not in stored
    assert get_session(gateway, "plain").json()["full_context"][0]["content"] == secret


def test_same_plaintext_sealed_twice_differs(gateway: Gateway, upstream: Upstream) -> None:
    """Two rounds with the same messages, and two sessions with the same history, store different bytes."""
    upstream.reply = lambda body: "the same reply"
    for session in ("twin-a", "twin-b"):
        chat(gateway, session, "the same question")
    chat(gateway, "twin-a", "the same question")
    cts = [row[0] for row in execute(gateway, "SELECT ct FROM rounds ORDER BY session_id, seq")]
    assert len(cts) == 3
    assert len(set(cts)) == 3
    assert len({ct[9:21] for ct in cts}) == 3  # three fresh nonces
    exported = [get_session(gateway, s).json()["full_context"] for s in ("twin-a", "twin-b")]
    assert exported[0][:2] == exported[1]


def test_flipping_any_byte_of_a_stored_round_fails(gateway: Gateway) -> None:
    """Each single flipped byte of a real round row makes the session's history unreadable."""
    chat(gateway, "flip", "first")
    (ct,) = execute(gateway, "SELECT ct FROM rounds WHERE session_id='flip' AND seq=1")[0]

    async def check_each(svc: SessionService) -> list[int]:
        survived = []
        with db(gateway) as conn:
            for i in range(len(ct)):
                conn.execute("UPDATE rounds SET ct=? WHERE session_id='flip' AND seq=1", (flipped(ct, i),))
                try:
                    await svc.full_context("acme", "flip")
                except IntegrityError:
                    continue
                survived.append(i)
            conn.execute("UPDATE rounds SET ct=? WHERE session_id='flip' AND seq=1", (ct,))
        return survived

    assert with_service(gateway, check_each) == []
    assert get_session(gateway, "flip").status_code == 200  # the original bytes read again


def test_flipping_any_byte_of_the_state_or_data_key_fails(gateway: Gateway) -> None:
    """Each flipped byte of the sealed state, the wrapped data key or its id fails to load."""
    chat(gateway, "flip", "first")
    targets = [("sessions", "state_ct"), ("data_keys", "wrapped"), ("data_keys", "dk_id")]
    for table, column in targets:
        (blob,) = execute(gateway, f"SELECT {column} FROM {table} WHERE session_id='flip'")[0]

        async def check_each(svc: SessionService, table: str = table, column: str = column,
                             blob: bytes = blob) -> list[int]:
            survived = []
            with db(gateway) as conn:
                for i in range(len(blob)):
                    conn.execute(f"UPDATE {table} SET {column}=? WHERE session_id='flip'", (flipped(blob, i),))
                    try:
                        await svc.load("acme", "flip")
                    except IntegrityError:
                        continue
                    survived.append(i)
                conn.execute(f"UPDATE {table} SET {column}=? WHERE session_id='flip'", (blob,))
            return survived

        assert with_service(gateway, check_each) == [], f"{table}.{column}"
    assert with_service(gateway, lambda svc: svc.load("acme", "flip")) is not None


def test_tampered_session_gives_500_while_others_keep_working(gateway: Gateway) -> None:
    """A flipped state byte: export and chat get the fixed integrity 500, it is logged, and a
    sibling session of the same tenant still reads and chats."""
    chat(gateway, "victim", "hello")
    chat(gateway, "bystander", "hello")
    (state,) = execute(gateway, "SELECT state_ct FROM sessions WHERE session_id='victim'")[0]
    execute(gateway, "UPDATE sessions SET state_ct=? WHERE session_id='victim'", (flipped(state, len(state) // 2),))

    assert_integrity_response(get_session(gateway, "victim"))
    resp = httpx.post(f"{gateway.base_url}/chat/completions", headers={
        "Authorization": f"Bearer {ACME_KEY}", "X-Session-Id": "victim"},
        json={"model": "standin", "messages": [{"role": "user", "content": "again"}]})
    assert_integrity_response(resp)

    assert "still here?" in chat(gateway, "bystander", "still here?")
    after = get_session(gateway, "bystander")
    assert after.status_code == 200
    assert [m["content"] for m in after.json()["full_context"] if m["role"] == "user"] == ["hello", "still here?"]
    assert httpx.get(f"{gateway.url}/healthz").status_code == 200
    logged = integrity_log_lines(gateway)
    assert len(logged) >= 2
    assert all("state record seq" in line["detail"] for line in logged)
    assert all(line["route"] in ("/v1/sessions/{session_id}", "/v1/chat/completions") for line in logged), logged
    # the route is a template (no raw path in a log line); the request id leads to the session's
    requests = {line["request_id"]: line for line in map(json.loads, gateway.log_path.read_text().splitlines())
                if line.get("event") == "request"}
    assert any(requests.get(line["request_id"], {}).get("session_id") == "victim" for line in logged), logged


def test_unknown_master_key_id_gives_integrity_error(gateway: Gateway) -> None:
    """A data key row relabelled with a master key id the keyring lacks fails for that session
    only, as a row the audit chain does not vouch for (it records the master key that wraps it)."""
    chat(gateway, "orphan", "hello")
    chat(gateway, "bystander", "hello")
    execute(gateway, "UPDATE data_keys SET kek_id='mk-19990101-dead' WHERE session_id='orphan'")
    assert_integrity_response(get_session(gateway, "orphan"))
    assert get_session(gateway, "bystander").status_code == 200
    (line,) = integrity_log_lines(gateway)
    assert "'mk-19990101-dead'" in line["detail"] and "relabelled" in line["detail"], line


def test_wrong_master_key_bytes_give_integrity_error(gateway: Gateway) -> None:
    """A keyring whose key has the right id but other bytes cannot unwrap the session's data key."""
    chat(gateway, "s", "hello")
    real = keyring_of(gateway)
    impostor = Keyring([MasterKey(real.primary_id, b"\x07" * 32, "primary", 0.0)], source="impostor")
    with pytest.raises(IntegrityError) as info:
        with_service(gateway, lambda svc: svc.load("acme", "s"), keyring=impostor)
    assert "failed authentication" in info.value.detail
    assert with_service(gateway, lambda svc: svc.load("acme", "s"), keyring=real) is not None


def test_rounds_swapped_between_sequence_numbers_fail(gateway: Gateway) -> None:
    """Exchanging the sealed bytes of round 1 and round 2 of one session is detected."""
    chat(gateway, "order", "first")
    chat(gateway, "order", "second")
    (one,), (two,) = execute(gateway, "SELECT ct FROM rounds WHERE session_id='order' ORDER BY seq")
    execute(gateway, "UPDATE rounds SET ct=? WHERE session_id='order' AND seq=1", (two,))
    execute(gateway, "UPDATE rounds SET ct=? WHERE session_id='order' AND seq=2", (one,))
    detail = read_fails(gateway, lambda svc: svc.full_context("acme", "order"))
    assert "round record seq 1: authentication failed" in detail
    assert_integrity_response(get_session(gateway, "order"))


def test_round_copied_into_another_session_fails(gateway: Gateway) -> None:
    """A round row carried into another session (under that session's key id) fails there."""
    chat(gateway, "source", "mine")
    chat(gateway, "target", "theirs")
    (ct,) = execute(gateway, "SELECT ct FROM rounds WHERE session_id='source'")[0]
    execute(gateway, "UPDATE rounds SET ct=? WHERE session_id='target'", (ct,))
    detail = read_fails(gateway, lambda svc: svc.full_context("acme", "target"))
    assert "moved from another session" in detail
    assert_integrity_response(get_session(gateway, "target"))
    assert get_session(gateway, "source").status_code == 200


def test_whole_session_moved_to_another_session_id_fails(gateway: Gateway) -> None:
    """Copying all of a session's rows, data key included, under another id still fails to open."""
    chat(gateway, "original", "mine")
    with db(gateway) as conn:
        for table in ("data_keys", "sessions", "rounds"):
            conn.execute(f"CREATE TEMP TABLE t AS SELECT * FROM {table} WHERE session_id='original'")
            conn.execute("UPDATE t SET session_id='copy'")
            conn.execute(f"INSERT INTO {table} SELECT * FROM t")
            conn.execute("DROP TABLE t")
    detail = read_fails(gateway, lambda svc: svc.load("acme", "copy"))
    assert "state record seq 1: authentication failed" in detail
    assert_integrity_response(get_session(gateway, "copy"))
    assert get_session(gateway, "original").status_code == 200


def test_whole_session_moved_to_another_tenant_fails(gateway: Gateway) -> None:
    """The same session's rows relabelled with another tenant fail for that tenant."""
    chat(gateway, "shared-id", "acme's secret")
    with db(gateway) as conn:
        for table in ("data_keys", "sessions", "rounds"):
            conn.execute(f"CREATE TEMP TABLE t AS SELECT * FROM {table} WHERE tenant='acme'")
            conn.execute("UPDATE t SET tenant='globex'")
            conn.execute(f"INSERT INTO {table} SELECT * FROM t")
            conn.execute("DROP TABLE t")
    assert_integrity_response(get_session(gateway, "shared-id", GLOBEX_KEY))
    detail = read_fails(gateway, lambda svc: svc.load("globex", "shared-id"))
    assert "authentication failed" in detail
    assert get_session(gateway, "shared-id", ACME_KEY).status_code == 200
