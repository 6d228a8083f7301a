"""Drivers for the differential suite: the same conversation through Agently's own activated
``Session`` (in-process, straight to the recording stand-in upstream) and through the gateway (a
plain Agently agent with an ``X-Session-Id`` header), each turn's upstream messages kept apart.

``upstream`` (from ``tests/conftest.py``) is the recording stand-in: ``upstream.requests`` holds
every chat body it received; its replies are deterministic functions of the request, so two runs
that send the same messages get the same replies.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from agently import Agently

from gateway.standin import standin_thread
from tests.conftest import ACME_KEY, Gateway, Upstream

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}
Turn = Callable[[Any], Any]


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    """The recording stand-in (overrides the suite-wide one): streams in 3 chunks, not 20, since
    Agently spends most of a streamed turn on per-chunk work; the content is the same."""
    up = Upstream()
    with standin_thread(chunks=3, reply=up._reply, on_request=up.requests.append) as url:
        up.url = url
        yield up


@pytest.fixture(autouse=True)
def _workspace_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Agently creates a task workspace under the working directory for every agent: keep it in tmp."""
    monkeypatch.chdir(tmp_path)
    yield


def write_policy(folder: Path, **session: Any) -> Path:
    """A policy folder with one catch-all policy whose ``session`` block is *session*."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "default.yaml").write_text(yaml.safe_dump({"id": "default", "priority": 0, "session": session}))
    return folder


def agently_settings(session: dict[str, Any]) -> dict[str, Any]:
    """Agently's ``session.*`` settings equivalent to a policy's session block."""
    return {"input_keys": session.get("input_keys"), "reply_keys": session.get("reply_keys"),
            "max_length": session.get("max_length")}


def new_agent(base_url: str, *, stream: bool = True, headers: dict[str, str] | None = None,
              settings: dict[str, Any] | None = None) -> Any:
    agent = Agently.create_agent()
    agent.set_settings("OpenAICompatible", {"base_url": base_url, "model": "standin", "auth": ACME_KEY,
                                            "stream": stream, "headers": headers or {}})
    for key, value in (settings or {}).items():
        agent.set_settings(f"session.{key}", value)
    return agent


@dataclass
class Trace:
    """What one run did: the messages of each upstream request, per turn, and the final sessions."""

    turns: list[list[list[dict[str, Any]]]] = field(default_factory=list)
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)

    def run(self, upstream: Upstream, turn: Turn, agent: Any) -> Any:
        before = len(upstream.requests)
        result = turn(agent)
        self.turns.append([r["messages"] for r in upstream.requests[before:]])
        return result


def local_agent(upstream: Upstream, session_id: str, settings: dict[str, Any], *, stream: bool = True,
                hooks: tuple[Any, dict[str, Any]] | None = None) -> Any:
    """An Agently agent with its own activated ``Session``, talking to the upstream directly."""
    agent = new_agent(upstream.url, stream=stream, settings=settings)
    if hooks is not None:
        analysis, execution = hooks
        agent.register_session_analysis_handler(analysis)
        for name, fn in execution.items():
            agent.register_session_resize_handler(name, fn)
    agent.activate_session(session_id=session_id)
    return agent


def gateway_agent(gateway: Gateway, session_id: str, *, stream: bool = True) -> Any:
    """A plain Agently agent (no session of its own) sending ``X-Session-Id`` to the gateway."""
    return new_agent(gateway.base_url, stream=stream, headers={"X-Session-Id": session_id})


def local_session(agent: Any) -> dict[str, Any]:
    return dict(json.loads(agent.activated_session.get_json_session()))


def export(gateway: Gateway, session_id: str) -> dict[str, Any]:
    resp = httpx.get(f"{gateway.base_url}/sessions/{session_id}", headers=AUTH)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def post(gateway: Gateway, path: str, body: Any = None, *, method: str = "POST") -> dict[str, Any]:
    resp = httpx.request(method, f"{gateway.base_url}/sessions/{path}", headers=AUTH, json=body)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


# --- the documented difference: the gateway records only what is new -------------------------
#
# Under ``input_keys: null`` Agently records its whole rendered prompt, ``prompt.to_text()``:
# ``"user:\n"``, the chat history, the memo, the round's sections, ``"\nassistant:"``. The gateway
# records the round's new input as the client sent it (no history, no memo). ``NewOnly`` maps
# each Agently record to that: it finds the turn whose prompt the record ends with and takes that
# prompt without the memo section (and a plain text or object input out of the ``[INPUT]``
# wrapping Agently gives it next to a memo).

_MEMO = re.compile(r"\[CHAT SESSION MEMO\]:\n.*?\n\n(?=\[[A-Za-z][A-Za-z0-9 _-]*\]:(?:\n|$))", re.DOTALL)
_WRAPPED = re.compile(r"\[INPUT\]:\n(.*)\n\n\[OUTPUT\]:", re.DOTALL)


def _main_prompt(prompt: Any) -> str:
    """The prompt's sections as ``to_text()`` renders them (Agently sends a lone input bare)."""
    if isinstance(prompt, str) and prompt.startswith("[") and prompt.endswith("[OUTPUT]:"):
        return prompt
    body = prompt if isinstance(prompt, str) else yaml.safe_dump(prompt, allow_unicode=True)
    return f"[INPUT]:\n{body}\n\n[OUTPUT]:"


