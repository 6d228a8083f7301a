"""The session model: bounding, injection and Agently's JSON form (SPEC §1)."""

from __future__ import annotations

from typing import Any

import pytest
from agently.core.session.Session import Session as AgentlySession

from gateway.errors import InvalidSession
from gateway.session.model import (
    SessionState,
    bound_sync,
    carries_history,
    from_agently,
    inject,
    keep_last,
    memo_section,
    simple_cut,
    split_rounds,
    to_agently,
)
from gateway.session.record import context_length


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


WINDOW = [msg("user", "u1" * 20), msg("assistant", "a1" * 20), msg("user", "u2" * 20), msg("assistant", "a2" * 20)]


def test_simple_cut_keeps_newest_messages_that_fit() -> None:
    """simple_cut keeps the newest messages whose Agently length fits in max_length."""
    limit = context_length(WINDOW[-2:]) + 5
    assert simple_cut(WINDOW, limit) == WINDOW[-2:]


def test_simple_cut_matches_agently() -> None:
    """The gateway's simple_cut gives the same window as Agently's own handler."""
    import asyncio

    limit = context_length(WINDOW[-3:]) + 1
    agently = AgentlySession()
    agently.session_settings.set("max_length", limit)
    asyncio.run(agently.async_set_chat_history(WINDOW))
    assert len(agently.context_window) < len(WINDOW)
    assert [m.model_dump() for m in agently.context_window] == simple_cut(WINDOW, limit)


def test_simple_cut_cuts_last_message_when_none_fits() -> None:
    """When no message fits, the last one is kept cut to its final max_length characters."""
    out = simple_cut([msg("user", "x" * 50 + "TAIL")], 4)
    assert out == [{"role": "user", "content": "TAIL"}]


def test_keep_last_keeps_whole_rounds() -> None:
    """keep_last keeps the last N rounds, a user message with its reply."""
    assert keep_last(WINDOW, 1) == WINDOW[2:]
    assert len(split_rounds([msg("assistant", "a"), msg("assistant", "b"), msg("user", "c")])) == 3


def test_bound_sync_only_acts_over_the_limit() -> None:
    """A window within max_length is left alone; one over it is bounded to fit."""
    state = SessionState(list(WINDOW))
    assert bound_sync(state, "simple_cut", 10_000) is state
    bounded = bound_sync(state, "keep_last", context_length(WINDOW) - 1, rounds=1)
    assert bounded.context_window == WINDOW[2:]


def test_inject_places_window_after_system_and_before_new_messages() -> None:
    """The window goes after the system message(s) and before the new messages."""
    state = SessionState([msg("user", "old"), msg("assistant", "old reply")])
    out = inject([msg("system", "S"), msg("user", "new")], state)
    assert [m["content"] for m in out] == ["S", "old", "old reply", "new"]


def test_inject_memo_as_user_section_and_as_system() -> None:
    """The memo is a [CHAT SESSION MEMO] section rendered into the final user message as Agently renders
    it (plain text becomes its [INPUT] section), or a system message."""
    state = SessionState([], memo={"facts": ["code X-1"]})
    out = inject([msg("user", "hi")], state)
    assert out[-1]["content"] == "[CHAT SESSION MEMO]:\nfacts:\n- code X-1\n\n\n[INPUT]:\nhi\n\n[OUTPUT]:"
    out = inject([msg("system", "S"), msg("user", "hi")], state, memo_placement="system")
    assert out[1] == {"role": "system", "content": memo_section(state.memo)} and out[2]["content"] == "hi"


def test_client_history_is_not_injected_twice() -> None:
    """A client that sends its own history (assistant messages) gets no window injected."""
    state = SessionState([msg("user", "old"), msg("assistant", "old reply")])
    messages = [msg("user", "old"), msg("assistant", "old reply"), msg("user", "new")]
    assert carries_history(messages)
    assert inject(messages, state) is messages


def test_agently_json_round_trip_through_agently() -> None:
    """A session written by the gateway loads into Agently and comes back unchanged."""
    import json

    state = SessionState([msg("user", "b"), msg("assistant", "c")], {"facts": [1]},
                         {"max_length": 100, "input_keys": ["input.x"], "reply_keys": None})
    full = [msg("user", "a"), msg("assistant", "z"), *state.context_window]
    data = to_agently("acme:alice", full, state)
    agently = AgentlySession()
    agently.load_json_session(json.dumps(data))
    back_full, back_state = from_agently(json.loads(agently.get_json_session()))
    assert back_full == full
    assert back_state.context_window == state.context_window and back_state.memo == state.memo
    # Agently's settings merge adds entries of its own (and a None to lists); ours survive
    assert "input.x" in back_state.settings["input_keys"] and back_state.settings["max_length"] == 100


def test_from_agently_falls_back_to_full_context_and_rejects_bad_shapes() -> None:
    """A missing context_window falls back to full_context; malformed documents name the field."""
    full, state = from_agently({"full_context": [msg("user", "a")]})
    assert state.context_window == full
    with pytest.raises(InvalidSession, match="full_context\\[0\\]"):
        from_agently({"full_context": [{"content": "no role"}]})
    with pytest.raises(InvalidSession, match="memo"):
        from_agently({"memo": 5})


# --- tool calls paired with their answers (what a provider takes back) -----------------------

def _call(cid: str) -> dict[str, Any]:
    return {"id": cid, "type": "function", "function": {"name": "f", "arguments": "{}"}}


def _result(cid: str, text: str = "ok") -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": cid, "content": text}


