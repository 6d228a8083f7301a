"""Responses custom tools and built-in tool results (what Codex sends): the model's
``custom_tool_call`` and the client's ``custom_tool_call_output`` are recorded as a tool call and
its result, under the policy's ``session.tools``, and go back to the provider as the same items;
another tool's ``*_output`` item is recorded as user content. None of them is left out."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.redact import Redactor
from tests.conftest import ACME_KEY, Gateway
from tests.protocols.conftest import anthropic_client, session_setting
from tests.protocols.upstream import PATCH_INPUT, ProtocolUpstream

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}
PATCH_TOOL = {"type": "custom", "name": "apply_patch", "description": "edit files"}


def respond(gw: Gateway, session: str, body: dict[str, Any]) -> httpx.Response:
    resp = httpx.post(f"{gw.base_url}/responses", json={"model": "m", **body}, timeout=30,
                      headers={**AUTH, "X-Session-Id": session})
    assert resp.status_code == 200, resp.text
    return resp


def history(gw: Gateway, session: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{gw.base_url}/sessions/{session}", headers=AUTH, timeout=30)
    assert resp.status_code == 200, resp.text
    return list(resp.json()["full_context"])


@pytest.mark.parametrize("stream", [False, True])
def test_a_custom_tool_call_and_its_output_are_recorded_and_go_back_as_such(pgw: Gateway, proto: ProtocolUpstream,
                                                                            stream: bool) -> None:
    first = respond(pgw, "patch", {"input": "add a file", "tools": [PATCH_TOOL], "stream": stream})
    assert b"custom_tool_call" in first.content
    (call,) = history(pgw, "patch")[1]["tool_calls"]
    assert call["type"] == "custom"
    assert call["custom"] == {"name": "apply_patch", "input": PATCH_INPUT}
    call_id = call["id"]

    second = respond(pgw, "patch", {"tools": [PATCH_TOOL], "stream": stream, "input": [
        {"type": "custom_tool_call_output", "call_id": call_id, "output": "Done: CANARY-OUT-1"}]})
    assert b"tool said: Done: CANARY-OUT-1" in second.content
    assert history(pgw, "patch")[2] == {"role": "tool", "tool_call_id": call_id, "content": "Done: CANARY-OUT-1"}
    sent = proto.bodies("/v1/responses")[-1]["input"]
    assert sent[1:] == [
        {"type": "custom_tool_call", "call_id": call_id, "name": "apply_patch", "input": PATCH_INPUT},
        {"type": "custom_tool_call_output", "call_id": call_id, "output": "Done: CANARY-OUT-1"}]


def _policy(tmp: Path, tools: str) -> Path:
    return session_setting(tmp, f"tools: {tools}")


def test_a_redacting_policy_redacts_a_custom_tools_input(make_pgw: Callable[..., Gateway], tmp_path: Path) -> None:
    gw = make_pgw(policies=_policy(tmp_path, "{arguments: redact, results: redact}"))
    respond(gw, "redact", {"input": "add a file", "tools": [PATCH_TOOL]})
    (call,) = history(gw, "redact")[1]["tool_calls"]
    assert call["custom"] == {"name": "apply_patch", "input": '{"redacted": true}'}
    assert b"CANARY-PATCH-4242" not in gw.stored_bytes()


def test_an_export_redacts_a_custom_tools_input_as_text() -> None:
    """Detectors run on a custom tool's input as on any text (it used to be dropped from exports)."""
    redactor = Redactor([], b"\1" * 32, {"email"})
    call = {"id": "c1", "type": "custom", "custom": {"name": "send", "input": "to bob@example.com now"}}
    (message,) = redactor.redact_messages([{"role": "assistant", "content": None, "tool_calls": [call]}])
    (exported,) = message["tool_calls"]
    assert (exported["id"], exported["type"], exported["custom"]["name"]) == ("c1", "custom", "send")
    assert exported["custom"]["input"].startswith("to ") and exported["custom"]["input"].endswith(" now")
    assert "bob@example.com" not in exported["custom"]["input"]


