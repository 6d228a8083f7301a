"""Tool calls recorded as structured messages in every protocol: a client that relies on the
gateway's memory and sends only its tool result gets a history the provider accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, Gateway, Upstream
from tests.protocols.conftest import anthropic_client, session_setting
from tests.protocols.upstream import ProtocolUpstream, signature

TOOL: dict[str, Any] = {"type": "function", "function": {"name": "get_weather", "description": "weather",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL: dict[str, Any] = {"id": "call_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}


def _export(gw: Gateway, sid: str) -> list[dict[str, Any]]:
    return gw.openai().get(f"/sessions/{sid}", cast_to=object)["full_context"]  # type: ignore[no-any-return]


def test_chat_client_sends_only_its_tool_result(gateway: Gateway, upstream: Upstream) -> None:
    """Chat: the upstream receives user, assistant tool_calls, tool: the call and its answer, in order."""
    upstream.calls_then_says(CALL, "It is sunny.")
    client = gateway.openai(session="tools-chat")
    first = client.chat.completions.create(model="m", tools=[TOOL], messages=[{"role": "user", "content": "weather?"}])
    assert first.choices[0].message.tool_calls[0].id == "call_1"
    second = client.chat.completions.create(model="m", tools=[TOOL], messages=[
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 20C"}])
    assert second.choices[0].message.content == "It is sunny."
    assert upstream.requests[1]["messages"] == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 20C"}]
    assert _export(gateway, "tools-chat")[2:] == [
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 20C"},
        {"role": "assistant", "content": "It is sunny."}]


def test_responses_client_sends_only_its_function_call_output(pgw: Gateway, proto: ProtocolUpstream) -> None:
    """Responses: the upstream receives the user item, the function_call item and its output."""
    client = pgw.openai(session="tools-resp")
    tool = {"type": "function", "name": "get_weather", "parameters": TOOL["function"]["parameters"]}
    first = client.responses.create(model="m", input="weather?", tools=[tool])  # type: ignore[list-item]
    call = next(item for item in first.output if item.type == "function_call")
    second = client.responses.create(model="m", tools=[tool], input=[  # type: ignore[list-item]
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert second.output_text == "tool said: sunny"
    sent = proto.bodies("/v1/responses")[-1]["input"]
    assert sent == [{"role": "user", "content": "weather?"},
                    {"type": "function_call", "call_id": call.call_id, "name": "get_weather",
                     "arguments": '{"city": "Paris"}'},
                    {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]


def test_a_held_responses_function_call_is_retrieved_as_recorded(pgw: Gateway) -> None:
    """GET /v1/responses/{id} of a gateway-held response gives its recorded function call back."""
    client = pgw.openai()
    tool = {"type": "function", "name": "get_weather", "parameters": TOOL["function"]["parameters"]}
    first = client.responses.create(model="m", input="weather?", tools=[tool])  # type: ignore[list-item]
    got = client.responses.retrieve(first.id)
    calls = [item for item in got.output if item.type == "function_call"]
    assert [(c.name, c.arguments, c.call_id) for c in calls] == [  # type: ignore[union-attr]
        ("get_weather", '{"city": "Paris"}', next(i for i in first.output if i.type == "function_call").call_id)]
    assert got.status == "completed"


def test_messages_client_sends_only_its_tool_result(pgw: Gateway, proto: ProtocolUpstream) -> None:
    """Messages: the upstream receives user, assistant tool_use, user tool_result (alternating roles)."""
    client = anthropic_client(pgw, session="tools-msg")
    tool = {"name": "get_weather", "description": "weather", "input_schema": TOOL["function"]["parameters"]}
    first = client.messages.create(model="c", max_tokens=50, tools=[tool],  # type: ignore[list-item]
                                   messages=[{"role": "user", "content": "weather?"}])
    use = next(block for block in first.content if block.type == "tool_use")
    with client.messages.stream(model="c", max_tokens=50, tools=[tool], messages=[  # type: ignore[list-item]
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}]) as s:
        assert s.get_final_text() == "tool said: sunny"
    sent = proto.bodies("/v1/messages")[-1]["messages"]
    assert sent == [{"role": "user", "content": "weather?"},
                    {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": "get_weather",
                                                       "input": {"city": "Paris"}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}]


def test_an_exported_tool_session_is_loaded_and_continued_elsewhere(gateway: Gateway, upstream: Upstream) -> None:
    """The hand-off of SPEC §2: a web tier exports a session that stopped at a tool call, a worker
    imports it under another id and sends only the tool result; the upstream gets the call
    before its result, as from the original session (the import used to keep only role and
    content, so the worker sent a tool result with no call and an assistant 'None')."""
    upstream.calls_then_says(CALL, "It is sunny.")
    web = gateway.openai(session="web-tier")
    web.chat.completions.create(model="m", tools=[TOOL], messages=[{"role": "user", "content": "weather?"}])
    document = web.get("/sessions/web-tier", cast_to=object)
    assert web.put("/sessions/worker-1", body=document, cast_to=object) == {"id": "worker-1",
                                                                              "imported_messages": 2}
    assert gateway.openai().get("/sessions/worker-1", cast_to=object)["full_context"] == \
        document["full_context"]  # type: ignore[index]
    worker = gateway.openai(session="worker-1")
    reply = worker.chat.completions.create(model="m", tools=[TOOL], messages=[
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 20C"}])
    assert reply.choices[0].message.content == "It is sunny."
    assert upstream.requests[-1]["messages"] == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 20C"}]
    # importing the same document again into the session it came from adds nothing
    assert web.put("/sessions/web-tier", body=document, cast_to=object)["imported_messages"] == 0  # type: ignore[index]


def test_a_tool_call_is_recorded_in_chats_form_only(gateway: Gateway, upstream: Upstream) -> None:
    """Keys a provider adds to a tool call (an ``index``, its own extensions) are not recorded:
    the call keeps its id, type, name and arguments, the form an import takes back."""
    extended = {**CALL, "index": 0, "x_trace": "CANARY-CALL-KEY-5521",
                "function": {**CALL["function"], "x_hint": "CANARY-CALL-KEY-5521"}}
    upstream.reply = lambda body: {"role": "assistant", "content": None, "tool_calls": [extended]}
    gateway.openai(session="call-form").chat.completions.create(
        model="m", messages=[{"role": "user", "content": "weather?"}])
    assert _export(gateway, "call-form")[1]["tool_calls"] == [CALL]


WEATHER = {"name": "get_weather", "description": "weather", "input_schema": TOOL["function"]["parameters"]}
THINKING = {"type": "enabled", "budget_tokens": 1024}


def _thinking_round(client: Any, stream: bool) -> Any:
    """A Messages request with thinking on that the upstream answers with thinking and a tool call."""
    kwargs: dict[str, Any] = {"model": "c", "max_tokens": 2048, "tools": [WEATHER], "thinking": THINKING,
                              "messages": [{"role": "user", "content": "weather?"}]}
    if not stream:
        return client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as s:
        return s.get_final_message()


def _answer(use_id: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": use_id, "content": "sunny"}]}]


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_made_with_thinking_on_is_continued_with_only_the_tool_result(
        pgw: Gateway, proto: ProtocolUpstream, stream: bool) -> None:
    """Anthropic wants the thinking that came with a tool call back, unchanged, at the start of that
    assistant turn when a request answers the call with thinking on (else a 400). A client that
    sends only its tool_result gets that from the window (the thinking used to be left out)."""
    client = anthropic_client(pgw, session=f"think-{stream}")
    first = _thinking_round(client, stream)
    assert [b.type for b in first.content] == ["thinking", "tool_use"]
    thinking, use = first.content
    second = client.messages.create(model="c", max_tokens=2048, tools=[WEATHER], thinking=THINKING,
                                    messages=_answer(use.id))
    assert [b.text for b in second.content if b.type == "text"] == ["tool said: sunny"]
    sent = proto.bodies("/v1/messages")[-1]["messages"]
    assert sent[1] == {"role": "assistant", "content": [
        {"type": "thinking", "thinking": thinking.thinking, "signature": thinking.signature},
        {"type": "tool_use", "id": use.id, "name": "get_weather", "input": {"city": "Paris"}}]}
    # the same window continued over Chat Completions carries no Anthropic thinking
    pgw.openai(session=f"think-{stream}").chat.completions.create(
        model="m", messages=[{"role": "user", "content": "thanks"}])
    chat = proto.bodies("/v1/chat/completions")[-1]["messages"]
    assert any(m.get("tool_calls") for m in chat) and not any("reasoning" in m for m in chat)


def test_an_exported_thinking_tool_call_is_continued_after_import(pgw: Gateway, proto: ProtocolUpstream) -> None:
    """The thinking travels with the session's export and import (signature included), and an
    auditor's export shows its text but not the signature."""
    import httpx

    from tests.conftest import AUDITOR_TOKEN
    client = anthropic_client(pgw, session="think-web")
    _, use = _thinking_round(client, stream=False).content
    document = pgw.openai().get("/sessions/think-web", cast_to=object)
    assert pgw.openai().put("/sessions/think-worker", body=document, cast_to=object)["imported_messages"] == 2  # type: ignore[index]
    second = anthropic_client(pgw, session="think-worker").messages.create(
        model="c", max_tokens=2048, tools=[WEATHER], thinking=THINKING, messages=_answer(use.id))
    assert [b.text for b in second.content if b.type == "text"] == ["tool said: sunny"]
    r = httpx.get(f"{pgw.url}/admin/export", params={"tenant": "acme", "format": "agently"},
                  headers={"Authorization": f"Bearer {AUDITOR_TOKEN}"}, timeout=30)
    assert r.status_code == 200
    import io
    import tarfile
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        text = b"".join(tar.extractfile(m).read() for m in tar.getmembers() if m.isfile())  # type: ignore[union-attr]
    assert b"I need the tool for this." in text and signature("I need the tool for this.").encode() not in text


