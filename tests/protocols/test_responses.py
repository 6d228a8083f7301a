"""``POST /v1/responses`` through the gateway with the real ``openai`` SDK: sessions, chains held
by the gateway, streams, and the Responses routes on the chain."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ACME_KEY, GLOBEX_KEY, Gateway
from tests.protocols.upstream import ProtocolUpstream


def test_create_with_a_session_injects_the_window_as_input_items(pgw: Gateway, proto: ProtocolUpstream) -> None:
    """With X-Session-Id, turn two's upstream input holds turn one as input items before the new input."""
    client = pgw.openai(session="r1")
    first = client.responses.create(model="gpt-4o-mini", input="my name is Ada")
    assert first.output_text == "responses says: my name is Ada"
    second = client.responses.create(model="gpt-4o-mini", input="what is my name?", instructions="be brief")
    assert second.output_text == "responses says: what is my name?"
    sent = proto.bodies("/v1/responses")[-1]
    assert sent["instructions"] == "be brief"
    assert sent["input"] == [{"role": "user", "content": "my name is Ada"},
                             {"role": "assistant", "content": "responses says: my name is Ada"},
                             {"role": "user", "content": "what is my name?"}]
    exported = pgw.openai().get("/sessions/r1", cast_to=object)
    assert [m["content"] for m in exported["full_context"]] == [
        "my name is Ada", "responses says: my name is Ada", "what is my name?", "responses says: what is my name?"]


@pytest.mark.parametrize("stream", [False, True])
def test_previous_response_id_chain_is_held_by_the_gateway(pgw: Gateway, proto: ProtocolUpstream,
                                                           stream: bool) -> None:
    """Three chained turns: the upstream gets store false, no previous_response_id, and the history
    injected by the gateway; the chain is a session named after the first response id."""
    client = pgw.openai()
    ids: list[str] = []
    previous = None
    for turn in ("one", "two", "three"):
        kwargs: dict[str, str] = {"previous_response_id": previous} if previous else {}
        if stream:
            events = list(client.responses.create(model="gpt-4o-mini", input=f"turn {turn}", stream=True, **kwargs))
            assert [e.type for e in events][0] == "response.created"
            assert events[-1].type == "response.completed"
            text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
            rid = events[-1].response.id
            assert {e.response.id for e in events if hasattr(e, "response")} == {rid}
        else:
            resp = client.responses.create(model="gpt-4o-mini", input=f"turn {turn}", **kwargs)
            text, rid = resp.output_text, resp.id
        assert text == f"responses says: turn {turn}"
        ids.append(rid)
        previous = rid
    sent = proto.bodies("/v1/responses")
    assert all(body["store"] is False and "previous_response_id" not in body for body in sent)
    assert sent[0]["input"] == "turn one"
    assert [item["content"] for item in sent[2]["input"]] == [
        "turn one", "responses says: turn one", "turn two", "responses says: turn two", "turn three"]
    session = ids[0]
    assert ids[1].startswith(session + "_") and ids[2].startswith(session + "_")
    assert all(not rid.startswith("resp_up") for rid in ids)  # the provider's ids never reach the client
    exported = client.get(f"/sessions/{session}", cast_to=object)
    assert len(exported["full_context"]) == 6


def test_get_and_delete_a_response_within_the_tenant(pgw: Gateway) -> None:
    """GET returns the recorded response; another tenant gets 404; DELETE erases the chain."""
    client = pgw.openai()
    first = client.responses.create(model="gpt-4o-mini", input="remember 42")
    second = client.responses.create(model="gpt-4o-mini", input="and 43", previous_response_id=first.id)
    got = client.responses.retrieve(second.id)
    assert got.id == second.id and got.output_text == "responses says: and 43"
    with pytest.raises(openai.NotFoundError):
        pgw.openai(key=GLOBEX_KEY).responses.retrieve(second.id)
    with pytest.raises(openai.NotFoundError):
        pgw.openai(key=GLOBEX_KEY).responses.delete(second.id)
    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-4o-mini", input="again", previous_response_id=first.id)


def test_deleting_an_id_the_chain_never_minted_erases_nothing(pgw: Gateway) -> None:
    """A made-up id on a real chain (its prefix, another suffix) is 404 for DELETE as for GET, and
    the chain stays: the DELETE used to check only that the chain existed, and erased it."""
    client = pgw.openai()
    first = client.responses.create(model="gpt-4o-mini", input="keep me")
    made_up = f"{first.id}_0123456789abcdef"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made_up)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(made_up)
    assert client.responses.retrieve(first.id).output_text == "responses says: keep me"


