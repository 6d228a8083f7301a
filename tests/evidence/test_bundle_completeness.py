"""Export bundles prove completeness, not only membership (issue 10 §3).

A bundle must hold a record for every round entry in its scope and range (unless an erasure or
purge entry accounts for it), so an exporter that leaves a record out produces a bundle that
fails offline verification. Imported rounds (audit event ``import``) are records like any other.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.export import verify_bundle
from gateway.sessions import SessionService
from tests.conftest import ACME_KEY, Gateway
from tests.evidence.conftest import run_cli
from tests.evidence.test_tamper_data import record

HEADERS = {"Authorization": f"Bearer {ACME_KEY}"}


def public_key(gw: Gateway, tmp_path: Path) -> Path:
    code, out, err = run_cli("--config", str(gw.config_path), "audit", "public-key")
    assert code == 0, err
    path = tmp_path / "audit-public.pem"
    path.write_text(out)
    return path


def export(gw: Gateway, out: Path, *extra: str) -> None:
    code, _, err = run_cli("--config", str(gw.config_path), "export", "--tenant", "acme", "--out", str(out), *extra)
    assert code == 0, err


def import_session(gw: Gateway, sid: str) -> None:
    doc = {"id": sid, "full_context": [{"role": "user", "content": "imported question"},
                                       {"role": "assistant", "content": "imported answer"}]}
    resp = httpx.put(f"{gw.base_url}/sessions/{sid}", headers=HEADERS, json=doc)
    assert resp.status_code == 200, resp.text


def test_bundle_with_a_record_left_out_fails_offline(gateway: Gateway, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An exporter that skips one stored round writes a bundle whose own files agree, yet the
    offline check finds the round entry without its record and names session and round."""
    record(gateway, "alice", 3)
    record(gateway, "bob", 1)
    key = public_key(gateway, tmp_path)
    honest = tmp_path / "honest.jsonl"
    export(gateway, honest)
    assert verify_bundle(honest, key).ok

    original = SessionService.decrypted_rounds

    async def leave_one_out(self: SessionService, *args: Any, **kw: Any) -> AsyncIterator[Any]:
        async for row, messages in original(self, *args, **kw):
            if (row.session_id, row.seq) != ("alice", 2):
                yield row, messages

    monkeypatch.setattr(SessionService, "decrypted_rounds", leave_one_out)
    partial = tmp_path / "partial.jsonl"
    export(gateway, partial)
    report = verify_bundle(partial, key)
    assert not report.ok
    assert report.first_error is not None and report.first_error.kind == "record_missing"
    assert "session alice, round 2" in report.first_error.message
    code, out, _ = run_cli("audit", "verify", "--bundle", str(partial), "--public-key", str(key))
    assert code == 1 and "record_missing" in out


def test_export_of_an_imported_session_verifies(gateway: Gateway, tmp_path: Path) -> None:
    """Imported rounds are covered records: a tenant export and a session export both verify."""
    import_session(gateway, "handed-over")
    record(gateway, "handed-over", 1)
    record(gateway, "native", 1)
    key = public_key(gateway, tmp_path)
    for name, extra in (("tenant.jsonl", ()), ("session.jsonl", ("--session", "handed-over")),
                        ("tenant.csv", ("--format", "csv"))):
        out = tmp_path / name
        export(gateway, out, *extra)
        report = verify_bundle(out, key)
        assert report.ok, report.summary()
    session_records = (tmp_path / "session.jsonl").read_text().splitlines()
    assert len(session_records) == 2 and '"outcome":"imported"' in session_records[0]


def test_erased_and_purged_rounds_are_accounted_for(gateway: Gateway, tmp_path: Path) -> None:
    """Rounds an erasure removed before the export are not expected in the bundle."""
    record(gateway, "gone", 2)
    record(gateway, "kept", 1)
    assert httpx.delete(f"{gateway.base_url}/sessions/gone", headers=HEADERS).status_code in (200, 204)
    out = tmp_path / "after.jsonl"
    export(gateway, out)
    report = verify_bundle(out, public_key(gateway, tmp_path))
    assert report.ok and report.records == 1, report.summary()


def test_session_export_does_not_require_other_sessions(gateway: Gateway, tmp_path: Path) -> None:
    """A bundle scoped to one session proves that session complete and nothing more."""
    record(gateway, "alice", 2)
    record(gateway, "bob", 2)
    out = tmp_path / "alice.jsonl"
    export(gateway, out, "--session", "alice")
    report = verify_bundle(out, public_key(gateway, tmp_path))
    assert report.ok and report.records == 2, report.summary()


def test_export_of_an_altered_session_is_refused(gateway: Gateway, tmp_path: Path) -> None:
    """The exporter checks each session against the chain: a deleted round stops the export."""
    from tests.evidence.conftest import Tables

    record(gateway, "alice", 2)
    Tables("sqlite", gateway).sql("DELETE FROM rounds WHERE tenant='acme' AND session_id='alice' AND seq=1")
    out = tmp_path / "refused.jsonl"
    code, _, err = run_cli("--config", str(gateway.config_path), "export", "--tenant", "acme", "--out", str(out))
    assert code == 2 and "integrity check" in err
    assert not out.exists()