def test_a_policy_that_drops_reasoning_records_none(make_pgw: Any, proto: ProtocolUpstream, tmp_path: Path) -> None:
    """tools: {reasoning: drop} records the call without its thinking; a client sending only its
    tool result with thinking on then gets the provider's own 400, as the README says."""
    import anthropic
    gw = make_pgw(policies=_policy(tmp_path, "{reasoning: drop}"))
    client = anthropic_client(gw, session="think-drop")
    _, use = _thinking_round(client, stream=False).content
    assert "reasoning" not in _export(gw, "think-drop")[1]
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model="c", max_tokens=2048, tools=[WEATHER], thinking=THINKING,
                               messages=_answer(use.id))
    assert "must start with a thinking block" in refused.value.message


def _policy(tmp: Path, tools: str) -> Path:
    return session_setting(tmp, f"tools: {tools}")


def test_policy_redacts_tool_arguments_and_results(make_gateway: Any, upstream: Upstream, tmp_path: Path) -> None:
    """tools: {arguments: redact, results: redact} keeps the sequence, never the values."""
    gw = make_gateway(_policy(tmp_path, "{arguments: redact, results: redact}"))
    upstream.calls_then_says(CALL, "done")
    client = gw.openai(session="redact-tools")
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "weather?"}])
    client.chat.completions.create(model="m", messages=[{"role": "tool", "tool_call_id": "call_1",
                                                         "content": "CANARY-RESULT-7731"}])
    full = _export(gw, "redact-tools")
    assert full[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"redacted": true}'}
    assert full[2] == {"role": "tool", "tool_call_id": "call_1", "content": "[redacted tool result]"}
    assert b"Oslo" not in gw.stored_bytes() and b"CANARY-RESULT-7731" not in gw.stored_bytes()


