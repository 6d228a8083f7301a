"""Redacted exports: exact output for a known corpus, and bundles that verify offline."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import hashlib
import io
import tarfile
import tracemalloc
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import orjson
import pytest

from gateway.audit import (
    GENESIS,
    Checkpoint,
    Checkpointer,
    CheckpointLog,
    Signer,
    VerifyError,
    VerifyReport,
    seal_entry,
)
from gateway.errors import IntegrityError
from gateway.export import (
    ExportRecord,
    Progress,
    RecordWriter,
    bundle_paths,
    export_bundle,
    verify_bundle,
    write_records,
)
from gateway.redact import MASK, Redactor, parse_blocks, pseudonym, tenant_secret
from gateway.session.record import format_keyed, with_blocks
from gateway.store.base import AuditRow

T0 = 1_700_000_000.0
SECRET = b"export-secret-for-tests-0123456789"
POLICY_HASH = {"support": "11" * 32, "freeform": "22" * 32}
POLICIES = {
    "support": ([{"key": "input.customer", "action": "hash"}, {"key": "internal_note", "action": "drop"}],
                {"email", "card"}, ["input.customer", "input.question", "summary", "internal_note"]),
    "freeform": ([], {"phone"}, None),
}


class Env:
    """A tenant-keyed audit chain with a real signer and checkpointer, standing in for the store."""

    def __init__(self, tmp_path: Path) -> None:
        self.signer = Signer.load_or_create(tmp_path / "keys" / "audit.key")
        self.checkpointer = Checkpointer(self.signer, CheckpointLog(tmp_path / "checkpoints.jsonl"),
                                         every_n=1000, every_seconds=3600)
        self.chains: dict[str, list[AuditRow]] = {}
        self.clock = T0

    def append(self, tenant: str, fields: dict) -> AuditRow:
        chain = self.chains.setdefault(tenant, [])
        self.clock += 1
        prev = chain[-1].hash if chain else GENESIS
        row = seal_entry(tenant, len(chain) + 1, prev, self.clock, fields)
        chain.append(row)
        self.checkpointer.observe([row])
        return row

    def add_round(self, tenant: str, session: str, seq: int, messages: list[dict], policy_id: str) -> ExportRecord:
        messages = with_blocks([sealed(m) for m in messages])  # as a round record is sealed now
        ciphertext = orjson.dumps([tenant, session, seq, messages])  # stands in for the sealed round
        digest = hashlib.sha256(ciphertext).hexdigest()
        row = self.append(tenant, {"event": "round", "request_id": f"req-{session}-{seq}", "session_id": session,
                                   "policy_id": policy_id, "policy_hash": POLICY_HASH[policy_id],
                                   "outcome": "completed", "ciphertext_sha256": digest})
        return ExportRecord(tenant=tenant, session_id=session, seq=seq, created_at=row.created_at,
                            request_id=f"req-{session}-{seq}", policy_id=policy_id,
                            policy_hash=POLICY_HASH[policy_id], outcome="completed", messages=messages,
                            ciphertext_sha256=digest)

    def redactor_for(self, tenant: str):
        def build(record: ExportRecord) -> Redactor:
            rules, detectors, keys = POLICIES[record.policy_id]
            return Redactor(rules, tenant_secret(SECRET, tenant), detectors, keys=keys)
        return build

    def export(self, tenant: str, records: Iterable[ExportRecord], out: Path, fmt: str = "jsonl",
               **kw) -> dict:
        async def append_audit(fields: dict) -> AuditRow:
            return self.append(tenant, fields)

        async def sign_head() -> Checkpoint | None:
            return await self.checkpointer.checkpoint_tenant(tenant)

        async def iter_audit(after_seq: int) -> AsyncIterator[AuditRow]:
            for row in list(self.chains.get(tenant, [])):
                if row.seq > after_seq:
                    yield row

        return asyncio.run(export_bundle(agen(records), out, tenant=tenant, fmt=fmt,
                                         redactor_for=self.redactor_for(tenant), append_audit=append_audit,
                                         sign_head=sign_head, iter_audit=iter_audit, **kw))

    def public_key_file(self, tmp_path: Path) -> Path:
        path = tmp_path / "auditor" / "audit-public.pem"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.signer.public_key_pem())
        return path


def sealed(message: dict) -> dict:
    """*message* with its content as recording writes it: keyed content is a ``KeyedText``."""
    content = message["content"]
    blocks = parse_blocks(content) if isinstance(content, str) else None
    if blocks:
        keyed = format_keyed(blocks)
        assert keyed == content
        return {**message, "content": keyed}
    return message


async def agen(items: Iterable[ExportRecord]) -> AsyncIterator[ExportRecord]:
    for item in items:
        yield item


def corpus(env: Env, tenant: str = "acme") -> list[ExportRecord]:
    """Three rounds in two sessions, under a keyed and a free-text policy."""
    env.append(tenant, {"event": "policy_reload", "detail": {"policies": ["support", "freeform"]}})
    return [
        env.add_round(tenant, "alice", 1, [
            {"role": "user", "content": "[input.customer]:\nalice@example.com\n[input.question]:\n"
                                        "My card 4111 1111 1111 1111 was charged twice"},
            {"role": "assistant", "content": "[summary]:\nRefund issued to alice@example.com\n[internal_note]:\nVIP"},
        ], "support"),
        env.add_round(tenant, "alice", 2, [
            {"role": "user", "content": "[input.customer]:\nalice@example.com\n[input.question]:\nThanks"},
            {"role": "assistant", "content": "[internal_note]:\nclosed"},
        ], "support"),
        env.add_round(tenant, "bob", 1, [
            {"role": "user", "content": "Call me on +44 20 7946 0958"},
            {"role": "assistant", "content": "Will do."},
        ], "freeform"),
    ]


@pytest.fixture()
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def _err(report: VerifyReport) -> VerifyError:
    assert report.first_error is not None, "verification passed"
    return report.first_error


def _lines(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


# --------------------------------------------------------------------------- exact output


def test_jsonl_export_matches_the_expected_redaction(env: Env, tmp_path: Path) -> None:
    """The known corpus exports with exactly the policy's redactions and detector hits."""
    records = corpus(env)
    env.export("acme", records, tmp_path / "acme.jsonl")
    alice = pseudonym(tenant_secret(SECRET, "acme"), "alice@example.com")
    got = _lines(tmp_path / "acme.jsonl")
    assert [doc["messages"] for doc in got] == [
        [{"role": "user",
          "content": f"[input.customer]:\n{alice}\n[input.question]:\nMy card [CARD] was charged twice"},
         {"role": "assistant", "content": "[summary]:\nRefund issued to [EMAIL]"}],
        [{"role": "user", "content": f"[input.customer]:\n{alice}\n[input.question]:\nThanks"}],
        [{"role": "user", "content": "Call me on [PHONE]"}, {"role": "assistant", "content": "Will do."}],
    ]
    assert got[0] | {"messages": None} == {
        "tenant": "acme", "session_id": "alice", "seq": 1, "created_at": "2023-11-14T22:13:22.000000Z",
        "request_id": "req-alice-1", "policy_id": "support", "policy_hash": POLICY_HASH["support"],
        "outcome": "completed", "ciphertext_sha256": records[0].ciphertext_sha256, "messages": None}


