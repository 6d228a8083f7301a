"""The fast paths of ``session.model`` against plain reference implementations, over generated
windows: the one-pass ``normalise_window`` against a two-pass merge, and ``simple_cut`` from a
known total (dropping the oldest) against the reverse scan."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.session.model import (
    CHAT_HISTORY_OPENER,
    CONTINUE_INPUT,
    _simple_cut,
    context_length,
    is_structured,
    normalise_window,
    paired,
)
from gateway.session.record import message_length

text = st.text(alphabet="ab \n'\"é", max_size=12)
plain = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer"]),
                               "content": st.one_of(text, st.none(), st.integers(0, 9),
                                                    st.lists(st.one_of(
                                                        st.fixed_dictionaries({"type": st.just("text"), "text": text}),
                                                        st.fixed_dictionaries({"type": st.just("image_url"),
                                                                               "image_url": st.just({"url": "u"})})),
                                                        max_size=3))})
call = st.fixed_dictionaries({"role": st.just("assistant"), "content": st.none(),
                              "tool_calls": st.just([{"id": "c1", "type": "function",
                                                      "function": {"name": "f", "arguments": "{}"}}])})
result = st.fixed_dictionaries({"role": st.just("tool"), "tool_call_id": st.just("c1"), "content": text})
windows = st.lists(st.one_of(plain, plain, plain, call, result), max_size=14)


def _parts(content: Any) -> list[Any]:
    return list(content) if isinstance(content, list) else [{"type": "text", "text": str(content)}]


def reference_normalise(window: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The merge in two passes, over the window its tool calls are paired in (``paired``, tested
    on its own in ``test_model``)."""
    merged: list[Any] = []
    for message in paired(window):
        if is_structured(message):
            merged.append(dict(message))
        elif merged and isinstance(merged[-1], tuple) and merged[-1][0] == str(message.get("role")):
            merged[-1][1].append(message.get("content"))
        else:
            merged.append((str(message.get("role")), [message.get("content")]))
    out = []
    for item in merged:
        if not isinstance(item, tuple):
            out.append(item)
        elif len(item[1]) == 1 and type(item[1][0]) is str:
            out.append({"role": item[0], "content": item[1][0]})
        else:
            parts = [part for content in item[1] for part in _parts(content)]
            texts = [p["text"] for p in parts if isinstance(p, dict) and p.get("type") == "text" and "text" in p]
            out.append({"role": item[0], "content": "\n\n".join(str(t) for t in texts) if len(texts) == len(parts)
                        else parts})
    if out and out[0]["role"] != "user":
        out.insert(0, {"role": "user", "content": CHAT_HISTORY_OPENER})
    if out and out[-1]["role"] != "assistant":
        out.append({"role": "assistant", "content": CONTINUE_INPUT})
    return out


@settings(max_examples=300, derandomize=True, deadline=None)
@given(windows)
def test_normalise_window_matches_the_two_pass_merge(window: list[dict[str, Any]]) -> None:
    assert normalise_window(window) == reference_normalise(window)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.lists(plain, max_size=14), st.integers(0, 200))
def test_cut_from_a_known_total_keeps_the_same_suffix(window: list[dict[str, Any]], max_length: int) -> None:
    scanned = _simple_cut(window, max_length)
    dropped = _simple_cut(window, max_length, context_length(window))
    assert dropped == scanned
    kept, chars = dropped
    if chars is not None:
        assert chars == sum(message_length(m) for m in kept) <= max_length


text_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": text})
step = st.one_of(
    st.tuples(st.just("append"), st.lists(st.one_of(text_message, text_message, text_message, plain, call, result),
                                          min_size=1, max_size=3)),
    st.tuples(st.just("cut"), st.integers(0, 160)),
    st.tuples(st.just("look"), st.none()),
    st.tuples(st.just("settings"), st.none()),
)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.lists(text_message, max_size=8), st.lists(step, max_size=12))
def test_the_kept_normalised_window_follows_every_change(window: list[dict[str, Any]],
                                                         steps: list[tuple[str, Any]]) -> None:
    """A state's normalised window, kept and carried over by ``appended``, a cut from the front
    and a change of settings, is always the one normalising its window afresh gives."""
    from gateway.session.model import SessionState, bound_sync

    # objects: asks for the normalised messages each time (they are kept and carried over);
    # text: asks only for their JSON text (the Chat Completions path), so no objects are kept
    objects, text = SessionState(list(window)), SessionState(list(window))
    objects.normalised()
    text.normalised_items()
    for state in (objects, text):
        state.to_json()
    for kind, arg in steps:
        if kind == "append":
            objects, text = objects.appended(arg), text.appended(arg)
        elif kind == "cut":
            objects, text = bound_sync(objects, "simple_cut", arg), bound_sync(text, "simple_cut", arg)
        elif kind == "settings":
            objects, text = objects.with_settings({"max_length": 1}), text.with_settings({"max_length": 1})
        expected = normalise_window(objects.context_window)
        assert text.context_window == objects.context_window
        # the kept JSON text is the text of the objects, byte for byte
        assert text.normalised_items() == orjson.dumps(expected)[1:-1]
        assert objects.normalised_items() == orjson.dumps(expected)[1:-1]
        assert objects.normalised() == expected
        for state in (objects, text):
            assert state.to_json() == orjson.dumps(state.to_dict())
            assert state.to_json() == orjson.dumps(SessionState(list(state.context_window), state.memo,
                                                                state.settings).to_dict())
    assert text.normalised() == normalise_window(text.context_window)


