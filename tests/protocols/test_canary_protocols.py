"""The canary guarantees hold for every protocol: text outside the policy's whitelist, sent
through Chat Completions, Responses or Messages (JSON and stream, system prompts and tool
results included), is written to no file, while the whitelisted slot is recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, Gateway
from tests.protocols.conftest import anthropic_client
from tests.protocols.upstream import ProtocolUpstream
from tests.test_canary import assert_absent, new_canary, written


def _minimal(tmp_path: Path) -> Path:
    folder = tmp_path / "pol"
    folder.mkdir(exist_ok=True)
    text = (REPO / "policies/default.yaml").read_text()
    text = text.replace("input_keys: null", 'input_keys: ["input"]').replace("reply_keys: null", "reply_keys: []")
    (folder / "default.yaml").write_text(text)
    return folder


def _prompt(canary: str) -> str:
    return f"[INFO]:\n- secret: {canary}\n\n[INPUT]:\nwhitelisted question\n\n[OUTPUT]:"


@pytest.mark.parametrize("protocol", ["chat", "responses", "messages"])
@pytest.mark.parametrize("stream", [False, True])
def test_canary_outside_the_whitelist_is_absent_from_every_file(make_pgw: Any, proto: ProtocolUpstream,
                                                                tmp_path: Path, protocol: str, stream: bool) -> None:
    """Only the whitelisted input is recorded; the canary (in the prompt, the system prompt and the
    echoing reply) is in no byte the gateway wrote."""
    gw: Gateway = make_pgw(policies=_minimal(tmp_path))
    canary = new_canary()
    sid = f"canary-{protocol}-{stream}"
    if protocol == "chat":
        client = gw.openai(session=sid)
        messages: list[Any] = [{"role": "system", "content": canary}, {"role": "user", "content": _prompt(canary)}]
        if stream:
            proto_stream = client.chat.completions.create(model="m", messages=messages, stream=True)
            list(proto_stream)
        else:
            client.chat.completions.create(model="m", messages=messages)
    elif protocol == "responses":
        client = gw.openai(session=sid)
        result = client.responses.create(model="m", instructions=canary, input=_prompt(canary), stream=stream)
        if stream:
            list(result)  # type: ignore[arg-type]
    else:
        anthropic = anthropic_client(gw, session=sid)
        kwargs: dict[str, Any] = {"model": "c", "max_tokens": 20, "system": canary,
                                  "messages": [{"role": "user", "content": _prompt(canary)}]}
        if stream:
            with anthropic.messages.stream(**kwargs) as s:
                s.get_final_message()
        else:
            anthropic.messages.create(**kwargs)
    full = gw.openai().get(f"/sessions/{sid}", cast_to=object)["full_context"]
    assert full == [{"role": "user", "content": "[input]:\nwhitelisted question"}]
    assert_absent(canary, written(gw))