def test_rounds_without_block_boundaries_are_exported_under_the_stricter_rule(env: Env) -> None:
    """A round recorded before block boundaries were kept gives each block the strictest rule of
    its key and the keys before it; an import (text checked to be in recorded form) keeps each
    key's own rule."""
    text = "[input.customer]:\nalice@example.com\n[input.question]:\nSECRET-after-a-header"
    legacy = dataclasses.replace(corpus(env)[0], messages=[{"role": "user", "content": text}])
    alice = pseudonym(tenant_secret(SECRET, "acme"), "alice@example.com")
    for record, question in ((legacy, pseudonym(tenant_secret(SECRET, "acme"), "SECRET-after-a-header")),
                             (dataclasses.replace(legacy, kind="import"), "SECRET-after-a-header")):
        buffer = io.BytesIO()
        asyncio.run(write_records(agen([record]), buffer, fmt="jsonl", redactor_for=env.redactor_for("acme")))
        (doc,) = [orjson.loads(line) for line in buffer.getvalue().splitlines()]
        assert doc["messages"] == [{"role": "user",
                                    "content": f"[input.customer]:\n{alice}\n[input.question]:\n{question}"}]


def test_no_recorded_value_leaks_into_the_export(env: Env, tmp_path: Path) -> None:
    """Redacted values appear nowhere in the bundle's files."""
    env.export("acme", corpus(env), tmp_path / "acme.jsonl")
    for path in bundle_paths(tmp_path / "acme.jsonl"):
        data = path.read_bytes()
        for secret in (b"alice@example.com", b"4111", b"VIP", b"7946", b"closed"):
            assert secret not in data, (path.name, secret)


