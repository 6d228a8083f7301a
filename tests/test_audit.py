"""The audit chain: sealing, tamper detection of every kind, checkpoints and their signing key."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import stat
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

import orjson
import pytest

from gateway.audit import (
    GENESIS,
    ChainRefused,
    Checkpoint,
    Checkpointer,
    CheckpointLog,
    EntryKey,
    Signer,
    VerifyError,
    VerifyReport,
    averify_chain,
    entry_fields,
    row_from_body,
    seal_entry,
    verify_chain,
)
from gateway.background import Health
from gateway.errors import ConfigError
from gateway.store.base import AuditRow

T0 = 1_700_000_000.0


def _round_fields(i: int, session: str = "s-1") -> dict:
    return {"event": "round", "request_id": f"req-{i}", "session_id": session, "policy_id": "support",
            "policy_hash": "ab" * 32, "route": "/v1/chat/completions", "model": "gpt-4o-mini",
            "outcome": "completed", "input_keys": ["input.ticket_id"], "reply_keys": None,
            "bytes_in": 10 + i, "bytes_out": 20 + i,
            "ciphertext_sha256": hashlib.sha256(f"ct-{session}-{i}".encode()).hexdigest()}


def make_chain(n: int, tenant: str = "acme", *, after: AuditRow | None = None,
               key: EntryKey | None = None) -> list[AuditRow]:
    """``n`` sealed round entries (with MACs under ``key``), continuing ``after`` when given."""
    rows: list[AuditRow] = []
    prev_hash, seq = (after.hash, after.seq) if after else (GENESIS, 0)
    for _ in range(n):
        seq += 1
        row = seal_entry(tenant, seq, prev_hash, T0 + seq, _round_fields(seq), key)
        rows.append(row)
        prev_hash = row.hash
    return rows


def reseal_from(rows: list[AuditRow], index: int, fields_at_index: dict) -> list[AuditRow]:
    """Rewrite the chain from ``index`` on with valid hashes (what an attacker with the DB can do)."""
    out = rows[:index]
    prev = out[-1].hash if out else GENESIS
    for k, row in enumerate(rows[index:]):
        fields = {k2: v for k2, v in entry_fields(row).items() if k2 not in ("tenant", "seq", "time", "prev_hash")}
        if k == 0:
            fields.update(fields_at_index)
        new = seal_entry(row.tenant, row.seq, prev, row.created_at, fields)
        out.append(new)
        prev = new.hash
    return out


@pytest.fixture()
def signer(tmp_path: Path) -> Signer:
    return Signer.load_or_create(tmp_path / "keys" / "audit.key")


def _err(report: VerifyReport) -> VerifyError:
    assert report.first_error is not None, "verification passed"
    return report.first_error


def _error(report: VerifyReport) -> tuple[int | None, str]:
    return _err(report).seq, _err(report).kind


# --------------------------------------------------------------------------- sealing


def test_seal_entry_hashes_its_canonical_body() -> None:
    """The hash is the SHA-256 of a sorted-key JSON body that holds the links and the fields."""
    row = seal_entry("acme", 1, GENESIS, T0, _round_fields(1))
    assert row.hash == hashlib.sha256(row.body).hexdigest()
    doc = orjson.loads(row.body)
    assert list(doc) == sorted(doc)
    assert (doc["tenant"], doc["seq"], doc["prev_hash"], doc["time"]) == ("acme", 1, GENESIS, T0)
    assert doc["input_keys"] == ["input.ticket_id"]


def test_seal_entry_refuses_unknown_fields_and_events() -> None:
    """A field outside the schema (a value under a new name) or an unknown event is refused."""
    with pytest.raises(ValueError, match="content"):
        seal_entry("acme", 1, GENESIS, T0, {"event": "round", "content": "secret"})
    with pytest.raises(ValueError, match="event"):
        seal_entry("acme", 1, GENESIS, T0, {"event": "lunch"})


def test_row_from_body_rebuilds_the_row() -> None:
    """A row rebuilt from its body alone equals the sealed row."""
    row = make_chain(1)[0]
    assert row_from_body(row.body) == row


# --------------------------------------------------------------------------- verification


def test_intact_chain_verifies() -> None:
    """An untouched chain verifies and the report names its range and head."""
    rows = make_chain(10)
    report = verify_chain(rows, tenant="acme")
    assert report.ok
    assert (report.entries, report.first_seq, report.last_seq, report.head_hash) == (10, 1, 10, rows[-1].hash)


def test_report_names_the_broken_entry() -> None:
    """The report's summary and dict name the kind and seq of the first problem."""
    rows = make_chain(5)
    del rows[2]
    report = verify_chain(rows, tenant="acme")
    assert report.summary().startswith("FAIL tenant acme") and "gap at seq 3" in report.summary()
    doc = report.to_dict()
    assert doc["ok"] is False and doc["first_error"] == {"seq": 3, "kind": "gap",
                                                          "message": "entry 3 is missing (the next entry is 4)"}


