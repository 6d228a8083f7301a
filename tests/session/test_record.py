"""What one round records (SPEC §1 "Structured request", "One round"), proven against Agently itself."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from agently import Agently
from agently.core.session.Session import Session
from agently.types.data import ChatMessage
from aiohttp import web

from gateway.paths import compile_key
from gateway.session.record import (
    build_reply_view,
    build_request_view,
    content_text,
    context_length,
    format_keyed,
    format_value,
    input_text,
    message_length,
    new_messages,
    render_reply,
    render_user,
)

SPEC_PROMPT = (
    "[INFO]:\n- task: Summarize #0\n\n[INSTRUCT]:\nbe brief\n\n[INPUT]:\nlang: en\nnoise: ignored\n\n\n"
    '[OUTPUT REQUIREMENT]:\nData Format: JSON\nData Structure:\n{\n  "summary": <str>,\n  "scores": {\n'
    '    "total": <int>\n  }\n}\n\n[OUTPUT]:'
)
SPEC_MESSAGES = [{"role": "system", "content": "SYS-C"}, {"role": "user", "content": SPEC_PROMPT}]
TICKET = {"ticket_id": "T-1001", "intent": "refund", "raw_text": "my card was charged twice"}


def keys(*sources: str) -> list:
    """Compile policy keys."""
    return [compile_key(source) for source in sources]


def reply(content: str | None, tool_calls: list | None = None):
    """A reply view of an assembled assistant message."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    return build_reply_view(message, None)


def record_user(input_keys: list[str] | None, messages: list[dict]) -> str | None:
    """The recorded user message for a request with these messages."""
    view = build_request_view({"model": "m", "messages": messages})
    return render_user(None if input_keys is None else keys(*input_keys), messages, view)


# --- the SPEC examples ----------------------------------------------------------------------


def test_spec_example_input_keys() -> None:
    """The Agently 4.1 prompt of the SPEC records exactly the text Agently records."""
    assert (
        record_user(["info.task", "input/lang", ".agent.system"], SPEC_MESSAGES)
        == "[info.task]:\nSummarize #0\n[input/lang]:\nen\n[.agent.system]:\nSYS-C"
    )


def test_spec_example_reply_keys() -> None:
    """The SPEC's reply keys on a JSON reply record the summary and the nested total."""
    view = reply('{"summary": "A short text.", "scores": {"total": 50}}')
    assert (
        render_reply(keys("summary", "scores.total"), view)
        == "[summary]:\nA short text.\n[scores.total]:\n50"
    )


def test_spec_example_slots() -> None:
    """Each section of the rendered prompt becomes a slot, info read as one map, the empty OUTPUT dropped."""
    slots = build_request_view({"messages": SPEC_MESSAGES}).slots
    assert slots["info"] == {"task": "Summarize #0"}
    assert slots["instruct"] == "be brief"
    assert slots["input"] == {"lang": "en", "noise": "ignored"}
    assert slots["output_requirement"].startswith("Data Format: JSON\nData Structure:\n{")
    assert "output" not in slots


def test_compliance_example_json_message() -> None:
    """A JSON user message is the input: ticket id and intent recorded, raw text left out."""
    messages = [{"role": "user", "content": json.dumps(TICKET)}]
    recorded = record_user(["input.ticket_id", "input.intent"], messages)
    assert recorded == "[input.ticket_id]:\nT-1001\n[input.intent]:\nrefund"


def test_compliance_example_agently_prompt() -> None:
    """The same ticket sent as an Agently ``[INPUT]:`` section records the same text."""
    content = "[INPUT]:\n" + yaml.safe_dump(TICKET, allow_unicode=True) + "\n[OUTPUT]:"
    recorded = record_user(["input.ticket_id", "input.intent"], [{"role": "user", "content": content}])
    assert recorded == "[input.ticket_id]:\nT-1001\n[input.intent]:\nrefund"


# --- structured request ---------------------------------------------------------------------


def test_plain_text_message_is_the_input() -> None:
    """A user message that is neither JSON nor a rendered prompt is the input as text."""
    assert record_user(["input", "lang"], [{"role": "user", "content": "hello: world? no"}]) == (
        "[input]:\nhello: world? no"
    )


def test_scalar_and_date_section_bodies_stay_text() -> None:
    """A section body YAML would read as a bool or a date stays the text the client sent."""
    content = "[INSTRUCT]:\nno\n\n[INPUT]:\nwhen: 2024-01-01\nat: '12:30'\n\n[OUTPUT]:"
    slots = build_request_view({"messages": [{"role": "user", "content": content}]}).slots
    assert slots["instruct"] == "no"
    assert slots["input"] == {"when": "2024-01-01", "at": "12:30"}


