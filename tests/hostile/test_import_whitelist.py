"""An import is held to the session's policy: under keyed policies only messages in recorded form
(and a memo where the policy keeps one) are taken; anything else is a 422 naming the message, and
nothing of it reaches the store or an export. Under null keys any text goes, and tool calls,
tool results and media parts come back only as the policy's tools and media settings record them."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.session.record import format_keyed
from gateway.session.whitelist import in_recorded_form
from tests.conftest import ACME_KEY, AUDITOR_TOKEN, Gateway, Upstream

CANARY = "CANARY-7e1d-IMPORT-4111111111111111"
AUTH = {"Authorization": f"Bearer {ACME_KEY}"}
AUDITOR = {"Authorization": f"Bearer {AUDITOR_TOKEN}"}

KEYED = """\
id: keyed
priority: 20
match: {tenants: [acme], session_ids: ["keyed:*"]}
session:
  input_keys: ["input.ticket_id", "input.intent"]
  reply_keys: ["resolution", "risk_level"]
  bounding: {strategy: simple_cut}
"""
KEYED_MEMO = """\
id: keyed-memo
priority: 30
match: {tenants: [acme], session_ids: ["memo:*"]}
session:
  input_keys: ["input.ticket_id"]
  reply_keys: []
  bounding: {strategy: summarize}
"""
USER_ONLY_KEYED = """\
id: user-keyed
priority: 40
match: {tenants: [acme], session_ids: ["userkeyed:*"]}
session:
  input_keys: ["input.ticket_id"]
  reply_keys: null
