"""Provider-held Responses state (``responses_state: provider``) stays within the tenant (probe
finding F1): the gateway keeps which tenant each provider response id it relayed belongs to, by
an HMAC of tenant and id under a key only its processes hold (so a database writer cannot move
a row to another tenant), and refuses any other id before anything reaches the provider."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ACME_KEY, GLOBEX_KEY, Gateway
from tests.protocols.upstream import ProtocolUpstream

PREVIOUS_NOT_FOUND = "the previous response was not found for this tenant"
"""The 404 an unknown previous_response_id gets under gateway-held state, which repeats no id."""


@pytest.fixture
def held(make_gateway: Callable[..., Gateway], proto: ProtocolUpstream) -> Gateway:
    """A gateway whose openai upstream leaves Responses state with the provider and forwards the
    per-id Responses routes."""
    return make_gateway(name="provider-held", upstreams=[
        {"name": "oa", "base_url": f"{proto.url}/v1", "models": ["*"], "responses_state": "provider",
         "forward_routes": ["models", "responses"]}])


def _create(gw: Gateway, key: str, stream: bool, **kw: Any) -> str:
    """The provider's response id of one ``responses.create`` by *key*, streamed or not."""
    client = gw.openai(key=key)
    if not stream:
        return str(client.responses.create(model="gpt-4o-mini", **kw).id)
    with client.responses.stream(model="gpt-4o-mini", **kw) as events:
        return str(events.get_final_response().id)


@pytest.mark.parametrize("stream", [False, True])
def test_another_tenants_provider_response_id_is_404_before_the_provider(held: Gateway, proto: ProtocolUpstream,
                                                                         stream: bool) -> None:
    """acme continues its own provider-held response; globex sending acme's id as
    previous_response_id gets the gateway-held 404, which does not repeat the id, and the
    provider never sees that request."""
    rid = _create(held, ACME_KEY, stream, input="ACME secret")
    assert rid.startswith("resp_up")
    held.openai().responses.create(model="gpt-4o-mini", previous_response_id=rid, input="repeat it")
    assert proto.bodies("/v1/responses")[-1]["previous_response_id"] == rid
    sent = len(proto.requests)
    with pytest.raises(openai.NotFoundError) as err:
        held.openai(key=GLOBEX_KEY).responses.create(model="gpt-4o-mini", previous_response_id=rid,
                                                     input="repeat it")
    assert err.value.body["code"] == "previous_response_not_found"  # type: ignore[index]
    assert err.value.body["message"] == PREVIOUS_NOT_FOUND and rid not in str(err.value.body)  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):  # with a session of globex's own, too
        held.openai(key=GLOBEX_KEY, session="g1").responses.create(model="gpt-4o-mini", previous_response_id=rid,
                                                                   input="repeat it")
    assert len(proto.requests) == sent


def test_an_id_that_never_passed_through_the_gateway_is_refused(held: Gateway, proto: ProtocolUpstream) -> None:
    """An id the gateway never relayed (one made before the upgrade, or outside the gateway) is
    404 for every tenant, as is a gateway-held chain's id under provider-held state."""
    for unknown in ("resp_made_elsewhere", "resp_0123456789abcdef", "sg-demo-globex"):
        with pytest.raises(openai.NotFoundError) as err:
            held.openai().responses.create(model="gpt-4o-mini", previous_response_id=unknown, input="hi")
        assert err.value.body["message"] == PREVIOUS_NOT_FOUND  # type: ignore[index]
    assert proto.bodies("/v1/responses") == []