def _as_sent(prompt: Any) -> Any:
    """The prompt as a client without a session sends it, as the gateway records it."""
    if not isinstance(prompt, str):
        return yaml.safe_dump(prompt, allow_unicode=True).rstrip("\n")
    text = _MEMO.sub("", prompt, count=1)
    wrapped = _WRAPPED.fullmatch(text)
    return wrapped.group(1).rstrip("\n") if wrapped and text != prompt else text


@dataclass
class NewOnly:
    """Maps Agently's recorded prompts to what the gateway records (see above)."""

    prompts: list[Any]

    @classmethod
    def of(cls, trace: Trace) -> NewOnly:
        return cls([requests[0][-1]["content"] for requests in trace.turns])

    def content(self, content: Any) -> Any:
        if not (isinstance(content, str) and content.startswith("user:\n") and content.endswith("\nassistant:")):
            return content
        body = content[len("user:\n"): -len("\nassistant:")]
        matches = [p for p in self.prompts if body.endswith(_main_prompt(p))]
        assert matches, "an Agently record that matches no prompt of the run"
        return _as_sent(max(matches, key=lambda p: len(_main_prompt(p))))

    def messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [dict(m, content=self.content(m["content"])) if m["role"] == "user" else m for m in messages]


def comparable(doc: dict[str, Any], new_only: NewOnly | None = None) -> dict[str, Any]:
    """The parts of an exported session both runtimes must agree on (``id`` and settings other
    than Agently's three ``session_settings`` aside)."""
    settings = doc.get("session_settings") or {}
    out = {"auto_resize": doc["auto_resize"], "memo": doc["memo"],
           "full_context": doc["full_context"], "context_window": doc["context_window"],
           "session_settings": {k: _keys(settings.get(k)) for k in ("input_keys", "reply_keys", "max_length")}}
    if new_only is not None:
        out["full_context"] = new_only.messages(out["full_context"])
        out["context_window"] = new_only.messages(out["context_window"])
    return out


def _keys(value: Any) -> Any:
    """Key lists as Agently reads them (``Session._normalize_session_keys`` drops None entries:
    Agently's settings merge appends one when a loaded session repeats a list it already has)."""
    return [k for k in value if k is not None] if isinstance(value, list) else value


def assert_same_turns(local: Trace, gateway: Trace, new_only: NewOnly | None = None) -> None:
    """Every turn sent the upstream the same messages (Agently's recorded prompts in the history
    mapped by *new_only* when given; the turn's own prompt is compared as sent)."""
    assert len(local.turns) == len(gateway.turns)
    for number, (a, b) in enumerate(zip(local.turns, gateway.turns, strict=True), start=1):
        assert len(a) == len(b) == 1, f"turn {number}: {len(a)} vs {len(b)} upstream requests"
        expected = new_only.messages(a[0][:-1]) + a[0][-1:] if new_only is not None else a[0]
        assert b[0] == expected, f"turn {number} differs"
