"""Master-key management over a live store (issue 4 §2): rotate, follow, re-wrap, retire.

``sessiongate keys rotate`` runs as a separate process beside a real gateway under concurrent
load: no request may fail, every data key ends up wrapped by the new primary (the CLI re-wraps,
the running gateway follows the key file and re-wraps what it wrapped meanwhile), and after a
restart records written before and after the rotation read. ``keys retire`` refuses while a data
key still depends on the key, succeeds once none does, and a data key still wrapped by a retired
key is an integrity error for its session alone.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from gateway import keyring as kr
from gateway.app import build_app
from gateway.keys import rewrap_all
from gateway.sessions import Bounding, RoundRecord, SessionService
from gateway.settings import load_settings
from gateway.store.sqlite import SQLiteStore
from tests.conftest import REPO, Gateway, Upstream, _Server, write_config
from tests.test_erasure import cli, cli_at
from tests.test_integrity import assert_integrity_response, chat, get_session, integrity_log_lines

SESSIONS = 20
MAX_ROUNDS = 30  # per session: at most 600 requests in all (about 250 in practice)
PACE = 0.1  # seconds between one client's rounds, so the load spans the rotation


# --- helpers ------------------------------------------------------------------------------------

def kek_ids(db_path: Path) -> dict[str, str]:
    with closing(sqlite3.connect(db_path)) as conn:
        return dict(conn.execute("SELECT session_id, kek_id FROM data_keys").fetchall())


def key_states(key_file: Path) -> dict[str, str]:
    return {key["id"]: key["state"] for key in json.loads(key_file.read_text())["keys"]}


def primary(key_file: Path) -> str:
    (key_id,) = [k for k, state in key_states(key_file).items() if state == "primary"]
    return key_id


def wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.05)


@contextmanager
def serving(directory: Path, upstream: Upstream) -> Iterator[Gateway]:
    """A gateway on the files in *directory* (config written on first use), stopped on exit."""
    config = directory / "sessiongate.yaml"
    if not config.exists():
        shutil.copytree(REPO / "policies", directory / "policies")
        write_config(directory, upstream.url, directory / "policies")
    app = build_app(load_settings(config))
    server = _Server(app)
    try:
        yield Gateway(f"http://127.0.0.1:{server.port}", directory, config, directory / "gateway.db",
                      directory / "gateway.log", app)
    finally:
        server.stop()


def user_texts(gw: Gateway, session: str) -> list[str]:
    resp = get_session(gw, session)
    assert resp.status_code == 200, resp.text
    return [m["content"] for m in resp.json()["full_context"] if m["role"] == "user"]


# --- rotation -----------------------------------------------------------------------------------

def test_rotation_under_concurrent_load_fails_no_request(tmp_path: Path, upstream: Upstream) -> None:
    """`keys rotate` in another process while 20 clients chat: zero failed requests, every data
    key ends under the new primary, and after a restart rounds from before and after all read."""
    directory = tmp_path / "gw"
    directory.mkdir()
    failures: list[str] = []
    done = [0] * SESSIONS
    warm, rotated = threading.Event(), threading.Event()
    lock = threading.Lock()
    total = [0]

    def client(gw: Gateway, i: int) -> None:
        sdk, extra = gw.openai(session=f"load-{i}"), 0
        while done[i] < MAX_ROUNDS:
            try:
                sdk.chat.completions.create(model="standin", messages=[{"role": "user", "content": f"round {done[i]}"}])
            except Exception as exc:  # noqa: BLE001 - every failure is collected and asserted on
                failures.append(f"load-{i} round {done[i]}: {exc!r}")
            done[i] += 1
            with lock:
                total[0] += 1
                if total[0] >= 2 * SESSIONS:
                    warm.set()
            if rotated.is_set():
                extra += 1
                if extra >= 2:
                    return
            time.sleep(PACE)

    with serving(directory, upstream) as gw:
        key_file = directory / "master-keys.json"
        old = primary(key_file)
        with ThreadPoolExecutor(SESSIONS) as pool:
            clients = [pool.submit(client, gw, i) for i in range(SESSIONS)]
            assert warm.wait(60)
            before = sum(done)
            result = cli(gw, "keys", "rotate")
            during = sum(done)
            assert result.returncode == 0, result.stderr
            new = primary(key_file)
            assert new != old and f"new primary master key {new}" in result.stdout
            after_sessions = [f"after-{k}" for k in range(3)]
            for sid in after_sessions:  # new sessions while the gateway may not know the key yet
                chat(gw, sid, "after the rotation")
            wait_until(lambda: set(kek_ids(gw.db_path).values()) == {new},
                       "every data key wrapped by the new primary")
            rotated.set()
            for future in clients:
                future.result()
        assert failures == []
        assert before >= 2 * SESSIONS and during > before  # requests were served while the CLI ran
        assert key_states(key_file) == {old: "active", new: "primary"}
        assert len(kek_ids(gw.db_path)) == SESSIONS + len(after_sessions)

    with serving(directory, upstream) as again:  # a restart: a fresh keyring from the key file
        for i in range(SESSIONS):
            assert user_texts(again, f"load-{i}") == [f"round {n}" for n in range(done[i])]
        for sid in after_sessions:
            assert user_texts(again, sid) == ["after the rotation"]
        chat(again, "load-0", "after the restart")
        assert user_texts(again, "load-0")[-1] == "after the restart"
        listing = cli(again, "keys", "list")
        assert listing.returncode == 0, listing.stderr
        lines = {line.split("\t")[0]: line for line in listing.stdout.splitlines()}
        assert "active" in lines[old] and "wraps 0 data keys" in lines[old]
        assert "primary" in lines[new] and f"wraps {SESSIONS + 3} data keys" in lines[new]


def test_running_gateway_rewraps_after_the_key_file_rotates(make_gateway: Callable[..., Gateway]) -> None:
    """A rotation written to the key file by anyone is picked up by the gateway, which re-wraps
    every data key itself and audits the rotation."""
    gw = make_gateway()
    for sid in ("a", "b", "c"):
        chat(gw, sid, f"hello {sid}")
    provider = kr.FileKeyProvider(gw.dir / "master-keys.json")
    old = primary(provider.path)
    new = kr.rotate(provider).id
    assert set(kek_ids(gw.db_path).values()) == {old}
    wait_until(lambda: set(kek_ids(gw.db_path).values()) == {new}, "the gateway re-wrapped its data keys")
    assert [user_texts(gw, sid) for sid in ("a", "b", "c")] == [["hello a"], ["hello b"], ["hello c"]]
    chat(gw, "d", "new session")
    assert kek_ids(gw.db_path)["d"] == new
    with closing(sqlite3.connect(gw.db_path)) as conn:
        bodies = [bytes(r[0]).decode() for r in conn.execute("SELECT body FROM audit WHERE tenant='_system'")]
    assert any('"key_rotation"' in body and new in body for body in bodies)


def test_session_created_between_a_foreign_rewrap_and_the_reload_is_rewrapped(
        make_gateway: Callable[..., Gateway]) -> None:
    """Another process rotates and re-wraps; the gateway wraps a new session with the old key
    before it reloads, then reloads on reading a re-wrapped key: that session is re-wrapped too."""
    gw = make_gateway()
    chat(gw, "x", "before")
    provider = kr.FileKeyProvider(gw.dir / "master-keys.json")
    old = primary(provider.path)
    new = kr.rotate(provider).id
    assert rewrap(gw.dir) == 1  # what `keys rotate` does in its own process
    chat(gw, "y", "new session")  # wrapped with whatever key the gateway holds now
    chat(gw, "x", "after")  # x's key names the new primary: the gateway reloads its keyring
    assert kek_ids(gw.db_path)["x"] == new
    wait_until(lambda: set(kek_ids(gw.db_path).values()) == {new}, f"y re-wrapped from {old} to {new}")
    assert user_texts(gw, "y") == ["new session"]


# --- retire -------------------------------------------------------------------------------------

def record(directory: Path, sessions: list[str]) -> None:
    """Record one round per session straight through a SessionService on *directory*'s files."""
    async def run() -> None:
        store = SQLiteStore(directory / "gateway.db")
        await store.open()
        try:
            svc = SessionService(store, kr.Keyring.from_provider(kr.FileKeyProvider(directory / "master-keys.json")))
            for sid in sessions:
                rec = RoundRecord(f"req-{sid}", "default", "", "completed", f"hi {sid}", f"hello {sid}",
                                  {"event": "round", "request_id": f"req-{sid}", "session_id": sid})
                await svc.commit_round("acme", sid, rec, Bounding())
        finally:
            await store.close()
    asyncio.run(run())