def test_empty_chain_verifies() -> None:
    """A tenant without entries verifies (nothing to contradict)."""
    assert verify_chain([], tenant="acme").ok


def test_edited_body_is_caught() -> None:
    """Changing an entry's content without its hash is reported as an edit of that entry."""
    rows = make_chain(10)
    rows[4] = dataclasses.replace(rows[4], body=rows[4].body.replace(b"req-5", b"req-X"))
    assert _error(verify_chain(rows, tenant="acme")) == (5, "edited")


def test_edited_and_rehashed_entry_breaks_the_next_link() -> None:
    """An edit whose hash was recomputed is caught where the next entry links to the old hash."""
    rows = make_chain(10)
    forged = seal_entry("acme", 5, rows[3].hash, rows[4].created_at, {**_round_fields(5), "model": "other"})
    rows[4] = forged
    assert _error(verify_chain(rows, tenant="acme")) == (6, "bad_link")


def test_edited_column_is_caught() -> None:
    """A stored column that disagrees with the hashed body is an edit."""
    rows = make_chain(5)
    rows[2] = dataclasses.replace(rows[2], created_at=rows[2].created_at + 3600)
    assert _error(verify_chain(rows, tenant="acme")) == (3, "edited")


def test_deleted_entry_is_a_gap() -> None:
    """Removing an entry leaves a gap reported at the missing sequence number."""
    rows = make_chain(10)
    del rows[6]
    report = verify_chain(rows, tenant="acme")
    assert _error(report) == (7, "gap")
    assert "entry 7 is missing" in _err(report).message


def test_deleted_entries_with_renumbered_columns_are_a_gap() -> None:
    """Deleting entries and renumbering the seq column is still a gap: bodies keep their seq."""
    rows = make_chain(10)
    kept = rows[:3] + rows[5:]
    renumbered = [dataclasses.replace(r, seq=i) for i, r in enumerate(kept, start=1)]
    report = verify_chain(renumbered, tenant="acme")
    assert _error(report) == (4, "gap")
    assert "entries 4..5 are missing" in _err(report).message


def test_deleted_last_but_one_entry_is_a_gap() -> None:
    """A gap right before the end is reported although no entry follows it."""
    rows = make_chain(5)
    del rows[3]
    assert _error(verify_chain(rows, tenant="acme")) == (4, "gap")


def test_reordered_entries_are_caught() -> None:
    """Two swapped entries are reported as reordered at the first displaced seq."""
    rows = make_chain(10)
    rows[3], rows[4] = rows[4], rows[3]
    assert _error(verify_chain(rows, tenant="acme")) == (4, "reordered")


def test_reordered_by_swapping_seq_columns_is_caught() -> None:
    """Swapping two entries' seq columns (so a DB returns them swapped) is a reorder."""
    rows = make_chain(10)
    a, b = rows[3], rows[4]
    rows[3], rows[4] = dataclasses.replace(b, seq=4), dataclasses.replace(a, seq=5)
    assert _error(verify_chain(rows, tenant="acme")) == (4, "reordered")


def test_inserted_entry_is_caught() -> None:
    """An entry sealed into the middle (later entries shifted) is reported at its seq."""
    rows = make_chain(10)
    forged = seal_entry("acme", 4, rows[2].hash, T0 + 3.5, _round_fields(99))
    shifted = [dataclasses.replace(r, seq=r.seq + 1) for r in rows[3:]]
    report = verify_chain([*rows[:3], forged, *shifted], tenant="acme")
    assert _error(report) == (4, "inserted")


def test_duplicate_seq_is_an_insertion() -> None:
    """A second entry with an existing seq is an insertion."""
    rows = make_chain(6)
    forged = seal_entry("acme", 3, rows[1].hash, T0 + 3, _round_fields(77))
    assert _error(verify_chain([*rows[:3], forged, *rows[3:]], tenant="acme")) == (3, "inserted")