def test_yaml_aliases_are_not_expanded() -> None:
    """A section body using YAML aliases stays text, so a small request cannot expand into a huge value."""
    content = "[INPUT]:\na: &x [1, 2]\nb: *x\n\n[INSTRUCT]:\nstars: '*bold*'\n"
    slots = build_request_view({"messages": [{"role": "user", "content": content}]}).slots
    assert slots == {"input": "a: &x [1, 2]\nb: *x", "instruct": {"stars": "*bold*"}}


def test_info_lines_keep_comments_literals_and_continuations() -> None:
    """Agently's ``- title: content`` info lines are read verbatim, Python literals read back."""
    content = (
        "[INFO]:\n- task: Fix #12: now\n- limits: {'max': 3}\n- count: 7\n"
        "- note: line one\nline two\n\n[OUTPUT]:"
    )
    info = build_request_view({"messages": [{"role": "user", "content": content}]}).slots["info"]
    assert info == {"task": "Fix #12: now", "limits": {"max": 3}, "count": 7, "note": "line one\nline two"}


def test_info_list_of_lines_stays_a_list() -> None:
    """An info section of plain ``- line`` items is a list of strings."""
    content = "[INFO]:\n- be kind\n- be brief\n\n[INPUT]:\nhi\n"
    slots = build_request_view({"messages": [{"role": "user", "content": content}]}).slots
    assert slots == {"info": ["be kind", "be brief"], "input": "hi"}


def test_custom_and_multiword_sections_become_slots() -> None:
    """Any ``[NAME]:`` header makes a slot, lower-cased with underscores."""
    content = "[ACTION RESULTS]:\nsearch:\n  hits: 3\n\n[my_extra]:\n- a\n- b\n\n[INPUT]:\nx\n"
    slots = build_request_view({"messages": [{"role": "user", "content": content}]}).slots
    assert slots == {"action_results": {"search": {"hits": 3}}, "my_extra": ["a", "b"], "input": "x"}


def test_content_part_lists_are_joined() -> None:
    """An OpenAI content-part list contributes its text parts, joined by a newline."""
    parts = [
        {"type": "text", "text": '{"lang": '},
        {"type": "image_url", "image_url": {"url": "data:x"}},
        {"type": "text", "text": '"de"}'},
    ]
    assert content_text(parts) == '{"lang": \n"de"}'
    assert record_user(["lang"], [{"role": "user", "content": parts}]) == "[lang]:\nde"


def test_memo_header_from_the_client_is_client_text() -> None:
    """A ``[CHAT SESSION MEMO]:`` section in the client's message is client text: recorded whole
    under null keys, a ``chat_session_memo`` slot under keyed policies (the gateway's own memo
    never reaches the body the record reads)."""
    content = "[CHAT SESSION MEMO]:\nfacts:\n- code X-1\n\n[INPUT]:\n" + json.dumps({"lang": "fr"})
    messages = [{"role": "user", "content": content}]
    assert record_user(["input"], messages) == "[input]:\nlang: fr"
    assert record_user(["chat_session_memo"], messages) == "[chat_session_memo]:\nfacts:\n- code X-1"
    assert record_user(None, messages) == content


def test_text_after_a_memo_header_and_blank_lines_is_kept() -> None:
    """Blank lines after a memo header remove nothing: the whole message is the input."""
    content = "[CHAT SESSION MEMO]:\nline one\n\nline two\n\nquestion"
    view = build_request_view({"messages": [{"role": "user", "content": content}]})
    assert render_user(None, view.messages, view) == content
    assert view.slots == {"chat_session_memo": "line one\n\nline two\n\nquestion"}


def test_system_messages_are_joined() -> None:
    """``.agent.system`` holds every system (or developer) message's text joined by a newline."""
    messages = [
        {"role": "system", "content": "A"},
        {"role": "developer", "content": [{"type": "text", "text": "B"}]},
        {"role": "user", "content": "q"},
    ]
    assert record_user([".agent.system"], messages) == "[.agent.system]:\nA\nB"


