"""A real ``sessiongate serve`` in a child process, for tests about the listener itself (timeouts,
the connection cap, aiohttp's own errors, shutdown): the same start-up path as production,
with stderr (where the gateway logs) captured to a file the test can read."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import REPO, write_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServedGateway:
    proc: subprocess.Popen[bytes]
    port: int
    dir: Path
    stderr_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def connect(self, timeout: float = 10.0) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return sock

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> float:
        """*sig* (SIGTERM); the seconds the process took to exit."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return time.monotonic() - started

    def written(self) -> bytes:
        """Every byte the gateway wrote: database files, logs, checkpoints."""
        return b"".join(p.read_bytes() for p in self.dir.rglob("*") if p.is_file() and p.name != "sessiongate.yaml"
                        and not p.is_relative_to(self.dir / "policies"))


@contextmanager
def served_gateway(directory: Path, upstream_url: str | None = None, *, server: dict[str, Any] | None = None,
                   policies: Path | None = None, **overrides: Any) -> Iterator[ServedGateway]:
    """Start ``sessiongate serve`` with *server* settings merged over the defaults; stop it at exit."""
    directory.mkdir(parents=True, exist_ok=True)
    if policies is None:
        policies = directory / "policies"
        if not policies.exists():
            shutil.copytree(REPO / "policies", policies)
    port = free_port()
    base = yaml.safe_load((REPO / "config/sessiongate.yaml").read_text())["server"]
    config = write_config(directory, upstream_url, policies,
                          server={**base, **(server or {}), "port": port},
                          logging={"level": "debug", "format": "json"}, **overrides)
    stderr_path = directory / "stderr.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(config), "serve"],
                                cwd=directory, stdout=subprocess.DEVNULL, stderr=err, env=env)
    gw = ServedGateway(proc, port, directory, stderr_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited at start-up: {gw.stderr()[-2000:]}")
            try:
                if httpx.get(f"{gw.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not start: {gw.stderr()[-2000:]}")
            time.sleep(0.1)
        yield gw
    finally:
        gw.stop()
