"""Property-based: no client input can hide text it sent from the record (SPEC §3), on the
chat route under the default (``null`` keys) policy.

Each example is a new session's first request: messages under any role but system, developer
and assistant (``user``, ``tool``, ``function``, roles the gateway does not know, other cases),
with string, part-list (text, unknown part types, text parts whose text is not a string; a bare
string as a part is refused with 400, as OpenAI refuses it) or object content, optionally ending
with an assistant prefill. Every text the client
put in them is a unique token; the property is that every token reaches the upstream and every
token is in the session's record. A fixed, derandomised budget keeps it to a second or two.
System and developer messages are left out: they are not new input (README, "Limitations").
Binary files, images and audio parts, well formed or not, carry no token but in a file's name: the
media policy records them as placeholders by default; the property holds the text beside them
(and a document's title and context) to the record. Text files and text documents carry tokens:
they are text the model reads.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ACME_KEY, Gateway, Upstream

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}
_tokens = itertools.count()
TOKEN = re.compile(r"TOK\d{6}X")
token = st.builds(lambda _: f"TOK{next(_tokens):06d}X", st.just(None))

# a media part's reference in any shape a client may send, well formed or not (a string where an
# object belongs, a number, a list, an object of odd fields): the record holds a placeholder for it
junk = st.one_of(st.just("https://example.test/x.png"), st.integers(), st.none(), st.lists(st.integers(), max_size=2),
                 st.fixed_dictionaries({"url": st.one_of(st.integers(), st.just("data:image/png;base64,AAAA"))}),
                 st.fixed_dictionaries({"file_data": st.lists(st.none(), max_size=1)}))
media_part = st.one_of(
    st.builds(lambda v: {"type": "image_url", "image_url": v}, junk),
    st.builds(lambda v: {"type": "file", "file": v}, junk),
    st.builds(lambda v: {"type": "input_audio", "input_audio": v}, junk),
    # a text file is text the model reads: its text and its name are recorded
    st.builds(lambda t, n: {"type": "file", "file": {"file_data": f"data:text/plain,{t}", "filename": n}},
              token, token),
    st.builds(lambda n: {"type": "file", "file": {"file_data": "data:application/pdf;base64,AAAA", "filename": n}},
              token),
)
part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": token}),
    st.fixed_dictionaries({"type": st.sampled_from(["weird", "input_text", "refusal"]), "text": token}),
    st.fixed_dictionaries({"type": st.just("text"), "text": st.fixed_dictionaries({"inner": token})}),
    media_part,
)
content = st.one_of(token, st.lists(part, min_size=1, max_size=3),  # a bare string as a part is a 400
                    st.dictionaries(st.sampled_from(["a", "b", "ticket"]), token, min_size=1, max_size=2))
role = st.sampled_from(["user", "user", "tool", "function", "User", "narrator", "Tool", "ipython"])
new_message = st.builds(lambda r, c: {"role": r, "content": c, **({"tool_call_id": "t1"} if r == "tool" else {})},
                        role, content)
prefill = st.one_of(st.none(), st.builds(lambda t: {"role": "assistant", "content": t}, token))
chat = st.builds(lambda ms, tail: {"model": "standin", "messages": [*ms, *([tail] if tail else [])]},
                 st.lists(new_message, min_size=1, max_size=4), prefill)

block = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": token}),
    st.fixed_dictionaries({"type": st.sampled_from(["search_result", "weird"]), "title": token,
                           "content": st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": token}),
                                               max_size=2)}),
    # a text document is text the model reads, title and context too (also beside a binary source)
    st.builds(lambda d, t, c: {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": d},
                               "title": t, "context": c}, token, token, token),
    st.builds(lambda d: {"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": d}]}},
              token),
    st.builds(lambda v, t, c: {"type": "document", "source": v, "title": t, "context": c}, junk, token, token),
    st.builds(lambda kind, v: {"type": kind, "source": v}, st.sampled_from(["image", "document"]), junk),
)
tool_result = st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": st.just("t1"),
                                     "content": st.one_of(token, st.lists(block, min_size=1, max_size=3))})
anthropic_user = st.builds(lambda c: {"role": "user", "content": c},
                           st.one_of(token, st.lists(st.one_of(block, tool_result), min_size=1, max_size=3)))
messages = st.builds(lambda ms, tail: {"model": "claude-x", "max_tokens": 64,
                                       "messages": [*ms, *([tail] if tail else [])]},
                     st.lists(anthropic_user, min_size=1, max_size=3), prefill)

input_part = st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["input_text", "weird"]), "text": token}),
                       token,
                       st.builds(lambda v: {"type": "input_image", "image_url": v}, junk),
                       st.builds(lambda v: {"type": "input_file", "file_data": v}, junk),
                       st.builds(lambda t, n: {"type": "input_file", "file_data": f"data:text/plain,{t}",
                                               "filename": n}, token, token))
item = st.one_of(
    st.builds(lambda r, c: {"type": "message", "role": r, "content": c}, st.sampled_from(["user", "User", "narrator"]),
              st.one_of(token, st.lists(input_part, min_size=1, max_size=2))),
    st.builds(lambda kind, out: {"type": kind, "call_id": "c1", "output": out},
              st.sampled_from(["function_call_output", "custom_tool_call_output", "local_shell_call_output",
                               "shell_call_output"]), token),
)
responses = st.builds(lambda items, tail: {"model": "standin", "input": [
    *items, *([{"type": "message", "role": "assistant", "content": tail["content"]}] if tail else [])]},
    st.lists(item, min_size=1, max_size=3), prefill)

ROUTES = {"/chat/completions": chat, "/messages": messages, "/responses": responses}


def tokens_in(value: Any) -> set[str]:
    return set(TOKEN.findall(orjson.dumps(value).decode()))


@pytest.mark.parametrize("route", ROUTES)
def test_every_text_a_client_sends_as_new_input_is_recorded(make_gateway: Callable[..., Gateway], upstream: Upstream,
                                                            route: str) -> None:
    upstream.reply = lambda body: "noted"
    gateway = make_gateway(upstreams=[
        {"name": "standin", "base_url": upstream.url, "models": ["*"]},
        {"name": "standin-anthropic", "base_url": upstream.url, "models": ["*"], "protocol": "anthropic"}])
    sessions = itertools.count()
    checked: list[int] = []

    with httpx.Client(base_url=gateway.base_url, timeout=30, headers=AUTH) as client:
        @settings(max_examples=40, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(ROUTES[route])
        def one(body: dict[str, Any]) -> None:
            sid = f"fuzz-record-{next(sessions)}"
            resp = client.post(route, json=body, headers={"X-Session-Id": sid})
            assert resp.status_code == 200, resp.text
            wanted = tokens_in(body)
            assert tokens_in(upstream.requests[-1]) >= wanted  # the model saw all of it
            exported = client.get(f"/sessions/{sid}")
            assert exported.status_code == 200, exported.text
            missing = wanted - tokens_in(exported.json()["full_context"])
            assert not missing, (missing, body, exported.json()["full_context"])
            checked.append(len(wanted))

        one()
    assert len(checked) >= 35 and sum(checked) >= 100
