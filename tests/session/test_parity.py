"""The pure parts of Agently parity (SPEC §1): memo rendering and placement, chat-history role
order, hook message types, structured input and replies, the recorded-form whitelist. The
differential suite (``tests/agently``) checks the same against Agently itself."""

from __future__ import annotations

from typing import Any

import pytest
from agently.types.data import ChatMessage

from gateway.policy import Policy
from gateway.session.bounding import HookMessage, hook_messages, messages_from_hook
from gateway.session.model import SessionState, inject, memo_section, normalise_window, with_memo, with_pending
from gateway.session.record import build_reply_view, build_request_view, render_reply, render_user
from gateway.session.whitelist import in_recorded_form, memo_allowed


def msg(role: str, content: Any) -> dict[str, Any]:
    return {"role": role, "content": content}


def test_dict_memo_is_sorted_yaml_with_its_trailing_newline() -> None:
    """A dict memo renders as Agently renders a section: sorted keys, YAML's newline, a blank line."""
    assert memo_section({"zeta": 1, "alpha": ["x"]}) == "[CHAT SESSION MEMO]:\nalpha:\n- x\nzeta: 1\n\n"
    assert memo_section("plain") == "[CHAT SESSION MEMO]:\nplain\n"


@pytest.mark.parametrize(("content", "expected"), [
    ("hi", "[CHAT SESSION MEMO]:\nM\n\n[INPUT]:\nhi\n\n[OUTPUT]:"),
    ({"b": 1, "a": 2}, "[CHAT SESSION MEMO]:\nM\n\n[INPUT]:\na: 2\nb: 1\n\n\n[OUTPUT]:"),
    ("[INFO]:\n- task: T\n\n[INSTRUCT]:\nbrief\n\n[INPUT]:\nq\n\n[OUTPUT]:",
     "[INFO]:\n- task: T\n\n[CHAT SESSION MEMO]:\nM\n\n[INSTRUCT]:\nbrief\n\n[INPUT]:\nq\n\n[OUTPUT]:"),
    ("[ACTION RESULTS]:\na: 1\n\n\n[CUSTOM]:\nc\n\n[INPUT]:\nq\n\n[OUTPUT]:",
     "[ACTION RESULTS]:\na: 1\n\n\n[CUSTOM]:\nc\n\n[CHAT SESSION MEMO]:\nM\n\n[INPUT]:\nq\n\n[OUTPUT]:"),
    ("[NOTE]:\nnot a rendered prompt",
     "[CHAT SESSION MEMO]:\nM\n\n[INPUT]:\n[NOTE]:\nnot a rendered prompt\n\n[OUTPUT]:"),
], ids=["plain-text", "object-input", "after-info", "after-extra-sections", "header-like-text"])
def test_memo_placed_where_agently_places_it(content: Any, expected: str) -> None:
    """The memo goes before INSTRUCT/EXAMPLES/INPUT/OUTPUT; other input becomes [INPUT] next to it."""
    assert with_memo(content, "M") == expected


def test_memo_in_a_content_part_list_goes_into_the_first_text_part() -> None:
    parts = [{"type": "image_url", "image_url": {"url": "data:x"}}, {"type": "text", "text": "hi"}]
    text = "[CHAT SESSION MEMO]:\nM\n\n[INPUT]:\nhi\n\n[OUTPUT]:"
    assert with_memo(parts, "M") == [parts[0], {"type": "text", "text": text}]


def test_window_normalised_to_agently_role_order() -> None:
    """Leading assistant gets a [CHAT HISTORY] user first; same-role runs merge; a trailing user
    message gets an assistant [User continue input]; non-text parts are kept."""
    window = [msg("assistant", "a1"), msg("user", "u1"), msg("user", "u2")]
    assert normalise_window(window) == [msg("user", "[CHAT HISTORY]"), msg("assistant", "a1"),
                                        msg("user", "u1\n\nu2"), msg("assistant", "[User continue input]")]
    image = {"type": "image_url", "image_url": {"url": "data:x"}}
    merged = normalise_window([msg("user", "look"), msg("user", [image]), msg("assistant", "ok")])
    assert merged == [msg("user", [{"type": "text", "text": "look"}, image]), msg("assistant", "ok")]
    assert normalise_window([msg("user", "q"), msg("assistant", "a")]) == [msg("user", "q"), msg("assistant", "a")]
    out = inject([msg("system", "S"), msg("user", "new")], SessionState([msg("user", "u1"), msg("user", "u2")]))
    assert [m["content"] for m in out] == ["S", "u1\n\nu2", "[User continue input]", "new"]


def _agently_messages(window: list[dict[str, Any]], text: str, *, attachment: Any = None) -> list[dict[str, Any]]:
    """What Agently's ``OpenAICompatible`` sends for *window* as its chat history and *text* as
    the input: ``to_messages`` with strict role order, rich content only with an attachment."""
    import warnings

    from agently import Agently

    prompt = Agently.create_prompt()
    prompt.set("chat_history", window)
    prompt.set("input", text)
    if attachment is not None:
        prompt.set("attachment", attachment)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(prompt.to_messages(rich_content=attachment is not None, strict_role_orders=True))


OTHER_ROLES = ("narrator", "tool", "User", "function", "")


