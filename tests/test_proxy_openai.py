"""The real ``openai`` SDK through the gateway to the stand-in upstream (SPEC §1 "Injection", §2).

What the upstream received (``upstream.requests``) is the proof: the session's context window is
injected after the system message on later turns, client-managed history is never doubled, the
memo lands at the start of the final user message, and the client's gateway key never leaves
the gateway.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.session.record import context_length
from gateway.standin import make_app
from tests.conftest import ACME_KEY, Gateway, Upstream, _Server

SYSTEM = {"role": "system", "content": "You are terse."}
UPSTREAM_KEY = "sk-upstream-test-key"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def export(gateway: Gateway, session: str, key: str = ACME_KEY) -> dict[str, Any]:
    resp = httpx.get(f"{gateway.base_url}/sessions/{session}", headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 200, resp.text
    return resp.json()


def count_rounds(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT count(*) FROM rounds").fetchone()[0])
    finally:
        conn.close()


def test_sync_sdk_injects_the_window_after_the_system_message(gateway: Gateway, upstream: Upstream) -> None:
    """Turn 2 and 3 forward the earlier rounds after the system message and before the new one."""
    client = gateway.openai(session="alice")
    replies = []
    for text in ("my name is Alice", "what is my name?", "and again?"):
        reply = client.chat.completions.create(model="standin", messages=[SYSTEM, user(text)])
        replies.append(reply.choices[0].message.content)
    first, second, third = (r["messages"] for r in upstream.requests)
    assert first == [SYSTEM, user("my name is Alice")]
    assert second == [SYSTEM, user("my name is Alice"), assistant(replies[0]), user("what is my name?")]
    assert third == [SYSTEM, user("my name is Alice"), assistant(replies[0]), user("what is my name?"),
                     assistant(replies[1]), user("and again?")]


def test_without_session_id_nothing_is_injected_or_recorded(gateway: Gateway, upstream: Upstream) -> None:
    """A request without X-Session-Id is forwarded as sent and leaves no session behind."""
    client = gateway.openai()
    for text in ("one", "two"):
        client.chat.completions.create(model="standin", messages=[user(text)])
    assert [r["messages"] for r in upstream.requests] == [[user("one")], [user("two")]]
    listed = httpx.get(f"{gateway.base_url}/sessions", headers={"Authorization": f"Bearer {ACME_KEY}"}).json()
    assert listed["data"] == []


def test_sync_streaming_relays_usage_and_records_the_streamed_reply(gateway: Gateway, upstream: Upstream) -> None:
    """A streamed turn with include_usage ends with a usage chunk, and its reply is injected next turn."""
    client = gateway.openai(session="streamer")
    events = list(client.chat.completions.create(model="standin", messages=[user("stream me")], stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert events[-1].choices == [] and events[-1].usage is not None and events[-1].usage.total_tokens > 0
    assert upstream.requests[0]["stream_options"] == {"include_usage": True}
    client.chat.completions.create(model="standin", messages=[user("next")])
    assert upstream.requests[1]["messages"] == [user("stream me"), assistant(text), user("next")]


def test_async_sdk_streaming_and_not_share_one_session(gateway: Gateway, upstream: Upstream) -> None:
    """The async SDK, streaming then not then streaming, sees one growing server-side history."""

    async def talk() -> list[str]:
        client = gateway.async_openai(session="async-bob")
        out = []
        stream = await client.chat.completions.create(model="standin", messages=[user("a1")], stream=True)
        out.append("".join([c.choices[0].delta.content or "" async for c in stream if c.choices]))
        reply = await client.chat.completions.create(model="standin", messages=[user("a2")])
        out.append(reply.choices[0].message.content)
        stream = await client.chat.completions.create(model="standin", messages=[user("a3")], stream=True)
        out.append("".join([c.choices[0].delta.content or "" async for c in stream if c.choices]))
        await client.close()
        return out

    replies = asyncio.run(talk())
    assert upstream.requests[2]["messages"] == [user("a1"), assistant(replies[0]), user("a2"),
                                                assistant(replies[1]), user("a3")]
    assert export(gateway, "async-bob")["full_context"] == [user("a1"), assistant(replies[0]), user("a2"),
                                                             assistant(replies[1]), user("a3"),
                                                             assistant(replies[2])]


@pytest.fixture
def header_upstream() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    """The stand-in behind a middleware that records every request's headers and body."""
    seen: list[tuple[dict[str, str], bytes]] = []

    @web.middleware
    async def record(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        seen.append((dict(request.headers), await request.read()))
        return await handler(request)

    app = make_app()
    app.middlewares.append(record)
    server = _Server(app)
    yield f"http://127.0.0.1:{server.port}/v1", seen
    server.stop()


def test_client_key_and_session_id_never_reach_the_upstream(
        make_gateway: Callable[..., Gateway], header_upstream: tuple[str, list[tuple[dict[str, str], bytes]]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The upstream sees its own key, never the client's gateway key or session header."""
    url, seen = header_upstream
    monkeypatch.setenv("SG_TEST_UPSTREAM_KEY", UPSTREAM_KEY)
    gateway = make_gateway(upstreams=[{"name": "recorder", "base_url": url, "models": ["*"],
                                       "api_key_env": "SG_TEST_UPSTREAM_KEY"}])
    client = gateway.openai(session="secret-carrier")
    client.chat.completions.create(model="standin", messages=[user("hi")])
    list(client.chat.completions.create(model="standin", messages=[user("again")], stream=True))
    client.models.list()
    assert len(seen) == 3
    for headers, body in seen:
        assert headers.get("Authorization") == f"Bearer {UPSTREAM_KEY}"
        assert not any(ACME_KEY in v for v in headers.values())
        assert not any(k.lower() == "x-session-id" for k in headers)
        assert ACME_KEY.encode() not in body


def test_client_sent_history_is_not_injected_twice(gateway: Gateway, upstream: Upstream) -> None:
    """A client that resends its whole history gets it forwarded as is, and each message recorded once."""
    client = gateway.openai(session="own-history")
    history = [SYSTEM, user("q1")]
    for text in ("q2", "q3"):
        reply = client.chat.completions.create(model="standin", messages=history).choices[0].message.content
        history = [*history, assistant(reply), user(text)]
    client.chat.completions.create(model="standin", messages=history)
    assert [r["messages"] for r in upstream.requests] == [history[:2], history[:4], history]
    full = export(gateway, "own-history")["full_context"]
    assert [m["content"] for m in full if m["role"] == "user"] == ["q1", "q2", "q3"]
    assert full[:5] == history[1:]


def test_only_messages_after_the_last_assistant_message_are_recorded(gateway: Gateway, upstream: Upstream) -> None:
    """With client-side history the recorded user message is only the new input of the round."""
    client = gateway.openai(session="fresh-input")
    messages = [SYSTEM, user("old question"), assistant("old answer"), user("new part 1"), user("new part 2")]
    reply = client.chat.completions.create(model="standin", messages=messages).choices[0].message.content
    assert upstream.requests[0]["messages"] == messages
    assert export(gateway, "fresh-input")["full_context"] == [user("new part 1\n\nnew part 2"), assistant(reply)]


def test_memo_is_injected_at_the_start_of_the_final_user_message(gateway: Gateway, upstream: Upstream) -> None:
    """An imported memo is forwarded as a [CHAT SESSION MEMO] section before the user's own text,
    which becomes its [INPUT] section (Agently's rendering)."""
    doc = {"id": "memo-1", "full_context": [user("hello"), assistant("hi there")],
           "context_window": [user("hello"), assistant("hi there")], "memo": {"facts": ["code X-1"]}}
    resp = httpx.put(f"{gateway.base_url}/sessions/memo-1", json=doc, headers={"Authorization": f"Bearer {ACME_KEY}"})
    assert resp.status_code == 200, resp.text
    client = gateway.openai(session="memo-1")
    client.chat.completions.create(model="standin", messages=[SYSTEM, user("what is my code?")])
    assert upstream.requests[0]["messages"] == [
        SYSTEM, user("hello"), assistant("hi there"),
        user("[CHAT SESSION MEMO]:\nfacts:\n- code X-1\n\n\n[INPUT]:\nwhat is my code?\n\n[OUTPUT]:")]
    recorded = export(gateway, "memo-1")
    assert recorded["full_context"][2] == user("what is my code?")
    assert recorded["memo"] == {"facts": ["code X-1"]}


def write_policy(folder: Path, max_length: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.yaml").write_text(
        "id: tiny\ndescription: a small window\nsession:\n  input_keys: null\n  reply_keys: null\n"
        f"  max_length: {max_length}\n  bounding: {{strategy: simple_cut}}\n")
    return folder


def test_simple_cut_keeps_the_window_within_max_length(make_gateway: Callable[..., Gateway], upstream: Upstream,
                                                       tmp_path: Path) -> None:
    """Under a small max_length the window stays within it and full_context keeps every round."""
    gateway = make_gateway(write_policy(tmp_path / "small-policies", 400))
    upstream.reply = lambda body: f"reply to {body['messages'][-1]['content']} " + "x" * 60
    client = gateway.openai(session="bounded")
    for n in range(6):
        client.chat.completions.create(model="standin", messages=[user(f"question number {n}")])
    doc = export(gateway, "bounded")
    window, full = doc["context_window"], doc["full_context"]
    assert len(full) == 12
    assert 0 < len(window) < 12
    assert context_length(window) <= 400
    assert full[-len(window):] == window
    assert doc["session_settings"]["max_length"] == 400
    client.chat.completions.create(model="standin", messages=[user("last")])
    assert upstream.requests[-1]["messages"] == [*window, user("last")]


def test_a_reply_that_returned_is_already_in_the_database(gateway: Gateway, upstream: Upstream) -> None:
    """Right after a reply returns (plain or streamed to [DONE]) its round is in the SQLite file."""
    client = gateway.openai(session="durable")
    client.chat.completions.create(model="standin", messages=[user("one")])
    assert count_rounds(gateway.db_path) == 1
    list(client.chat.completions.create(model="standin", messages=[user("two")], stream=True))
    assert count_rounds(gateway.db_path) == 2


def test_concurrent_rounds_on_one_session_are_all_recorded(gateway: Gateway, upstream: Upstream) -> None:
    """Twelve rounds sent at once on one session all land in full_context, each exactly once and whole."""

    async def burst() -> None:
        client = gateway.async_openai(session="busy")

        async def ask(n: int) -> None:
            if n % 2:
                await client.chat.completions.create(model="standin", messages=[user(f"q{n}")])
            else:
                stream = await client.chat.completions.create(model="standin", messages=[user(f"q{n}")], stream=True)
                async for _ in stream:
                    pass

        await asyncio.gather(*(ask(n) for n in range(12)))
        await client.close()

    asyncio.run(burst())
    full = export(gateway, "busy")["full_context"]
    assert len(full) == 24
    assert sorted(m["content"] for m in full if m["role"] == "user") == sorted(f"q{n}" for n in range(12))
    for question, answer in zip(full[::2], full[1::2], strict=True):
        assert answer["role"] == "assistant" and answer["content"].endswith(question["content"])
    assert count_rounds(gateway.db_path) == 12


def test_streamed_tool_calls_reach_the_sdk_and_are_recorded(gateway: Gateway, upstream: Upstream) -> None:
    """A streamed tool call arrives whole in the SDK; the tool-result turn is forwarded as sent and
    recorded with its structure (the call and the result that answers it)."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    upstream.reply = lambda body: ({"role": "assistant", "content": None, "tool_calls": [call]}
                                   if body["messages"][-1]["role"] == "user" else "It is sunny.")
    client = gateway.openai(session="tools")
    messages: list[dict[str, Any]] = [user("weather in Oslo?")]
    events = list(client.chat.completions.create(model="standin", messages=messages, stream=True))
    calls = [c for e in events if e.choices for c in e.choices[0].delta.tool_calls or ()]
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("call_1", "get_weather", '{"city": "Oslo"}')]
    messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 20C"}]
    client.chat.completions.create(model="standin", messages=messages)
    assert upstream.requests[1]["messages"] == messages
    full = export(gateway, "tools")["full_context"]
    assert full[0] == user("weather in Oslo?")
    # structured (issue 12); exported with "" for Agently's loader, stored and injected as None (requests above)
    assert full[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert full[2:] == [{"role": "tool", "tool_call_id": "call_1", "content": "sunny, 20C"}, assistant("It is sunny.")]


def test_several_choices_on_a_recorded_session_are_refused_before_the_upstream(gateway: Gateway,
                                                                               upstream: Upstream) -> None:
    """``n: 2`` would hand the client two replies where a round records one: refused with a 400
    that says what to send, nothing reaches the upstream, and nothing is recorded. Without a
    session (audited only), and on a session whose policy records no reply, it goes through."""
    import openai

    client = gateway.openai(session="choices")
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="standin", messages=[user("two answers")], n=2, stream=stream)
        assert caught.value.code == "multiple_choices_not_supported"
        assert "Send n: 1" in caught.value.message and "without X-Session-Id" in caught.value.message
    assert upstream.requests == []
    resp = httpx.get(f"{gateway.base_url}/sessions/choices", headers={"Authorization": f"Bearer {ACME_KEY}"})
    assert resp.status_code == 404
    gateway.openai().chat.completions.create(model="standin", messages=[user("audited only")], n=2)
    gateway.openai(session="private:choices").chat.completions.create(model="standin", messages=[user("x")], n=2)
    client.chat.completions.create(model="standin", messages=[user("one answer")], n=1)
    assert len(upstream.requests) == 3


def test_store_true_is_refused_unless_the_provider_holds_conversations(make_gateway: Any, upstream: Upstream) -> None:
    """``store: true`` would leave the conversation at the provider, beyond erasure: 400
    ``store_not_supported`` naming the upstream, before anything is sent, with or without a
    session. ``store: false`` goes through; with ``responses_state: provider`` so does ``true``."""
    import openai

    gateway = make_gateway()
    for session in ("stored", None):
        with pytest.raises(openai.BadRequestError) as caught:
            gateway.openai(session=session).chat.completions.create(model="standin", messages=[user("keep")],
                                                                    store=True)
        assert caught.value.code == "store_not_supported" and "responses_state: provider" in caught.value.message
    assert upstream.requests == []
    gateway.openai(session="stored").chat.completions.create(model="standin", messages=[user("no")], store=False)
    assert upstream.requests[-1]["store"] is False
    provider_held = make_gateway(name="provider-held", upstreams=[
        {"name": "kept", "base_url": upstream.url, "models": ["*"], "responses_state": "provider"}])
    provider_held.openai(session="s").chat.completions.create(model="standin", messages=[user("keep")], store=True)
    assert upstream.requests[-1]["store"] is True
