"""Fixtures for the protocol tests: a recording upstream speaking Responses and Messages
(``tests.protocols.upstream``) and a gateway with one ``openai`` and one ``anthropic`` upstream
pointing at it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ACME_KEY, REPO, Gateway
from tests.protocols.upstream import ProtocolUpstream, start_upstream


@pytest.fixture
def proto() -> Iterator[ProtocolUpstream]:
    up, server = start_upstream()
    try:
        yield up
    finally:
        server.stop()


@pytest.fixture
def make_pgw(make_gateway: Callable[..., Gateway], proto: ProtocolUpstream) -> Callable[..., Gateway]:
    def make(**overrides: Any) -> Gateway:
        upstreams = [{"name": "oa", "base_url": f"{proto.url}/v1", "models": ["*"], "protocol": "openai"},
                     {"name": "an", "base_url": f"{proto.url}/v1", "models": ["*"], "protocol": "anthropic"}]
        return make_gateway(upstreams=upstreams, **overrides)
    return make


@pytest.fixture
def pgw(make_pgw: Callable[..., Gateway]) -> Gateway:
    return make_pgw()


def anthropic_client(gw: Gateway, session: str | None = None, key: str = ACME_KEY, **kw: Any) -> Any:
    import anthropic
    headers = {"X-Session-Id": session} if session else None
    return anthropic.Anthropic(base_url=gw.url, api_key=key, default_headers=headers, max_retries=0, **kw)


def default_policy_with(tmp: Path, old: str, new: str, name: str = "pol") -> Path:
    """A policies folder (``tmp/name``) holding the repository's default policy with *old*
    replaced by *new* (``"inject: {"`` by ``"tools: {...}\n  inject: {"`` adds a setting)."""
    folder = tmp / name
    folder.mkdir(exist_ok=True)
    text = (REPO / "policies/default.yaml").read_text()
    assert old in text, old
    (folder / "default.yaml").write_text(text.replace(old, new))
    return folder


def session_setting(tmp: Path, line: str, name: str = "pol") -> Path:
    """The default policy with *line* (``"tools: {results: drop}"``) added to its ``session``."""
    return default_policy_with(tmp, "inject: {", f"{line}\n  inject: {{", name)