def test_a_built_in_tools_output_is_recorded_as_user_content(pgw: Gateway) -> None:
    shell = {"type": "local_shell_call_output", "call_id": "sh1", "output": "CANARY-SHELL-77 /etc/passwd"}
    respond(pgw, "shell", {"input": [{"role": "user", "content": "list"}, shell]})
    users = [m["content"] for m in history(pgw, "shell") if m["role"] == "user"]
    assert users[0] == "list"
    assert "CANARY-SHELL-77" in users[1] and '"local_shell_call_output"' in users[1]


def test_a_computer_screenshot_is_recorded_under_the_media_policy(pgw: Gateway) -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\1" * 30
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    item = {"type": "computer_call_output", "call_id": "cu1",
            "output": {"type": "computer_screenshot", "image_url": url}}
    respond(pgw, "screen", {"input": [{"role": "user", "content": "click ok"}, item]})
    user_messages = [m for m in history(pgw, "screen") if m["role"] == "user"]
    parts = [p for m in user_messages if isinstance(m["content"], list) for p in m["content"]]
    texts = [p["text"] for p in parts if p.get("type") == "text"]
    assert f"[image: image/png, {len(png)} bytes, sha256 {hashlib.sha256(png).hexdigest()}]" in texts
    assert any('"computer_call_output"' in t and '"cu1"' in t for t in texts)
    assert not any(url in t for t in texts)


@pytest.mark.parametrize(("results", "expected"), [("redact", "[redacted tool result]"), ("drop", None)])
def test_the_tools_policy_applies_to_a_built_in_tools_output(make_pgw: Callable[..., Gateway], tmp_path: Path,
                                                             results: str, expected: str | None) -> None:
    gw = make_pgw(policies=_policy(tmp_path, f"{{arguments: keep, results: {results}}}"))
    shell = {"type": "local_shell_call_output", "call_id": "sh1", "output": "CANARY-SHELL-88"}
    respond(gw, "shell-policy", {"input": [{"role": "user", "content": "list"}, shell]})
    users = [m["content"] for m in history(gw, "shell-policy") if m["role"] == "user"]
    assert users == (["list", expected] if expected else ["list"])
    assert b"CANARY-SHELL-88" not in gw.stored_bytes()


def test_a_custom_call_continued_on_messages_is_a_named_tool_use(pgw: Gateway, proto: ProtocolUpstream) -> None:
    """Anthropic has no free-text tools: a recorded custom call goes into a Messages window (of a
    request that defines tools) as a ``tool_use`` with its name and ``{"input": <text>}``, not a
    nameless block the API refuses."""
    respond(pgw, "cross", {"input": "add a file", "tools": [PATCH_TOOL]})
    call_id = history(pgw, "cross")[1]["tool_calls"][0]["id"]
    respond(pgw, "cross", {"input": [{"type": "custom_tool_call_output", "call_id": call_id, "output": "ok"}]})
    anthropic_client(pgw, session="cross").messages.create(model="c", max_tokens=9, messages=[
        {"role": "user", "content": "and now?"}], tools=[{"name": "apply_patch", "input_schema": {"type": "object"}}])
    sent = proto.bodies("/v1/messages")[-1]["messages"]
    uses = [b for m in sent if isinstance(m["content"], list) for b in m["content"] if b["type"] == "tool_use"]
    assert uses == [{"type": "tool_use", "id": call_id, "name": "apply_patch", "input": {"input": PATCH_INPUT}}]