list_step = st.one_of(st.tuples(st.just("append"), st.lists(st.one_of(plain, call, result), max_size=3)),
                      st.tuples(st.just("replace"), st.tuples(st.integers(0, 3),
                                                              st.lists(st.one_of(plain, call), max_size=3))),
                      st.tuples(st.just("first"), st.integers(0, 5)),
                      st.tuples(st.just("last"), st.integers(0, 5)))


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.lists(st.one_of(plain, call, result), max_size=6), st.lists(list_step, max_size=12))
def test_an_encoded_list_is_the_json_of_its_items_after_every_change(items: list[dict[str, Any]],
                                                                     steps: list[tuple[str, Any]]) -> None:
    """``EncodedList`` after appends and cuts at either end is ``orjson.dumps`` of the same list."""
    from gateway.session.encoded import EncodedList

    encoded = EncodedList.of(items)
    for kind, arg in steps:
        if kind == "append":
            items, encoded = items + arg, encoded.appended(arg)
        elif kind == "replace":
            drop, added = arg
            items = items[:max(len(items) - drop, 0)] + added
            encoded = encoded.appended(added, replacing=drop)
        elif kind == "first":
            items, encoded = items[arg:], encoded.without_first(arg)
        else:
            items, encoded = items[:max(len(items) - arg, 0)], encoded.without_last(arg)
        assert encoded.data == orjson.dumps(items) and len(encoded) == len(items)
        assert bytes(encoded.items()) == orjson.dumps(items)[1:-1]


@settings(max_examples=200, derandomize=True, deadline=None)
@given(st.lists(text_message, max_size=8), st.lists(st.lists(text_message, min_size=1, max_size=3), max_size=6),
       st.sampled_from([None, "a memo", {"k": "v"}]), st.sampled_from(["user_section", "system"]))
def test_the_encoded_forward_body_is_the_body_of_the_messages(window: list[dict[str, Any]],
                                                              rounds: list[list[dict[str, Any]]], memo: Any,
                                                              placement: str) -> None:
    """The forwarded body built from the kept text (``inject(encoded=True)``) is byte for byte the
    body built from the message objects, for a fresh state and one carried over by rounds."""
    from gateway.session.model import SessionState, bound_sync, inject

    request = [{"role": "system", "content": "s"}, {"role": "user", "content": "new"}]
    state = SessionState(list(window), memo)
    for added in rounds:
        state.normalised_items()
        state = bound_sync(state.appended(added), "simple_cut", 120)
        for candidate in (state, SessionState(list(state.context_window), memo)):
            plain_body = inject(request, candidate, memo_placement=placement)
            encoded_body = inject(request, candidate, memo_placement=placement, encoded=True)
            assert orjson.dumps({"messages": encoded_body}) == orjson.dumps({"messages": plain_body})


def test_a_window_cut_to_nothing_merges_no_later_message_into_what_was_cut() -> None:
    """A cut that drops every message leaves no last message for the next append to merge into."""
    from gateway.session.model import _Normal

    window = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    for keep_out in (True, False):
        empty = _Normal.of(window, keep_out=keep_out).without_first(2)
        assert empty is not None and empty.items() == b""
        added = [{"role": "assistant", "content": "c"}]
        after = empty.appended(added)
        assert after is not None
        assert after.items() == orjson.dumps(normalise_window(added))[1:-1]


def test_a_simple_window_is_forwarded_as_its_own_text_between_the_markers() -> None:
    """Alternating ``{"role", "content"}`` messages normalise to themselves: the forwarded text is
    the window's own, with the markers Agently adds; a run of one role or another key is not."""
    from gateway.session.model import SessionState

    cases = [
        [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a", "name": "n"}, {"role": "assistant", "content": "b"}],
        [{"content": "a", "role": "user"}, {"role": "assistant", "content": "b"}],
        [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}],
    ]
    for window in cases:
        state = SessionState(list(window))
        assert state.normalised_items() == orjson.dumps(normalise_window(window))[1:-1], window
        grown = state.appended([{"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}])
        expected = normalise_window(grown.context_window)
        assert grown.normalised_items() == orjson.dumps(expected)[1:-1], window