def test_paired_keeps_answered_calls_and_leaves_out_the_rest() -> None:
    from gateway.session.model import paired
    thinking = [{"type": "thinking", "thinking": "t", "signature": "s"}]
    window: list[dict[str, Any]] = [
              {"role": "user", "content": "q"},
              {"role": "assistant", "content": "let me look", "tool_calls": [_call("a"), _call("b")],
               "reasoning": thinking},
              _result("a"), _result("a", "again"), _result("zz"),          # b unanswered, a twice, zz of no call
              {"role": "user", "content": "go on"},
              {"role": "assistant", "content": None, "tool_calls": [_call("c")]},  # never answered
              _result("d"),                                                 # no call before it
              {"role": "user", "content": "and?"},
              {"role": "assistant", "content": None, "tool_calls": [_call("e")]}]
    assert paired(window) == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "let me look", "tool_calls": [_call("a")], "reasoning": thinking},
        _result("a"),
        {"role": "user", "content": "go on"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": None, "tool_calls": [_call("e")]}]  # the request decides
    assert paired(window, answered=["e"])[-1]["tool_calls"] == [_call("e")]
    assert paired(window, answered=[])[-1] == {"role": "user", "content": "and?"}
    assert paired(window, tools=False) == [{"role": "user", "content": "q"},
                                           {"role": "assistant", "content": "let me look"},
                                           {"role": "user", "content": "go on"}, {"role": "user", "content": "and?"}]
    assert window[1]["tool_calls"] == [_call("a"), _call("b")]  # the record is not changed


def test_the_window_is_sent_with_what_the_request_answers() -> None:
    import orjson

    from gateway.session.model import SessionState, inject
    state = SessionState([{"role": "user", "content": "q"},
                          {"role": "assistant", "content": None, "tool_calls": [_call("a")]}])
    answer = [_result("a")]
    sent = inject(answer, state)
    assert sent[1] == {"role": "assistant", "content": None, "tool_calls": [_call("a")]} and sent[2:] == answer
    moved_on = [{"role": "user", "content": "never mind"}]
    assert inject(moved_on, state) == [{"role": "user", "content": "q"},
                                       {"role": "assistant", "content": "[User continue input]"}, *moved_on]
    encoded = orjson.loads(orjson.dumps(inject(moved_on, state, encoded=True)))
    assert encoded == inject(moved_on, state)


# --- a round is resized after each appended message, as Agently resizes ----------------------

def _agently_round(window: list[dict[str, Any]], messages: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """Agently's window after ``_session_finally`` appends *messages* one ``add_chat_history`` each."""
    import asyncio

    agently = AgentlySession(settings={"session": {"max_length": limit}}, auto_resize=False)
    asyncio.run(agently.async_set_chat_history(window))
    agently._auto_resize = True
    for message in messages:
        asyncio.run(agently.async_add_chat_history(message))
    return [m.model_dump() for m in agently.context_window]


def test_user_message_near_max_length_keeps_agently_remnant() -> None:
    """A user message whose Agently length alone is over max_length is cut right after it is
    appended (its last characters kept), so the remnant stays next to the reply, as in Agently."""
    from gateway.session.model import appended_bounded

    window = [msg("user", "old question"), msg("assistant", "old answer")]
    messages = [msg("user", "U" * 10 + "0123456789" * 27), msg("assistant", "short reply")]
    limit = 300
    expected = _agently_round(window, messages, limit)
    assert expected[0]["role"] == "user"  # Agently keeps a remnant of the user message
    state = appended_bounded(SessionState(list(window)), messages, "simple_cut", limit)
    assert state.context_window == expected
    assert state.window_chars() == context_length(expected)


def test_rounds_resized_as_agently_resizes_them() -> None:
    """Random windows and rounds (ASCII, escapes, emoji) under simple_cut end in Agently's window."""
    import random

    from gateway.session.model import appended_bounded

    rng = random.Random(4141)
    alphabet = "ab \n'\"\\é😀中"
    for _ in range(300):
        limit = rng.randint(40, 400)
        text = lambda n=limit: "".join(rng.choice(alphabet) for _ in range(rng.randint(0, n)))  # noqa: E731
        window = [msg(("user", "assistant")[i % 2], text()) for i in range(rng.randint(0, 6))]
        messages = [msg("user", text()), msg("assistant", text())][rng.randint(0, 1):]
        state = bound_sync(SessionState(list(window)), "simple_cut", limit)
        expected = _agently_round(state.context_window, messages, limit)
        assert appended_bounded(state, messages, "simple_cut", limit).context_window == expected


def test_keep_last_resizes_after_each_message_as_a_replay_does() -> None:
    """keep_last (the gateway's own strategy) run after each appended message: the shortcut that
    bounds once where that gives the same window matches bounding after every message."""
    import random

    from gateway.session.model import appended_bounded

    rng = random.Random(17)
    roles = ("user", "assistant", "assistant", "tool", "narrator")
    for _ in range(600):
        limit, rounds = rng.randint(30, 300), rng.randint(1, 3)
        text = lambda n=limit: "x" * rng.randint(0, n)  # noqa: E731
        window = [msg(rng.choice(roles), text()) for _ in range(rng.randint(0, 6))]
        messages = [msg(rng.choice(roles), text()) for _ in range(rng.randint(1, 4))]
        start = bound_sync(SessionState(list(window)), "keep_last", limit, rounds)
        replay = start
        for message in messages:
            replay = bound_sync(replay.appended([message]), "keep_last", limit, rounds)
        got = appended_bounded(start, messages, "keep_last", limit, rounds)
        assert got.context_window == replay.context_window
        assert got.window_chars() == context_length(got.context_window)
