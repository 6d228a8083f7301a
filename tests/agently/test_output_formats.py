"""Agently's non-JSON output formats (``.output({...}, format=...)``: ``flat_markdown``,
``hybrid``, ``xml_field``, ``yaml_literal``) are read as structured replies, as Agently's own
``Session`` reads them: each case runs the same turns through a local Agently ``Session`` (the
oracle) and through the gateway, and compares what each recorded."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.paths import compile_key
from gateway.session.record import build_reply_view, build_request_view, format_value, render_reply
from tests.agently.conftest import (
    Trace,
    agently_settings,
    assert_same_turns,
    comparable,
    export,
    gateway_agent,
    local_agent,
    local_session,
    write_policy,
)
from tests.conftest import Gateway, Upstream

MakeGateway = Callable[..., Gateway]

OUTPUT = {"resolution": (str, "what was done"), "risk": (str,)}

REPLIES = {
    "Structured Markdown": "### resolution\nrefund issued for {t}\n\n### risk\nlow",
    "Structured Markdown with JSON blocks": "### resolution\nrefund issued for {t}\n\n### risk\nlow",
    "XML-like field envelope": "<agently_output>\n<field name=\"resolution\" type=\"text\">\nrefund issued for {t}\n"
                               "</field>\n<field name=\"risk\" type=\"text\">\nlow\n</field>\n</agently_output>",
    "YAML literal document": "Here it is.\n<<<BEGIN AGENTLY_YAML>>>\nresolution: |\n  refund issued for {t}\n"
                             "risk: low\n<<<END AGENTLY_YAML>>>",
}
SESSION_RUNS = {"flat_markdown": True, "xml_field": False, "yaml_literal": False}
"""The formats whose replies Agently 4.1's own pipeline reads as its parser does, and the
``stream`` setting under which it does (streamed ``xml_field``/``yaml_literal`` and any ``hybrid``
reply come out of its pipeline as empty strings; the parser cases below cover them)."""


def reply_in_format(body: dict[str, Any]) -> str:
    """The stand-in's reply in the format the request's ``Data Format:`` line asks for, naming
    the ticket of its input."""
    prompt = body["messages"][-1]["content"]
    asked = re.findall(r"^Data Format: (.+)$", prompt, re.MULTILINE)[-1]
    ticket = re.findall(r"T-\d+", prompt)[-1]
    return REPLIES[asked].replace("{t}", ticket)


def turn(ticket: str, fmt: str) -> Callable[[Any], Any]:
    return lambda a: a.input({"ticket_id": ticket, "note": "charged twice"}).output(OUTPUT, format=fmt).get_data()


RECORDS = {"null reply keys": (None, "resolution: "),
           "reply keys": (["resolution", "risk"], "[resolution]:\nrefund issued for T-1")}
"""Each ``reply_keys`` setting and how the first reply's record begins, as Agently records it."""


@pytest.mark.parametrize("reply_keys, begins", RECORDS.values(), ids=RECORDS.keys())
@pytest.mark.parametrize(("fmt", "stream"), SESSION_RUNS.items())
def test_format_replies_are_recorded_as_agently_records_them(make_gateway: MakeGateway, upstream: Upstream,
                                                             tmp_path: Path, fmt: str, stream: bool,
                                                             reply_keys: list[str] | None, begins: str) -> None:
    """A reply in the format asked for is recorded as Agently's Session records it: under
    ``reply_keys: null`` as its data in YAML, under a list of keys as their blocks, read in that
    format; and the next turn sends the same history."""
    session = {"input_keys": ["input.ticket_id"], "reply_keys": reply_keys, "max_length": 12000}
    gateway = make_gateway(write_policy(tmp_path / "policies", **session))
    upstream.reply = reply_in_format
    local, via = Trace(), Trace()
    agent = local_agent(upstream, "fmt:1", agently_settings(session), stream=stream)
    for ticket in ("T-1", "T-2"):
        local.run(upstream, turn(ticket, fmt), agent)
    client = gateway_agent(gateway, "fmt:1", stream=stream)
    for ticket in ("T-1", "T-2"):
        via.run(upstream, turn(ticket, fmt), client)
    assert_same_turns(local, via)
    doc = export(gateway, "fmt:1")
    assert comparable(doc) == comparable(local_session(agent))
    assert doc["full_context"][1]["content"].startswith(begins)


