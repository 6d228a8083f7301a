"""A real Agently agent as the gateway's client (SPEC §1, §2): streaming multi-turn conversations
with server-side memory, keyed recording of Agently's structured prompts, and a session that
travels gateway → Agently → gateway without losing anything."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from agently import Agently
from agently.core.session.Session import Session

from tests.conftest import ACME_KEY, Gateway, Upstream

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}


@pytest.fixture(autouse=True)
def _workspace_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Agently creates a task workspace under the working directory for every agent: keep it in tmp."""
    monkeypatch.chdir(tmp_path)


def make_agent(gateway: Gateway, session: str, model: str = "standin") -> Any:
    """An Agently agent pointed at the gateway with the acme key and an X-Session-Id header."""
    agent = Agently.create_agent()
    agent.set_settings("OpenAICompatible", {"base_url": gateway.base_url, "model": model, "auth": ACME_KEY,
                                            "headers": {"X-Session-Id": session}})
    return agent


def export(gateway: Gateway, session: str) -> dict[str, Any]:
    resp = httpx.get(f"{gateway.base_url}/sessions/{session}", headers=AUTH)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def test_agently_agent_gets_server_side_memory(gateway: Gateway, upstream: Upstream) -> None:
    """Three streamed Agently turns: each later request carries the earlier rounds; the session holds them all."""
    agent = make_agent(gateway, "agently-chat")
    questions = ["my favourite colour is teal", "what is my favourite colour?", "say it once more"]
    replies = [agent.input(q).start() for q in questions]
    assert all(r["stream"] is True for r in upstream.requests)
    expected = []
    for q, a in zip(questions, replies, strict=True):
        expected += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    assert upstream.requests[2]["messages"] == [*expected[:4], {"role": "user", "content": questions[2]}]
    doc = export(gateway, "agently-chat")
    assert doc["full_context"] == expected
    assert doc["context_window"] == expected


def test_agently_session_history_is_not_doubled(gateway: Gateway, upstream: Upstream) -> None:
    """An agent with its own Agently session sends its history itself; the gateway injects nothing and records
    each round once, the new input only (Agently records its whole rendered prompt)."""
    agent = make_agent(gateway, "agently-own")
    agent.activate_session(session_id="local")
    for q in ("first", "second", "third"):
        agent.input(q).start()
    local = [m.model_dump() for m in agent.activated_session.full_context]
    assert upstream.requests[2]["messages"] == [*local[:4], {"role": "user", "content": "third"}]
    recorded = export(gateway, "agently-own")["full_context"]
    assert [m["content"] for m in recorded if m["role"] == "user"] == ["first", "second", "third"]
    assert [m for m in recorded if m["role"] == "assistant"] == [m for m in local if m["role"] == "assistant"]


def write_keyed_policy(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "keyed.yaml").write_text(
        "id: keyed\nsession:\n  input_keys: [info.task, input/lang, .agent.system]\n"
        "  reply_keys: [summary, scores.total]\n")
    return folder


def test_agently_structured_round_records_the_whitelisted_keys(make_gateway: Callable[..., Gateway],
                                                               upstream: Upstream, tmp_path: Path) -> None:
    """The SPEC's structured Agently request records exactly the keyed blocks Agently itself records."""
    gateway = make_gateway(write_keyed_policy(tmp_path / "keyed-policies"))
    agent = make_agent(gateway, "structured")
    agent.set_agent_prompt("system", "SYS-C")
    result = (agent.info({"task": "Summarize #0"}).instruct("be brief").input({"lang": "en", "noise": "ignored"})
              .output({"summary": (str,), "scores": {"total": (int,)}}).get_data())
    assert result == {"summary": "stand-in", "scores": {"total": 50}}
    assert "noise: ignored" in upstream.requests[0]["messages"][-1]["content"]
    doc = export(gateway, "structured")
    assert doc["full_context"] == [
        {"role": "user", "content": "[info.task]:\nSummarize #0\n[input/lang]:\nen\n[.agent.system]:\nSYS-C"},
        {"role": "assistant", "content": "[summary]:\nstand-in\n[scores.total]:\n50"}]
    assert "noise" not in json.dumps(doc)


def test_session_round_trips_through_agently(gateway: Gateway, upstream: Upstream) -> None:
    """Gateway export → Agently load_json_session → get_json_session → gateway import gives back the same session."""
    agent = make_agent(gateway, "trip-src")
    for q in ("one", "two", "three"):
        agent.input(q).start()
    memo = {"facts": ["code X-1"], "nested": {"n": 3}}
    original = export(gateway, "trip-src")
    seeded = {**original, "memo": memo, "context_window": original["context_window"][2:]}
    assert httpx.put(f"{gateway.base_url}/sessions/trip-seed", json=seeded, headers=AUTH).status_code == 200
    original = export(gateway, "trip-seed")
    session = Session().load_json_session(json.dumps(original))
    text = session.get_json_session()
    resp = httpx.put(f"{gateway.base_url}/sessions/trip-dst", content=text.encode(), headers=AUTH)
    assert resp.status_code == 200 and resp.json()["imported_messages"] == 6
    again = export(gateway, "trip-dst")
    settings = again.pop("session_settings")
    original_settings = original.pop("session_settings")
    assert again == {**original, "id": "trip-dst"}
    assert settings.items() >= original_settings.items()
    assert again["memo"] == memo and len(again["context_window"]) == 4


def test_white_space_input_is_recorded_as_agently_records_it(gateway: Gateway, upstream: Upstream) -> None:
    """A user message of white space alone reaches the model and is recorded, as Agently's
    ``_session_finally`` records any user content but an empty one (driven here with its own
    finally hook and activated session, given the same user content and reply)."""
    import asyncio
    from unittest import mock

    upstream.reply = lambda body: "R"
    agent = Agently.create_agent()
    agent.activate_session(session_id="ws")
    with mock.patch.object(Session, "resolve_finally_contents", mock.AsyncMock(return_value=(" \n", "R"))):
        asyncio.run(agent._session_finally(mock.Mock(), agent.settings))
    expected = [m.model_dump() for m in agent.activated_session.context_window]
    resp = httpx.post(f"{gateway.base_url}/chat/completions", headers={**AUTH, "X-Session-Id": "ws"},
                      json={"model": "standin", "messages": [{"role": "user", "content": " \n"}]})
    assert resp.status_code == 200, resp.text
    assert upstream.requests[-1]["messages"][-1]["content"] == " \n"
    assert export(gateway, "ws")["context_window"] == expected == [{"role": "user", "content": " \n"},
                                                                   {"role": "assistant", "content": "R"}]