def test_policy_redacts_a_chat_custom_tool_calls_input(make_gateway: Any, upstream: Upstream, tmp_path: Path) -> None:
    """Chat's custom tool calls (``type: custom``, free-text ``input``) are redacted too."""
    gw = make_gateway(_policy(tmp_path, "{arguments: redact, results: keep}"))
    custom = {"id": "call_c", "type": "custom", "custom": {"name": "apply_patch", "input": "CANARY-CUSTOM-9911"}}
    upstream.reply = lambda body: {"role": "assistant", "content": None, "tool_calls": [custom]}
    gw.openai(session="redact-custom").chat.completions.create(
        model="m", messages=[{"role": "user", "content": "patch it"}])
    (call,) = _export(gw, "redact-custom")[1]["tool_calls"]
    assert call == {"id": "call_c", "type": "custom", "custom": {"name": "apply_patch", "input": '{"redacted": true}'}}
    assert b"CANARY-CUSTOM-9911" not in gw.stored_bytes()


def test_policy_drops_tool_calls_and_results(make_gateway: Any, upstream: Upstream, tmp_path: Path) -> None:
    """tools: {results: drop} records neither the calls nor their results."""
    gw = make_gateway(_policy(tmp_path, "{results: drop}"))
    upstream.calls_then_says(CALL, "done")
    client = gw.openai(session="drop-tools")
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "weather?"}])
    client.chat.completions.create(model="m", messages=[{"role": "tool", "tool_call_id": "call_1", "content": "x"}])
    assert _export(gw, "drop-tools") == [{"role": "user", "content": "weather?"},
                                         {"role": "assistant", "content": "done"}]