def rewrap(directory: Path) -> int:
    async def run() -> int:
        store = SQLiteStore(directory / "gateway.db")
        await store.open()
        try:
            svc = SessionService(store, kr.Keyring.from_provider(kr.FileKeyProvider(directory / "master-keys.json")))
            return (await rewrap_all(svc)).rewrapped
        finally:
            await store.close()
    return asyncio.run(run())


def test_retire_refuses_while_data_keys_depend_on_it(make_gateway: Callable[..., Gateway], tmp_path: Path,
                                                     upstream: Upstream) -> None:
    """`keys retire` exits 2 naming the count while the old key wraps data keys, works after the
    re-wrap, and a data key row put back to its wrapping under the retired key (a row restored from
    an old copy) is an integrity error for its session alone: the chain records the re-wrap."""
    directory = tmp_path / "gw"
    directory.mkdir()
    shutil.copytree(REPO / "policies", directory / "policies")
    config = write_config(directory, upstream.url, directory / "policies")
    generated = cli_at(config, "keys", "generate")
    assert generated.returncode == 0, generated.stderr
    assert cli_at(config, "keys", "generate").returncode == 2  # never overwrites a keyring
    record(directory, ["a", "b"])
    provider = kr.FileKeyProvider(directory / "master-keys.json")
    old = primary(provider.path)
    new = kr.rotate(provider).id  # a new primary, nothing re-wrapped yet

    refused = cli_at(config, "keys", "retire", old)
    assert refused.returncode == 2
    assert "still wraps 2 data key(s)" in refused.stderr and old in refused.stderr
    assert cli_at(config, "keys", "retire", new).returncode == 2  # the primary cannot be retired
    assert key_states(provider.path) == {old: "active", new: "primary"}

    with closing(sqlite3.connect(directory / "gateway.db")) as conn:
        stale = conn.execute("SELECT kek_id, wrapped FROM data_keys WHERE session_id='a'").fetchone()
    assert rewrap(directory) == 2
    too_soon = cli_at(config, "keys", "retire", old)  # gateways may not have followed the rotation yet
    assert too_soon.returncode == 2 and "retry in" in too_soon.stderr
    retired = cli_at(config, "keys", "retire", old, "--force")
    assert retired.returncode == 0, retired.stderr
    assert key_states(provider.path) == {old: "retired", new: "primary"}

    with closing(sqlite3.connect(directory / "gateway.db", isolation_level=None)) as conn:
        conn.execute("UPDATE data_keys SET kek_id=?, wrapped=? WHERE session_id='a'", stale)
    gw = make_gateway(name="gw")
    assert_integrity_response(get_session(gw, "a"))
    assert user_texts(gw, "b") == ["hi b"]
    (line,) = integrity_log_lines(gw)
    assert f"master key {old!r}" in line["detail"] and f"master key {new!r}" in line["detail"], line
    assert "rolled back" in line["detail"]