def test_window_roles_are_mapped_as_agently_maps_them() -> None:
    """A window role other than system, developer, user and assistant (a ``tool`` message
    without ``tool_call_id``, ``narrator``) is sent as the assistant's and merged with its
    neighbours, as Agently's default ``role_mapping`` (``_: assistant``) sends it; the window
    keeps the role. Fresh, encoded, and carried over an append, all three paths agree."""
    import random

    import orjson

    rng = random.Random(7)
    roles = ("user", "assistant", "system", "developer", *OTHER_ROLES)
    cases = [[msg("user", "u1"), msg("tool", "tool out"), msg("assistant", "a1")],
             [msg("user", "u1"), msg("narrator", "n1")]]
    cases += [[msg(rng.choice(roles), f"m{i}") for i in range(rng.randint(1, 6))] for _ in range(200)]
    for window in cases:
        expected = _agently_messages(window, "next question")
        new = [msg("user", "next question")]
        state = SessionState(list(window))
        assert inject(new, state) == expected
        assert orjson.loads(orjson.dumps(inject(new, SessionState(list(window)), encoded=True))) == expected
        grown = SessionState(window[:1])
        grown.normalised()
        grown.normalised_items()
        grown = grown.appended(window[1:])
        assert inject(new, grown) == expected and grown.context_window == window
        assert orjson.loads(orjson.dumps(inject(new, grown, encoded=True))) == expected


def test_hook_messages_have_item_and_attribute_access() -> None:
    """Hooks see Agently's ChatMessage shape (attributes, model_dump) and plain dict access."""
    (m,) = hook_messages([msg("user", "hi")])
    assert m.role == m["role"] == "user" and m.content == "hi" and m.model_dump() == {"role": "user", "content": "hi"}
    assert len(str(m)) == len(str(ChatMessage(role="user", content="hi").model_dump()))
    with pytest.raises(AttributeError):
        _ = m.missing


def test_hook_results_accepted_in_any_message_shape() -> None:
    """Dicts, HookMessages and Agently ChatMessages come back as plain messages; garbage raises."""
    back = messages_from_hook([msg("user", "a"), HookMessage(msg("assistant", "b")),
                               ChatMessage(role="user", content="c")], "context_window")
    assert back == [msg("user", "a"), msg("assistant", "b"), msg("user", "c")]
    for bad in ("text", [{"role": "user"}], [{"role": 1, "content": "x"}], {"role": "user", "content": "x"}):
        with pytest.raises(TypeError):
            messages_from_hook(bad, "context_window")


def test_pending_appends_only_under_hooks() -> None:
    state = SessionState([msg("user", "u")])
    assert with_pending(state, "hook", [1, 1]).pending == [1, 1]
    assert with_pending(SessionState(pending=[1]), "simple_cut", [1]).pending == []
    assert SessionState.from_dict(with_pending(state, "hook", [2]).to_dict()).pending == [2]


def test_object_content_is_the_structured_input() -> None:
    """``agent.input({...})`` alone: the object is ``input`` for keys, and sorted YAML for null keys."""
    policy = Policy.model_validate({"id": "p", "session": {"input_keys": ["input.ticket_id", "input"],
                                                           "reply_keys": None}})
    body = {"messages": [msg("user", {"zeta": "z", "ticket_id": "T-1"})]}
    view = build_request_view(body)
    assert render_user(policy.input_paths, body["messages"], view) == \
        "[input.ticket_id]:\nT-1\n[input]:\nzeta: z\nticket_id: T-1"
    assert render_user(None, body["messages"], view) == "ticket_id: T-1\nzeta: z"


def test_structured_reply_recorded_as_yaml_only_when_asked_for() -> None:
    """Null reply keys: a JSON reply to an Agently output requirement is YAML; to a plain prompt, text."""
    reply = build_reply_view(msg("assistant", '```json\n{"answer": "yes", "n": 2}\n```'))
    asked = build_request_view({"messages": [msg("user", "[INPUT]:\nq\n\n[OUTPUT REQUIREMENT]:\n"
                                                         "Data Format: JSON\nData Structure:\n{}\n\n[OUTPUT]:")]})
    plain = build_request_view({"messages": [msg("user", "q")]})
    assert render_reply(None, reply, structured=asked.wants_structured) == "answer: 'yes'\nn: 2"
    assert render_reply(None, reply, structured=plain.wants_structured) == reply.text
    assert build_request_view({"messages": [msg("user", "q")],
                               "response_format": {"type": "json_object"}}).wants_structured


def test_recorded_form_and_memo_rules() -> None:
    keys = ["input.ticket_id", "input.intent"]
    assert in_recorded_form("[input.ticket_id]:\nT-1\n[input.intent]:\nrefund", keys)
    assert in_recorded_form("[input.intent]:\nmulti\nline", keys)
    assert not in_recorded_form("free text", keys)
    assert not in_recorded_form("[input.intent]:\nx\n[input.ticket_id]:\ny", keys)  # out of policy order
    assert not in_recorded_form("[input.intent]:\nx", [])
    null = Policy.model_validate({"id": "p", "session": {"input_keys": None, "reply_keys": None}})
    keyed = Policy.model_validate({"id": "p", "session": {"input_keys": keys, "reply_keys": None}})
    assert memo_allowed(null) and not memo_allowed(keyed)


def test_policy_explain_records_a_structured_reply_as_the_pipeline_does() -> None:
    """``policy explain`` shows the same YAML record for a JSON reply to a JSON output requirement."""
    from gateway.policy.explain import explain
    from gateway.policy.matcher import PolicySet

    policies = PolicySet([Policy.model_validate({"id": "p", "session": {"input_keys": None, "reply_keys": None}})])
    request = {"model": "m", "messages": [msg("user", "[INPUT]:\nq\n\n[OUTPUT REQUIREMENT]:\nData Format: JSON\n"
                                                      "Data Structure:\n{}\n\n[OUTPUT]:")]}
    report = explain(policies, request, tenant="acme", session_id="s", reply='{"answer": "yes"}')
    assert "answer: 'yes'" in str(report)
