"""Differential tests (SPEC §1, issue 11): each case runs one conversation twice against the
recording stand-in upstream, once through Agently's own activated ``Session`` in-process and once
through the gateway (a plain Agently agent with ``X-Session-Id`` and the equivalent policy), and
asserts that the upstream received the same messages on every turn and that the sessions at the
end are equal.

The one documented difference: under ``input_keys: null`` Agently records its whole rendered
prompt (history included) as the user message, the gateway only the round's new input; those
cases compare through ``conftest.NewOnly``. The chat-history
cases state what differs in ``full_context`` (append-only evidence in the gateway).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from agently.core.session.Session import Session

from tests.agently import compress_hooks
from tests.agently.conftest import (
    AUTH,
    NewOnly,
    Trace,
    agently_settings,
    assert_same_turns,
    comparable,
    export,
    gateway_agent,
    local_agent,
    local_session,
    post,
    write_policy,
)
from tests.conftest import Gateway, Upstream

MakeGateway = Callable[..., Gateway]

SUPPORT = {"ticket_id": "T-1001", "intent": "refund", "raw_text": "card 4111 1111 1111 1111 was charged twice"}


def both(make_gateway: MakeGateway, tmp_path: Path, **session: Any) -> tuple[Gateway, dict[str, Any]]:
    """A gateway under a catch-all policy with *session*, and Agently's equivalent settings."""
    gateway = make_gateway(write_policy(tmp_path / "policies", **session), hook_modules=["tests.agently.*"])
    return gateway, agently_settings(session)


# --- the seed's five use cases ----------------------------------------------------------------

def test_multi_user_chat(make_gateway: MakeGateway, upstream: Upstream, tmp_path: Path) -> None:
    """Use case 1: two users, one session each, interleaved streamed turns; null keys."""
    session = {"input_keys": None, "reply_keys": None, "max_length": 16000,
               "bounding": {"strategy": "simple_cut"}}
    gateway, settings = both(make_gateway, tmp_path, **session)
    script = [("alice", "my favourite colour is teal"), ("bob", "I am bob"), ("alice", "what is my colour?"),
              ("bob", "who am I?"), ("alice", "say it once more")]
    local, via = Trace(), Trace()
    agents = {u: local_agent(upstream, f"acme:{u}", settings) for u in ("alice", "bob")}
    for user, text in script:
        local.run(upstream, lambda a, t=text: a.input(t).get_text(), agents[user])
    gw_agents = {u: gateway_agent(gateway, f"acme:{u}") for u in ("alice", "bob")}
    for user, text in script:
        via.run(upstream, lambda a, t=text: a.input(t).get_text(), gw_agents[user])
    assert_same_turns(local, via, NewOnly.of(local))
    for user in ("alice", "bob"):
        assert comparable(export(gateway, f"acme:{user}")) == comparable(local_session(agents[user]),
                                                                          NewOnly.of(local))
    assert len(export(gateway, "acme:alice")["full_context"]) == 6


def test_stateless_backend_with_json_sessions(make_gateway: MakeGateway, upstream: Upstream,
                                              tmp_path: Path) -> None:
    """Use case 2: a backend that keeps no agent between requests: Agently saves and loads the
    session's JSON around every turn; through the gateway the server keeps it. Non-streamed."""
    session = {"input_keys": ["input"], "reply_keys": None, "max_length": 2000}
    gateway, settings = both(make_gateway, tmp_path, **session)
    questions = ["order 17 is late", "it was due Monday", "what can you do?", "thanks"]
    local, via = Trace(), Trace()
    saved: str | None = None
    for text in questions:
        agent = local_agent(upstream, "backend:1", settings, stream=False)
        if saved is not None:
            agent.activated_session.load_json_session(saved)
        local.run(upstream, lambda a, t=text: a.input(t).get_text(), agent)
        saved = agent.activated_session.get_json_session()
    for text in questions:
        via.run(upstream, lambda a, t=text: a.input(t).get_text(), gateway_agent(gateway, "backend:1", stream=False))
    assert_same_turns(local, via)
    assert saved is not None
    doc = export(gateway, "backend:1")
    assert comparable(doc) == comparable(json.loads(saved))
    reloaded = Session().load_json_session(json.dumps(doc))  # the gateway's export is Agently's JSON
    assert comparable(reloaded.to_serializable_session_data()) == comparable(json.loads(saved))