def test_export_keeps_tool_structure_under_redaction(gateway: Gateway, upstream: Upstream, tmp_path: Path) -> None:
    """An export shows the tool call (id, name) and the result's tool_call_id; detectors apply to
    the arguments as to any text (the default policy hashes e-mail addresses)."""
    import io
    import tarfile

    import httpx
    import orjson

    from tests.conftest import AUDITOR_TOKEN
    call = {"id": "call_9", "type": "function",
            "function": {"name": "send_mail", "arguments": '{"to": "bob@example.com"}'}}
    upstream.calls_then_says(call, "sent")
    client = gateway.openai(session="export-tools")
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "mail bob"}])
    client.chat.completions.create(model="m", messages=[{"role": "tool", "tool_call_id": "call_9", "content": "ok"}])
    r = httpx.get(f"{gateway.url}/admin/export?tenant=acme&format=jsonl",
                  headers={"Authorization": f"Bearer {AUDITOR_TOKEN}"}, timeout=30)
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        tar.extractall(tmp_path, filter="data")
    records = [orjson.loads(line) for line in (tmp_path / "acme-export.jsonl").read_bytes().splitlines()]
    first, second = records[0]["messages"], records[1]["messages"]
    exported_call = first[1]["tool_calls"][0]
    assert (exported_call["id"], exported_call["function"]["name"]) == ("call_9", "send_mail")
    assert "bob@example.com" not in exported_call["function"]["arguments"]
    assert "pseud:" in exported_call["function"]["arguments"]
    assert second[0] == {"role": "tool", "content": "ok", "tool_call_id": "call_9"}


def test_messages_memo_goes_after_tool_results(pgw: Gateway, proto: ProtocolUpstream) -> None:
    """With a memo, a user message of only tool_result blocks keeps them first (Anthropic's rule)."""
    import httpx

    from tests.conftest import ACME_KEY
    client = anthropic_client(pgw, session="memo-tools")
    first = client.messages.create(model="c", max_tokens=9, tools=[WEATHER],  # type: ignore[list-item]
                                   messages=[{"role": "user", "content": "weather?"}])
    use = next(block for block in first.content if block.type == "tool_use")
    assert httpx.put(f"{pgw.base_url}/sessions/memo-tools/memo", json={"memo": "likes tea"},
                     headers={"Authorization": f"Bearer {ACME_KEY}"}).status_code == 200
    client.messages.create(model="c", max_tokens=9, tools=[WEATHER], messages=[  # type: ignore[list-item]
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "ok"}]}])
    content = proto.bodies("/v1/messages")[-1]["messages"][-1]["content"]
    assert content[0]["type"] == "tool_result"
    assert content[1]["type"] == "text" and "likes tea" in content[1]["text"]


