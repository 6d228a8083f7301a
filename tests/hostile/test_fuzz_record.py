"""Property-based: no client input can hide text it sent from the record (SPEC §3), on the
chat route under the default (``null`` keys) policy.

Each example is a new session's first request: messages under any role but system, developer
and assistant (``user``, ``tool``, ``function``, roles the gateway does not know, other cases),
with string, part-list (text, unknown part types, bare strings, text parts whose text is not a
string) or object content, optionally ending with an assistant prefill. Every text the client
put in them is a unique token; the property is that every token reaches the upstream and every
token is in the session's record. A fixed, derandomised budget keeps it to a second or two.
System and developer messages are left out: they are not new input (README, "Limitations").
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import httpx
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ACME_KEY, Gateway, Upstream

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}
_tokens = itertools.count()
TOKEN = re.compile(r"TOK\d{6}X")
token = st.builds(lambda _: f"TOK{next(_tokens):06d}X", st.just(None))

part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": token}),
    st.fixed_dictionaries({"type": st.sampled_from(["weird", "input_text", "refusal"]), "text": token}),
    st.fixed_dictionaries({"type": st.just("text"), "text": st.fixed_dictionaries({"inner": token})}),
    token,
)
content = st.one_of(token, st.lists(part, min_size=1, max_size=3),
                    st.dictionaries(st.sampled_from(["a", "b", "ticket"]), token, min_size=1, max_size=2))
role = st.sampled_from(["user", "user", "tool", "function", "User", "narrator", "Tool", "ipython"])
new_message = st.builds(lambda r, c: {"role": r, "content": c, **({"tool_call_id": "t1"} if r == "tool" else {})},
                        role, content)
prefill = st.one_of(st.none(), st.builds(lambda t: {"role": "assistant", "content": t}, token))
request = st.tuples(st.lists(new_message, min_size=1, max_size=4), prefill)


def tokens_in(value: Any) -> set[str]:
    return set(TOKEN.findall(orjson.dumps(value).decode()))


def test_every_text_a_client_sends_as_new_input_is_recorded(gateway: Gateway, upstream: Upstream) -> None:
    upstream.reply = lambda body: "noted"
    sessions = itertools.count()
    checked: list[int] = []

    with httpx.Client(base_url=gateway.base_url, timeout=30, headers=AUTH) as client:
        @settings(max_examples=60, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(request)
        def one(example: tuple[list[dict[str, Any]], dict[str, Any] | None]) -> None:
            messages, tail = example
            sent = [*messages, *([tail] if tail else [])]
            sid = f"fuzz-record-{next(sessions)}"
            resp = client.post("/chat/completions", json={"model": "standin", "messages": sent},
                               headers={"X-Session-Id": sid})
            assert resp.status_code == 200, resp.text
            wanted = tokens_in(sent)
            assert tokens_in(upstream.requests[-1]["messages"]) >= wanted  # the model saw all of it
            exported = client.get(f"/sessions/{sid}")
            assert exported.status_code == 200, exported.text
            missing = wanted - tokens_in(exported.json()["full_context"])
            assert not missing, (missing, sent, exported.json()["full_context"])
            checked.append(len(wanted))

        one()
    assert len(checked) >= 50 and sum(checked) >= 150