def test_compliance_minimal_keys(make_gateway: MakeGateway, upstream: Upstream, tmp_path: Path) -> None:
    """Use case 3: only ticket id and intent, resolution and risk level are recorded; a turn whose
    reply is not JSON records only its user message, so the window holds consecutive user
    messages, which both send merged, followed by an assistant ``[User continue input]``."""
    session = {"input_keys": ["input.ticket_id", "input.intent"], "reply_keys": ["resolution", "risk_level"],
               "max_length": 12000}
    gateway, settings = both(make_gateway, tmp_path, **session)
    output = {"resolution": (str,), "risk_level": (str,)}
    turns: list[Callable[[Any], Any]] = [
        lambda a: a.input(SUPPORT).output(output).get_data(),
        lambda a: a.input({**SUPPORT, "ticket_id": "T-1002"}).get_text(),  # dict-only input, text reply
        lambda a: a.input({**SUPPORT, "ticket_id": "T-1003", "intent": "cancel"}).get_text(),
        lambda a: a.input({**SUPPORT, "ticket_id": "T-1004"}).output(output).get_data(),
    ]
    local, via = Trace(), Trace()
    agent = local_agent(upstream, "support:1", settings)
    for turn in turns:
        local.run(upstream, turn, agent)
    client = gateway_agent(gateway, "support:1")
    for turn in turns:
        via.run(upstream, turn, client)
    assert_same_turns(local, via)
    doc = export(gateway, "support:1")
    assert comparable(doc) == comparable(local_session(agent))
    assert doc["full_context"][2] == {"role": "user", "content": "[input.ticket_id]:\nT-1002\n[input.intent]:\nrefund"}
    assert "4111" not in json.dumps(doc)
    third = via.turns[3][0]
    assert [m["role"] for m in third] == ["user", "assistant", "user", "assistant", "user"]
    assert third[2]["content"].count("[input.ticket_id]") == 2 and third[3]["content"] == "[User continue input]"


def test_long_conversation_with_compression_hooks(make_gateway: MakeGateway, upstream: Upstream,
                                                  tmp_path: Path) -> None:
    """Use case 4: Agently's hooks (attribute access on messages) run unchanged in the gateway, on
    Agently's timing (analysis after each append): at turn 8 both hold 6 messages and 2 compressions."""
    hooks = {"strategy": "hook", "analysis": "tests.agently.compress_hooks:analysis",
             "execution": {"compress": "tests.agently.compress_hooks:compress"}}
    session = {"input_keys": ["input"], "reply_keys": None, "max_length": None, "bounding": hooks}
    gateway, settings = both(make_gateway, tmp_path, **session)
    local, via = Trace(), Trace()
    agent = local_agent(upstream, "longform:1", settings,
                        hooks=(compress_hooks.analysis, {"compress": compress_hooks.compress}))
    windows = []
    for i in range(1, 9):
        local.run(upstream, lambda a, i=i: a.input(f"turn {i}").get_text(), agent)
        windows.append(len(agent.activated_session.context_window))
    client = gateway_agent(gateway, "longform:1")
    for i in range(1, 9):
        via.run(upstream, lambda a, i=i: a.input(f"turn {i}").get_text(), client)
    assert_same_turns(local, via)
    doc = export(gateway, "longform:1")
    assert comparable(doc) == comparable(local_session(agent))
    assert len(doc["context_window"]) == 6 and doc["memo"] == {"compressed_rounds": 2}
    assert windows == [2, 4, 6, 8, 10, 7, 9, 6]
    assert via.turns[7][0][-1]["content"].startswith("[CHAT SESSION MEMO]:\ncompressed_rounds: 1\n\n\n[INPUT]:")


