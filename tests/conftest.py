"""Shared fixtures: a stand-in upstream and a real gateway, each on its own loopback port.

``upstream``      the built-in stand-in model in a background thread; ``upstream.requests``
                  holds every chat body the gateway forwarded, ``upstream.reply`` may be set to
                  a function ``body -> str | dict`` to script replies.
``make_gateway``  starts a gateway (real config file, real SQLite file under ``tmp_path``, real
                  keyring file, policies copied from ``policies/`` or given) on 127.0.0.1:0 in a
                  background thread; stopped at teardown. ``gateway`` is one with defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from gateway import logs
from gateway.app import build_app
from gateway.settings import load_settings
from gateway.standin import standin_thread

REPO = Path(__file__).resolve().parent.parent
ACME_KEY = "sg-demo-acme"
GLOBEX_KEY = "sg-demo-globex"
AUDITOR_TOKEN = "sg-demo-auditor"


def wait_for(probe: Callable[[], Any], seconds: float = 10.0) -> Any:
    """Poll *probe* until it returns something truthy (background work); fail after *seconds*."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"condition not met within {seconds} s")


@dataclass
class Upstream:
    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    reply: Callable[[dict[str, Any]], Any] | None = None

    def _reply(self, body: dict[str, Any]) -> Any:
        if self.reply is not None:
            return self.reply(body)
        from gateway.standin import default_reply
        return default_reply(body)

    def calls_then_says(self, call: dict[str, Any], text: str) -> None:
        """Answer a user's message with *call* (a Chat tool call) and a tool result with *text*."""
        self.reply = lambda body: ({"role": "assistant", "content": None, "tool_calls": [call]}
                                   if body["messages"][-1]["role"] == "user" else text)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    up = Upstream()
    with standin_thread(reply=up._reply, on_request=up.requests.append) as url:
        up.url = url
        yield up


@dataclass
class Gateway:
    url: str
    dir: Path
    config_path: Path
    db_path: Path
    log_path: Path
    app: web.Application

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def openai(self, key: str = ACME_KEY, session: str | None = None, **kw: Any) -> Any:
        import openai
        headers = {"X-Session-Id": session} if session else None
        return openai.OpenAI(base_url=self.base_url, api_key=key, default_headers=headers, max_retries=0, **kw)

    def async_openai(self, key: str = ACME_KEY, session: str | None = None, **kw: Any) -> Any:
        import openai
        headers = {"X-Session-Id": session} if session else None
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=key, default_headers=headers, max_retries=0, **kw)

    def stored_bytes(self) -> bytes:
        """Every byte of the database files (main file, WAL, shared memory)."""
        return b"".join(p.read_bytes() for p in self.dir.glob("gateway.db*"))

    def audit_entries(self, tenant: str = "acme") -> list[dict[str, Any]]:
        """*tenant*'s audit entries, oldest first, as ``gateway.audit.entry_fields`` reads them."""
        from gateway.audit import entry_fields
        from gateway.store.sqlite import SQLiteStore

        async def read() -> list[dict[str, Any]]:
            store = SQLiteStore(self.db_path)
            await store.open()
            try:
                return [entry_fields(a) async for a in store.iter_audit(tenant)]
            finally:
                await store.close()

        return asyncio.run(read())


def write_config(directory: Path, upstream_url: str | None, policies: Path, *, hook_modules: list[str] | None = None,
                 **overrides: Any) -> Path:
    config: dict[str, Any] = yaml.safe_load((REPO / "config/sessiongate.yaml").read_text())
    config["upstreams"] = [{"name": "standin", "base_url": upstream_url, "models": ["*"]}] if upstream_url else []
    config["store"] = {"backend": "sqlite", "path": str(directory / "gateway.db")}
    config["keys"] = {"master_key_file": str(directory / "master-keys.json")}
    config["policies"] = {"path": str(policies), "reload_interval": 0.2}
    if hook_modules is not None:
        config["policies"]["hook_modules"] = hook_modules
    config["audit"] = {"signing_key_file": str(directory / "audit-signing.key"),
                       "checkpoint_file": str(directory / "checkpoints.jsonl"), "checkpoint_every": 5}
    for key, value in overrides.items():
        config[key] = value
    path = directory / "sessiongate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class _Server:
    """An aiohttp app on its own loop in a background thread."""

    def __init__(self, app: web.Application) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)

        async def start() -> int:
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            return int(self.runner.addresses[0][1])

        self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.runner.cleanup())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@contextlib.contextmanager
def chat_provider(handler: Callable[[web.Request], Any]) -> Iterator[str]:
    """A provider answering ``POST /v1/chat/completions`` with *handler* on a loopback port for
    the block: yields its base URL (``http://127.0.0.1:PORT/v1``)."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    with serving(app) as url:
        yield f"{url}/v1"


@contextlib.contextmanager
def serving(app: web.Application) -> Iterator[str]:
    """*app* on a loopback port for the block: yields its ``http://127.0.0.1:PORT`` and stops it after."""
    server = _Server(app)
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


@pytest.fixture
def make_gateway(tmp_path: Path, upstream: Upstream) -> Iterator[Callable[..., Gateway]]:
    servers: list[_Server] = []

    def make(policies: Path | None = None, *, name: str = "gw", use_upstream: bool = True,
             hook_modules: list[str] | None = None, **overrides: Any) -> Gateway:
        directory = tmp_path / name
        directory.mkdir(exist_ok=True)
        if policies is None:
            policies = directory / "policies"
            if not policies.exists():
                shutil.copytree(REPO / "policies", policies)
        config_path = write_config(directory, upstream.url if use_upstream else None, policies,
                                   hook_modules=hook_modules, **overrides)
        settings = load_settings(config_path)
        log_path = directory / "gateway.log"
        logs.configure("debug", "json", stream=log_path.open("a", buffering=1))
        app = build_app(settings)
        server = _Server(app)
        servers.append(server)
        return Gateway(f"http://127.0.0.1:{server.port}", directory, config_path, directory / "gateway.db",
                       log_path, app)

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def gateway(make_gateway: Callable[..., Gateway]) -> Gateway:
    return make_gateway()
