"""``audit verify`` cannot pass by accident (issue 10 §4).

A ``--checkpoints`` path that does not exist is an error (exit 2, naming the path), not a pass
with 0 checkpoints; an empty file is a warning that nothing was checked against checkpoints; a
``--tenant`` with nothing in the store and no checkpoint is an error, not an empty pass.
``audit verify --bundle X --public-key K`` runs from any directory with no configuration file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, Gateway, wait_for
from tests.evidence.conftest import run_cli, verify
from tests.evidence.test_bundle_completeness import export, public_key
from tests.evidence.test_tamper_data import record


def test_missing_checkpoint_file_is_an_error(gateway: Gateway, tmp_path: Path) -> None:
    """A typo in --checkpoints exits 2 and names the path instead of passing with 0 checkpoints."""
    record(gateway, "alice", 1)
    missing = tmp_path / "checkpionts.jsonl"
    code, out = verify(gateway, "--checkpoints", str(missing))
    assert code == 2, out
    assert str(missing) in out and "not found" in out
    assert "OK" not in out


def test_a_mistyped_tenant_is_an_error_not_an_ok(gateway: Gateway) -> None:
    """``--tenant acmee`` has nothing to verify: exit 2 naming the tenants there are, where it
    used to print "OK tenant acmee: 0 no entries"."""
    record(gateway, "alice", 2)
    code, out = verify(gateway, "--tenant", "acmee")
    assert code == 2, out
    assert "no tenant 'acmee'" in out and "tenants: acme" in out and "OK" not in out
    code, out = verify(gateway, "--tenant", "acme")
    assert code == 0 and "OK   tenant acme: 2 entries 1..2, " in out, out


def test_empty_checkpoint_file_warns(gateway: Gateway, tmp_path: Path) -> None:
    """An empty checkpoint file verifies the chain but says nothing was checked against checkpoints."""
    record(gateway, "alice", 1)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, out = verify(gateway, "--checkpoints", str(empty))
    assert code == 0, out
    assert "warning" in out and "nothing was checked against checkpoints" in out and str(empty) in out


def test_real_checkpoint_file_checks_without_warning(gateway: Gateway, tmp_path: Path) -> None:
    """With the gateway's own checkpoint file the signed heads are checked and no warning is given."""
    record(gateway, "alice", 6)  # checkpoint_every is 5 in the test configuration
    checkpoints = gateway.dir / "checkpoints.jsonl"
    wait_for(lambda: checkpoints.exists() and checkpoints.read_text().strip())
    code, out = verify(gateway, "--checkpoints", str(checkpoints))
    assert code == 0, out
    assert "warning" not in out
    assert "tenant acme" in out and " 0 checkpoint(s)" not in out.split("tenant acme", 1)[1].splitlines()[0]


def test_bundle_verifies_from_an_empty_directory(gateway: Gateway, tmp_path: Path) -> None:
    """``python -m gateway audit verify --bundle X --public-key K`` in an empty directory, with no
    configuration file anywhere near: exit 0 for a good bundle, 1 for an altered one."""
    record(gateway, "alice", 2)
    out = tmp_path / "bundle" / "acme.jsonl"
    out.parent.mkdir()
    export(gateway, out)
    key = public_key(gateway, tmp_path)
    empty = tmp_path / "empty-cwd"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONGATE")}
    env["PYTHONPATH"] = str(REPO)

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway", "audit", "verify", "--bundle", str(out),
                               "--public-key", str(key)], cwd=empty, env=env, capture_output=True, text=True,
                              timeout=60)

    good = run()
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("OK") and "tenant acme" in good.stdout
    assert list(empty.iterdir()) == []  # nothing created in the working directory
    out.write_text(out.read_text().replace("turn 1", "turn X"))
    bad = run()
    assert bad.returncode == 1 and "records_altered" in bad.stdout


def test_cli_bundle_without_public_key_is_unusable_input(tmp_path: Path) -> None:
    """--bundle without --public-key exits 2 and says what is missing, with no configuration."""
    code, _, err = run_cli("audit", "verify", "--bundle", str(tmp_path / "x.jsonl"))
    assert code == 2 and "--public-key" in err