def test_new_messages_follow_the_last_assistant() -> None:
    """The new input is the messages after the last assistant message but the leading system
    prompt; a system message after the prompt is new input, marked as one."""
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "old"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": "new"},
        {"role": "system", "content": "late system"},
        {"role": "tool", "tool_call_id": "t1", "content": "result"},
    ]
    assert [m["content"] for m in new_messages(messages)] == ["new", "[system message]:\nlate system", "result"]
    assert new_messages(messages[:2]) == [messages[1]]
    assert input_text(messages) == "new\n\n[system message]:\nlate system\n\nresult"
    assert input_text(messages[:3]) == "old"  # a final assistant message is a prefill, not history
    assert input_text([messages[0], messages[2]]) is None


def test_slots_are_read_from_the_user_turn_not_a_built_in_item() -> None:
    """A built-in tool's item after the user's message (a Responses ``mcp_call``, recorded as user
    content marked ``tool_output``) is no user turn: the slots still come from the user's message,
    so an item cannot stand in for the ticket a keyed policy records."""
    messages = [{"role": "user", "content": "[INPUT]:\nticket: T-9"},
                {"role": "user", "content": '{"type": "mcp_call", "ticket": "FORGED"}', "tool_output": True}]
    assert record_user(["input.ticket"], messages) == "[input.ticket]:\nT-9"


def test_tool_round_has_no_user_slots() -> None:
    """A request whose new messages are only tool results has no structured input to record."""
    messages = [
        {"role": "user", "content": '{"lang": "en"}'},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "tool_call_id": "t1", "content": "42"},
    ]
    assert record_user(["lang"], messages) is None
    assert record_user(None, messages) == "42"


def test_missing_keys_are_skipped_and_none_found_records_nothing() -> None:
    """Keys that are not found are left out; when none is found no user message is recorded."""
    messages = [{"role": "user", "content": json.dumps(TICKET)}]
    assert record_user(["nope", "intent", "also.nope"], messages) == "[intent]:\nrefund"
    assert record_user(["nope"], messages) is None
    assert record_user([], messages) is None


def test_view_is_built_lazily() -> None:
    """Keys on the raw body never parse the prompt."""
    view = build_request_view({"model": "m", "messages": SPEC_MESSAGES})
    assert render_user(keys(".request.model", "$.model"), SPEC_MESSAGES, view) == (
        "[.request.model]:\nm\n[$.model]:\nm"
    )
    assert "slots" not in vars(view)


def test_structured_values_are_yaml() -> None:
    """Dicts and lists are written as YAML, scalars as text, in key order."""
    data = {"customer": {"name": "Zoë", "tags": ["a", "b"]}, "ok": True, "n": 1.5, "none": None}
    recorded = record_user(["customer", "ok", "n", "none"], [{"role": "user", "content": json.dumps(data)}])
    assert recorded == "[customer]:\nname: Zoë\ntags:\n- a\n- b\n[ok]:\nTrue\n[n]:\n1.5\n[none]:\nNone"


# --- replies --------------------------------------------------------------------------------


def test_fenced_json_replies_are_parsed() -> None:
    """A reply in a ```json fence, or in the first fence of another kind, is parsed as JSON."""
    fenced = reply('Here:\n```json\n{"summary": "s"}\n```\nbye')
    other = reply('Sure\n```\n{"summary": "t"}\n```\n```python\nx = 1\n```')
    prefer_json = reply('```text\nnot json\n```\n```JSON\n{"summary": "u"}\n```')
    assert render_reply(keys("summary"), fenced) == "[summary]:\ns"
    assert render_reply(keys("summary"), other) == "[summary]:\nt"
    assert render_reply(keys("summary"), prefer_json) == "[summary]:\nu"


AGENTLY_READS = [
    '{"resolution": "refund", "risk_level": 1} Let me know if you need anything else.',
    'Here you go: {"resolution": "refund", "risk_level": 2}',
    '{"resolution": "refund", "risk_level": 3,}',
    "Sure! {'resolution': 'refund', 'risk_level': 4} Anything else?",
    'Result:\n{"resolution": "a } in a string", "risk_level": 5}\nDone.',
    '[{"resolution": "x", "risk_level": 6}] trailing words',
]