@pytest.mark.parametrize("protocol", ["responses", "messages"])
def test_key_paths_address_tool_calls_in_every_protocol(make_pgw: Any, tmp_path: Path, protocol: str) -> None:
    """reply_keys ``tool_calls[*].function.name`` and ``...arguments.city`` find a Responses
    function_call item and an Anthropic tool_use block alike."""
    folder = tmp_path / "keys"
    folder.mkdir()
    text = (REPO / "policies/default.yaml").read_text().replace(
        "reply_keys: null", 'reply_keys: ["tool_calls[*].function.name", "tool_calls[0].function.arguments.city"]')
    (folder / "default.yaml").write_text(text)
    gw = make_pgw(policies=folder)
    if protocol == "responses":
        gw.openai(session="k").responses.create(model="m", input="weather?", tools=[
            {"type": "function", "name": "get_weather", "parameters": TOOL["function"]["parameters"]}])
    else:
        anthropic_client(gw, session="k").messages.create(model="c", max_tokens=9, tools=[
            {"name": "get_weather", "input_schema": TOOL["function"]["parameters"]}],
            messages=[{"role": "user", "content": "weather?"}])
    full = _export(gw, "k")
    assert full[1] == {"role": "assistant", "content": "[tool_calls[*].function.name]:\n- get_weather\n"
                                                       "[tool_calls[0].function.arguments.city]:\nParis"}