@pytest.mark.parametrize(("fmt", "stream"), SESSION_RUNS.items())
def test_reply_keys_are_read_in_the_format_asked_for(upstream: Upstream, fmt: str, stream: bool) -> None:
    """Reply keys are read from a reply in the format the request asked for (the request view's
    output contract handed to the reply view): the same blocks Agently's Session records."""
    settings = {"input_keys": ["input.ticket_id"], "reply_keys": ["resolution", "risk"], "max_length": None}
    upstream.reply = reply_in_format
    agent = local_agent(upstream, "fmt:2", settings, stream=stream)
    turn("T-7", fmt)(agent)
    recorded = local_session(agent)["full_context"][1]["content"]
    body = upstream.requests[-1]
    contract = build_request_view(body).wants_structured
    assert contract is not None and contract.format == fmt
    message = {"role": "assistant", "content": reply_in_format(body)}
    keys = [compile_key(k) for k in settings["reply_keys"]]
    assert render_reply(keys, build_reply_view(message, None, contract)) == recorded
    assert recorded.startswith("[resolution]:\nrefund issued for T-7")


SCHEMA = {"resolution": (str, "what was done"), "tags": ([str],), "score": (int,)}
READS = {
    "flat_markdown": [
        '### resolution\nrefund\n\n### tags\n["a", "b"]\n\n### score\n3',
        'Sure.\n### resolution [text]\n```\nrefund\n```\n\n### score\n{"score": 3}\n### other\nx',
        "### resolution\n<!-- what was done -->\n\n### score\n3",
        '### tags\n{"tags": ["a"]}\n### resolution\n"quoted"',
        "### resolution\n<!-- (text) scaffold -->\nrefund",
        "no sections here",
        '{"resolution": "r", "score": 2}',
    ],
    "hybrid": [
        '### resolution\nrefund\n\n### tags\n```json\n["a"]\n```\n\n### score\n```json\n3\n```',
        '### resolution\nrefund\n### tags\n["a"]\n### score\n3',
        "### resolution\nrefund\n### tags\nnot json",
        '### score\n{"score": 4}\n### resolution\n<your description here>',
    ],
    "xml_field": [
        'Sure:\n<agently_output>\n<field name="resolution" type="text">\nrefund\n</field>\n'
        '<field name="tags" type="json">\n["a"]\n</field>\n<field name="extra" type="text">x</field>\n'
        '<field name="score" type="json">3</field>\n</agently_output>\nDone',
        '<agently_output>\n<field name="score" type="json">three</field>\n</agently_output>',
        '<AGENTLY_OUTPUT><field name=\'resolution\' type="TEXT">a</field></agently_output>',
        "<agently_output>no fields</agently_output>",
    ],
    "yaml_literal": [
        "<<<BEGIN AGENTLY_YAML>>>\nresolution: |\n  refund\n  issued\ntags:\n  - a\nscore: 3\n<<<END AGENTLY_YAML>>>",
        "Here:\n```yaml\nresolution: refund\nscore: 3\n```",
        "<<<BEGIN AGENTLY_YAML>>>\n- a\n- b\n<<<END AGENTLY_YAML>>>",
        "resolution: refund",
    ],
}


def agently_reads(text: str, fmt: str) -> Any:
    """What Agently's parser makes of *text* under *fmt*: the format's reader, else (as its
    response parser does) a JSON object found in the text."""
    from agently.core.model.StructuredOutputParser import parse_output_contract_dict

    parsed, _ = parse_output_contract_dict(text, output_schema=SCHEMA, output_format=fmt)
    if parsed is None:
        parsed, _ = parse_output_contract_dict(text, output_schema=SCHEMA, output_format="json")
    return parsed


@pytest.mark.parametrize(("fmt", "text"), [(fmt, text) for fmt, texts in READS.items() for text in texts])
def test_replies_are_read_as_agentlys_parser_reads_them(fmt: str, text: str) -> None:
    """The gateway reads a reply in each format (fields, fences, placeholders, a wrapped value, a
    reply that does not parse) as Agently's own parser does, from the prompt Agently renders."""
    from agently import Agently

    request = Agently.create_agent().create_request()
    request.input({"ticket_id": "T-1"}).output(SCHEMA, format=fmt)
    view = build_request_view({"messages": request.prompt.to_messages()})
    contract = view.wants_structured
    assert contract is not None and contract.format == fmt
    reply = build_reply_view({"role": "assistant", "content": text}, None, contract)
    assert reply.data == agently_reads(text, fmt)
    expected = format_value(agently_reads(text, fmt)) if agently_reads(text, fmt) is not None else text
    assert render_reply(None, build_reply_view({"role": "assistant", "content": text}), contract) == expected