def test_foreign_tenant_entry_is_an_insertion() -> None:
    """An entry sealed for another tenant does not belong in this chain."""
    rows = make_chain(4)
    rows[2] = make_chain(3, tenant="globex")[2]
    assert _error(verify_chain(rows, tenant="acme")) == (3, "inserted")


def test_first_entry_must_link_to_genesis() -> None:
    """A chain whose first entry does not start at the genesis hash is broken at seq 1."""
    rows = make_chain(3)
    rows[0] = seal_entry("acme", 1, "f" * 64, T0 + 1, _round_fields(1))
    assert _error(verify_chain(rows, tenant="acme")) == (1, "bad_link")


def test_averify_chain_reads_an_async_iterator() -> None:
    """The async variant verifies rows from an async iterator and catches the same tampering."""
    rows = make_chain(8)

    async def gen(items: Iterable[AuditRow]) -> AsyncIterator[AuditRow]:
        for r in items:
            yield r

    assert asyncio.run(averify_chain(gen(rows), tenant="acme")).ok
    del rows[2]
    report = asyncio.run(averify_chain(gen(rows), tenant="acme"))
    assert _error(report) == (3, "gap")


def test_erased_session_leaves_the_chain_verifiable() -> None:
    """Entries hold ciphertext hashes, not content, so erasing a session's rounds breaks nothing."""
    rows: list[AuditRow] = []
    prev = GENESIS
    plaintext = "my ticket number is 4711"
    for seq, session in enumerate(["alice", "bob", "alice", "bob"], start=1):
        row = seal_entry("acme", seq, prev, T0 + seq, _round_fields(seq, session))
        rows.append(row)
        prev = row.hash
    stored_rounds = {r.hash: plaintext for r in rows}
    rows.append(seal_entry("acme", 5, prev, T0 + 5, {"event": "erasure", "session_id": "alice",
                                                      "detail": {"rounds": 2}}))
    stored_rounds.clear()  # the session's rounds and data key are gone
    report = verify_chain(rows, tenant="acme")
    assert report.ok and report.entries == 5
    assert all(plaintext.encode() not in r.body for r in rows)


# --------------------------------------------------------------------------- checkpoints


def test_checkpoints_verify_and_count(signer: Signer) -> None:
    """Checkpoints signed over the real heads verify and are counted."""
    rows = make_chain(10)
    cps = [signer.sign_head("acme", 4, rows[3].hash, T0 + 100), signer.sign_head("acme", 10, rows[9].hash, T0 + 200)]
    report = verify_chain(rows, tenant="acme", checkpoints=cps, public_key=signer.public_key_pem())
    assert report.ok and report.checkpoints == 2


def test_truncated_tail_is_caught_by_a_checkpoint(signer: Signer) -> None:
    """Dropping the newest entries is caught against a checkpoint kept outside the store."""
    rows = make_chain(10)
    cp = signer.sign_head("acme", 10, rows[9].hash, T0 + 200)
    report = verify_chain(rows[:7], tenant="acme", checkpoints=[cp], public_key=signer.public_key)
    assert _error(report) == (8, "truncated")
    assert "reached seq 10" in _err(report).message


def test_rewritten_history_is_caught_by_a_checkpoint(signer: Signer) -> None:
    """A tail rewritten with every hash recomputed no longer matches the signed head."""
    rows = make_chain(10)
    cp = signer.sign_head("acme", 8, rows[7].hash, T0 + 200)
    forged = reseal_from(rows, 4, {"model": "other"})
    assert verify_chain(forged, tenant="acme").ok  # undetectable without the checkpoint
    report = verify_chain(forged, tenant="acme", checkpoints=[cp], public_key=signer.public_key)
    assert _error(report) == (8, "checkpoint_mismatch")


def test_forged_checkpoint_is_caught(signer: Signer, tmp_path: Path) -> None:
    """A checkpoint whose fields were changed, or that another key signed, fails its signature."""
    rows = make_chain(10)
    real = signer.sign_head("acme", 10, rows[9].hash, T0 + 200)
    moved = dataclasses.replace(real, seq=12)
    report = verify_chain(rows, tenant="acme", checkpoints=[moved], public_key=signer.public_key)
    assert _error(report) == (12, "bad_signature")
    other = Signer.load_or_create(tmp_path / "other.key")
    foreign = other.sign_head("acme", 10, rows[9].hash, T0 + 200)
    report = verify_chain(rows, tenant="acme", checkpoints=[foreign], public_key=signer.public_key)
    assert _error(report) == (10, "bad_signature")
    assert "signed by key" in _err(report).message