def test_web_to_worker_hand_off_with_seed_key_forms(make_gateway: MakeGateway, upstream: Upstream,
                                                    tmp_path: Path) -> None:
    """Use case 5 with the seed-004 key forms: a web tier runs two structured turns, exports the
    session, a worker loads it and continues; both runtimes send and record the same."""
    session = {"input_keys": ["info.task", "input/lang", ".agent.system", ".execution.input.lang"],
               "reply_keys": ["summary", "scores.total"], "max_length": 3000}
    gateway, settings = both(make_gateway, tmp_path, **session)

    def turn(n: int) -> Callable[[Any], Any]:
        return lambda a: (a.info({"task": f"Summarize #{n}"}).instruct("be brief")
                          .input({"lang": "en", "noise": "ignored"})
                          .output({"summary": (str,), "scores": {"total": (int,)}}).get_data())

    local, via = Trace(), Trace()
    web = local_agent(upstream, "web:1", settings)
    web.set_agent_prompt("system", "SYS-C")
    for n in (0, 1):
        local.run(upstream, turn(n), web)
    worker = local_agent(upstream, "worker:1", settings, stream=False)
    worker.set_agent_prompt("system", "SYS-C")
    worker.activated_session.load_json_session(web.activated_session.get_json_session())
    for n in (2, 3):
        local.run(upstream, turn(n), worker)

    web_client = gateway_agent(gateway, "web-1")
    web_client.set_agent_prompt("system", "SYS-C")
    for n in (0, 1):
        via.run(upstream, turn(n), web_client)
    handed = httpx.put(f"{gateway.base_url}/sessions/worker-1", headers=AUTH, json=export(gateway, "web-1"))
    assert handed.status_code == 200, handed.text
    worker_client = gateway_agent(gateway, "worker-1", stream=False)
    worker_client.set_agent_prompt("system", "SYS-C")
    for n in (2, 3):
        via.run(upstream, turn(n), worker_client)

    assert_same_turns(local, via)
    doc = export(gateway, "worker-1")
    assert comparable(doc) == comparable(local_session(worker))
    assert doc["full_context"][:2] == [
        {"role": "user", "content": "[info.task]:\nSummarize #0\n[input/lang]:\nen\n[.agent.system]:\nSYS-C\n"
                                    "[.execution.input.lang]:\nen"},
        {"role": "assistant", "content": "[summary]:\nstand-in\n[scores.total]:\n50"}]
    assert "noise" not in json.dumps(doc)


def test_seed_key_forms_on_dict_only_input(make_gateway: MakeGateway, upstream: Upstream, tmp_path: Path) -> None:
    """``agent.input({...})`` alone sends a JSON object; it is the structured input for every key
    form both runtimes share (``input``, ``input.X``, ``input/X``, a bare ``X``, ``.execution.input``)."""
    keys = ["input", "input.ticket_id", "input/intent", "lang", ".execution.input.zeta"]
    session = {"input_keys": keys, "reply_keys": None, "max_length": 12000}
    gateway, settings = both(make_gateway, tmp_path, **session)
    document = {"zeta": "z", "ticket_id": "T-1", "intent": "refund", "lang": "en"}
    turns = [lambda a: a.input(document).get_text(), lambda a: a.input({**document, "ticket_id": "T-2"}).get_text()]
    local, via = Trace(), Trace()
    agent = local_agent(upstream, "keys:1", settings)
    for turn in turns:
        local.run(upstream, turn, agent)
    client = gateway_agent(gateway, "keys:1")
    for turn in turns:
        via.run(upstream, turn, client)
    assert_same_turns(local, via)
    doc = export(gateway, "keys:1")
    assert comparable(doc) == comparable(local_session(agent))
    assert doc["full_context"][0]["content"] == ("[input]:\nzeta: z\nticket_id: T-1\nintent: refund\nlang: en\n"
                                                 "[input.ticket_id]:\nT-1\n[input/intent]:\nrefund\n[lang]:\nen\n"
                                                 "[.execution.input.zeta]:\nz")
    assert via.turns[0][0] == [{"role": "user", "content": document}]


