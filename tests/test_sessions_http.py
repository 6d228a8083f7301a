"""Sessions over HTTP (SPEC §2): list, export, import, reset and delete, each scoped to the tenant
of the client key, so the same id under two tenants is two sessions."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from agently.core.session.Session import Session

from tests.conftest import ACME_KEY, GLOBEX_KEY, Gateway, Upstream


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


@pytest.fixture
def acme(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.base_url, headers={"Authorization": f"Bearer {ACME_KEY}"}) as client:
        yield client


@pytest.fixture
def globex(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.base_url, headers={"Authorization": f"Bearer {GLOBEX_KEY}"}) as client:
        yield client


def chat(client: httpx.Client, session: str, text: str) -> str:
    resp = client.post("/chat/completions", headers={"X-Session-Id": session},
                       json={"model": "standin", "messages": [user(text)]})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["choices"][0]["message"]["content"])


def agently_json(**data: Any) -> str:
    """The exact text Agently's ``Session.get_json_session()`` produces for *data*."""
    return str(Session().load_json_session(json.dumps(data)).get_json_session())


def test_list_shows_each_session_with_its_rounds(acme: httpx.Client) -> None:
    """GET /v1/sessions lists the tenant's sessions with how many rounds each holds."""
    chat(acme, "s-one", "hello")
    chat(acme, "s-two", "hello")
    chat(acme, "s-two", "again")
    listed = acme.get("/sessions").json()
    assert listed["object"] == "list"
    assert {s["id"]: s["rounds"] for s in listed["data"]} == {"s-one": 1, "s-two": 2}


def test_export_is_the_session_in_agently_form(acme: httpx.Client) -> None:
    """GET /v1/sessions/{id} returns id, full_context, context_window, memo and settings as Agently writes them."""
    reply = chat(acme, "alice-1", "hello")
    doc = acme.get("/sessions/alice-1").json()
    assert doc == {"id": "alice-1", "auto_resize": True, "full_context": [user("hello"), assistant(reply)],
                   "context_window": [user("hello"), assistant(reply)], "memo": None,
                   "session_settings": {"max_length": 12000, "input_keys": None, "reply_keys": None}}
    loaded = Session().load_json_session(json.dumps(doc))
    assert json.loads(loaded.get_json_session())["full_context"] == doc["full_context"]