def test_unknown_previous_response_id_is_404_before_the_upstream(pgw: Gateway, proto: ProtocolUpstream) -> None:
    """A previous_response_id the gateway did not mint (or another tenant's) is 404, nothing sent upstream."""
    client = pgw.openai()
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model="gpt-4o-mini", input="hi", previous_response_id="resp_provider123")
    assert err.value.body["code"] == "previous_response_not_found"  # type: ignore[index]
    theirs = pgw.openai(key=GLOBEX_KEY).responses.create(model="gpt-4o-mini", input="globex")
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-4o-mini", input="hi", previous_response_id=theirs.id)
    assert len(proto.bodies("/v1/responses")) == 1


def test_store_false_without_session_records_nothing(pgw: Gateway, proto: ProtocolUpstream) -> None:
    """store: false and no session: forwarded as is, no chain, no session."""
    resp = pgw.openai().responses.create(model="gpt-4o-mini", input="ephemeral", store=False)
    assert resp.id.startswith("resp_up")
    assert pgw.openai().get("/sessions", cast_to=object)["data"] == []


def test_bad_input_gets_openai_error_shape(pgw: Gateway) -> None:
    """A Responses input that is neither a string nor a list of items is 400 in OpenAI's error shape."""
    r = httpx.post(f"{pgw.base_url}/responses", json={"model": "m", "input": 5},
                   headers={"Authorization": f"Bearer {ACME_KEY}"})
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "'input' must be a string or a list of input items",
                                  "type": "invalid_request_error", "code": "invalid_input"}}


def test_a_prompt_template_without_input_is_a_round(pgw: Gateway, proto: ProtocolUpstream) -> None:
    """``input`` is optional (a reusable prompt): the request goes through with its ``prompt``,
    gets the session's window, and the round records the reply (no user message: the prompt's
    variables, like ``instructions``, are not new input)."""
    client = pgw.openai(session="tmpl")
    client.responses.create(model="gpt-4o-mini", input="my name is Ada")
    client.responses.create(model="gpt-4o-mini", prompt={"id": "pmpt_1", "variables": {"city": "Paris"}})
    sent = proto.bodies("/v1/responses")[-1]
    assert sent["prompt"] == {"id": "pmpt_1", "variables": {"city": "Paris"}}
    assert sent["input"][0] == {"role": "user", "content": "my name is Ada"}
    full = pgw.openai().get("/sessions/tmpl", cast_to=object)["full_context"]
    assert [m["role"] for m in full] == ["user", "assistant", "assistant"]


def test_previous_response_id_with_only_instructions_continues_the_chain(pgw: Gateway,
                                                                          proto: ProtocolUpstream) -> None:
    """A chained request with only ``instructions`` ("summarize") gets the chain's history as its
    input and is a response of the chain."""
    client = pgw.openai()
    first = client.responses.create(model="gpt-4o-mini", input="my name is Ada")
    second = client.responses.create(model="gpt-4o-mini", previous_response_id=first.id, instructions="summarize")
    assert second.id.startswith(first.id + "_")
    sent = proto.bodies("/v1/responses")[-1]
    assert sent["instructions"] == "summarize" and "previous_response_id" not in sent
    assert sent["input"] == [{"role": "user", "content": "my name is Ada"},
                             {"role": "assistant", "content": "responses says: my name is Ada"}]
    assert client.responses.retrieve(second.id).status == "completed"


def test_a_provider_response_id_is_a_forwarded_route(pgw: Gateway) -> None:
    """GET of an id the gateway did not mint goes the forwarded-route way when the upstream's
    forward_routes allow ``responses``; otherwise it is a 404 saying where a response is."""
    r = httpx.get(f"{pgw.base_url}/responses/resp_provider123", headers={"Authorization": f"Bearer {ACME_KEY}"})
    assert r.status_code == 404
    assert "forward_routes" in r.json()["error"]["message"]


def test_a_background_response_on_a_recorded_session_is_refused(pgw: Gateway, proto: ProtocolUpstream,
                                                                make_gateway: Any) -> None:
    """Its output arrives after the request (the client polls for it), where nothing records it,
    and under gateway-held state it would go upstream with ``store: false``, which background
    mode refuses. So it is refused, before the upstream, on a gateway-held chain and with
    X-Session-Id; without a session, on a provider-held upstream, it goes through untouched."""
    client = pgw.openai()
    for kwargs in ({}, {"extra_headers": {"X-Session-Id": "bg"}}):
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model="gpt-4o-mini", input="later please", background=True, **kwargs)
        assert err.value.code == "background_not_supported" and "X-Session-Id" in err.value.message
    assert proto.bodies("/v1/responses") == []
    held_by_provider = make_gateway(name="provider-held", upstreams=[
        {"name": "oa", "base_url": f"{proto.url}/v1", "models": ["*"], "responses_state": "provider"}])
    held_by_provider.openai().responses.create(model="gpt-4o-mini", input="later please", background=True)
    assert [b.get("background") for b in proto.bodies("/v1/responses")] == [True]