def test_memo_rendered_and_placed_as_agently_does(make_gateway: MakeGateway, upstream: Upstream,
                                                  tmp_path: Path) -> None:
    """A dict memo is YAML with sorted keys and its trailing newline; it goes after ACTION RESULTS,
    INFO and extra sections, before INSTRUCT/INPUT/OUTPUT; plain text and a dict-only input become
    ``[INPUT]`` between the memo and ``[OUTPUT]:``. The memo API reads and writes it."""
    session = {"input_keys": None, "reply_keys": None, "max_length": 12000}
    gateway, settings = both(make_gateway, tmp_path, **session)
    memo = {"zeta": 1, "alpha": ["x", "y"]}
    turns: list[Callable[[Any], Any]] = [
        lambda a: a.info({"task": "T"}).instruct("be brief").input("hello").get_text(),
        lambda a: a.input("plain text").get_text(),
        lambda a: a.input({"b": 1, "a": 2}).get_text(),
        lambda a: a.info({"task": "T2"}).input("q").output({"answer": (str,)}).get_data(),
    ]
    local, via = Trace(), Trace()
    agent = local_agent(upstream, "memo:1", settings)
    agent.activated_session.load_json_session(json.dumps({"memo": memo}))
    for turn in turns:
        local.run(upstream, turn, agent)
        agent.request_prompt.set("CUSTOM", "extra section")  # an extra section from the second turn on
    assert post(gateway, "memo:1/memo", {"memo": memo}, method="PUT") == {"id": "memo:1", "memo": memo}
    client = gateway_agent(gateway, "memo:1")
    for turn in turns:
        via.run(upstream, turn, client)
        client.request_prompt.set("CUSTOM", "extra section")
    assert_same_turns(local, via, NewOnly.of(local))
    assert via.turns[0][0][-1]["content"] == ("[INFO]:\n- task: T\n\n[CHAT SESSION MEMO]:\nalpha:\n- x\n- y\nzeta: 1\n"
                                             "\n\n[INSTRUCT]:\nbe brief\n\n[INPUT]:\nhello\n\n[OUTPUT]:")
    assert via.turns[2][0][-1]["content"].startswith("[CUSTOM]:\nextra section\n\n[CHAT SESSION MEMO]:\n")
    assert comparable(export(gateway, "memo:1")) == comparable(local_session(agent), NewOnly.of(local))
    assert httpx.get(f"{gateway.base_url}/sessions/memo:1/memo", headers=AUTH).json()["memo"] == \
        agent.activated_session.memo


def test_structured_reply_recorded_as_yaml_under_null_reply_keys(make_gateway: MakeGateway, upstream: Upstream,
                                                                 tmp_path: Path) -> None:
    """``reply_keys: null`` with an output structure: the parsed reply is recorded as YAML (Agently
    records ``get_data()``); a text reply stays text. Non-streamed."""
    session = {"input_keys": ["input"], "reply_keys": None, "max_length": 12000}
    gateway, settings = both(make_gateway, tmp_path, **session)
    turns: list[Callable[[Any], Any]] = [
        lambda a: a.input("rate it").output({"answer": (str,), "scores": {"total": (int,)}}).get_data(),
        lambda a: a.input("and in words?").get_text(),
    ]
    local, via = Trace(), Trace()
    agent = local_agent(upstream, "yaml:1", settings, stream=False)
    for turn in turns:
        local.run(upstream, turn, agent)
    client = gateway_agent(gateway, "yaml:1", stream=False)
    for turn in turns:
        via.run(upstream, turn, client)
    assert_same_turns(local, via)
    doc = export(gateway, "yaml:1")
    assert comparable(doc) == comparable(local_session(agent))
    assert doc["full_context"][1] == {"role": "assistant", "content": "answer: stand-in\nscores:\n  total: 50"}