def test_checkpoints_need_a_public_key(signer: Signer) -> None:
    """Checkpoints cannot be passed without the key that checks them."""
    rows = make_chain(2)
    with pytest.raises(ValueError, match="public key"):
        verify_chain(rows, tenant="acme", checkpoints=[signer.sign_head("acme", 2, rows[1].hash, T0)])


def test_other_tenants_checkpoints_are_ignored(signer: Signer) -> None:
    """Only the verified tenant's checkpoints apply."""
    rows = make_chain(3)
    other = signer.sign_head("globex", 50, "e" * 64, T0)
    assert verify_chain(rows, tenant="acme", checkpoints=[other], public_key=signer.public_key).ok


# --------------------------------------------------------------------------- signer and checkpoint file


def test_signer_creates_a_private_key_file(tmp_path: Path) -> None:
    """The key is generated 0600 in a new 0700 directory and reloads to the same key."""
    path = tmp_path / "secret" / "audit.key"
    signer = Signer.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert Signer.load_or_create(path).key_id == signer.key_id
    assert signer.public_key_pem().startswith(b"-----BEGIN PUBLIC KEY-----")


def test_signer_refuses_a_group_readable_key(tmp_path: Path) -> None:
    """A key file others can read is refused with the file named."""
    path = tmp_path / "audit.key"
    Signer.load_or_create(path)
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match="audit.key.*chmod 600"):
        Signer.load_or_create(path)


def test_signer_refuses_a_non_key_file(tmp_path: Path) -> None:
    """A file that is not an Ed25519 private key is a configuration error."""
    path = tmp_path / "audit.key"
    path.write_bytes(b"not a key")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="PEM private key"):
        Signer.load_or_create(path)


def test_checkpoint_log_round_trips(signer: Signer, tmp_path: Path) -> None:
    """Appended checkpoints read back in order, and the latest per tenant is found."""
    log = CheckpointLog(tmp_path / "cp" / "checkpoints.jsonl")
    a1 = signer.sign_head("acme", 1, "a" * 64, T0)
    g1 = signer.sign_head("globex", 5, "b" * 64, T0)
    a2 = signer.sign_head("acme", 9, "c" * 64, T0 + 1)
    log.append([a1, g1])
    log.append([a2])
    assert list(log) == [a1, g1, a2]
    assert log.for_tenant("acme") == [a1, a2]
    assert log.latest() == {"acme": a2, "globex": g1}
    assert a2.verify(signer.public_key) is None


def test_checkpoint_log_names_a_malformed_line(tmp_path: Path) -> None:
    """A damaged checkpoint file is reported with its line number."""
    path = tmp_path / "checkpoints.jsonl"
    path.write_bytes(b'{"tenant": "acme"}\n')
    with pytest.raises(ConfigError, match=r"checkpoints.jsonl:1"):
        list(CheckpointLog(path))


def test_missing_checkpoint_log_is_empty(tmp_path: Path) -> None:
    """A checkpoint file that does not exist yet holds no checkpoints."""
    assert list(CheckpointLog(tmp_path / "none.jsonl")) == []


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def test_checkpointer_signs_every_n_entries(signer: Signer, tmp_path: Path) -> None:
    """A tenant is due after N entries, and signing it records the head in the file."""
    log = CheckpointLog(tmp_path / "cp.jsonl")
    cpr = Checkpointer(signer, log, every_n=3, every_seconds=60, clock=FakeClock())
    rows = make_chain(5)
    cpr.observe(rows[:2])
    assert cpr.due() == []
    cpr.observe(rows[2:3])
    assert cpr.due() == ["acme"]
    made = cpr.checkpoint_now(cpr.due())
    assert [(c.seq, c.hash) for c in made] == [(3, rows[2].hash)]
    assert list(log) == made
    assert cpr.due() == []


def test_checkpointer_signs_after_t_seconds(signer: Signer, tmp_path: Path) -> None:
    """An entry that waited T seconds makes its tenant due even below N."""
    clock = FakeClock()
    cpr = Checkpointer(signer, CheckpointLog(tmp_path / "cp.jsonl"), every_n=1000, every_seconds=60,
                       clock=clock)
    cpr.observe(make_chain(1))
    assert cpr.due() == []
    clock.now += 61
    assert cpr.due() == ["acme"]