def test_a_messages_tool_result_with_an_image_and_a_search_result_is_recorded(pgw: Gateway,
                                                                              proto: ProtocolUpstream) -> None:
    """An Anthropic ``tool_result`` may hold images, documents and search results beside text
    (computer use sends screenshots). None of it is left out: the image becomes the media
    policy's placeholder (the default policy's), the search result is kept with its text, and
    the next round's window gives the provider the same blocks back."""
    import base64
    import hashlib

    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 40
    result = [{"type": "text", "text": "screenshot taken"},
              {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                           "data": base64.b64encode(png).decode()}},
              {"type": "search_result", "source": "https://example.test/a", "title": "A",
               "content": [{"type": "text", "text": "CANARY-SEARCH-5150"}]}]
    client = anthropic_client(pgw, session="tool-media")
    tool_def = {"name": "screenshot", "input_schema": {"type": "object"}}
    first = client.messages.create(model="c", max_tokens=9, tools=[tool_def],  # type: ignore[list-item]
                                   messages=[{"role": "user", "content": "look"}])
    use = next(block for block in first.content if block.type == "tool_use")
    client.messages.create(model="c", max_tokens=9, tools=[tool_def], messages=[  # type: ignore[list-item]
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": result}]}])
    (tool,) = [m for m in _export(pgw, "tool-media") if m["role"] == "tool"]
    assert tool["tool_call_id"] == use.id
    assert tool["content"][0] == {"type": "text", "text": "screenshot taken"}
    digest = hashlib.sha256(png).hexdigest()
    assert tool["content"][1] == {"type": "text", "text": f"[image: image/png, {len(png)} bytes, sha256 {digest}]"}
    assert tool["content"][2] == result[2]
    client.messages.create(model="c", max_tokens=9, tools=[tool_def],  # type: ignore[list-item]
                           messages=[{"role": "user", "content": "and now?"}])
    sent = proto.bodies("/v1/messages")[-1]["messages"]
    (block,) = [b for m in sent if isinstance(m["content"], list) for b in m["content"] if b["type"] == "tool_result"]
    assert block["content"] == [{"type": "text", "text": "screenshot taken"}, tool["content"][1], result[2]]


def test_thinking_still_starts_an_assistant_turn_merged_from_two_messages() -> None:
    """Anthropic wants alternating roles, so two assistant messages in a row (a policy that records
    no user message makes them) become one turn; the thinking of its tool call goes first."""
    from gateway.codecs.messages import to_anthropic
    thinking = {"type": "thinking", "thinking": "I need the tool.", "signature": "sig"}
    window: list[dict[str, Any]] = [{"role": "user", "content": "weather?"},
                                    {"role": "assistant", "content": "Let me look."},
                                    {"role": "assistant", "content": None, "tool_calls": [CALL],
                                     "reasoning": [thinking]},
                                    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    turn = to_anthropic(window)[1]
    assert turn["role"] == "assistant"
    assert [b["type"] for b in turn["content"]] == ["thinking", "text", "tool_use"]
    assert turn["content"][0] == thinking


def test_an_exported_tool_session_loads_in_agently(gateway: Gateway, upstream: Upstream) -> None:
    """Agently's loader refuses ``content: null``, which a message that is only tool calls had in
    the session export and in an auditor's Agently-format bundle; both write ``""`` now, and the
    gateway reads it back as none (re-importing the export adds nothing)."""
    import io
    import tarfile

    import httpx
    import orjson
    from agently.core.session.Session import Session

    from tests.conftest import AUDITOR_TOKEN
    upstream.calls_then_says(CALL, "It is sunny.")
    client = gateway.openai(session="to-agently")
    client.chat.completions.create(model="m", tools=[TOOL], messages=[{"role": "user", "content": "weather?"}])
    document = client.get("/sessions/to-agently", cast_to=object)
    assert document["full_context"][1]["content"] == ""  # type: ignore[index]
    loaded = Session().load_json_session(orjson.dumps(document).decode()).to_serializable_session_data()
    assert [m["role"] for m in loaded["full_context"]] == ["user", "assistant"]
    assert client.put("/sessions/to-agently", body=document, cast_to=object)["imported_messages"] == 0  # type: ignore[index]
    r = httpx.get(f"{gateway.url}/admin/export", params={"tenant": "acme", "format": "agently"},
                  headers={"Authorization": f"Bearer {AUDITOR_TOKEN}"}, timeout=30)
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        name = next(m for m in tar.getmembers() if m.isfile() and not m.name.endswith((".manifest.json", ".audit.jsonl",
                                                                                       ".pem")))
        line = tar.extractfile(name).read().splitlines()[0]  # type: ignore[union-attr]
    Session().load_json_session(line.decode())  # one session per line, as Agently loads it


def test_a_failed_tool_result_stays_failed_in_the_window(pgw: Gateway, proto: ProtocolUpstream) -> None:
    """An Anthropic ``tool_result`` with ``is_error: true`` keeps the flag in the record and in the
    window injected later (it was dropped, so the model read a failure as a result), in the
    session's export, and not over Chat Completions, which has no such field."""
    client = anthropic_client(pgw, session="tool-error")
    first = client.messages.create(model="c", max_tokens=50, tools=[WEATHER],  # type: ignore[list-item]
                                   messages=[{"role": "user", "content": "weather?"}])
    use = next(block for block in first.content if block.type == "tool_use")
    client.messages.create(model="c", max_tokens=50, tools=[WEATHER], messages=[  # type: ignore[list-item]
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "timeout",
                                      "is_error": True}]}])
    client.messages.create(model="c", max_tokens=50, tools=[WEATHER],  # type: ignore[list-item]
                           messages=[{"role": "user", "content": "try later?"}])
    sent = proto.bodies("/v1/messages")[-1]["messages"]
    results = [b for m in sent if isinstance(m["content"], list) for b in m["content"] if b["type"] == "tool_result"]
    assert results == [{"type": "tool_result", "tool_use_id": use.id, "content": "timeout", "is_error": True}]
    assert _export(pgw, "tool-error")[2] == {"role": "tool", "tool_call_id": use.id, "content": "timeout",
                                              "is_error": True}
    pgw.openai(session="tool-error").chat.completions.create(model="m", messages=[{"role": "user", "content": "ok"}])
    chat = proto.bodies("/v1/chat/completions")[-1]["messages"]
    assert any(m["role"] == "tool" for m in chat) and not any("is_error" in m for m in chat)


def test_a_request_that_turns_thinking_off_gets_no_recorded_thinking(pgw: Gateway, proto: ProtocolUpstream) -> None:
    """Anthropic refuses a thinking block in any assistant message of a request that turns
    thinking off; the window then goes without the recorded thinking (the call stays)."""
    client = anthropic_client(pgw, session="think-off")
    _, use = _thinking_round(client, stream=False).content
    reply = client.messages.create(model="c", max_tokens=2048, tools=[WEATHER], thinking={"type": "disabled"},
                                   messages=_answer(use.id))
    assert [b.text for b in reply.content if b.type == "text"] == ["tool said: sunny"]
    sent = proto.bodies("/v1/messages")[-1]["messages"]
    assert [b["type"] for b in sent[1]["content"]] == ["tool_use"]