def test_csv_export_has_one_row_per_message(env: Env) -> None:
    """CSV rows carry the record metadata and one message each; an emptied record keeps a row."""
    records = corpus(env)
    buffer = io.BytesIO()
    empty = dataclasses.replace(records[2], seq=2, messages=[])
    asyncio.run(write_records(agen([records[2], empty]), buffer, fmt="csv", redactor_for=env.redactor_for("acme")))
    rows = list(csv.reader(io.StringIO(buffer.getvalue().decode(), newline="")))
    assert rows[0][-3:] == ["message_index", "role", "content"]
    assert [r[2] for r in rows[1:]] == ["1", "1", "2"]
    assert [r[-3:] for r in rows[1:]] == [["0", "user", "Call me on [PHONE]"], ["1", "assistant", "Will do."],
                                          ["", "", ""]]


def test_agently_export_loads_into_agently(env: Env, tmp_path: Path) -> None:
    """Each line of an agently export is a session document Agently's Session loads."""
    from agently.core.session.Session import Session

    env.export("acme", corpus(env), tmp_path / "acme.agently", fmt="agently")
    lines = (tmp_path / "acme.agently").read_text().splitlines()
    assert len(lines) == 2
    doc = orjson.loads(lines[1])
    assert doc == {"id": "bob", "auto_resize": True,
                   "full_context": [{"role": "user", "content": "Call me on [PHONE]"},
                                    {"role": "assistant", "content": "Will do."}],
                   "context_window": [], "memo": None, "session_settings": {}}
    session = Session().load_json(lines[0])
    assert session.id == "alice"
    assert [m.role for m in session.full_context] == ["user", "assistant", "user"]


def test_pseudonyms_join_within_a_tenant_and_differ_across_tenants(env: Env, tmp_path: Path) -> None:
    """The same customer gets one pseudonym across acme's rounds and another one in globex."""
    env.export("acme", corpus(env, "acme"), tmp_path / "acme.jsonl")
    env.export("globex", corpus(env, "globex"), tmp_path / "globex.jsonl")

    def customers(path: Path) -> set[str]:
        return {m["content"].split("\n")[1] for doc in _lines(path) for m in doc["messages"]
                if m["content"].startswith("[input.customer]")}

    acme, globex = customers(tmp_path / "acme.jsonl"), customers(tmp_path / "globex.jsonl")
    assert len(acme) == 1 and len(globex) == 1
    assert acme != globex


def test_unknown_format_is_refused() -> None:
    """Only jsonl, csv and agently are formats."""
    with pytest.raises(ValueError, match="format"):
        RecordWriter(io.BytesIO(), "xml")


# --------------------------------------------------------------------------- bundles


def test_bundle_verifies_offline_with_only_the_public_key(env: Env, tmp_path: Path) -> None:
    """A fresh bundle verifies from its files and a public key file alone, in every format."""
    key_file = env.public_key_file(tmp_path)
    records = corpus(env)  # once: recorded again, its round numbers would be used twice in the chain
    for fmt in ("jsonl", "csv", "agently"):
        out = tmp_path / fmt / f"export.{fmt}"
        out.parent.mkdir()
        manifest = env.export("acme", records, out, fmt=fmt)
        report = verify_bundle(out, key_file)
        assert report.ok, report.summary()
        assert report.records == 3 and report.checkpoints == 1
        assert manifest["records"]["count"] == 3 and manifest["checkpoint"]["seq"] == report.last_seq
        assert verify_bundle(bundle_paths(out)[1], key_file.read_bytes()).ok


def test_manifest_describes_the_export(env: Env, tmp_path: Path) -> None:
    """The manifest names policies, rules applied, the audit range and the export's own entry."""
    manifest = env.export("acme", corpus(env), tmp_path / "a.jsonl", filters={"session_id": None})
    assert manifest["policies"] == [{"policy_id": "freeform", "policy_hash": POLICY_HASH["freeform"]},
                                    {"policy_id": "support", "policy_hash": POLICY_HASH["support"]}]
    assert manifest["redaction"]["support"]["rules"][1] == {"key": "internal_note", "action": "drop"}
    assert manifest["redaction"]["support"]["mask"] == MASK
    export_entry = env.chains["acme"][manifest["audit"]["export_seq"] - 1]
    assert orjson.loads(export_entry.body)["detail"]["records_sha256"] == manifest["records"]["sha256"]
    assert (manifest["audit"]["first_seq"], manifest["audit"]["last_seq"]) == (1, manifest["checkpoint"]["seq"])