"""
DEFAULT = """\
id: default
session: {input_keys: null, reply_keys: null}
"""
TOOLS_DROP = """\
id: tools-drop
priority: 50
match: {tenants: [acme], session_ids: ["toolsdrop:*"]}
session: {input_keys: null, reply_keys: null, tools: {results: drop}}
"""
TOOLS_REDACT = """\
id: tools-redact
priority: 50
match: {tenants: [acme], session_ids: ["toolsredact:*"]}
session: {input_keys: null, reply_keys: null, tools: {arguments: redact, results: redact}}
"""
MEDIA_KEEP = """\
id: media-keep
priority: 50
match: {tenants: [acme], session_ids: ["mediakeep:*"]}
session: {input_keys: null, reply_keys: null, media: {parts: keep, max_bytes: 200}}
"""


@pytest.fixture
def gw(make_gateway, tmp_path: Path) -> Gateway:
    folder = tmp_path / "policies"
    folder.mkdir()
    for name, text in (("keyed", KEYED), ("keyed-memo", KEYED_MEMO), ("user-keyed", USER_ONLY_KEYED),
                       ("default", DEFAULT), ("tools-drop", TOOLS_DROP), ("tools-redact", TOOLS_REDACT),
                       ("media-keep", MEDIA_KEEP)):
        (folder / f"{name}.yaml").write_text(text)
    return make_gateway(folder)


def put(gw: Gateway, sid: str, doc: Any) -> httpx.Response:
    body = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return httpx.put(f"{gw.base_url}/sessions/{sid}", content=body, headers=AUTH, timeout=30)


def session_doc(full: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": "x", "auto_resize": True, "full_context": full, **extra}


def user(text: Any) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


GOOD_USER = "[input.ticket_id]:\nT-1001\n[input.intent]:\nrefund"
GOOD_REPLY = "[resolution]:\nrefund issued\n[risk_level]:\nlow"


def assert_refused(r: httpx.Response, where: str) -> None:
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["code"] == "import_not_whitelisted" and error["type"] == "invalid_request_error"
    assert where in error["message"]
    assert CANARY not in r.text


def everything_written(gw: Gateway) -> bytes:
    """Every file the gateway wrote (database, logs, checkpoints), plus a fresh admin export."""
    export = httpx.get(f"{gw.url}/admin/export", params={"tenant": "acme"}, headers=AUDITOR, timeout=30)
    blobs = [export.content]
    if export.status_code == 200:
        with tarfile.open(fileobj=io.BytesIO(export.content)) as tar:
            blobs += [tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()]  # type: ignore[union-attr]
    blobs += [p.read_bytes() for p in gw.dir.rglob("*") if p.is_file()]
    return b"".join(blobs)


@pytest.mark.parametrize(("doc", "where"), [
    (session_doc([user(f"my card is {CANARY}")]), "full_context[0]"),
    (session_doc([user(GOOD_USER), assistant(GOOD_REPLY), user(f"[input.card]:\n{CANARY}")]), "full_context[2]"),
    (session_doc([user(f"[input.ticket_id]:\nT-1\n[input.card]:\n{CANARY}")]), "full_context[0]"),
    (session_doc([user(f"{GOOD_USER}\n\n{CANARY}\n[input.intent]:\nx")]), "full_context[0]"),
    (session_doc([user(f"[input.intent]:\nrefund\n[input.ticket_id]:\n{CANARY}")]), "full_context[0]"),  # order
    (session_doc([user(GOOD_USER), assistant(f"{CANARY}")]), "full_context[1]"),
    (session_doc([{"role": "system", "content": CANARY}]), "full_context[0]"),
    (session_doc([{"role": "tool", "tool_call_id": "t1", "content": GOOD_USER}]), "full_context[0]"),
    (session_doc([user([{"type": "text", "text": CANARY}])]), "full_context[0]"),
    (session_doc([user(GOOD_USER)], context_window=[user(CANARY)]), "context_window[0]"),
    (session_doc([user(GOOD_USER)], memo=f"remember {CANARY}"), "memo"),
    (session_doc([user(" " + GOOD_USER)]), "full_context[0]"),
])
def test_keyed_policy_refuses_what_it_would_not_record(gw: Gateway, doc: dict[str, Any], where: str) -> None:
    """Each document holding something outside the whitelist gets 422 naming where, and the canary
    reaches neither the store, the logs nor an export."""
    assert_refused(put(gw, "keyed:t1", doc), where)
    assert httpx.get(f"{gw.base_url}/sessions/keyed:t1", headers=AUTH).status_code == 404
    assert CANARY.encode() not in everything_written(gw)


def test_recorded_form_round_trips(gw: Gateway, upstream: Upstream) -> None:
    """What the gateway recorded under a keyed policy, exported, erased and imported again, is accepted
    as it is; the policy's own session_settings are kept, not the document's."""
    upstream.reply = lambda body: '{"resolution": "refund issued", "risk_level": "low", "note": "' + CANARY + '"}'
    client = gw.openai(session="keyed:rt")
    for n in range(2):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": orjson.dumps(
            {"ticket_id": f"T-{n}", "intent": "refund", "raw_text": CANARY}).decode()}])
    exported = httpx.get(f"{gw.base_url}/sessions/keyed:rt", headers=AUTH).json()
    assert [m["content"] for m in exported["full_context"]][:2] == [
        "[input.ticket_id]:\nT-0\n[input.intent]:\nrefund", "[resolution]:\nrefund issued\n[risk_level]:\nlow"]
    assert httpx.delete(f"{gw.base_url}/sessions/keyed:rt", headers=AUTH).status_code == 200
    exported["session_settings"] = {"max_length": 5, "smuggled": CANARY}
    r = put(gw, "keyed:rt", exported)
    assert r.status_code == 200, r.text
    assert r.json()["imported_messages"] == 4
    again = httpx.get(f"{gw.base_url}/sessions/keyed:rt", headers=AUTH).json()
    assert again["full_context"] == exported["full_context"]
    assert again["session_settings"]["input_keys"] == ["input.ticket_id", "input.intent"]
    assert CANARY not in orjson.dumps(again).decode()
    assert CANARY.encode() not in everything_written(gw)


def test_empty_key_lists_take_no_messages_and_keyed_policies_take_no_memo(gw: Gateway) -> None:
    """``reply_keys: []`` refuses any assistant message. A memo is free text the whitelist cannot
    vet, so a keyed policy refuses an imported one even when it summarizes into a memo itself."""
    assert_refused(put(gw, "memo:a", session_doc([user("[input.ticket_id]:\nT-1"), assistant("[x]:\ny")])),
                   "full_context[1]")
    assert_refused(put(gw, "memo:a", session_doc([user("[input.ticket_id]:\nT-1")], memo={"summary": CANARY})),
                   "memo")
    r = put(gw, "memo:a", session_doc([user("[input.ticket_id]:\nT-1")]))
    assert r.status_code == 200, r.text
    assert httpx.get(f"{gw.base_url}/sessions/memo:a", headers=AUTH).json()["memo"] is None


def test_a_side_with_null_keys_takes_any_text(gw: Gateway) -> None:
    """With input_keys keyed and reply_keys null, assistant messages may be any text."""
    r = put(gw, "userkeyed:a", session_doc([user("[input.ticket_id]:\nT-1"), assistant("free text reply")]))
    assert r.status_code == 200, r.text
    assert_refused(put(gw, "userkeyed:b", session_doc([user(CANARY), assistant("x")])), "full_context[0]")


def test_null_keys_take_anything_as_before(gw: Gateway) -> None:
    """Under a null-keys policy an import is stored whole, as today."""
    doc = session_doc([user(f"hello {CANARY}"), assistant("hi"), {"role": "system", "content": "s"}],
                      memo="a memo")
    r = put(gw, "acme:free", doc)
    assert r.status_code == 200, r.text
    assert httpx.get(f"{gw.base_url}/sessions/acme:free", headers=AUTH).json()["full_context"][0]["content"] \
        == f"hello {CANARY}"


# --- structure under null keys: tool calls, tool results and media parts ------------------------

def call(arguments: str, call_id: str = "call_1") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": "lookup", "arguments": arguments}}


def tool_round(arguments: str, result: Any) -> list[dict[str, Any]]:
    return [user("look it up"), {"role": "assistant", "content": None, "tool_calls": [call(arguments)]},
            {"role": "tool", "tool_call_id": "call_1", "content": result}, assistant("found it")]


IMAGE = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{CANARY}"}}


@pytest.mark.parametrize(("sid", "doc", "where", "says"), [
    ("toolsdrop:a", session_doc(tool_round('{"q": "x"}', "r")), "full_context[1]", "session.tools"),
    ("toolsredact:a", session_doc(tool_round(f'{{"card": "{CANARY}"}}', "[redacted tool result]")),
     "full_context[1]", "arguments: redact"),
    ("toolsredact:b", session_doc(tool_round('{"redacted": true}', f"card {CANARY}")), "full_context[2]",
     "results: redact"),
    ("toolsredact:c", session_doc([user("look"), {"role": "assistant", "content": None, "reasoning": [
        {"type": "thinking", "thinking": f"the card is {CANARY}", "signature": "sig"}],
        "tool_calls": [call('{"redacted": true}')]}]), "full_context[1]", "thinking"),
    ("keyed:tools", session_doc([user(GOOD_USER), {"role": "assistant", "content": GOOD_REPLY,
                                                   "tool_calls": [call(CANARY)]}]), "full_context[1]", "keyed"),
    ("acme:image", session_doc([user([{"type": "text", "text": "see"}, IMAGE])]), "full_context[0]",
     "placeholder"),
    ("mediakeep:big", session_doc([user([IMAGE | {"image_url": {"url": "data:image/png;base64," + "A" * 300}}]),
                                   assistant("ok")], context_window=[user([IMAGE])]), "full_context[0]",
     "at most 200 bytes"),
    ("acme:window", session_doc([user("hi")], context_window=[user([IMAGE])]), "context_window[0]", "media"),
])
def test_null_keys_hold_tools_and_media_to_the_policy(gw: Gateway, sid: str, doc: dict[str, Any], where: str,
                                                      says: str) -> None:
    """Under null keys an import may bring tool calls, results and media parts only as recording
    would have written them under the policy's ``tools`` and ``media`` settings."""
    r = put(gw, sid, doc)
    assert_refused(r, where)
    assert says in r.json()["error"]["message"]
    assert httpx.get(f"{gw.base_url}/sessions/{sid}", headers=AUTH).status_code == 404
    assert CANARY.encode() not in everything_written(gw)


