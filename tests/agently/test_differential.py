"""Differential tests (SPEC §1, issue 11): each case runs one conversation twice against the
recording stand-in upstream, once through Agently's own activated ``Session`` in-process and once
through the gateway (a plain Agently agent with ``X-Session-Id`` and the equivalent policy), and
asserts that the upstream received the same messages on every turn and that the sessions at the
end are equal.

The one documented difference: under ``input_keys: null`` Agently records its whole rendered
prompt (history included) as the user message, the gateway only the round's new input; those
cases compare through ``conftest.only_new`` / ``comparable(new_only=True)``. The chat-history
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
    Trace,
    agently_settings,
    assert_same_turns,
    comparable,
    export,
    gateway_agent,
    local_agent,
    local_session,
    new_agent,
    post,
    write_policy,
)
from tests.conftest import Gateway, Upstream

MakeGateway = Callable[..., Gateway]

SUPPORT = {"ticket_id": "T-1001", "intent": "refund", "raw_text": "card 4111 1111 1111 1111 was charged twice"}


def both(make_gateway: MakeGateway, tmp_path: Path, **session: Any) -> tuple[Gateway, dict[str, Any]]:
    """A gateway under a catch-all policy with *session*, and Agently's equivalent settings."""
    gateway = make_gateway(write_policy(tmp_path / "policies", **session))
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
    assert_same_turns(local, via, new_only=True)
    for user in ("alice", "bob"):
        assert comparable(export(gateway, f"acme:{user}")) == comparable(local_session(agents[user]), new_only=True)
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
