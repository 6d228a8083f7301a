"""Each protocol's error shape: refusals before the reply in that protocol's JSON shape, and a
stream the upstream breaks off ended with that protocol's error event (never its final event),
the partial round recorded as incomplete."""

from __future__ import annotations

import sqlite3

import anthropic
import httpx
import openai
import orjson
import pytest

from tests.conftest import ACME_KEY, Gateway
from tests.protocols.conftest import anthropic_client


def _events(text: str) -> list[tuple[str | None, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        name = next((line[7:] for line in block.split("\n") if line.startswith("event: ")), None)
        data = next((line[6:] for line in block.split("\n") if line.startswith("data: ")), None)
        if data is not None:
            out.append((name, orjson.loads(data)))
    return out


def test_responses_stream_broken_off_ends_with_an_error_event(pgw: Gateway) -> None:
    """A Responses stream cut by the upstream ends with an ``error`` event and no response.completed;
    the error event is numbered after the last event relayed (it was numbered 0, going backwards)."""
    r = httpx.post(f"{pgw.base_url}/responses", json={"model": "cut", "input": "hi", "stream": True},
                   headers={"Authorization": f"Bearer {ACME_KEY}", "X-Session-Id": "cut-r"}, timeout=10)
    events = _events(r.text)
    assert events[0][0] == "response.created"
    assert events[-1][0] == "error" and events[-1][1]["type"] == "error"
    assert events[-1][1]["code"] == "upstream_incomplete"
    numbers = [data["sequence_number"] for _, data in events]
    assert numbers == list(range(len(events))) and numbers[-1] > 0, numbers
    assert all(name != "response.completed" for name, _ in events)
    with sqlite3.connect(pgw.db_path) as db:
        rounds = [orjson.loads(b) for (b,) in db.execute("SELECT body FROM audit")]
    entry = next(e for e in rounds if e.get("event") == "round" and e.get("session_id") == "cut-r")
    assert (entry["outcome"], entry["ended_by"], entry["protocol"]) == ("incomplete", "upstream", "responses")


def test_messages_stream_broken_off_ends_with_an_anthropic_error_event(pgw: Gateway) -> None:
    """A Messages stream cut by the upstream ends with Anthropic's error event; the SDK raises."""
    client = anthropic_client(pgw, session="cut-m")
    with pytest.raises(anthropic.APIStatusError), client.messages.stream(  # the error event raises in the SDK
            model="cut", max_tokens=9, messages=[{"role": "user", "content": "hi"}]) as s:
        s.get_final_message()
    r = httpx.post(f"{pgw.url}/v1/messages", headers={"x-api-key": ACME_KEY, "X-Session-Id": "cut-m2"}, timeout=10,
                   json={"model": "cut", "max_tokens": 9, "stream": True,
                         "messages": [{"role": "user", "content": "hi"}]})
    name, data = _events(r.text)[-1]
    assert name == "error" and data["type"] == "error" and data["error"]["type"] == "api_error"
    assert "message_stop" not in r.text


def test_upstream_error_status_passes_through(pgw: Gateway) -> None:
    """A Responses upstream 500 reaches the SDK as the provider's error."""
    with pytest.raises(openai.InternalServerError):
        pgw.openai(session="broken").responses.create(model="broken", input="x")


@pytest.mark.parametrize(("path", "body", "shape"), [
    ("/v1/responses", {"model": "m", "input": 7}, "openai"),
    ("/v1/responses", {"model": "m", "input": [1]}, "openai"),
    ("/v1/responses", {"model": "m", "input": [{"role": "user", "content": 5}]}, "openai"),
    ("/v1/responses", {"model": "m", "input": [{"type": "message", "role": "user", "content": None}]}, "openai"),
    ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": 5}]}, "anthropic"),
    ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": []}, "anthropic"),
    ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "anthropic"),
])
def test_bad_input_is_400_in_the_protocols_shape(pgw: Gateway, path: str, body: dict, shape: str) -> None:
    """Bad requests are 400 in the shape each protocol's clients parse."""
    r = httpx.post(f"{pgw.url}{path}", json=body, headers={"Authorization": f"Bearer {ACME_KEY}"})
    assert r.status_code == 400
    doc = r.json()
    if shape == "openai":
        assert set(doc) == {"error"} and doc["error"]["type"] == "invalid_request_error"
    else:
        assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"
        assert set(doc["error"]) == {"type", "message"}


def _anthropic_shaped(doc: dict, kind: str) -> bool:
    return doc["type"] == "error" and set(doc["error"]) == {"type", "message"} and doc["error"]["type"] == kind


def test_an_internal_error_on_messages_is_a_500_in_anthropics_shape(pgw: Gateway,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected failure inside the gateway reaches an Anthropic client as Anthropic's
    ``api_error``, which its SDK raises as a server error."""
    from gateway.codecs.messages import MessagesCodec

    def broken(self: MessagesCodec, body: dict) -> None:
        raise RuntimeError("a bug")
    monkeypatch.setattr(MessagesCodec, "check", broken)
    r = httpx.post(f"{pgw.url}/v1/messages", headers={"x-api-key": ACME_KEY}, timeout=10,
                   json={"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 500 and _anthropic_shaped(r.json(), "api_error")
    with pytest.raises(anthropic.InternalServerError):
        anthropic_client(pgw).messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