# --- calls the client never answered, and requests without tools ---------------------------

def test_a_call_the_client_never_answered_is_not_sent_back_in_any_protocol(pgw: Gateway,
                                                                           proto: ProtocolUpstream) -> None:
    """A client that goes on without running a tool call (LangChain's structured output, a forced
    ``tool_choice`` extraction) leaves an unanswered call in the record. The providers refuse a
    history with one (the test upstream answers as they do), so the window goes without it, in
    every protocol, on this turn and later ones; the record keeps it."""
    client = pgw.openai(session="ignored-call")
    tool = {"type": "function", "name": "get_weather", "parameters": TOOL["function"]["parameters"]}
    first = client.responses.create(model="m", input="weather?", tools=[tool])  # type: ignore[list-item]
    assert any(item.type == "function_call" for item in first.output)
    moved_on = client.responses.create(model="m", input="never mind: hello")
    assert moved_on.output_text == "responses says: never mind: hello"
    assert not any(i.get("type") == "function_call" for i in proto.bodies("/v1/responses")[-1]["input"])
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "still there?"}])
    assert chat.choices[0].message.content == "chat says: still there?"
    sent = proto.bodies("/v1/chat/completions")[-1]["messages"]
    assert not any(m.get("tool_calls") or m["role"] == "tool" for m in sent)
    reply = anthropic_client(pgw, session="ignored-call").messages.create(
        model="c", max_tokens=9, tools=[WEATHER], messages=[{"role": "user", "content": "bye"}])  # type: ignore[list-item]
    assert [b.type for b in reply.content] == ["tool_use"]  # accepted: the test upstream calls the tool again
    assert [m["role"] for m in proto.bodies("/v1/messages")[-1]["messages"]][-1] == "user"
    assert _export(pgw, "ignored-call")[1]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_an_answered_call_stays_while_a_call_left_open_goes(pgw: Gateway, proto: ProtocolUpstream) -> None:
    """Of two tool rounds, the answered one goes back whole, the one left open goes without its
    call; a client that does answer the last call with its request gets it back as before."""
    client = anthropic_client(pgw, session="two-calls")
    first = client.messages.create(model="c", max_tokens=9, tools=[WEATHER],  # type: ignore[list-item]
                                   messages=[{"role": "user", "content": "weather?"}])
    answered = next(block for block in first.content if block.type == "tool_use")
    client.messages.create(model="c", max_tokens=9, tools=[WEATHER], messages=_answer(answered.id))  # type: ignore[list-item]
    second = client.messages.create(model="c", max_tokens=9, tools=[WEATHER],  # type: ignore[list-item]
                                    messages=[{"role": "user", "content": "and tomorrow?"}])
    left_open = next(block for block in second.content if block.type == "tool_use")
    client.messages.create(model="c", max_tokens=9, tools=[WEATHER],  # type: ignore[list-item]
                           messages=[{"role": "user", "content": "forget it"}])
    uses = [b["id"] for m in proto.bodies("/v1/messages")[-1]["messages"] if isinstance(m["content"], list)
            for b in m["content"] if b["type"] == "tool_use"]
    assert uses == [answered.id]
    third = client.messages.create(model="c", max_tokens=9, tools=[WEATHER],  # type: ignore[list-item]
                                   messages=[{"role": "user", "content": "weather again?"}])
    last = next(block for block in third.content if block.type == "tool_use")
    reply = client.messages.create(model="c", max_tokens=9, tools=[WEATHER], messages=_answer(last.id))  # type: ignore[list-item]
    assert [b.text for b in reply.content if b.type == "text"] == ["tool said: sunny"]
    uses = [b["id"] for m in proto.bodies("/v1/messages")[-1]["messages"] if isinstance(m["content"], list)
            for b in m["content"] if b["type"] == "tool_use"]
    assert uses == [answered.id, last.id] and left_open.id not in uses