@pytest.mark.parametrize("text", AGENTLY_READS)
def test_a_reply_with_json_in_it_is_read_as_agently_reads_it(text: str) -> None:
    """JSON with text before or after it, or written as JSON5 (a trailing comma, single quotes),
    is what Agently's ``get_data()`` reads, and what its session records under reply keys: it
    was recorded as nothing, so the next turn's window lost the reply the client acted on."""
    from agently.core.model.StructuredOutputParser import parse_json_output

    from gateway.session.record import parse_reply_json
    schema = {"resolution": (str,), "risk_level": (int,)}
    agently = parse_json_output(text, [schema] if text.lstrip().startswith("[") else schema, lambda _: None)[1]
    assert parse_reply_json(text) == agently
    data = agently[0] if isinstance(agently, list) else agently
    if isinstance(data, dict) and not text.lstrip().startswith("["):
        assert render_reply(keys("resolution", "risk_level"), reply(text)) == (
            f"[resolution]:\n{data['resolution']}\n[risk_level]:\n{data['risk_level']}")


def test_non_json_reply_records_nothing_for_reply_keys() -> None:
    """With reply keys, a reply that is not JSON records no assistant message."""
    assert render_reply(keys("summary"), reply("just words {not json}")) is None
    assert render_reply(keys("summary"), reply(None)) is None
    assert render_reply(keys("summary"), reply('{"other": 1}')) is None


def test_null_reply_keys_record_the_whole_reply() -> None:
    """Without reply keys the whole reply text is recorded, and an empty reply records nothing."""
    assert render_reply(None, reply("Hello!\n```json\n{}\n```")) == "Hello!\n```json\n{}\n```"
    assert render_reply(None, reply("")) is None


TOOL_CALLS = [
    {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": [1, 2]}'},
    },
    {"id": "call_2", "type": "function", "function": {"name": "noop", "arguments": "not json"}},
]


def test_tool_call_arguments_are_addressable() -> None:
    """Tool calls resolve as ``tool_calls[i].function.name`` and ``...arguments.<x>``, arguments parsed."""
    view = reply(None, TOOL_CALLS)
    recorded = render_reply(
        keys(
            "tool_calls[0].function.name",
            "tool_calls[0].function.arguments.city",
            "tool_calls[*].id",
            "tool_calls/1/function/arguments",
            "tool_calls[0].function.arguments.days[1]",
        ),
        view,
    )
    assert recorded == (
        "[tool_calls[0].function.name]:\nget_weather\n[tool_calls[0].function.arguments.city]:\nOslo\n"
        "[tool_calls[*].id]:\n- call_1\n- call_2\n[tool_calls/1/function/arguments]:\nnot json\n"
        "[tool_calls[0].function.arguments.days[1]]:\n2"
    )
    assert TOOL_CALLS[0]["function"]["arguments"].startswith("{")  # the message itself is untouched


def test_json_content_and_tool_calls_both_resolve() -> None:
    """A reply with JSON content and tool calls finds content keys first, then tool-call keys."""
    view = reply('{"summary": "s"}', TOOL_CALLS[:1])
    assert render_reply(keys("summary", "tool_calls[0].function.name"), view) == (
        "[summary]:\ns\n[tool_calls[0].function.name]:\nget_weather"
    )


def test_tool_call_only_reply_without_keys_is_a_yaml_dump() -> None:
    """A reply that is only tool calls is recorded, without keys, as a YAML dump of the calls."""
    recorded = render_reply(None, reply(None, TOOL_CALLS[:1]))
    assert recorded is not None
    assert yaml.safe_load(recorded) == {
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Oslo", "days": [1, 2]}},
            }
        ]
    }
    assert render_reply(None, reply("Calling.", TOOL_CALLS[:1])).startswith("Calling.\n\ntool_calls:\n")


def test_jsonpath_reply_key_records_without_json_content() -> None:
    """A JSONPath reply key reads the raw reply, so it records even when the content is not JSON."""
    message = {"role": "assistant", "content": "words"}
    view = build_reply_view(message, {"choices": [{"message": message}], "usage": {"total_tokens": 12}})
    assert render_reply(keys("$.usage.total_tokens", "summary"), view) == "[$.usage.total_tokens]:\n12"


# --- Agently's formatting and lengths ---------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["text", "", 0, 3.25, True, None, {"a": [1, {"b": "ü"}]}, ["x", 2], {"z": 1, "a": 2}, "multi\nline"],
)
def test_format_value_matches_agently(value: Any) -> None:
    """Values are written exactly as Agently's ``_format_session_value`` writes them."""
    assert format_value(value) == Session._format_session_value(value)


def test_format_keyed_matches_agently() -> None:
    """Blocks are joined and stripped exactly as Agently's ``_format_session_keyed_content`` does."""
    items = [("a", "  padded  "), ("b", {"k": [1]}), ("c", False), ("d", "tail\n")]
    assert format_keyed(items) == Session._format_session_keyed_content(items)