U = {"role": "user", "content": "hello"}
IMAGE = b"\x89PNG\r\n\x1a\n" + b"\2" * 40
IMAGE_B64 = base64.b64encode(IMAGE).decode()
SEALED = "gAAAAB" + "CANARY-SEALED-0042" * 4
BUILT_IN_ITEMS: dict[str, dict[str, Any]] = {
    "mcp_call": {"type": "mcp_call", "id": "mcp_1", "server_label": "s", "name": "f", "arguments": "{}",
                 "output": "CANARY-MCP-OUTPUT"},
    "mcp_list_tools": {"type": "mcp_list_tools", "id": "mcpl_1", "server_label": "s",
                       "tools": [{"name": "t", "description": "CANARY-MCP-LIST", "input_schema": {}}]},
    "reasoning": {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "CANARY-SUMMARY"}],
                  "encrypted_content": SEALED},
    "file_search_call": {"type": "file_search_call", "id": "fs_1", "status": "completed", "queries": ["q"],
                         "results": [{"file_id": "f", "filename": "x", "score": 1, "text": "CANARY-FS-RESULT"}]},
    "web_search_call": {"type": "web_search_call", "id": "ws_1", "status": "completed",
                        "action": {"type": "search", "query": "CANARY-WS-QUERY"}},
    "code_interpreter_call": {"type": "code_interpreter_call", "id": "ci_1", "status": "completed", "container_id": "c",
                              "code": "print(1)", "outputs": [{"type": "logs", "logs": "CANARY-CI-LOGS"}]},
    "local_shell_call": {"type": "local_shell_call", "id": "ls_1", "call_id": "c1", "status": "completed",
                         "action": {"type": "exec", "command": ["echo", "CANARY-SHELL-CMD"], "env": {}}},
    "mcp_approval": {"type": "mcp_approval_request", "id": "apr_1", "server_label": "s", "name": "f",
                     "arguments": "CANARY-APPROVAL-ARGS"},
    "image_generation_call": {"type": "image_generation_call", "id": "ig_1", "status": "completed",
                              "result": IMAGE_B64},
    "compaction": {"type": "compaction", "id": "cmp_1", "encrypted_content": SEALED},
    "unknown": {"type": "some_future_item", "id": "x_1", "text": "CANARY-FUTURE"},
}


@pytest.mark.parametrize("name", BUILT_IN_ITEMS)
def test_every_input_item_the_model_reads_is_recorded(pgw: Gateway, proto: ProtocolUpstream, name: str) -> None:
    """A built-in tool's call, a reasoning or compaction item, an item of a type the gateway does
    not know: each reaches the model, so each is recorded as user content (the item as JSON, an
    opaque blob as a placeholder with its sha256), and none of them is history: the client that
    sends one still gets its window. They used to be forwarded and left out of the record."""
    session = f"items-{name}"
    respond(pgw, session, {"input": "first turn"})
    item = BUILT_IN_ITEMS[name]
    items = [U, item]
    if name == "mcp_approval":
        items.append({"type": "mcp_approval_response", "approval_request_id": "apr_1", "approve": True,
                      "reason": "CANARY-APPROVE-REASON"})
    respond(pgw, session, {"input": items})
    sent = proto.bodies("/v1/responses")[-1]["input"]
    assert sent[0] == {"role": "user", "content": "first turn"}  # the window went in: not a history client
    recorded = history(pgw, session)[2:]
    assert recorded[0] == {"role": "user", "content": "hello"}
    texts = [str(m["content"]) for m in recorded[1:-1]]
    assert [m["role"] for m in recorded] == ["user"] * (len(items)) + ["assistant"]
    tokens = set(re.findall(r"CANARY-[A-Z-]+", orjson.dumps(items).decode())) - {"CANARY-SEALED-"}
    for token in tokens:
        assert any(token in text for text in texts), token
    joined = "\n".join(texts)
    assert "CANARY-SEALED" not in joined and IMAGE_B64 not in joined
    if "encrypted_content" in item:
        sealed = SEALED.encode()
        assert f"[encrypted content: {len(sealed)} bytes, sha256 {hashlib.sha256(sealed).hexdigest()}]" in joined
    if name == "image_generation_call":
        assert f"[image: {len(IMAGE)} bytes, sha256 {hashlib.sha256(IMAGE).hexdigest()}]" in joined


def test_the_tools_policy_applies_to_a_built_in_call(make_pgw: Callable[..., Gateway], tmp_path: Path) -> None:
    """``session.tools.results: drop`` keeps a built-in tool's call item out of the record, as it
    does its output."""
    gw = make_pgw(policies=_policy(tmp_path, "{arguments: keep, results: drop}"))
    respond(gw, "mcp-drop", {"input": [U, BUILT_IN_ITEMS["mcp_call"]]})
    assert [m["content"] for m in history(gw, "mcp-drop") if m["role"] == "user"] == ["hello"]
    assert b"CANARY-MCP-OUTPUT" not in gw.stored_bytes()