def test_checkpointer_resumes_from_its_file(signer: Signer, tmp_path: Path) -> None:
    """After a restart, entries already covered by the file do not count as pending."""
    log = CheckpointLog(tmp_path / "cp.jsonl")
    rows = make_chain(5)
    log.append([signer.sign_head("acme", 4, rows[3].hash, T0)])
    cpr = Checkpointer(signer, log, every_n=2, every_seconds=60, clock=FakeClock())
    cpr.observe(rows)
    assert cpr.due() == []
    cpr.observe(make_chain(1, after=rows[-1]))
    assert cpr.due() == ["acme"]


def test_checkpoint_tenant_covers_the_latest_head(signer: Signer, tmp_path: Path) -> None:
    """An explicit checkpoint (for an export) signs the newest observed head and verifies."""
    cpr = Checkpointer(signer, CheckpointLog(tmp_path / "cp.jsonl"), every_n=1000, every_seconds=60)
    rows = make_chain(7)
    cpr.observe(rows)
    cp = asyncio.run(cpr.checkpoint_tenant("acme"))
    assert isinstance(cp, Checkpoint) and (cp.seq, cp.hash) == (7, rows[-1].hash)
    assert verify_chain(rows, tenant="acme", checkpoints=[cp], public_key=signer.public_key).ok


def test_checkpointer_run_signs_when_due_and_on_stop(signer: Signer, tmp_path: Path) -> None:
    """The background loop signs when N is reached and signs what is pending when cancelled."""
    log = CheckpointLog(tmp_path / "cp.jsonl")
    cpr = Checkpointer(signer, log, every_n=3, every_seconds=3600)
    rows = make_chain(4)

    async def scenario() -> list[int]:
        task = asyncio.create_task(cpr.run())
        await asyncio.sleep(0)
        cpr.observe(rows[:3])
        for _ in range(500):
            if list(log):
                break
            await asyncio.sleep(0.01)
        seen = [cp.seq for cp in log]
        cpr.observe(rows[3:])
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return seen

    assert asyncio.run(scenario()) == [3]
    assert [cp.seq for cp in log] == [3, 4]


@pytest.mark.parametrize("tail", [b'{"tenant": "acme", "seq": 1', b'{"tenant"', b"\x00" * 40,
                                  b'{"tenant": "acme", "se' + b"\x00" * 40],
                         ids=["cut-json", "cut-key", "nul-bytes", "cut-json-then-nul-bytes"])
def test_a_torn_last_checkpoint_line_is_skipped_and_the_next_append_starts_a_line(
        tmp_path: Path, signer: Signer, tail: bytes) -> None:
    """What an append cut short by a crash leaves (JSON ending early, or NULs where the data never
    landed) is skipped, not an error that stops start-up; the next append starts on a line of its
    own and later reads still skip the fragment."""
    log = CheckpointLog(tmp_path / "checkpoints.jsonl")
    first = signer.sign_head("acme", 3, "a" * 64, 1.0)
    log.append([first])
    with log.path.open("ab") as f:
        f.write(tail)
    assert list(log) == [first] and log.torn == {2}
    second = signer.sign_head("acme", 7, "b" * 64, 2.0)
    log.append([second])
    assert list(CheckpointLog(log.path)) == [first, second]
    assert log.latest() == {"acme": second}


@pytest.mark.parametrize("line", [b'{"tenant": "acme"} trailing\n', b"not json\n", b'{"tenant": "acme"}\n'],
                         ids=["trailing", "garbage", "fields-missing"])
def test_a_damaged_checkpoint_line_is_still_an_error(tmp_path: Path, signer: Signer, line: bytes) -> None:
    """Only a cut-short line is taken for a torn append: other damage names its line."""
    log = CheckpointLog(tmp_path / "checkpoints.jsonl")
    with log.path.open("wb") as f:
        f.write(line)
    log.append([signer.sign_head("acme", 1, "a" * 64, 1.0)])
    with pytest.raises(ConfigError, match=r"checkpoints.jsonl:1"):
        list(log)