def test_a_provider_held_conversation_is_refused_where_the_gateway_holds_conversations(
        pgw: Gateway, proto: ProtocolUpstream) -> None:
    """``conversation`` would keep the conversation at the provider, outside the gateway's
    encryption, erasure and audit, which gateway-held state promises it does not."""
    with pytest.raises(openai.BadRequestError) as err:
        pgw.openai().responses.create(model="gpt-4o-mini", input="hi", conversation="conv_123")
    assert err.value.code == "conversation_not_supported" and "previous_response_id" in err.value.message
    assert proto.bodies("/v1/responses") == []


def test_input_items_of_a_held_response_are_listed_within_the_tenant(pgw: Gateway) -> None:
    """The SDK's input_items.list gives a gateway-held response's new input, as recorded, newest
    first by default, paged by limit and after; another tenant gets 404, a bad page 400."""
    client = pgw.openai()
    first = client.responses.create(model="gpt-4o-mini", input="remember 42")
    second = client.responses.create(model="gpt-4o-mini", previous_response_id=first.id, input=[
        {"role": "user", "content": "u1"}, {"type": "function_call_output", "call_id": "c1", "output": "42"},
        {"role": "user", "content": [{"type": "input_text", "text": "u2"}]}])
    listed = client.responses.input_items.list(second.id).data
    assert [i.type for i in listed] == ["message", "function_call_output", "message"]
    assert listed[0].content[0].text == "u2" and listed[2].content[0].text == "u1"  # type: ignore[union-attr]
    assert listed[1].call_id == "c1" and listed[1].output == "42"  # type: ignore[union-attr]
    assert len({i.id for i in listed}) == 3
    assert [i.content[0].text for i in client.responses.input_items.list(first.id).data] == [  # type: ignore[union-attr]
        "remember 42"]
    page = client.responses.input_items.list(second.id, order="asc", limit=2)
    assert [i.type for i in page.data] == ["message", "function_call_output"] and page.has_more
    rest = client.responses.input_items.list(second.id, order="asc", limit=2, after=page.data[-1].id)
    assert [i.content[0].text for i in rest.data] == ["u2"] and not rest.has_more  # type: ignore[union-attr]
    with pytest.raises(openai.NotFoundError):
        pgw.openai(key=GLOBEX_KEY).responses.input_items.list(second.id)
    with pytest.raises(openai.BadRequestError):
        client.responses.input_items.list(second.id, limit=0)
    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(first.id)


def test_cancelling_a_held_response_says_it_cannot_be(pgw: Gateway) -> None:
    """cancel on a gateway-held response is 400 response_not_cancellable (it was never a
    background one), another tenant's is 404; neither is a forwarded-route refusal."""
    client = pgw.openai()
    held = client.responses.create(model="gpt-4o-mini", input="done already")
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.cancel(held.id)
    assert refused.value.code == "response_not_cancellable"
    with pytest.raises(openai.NotFoundError):
        pgw.openai(key=GLOBEX_KEY).responses.cancel(held.id)


def test_a_response_made_with_a_session_header_is_looked_up_with_a_clear_404(pgw: Gateway) -> None:
    """A response made with X-Session-Id went upstream with store: false, so the provider holds
    nothing: the SDK's retrieve of its id was a 403 telling the operator to allow the provider's
    responses route, which could never find it. It is a 404 saying where the response is."""
    client = pgw.openai(session="resp-lookup")
    made = client.responses.create(model="gpt-4o-mini", input="hello")
    for call in (lambda: client.responses.retrieve(made.id), lambda: client.responses.input_items.list(made.id),
                 lambda: client.responses.delete(made.id)):
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        assert "GET /v1/sessions/" in str(caught.value)


def test_retrieve_with_stream_is_refused_in_openai_shape(pgw: Gateway) -> None:
    """``responses.retrieve(id, stream=True)`` on a gateway-held response gets 400
    ``stream_not_supported`` (a JSON body would read as an empty stream); without stream it is served."""
    client = pgw.openai()
    first = client.responses.create(model="gpt-4o-mini", input="hello")
    with pytest.raises(openai.BadRequestError) as err:
        for _ in client.responses.retrieve(first.id, stream=True):
            pass
    assert err.value.status_code == 400
    assert err.value.body["code"] == "stream_not_supported"  # type: ignore[index]
    assert client.responses.retrieve(first.id, stream=False).id == first.id
    for off in ("0", "False", ""):  # query flags that say no stream are served as JSON
        resp = client.get(f"/responses/{first.id}?stream={off}", cast_to=object)
        assert resp["id"] == first.id, off  # type: ignore[index]