def test_what_recording_writes_under_tools_and_media_settings_is_taken(gw: Gateway) -> None:
    """The marker under redact, a small media part under keep, and a tool round under the default
    policy are imported with their structure."""
    redacted = session_doc(tool_round('{"redacted": true}', "[redacted tool result]"))
    assert put(gw, "toolsredact:ok", redacted).status_code == 200
    small = session_doc([user([{"type": "text", "text": "see"}, {"type": "image_url",
                                                                 "image_url": {"url": "https://x/y.png"}}])])
    assert put(gw, "mediakeep:ok", small).status_code == 200
    assert put(gw, "acme:tools", session_doc(tool_round('{"q": "x"}', "r"))).status_code == 200
    got = httpx.get(f"{gw.base_url}/sessions/acme:tools", headers=AUTH).json()
    exported = tool_round('{"q": "x"}', "r")
    exported[1]["content"] = ""  # a message that is only tool calls, as an export writes it for Agently
    assert got["full_context"] == exported
    failed = tool_round('{"q": "x"}', "timeout")
    failed[2]["is_error"] = True  # an Anthropic tool result reporting a failure keeps its flag
    assert put(gw, "acme:tool-failed", session_doc(failed)).status_code == 200
    got = httpx.get(f"{gw.base_url}/sessions/acme:tool-failed", headers=AUTH).json()
    assert got["full_context"][2] == {"role": "tool", "tool_call_id": "call_1", "content": "timeout", "is_error": True}