def test_per_id_routes_reach_the_provider_only_for_the_owning_tenant(held: Gateway, proto: ProtocolUpstream) -> None:
    """GET, input_items, cancel and DELETE of a provider response id are forwarded for the
    tenant it was made for; for another tenant, or an unknown id, they are 404 before the provider."""
    rid = _create(held, ACME_KEY, False, input="ACME secret")
    routes = [("GET", f"/responses/{rid}"), ("GET", f"/responses/{rid}/input_items"),
              ("POST", f"/responses/{rid}/cancel"), ("DELETE", f"/responses/{rid}")]
    for method, path in routes:
        r = httpx.request(method, held.base_url + path, headers={"Authorization": f"Bearer {GLOBEX_KEY}"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found", r.text
        assert rid not in r.text
        r = httpx.request(method, held.base_url + path.replace(rid, "resp_never_seen"),
                          headers={"Authorization": f"Bearer {ACME_KEY}"})
        assert r.status_code == 404, r.text
    assert [p for p, _, _ in proto.requests if p != "/v1/responses"] == []
    for method, path in routes:
        r = httpx.request(method, held.base_url + path, headers={"Authorization": f"Bearer {ACME_KEY}"})
        assert r.status_code == 200 and r.json()["object"] == "forwarded", r.text
    assert [p for p, _, _ in proto.requests if p != "/v1/responses"] == [f"{m} /v1{p}" for m, p in routes]


def test_a_forwarded_responses_body_is_held_to_the_same_rule(held: Gateway, proto: ProtocolUpstream) -> None:
    """``POST /v1/responses/input_tokens`` (a forwarded route) with another tenant's id as
    previous_response_id is 404 before the provider; with the caller's own id it is forwarded."""
    rid = _create(held, ACME_KEY, False, input="ACME secret")
    body = {"model": "gpt-4o-mini", "previous_response_id": rid, "input": "count"}
    r = httpx.post(f"{held.base_url}/responses/input_tokens", json=body,
                   headers={"Authorization": f"Bearer {GLOBEX_KEY}"})
    assert r.status_code == 404 and r.json()["error"]["message"] == PREVIOUS_NOT_FOUND, r.text
    assert [p for p, _, _ in proto.requests if p != "/v1/responses"] == []
    r = httpx.post(f"{held.base_url}/responses/input_tokens", json=body,
                   headers={"Authorization": f"Bearer {ACME_KEY}"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("content_type, prefix, suffix", [
    ("text/plain", b"", b""), ("application/vnd.api+json", b"", b""), ("application/json", b"\xef\xbb\xbf", b""),
    ("application/json", b"", b" NaN")], ids=["text-plain", "vendor-json", "bom", "nan"])
def test_a_forwarded_body_the_gateway_cannot_read_as_json_is_refused_not_forwarded_unchecked(
        held: Gateway, proto: ProtocolUpstream, content_type: str, prefix: bytes, suffix: bytes) -> None:
    """Another tenant's id in a forwarded Responses body the gateway did not parse (another
    Content-Type, a byte-order mark, a NaN: a provider may read it all the same) went to the
    provider unchecked; such a body is 400 now, and nothing is forwarded."""
    rid = _create(held, ACME_KEY, False, input="ACME secret")
    raw = b'{"model": "gpt-4o-mini", "previous_response_id": "' + rid.encode() + b'", "input": "count"'
    raw = prefix + raw + (b', "n": NaN}' if suffix else b"}")
    for route in ("input_tokens", "compact"):
        r = httpx.post(f"{held.base_url}/responses/{route}", content=raw,
                       headers={"Authorization": f"Bearer {GLOBEX_KEY}", "Content-Type": content_type})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    assert [p for p, _, _ in proto.requests if p != "/v1/responses"] == []


def _holds(gw: Gateway, rid: str, *tenants: str) -> list[bool]:
    """Whether the gateway's store holds *rid* for each of *tenants*, read by a store sealing with
    the gateway's keys (as every process of the gateway does)."""
    from gateway.keys import load_signer
    from gateway.settings import load_settings
    from gateway.store.sqlite import SQLiteStore

    async def holds() -> list[bool]:
        store = SQLiteStore(gw.db_path, entry_key=load_signer(load_settings(gw.config_path)).entry_key)
        await store.open()
        try:
            digest = hashlib.sha256(rid.encode()).digest()
            return [await store.holds_provider_response(tenant, digest) for tenant in tenants]
        finally:
            await store.close()

    return asyncio.run(holds())


def test_the_store_keeps_a_keyed_hash_never_the_id(held: Gateway) -> None:
    """What the gateway keeps is the tenant and an HMAC of tenant and id under a key derived from
    the audit signing key: neither the id nor its SHA-256 is anywhere in the database files."""
    rid = _create(held, ACME_KEY, True, input="ACME secret")
    assert rid.encode() not in held.stored_bytes()
    assert hashlib.sha256(rid.encode()).digest() not in held.stored_bytes()
    assert _holds(held, rid, "acme", "globex") == [True, False]


def test_a_row_copied_to_another_tenant_grants_it_nothing(held: Gateway, proto: ProtocolUpstream) -> None:
    """A database writer who copies acme's ``provider_responses`` row under globex's name (or
    inserts the id's SHA-256 for globex) does not make acme's provider-held conversation
    globex's: globex's continuation is still 404 before the provider (it was forwarded, 200)."""
    import sqlite3
    from contextlib import closing

    rid = _create(held, ACME_KEY, False, input="ACME secret")
    with closing(sqlite3.connect(held.db_path, isolation_level=None, timeout=30)) as conn:
        conn.execute("INSERT INTO provider_responses SELECT 'globex', id_mac, created_at FROM provider_responses "
                     "WHERE tenant='acme'")
        conn.execute("INSERT OR IGNORE INTO provider_responses VALUES ('globex', ?, 0)",
                     (hashlib.sha256(rid.encode()).digest(),))
    sent = len(proto.requests)
    with pytest.raises(openai.NotFoundError) as err:
        held.openai(key=GLOBEX_KEY).responses.create(model="gpt-4o-mini", previous_response_id=rid, input="repeat it")
    assert err.value.body["message"] == PREVIOUS_NOT_FOUND  # type: ignore[index]
    r = httpx.get(f"{held.base_url}/responses/{rid}", headers={"Authorization": f"Bearer {GLOBEX_KEY}"})
    assert r.status_code == 404, r.text
    assert len(proto.requests) == sent
    held.openai().responses.create(model="gpt-4o-mini", previous_response_id=rid, input="acme goes on")


def test_a_store_false_response_is_not_kept(held: Gateway, proto: ProtocolUpstream) -> None:
    """A response made with ``store: false`` is not kept by the provider, so its id is not
    recorded: continuing from it is the same 404 as any unknown id."""
    rid = _create(held, ACME_KEY, False, input="not stored", store=False)
    with pytest.raises(openai.NotFoundError):
        held.openai().responses.create(model="gpt-4o-mini", previous_response_id=rid, input="hi")
    assert len(proto.bodies("/v1/responses")) == 1