def test_retire_of_an_unknown_key_names_it(gateway: Gateway) -> None:
    """Retiring an id that is not in the keyring exits 2 and says so; the key file is unchanged."""
    before = (gateway.dir / "master-keys.json").read_bytes()
    result = cli(gateway, "keys", "retire", "mk-19990101-beef")
    assert result.returncode == 2
    assert "no master key 'mk-19990101-beef'" in result.stderr
    assert (gateway.dir / "master-keys.json").read_bytes() == before


@pytest.mark.parametrize("action", ["list", "rotate"])
def test_keys_commands_never_print_key_bytes(gateway: Gateway, action: str) -> None:
    """`keys list` and `keys rotate` name the primary key but never print a master key's bytes."""
    chat(gateway, "s", "hello")
    result = cli(gateway, "keys", action)
    assert result.returncode == 0, result.stderr
    assert primary(gateway.dir / "master-keys.json") in result.stdout
    keys = json.loads((gateway.dir / "master-keys.json").read_text())["keys"]
    assert not any(key["key"] in result.stdout + result.stderr for key in keys)


def test_a_backup_from_before_an_erasure_stays_unreadable_with_todays_key_file(tmp_path: Path,
                                                                               upstream: Upstream) -> None:
    """After erase, rotate and `keys retire`, a database copy taken before the erasure holds the
    erased session's data key wrapped by the retired key; today's key file no longer holds that
    key's bytes (turning its state back to active gives an invalid file), so the copy stays
    unreadable."""
    directory = tmp_path / "gw"
    directory.mkdir()
    shutil.copytree(REPO / "policies", directory / "policies")
    config = write_config(directory, upstream.url, directory / "policies")
    assert cli_at(config, "keys", "generate").returncode == 0
    record(directory, ["erased", "kept"])
    shutil.copy(directory / "gateway.db", tmp_path / "before-erasure.db")
    provider = kr.FileKeyProvider(directory / "master-keys.json")
    old = primary(provider.path)
    old_bytes = next(key.key for key in provider.load() if key.id == old)
    assert cli_at(config, "sessions", "erase", "--tenant", "acme", "erased").returncode == 0
    assert cli_at(config, "keys", "rotate").returncode == 0
    retired = cli_at(config, "keys", "retire", old, "--force")
    assert retired.returncode == 0, retired.stderr
    assert "destroyed" in retired.stdout and "backups" in retired.stdout

    text = provider.path.read_text()
    assert base64.b64encode(old_bytes).decode() not in text
    with closing(sqlite3.connect(tmp_path / "before-erasure.db")) as conn:
        kek_id, = conn.execute("SELECT kek_id FROM data_keys WHERE session_id='erased'").fetchone()
    assert kek_id == old
    flipped = tmp_path / "flipped.json"
    flipped.write_text(text.replace('"retired"', '"active"'))
    flipped.chmod(0o600)
    with pytest.raises(kr.ConfigError, match="key"):
        kr.FileKeyProvider(flipped).load()
    assert old not in {key.id for key in provider.load() if key.key}