@pytest.mark.parametrize(("message", "field"), [
    ({"role": "user", "content": "x", "tool_calls": [call("{}")]}, "full_context[0].tool_calls"),
    ({"role": "assistant", "content": None, "tool_calls": []}, "full_context[0].tool_calls"),
    ({"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]},
     "full_context[0].tool_calls[0]"),
    ({"role": "assistant", "content": None, "tool_calls": [{"id": 7, "type": "function",
                                                            "function": {"name": "f", "arguments": "{}"}}]},
     "full_context[0].tool_calls[0]"),
    ({"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                            "function": {"name": "f", "arguments": {}}}]},
     "full_context[0].tool_calls[0]"),
    ({"role": "assistant", "content": None, "tool_calls": "call"}, "full_context[0].tool_calls"),
    ({"role": "assistant", "content": None, "tool_calls": [call("{}")], "reasoning": [{"type": "thinking",
                                                                                       "thinking": "t"}]},
     "full_context[0].reasoning[0]"),
    ({"role": "assistant", "content": None, "tool_calls": [call("{}")], "reasoning": "t"},
     "full_context[0].reasoning"),
    ({"role": "user", "content": "x", "tool_call_id": "call_1"}, "full_context[0].tool_call_id"),
    ({"role": "tool", "content": "x", "tool_call_id": 5}, "full_context[0].tool_call_id"),
])
def test_a_malformed_tool_structure_is_a_400_naming_the_field(gw: Gateway, message: dict[str, Any],
                                                               field: str) -> None:
    r = put(gw, "acme:bad-tools", session_doc([message]))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_session" and f"'{field}'" in error["message"]


def test_appending_import_checks_only_what_it_adds(gw: Gateway) -> None:
    """An import into an existing keyed session checks the messages it appends."""
    assert put(gw, "keyed:grow", session_doc([user(GOOD_USER)])).status_code == 200
    assert_refused(put(gw, "keyed:grow", session_doc([user(GOOD_USER), assistant(CANARY)])), "full_context[1]")
    r = put(gw, "keyed:grow", session_doc([user(GOOD_USER), assistant(GOOD_REPLY)]))
    assert r.status_code == 200 and r.json()["imported_messages"] == 1


@pytest.mark.parametrize("values", [
    [("input.ticket_id", "T-1")],
    [("input.ticket_id", "T-1"), ("input.intent", {"kind": "refund", "items": [1, 2]})],
    [("input.intent", "multi\nline\ntext")],
    [("input.ticket_id", 42), ("input.intent", None)],
])
def test_what_recording_writes_is_in_recorded_form(values: list[tuple[str, Any]]) -> None:
    """``format_keyed`` output (what recording writes) passes the recorded-form check."""
    keys = ["input.ticket_id", "input.intent"]
    assert in_recorded_form(format_keyed(values), keys)
    assert not in_recorded_form(format_keyed(values) + "\n[input.other]:\nx", keys)
    assert not in_recorded_form(format_keyed(values), ["input.other"])


# --- lenient import: what Agently's load_json_session accepts (JSON5) ---------------------------

JSON5_DOCS = [
    # comments, trailing commas, single quotes, unquoted keys
    """{
      // exported by hand
      id: 'handoff-1',
      auto_resize: true,
      full_context: [
        {role: 'user', content: 'it\\'s "quoted" /* not a comment */',},
        {role: 'assistant', content: "line one\\nline two",},  /* trailing comma next */
      ],
      memo: {topic: 'refunds', count: 0x10, ratio: .5, big: +1e3,},
    }""",
    # line continuation, \\x and \\u escapes, unicode, single-quoted keys
    """{'full_context': [{'role': 'user', 'content': 'caf\\xe9 \\u00e9t\\u00e9 \\
continued'}], 'memo': 'm',}""",
    # a BOM, whitespace JSON5 allows, context_window given separately
    "\ufeff{full_context:[{role:'user',content:'a'},{role:'assistant',content:'b'}],"
    "\u00a0context_window:[{role:'assistant',content:'b'},],session_settings:{max_length: 4000,},}",
    # plain JSON still works
    '{"full_context": [{"role": "user", "content": "plain"}], "memo": null}',
]
JSON5_BAD = [
    "{memo: " + "9" * 5000 + ", full_context: []}",
    "{full_context: [}", "{a: b}", "{,}", "[1,,]", "{'a' 1}", "{full_context: [1 2]}", "{/* open",
    "not json at all",
]


def _agently(text: str) -> dict[str, Any]:
    from agently.core.session.Session import Session
    return Session().load_json_session(text).to_serializable_session_data()


@pytest.mark.parametrize("text", JSON5_DOCS)
def test_json5_documents_import_as_agently_loads_them(gw: Gateway, text: str) -> None:
    """A document Agently's own loader accepts is accepted, and stored as Agently reads it."""
    expected = _agently(text)
    r = put(gw, "acme:j5", text.encode())
    assert r.status_code == 200, r.text
    got = httpx.get(f"{gw.base_url}/sessions/acme:j5", headers=AUTH).json()
    for field in ("full_context", "context_window", "memo", "auto_resize"):
        assert got[field] == expected[field], field


@pytest.mark.parametrize("text", JSON5_BAD)
def test_what_agently_refuses_is_a_400(gw: Gateway, text: str) -> None:
    """A document Agently's loader refuses gets 400 in OpenAI's shape, without echoing it."""
    with pytest.raises((ValueError, TypeError)):
        _agently(text)
    r = put(gw, "acme:bad", text.encode())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_json5_keeps_the_depth_and_size_limits(make_gateway, tmp_path: Path) -> None:
    """JSON5 nested past the depth limit gets 400; a JSON5 body over the size limit gets 413; a large
    JSON5 document within the limits is read (without the json5 package's minute-long parse)."""
    gw = make_gateway(name="limits", server={"max_body_bytes": 2 * 1024 * 1024})
    deep = "{memo: " + "[" * 300 + "]" * 300 + ", full_context: [],}"
    r = put(gw, "acme:deep", deep.encode())
    assert r.status_code == 400 and "deeper" in r.json()["error"]["message"]
    message = "{role: 'user', content: '" + "x" * 200 + "',},\n"
    big = ("{full_context: [" + message * 9500 + "],}").encode()
    assert len(big) > 2 * 1024 * 1024
    assert put(gw, "acme:big", big).status_code == 413
    fits = ("{full_context: [ // many\n" + message * 8000 + "],}").encode()
    r = httpx.put(f"{gw.base_url}/sessions/acme:fits", content=fits, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["imported_messages"] == 8000


LOADER_CASES = [
 "{a:1,}", "{'a':'b',}", "[1,2,3,]", "// c\n{\"x\": 1 /* y */}",
 "{a: .5, b: 5., c: +1, d: 0x1F, f: Infinity, g: -Infinity, h: NaN}",
 "{'it\\'s': 'say \"hi\"'}", "{s: 'line\\\ncont'}", "{s: '\\x41\\u0042\\v\\0\\q'}", "{$_x1: 1, _y: 2}", "\ufeff{a:1}",
 "{a: [ {b: 'c',}, ], }", "{a:1 b:2}", "{,}", "[,]", "[1,,]", "{a:b}", "{'a' 1}", "{a:1}}", "[1 2]",
 "{\"a\":\"\\u00e9\"}",
 "{a: 'tab\there'}", "{a: 1e3, b: 1.5E-2, c: 5.e3}", "{Infinity: 1, NaN: 2, null: 3, true: 4}",
 "{a: \"q'\"}", "{/*c*/a/*d*/:/*e*/1/*f*/}", "{a: 01}", "{a: '\\\r\nz'}", "'str'", "{a: -0}", "{a: 1.}", "{a:'\\\\'}",
 "{\"full_context\": [{role: 'user', content: 'hi',},],}", "[a]", "[1, a]", "{a: b: c}", "[a: 1]", "{a:,}", "{a:1,,}",
 "{a // c\n : 1}", "{trueish: true, nullx: null}", "[true, false, null,]", "{a: '// not comment', b: \"/* no */\"}",
 "{a: 1.5.3}", "{a: +.5, b: -.5, c: +5., d: 0.5e+2, e: +Infinity, f: -NaN}", "{a: 0X1f}", "[+]", "[.]", "[0x]",
 "{a: 'x\\'}", "{a /* c */ : 'v'}", "{\"a\": 1, 'b': [ /* */ ], c: {}, }", "[[],[],]", "{a:[,1]}", "/* only */",
 "{a: \"multi\\\nline\"}", "{ a : 1 , }", "{ 'x' : 'y' , // z\n }", "[1,\n// c\n]", "{a:'\u00e9\u4e2d'}", "{a:1}/*",
 "{a: 'unterminated}", "{a: \"x\ny\"}", "{a: '\\u12'}", "[-Infinity, Infinity, NaN]", "{a: 1e}", "{café: 1}",
]


@pytest.mark.parametrize("text", LOADER_CASES)
def test_json5_reading_matches_agentlys_loader(text: str) -> None:
    """On each document, the gateway's JSON5 reader gives what ``json5.loads`` (the loader behind
    Agently's ``load_json_session``) gives, or refuses what it refuses."""
    import math

    import json5

    from gateway.session.lenient_json import JSON5Error, loads_json5

    try:
        expected: Any = json5.loads(text)
    except ValueError:
        with pytest.raises(JSON5Error):
            loads_json5(text)
        return
    got = loads_json5(text)
    assert repr(got) == repr(expected)
    assert not isinstance(got, float) or math.isnan(got) == math.isnan(expected)


@pytest.mark.parametrize(("field", "line"), [
    ("full_context", 1), ("full_context[0]", 1), ("full_context[1]", 2), ("full_context[1].content", 3),
    ("full_context[1].content[1]", 4), ("memo", 7), ("full_context[2]", None), ("full_context[1].nope", None),
    ("memo.x", None),
])
def test_line_of_finds_where_a_field_starts(field: str, line: int | None) -> None:
    """``line_of`` walks strict JSON (strings holding brackets, commas and escaped quotes too)."""
    from gateway.session.lenient_json import line_of
    text = ('{"id": "a,]}\\"x", "full_context": [{"role": "user", "content": "[{,"},\n'
            '  {"role": "assistant",\n   "content": [\n     1, {"k": ["v", 2]}]}\n  ],\n'
            '  "memo":\n  "m"}')
    assert line_of(text, field) == line
    assert line_of("{full_context: [1]}", "full_context[0]") is None  # JSON5: not mapped
