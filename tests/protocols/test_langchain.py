"""LangChain's ``ChatOpenAI(use_responses_api=True)`` against the gateway: its Responses calls
carry the session, and the gateway's window gives it memory it did not send."""

from __future__ import annotations

import pytest

from tests.conftest import ACME_KEY, Gateway
from tests.protocols.upstream import ProtocolUpstream

langchain_openai = pytest.importorskip("langchain_openai")


@pytest.mark.parametrize("streaming", [False, True])
def test_chatopenai_with_the_responses_api(pgw: Gateway, proto: ProtocolUpstream, streaming: bool) -> None:
    """Two invocations with one session id: the second upstream request holds the first turn."""
    llm = langchain_openai.ChatOpenAI(model="gpt-4o-mini", use_responses_api=True, base_url=pgw.base_url,
                                      api_key=ACME_KEY, max_retries=0, streaming=streaming,
                                      default_headers={"X-Session-Id": f"lc-{streaming}"})
    first = llm.invoke("my name is Ada")
    assert first.text == "responses says: my name is Ada"
    second = llm.invoke("what is my name?")
    assert second.text == "responses says: what is my name?"
    sent = proto.bodies("/v1/responses")[-1]["input"]
    assert [item.get("content") for item in sent][:2] == ["my name is Ada", "responses says: my name is Ada"]
    assert len(pgw.openai().get(f"/sessions/lc-{streaming}", cast_to=object)["full_context"]) == 4
