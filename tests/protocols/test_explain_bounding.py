"""``policy explain`` reads a request of any protocol, and the window is bounded in characters the
same way whichever protocol wrote it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.policy import load_policy_set
from gateway.policy.explain import detect_protocol, explain
from gateway.session.model import context_length
from tests.conftest import REPO, Gateway
from tests.protocols.conftest import anthropic_client, default_policy_with

RESPONSES_REQUEST = {"model": "gpt-4o", "instructions": "be brief",
                     "input": [{"role": "user", "content": [{"type": "input_text", "text": "hello there"}]}]}
MESSAGES_REQUEST = {"model": "claude", "max_tokens": 10, "system": "be brief",
                    "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]}


@pytest.mark.parametrize(("request_body", "protocol"), [
    (RESPONSES_REQUEST, "responses"), (MESSAGES_REQUEST, "messages"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hello there"}]}, "chat"),
])
def test_explain_reads_every_protocol(request_body: dict[str, Any], protocol: str) -> None:
    """The protocol is detected, and the recorded user text is the same whichever protocol sent it."""
    assert detect_protocol(request_body) == protocol
    policies = load_policy_set(REPO / "policies")
    report = explain(policies, request_body, tenant="acme", session_id="s1", protocol=protocol,
                     reply="hi")
    assert report["recorded"]["user"] == "hello there"


def test_explain_shows_a_prefilled_round_as_the_gateway_records_it() -> None:
    """``policy explain`` uses the record stage's own function: a final assistant message is a
    prefill, so the user text before it is recorded and the reply is the prefill and the reply."""
    policies = load_policy_set(REPO / "policies")
    request = {"model": "m", "messages": [{"role": "user", "content": "Give JSON"},
                                          {"role": "assistant", "content": "{"}]}
    report = explain(policies, request, tenant="acme", session_id="s1", reply='"a": 1}')
    assert report["recorded"]["user"] == "Give JSON"
    assert report["recorded"]["assistant"] == '{"a": 1}'
    assert report["injected"]["client_sends_history"] is False


def test_explain_cli_takes_a_messages_request(gateway: Gateway, tmp_path: Path) -> None:
    """``policy explain --protocol messages`` prints what a Messages request would record."""
    req = tmp_path / "req.json"
    req.write_text(json.dumps(MESSAGES_REQUEST))
    done = subprocess.run([sys.executable, "-m", "gateway", "policy", "explain", "--config", str(gateway.config_path),
                           "--request", str(req), "--session", "s1", "--tenant", "acme", "--protocol", "messages"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "user: hello there" in done.stdout and "protocol: messages" in done.stdout


def _bounded_policy(tmp_path: Path) -> Path:
    return default_policy_with(tmp_path, "max_length: 12000", "max_length: 200")


@pytest.mark.parametrize("protocol", ["responses", "messages"])
def test_window_is_bounded_in_characters_for_every_protocol(make_pgw: Any, tmp_path: Path, protocol: str) -> None:
    """Under max_length 200, the window of a Responses or Messages session stays within 200 characters
    (Agently's count) however many rounds it has, exactly as for chat."""
    gw: Gateway = make_pgw(policies=_bounded_policy(tmp_path))
    for i in range(6):
        text = f"round {i} " + "x" * 30
        if protocol == "responses":
            gw.openai(session="b").responses.create(model="m", input=text)
        else:
            anthropic_client(gw, session="b").messages.create(model="c", max_tokens=9,
                                                              messages=[{"role": "user", "content": text}])
    exported = gw.openai().get("/sessions/b", cast_to=object)
    assert len(exported["full_context"]) == 12
    assert 0 < context_length(exported["context_window"]) <= 200
    assert exported["context_window"][-1]["content"].endswith("round 5 " + "x" * 30)