def test_store_false_continuation_reads_the_chain_and_is_not_kept_in_it(pgw: Gateway, proto: ProtocolUpstream) -> None:
    """``store: false`` with ``previous_response_id``: the chain's history goes upstream, but the
    response is not added to the chain (OpenAI would not store it): its id is the provider's, it
    cannot be retrieved, and a later turn of the chain does not carry it."""
    client = pgw.openai()
    first = client.responses.create(model="gpt-4o-mini", input="my code is X-1")
    off = client.responses.create(model="gpt-4o-mini", input="SECRET-DO-NOT-STORE", previous_response_id=first.id,
                                  store=False)
    assert off.output_text == "responses says: SECRET-DO-NOT-STORE"
    assert off.id.startswith("resp_up")  # the provider's: the gateway minted no chain id for it
    assert [item["content"] for item in proto.bodies("/v1/responses")[-1]["input"]] == [
        "my code is X-1", "responses says: my code is X-1", "SECRET-DO-NOT-STORE"]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(off.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-4o-mini", input="on", previous_response_id=off.id)
    client.responses.create(model="gpt-4o-mini", input="next", previous_response_id=first.id)
    assert [item["content"] for item in proto.bodies("/v1/responses")[-1]["input"]] == [
        "my code is X-1", "responses says: my code is X-1", "next"]
    exported = client.get(f"/sessions/{first.id}", cast_to=object)
    assert "SECRET-DO-NOT-STORE" not in str(exported) and len(exported["full_context"]) == 4


def test_a_built_in_tool_answer_without_its_call_is_refused_when_the_window_cannot_carry_it(
        pgw: Gateway, proto: ProtocolUpstream) -> None:
    """A computer-use loop continued by ``previous_response_id`` sends only the
    ``computer_call_output``; the window keeps no ``computer_call``, so the model would get an
    answer without its call (the provider refuses that). 400 ``tool_call_not_in_window`` before
    anything is sent, saying what to do; the same answer sent with its call goes through."""
    client = pgw.openai()
    first = client.responses.create(model="gpt-4o-mini", input="do it")
    answer = {"type": "computer_call_output", "call_id": "call_CUA123",
              "output": {"type": "computer_screenshot", "image_url": "data:image/png;base64,iVBORw0KGgo="}}
    approval = {"type": "mcp_approval_response", "approval_request_id": "mcpr_1", "approve": True}
    sent = len(proto.bodies("/v1/responses"))
    for item in (answer, approval):
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model="gpt-4o-mini", previous_response_id=first.id, input=[item])  # type: ignore[list-item]
        assert err.value.body["code"] == "tool_call_not_in_window"  # type: ignore[index]
        assert "input[0]" in err.value.message and "responses_state is provider" in err.value.message
    assert len(proto.bodies("/v1/responses")) == sent
    call = {"type": "computer_call", "id": "cu_1", "call_id": "call_CUA123", "status": "completed",
            "action": {"type": "screenshot"}, "pending_safety_checks": []}
    client.responses.create(model="gpt-4o-mini", previous_response_id=first.id, input=[call, answer])  # type: ignore[list-item]
    assert [i.get("type") for i in proto.bodies("/v1/responses")[-1]["input"]][-2:] == [
        "computer_call", "computer_call_output"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_chain_response_says_what_the_client_asked_for(pgw: Gateway, proto: ProtocolUpstream, stream: bool) -> None:
    """The gateway strips ``previous_response_id`` and sends ``store: false`` upstream; the client's
    response objects said so (``previous_response_id: null``, ``store: false``) although the client
    sent both and the gateway keeps the response. Now their own members hold what the client asked
    for, and nothing nested changes: an echoed schema's ``"store": false`` (a property it forbids)
    stays false. A ``store: false`` continuation gets its ``previous_response_id`` back too."""
    client = pgw.openai()
    first = client.responses.create(model="gpt-4o-mini", input="one")
    assert first.store is True and first.previous_response_id is None
    schema = {"type": "object", "properties": {"store": False, "previous_response_id": None, "a": {"type": "string"}}}
    fmt: Any = {"format": {"type": "json_schema", "name": "x", "strict": False, "schema": schema}}
    for store in (True, False):
        kwargs: dict[str, Any] = {"previous_response_id": first.id, "text": fmt, **({} if store else {"store": False})}
        if stream:
            events = list(client.responses.create(model="gpt-4o-mini", input="two", stream=True, **kwargs))
            objects = [e.response for e in events if hasattr(e, "response")]
            assert len(objects) == 3  # created, in_progress, completed
        else:
            objects = [client.responses.create(model="gpt-4o-mini", input="two", **kwargs)]
        assert all(o.previous_response_id == first.id and o.store is store for o in objects)
        assert all(o.text.format.schema_ == schema for o in objects)  # type: ignore[union-attr]
        assert proto.bodies("/v1/responses")[-1]["store"] is False  # what went upstream is unchanged