def test_a_short_checkpoint_write_is_finished(tmp_path: Path, signer: Signer, monkeypatch: pytest.MonkeyPatch) -> None:
    """``os.write`` may write less than asked (a disk nearly full): the rest is written, not lost
    as a torn line that the next read would skip."""
    import gateway.audit as audit_module

    real_write = os.write
    monkeypatch.setattr(audit_module.os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    log = CheckpointLog(tmp_path / "checkpoints.jsonl")
    cps = [signer.sign_head("acme", 3, "a" * 64, 1.0), signer.sign_head("globex", 4, "b" * 64, 2.0)]
    log.append(cps)
    monkeypatch.undo()
    assert list(CheckpointLog(log.path)) == cps and not log.torn


# --------------------------------------------------------------------------- entry MACs


def test_the_entry_key_is_derived_from_the_signing_key_file(tmp_path: Path, signer: Signer) -> None:
    """Every process that loads the signing key file derives the same entry key, named by the
    signing key's id; another key file gives another."""
    again = Signer.load_or_create(tmp_path / "keys" / "audit.key")
    assert again.entry_key == signer.entry_key and signer.entry_key.key_id == signer.key_id
    assert len(signer.entry_key.secret) == 32 and "secret" not in repr(signer.entry_key)
    assert Signer.load_or_create(tmp_path / "other.key").entry_key.secret != signer.entry_key.secret


def test_keyed_entries_verify_under_the_key(signer: Signer) -> None:
    """Entries sealed with the entry key carry a MAC under its id, and verify with no note."""
    rows = make_chain(5, key=signer.entry_key)
    assert all(entry_fields(r)["mac"]["key_id"] == signer.key_id for r in rows)
    report = verify_chain(rows, tenant="acme", entry_key=signer.entry_key)
    assert report.ok and report.entries == 5 and report.notes == []


def test_an_entry_appended_without_the_key_after_keyed_ones_is_unauthenticated(tmp_path: Path,
                                                                               signer: Signer) -> None:
    """An entry sealed with ``seal_entry`` alone (hash and link right) at the head of a keyed chain,
    as anyone with the database can, fails naming its seq, also with keyed entries after it;
    so does one under another key. Without the key it cannot be told."""
    key = signer.entry_key
    rows = make_chain(5, key=key)
    forged = make_chain(1, after=rows[-1])
    assert verify_chain([*rows, *forged], tenant="acme").ok
    assert _error(verify_chain([*rows, *forged], tenant="acme", entry_key=key)) == (6, "unauthenticated")
    later = make_chain(2, after=forged[-1], key=key)
    report = verify_chain([*rows, *forged, *later], tenant="acme", entry_key=key)
    assert _error(report) == (6, "unauthenticated") and "carries no MAC" in _err(report).message
    foreign = make_chain(1, after=rows[-1], key=Signer.load_or_create(tmp_path / "other.key").entry_key)
    report = verify_chain([*rows, *foreign], tenant="acme", entry_key=key)
    assert _error(report) == (6, "unauthenticated") and "another key" in _err(report).message


@pytest.mark.parametrize("mac", ["altered", "made-up", "malformed"])
def test_an_entry_whose_mac_does_not_hold_is_forged(signer: Signer, mac: str) -> None:
    """An entry rewritten and rehashed with its old MAC, or given a made-up or malformed one, fails
    as ``forged`` at its seq."""
    rows = make_chain(3, key=signer.entry_key)
    doc = entry_fields(rows[2])
    if mac == "altered":
        doc["outcome"] = "refused"
    else:
        doc["mac"] = {"hmac_sha256": "ab" * 32, "key_id": signer.key_id} if mac == "made-up" else "ab" * 32
    body = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    row = dataclasses.replace(rows[2], body=body, hash=hashlib.sha256(body).hexdigest())
    assert _error(verify_chain([*rows[:2], row], tenant="acme", entry_key=signer.entry_key)) == (3, "forged")


def test_a_legacy_chain_verifies_with_a_note_and_may_be_followed_by_keyed_entries(signer: Signer) -> None:
    """Entries from before entry MACs verify under the key as legacy, noted, as far as a checkpoint
    signed before entry MACs (no ``macs`` mark) vouches for them; keyed entries may follow them
    (the upgrade), under marked checkpoints."""
    legacy = make_chain(4)
    old = signer.sign_head("acme", 4, legacy[-1].hash, T0, macs=False)
    assert not old.macs and "macs" not in old.to_dict()
    report = verify_chain(legacy, tenant="acme", entry_key=signer.entry_key, checkpoints=[old],
                          public_key=signer.public_key)
    assert report.ok and report.checkpoints == 1 and "entries 1..4 carry no MAC" in report.notes[0]
    keyed = make_chain(3, after=legacy[-1], key=signer.entry_key)
    new = signer.sign_head("acme", 7, keyed[-1].hash, T0 + 1)
    assert Checkpoint.from_dict(orjson.loads(orjson.dumps(new.to_dict()))) == new and new.to_dict()["macs"] == 1
    report = verify_chain([*legacy, *keyed], tenant="acme", entry_key=signer.entry_key, checkpoints=[old, new],
                          public_key=signer.public_key)
    assert report.ok and report.entries == 7 and report.checkpoints == 2
    assert "entries 1..4 carry no MAC" in report.notes[0]
    # the mark is signed: stripping it (to pass a checkpoint off as old-format) breaks the signature
    stripped = dataclasses.replace(new, macs=False)
    report = verify_chain([*legacy, *keyed], tenant="acme", entry_key=signer.entry_key,
                          checkpoints=[old, stripped], public_key=signer.public_key)
    assert _error(report) == (7, "bad_signature")


def test_an_entry_without_a_mac_no_old_format_checkpoint_covers_is_unauthenticated(signer: Signer) -> None:
    """Without a checkpoint signed before entry MACs (a tenant that began after the upgrade), an
    entry without a MAC is ``unauthenticated`` from the first one, even with no keyed entry yet (the
    probe's forged chain of a new tenant); with one, any such entry after its seq is, and a
    checkpoint of the new format vouches for none."""
    key = signer.entry_key
    legacy = make_chain(4)
    report = verify_chain(legacy, tenant="acme", entry_key=key)
    assert _error(report) == (1, "unauthenticated") and "no checkpoint signed before entry MACs" in _err(report).message
    new = signer.sign_head("acme", 4, legacy[-1].hash, T0)
    report = verify_chain(legacy, tenant="acme", entry_key=key, checkpoints=[new], public_key=signer.public_key)
    assert _error(report) == (1, "unauthenticated")
    old = signer.sign_head("acme", 2, legacy[1].hash, T0, macs=False)
    report = verify_chain(legacy, tenant="acme", entry_key=key, checkpoints=[old], public_key=signer.public_key)
    assert _error(report) == (3, "unauthenticated") and "covers entries up to 2" in _err(report).message
    report = verify_chain(legacy[:2], tenant="acme", entry_key=key, checkpoints=[old], public_key=signer.public_key)
    assert report.ok and "entries 1..2 carry no MAC" in report.notes[0]


def test_without_the_key_macs_are_noted_as_unchecked(signer: Signer) -> None:
    """Offline (the public key alone) MACs cannot be checked: the report says so."""
    report = verify_chain(make_chain(3, key=signer.entry_key), tenant="acme")
    assert report.ok and "MACs of 3 entries were not checked" in report.notes[0]


def _reader(stored: list[AuditRow]) -> Callable[[str, int], AsyncIterator[AuditRow]]:
    async def entries(tenant: str, after: int) -> AsyncIterator[AuditRow]:
        for row in stored:
            if row.tenant == tenant and row.seq > after:
                yield row
    return entries


def test_checkpointer_checks_entries_other_writers_added_and_signs_them(signer: Signer, tmp_path: Path) -> None:
    """Keyed entries another worker wrote between this process's own are read and checked, and
    the head after them is signed."""
    key = signer.entry_key
    ours = make_chain(3, key=key)
    theirs = make_chain(2, after=ours[-1], key=key)
    last = make_chain(1, after=theirs[-1], key=key)
    log = CheckpointLog(tmp_path / "cp.jsonl")
    cpr = Checkpointer(signer, log, every_n=2, every_seconds=60, clock=FakeClock(),
                       entries=_reader([*ours, *theirs, *last]))
    cpr.observe(ours)
    cpr.observe(last)
    assert [(c.seq, c.hash) for c in asyncio.run(cpr.flush(cpr.due()))] == [(6, last[0].hash)]
    assert cpr.refused() == {}


def test_checkpointer_never_signs_a_head_that_chains_through_a_forged_entry(signer: Signer, tmp_path: Path) -> None:
    """An entry appended around the gateway (no MAC) before this process's next one: the head is
    not signed, the tenant is refused for good (not due again), an export's checkpoint raises
    ``ChainRefused``, ``health`` names the tenant (the checkpointer itself stays up: the gateway
    stays ready), and other tenants are still signed."""
    key = signer.entry_key
    rows = make_chain(3, key=key)
    forged = make_chain(1, after=rows[-1])
    ours = make_chain(1, after=forged[-1], key=key)
    other = make_chain(2, tenant="globex", key=key)
    log = CheckpointLog(tmp_path / "cp.jsonl")
    cpr = Checkpointer(signer, log, every_n=2, every_seconds=3600,
                       entries=_reader([*rows, *forged, *ours, *other]))
    health = Health()

    async def scenario() -> None:
        task = asyncio.create_task(cpr.run(health))
        await asyncio.sleep(0)
        cpr.observe(rows)
        for _ in range(500):
            if list(log):
                break
            await asyncio.sleep(0.01)
        cpr.observe(ours)
        cpr.observe(other)
        for _ in range(500):
            if cpr.refused() and any(cp.tenant == "globex" for cp in log):
                break
            await asyncio.sleep(0.01)
        assert cpr.due() == []
        with pytest.raises(ChainRefused) as refusal:
            await cpr.checkpoint_tenant("acme")
        assert "unauthenticated at entry 4" in refusal.value.detail
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert [(cp.tenant, cp.seq) for cp in log] == [("acme", 3), ("globex", 2)]
    refused = cpr.refused()["acme"]
    assert (refused.seq, refused.kind) == (4, "unauthenticated")
    assert health.unready() == [] and health.refused_chains() == {"acme": "unauthenticated"}
    assert {(s.labels["tenant"], s.labels["kind"]): s.value for m in health.collect()
            if m.name == "sessiongate_audit_chain_refused" for s in m.samples} == {("acme", "unauthenticated"): 1.0}


def test_checkpointer_refuses_when_the_entry_it_signed_was_replaced(signer: Signer, tmp_path: Path) -> None:
    """The chain rewritten from the last signed entry on (rows deleted and the tail rebuilt) is
    refused too: the entry the checkpoint vouched for is no longer there."""
    key = signer.entry_key
    rows = make_chain(3, key=key)
    log = CheckpointLog(tmp_path / "cp.jsonl")
    log.append([signer.sign_head("acme", 3, rows[2].hash, T0)])
    rebuilt = [*rows[:2], *make_chain(1, after=rows[1])]
    ours = make_chain(1, after=rebuilt[-1], key=key)
    cpr = Checkpointer(signer, log, every_n=1, every_seconds=60, entries=_reader([*rebuilt, *ours]))
    cpr.observe(ours)
    assert asyncio.run(cpr.flush(cpr.due())) == []
    assert cpr.refused()["acme"].kind == "checkpoint_mismatch"


def test_checkpointer_refuses_entries_without_a_mac_no_old_format_checkpoint_covers(signer: Signer,
                                                                                     tmp_path: Path) -> None:
    """A new tenant's chain begun with entries without a MAC (written around the gateway) is refused
    when the gateway's first own entry follows them; a tenant whose legacy entries an old-format
    checkpoint vouches for is signed on, with a marked checkpoint, unless a MAC-less entry follows it."""
    key = signer.entry_key
    forged = make_chain(1, tenant="globex")
    ours = make_chain(1, tenant="globex", after=forged[-1], key=key)
    legacy = make_chain(3)
    appended = make_chain(1, after=legacy[-1])
    acme_ours = make_chain(1, after=appended[-1], key=key)
    initech = make_chain(2, tenant="initech")
    initech_ours = make_chain(1, tenant="initech", after=initech[-1], key=key)
    log = CheckpointLog(tmp_path / "cp.jsonl")
    log.append([signer.sign_head("acme", 3, legacy[-1].hash, T0, macs=False),
                signer.sign_head("initech", 2, initech[-1].hash, T0, macs=False)])
    cpr = Checkpointer(signer, log, every_n=1, every_seconds=60,
                       entries=_reader([*forged, *ours, *legacy, *appended, *acme_ours, *initech, *initech_ours]))
    cpr.observe([*ours, *acme_ours, *initech_ours])
    made = asyncio.run(cpr.flush(cpr.due()))
    assert [(c.tenant, c.seq, c.macs) for c in made] == [("initech", 3, True)]
    refused = cpr.refused()
    assert {t: (e.seq, e.kind) for t, e in refused.items()} == {"globex": (1, "unauthenticated"),
                                                                 "acme": (4, "unauthenticated")}
