"""/admin/export never builds a file name from an unchecked tenant, refuses unknown tenants without
creating a chain, and every export file it or the CLI writes is readable by its owner only."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from gateway import handlers
from tests.conftest import ACME_KEY, AUDITOR_TOKEN

AUDITOR = {"Authorization": f"Bearer {AUDITOR_TOKEN}"}


def _audit_tenants(db: Path) -> dict[str, list[str]]:
    import orjson
    out: dict[str, list[str]] = {}
    for tenant, body in sqlite3.connect(db).execute("SELECT tenant, body FROM audit ORDER BY tenant, seq"):
        out.setdefault(tenant, []).append(orjson.loads(body)["event"])
    return out


def _chat(gw) -> None:
    gw.openai(key=ACME_KEY, session="acme:x").chat.completions.create(
        model="standin", messages=[{"role": "user", "content": "hello"}])


@pytest.mark.parametrize("tenant", ["../../escaped", "..%2F..%2Fescaped", "acme/../../escaped", "acme\x01",
                                    "acme\n", "a" * 65, "acme\x00", "ac me", "é"])
def test_a_tenant_the_configuration_would_refuse_gets_400(gateway, tenant: str) -> None:
    """Path-like, control-character and over-long tenants get 400 in OpenAI's shape and nothing is
    written or audited."""
    _chat(gateway)
    before = _audit_tenants(gateway.db_path)
    escaped = Path(tempfile.gettempdir()).parent / "escaped-export.jsonl"
    r = httpx.get(f"{gateway.url}/admin/export", params={"tenant": tenant}, headers=AUDITOR, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert _audit_tenants(gateway.db_path) == before  # no export entry, no new chain
    assert not escaped.exists() and not list(Path(tempfile.gettempdir()).parent.glob("escaped*"))


def test_an_unknown_tenant_gets_404_and_no_chain(gateway) -> None:
    """A well-formed tenant with no chain and no sessions gets 404; no audit chain is created for it."""
    _chat(gateway)
    r = httpx.get(f"{gateway.url}/admin/export", params={"tenant": "nobody"}, headers=AUDITOR, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert "nobody" not in _audit_tenants(gateway.db_path)
    ok = httpx.get(f"{gateway.url}/admin/export", params={"tenant": "acme"}, headers=AUDITOR, timeout=30)
    assert ok.status_code == 200


def test_http_bundle_files_are_owner_only(gateway, monkeypatch) -> None:
    """The records, manifest and audit files behind an HTTP export are created 0600."""
    _chat(gateway)
    modes: dict[str, int] = {}
    real = handlers.bundle_paths

    def spy(out: Path) -> tuple[Path, Path, Path]:
        paths = real(out)
        modes.update({p.name: stat.S_IMODE(os.stat(p).st_mode) for p in paths})
        return paths

    monkeypatch.setattr(handlers, "bundle_paths", spy)
    old = os.umask(0o022)
    try:
        r = httpx.get(f"{gateway.url}/admin/export", params={"tenant": "acme"}, headers=AUDITOR, timeout=30)
    finally:
        os.umask(old)
    assert r.status_code == 200
    assert len(modes) == 3 and set(modes.values()) == {0o600}, modes


def test_cli_export_files_are_owner_only(gateway, tmp_path: Path) -> None:
    """``sessiongate export --out`` writes records, manifest and audit files with mode 0600."""
    _chat(gateway)
    out = tmp_path / "bundle.jsonl"
    run = subprocess.run([sys.executable, "-m", "gateway", "--config", str(gateway.config_path), "export",
                          "--tenant", "acme", "--out", str(out)], capture_output=True, text=True, timeout=120,
                         preexec_fn=lambda: os.umask(0o022))
    assert run.returncode == 0, run.stderr
    files = sorted(tmp_path.glob("bundle.jsonl*"))
    assert len(files) == 3
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o600 for f in files}