# --- the chat-history APIs ------------------------------------------------------------------

HISTORY_POLICY = {"input_keys": ["input"], "reply_keys": None, "max_length": 400}


def test_add_chat_history_is_resized_as_agently_resizes(make_gateway: MakeGateway, upstream: Upstream,
                                                        tmp_path: Path) -> None:
    """``add_chat_history`` with ``max_length`` 400: Agently's window then holds one message cut to
    400 characters, and so does the gateway's; the next turn sends the same."""
    gateway, settings = both(make_gateway, tmp_path, **HISTORY_POLICY)
    added = [{"role": "user", "content": "[input]:\n" + "u" * 300}, {"role": "assistant", "content": "a" * 700}]
    local, via = Trace(), Trace()
    agent = local_agent(upstream, "add:1", settings)
    local.run(upstream, lambda a: a.input("first").get_text(), agent)
    agent.add_chat_history(added)
    local.run(upstream, lambda a: a.input("second").get_text(), agent)
    client = gateway_agent(gateway, "add:1")
    via.run(upstream, lambda a: a.input("first").get_text(), client)
    result = post(gateway, "add:1/history", {"op": "add", "messages": added})
    assert result["recorded_messages"] == 2 and result["context_window"]["messages"] == 1
    window = export(gateway, "add:1")["context_window"]
    assert window == [{"role": "assistant", "content": "a" * 400}]
    via.run(upstream, lambda a: a.input("second").get_text(), client)
    assert_same_turns(local, via)
    assert comparable(export(gateway, "add:1")) == comparable(local_session(agent))


def test_set_chat_history_and_role_order(make_gateway: MakeGateway, upstream: Upstream, tmp_path: Path) -> None:
    """``set_chat_history`` makes the messages the window; a window that starts with an assistant
    message is sent after a user ``[CHAT HISTORY]``, consecutive user messages merged, then an
    assistant ``[User continue input]``. ``full_context`` keeps what was there before (append-only)."""
    gateway, settings = both(make_gateway, tmp_path, **{**HISTORY_POLICY, "max_length": 4000})
    history = [{"role": "assistant", "content": "a1"}, {"role": "user", "content": "[input]:\nu1"},
               {"role": "user", "content": "[input]:\nu2"}]
    local, via = Trace(), Trace()
    agent = local_agent(upstream, "set:1", settings)
    local.run(upstream, lambda a: a.input("before").get_text(), agent)
    before = local_session(agent)["full_context"]
    agent.set_chat_history(history)
    local.run(upstream, lambda a: a.input("after").get_text(), agent)
    client = gateway_agent(gateway, "set:1")
    via.run(upstream, lambda a: a.input("before").get_text(), client)
    assert post(gateway, "set:1/history", {"op": "set", "messages": history})["context_window"]["messages"] == 3
    via.run(upstream, lambda a: a.input("after").get_text(), client)
    assert_same_turns(local, via)
    assert [m["content"] for m in via.turns[1][0]] == ["[CHAT HISTORY]", "a1", "[input]:\nu1\n\n[input]:\nu2",
                                                      "[User continue input]", "after"]
    doc, mine = export(gateway, "set:1"), local_session(agent)
    assert doc["context_window"] == mine["context_window"]
    assert doc["full_context"] == before + mine["full_context"]  # Agently replaced it; the gateway appends


