"""``sessiongate backup`` copies what a restore needs while the gateway runs; restored into a
fresh folder, a new gateway reads every session as before and the audit chain verifies against
the copied checkpoints."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from gateway.errors import ConfigError
from tests.conftest import ACME_KEY, REPO, Gateway

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}
RESTORED = {"sessiongate.db": "gateway.db", "master-keys.json": "master-keys.json",
            "audit-signing.key": "audit-signing.key", "checkpoints.jsonl": "checkpoints.jsonl",
            "export-secret": "export-secret"}


def exported_lines(gateway: Gateway, session: str) -> str:
    """The records of one session in an auditor's export (redacted, e-mails as pseudonyms)."""
    out = gateway.config_path.parent / f"export-{session}.jsonl"
    made = cli(gateway.config_path, "export", "--tenant", "acme", "--session", session, "--out", str(out))
    assert made.returncode == 0, made.stderr
    import json
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return json.dumps([r.get("messages") or r.get("content") or r for r in records], sort_keys=True)


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "--config", str(config), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_backup_then_restore_into_a_fresh_folder(make_gateway: Callable[..., Gateway], tmp_path: Path) -> None:
    """Sessions, their content and the chain survive a backup taken under a running gateway."""
    live = make_gateway(name="live")
    sessions = [f"restore-{i}" for i in range(3)]
    for sid in sessions:
        client = live.openai(session=sid)
        for turn in range(3):
            client.chat.completions.create(model="standin", messages=[{"role": "user", "content": f"{sid} {turn}"}])
    before = {sid: httpx.get(f"{live.base_url}/sessions/{sid}", headers=AUTH).json() for sid in sessions}
    live.openai(session="pseudonyms").chat.completions.create(
        model="standin", messages=[{"role": "user", "content": "mail me at ada@example.test"}])
    pseudonyms = exported_lines(live, "pseudonyms")
    assert "ada@example.test" not in pseudonyms

    backup = tmp_path / "backup"
    made = cli(live.config_path, "backup", "--out", str(backup))
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in backup.iterdir()) == sorted(RESTORED)
    assert all(p.stat().st_mode & 0o077 == 0 for p in backup.iterdir())

    again = cli(live.config_path, "backup", "--out", str(backup))
    assert again.returncode == 2 and "not empty" in again.stderr

    fresh = tmp_path / "restored"
    fresh.mkdir()
    for name, target in RESTORED.items():
        shutil.copy2(backup / name, fresh / target)  # keeps mode 0600, as `cp -p` does
    restored = make_gateway(name="restored")
    for sid in sessions:
        resp = httpx.get(f"{restored.base_url}/sessions/{sid}", headers=AUTH)
        assert resp.status_code == 200 and resp.json() == before[sid]
    # an export after the restore gives the same pseudonyms (the export secret came back too)
    assert exported_lines(restored, "pseudonyms") == pseudonyms
    verified = cli(restored.config_path, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "acme" in verified.stdout and "checkpoint" in verified.stdout.lower()
    # the restored gateway goes on where the live one stopped
    restored.openai(session=sessions[0]).chat.completions.create(
        model="standin", messages=[{"role": "user", "content": "after restore"}])
    assert len(httpx.get(f"{restored.base_url}/sessions/{sessions[0]}", headers=AUTH).json()["full_context"]) == 8


def test_a_backup_before_any_export_holds_the_export_secret(make_gateway: Callable[..., Gateway],
                                                             tmp_path: Path) -> None:
    """The export secret is made at the first export; a backup taken before any export used to
    say it had backed it up while it held none, and the secret made later was in no backup: after
    a restore, exports gave other pseudonyms. The backup now makes it, so both sides share it."""
    live = make_gateway(name="live")
    live.openai(session="pseudonyms").chat.completions.create(
        model="standin", messages=[{"role": "user", "content": "mail me at ada@example.test"}])
    assert not (live.dir / "export-secret").exists()
    backup = tmp_path / "backup"
    made = cli(live.config_path, "backup", "--out", str(backup))
    assert made.returncode == 0 and "export-secret" in made.stdout, made.stdout + made.stderr
    assert {"export-secret", "sessiongate.db", "master-keys.json"} <= {p.name for p in backup.iterdir()}
    pseudonyms = exported_lines(live, "pseudonyms")  # the first export, after the backup
    fresh = tmp_path / "restored"
    fresh.mkdir()
    for name, target in RESTORED.items():
        if (backup / name).exists():  # no checkpoint signed yet: no checkpoint file
            shutil.copy2(backup / name, fresh / target)
    restored = make_gateway(name="restored")
    assert exported_lines(restored, "pseudonyms") == pseudonyms


def test_a_refused_backup_makes_no_export_secret_and_an_empty_one_is_refused(make_gateway: Callable[..., Gateway],
                                                                             tmp_path: Path) -> None:
    """A backup refused for its folder makes nothing (the secret is made only once the backup goes
    ahead); a secret file a crash left empty is refused, naming the file, instead of giving every
    export pseudonyms under an empty key."""
    live = make_gateway(name="live")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("not empty")
    refused = cli(live.config_path, "backup", "--out", str(tmp_path / "full"))
    assert refused.returncode == 2 and not (live.dir / "export-secret").exists()
    live.openai(session="s").chat.completions.create(model="standin", messages=[{"role": "user", "content": "hi"}])
    (live.dir / "export-secret").write_text("")
    out = live.config_path.parent / "e.jsonl"
    made = cli(live.config_path, "export", "--tenant", "acme", "--out", str(out))
    assert made.returncode != 0 and "Traceback" not in made.stderr, made.stderr
    assert "export-secret" in made.stderr and "restore it from your backup" in made.stderr, made.stderr


def test_an_export_secret_that_cannot_be_made_or_read_is_one_line_saying_what_to_do(
        make_gateway: Callable[..., Gateway], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An auditor exporting from a folder they cannot write (the secret not made yet), or whose
    ``export-secret`` cannot be read (here a folder stands in its place), gets one line naming the
    file and both fixes, exit 2: never an OSError traceback."""
    live = make_gateway(name="live")
    live.openai(session="s").chat.completions.create(model="standin", messages=[{"role": "user", "content": "hi"}])
    (live.dir / "export-secret").mkdir()
    made = cli(live.config_path, "export", "--tenant", "acme", "--out", str(tmp_path / "e.jsonl"))
    assert made.returncode == 2 and "Traceback" not in made.stderr, made.stderr
    assert f"{live.dir / 'export-secret'}: cannot read the export secret: " in made.stderr, made.stderr
    assert "audit.export_secret_env" in made.stderr, made.stderr

    from gateway.auditor import export_secret
    from gateway.settings import load_settings

    settings = load_settings(live.config_path)
    (live.dir / "export-secret").rmdir()

    def read_only(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(args[0]))

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(ConfigError) as caught:
        export_secret(settings)
    said = str(caught.value)
    assert said.startswith(f"{live.dir / 'export-secret'}: cannot create the export secret: Read-only file system")
    assert f"let this user write to {live.dir}" in said and "audit.export_secret_env" in said, said
