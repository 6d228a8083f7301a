"""Asynchronous bounding through a running gateway: summarize folds the window into the memo
with an unrecorded side request, a Python hook folds old rounds into the memo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ACME_KEY, wait_for

HERE = Path(__file__).parent


def write_policy(folder: Path, bounding: str, max_length: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "default.yaml").write_text(
        "id: default\npriority: 0\nsession:\n  input_keys: null\n  reply_keys: null\n"
        f"  max_length: {max_length}\n  bounding: {bounding}\n")
    return folder


def export(gw: Any, sid: str) -> dict:
    r = httpx.get(f"{gw.base_url}/sessions/{sid}", headers={"Authorization": f"Bearer {ACME_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()



def test_summarize_folds_window_into_memo_without_recording_the_side_request(make_gateway, upstream,
                                                                               tmp_path) -> None:
    """Over max_length, the oldest rounds become the memo via a side request that is never recorded."""
    side_requests: list[dict] = []

    def reply(body: dict) -> str:
        if "maintain the memory" in str(body["messages"][0].get("content")):
            side_requests.append(body)
            return "MEMO: the user likes tea"
        return "ok " + "r" * 200

    upstream.reply = reply
    gw = make_gateway(write_policy(tmp_path / "pol", "{strategy: summarize, keep_last_rounds: 1}", 700))
    client = gw.openai(session="acme:sum")
    for i in range(4):
        text = f"turn {i} " + "q" * 100
        client.chat.completions.create(model="standin", messages=[{"role": "user", "content": text}])
    data = wait_for(lambda: (d := export(gw, "acme:sum"))["memo"] and d)
    assert data["memo"] == "MEMO: the user likes tea"
    assert len(data["context_window"]) == 2  # the last round kept verbatim
    assert len(data["full_context"]) == 8  # all four rounds, and no side request among them
    assert side_requests and "X-Session-Id" not in str(side_requests[0])
    assert all("maintain the memory" not in str(m["content"]) for m in data["full_context"])
    client.chat.completions.create(model="standin", messages=[{"role": "user", "content": "next"}])
    last = [r for r in upstream.requests if r not in side_requests][-1]["messages"][-1]["content"]
    assert last.startswith("[CHAT SESSION MEMO]:\nMEMO: the user likes tea\n")


def test_summarize_failure_cuts_the_window_instead(make_gateway, upstream, tmp_path) -> None:
    """When the side request fails, the window is cut with simple_cut and the memo stays empty."""
    def reply(body: dict) -> Any:
        if "maintain the memory" in str(body["messages"][0].get("content")):
            return {"role": "assistant", "content": None}  # not a usable summary: stand-in sends null
        return "ok " + "r" * 200
    upstream.reply = reply
    gw = make_gateway(write_policy(tmp_path / "pol", "{strategy: summarize, keep_last_rounds: 1}", 600))
    client = gw.openai(session="acme:cut")
    for i in range(4):
        text = f"t{i} " + "q" * 100
        client.chat.completions.create(model="standin", messages=[{"role": "user", "content": text}])
    from gateway.session.record import context_length
    data = wait_for(lambda: (d := export(gw, "acme:cut")) and context_length(d["context_window"]) <= 600 and d)
    assert len(data["full_context"]) == 8
    assert data["memo"] is None


def test_hook_folds_old_rounds_into_memo(make_gateway, upstream, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A policy hook (module:function, Agently's signature) folds old rounds into the memo."""
    monkeypatch.syspath_prepend(str(HERE))
    hook = "{strategy: hook, analysis: 'fold_hook:analysis', execution: {fold: 'fold_hook:fold'}}"
    gw = make_gateway(write_policy(tmp_path / "pol", hook, 100000), hook_modules=["fold_hook"])
    client = gw.openai(session="acme:hook")
    for i in range(4):
        client.chat.completions.create(model="standin", messages=[{"role": "user", "content": f"fact {i}"}])
    data = wait_for(lambda: (d := export(gw, "acme:hook"))["memo"] and len(d["memo"]["facts"]) >= 2 and d)
    assert data["memo"]["facts"][:2] == ["fact 0", "fact 1"]
    assert [m["content"] for m in data["context_window"] if m["role"] == "user"] == ["fact 2", "fact 3"]
    client.chat.completions.create(model="standin", messages=[{"role": "user", "content": "and now?"}])
    assert "[CHAT SESSION MEMO]:\nfacts:\n- fact 0\n- fact 1" in upstream.requests[-1]["messages"][-1]["content"]