def test_reset_and_clean_context_window(make_gateway: MakeGateway, upstream: Upstream, tmp_path: Path) -> None:
    """``clean_context_window`` and ``reset_chat_history`` empty the window and keep the memo in
    both; Agently's reset also empties ``full_context``, which the gateway keeps as evidence."""
    gateway, settings = both(make_gateway, tmp_path, input_keys=None, reply_keys=None, max_length=4000)
    memo = "the user prefers email"
    ops = ("clean_context_window", "reset")
    local, via = Trace(), Trace()
    agent = local_agent(upstream, "reset:1", settings)
    agent.activated_session.load_json_session(json.dumps({"memo": memo}))
    local.run(upstream, lambda a: a.input("one").get_text(), agent)
    for op in ops:
        agent.clean_context_window() if op == "clean_context_window" else agent.reset_chat_history()
        local.run(upstream, lambda a, op=op: a.input(f"after {op}").get_text(), agent)
    client = gateway_agent(gateway, "reset:1")
    post(gateway, "reset:1/memo", {"memo": memo}, method="PUT")
    via.run(upstream, lambda a: a.input("one").get_text(), client)
    for op in ops:
        assert httpx.post(f"{gateway.base_url}/sessions/reset:1/{op}", headers=AUTH).status_code == 200
        via.run(upstream, lambda a, op=op: a.input(f"after {op}").get_text(), client)
    new_only = NewOnly.of(local)
    assert_same_turns(local, via, new_only)
    doc, mine = export(gateway, "reset:1"), comparable(local_session(agent), new_only)
    assert doc["context_window"] == mine["context_window"] and doc["memo"] == mine["memo"] == memo
    assert len(mine["full_context"]) == 2 and len(doc["full_context"]) == 6
    assert doc["full_context"][-2:] == mine["full_context"]


def test_user_message_over_max_length_is_cut_before_the_reply_is_appended(
        make_gateway: MakeGateway, upstream: Upstream, tmp_path: Path) -> None:
    """Agently resizes after each appended message: a recorded user message whose length alone
    is over ``max_length`` (280 characters of input under 300) is cut to its last characters
    before the reply is appended, and that remnant stays in the window with the reply."""
    session = {"input_keys": ["input"], "reply_keys": None, "max_length": 300}
    gateway, settings = both(make_gateway, tmp_path, **session)
    texts = ["U" * 10 + "0123456789" * 27, "next"]
    upstream.reply = lambda body: "ok"
    local, via = Trace(), Trace()
    agent = local_agent(upstream, "cut:1", settings, stream=False)
    for text in texts:
        local.run(upstream, lambda a, t=text: a.input(t).get_text(), agent)
    client = gateway_agent(gateway, "cut:1", stream=False)
    for text in texts:
        via.run(upstream, lambda a, t=text: a.input(t).get_text(), client)
    assert_same_turns(local, via)
    recorded = "[input]:\n" + texts[0]  # 289 characters: Agently keeps content[289 - 300:], its last 11
    assert via.turns[1][0] == [{"role": "user", "content": recorded[-11:]}, {"role": "assistant", "content": "ok"},
                               {"role": "user", "content": "next"}]
    assert comparable(export(gateway, "cut:1")) == comparable(local_session(agent))


def test_history_roles_agently_does_not_know_are_sent_as_the_assistant(make_gateway: MakeGateway, upstream: Upstream,
                                                                       tmp_path: Path) -> None:
    """Messages added under other roles (a ``tool`` message without ``tool_call_id``, ``narrator``,
    ``User``) are kept as given and sent as Agently's default role mapping sends them: as the
    assistant's, merged with the assistant messages next to them."""
    gateway, settings = both(make_gateway, tmp_path, input_keys=None, reply_keys=None, max_length=4000)
    added = [{"role": "user", "content": "u1"}, {"role": "tool", "content": "tool out"},
             {"role": "assistant", "content": "a1"}, {"role": "narrator", "content": "n1"},
             {"role": "User", "content": "u2"}]
    local, via = Trace(), Trace()
    agent = local_agent(upstream, "roles:1", settings)
    agent.add_chat_history(added)
    local.run(upstream, lambda a: a.input("next question").get_text(), agent)
    client = gateway_agent(gateway, "roles:1")
    post(gateway, "roles:1/history", {"op": "add", "messages": added})
    via.run(upstream, lambda a: a.input("next question").get_text(), client)
    assert_same_turns(local, via)
    assert [m["role"] for m in via.turns[0][0]] == ["user", "assistant", "user"]
    assert export(gateway, "roles:1")["context_window"][:5] == added