def test_a_messages_request_without_tools_gets_the_window_without_tool_blocks(pgw: Gateway,
                                                                              proto: ProtocolUpstream) -> None:
    """Anthropic refuses tool blocks in a request that defines no tools ("Requests which include
    `tool_use` or `tool_result` blocks must define tools"): a plain follow-up to a tool round gets
    the window's text (the question, the answer) without the call, its result and its thinking."""
    client = anthropic_client(pgw, session="no-tools")
    _, use = _thinking_round(client, stream=False).content
    client.messages.create(model="c", max_tokens=2048, tools=[WEATHER], thinking=THINKING,
                           messages=_answer(use.id))  # type: ignore[list-item]
    reply = client.messages.create(model="c", max_tokens=9, messages=[{"role": "user", "content": "thanks!"}])
    assert [b.text for b in reply.content if b.type == "text"] == ["messages says: thanks!"]
    sent = proto.bodies("/v1/messages")[-1]["messages"]
    kinds = {b["type"] for m in sent if isinstance(m["content"], list) for b in m["content"]}
    assert not kinds & {"tool_use", "tool_result", "thinking", "redacted_thinking"}
    texts = [m["content"] if isinstance(m["content"], str) else " ".join(b.get("text", "") for b in m["content"])
             for m in sent]
    assert "weather?" in texts[0] and any("tool said: sunny" in t for t in texts)
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]


# --- imports Agently's Session has been through ---------------------------------------------

def _through_agently(document: Any) -> Any:
    import orjson
    from agently.core.session.Session import Session
    return Session().load_json_session(orjson.dumps(document).decode()).to_serializable_session_data()


@pytest.mark.parametrize("answered", [False, True])
def test_a_tool_session_that_went_through_agently_is_refused_saying_why(gateway: Gateway, upstream: Upstream,
                                                                       answered: bool) -> None:
    """Agently's Session keeps no tool calls, so a tool session loaded into it and put back has
    lost them: into its own id that was a bare 409, into a new id it was taken, and its windows
    then sent a tool result with no id and an empty assistant turn the providers refuse. Now the
    tool result without its id is a 400 naming the message, and a history that only lost its
    calls is a 409 naming the message and why."""
    import openai
    upstream.calls_then_says(CALL, "It is sunny.")
    client = gateway.openai(session="agently-trip")
    client.chat.completions.create(model="m", tools=[TOOL], messages=[{"role": "user", "content": "weather?"}])
    if answered:
        client.chat.completions.create(model="m", tools=[TOOL], messages=[
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    copy = _through_agently(client.get("/sessions/agently-trip", cast_to=object))
    for target in ("agently-trip", "agently-trip-2"):
        if answered:
            with pytest.raises(openai.BadRequestError, match=r"full_context\[2\]' is a tool result without"):
                client.put(f"/sessions/{target}", body=copy, cast_to=object)
        elif target == "agently-trip":
            with pytest.raises(openai.ConflictError, match=r"full_context\[1\]' lacks the recorded tool_calls"):
                client.put(f"/sessions/{target}", body=copy, cast_to=object)


def test_an_import_is_refused_a_message_without_content_and_keeps_the_policys_settings(gateway: Gateway) -> None:
    """``content: null`` on a message without tool calls was taken (the model was then sent the
    text 'None', and the export was one Agently refuses); the document's ``session_settings``
    were shown by the export until the next round, though the policy's apply."""
    import openai
    client = gateway.openai()
    null = {"full_context": [{"role": "user", "content": None}]}
    with pytest.raises(openai.BadRequestError, match=r"full_context\[0\]\.content' must be"):
        client.put("/sessions/no-content", body=null, cast_to=object)
    document = {"full_context": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                "session_settings": {"max_length": 5, "input_keys": ["secret"]}}
    client.put("/sessions/with-settings", body=document, cast_to=object)
    exported = client.get("/sessions/with-settings", cast_to=object)
    assert exported["session_settings"]["max_length"] != 5  # type: ignore[index]
    assert exported["session_settings"].get("input_keys") is None  # type: ignore[index]