def test_bundle_audit_range_starts_near_the_first_record(env: Env, tmp_path: Path) -> None:
    """With a ``since`` filter, entries long before it are left out; the signed head still covers
    the rest. (Without one the bundle starts at the tenant's first entry: it proves that no
    round of the tenant was left out, issue 10 §3.)"""
    env.append("acme", {"event": "key_rotation"})
    env.clock += 10 * 86400
    since = env.clock
    manifest = env.export("acme", corpus(env), tmp_path / "a.jsonl", filters={"since": since})
    assert manifest["audit"]["first_seq"] == 2
    assert verify_bundle(tmp_path / "a.jsonl", env.signer.public_key_pem()).ok
    whole = env.export("acme", corpus(env), tmp_path / "b.jsonl")
    assert whole["audit"]["first_seq"] == 1


def test_altered_records_are_caught(env: Env, tmp_path: Path) -> None:
    """Changing a record, even with the manifest's hash updated, fails verification."""
    out = tmp_path / "a.jsonl"
    env.export("acme", corpus(env), out)
    out.write_bytes(out.read_bytes().replace(b"Will do.", b"Won't do"))
    assert _err(verify_bundle(out, env.signer.public_key_pem())).kind == "records_altered"
    manifest_path = bundle_paths(out)[1]
    manifest = orjson.loads(manifest_path.read_bytes())
    manifest["records"]["sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()
    manifest_path.write_bytes(orjson.dumps(manifest))
    report = verify_bundle(out, env.signer.public_key_pem())
    assert _err(report).kind == "manifest_mismatch"
    assert "records_sha256" in _err(report).message


def test_altered_redaction_rules_are_caught(env: Env, tmp_path: Path) -> None:
    """Claiming other redaction rules in the manifest fails verification."""
    out = tmp_path / "a.jsonl"
    env.export("acme", corpus(env), out)
    manifest_path = bundle_paths(out)[1]
    manifest = orjson.loads(manifest_path.read_bytes())
    manifest["redaction"]["support"]["rules"] = []
    manifest_path.write_bytes(orjson.dumps(manifest))
    assert _err(verify_bundle(out, env.signer.public_key_pem())).kind == "manifest_mismatch"


def test_altered_audit_entries_are_caught(env: Env, tmp_path: Path) -> None:
    """Editing or dropping an audit line of the bundle is caught at that entry."""
    out = tmp_path / "a.jsonl"
    env.export("acme", corpus(env), out)
    audit_path = bundle_paths(out)[2]
    original = audit_path.read_bytes().splitlines(keepends=True)
    audit_path.write_bytes(b"".join([original[0], original[1].replace(b"completed", b"refused"), *original[2:]]))
    report = verify_bundle(out, env.signer.public_key_pem())
    assert (_err(report).seq, _err(report).kind) == (3, "bad_link")
    audit_path.write_bytes(b"".join(original[:2] + original[3:]))
    report = verify_bundle(out, env.signer.public_key_pem())
    assert (_err(report).seq, _err(report).kind) == (3, "gap")


def test_forged_checkpoint_in_a_bundle_is_caught(env: Env, tmp_path: Path) -> None:
    """A checkpoint signed by another key, or with a changed head, fails its signature."""
    out = tmp_path / "a.jsonl"
    env.export("acme", corpus(env), out)
    other = Signer.load_or_create(tmp_path / "other.key")
    assert _err(verify_bundle(out, other.public_key_pem())).kind == "bad_signature"
    manifest_path = bundle_paths(out)[1]
    manifest = orjson.loads(manifest_path.read_bytes())
    manifest["checkpoint"]["hash"] = "0" * 64
    manifest_path.write_bytes(orjson.dumps(manifest))
    assert _err(verify_bundle(out, env.signer.public_key_pem())).kind == "bad_signature"


def test_missing_bundle_file_is_reported(env: Env, tmp_path: Path) -> None:
    """A bundle without its audit file does not verify."""
    out = tmp_path / "a.jsonl"
    env.export("acme", corpus(env), out)
    bundle_paths(out)[2].unlink()
    assert _err(verify_bundle(out, env.signer.public_key_pem())).kind == "missing_file"


def test_record_without_a_round_entry_is_caught(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record whose ciphertext hash no round entry vouches for is reported (the bundle is
    forged: the export itself refuses such a record, as the next test shows)."""
    records = corpus(env)
    forged = dataclasses.replace(records[2], seq=2, ciphertext_sha256="ab" * 32)
    out = tmp_path / "a.jsonl"
    from gateway.export import RoundLabels

    monkeypatch.setattr(RoundLabels, "checked", lambda self, records: records)
    env.export("acme", [*records, forged], out)
    report = verify_bundle(out, env.signer.public_key_pem())
    assert _err(report).kind == "record_not_covered"
    assert "session bob, round 2" in _err(report).message


def test_export_refuses_a_round_no_entry_records(env: Env, tmp_path: Path) -> None:
    """A round whose ciphertext no round entry of its session records is refused, and no
    bundle is left behind."""
    records = corpus(env)
    forged = dataclasses.replace(records[2], seq=2, ciphertext_sha256="ab" * 32)
    with pytest.raises(IntegrityError) as caught:
        env.export("acme", [*records, forged], tmp_path / "a.jsonl")
    assert "tenant acme, session bob, round 2: no audit entry records this round" in caught.value.detail
    assert list(tmp_path.glob("a.jsonl*")) == [] and list(tmp_path.glob(".a.jsonl*")) == []


@pytest.mark.parametrize(("column", "value"), [("policy_id", "freeform"), ("policy_hash", "22" * 32),
                                               ("outcome", "upstream_error"), ("request_id", "forged")])
def test_export_refuses_a_relabelled_round_before_redacting_it(env: Env, tmp_path: Path, column: str,
                                                                 value: str) -> None:
    """A round whose row names another policy version (or request, or outcome) than its audit
    entry is refused before any redaction is chosen: relabelled to ``freeform``, alice's e-mail
    would be written in clear."""
    records = corpus(env)
    relabelled = dataclasses.replace(records[0], **{column: value})
    chosen: list[str] = []
    redactor_for = env.redactor_for("acme")

    def watching(record: ExportRecord) -> Redactor:
        chosen.append(record.policy_id)
        return redactor_for(record)

    env.redactor_for = lambda tenant: watching  # type: ignore[method-assign]
    out = tmp_path / "a.jsonl"
    with pytest.raises(IntegrityError) as caught:
        env.export("acme", [relabelled, *records[1:]], out)
    assert "tenant acme, session alice, round 1: the stored round is the one audit entry 2 records" \
        in caught.value.detail
    assert f"its {column} is {value!r}" in caught.value.detail
    assert chosen == [] and list(tmp_path.glob("a.jsonl*")) == [] and list(tmp_path.glob(".a.jsonl*")) == []


def test_export_finds_the_entry_of_a_round_recorded_while_it_runs(env: Env, tmp_path: Path) -> None:
    """A round committed after the export first read the chain is checked against its entry,
    read then, not refused as unrecorded."""
    records = corpus(env)

    async def late() -> AsyncIterator[ExportRecord]:
        for record in records:
            yield record
        yield env.add_round("acme", "bob", 2, [{"role": "user", "content": "late question"}], "freeform")

    out = tmp_path / "a.jsonl"
    manifest = asyncio.run(export_bundle(late(), out, tenant="acme", fmt="jsonl",
                                         redactor_for=env.redactor_for("acme"), append_audit=_appender(env),
                                         sign_head=_signer(env), iter_audit=_reader(env)))
    assert manifest["records"]["count"] == 4
    assert verify_bundle(out, env.signer.public_key_pem()).ok


def _appender(env: Env):
    async def append_audit(fields: dict) -> AuditRow:
        return env.append("acme", fields)
    return append_audit


def _signer(env: Env):
    async def sign_head() -> Checkpoint | None:
        return await env.checkpointer.checkpoint_tenant("acme")
    return sign_head


def _reader(env: Env):
    async def iter_audit(after_seq: int) -> AsyncIterator[AuditRow]:
        for row in list(env.chains.get("acme", [])):
            if row.seq > after_seq:
                yield row
    return iter_audit


def test_erased_session_leaves_exports_verifiable(env: Env, tmp_path: Path) -> None:
    """After a session is erased, the chain and a later export of the tenant still verify."""
    records = corpus(env)
    env.append("acme", {"event": "erasure", "session_id": "alice", "detail": {"rounds": 2}})
    remaining = [r for r in records if r.session_id != "alice"]
    out = tmp_path / "after-erasure.jsonl"
    env.export("acme", remaining, out)
    report = verify_bundle(out, env.signer.public_key_pem())
    assert report.ok and report.records == 1
    assert b"alice@example.com" not in bundle_paths(out)[2].read_bytes()


def test_broken_live_chain_refuses_to_export(env: Env, tmp_path: Path) -> None:
    """An export over a tampered chain raises and leaves no bundle files behind."""
    records = corpus(env)
    chain = env.chains["acme"]
    chain[1] = dataclasses.replace(chain[1], body=chain[1].body.replace(b"completed", b"refused"))
    with pytest.raises(IntegrityError):
        env.export("acme", records, tmp_path / "a.jsonl")
    assert list(tmp_path.glob("a.jsonl*")) == [] and list(tmp_path.glob(".a.jsonl*")) == []


# --------------------------------------------------------------------------- streaming


def test_export_streams_in_constant_memory(env: Env) -> None:
    """Writing many records keeps peak memory far below the output's size."""
    redactor = Redactor([{"key": "*", "action": "keep"}], tenant_secret(SECRET, "acme"), {"email"})
    n = 20_000

    async def many() -> AsyncIterator[ExportRecord]:
        for i in range(n):
            yield ExportRecord("acme", f"s-{i // 10}", i % 10, T0 + i, f"r{i}", "p", "h", "completed",
                               [{"role": "user", "content": f"question {i} from u{i}@example.com " + "x" * 200}],
                               "c" * 64)

    class Sink(io.BytesIO):
        size = 0

        def write(self, b) -> int:  # type: ignore[override]
            self.size += len(b)
            return len(b)

    sink = Sink()
    tracemalloc.start()
    try:
        summary = asyncio.run(write_records(many(), sink, fmt="jsonl", redactor_for=lambda _: redactor))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary.count == n and sink.size > 5_000_000
    assert peak < 1_000_000


def test_progress_is_drawn_only_on_a_terminal() -> None:
    """The counter goes to a terminal and stays silent otherwise."""

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        progress = Progress(stream)
        progress.tick(3)
        progress.done()
    assert "exported 3 records" in tty.getvalue()
    assert pipe.getvalue() == ""


# --------------------------------------------------------------------------- a live gateway


SECRET_TEXT = "mail bob@corp.com card 4111 1111 1111 1111"


def _relabel_to_unredacted(gateway) -> None:  # type: ignore[no-untyped-def]
    """Record a round in ``plain1`` (policy ``default``: e-mail hashed, card masked) and relabel
    its row to the ``multi-user-chat`` version (no redaction), as an operator with database
    access can."""
    import sqlite3

    gateway.openai(session="plain1").chat.completions.create(
        model="standin", messages=[{"role": "user", "content": SECRET_TEXT}])
    with sqlite3.connect(gateway.db_path) as db:
        (version,), = db.execute("SELECT hash FROM policy_versions WHERE policy_id='multi-user-chat'").fetchall()
        (recorded,), = db.execute("SELECT policy_id FROM rounds WHERE session_id='plain1' AND seq=1").fetchall()
        assert recorded == "default"
        db.execute("UPDATE rounds SET policy_id='multi-user-chat', policy_hash=? WHERE session_id='plain1' AND seq=1",
                   (version,))


def test_a_round_relabelled_to_a_weaker_policy_is_not_exported(gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``sessiongate export`` and ``/admin/export`` refuse a round whose row names another policy
    version than its audit entry, naming session, round and column, and write nothing in clear."""
    import httpx

    from gateway import cli
    from tests.conftest import AUDITOR_TOKEN

    _relabel_to_unredacted(gateway)
    out = tmp_path / "relabelled.jsonl"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["--config", str(gateway.config_path), "export", "--tenant", "acme", "--session", "plain1",
                         "--out", str(out)])
    assert code == 2, err.getvalue()
    assert "tenant acme, session plain1, round 1" in err.getvalue()
    assert "its policy_id is 'multi-user-chat' where the entry records 'default'" in err.getvalue()
    assert "Traceback" not in err.getvalue() and list(tmp_path.glob("relabelled*")) == []
    resp = httpx.get(f"{gateway.url}/admin/export", params={"tenant": "acme", "session": "plain1"},
                     headers={"Authorization": f"Bearer {AUDITOR_TOKEN}"}, timeout=30)
    assert resp.status_code == 500 and resp.json()["error"]["code"] == "integrity_check_failed"
    assert b"bob@corp.com" not in resp.content and b"4111" not in resp.content


def test_an_export_of_a_session_the_tenant_never_had_is_refused(gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A misspelt session id exported an empty bundle and appended an export entry: ``sessiongate
    export`` exits 2 naming it and ``/admin/export`` answers 404, both before any audit entry. An
    erased session's id still exports (0 records; its entries, the erasure's among them)."""
    import httpx

    from gateway import cli
    from tests.conftest import ACME_KEY, AUDITOR_TOKEN

    gateway.openai(session="acme:real").chat.completions.create(
        model="standin", messages=[{"role": "user", "content": "hello"}])
    before = len(gateway.audit_entries())
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["--config", str(gateway.config_path), "export", "--tenant", "acme", "--session", "acme:nope",
                         "--out", str(tmp_path / "nope.jsonl")])
    assert code == 2, err.getvalue()
    assert err.getvalue().startswith("sessiongate: error: no session 'acme:nope' of tenant 'acme'"), err.getvalue()
    assert list(tmp_path.glob("nope*")) == []
    resp = httpx.get(f"{gateway.url}/admin/export", params={"tenant": "acme", "session": "acme:nope"},
                     headers={"Authorization": f"Bearer {AUDITOR_TOKEN}"}, timeout=30)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found", resp.text
    assert "'acme:nope'" in resp.json()["error"]["message"]
    assert len(gateway.audit_entries()) == before
    erased = httpx.delete(f"{gateway.base_url}/sessions/acme:real", headers={"Authorization": f"Bearer {ACME_KEY}"})
    assert erased.status_code in (200, 202)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["--config", str(gateway.config_path), "export", "--tenant", "acme", "--session", "acme:real",
                         "--out", str(tmp_path / "erased.jsonl")])
    assert code == 0 and out.getvalue().startswith("exported 0 records (0 sessions)")
    audit = [orjson.loads(line) for line in (tmp_path / "erased.jsonl.audit.jsonl").read_text().splitlines()]
    assert any(e["event"] == "erasure" and e.get("session_id") == "acme:real" for e in audit)


def test_the_gateway_serves_requests_while_a_big_export_is_redacted(gateway, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An export's redaction runs off the event loop: while ``/admin/export`` is redacting a round
    of 12,000 e-mail addresses, ``/healthz`` and another tenant's chat complete (the redaction
    waits for them; on the event loop it held every request until it finished)."""
    import threading

    import httpx

    from tests.conftest import AUDITOR_TOKEN, GLOBEX_KEY

    gateway.openai(session="pii-dos").chat.completions.create(
        model="standin", messages=[{"role": "user", "content": "a@b.co " * 12000}])
    redacting, served = threading.Event(), threading.Event()
    waited: list[bool] = []
    original = Redactor.redact_messages

    def redact_messages(self, messages, *, legacy=False):  # type: ignore[no-untyped-def]
        if not redacting.is_set():
            redacting.set()
            waited.append(served.wait(15))  # the export is still running until the requests are answered
        return original(self, messages, legacy=legacy)

    monkeypatch.setattr(Redactor, "redact_messages", redact_messages)
    export: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: export.append(httpx.get(
        f"{gateway.url}/admin/export", params={"tenant": "acme", "session": "pii-dos"},
        headers={"Authorization": f"Bearer {AUDITOR_TOKEN}"}, timeout=60)))
    worker.start()
    try:
        assert redacting.wait(30)
        assert httpx.get(f"{gateway.url}/healthz", timeout=30).status_code == 200
        reply = gateway.openai(key=GLOBEX_KEY, session="globex:small").chat.completions.create(
            model="standin", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
        assert not export  # answered while the export was still redacting
        served.set()
    finally:
        served.set()
        worker.join(60)
    assert waited == [True]
    assert export[0].status_code == 200
    with tarfile.open(fileobj=io.BytesIO(export[0].content)) as tar:
        records = tar.extractfile("acme-export.jsonl")
        assert records is not None and b"a@b.co" not in records.read()