# --- the audit signing key ------------------------------------------------------------------------

def _checkpointed(gateway: Gateway) -> Path:
    """Rounds enough for a signed checkpoint (``checkpoint_every`` is 5 in tests); the file."""
    for i in range(6):
        chat(gateway, "signed", f"turn {i}")
    checkpoints = gateway.dir / "checkpoints.jsonl"
    deadline = time.monotonic() + 10
    while not (checkpoints.exists() and checkpoints.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoints.exists() and checkpoints.read_text().strip(), "no checkpoint was signed"
    return checkpoints


def test_a_missing_signing_key_over_signed_checkpoints_is_refused(gateway: Gateway) -> None:
    """With checkpoints signed, a deleted signing key is not silently made anew: `serve` and the
    CLI stop with one line naming the file, the field and what to do."""
    _checkpointed(gateway)
    key = gateway.dir / "audit-signing.key"
    key.unlink()
    refused = cli(gateway, "audit", "public-key")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert f"{key}: audit.signing_key_file: the audit signing key is missing" in refused.stderr
    assert "restore the key file from your backup" in refused.stderr and not key.exists()
    serve = cli(gateway, "serve", "--port", "0")
    assert serve.returncode != 0 and "the audit signing key is missing" in serve.stderr, serve.stderr
    assert not key.exists()


def test_a_replaced_signing_key_over_signed_checkpoints_is_refused(gateway: Gateway, tmp_path: Path) -> None:
    """Another key in the signing key's place is refused too: the checkpoints name the key that
    signed them."""
    from gateway.audit import Signer

    _checkpointed(gateway)
    key = gateway.dir / "audit-signing.key"
    other = Signer.load_or_create(tmp_path / "other.key")
    key.write_bytes((tmp_path / "other.key").read_bytes())
    refused = cli(gateway, "audit", "public-key")
    assert refused.returncode == 2 and "this is not the key that signed the checkpoints" in refused.stderr
    assert other.key_id in refused.stderr


def test_a_new_signing_key_is_generated_with_a_warning_when_nothing_was_signed(tmp_path: Path) -> None:
    """Without checkpoints the key is generated (0600), and a warning says so and what it means
    for checkpoints signed by an earlier key."""
    import stat

    from structlog.testing import capture_logs

    from gateway.keys import load_signer

    config = write_config(tmp_path, None, REPO / "policies")
    with capture_logs() as logs:
        signer = load_signer(load_settings(config))
    (line,) = [entry for entry in logs if entry["event"] == "audit_signing_key_generated"]
    assert line["log_level"] == "warning" and line["key_id"] == signer.key_id
    assert "verify only with that key's public key" in line["note"]
    assert stat.S_IMODE((tmp_path / "audit-signing.key").stat().st_mode) == 0o600
    with capture_logs() as again:
        assert load_signer(load_settings(config)).key_id == signer.key_id
    assert not [entry for entry in again if entry["event"] == "audit_signing_key_generated"]


def test_a_torn_last_checkpoint_line_does_not_stop_the_gateway_or_verify(gateway: Gateway) -> None:
    """A checkpoint append cut short by a crash leaves a line that ends early: `audit verify`
    (and so start-up, which reads the same file) goes on, skipping it with a warning."""
    checkpoints = _checkpointed(gateway)
    with checkpoints.open("ab") as f:
        f.write(b'{"tenant": "acme", "seq": 9, "hash": "ab')
    verified = cli(gateway, "audit", "verify")
    assert verified.returncode == 0 and "Traceback" not in verified.stderr, verified.stdout + verified.stderr
    assert "checkpoint_torn_line" in verified.stdout + verified.stderr
    public = cli(gateway, "audit", "public-key")
    assert public.returncode == 0 and "BEGIN PUBLIC KEY" in public.stdout, public.stderr


def test_rotate_goes_on_past_an_edited_data_key_row_and_says_so(gateway: Gateway) -> None:
    """A data_keys row whose wrapped key was made TEXT outside the gateway (SQLite's hex() or
    replace() on a blob gives text) is one failure, not a traceback that stops the rotation: the other keys are
    re-wrapped, and `keys rotate` exits 1 naming how many were not and why not to retire yet."""
    chat(gateway, "edited", "one")
    chat(gateway, "intact", "two")
    with closing(sqlite3.connect(gateway.db_path)) as conn, conn:
        conn.execute("UPDATE data_keys SET wrapped=hex(wrapped) WHERE session_id='edited'")
        assert conn.execute("SELECT typeof(wrapped) FROM data_keys WHERE session_id='edited'").fetchone() == ("text",)
    old = primary(gateway.dir / "master-keys.json")
    rotated = cli(gateway, "keys", "rotate")
    assert rotated.returncode == 1 and "Traceback" not in rotated.stderr, rotated.stderr
    assert "1 data keys could not be re-wrapped" in rotated.stderr and "do not retire" in rotated.stderr
    new = primary(gateway.dir / "master-keys.json")
    assert new != old and kek_ids(gateway.db_path) == {"edited": old, "intact": new}


def test_a_refused_keyring_reload_logs_why(make_gateway: Callable[..., Gateway]) -> None:
    """A key file made readable by others under a running gateway is refused: /readyz 503 names the
    watcher, and the keyring_reload_refused log line says what is wrong and how to fix it (never
    the key bytes); mode 0600 again makes the gateway ready."""
    import os

    import httpx

    gw = make_gateway()
    key_file = gw.dir / "master-keys.json"
    key_bytes = [key["key"] for key in json.loads(key_file.read_text())["keys"]]
    os.chmod(key_file, 0o644)
    os.utime(key_file, ns=(time.time_ns(), time.time_ns() + 1_000_000))  # a change the watcher sees
    try:
        def refused() -> list[dict[str, object]]:
            return [json.loads(line) for line in gw.log_path.read_text().splitlines()
                    if '"keyring_reload_refused"' in line]
        wait_until(lambda: bool(refused()), "the reload was refused")
        line = refused()[0]
        assert line["file"] == str(key_file)
        assert "open to group or others (mode 0644)" in str(line["detail"]) and "chmod 600" in str(line["detail"])
        assert not any(key in gw.log_path.read_text() for key in key_bytes)
        wait_until(lambda: httpx.get(f"{gw.url}/readyz").status_code == 503, "/readyz turned 503")
    finally:
        os.chmod(key_file, 0o600)
    wait_until(lambda: httpx.get(f"{gw.url}/readyz").status_code == 200, "/readyz ready again")


def test_rotate_changes_nothing_when_the_store_cannot_be_opened(tmp_path: Path) -> None:
    """`keys rotate` checks the configuration and opens the store before it writes the key file:
    a PostgreSQL DSN variable that is not set, or a SQLite store that cannot be opened, is one
    line naming the problem (exit 2) and the key file is byte for byte as it was, so a retry
    makes no second new key."""
    config = write_config(tmp_path, None, REPO / "policies",
                          store={"backend": "postgres", "dsn_env": "SG_TEST_UNSET_DSN"})
    key_file = tmp_path / "master-keys.json"
    assert kr.ensure(key_file)
    before = key_file.read_bytes()
    for _ in range(2):
        refused = cli_at(config, "keys", "rotate")
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert "SG_TEST_UNSET_DSN" in refused.stderr and "new primary" not in refused.stdout
        assert key_file.read_bytes() == before
    config = write_config(tmp_path, None, REPO / "policies")
    (tmp_path / "gateway.db-writer.lock").mkdir()  # the SQLite store cannot open its lock file
    refused = cli_at(config, "keys", "rotate")
    assert refused.returncode == 2 and "lock file" in refused.stderr and "Traceback" not in refused.stderr
    assert key_file.read_bytes() == before


def test_generate_refuses_a_store_that_holds_data_keys(gateway: Gateway) -> None:
    """`keys generate` after the key file was lost, over a store holding data keys, would make a
    keyring that unwraps none of them: it is refused naming the file to restore, and none is made."""
    chat(gateway, "kept", "hello")
    key_file = gateway.dir / "master-keys.json"
    key_file.unlink()
    refused = cli(gateway, "keys", "generate")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert str(key_file) in refused.stderr and "restore the key file from your backup" in refused.stderr
    assert not key_file.exists()


def test_rewrap_finishes_a_rotation_that_stopped(tmp_path: Path) -> None:
    """A rotation whose re-wrap stopped leaves the new primary in the key file and data keys under
    the old one; `keys rewrap` re-wraps them under the primary without making another key."""
    config = write_config(tmp_path, None, REPO / "policies")
    key_file = tmp_path / "master-keys.json"
    assert kr.ensure(key_file)
    old = primary(key_file)
    record(tmp_path, ["a", "b"])
    new = kr.rotate(kr.FileKeyProvider(key_file)).id  # the key file as a stopped `keys rotate` leaves it
    assert set(kek_ids(tmp_path / "gateway.db").values()) == {old}
    done = cli_at(config, "keys", "rewrap")
    assert done.returncode == 0 and "re-wrapped 2 data keys" in done.stdout, done.stdout + done.stderr
    assert set(kek_ids(tmp_path / "gateway.db").values()) == {new} and set(key_states(key_file)) == {old, new}
    listing = cli_at(config, "keys", "list").stdout
    assert f"{old}\tactive" in listing and "wraps 0 data keys" in listing.split(old)[1].splitlines()[0]