def test_import_takes_agently_output_as_is(acme: httpx.Client, upstream: Upstream) -> None:
    """The exact text of Agently's get_json_session() loads, exports back unchanged but for its
    session_settings (the policy's apply, as after any round), and steers the next turn."""
    text = agently_json(id="from-agently", full_context=[user("q0"), assistant("a0"), user("q1"), assistant("a1")],
                        context_window=[user("q1"), assistant("a1")], memo="likes tea",
                        session_settings={"max_length": 12000, "input_keys": None, "reply_keys": None})
    resp = acme.put("/sessions/worker-7", content=text.encode(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"id": "worker-7", "imported_messages": 4}
    assert acme.get("/sessions/worker-7").json() == {
        **json.loads(text), "id": "worker-7", "session_settings": {"max_length": 12000, "input_keys": None,
                                                                   "reply_keys": None}}
    chat(acme, "worker-7", "q2")
    assert upstream.requests[-1]["messages"] == [user("q1"), assistant("a1"),
                                                 user("[CHAT SESSION MEMO]:\nlikes tea\n\n[INPUT]:\nq2\n\n[OUTPUT]:")]


def test_reset_clears_the_window_and_keeps_full_context(acme: httpx.Client, upstream: Upstream) -> None:
    """POST .../reset empties the window (nothing injected next turn) while full_context stays whole."""
    replies = [chat(acme, "resettable", "q1"), chat(acme, "resettable", "q2")]
    resp = acme.post("/sessions/resettable/reset")
    assert resp.status_code == 200 and resp.json() == {"id": "resettable", "reset": True}
    doc = acme.get("/sessions/resettable").json()
    assert doc["context_window"] == []
    assert doc["full_context"] == [user("q1"), assistant(replies[0]), user("q2"), assistant(replies[1])]
    chat(acme, "resettable", "q3")
    assert upstream.requests[-1]["messages"] == [user("q3")]


def test_delete_removes_the_session(acme: httpx.Client, upstream: Upstream) -> None:
    """DELETE makes the session 404, drops it from the list, and the id starts afresh."""
    chat(acme, "doomed", "remember me")
    assert acme.delete("/sessions/doomed").json() == {"id": "doomed", "deleted": True, "purge": "complete"}
    gone = acme.get("/sessions/doomed")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
    assert acme.delete("/sessions/doomed").status_code == 404
    assert acme.post("/sessions/doomed/reset").status_code == 404
    assert acme.get("/sessions").json()["data"] == []
    chat(acme, "doomed", "who am I?")
    assert upstream.requests[-1]["messages"] == [user("who am I?")]


def test_same_id_under_two_tenants_is_two_sessions(acme: httpx.Client, globex: httpx.Client,
                                                   upstream: Upstream) -> None:
    """Acme and globex using one id each get their own history; neither can read, reset or delete the other's."""
    acme_reply = chat(acme, "shared", "acme secret")
    chat(globex, "shared", "globex hello")
    assert upstream.requests[-1]["messages"] == [user("globex hello")]
    chat(acme, "acme-only", "private")
    for resp in (globex.get("/sessions/acme-only"), globex.post("/sessions/acme-only/reset"),
                 globex.delete("/sessions/acme-only")):
        assert resp.status_code == 404 and resp.json()["error"]["type"] == "not_found_error"
    assert [s["id"] for s in globex.get("/sessions").json()["data"]] == ["shared"]
    assert globex.get("/sessions/shared").json()["full_context"][0] == user("globex hello")
    assert acme.get("/sessions/shared").json()["full_context"][:2] == [user("acme secret"), assistant(acme_reply)]
    assert acme.get("/sessions/acme-only").status_code == 200


def test_a_gateway_key_is_refused_as_a_session_id(gateway: Gateway, acme: httpx.Client) -> None:
    """A key sent as X-Session-Id (or as the session of an import), alone or between separators
    (``x:<key>``, ``<key>.``), would be stored, listed and logged in plaintext: 400
    ``key_in_session_id`` before anything keeps it, the key not echoed; ids that merely share
    words with a key are fine."""
    for sid in (GLOBEX_KEY, ACME_KEY, f"x:{GLOBEX_KEY}", f"{ACME_KEY}:1", f"{GLOBEX_KEY}.", f"a@{ACME_KEY}+b"):
        resp = acme.post("/chat/completions", headers={"X-Session-Id": sid},
                         json={"model": "standin", "messages": [user("hi")]})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "key_in_session_id", sid
        assert GLOBEX_KEY not in resp.text and ACME_KEY not in resp.text
    imported = acme.put(f"/sessions/{GLOBEX_KEY}", content=agently_json(full_context=[user("x")]))
    assert imported.status_code == 400 and imported.json()["error"]["code"] == "key_in_session_id"
    assert chat(acme, "sg-demo:acme.globex", "fine") and chat(acme, "acme:alice@example.com", "fine")
    assert sorted(s["id"] for s in acme.get("/sessions").json()["data"]) == ["acme:alice@example.com",
                                                                          "sg-demo:acme.globex"]
    logged = gateway.log_path.read_text()
    assert GLOBEX_KEY not in logged and ACME_KEY not in logged and GLOBEX_KEY.encode() not in gateway.stored_bytes()


def test_import_into_a_session_with_other_history_is_refused(acme: httpx.Client) -> None:
    """Recorded history is append-only: importing a different history answers 409 and changes nothing."""
    reply = chat(acme, "kept", "original")
    before = acme.get("/sessions/kept").json()
    other = {"full_context": [user("forged"), assistant("history")]}
    resp = acme.put("/sessions/kept", json=other)
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "conflict"
    assert acme.get("/sessions/kept").json() == before
    longer = {**before, "full_context": [*before["full_context"], user("later"), assistant("more")]}
    assert acme.put("/sessions/kept", json=longer).json()["imported_messages"] == 2
    assert acme.get("/sessions/kept").json()["full_context"][:2] == [user("original"), assistant(reply)]


@pytest.mark.parametrize("doc", [
    [],
    {"full_context": "not a list"},
    {"full_context": [{"content": "no role"}]},
    {"full_context": [{"role": "user", "content": 5}]},
    {"full_context": [], "session_settings": "nope"},
    {"full_context": [], "memo": 3},
], ids=["array", "context-string", "no-role", "content-int", "settings-string", "memo-int"])
def test_invalid_session_documents_are_refused(acme: httpx.Client, doc: Any) -> None:
    """A document Agently could not have written answers 400 invalid_session and stores nothing."""
    resp = acme.put("/sessions/bad-doc", json=doc)
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert acme.get("/sessions/bad-doc").status_code == 404


@pytest.mark.parametrize(("body", "field"), [
    (r'{"full_context": [{"role": "user", "content": "half \ud83d"}]}', "full_context[0].content"),
    (r'{"full_context": [], "context_window": [{"role": "user", "content": "\udc00"}]}', "context_window[0].content"),
    (r'{"full_context": [], "memo": {"facts": ["x", "\ud83d"]}}', "memo.facts[1]"),
], ids=["content", "window", "memo"])
def test_a_lone_surrogate_is_refused_naming_its_field(acme: httpx.Client, body: str, field: str) -> None:
    """An import holding a lone surrogate escape, which Agently's json5 reads but no UTF-8 body can
    carry to a provider, answers 400 invalid_session naming the field, and stores nothing."""
    resp = acme.put("/sessions/half", content=body.encode(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_session"
    assert f"'{field}' holds a lone surrogate" in error["message"]
    assert acme.get("/sessions/half").status_code == 404


def test_an_anthropic_client_reads_its_sessions_with_x_api_key(gateway: Gateway, acme: httpx.Client) -> None:
    """The ``anthropic`` SDK's generic ``get`` sends its key in ``x-api-key``: the sessions routes
    take it as the model routes do (they answered 401 "send Authorization")."""
    import anthropic
    chat(acme, "shared", "hello")
    client = anthropic.Anthropic(base_url=gateway.url, api_key=ACME_KEY, max_retries=0)
    exported = client.get("/v1/sessions/shared", cast_to=object)
    assert isinstance(exported, dict) and exported["full_context"][0] == user("hello")
    listed = client.get("/v1/sessions", cast_to=object)
    assert isinstance(listed, dict) and [s["id"] for s in listed["data"]] == ["shared"]
    memo = httpx.get(f"{gateway.base_url}/sessions/shared/memo", headers={"x-api-key": GLOBEX_KEY})
    assert memo.status_code == 404  # another tenant's key still finds nothing


FREE_TEXT = [user("my password is hunter2"), assistant("noted")]
KEYED = [user("[input.ticket_id]:\nT-1001\n[input.intent]:\nrefund"),
         assistant("[resolution]:\nrefund issued\n[risk_level]:\nlow")]


def test_an_import_is_held_to_the_policy_of_the_model_it_names(gateway: Gateway, acme: httpx.Client) -> None:
    """``?model=`` and the document's ``model`` choose the policy an import is held to: for gpt-4o a
    support:* session of acme is support-tickets' (keyed fields only), so free text is refused and
    a keyed history is recorded under that policy; the two ways must agree when both are given."""
    for how in ({"params": {"model": "gpt-4o"}, "json": {"full_context": FREE_TEXT}},
                {"json": {"model": "gpt-4o", "full_context": FREE_TEXT}}):
        resp = acme.put("/sessions/support:77", **how)  # type: ignore[arg-type]
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"]["code"] == "import_not_whitelisted" and "hunter2" not in resp.text
    assert acme.get("/sessions/support:77").status_code == 404
    clash = acme.put("/sessions/support:77", params={"model": "gpt-4o"},
                     json={"model": "gpt-4o-mini", "full_context": KEYED})
    assert clash.status_code == 400 and "'?model='" in clash.json()["error"]["message"], clash.text
    ok = acme.put("/sessions/support:77", params={"model": "gpt-4o"}, json={"full_context": KEYED})
    assert ok.status_code == 200 and ok.json()["imported_messages"] == 2, ok.text
    assert [e["policy_id"] for e in gateway.audit_entries() if e["event"] == "import"] == ["support-tickets"]


def test_a_session_write_whose_policy_depends_on_the_model_needs_the_model(acme: httpx.Client,
                                                                          globex: httpx.Client) -> None:
    """Without a model, acme's support:1 would be held to multi-user-chat (free text) while its gpt-4o
    rounds run under support-tickets (keyed): an import, ``add``, ``set`` and a memo write there are
    400 ``model_required`` saying to pass ``?model=``, and nothing is stored. Where no policy that
    names models matches (globex, or another session id) none is needed; ``reset`` writes no text."""
    writes = [("PUT", "/sessions/support:1", {"full_context": FREE_TEXT}),
              ("POST", "/sessions/support:1/history", {"op": "add", "messages": FREE_TEXT}),
              ("POST", "/sessions/support:1/history", {"op": "set", "messages": FREE_TEXT}),
              ("PUT", "/sessions/support:1/memo", {"memo": "free text secret"})]
    for method, path, body in writes:
        resp = acme.request(method, path, json=body)
        assert resp.status_code == 400, (path, resp.text)
        error = resp.json()["error"]
        assert error["code"] == "model_required" and error["type"] == "invalid_request_error"
        assert "'support-tickets'" in error["message"] and "?model=" in error["message"]
    assert acme.get("/sessions/support:1").status_code == 404
    assert globex.put("/sessions/support:1", json={"full_context": FREE_TEXT}).status_code == 200
    assert acme.put("/sessions/acme:j1", json={"full_context": FREE_TEXT}).status_code == 200
    assert acme.post("/sessions/support:1/history", params={"model": "gpt-4o"},
                     json={"op": "add", "messages": KEYED}).status_code == 200
    assert acme.post("/sessions/support:1/reset").status_code == 200


ROUTED = [{"name": "openai", "base_url": "", "models": ["gpt-4o*"]},
          {"name": "claude", "base_url": "", "protocol": "anthropic", "models": ["claude-*"]}]


def routed_gateway(make_gateway: Callable[..., Gateway], upstream: Upstream) -> Gateway:
    """A gateway whose upstreams serve gpt-4o* (openai) and claude-* (anthropic) only."""
    return make_gateway(upstreams=[{**up, "base_url": upstream.url} for up in ROUTED])


@pytest.mark.parametrize("model", ["nomodel", "GPT-4o"], ids=["made-up", "wrong-case"])
def test_a_session_write_must_name_a_model_a_round_could_use(make_gateway: Callable[..., Gateway],
                                                             upstream: Upstream, model: str) -> None:
    """A model no upstream serves (made up, or a served one in another case) chose the policy of
    that name: multi-user-chat took free text and a memo into acme's support:* session, whose
    gpt-4o rounds run under support-tickets and would send them to the model. An import, ``add``,
    ``set`` and a memo write naming it (``?model=``, the body, or the body's last ``model``, which
    a round reads too) are 400 ``model_not_found`` in a round's words, and nothing is stored."""
    gateway = routed_gateway(make_gateway, upstream)
    client = httpx.Client(base_url=gateway.base_url, headers={"Authorization": f"Bearer {ACME_KEY}"})
    round_ = client.post("/chat/completions", headers={"X-Session-Id": "support:t1"},
                         content=f'{{"model": "gpt-4o", "model": "{model}", "messages": [{{"role": "user", '
                                 '"content": "hi"}]}')
    assert round_.status_code == 400 and round_.json()["error"]["code"] == "model_not_found", round_.text
    says = (f"no upstream serves model '{model}'; configured upstreams: openai; no anthropic upstream serves "
            f"model '{model}'; configured anthropic upstreams: claude")
    assert round_.json()["error"]["message"] == says.split("; no anthropic")[0]
    free = {"full_context": [user("SECRET free text"), assistant("ok")], "memo": "free memo text"}
    writes: list[tuple[str, str, dict[str, Any]]] = [
        ("PUT", "/sessions/support:t1", {"params": {"model": model}, "json": free}),
        ("PUT", "/sessions/support:t1", {"json": {"model": model, **free}}),
        ("PUT", "/sessions/support:t1", {"content": f'{{"model": "gpt-4o", "model": "{model}", '
                                                    f'"full_context": {json.dumps(free["full_context"])}}}'}),
        ("POST", "/sessions/support:t2/history", {"params": {"model": model},
                                                  "json": {"op": "add", "messages": FREE_TEXT}}),
        ("POST", "/sessions/support:t2/history", {"json": {"op": "set", "model": model, "messages": FREE_TEXT}}),
        ("PUT", "/sessions/support:t2/memo", {"params": {"model": model}, "json": {"memo": "free memo text"}}),
    ]
    for method, path, how in writes:
        resp = client.request(method, path, **how)
        assert resp.status_code == 400, (path, how, resp.text)
        assert resp.json()["error"] == {"message": says, "type": "invalid_request_error",
                                        "code": "model_not_found"}, resp.text
    for sid in ("support:t1", "support:t2"):
        assert client.get(f"/sessions/{sid}").status_code == 404
    # a model an upstream of either protocol serves is one a round could use; the body's last "model" counts
    assert client.put("/sessions/support:t3", params={"model": "claude-3-haiku"},
                      json={"full_context": FREE_TEXT}).status_code == 200
    keyed = client.put("/sessions/support:t1", content=f'{{"model": "{model}", "model": "gpt-4o", '
                                                       f'"full_context": {json.dumps(KEYED)}}}')
    assert keyed.status_code == 200, keyed.text
    assert [e["policy_id"] for e in gateway.audit_entries() if e["event"] == "import"] == [
        "multi-user-chat", "support-tickets"]
    client.close()


def test_with_the_stand_in_any_model_names_a_session_writes_policy(make_gateway: Callable[..., Gateway]) -> None:
    """With no upstream configured the built-in stand-in serves every model, so a round could use
    any name, and a session write naming one is held to that model's policy."""
    gateway = make_gateway(use_upstream=False)
    with httpx.Client(base_url=gateway.base_url, headers={"Authorization": f"Bearer {ACME_KEY}"}) as client:
        resp = client.put("/sessions/support:s1", params={"model": "made-up"}, json={"full_context": FREE_TEXT})
        assert resp.status_code == 200, resp.text


@pytest.mark.parametrize(("doc", "says"), [
    ({"full_contxt": [user("hi"), assistant("hello")]}, "'full_contxt' is not a field of an Agently session"),
    ({"id": "x", "full_context": [user("hi")], "extra": 1}, "'extra' is not a field of an Agently session"),
    ({}, "the document holds nothing to import"),
    ({"id": "acme:j10", "auto_resize": True, "session_settings": {}}, "the document holds nothing to import"),
], ids=["misspelt", "extra", "empty", "no-messages"])
def test_an_import_that_would_create_an_empty_session_is_refused(acme: httpx.Client, doc: Any, says: str) -> None:
    """A misspelt or unknown top-level field, or a document with no message and no memo, would have
    created an empty session: 400 ``invalid_session`` naming the field, and nothing is listed."""
    resp = acme.put("/sessions/acme:j10", json=doc)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid_session" and error["message"].startswith(says), error
    assert acme.get("/sessions").json()["data"] == []


def test_every_field_of_agentlys_session_form_imports(acme: httpx.Client) -> None:
    """What Agently writes and reads (id, auto_resize, full_context, context_window or its older
    name window_context, memo, session_settings) still imports, and so does a memo alone."""
    doc = {"id": "a", "auto_resize": False, "full_context": [user("q"), assistant("a")],
           "window_context": [assistant("a")], "memo": None, "session_settings": {"max_length": 5}}
    assert acme.put("/sessions/acme:all", json=doc).json() == {"id": "acme:all", "imported_messages": 2}
    assert acme.get("/sessions/acme:all").json()["context_window"] == [assistant("a")]
    assert acme.put("/sessions/acme:memo-only", json={"memo": "likes tea"}).status_code == 200
    assert acme.put("/sessions/acme:all", json=acme.get("/sessions/acme:all").json()).status_code == 200
