"""SIGTERM stops a gateway whose console is rendering a page: the render's thread cannot be
interrupted, so shutdown abandons it instead of waiting for it (``gateway.console.pool``)."""

from __future__ import annotations

import signal
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ACME_KEY, Upstream
from tests.console.conftest import login_csrf
from tests.hostile import subprocess_gateway

PORT = 26611
SHUTDOWN_TIMEOUT = 1.0

_SLOW = textwrap.dedent('''
    import threading, time
    from pathlib import Path
    import gateway.redact as redact

    original = redact.Redactor.redact_messages

    def redact_messages(self, messages, *, legacy=False):
        if any("SLOW-RENDER" in str(m.get("content")) for m in messages):
            Path("rendering").write_text(threading.current_thread().name)
            time.sleep(120)  # a render far longer than the shutdown grace
        return original(self, messages, legacy=legacy)

    redact.Redactor.redact_messages = redact_messages
''')


def test_sigterm_during_a_console_render_exits_within_the_grace(tmp_path: Path, upstream: Upstream,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A gateway given SIGTERM while a session page renders for two minutes exits by itself within
    twice ``server.shutdown_timeout`` and a few seconds (it waited for the render thread: kill -9)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SLOW)  # the child makes this session's render slow
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.setattr(subprocess_gateway, "free_port", lambda: PORT)
    with subprocess_gateway.served_gateway(tmp_path / "gw", upstream.url,
                                           server={"shutdown_timeout": SHUTDOWN_TIMEOUT}) as gw:
        chat = httpx.post(f"{gw.url}/v1/chat/completions", headers={"Authorization": f"Bearer {ACME_KEY}",
                                                                     "x-session-id": "slow"},
                          json={"model": "standin", "messages": [{"role": "user", "content": "SLOW-RENDER"}]},
                          timeout=30)
        assert chat.status_code == 200, chat.text
        browser = httpx.Client(base_url=gw.url, timeout=180)
        form = browser.get("/console/login")
        signed = browser.post("/console/login", data={"token": "sg-demo-auditor", "csrf": login_csrf(form.text)},
                              headers={"Origin": gw.url})
        assert signed.status_code == 303, signed.text
        page: list[object] = []

        def read() -> None:
            try:
                page.append(browser.get("/console/sessions/acme/slow").status_code)
            except httpx.HTTPError as exc:
                page.append(type(exc).__name__)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        marker = gw.dir / "rendering"
        for _ in range(300):
            if marker.exists():
                break
            time.sleep(0.1)
        assert marker.exists(), "the page never started rendering"
        assert marker.read_text().startswith("sessiongate-console")
        gw.stop(timeout=2 * SHUTDOWN_TIMEOUT + 8, sig=signal.SIGTERM)
        assert gw.proc.returncode == 0, (gw.proc.returncode, gw.stderr()[-2000:])
        reader.join(10)
        assert page and page != [200]  # the page was abandoned, not finished
