"""A message whose content is an object (Agently's ``agent.input({...})`` alone) is recorded as the
YAML Agently renders, rendered once per round, and a round whose objects are costly to render is
built off the event loop whatever its size in bytes (SPEC §3: one client cannot stall the others)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from gateway.policy import load_policy_set
from gateway.session import record as session_record
from gateway.stages import record as record_stage
from tests.conftest import ACME_KEY, REPO, Gateway

HEAVY = orjson.loads(orjson.dumps({"a": [[[[[[1]]]]]] * 4500}))  # 58 KB of JSON, 31,500 YAML nodes
SMALL = {"ticket": "T-1", "tags": ["a", "b"]}


def chat_policy() -> Any:
    return load_policy_set(Path(REPO / "policies")).match("acme", "gpt-4o-mini", "acme:alice")


def count_dumps(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    dumped: list[object] = []
    real = yaml.safe_dump

    def counting(data: Any, *args: Any, **kw: Any) -> Any:
        dumped.append(data)
        return real(data, *args, **kw)

    monkeypatch.setattr(yaml, "safe_dump", counting)
    return dumped


@pytest.mark.parametrize("prefill", [False, True])
def test_an_object_content_is_rendered_once_per_round(monkeypatch: pytest.MonkeyPatch, prefill: bool) -> None:
    """The recorded input and the output-format check share one YAML rendering of the object."""
    policy = chat_policy()
    assert policy.session.input_keys is None and policy.session.reply_keys is None
    messages: list[dict[str, Any]] = [{"role": "user", "content": SMALL}]
    if prefill:
        messages.append({"role": "assistant", "content": {"draft": "x"}})
    body = {"model": "gpt-4o-mini", "messages": messages}
    dumped = count_dumps(monkeypatch)
    user, reply, _ = record_stage.recorded_round(policy, body, {"role": "assistant", "content": "ok"}, None,
                                                 messages, [])
    assert user == yaml.dump(SMALL, allow_unicode=True).rstrip("\n")  # Agently's [INPUT] body, unchanged
    assert sorted(id(d) for d in dumped) == sorted(id(m["content"]) for m in messages), "each rendered once"


def test_rendering_once_holds_only_within_its_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside a round the object's text is rendered anew (a later change to it is seen)."""
    content = {"a": 1}
    assert session_record.content_text(content) == "a: 1"
    content["a"] = 2
    assert session_record.content_text(content) == "a: 2"
    with session_record.rendering_once():
        dumped = count_dumps(monkeypatch)
        assert session_record.content_text(content) == session_record.content_text(content) == "a: 2"
    assert len(dumped) == 1


def test_object_units_stop_counting_past_enough() -> None:
    """The estimate costs at most what it is asked to tell apart, and text contents count nothing."""
    assert session_record.object_units(["x" * 100_000, [{"type": "text", "text": "y"}]], 10) == 0
    assert 10 < session_record.object_units([HEAVY], 10) <= 10 + 2 * session_record.YAML_NODE_UNITS
    assert session_record.object_units([SMALL], 10**9) == 7 * session_record.YAML_NODE_UNITS + len("tickettagsT-1ab")


def test_a_heavy_object_round_is_built_off_the_event_loop(gateway: Gateway,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A 58 KB object content (under the 64 KiB size threshold) is recorded in a worker thread,
    while a small object and 58 KB of plain text are still recorded on the event loop."""
    built_on: list[str] = []
    real = record_stage.recorded_round

    def spy(*args: Any) -> Any:
        built_on.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(record_stage, "recorded_round", spy)
    loop_thread = ""
    with httpx.Client(base_url=gateway.base_url, timeout=60,
                      headers={"Authorization": f"Bearer {ACME_KEY}", "X-Session-Id": "acme:alice"}) as client:
        for content in (SMALL, "x" * 58_000, HEAVY):
            resp = client.post("/chat/completions", json={"model": "gpt-4o-mini",
                                                          "messages": [{"role": "user", "content": content}]})
            assert resp.status_code == 200, resp.text
    small, text, heavy = built_on
    loop_thread = small
    assert text == loop_thread, built_on
    assert heavy != loop_thread, built_on