@pytest.mark.parametrize(
    "message",
    [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": 'it\'s "quoted"\nand ü'},
        {"content": "no role"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "u"}}],
        },
        {"role": "tool", "content": "42", "tool_call_id": "call_1", "name": "f"},
    ],
)
def test_message_length_matches_agently(message: dict) -> None:
    """A message's length is Agently's ``len(str(ChatMessage.model_dump()))``."""
    assert message_length(message) == len(str(ChatMessage(**message).model_dump()))


def test_context_length_sums_messages() -> None:
    """The context length is the sum of the message lengths."""
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "bb"}]
    assert context_length(messages) == sum(len(str(ChatMessage(**m).model_dump())) for m in messages)


# --- against a real Agently client ------------------------------------------------------------


async def _agently_round(
    build: Callable[[Any], Any], input_keys: list[str], reply_keys: list[str], reply_text: str
) -> tuple[dict, list[dict]]:
    """Run one Agently session round against a loopback upstream: the wire body and Agently's record."""
    captured: list[dict] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        captured.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for delta, finish in (({"role": "assistant", "content": reply_text}, None), ({}, "stop")):
            chunk = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        agent = Agently.create_agent()
        agent.set_settings(
            "OpenAICompatible", {"base_url": f"http://127.0.0.1:{port}/v1", "model": "m", "api_key": "k"}
        )
        agent.set_agent_prompt("system", "SYS-C")
        agent.set_settings("session.input_keys", input_keys)
        agent.set_settings("session.reply_keys", reply_keys)
        agent.activate_session(session_id="compat")
        await build(agent).async_get_data()
        recorded = [message.model_dump() for message in agent.activated_session.full_context]
    finally:
        await runner.cleanup()
    assert len(captured) == 1
    return captured[0], recorded


COMPAT_CASES = [
    (
        lambda agent: (
            agent.info({"task": "Summarize #0"})
            .instruct("be brief")
            .input({"lang": "en", "noise": "ignored"})
            .output({"summary": (str,), "scores": {"total": (int,)}})
        ),
        ["info.task", "input/lang", ".agent.system"],
        ["summary", "scores.total"],
        '{"summary": "short", "scores": {"total": 50}}',
    ),
    (
        lambda agent: agent.input(TICKET).output({"decision": (str,)}),
        ["input.ticket_id", "input.intent"],
        ["decision"],
        '```json\n{"decision": "approve"}\n```',
    ),
    (
        lambda agent: (
            agent.info({"owner": "ops #2", "limits": {"max": 3}, "count": 7})
            .instruct(["be kind", "be brief"])
            # Agently writes [INPUT] with sorted keys, so only sorted dicts keep their order on the wire.
            .input(
                {
                    "at": "12:30",
                    "customer": {"name": "Zoë", "tags": ["vip", "eu"]},
                    "note": "yes",
                    "orders": [{"id": 1, "total": 9.5}, {"id": 2, "total": 3}],
                    "when": "2024-01-01",
                }
            )
            .output({"items": [{"id": (int,), "ok": (bool,)}], "meta": {"n": (int,)}})
        ),
        [
            "info",
            "instruct",
            "customer",
            "orders[*].id",
            "input/orders/1/total",
            "when",
            "note",
            "at",
            "input",
            "info.limits",
            "info.owner",
            "missing.key",
            ".execution.input.customer.name",
        ],
        ["items[*].id", "items/1/ok", "meta", "absent"],
        '{"items": [{"id": 1, "ok": true}, {"id": 2, "ok": false}], "meta": {"n": 2}}',
    ),
    (
        lambda agent: agent.input("plain question #1: why?"),
        ["input", ".agent.system", "lang"],
        ["summary"],
        "plain answer",
    ),
]


@pytest.mark.parametrize(("build", "input_keys", "reply_keys", "reply_text"), COMPAT_CASES)
def test_records_match_agently_on_the_wire(
    build: Callable[[Any], Any], input_keys: list[str], reply_keys: list[str], reply_text: str
) -> None:
    """For what a real Agently client sends, the gateway records the very round Agently records."""
    body, recorded = asyncio.run(_agently_round(build, input_keys, reply_keys, reply_text))
    view = build_request_view(body)
    user = render_user(keys(*input_keys), body["messages"], view)
    assistant = render_reply(
        keys(*reply_keys), build_reply_view({"role": "assistant", "content": reply_text}, None)
    )
    expected = [m["content"] for m in recorded]
    assert [text for text in (user, assistant) if text is not None] == expected
