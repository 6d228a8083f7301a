"""The gateway against a provider-like upstream (``tests/provider.py``): compressed JSON, SSE and
forwarded routes, SSE cut anywhere, keep-alive closes, rate-limit headers and error bodies, and
replies larger than the recorded-reply cap. Clients are the real ``openai`` SDK and raw httpx."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import ACME_KEY, GLOBEX_KEY, Gateway
from tests.provider import HUGE_BYTES, Provider, huge_text, provider  # noqa: F401

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}
# (what the gateway asks for, what the provider does regardless) -> the encoding it then sends
MODES = {"asked-gzip": ("gzip, deflate", None, "gzip"), "asked-deflate": ("deflate", None, "deflate"),
         "forced-gzip": ("identity", "gzip", "gzip"), "forced-deflate": ("identity", "deflate", "deflate")}
CAP = 1024 * 1024


def connect(make_gateway: Callable[..., Gateway], provider: Provider, mode: str = "forced-gzip",  # noqa: F811
            **upstream: Any) -> Gateway:
    accept, force, _ = MODES[mode]
    provider.force_encoding = force
    return make_gateway(upstreams=[{"name": "provider", "base_url": provider.url, "models": ["*"],
                                    "accept_encoding": accept, **upstream}])


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def audit_entries(gateway: Gateway, tenant: str = "acme") -> list[dict[str, Any]]:
    conn = sqlite3.connect(gateway.db_path)
    try:
        return [orjson.loads(b) for (b,) in conn.execute("SELECT body FROM audit WHERE tenant=? ORDER BY seq",
                                                         (tenant,))]
    finally:
        conn.close()


def exported(gateway: Gateway, session: str) -> dict[str, Any]:
    resp = httpx.get(f"{gateway.base_url}/sessions/{session}", headers=AUTH)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


@pytest.mark.parametrize("mode", sorted(MODES))
def test_compressed_chat_json_and_stream_parse_and_record(make_gateway: Callable[..., Gateway],
                                                          provider: Provider, mode: str) -> None:  # noqa: F811
    """A provider that compresses (asked or not) gives the SDK a parsed reply, streamed or not, and a record."""
    gateway = connect(make_gateway, provider, mode)
    client = gateway.openai(session=f"zip-{mode}")
    reply = client.chat.completions.create(model="gpt-x", messages=[user("hello there")])
    assert reply.choices[0].message.content == "provider says: hello there"
    events = list(client.chat.completions.create(model="gpt-x", messages=[user("stream this please")],
                                                 stream=True))
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text.strip() == "provider says: stream this please"
    assert provider.encodings_sent == [MODES[mode][2]] * 2
    assert all(r["headers"].get("Accept-Encoding") == MODES[mode][0] for r in provider.requests)
    full = exported(gateway, f"zip-{mode}")["full_context"]
    assert [m["content"] for m in full] == ["hello there", "provider says: hello there",
                                            "stream this please", text]


@pytest.mark.parametrize("mode", ["asked-gzip", "forced-deflate"])
def test_compressed_forwarded_routes_reach_the_client_as_identity_bytes(
        make_gateway: Callable[..., Gateway], provider: Provider, mode: str) -> None:  # noqa: F811
    """Forwarded replies are decoded: no Content-Encoding, no stale Content-Length, the SDK reads them."""
    gateway = connect(make_gateway, provider, mode)
    raw = httpx.get(f"{gateway.base_url}/models", headers={**AUTH, "Accept-Encoding": "identity"})
    assert raw.status_code == 200
    assert "content-encoding" not in raw.headers
    assert "content-length" not in raw.headers or int(raw.headers["content-length"]) == len(raw.content)
    assert orjson.loads(raw.content)["data"][0]["id"] == "gpt-x"
    client = gateway.openai()
    assert [m.id for m in client.models.list()] == ["gpt-x", "gpt-y"]
    assert client.models.retrieve("gpt-y").id == "gpt-y"
    vectors = client.embeddings.create(model="emb", input=["a", "b"], encoding_format="float").data
    assert len(vectors) == 2 and vectors[1].embedding == [0.25] * 256
    assert set(provider.encodings_sent) == {MODES[mode][2]}


def test_provider_errors_and_headers_reach_the_sdk(make_gateway: Callable[..., Gateway],
                                                   provider: Provider) -> None:  # noqa: F811
    """429 and 500 keep the provider's body, Retry-After, x-ratelimit-* and request id; cookies stay behind."""
    gateway = connect(make_gateway, provider, "asked-gzip")
    client = gateway.openai(session="errs")
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="rate-limited", messages=[user("hi")])
    headers = limited.value.response.headers
    assert limited.value.code == "rate_limit_exceeded"
    assert headers["retry-after"] == "3" and headers["x-ratelimit-remaining-requests"] == "4999"
    assert headers["x-request-id"].startswith("req-prov-") and headers["x-sessiongate-request-id"]
    assert "set-cookie" not in headers and "content-encoding" not in headers
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model="broken", messages=[user("hi")], stream=True)
    assert failed.value.code == "server_error" and "processing your request" in failed.value.message
    ok = client.chat.completions.with_raw_response.create(model="gpt-x", messages=[user("fine")])
    assert ok.headers["x-ratelimit-limit-requests"] == "5000" and ok.headers["openai-processing-ms"] == "12"


def test_keep_alive_connections_closed_by_the_provider_are_not_an_error(
        make_gateway: Callable[..., Gateway], provider: Provider) -> None:  # noqa: F811
    """The provider closes every third connection; a dozen rounds in a row all succeed."""
    gateway = connect(make_gateway, provider, "asked-gzip")
    client = gateway.openai(session="keepalive")
    for n in range(12):
        if n % 2:
            reply = client.chat.completions.create(model="gpt-x", messages=[user(f"q{n}")])
            assert reply.choices[0].message.content == f"provider says: q{n}"
        else:
            events = list(client.chat.completions.create(model="gpt-x", messages=[user(f"q{n}")], stream=True))
            assert "".join(e.choices[0].delta.content or "" for e in events if e.choices).strip() == \
                f"provider says: q{n}"
    assert len(exported(gateway, "keepalive")["full_context"]) == 24


def test_a_cookie_the_provider_sets_is_never_sent_back_for_anyone(
        make_gateway: Callable[..., Gateway], provider: Provider) -> None:  # noqa: F811
    """The provider sets a cookie on every reply (as Cloudflare in front of a real API does); the
    gateway's one upstream client is shared by every tenant, so it keeps no cookies: no later
    request, of the same tenant or another, chat or forwarded route, carries one."""
    provider.url = provider.url.replace("127.0.0.1", "localhost")  # a host name: a cookie jar would keep it
    gateway = connect(make_gateway, provider, "asked-gzip", forward_routes=["models"])
    for key in (ACME_KEY, GLOBEX_KEY, ACME_KEY):
        client = gateway.openai(key=key, session="cookies")
        assert client.chat.completions.create(model="gpt-x", messages=[user("hi")]).choices
        assert client.models.list().data is not None
    assert len(provider.requests) == 6
    assert "Set-Cookie" in provider.headers(1)  # the provider does set one, on every reply
    sent = [{k.lower(): v for k, v in r["headers"].items()} for r in provider.requests]
    assert [h.get("cookie") for h in sent] == [None] * 6


def test_compressed_stream_reaches_the_client_event_by_event(make_gateway: Callable[..., Gateway],
                                                            provider: Provider) -> None:  # noqa: F811
    """The first events of a compressed stream reach the SDK while the provider still holds the rest."""
    gateway = connect(make_gateway, provider, "forced-gzip")
    stream = iter(gateway.openai(session="live").chat.completions.create(
        model="held", messages=[user("one two three")], stream=True))
    first = next(stream)
    assert first.choices[0].delta.role == "assistant"
    provider.release.set()
    rest = "".join(e.choices[0].delta.content or "" for e in stream if e.choices)
    assert rest.strip() == "provider says: one two three"
    assert provider.released_by_test == [True]


@pytest.mark.parametrize("model", ["slow-start", "partial-start"])
@pytest.mark.parametrize("mode", ["asked-gzip", "forced-deflate"])
def test_a_stream_slow_to_start_has_its_headers_relayed_at_once(make_gateway: Callable[..., Gateway],
                                                                provider: Provider, mode: str,  # noqa: F811
                                                                model: str) -> None:
    """A provider that sends a stream's headers (and perhaps a piece of its first event) and then
    thinks: the client has the gateway's 200 and headers while the provider still waits, and only
    then releases it. (Headers wait for the first events only when these are there already.)"""
    gateway = connect(make_gateway, provider, mode)
    body = {"model": model, "messages": [user("think first")], "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body,
                      headers={**AUTH, "X-Session-Id": model}, timeout=30) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        assert reply.headers["x-request-id"].startswith("req-prov-")
        assert provider.released_by_test == []  # the provider is still holding its first event
        provider.release.set()
        relayed = reply.read()
    assert provider.released_by_test == [True]
    assert relayed.endswith(b"data: [DONE]\n\n")
    assert exported(gateway, model)["full_context"][-1] == {"role": "assistant",
                                                                   "content": "provider says: think first "}


def test_a_huge_json_reply_is_relayed_whole_while_only_the_cap_is_recorded(
        make_gateway: Callable[..., Gateway], provider: Provider) -> None:  # noqa: F811
    """A ~20 MB non-streamed reply reaches the client whole and as it arrives; the round is
    incomplete and its audit entry says truncated."""
    gateway = connect(make_gateway, provider, "forced-gzip", max_reply_bytes=CAP)
    received = bytearray()
    body = {"model": "huge", "messages": [user("everything")]}
    with httpx.stream("POST", f"{gateway.base_url}/chat/completions", json=body, timeout=60,
                      headers={**AUTH, "X-Session-Id": "huge-json"}) as resp:
        assert resp.status_code == 200
        assert "content-encoding" not in resp.headers
        for piece in resp.iter_raw():
            received += piece
            if len(received) > 2 * CAP and not provider.release.is_set():
                provider.release.set()  # the gateway relayed past the cap before the provider finished
    assert provider.released_by_test == [True]
    assert orjson.loads(bytes(received))["choices"][0]["message"]["content"] == huge_text()
    rounds = [e for e in audit_entries(gateway) if e["event"] == "round"]
    assert [(e["outcome"], e.get("truncated")) for e in rounds] == [("incomplete", True)]
    full = exported(gateway, "huge-json")["full_context"]
    assert full[0] == user("everything") and full[1]["role"] == "assistant"
    assert 0 < len(full[1]["content"]) <= CAP and huge_text().startswith(full[1]["content"])


def test_a_huge_stream_is_relayed_whole_and_recorded_up_to_the_cap(make_gateway: Callable[..., Gateway],
                                                                  provider: Provider) -> None:  # noqa: F811
    """A ~20 MB stream reaches the SDK whole with [DONE]; the record keeps a prefix within the cap."""
    gateway = connect(make_gateway, provider, "asked-gzip", max_reply_bytes=CAP)
    provider.release.set()
    text = "".join(e.choices[0].delta.content or "" for e in gateway.openai(session="huge-sse", timeout=60)
                   .chat.completions.create(model="huge", messages=[user("all")], stream=True) if e.choices)
    assert len(text) == HUGE_BYTES and text == huge_text()
    rounds = [e for e in audit_entries(gateway) if e["event"] == "round"]
    assert [(e["outcome"], e.get("truncated")) for e in rounds] == [("incomplete", True)]
    recorded = exported(gateway, "huge-sse")["full_context"][1]["content"]
    assert 0 < len(recorded) <= CAP and text.startswith(recorded)


def test_the_text_of_a_cut_off_completion_is_read_as_far_as_it_goes() -> None:
    """content_prefix reads a cut-off content string (escapes and UTF-8 cut anywhere), else None."""
    from gateway.stages.forward import content_prefix
    text = 'he said "hi\\" é☃\nok'
    full = orjson.dumps({"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
    readings = [content_prefix(full[:n]) for n in range(len(full) + 1)]
    assert readings[-1] == text and readings[20] is None
    assert all(r is None or text.startswith(r) for r in readings)
    tools = {"choices": [{"message": {"role": "assistant", "content": None,
                                      "tool_calls": [{"function": {"arguments": '{"content": "x"}'}}]}}]}
    assert content_prefix(orjson.dumps(tools)) is None


def test_an_encoding_the_gateway_cannot_read_is_a_clear_502(make_gateway: Callable[..., Gateway],
                                                            provider: Provider) -> None:  # noqa: F811
    """A body in an unreadable encoding gets 502 bad_upstream_reply on chat and forwarded routes, never raw bytes."""
    gateway = connect(make_gateway, provider, "forced-gzip")
    provider.force_encoding = "compress"  # labelled with an encoding nobody decodes
    chat = httpx.post(f"{gateway.base_url}/chat/completions", headers=AUTH,
                      json={"model": "gpt-x", "messages": [user("hi")]})
    assert chat.status_code == 502 and chat.json()["error"]["code"] == "bad_upstream_reply"
    models = httpx.get(f"{gateway.base_url}/models", headers=AUTH)
    assert models.status_code == 502 and models.json()["error"]["code"] == "bad_upstream_reply"
    assert [e["outcome"] for e in audit_entries(gateway) if e["event"] == "proxy"] == ["upstream_error"]


def test_a_json_reply_with_a_byte_order_mark_is_read_and_recorded(make_gateway: Callable[..., Gateway],
                                                                  provider: Provider) -> None:  # noqa: F811
    """A reply that starts with a UTF-8 byte-order mark parses for the SDK (as it would directly) and is
    recorded, instead of 502 bad_upstream_reply."""
    gateway = connect(make_gateway, provider, "forced-gzip")
    reply = gateway.openai(session="bom").chat.completions.create(model="bom", messages=[user("marked")])
    assert reply.choices[0].message.content == "provider says: marked"
    assert exported(gateway, "bom")["full_context"][-1] == {"role": "assistant", "content": "provider says: marked"}


def test_an_event_longer_than_the_cap_is_forwarded_unparsed() -> None:
    """EventSplitter(max_event) passes an over-long event through as it arrives and still splits the next ones."""
    from gateway.sse import EventSplitter
    big = b"data: " + orjson.dumps({"choices": [{"delta": {"content": "z" * 1000}}]}) + b"\n\n"
    small = b'data: {"choices": []}\n\n'
    data = big + small + b"data: [DONE]\n\n"
    events: list[bytes] = []

    def take(event: bytes) -> bool:
        events.append(event)
        return event == b"data: [DONE]"

    splitter = EventSplitter(take, max_event=100)
    out = b"".join(splitter.feed(data[i:i + 37]) for i in range(0, len(data), 37))
    assert out == big + small and splitter.oversized and splitter.done
    assert events == [small.strip(), b"data: [DONE]"]


# --- errors that are not the API's own --------------------------------------------------------

def test_a_refused_provider_key_is_the_gateways_error_not_the_clients(
        make_gateway: Callable[..., Gateway], provider: Provider, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The provider's 401 is about the gateway's provider key, which the client cannot fix: the SDK
    gets a 502 ``upstream_auth_failed`` it does not retry (it used to get an AuthenticationError
    quoting the end of the operator's key, as if its own key were wrong), and the round is audited
    with the provider's status."""
    monkeypatch.setenv("PROVIDER_KEY", "sk-prov-operator-secret-9f2c")
    gateway = connect(make_gateway, provider, api_key_env="PROVIDER_KEY")
    client: Any = openai.OpenAI(base_url=gateway.base_url, api_key=ACME_KEY, max_retries=2,
                                default_headers={"X-Session-Id": "bad-key"})
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model="bad-key", messages=[user("hi")])
    error = failed.value
    assert error.status_code == 502 and error.code == "upstream_auth_failed"
    assert "your gateway key was accepted" in error.message and "9f2c" not in str(error.body)
    assert error.response.headers["x-should-retry"] == "false"
    assert len(provider.requests) == 1  # the SDK did not retry
    entry = audit_entries(gateway)[-1]
    assert entry["outcome"] == "upstream_error" and entry["upstream_status"] == 401
    log = gateway.log_path.read_text()
    assert "upstream_auth_failed" in log and "invalid_api_key" in log and "operator-secret" not in log
    metrics = httpx.get(f"{gateway.url}/metrics").text  # counted once, by the provider's status
    assert 'sessiongate_upstream_errors_total{kind="status_401"} 1.0' in metrics
    assert 'kind="upstream_auth_failed"' not in metrics
    for model in ("vllm-401", "fastapi-401"):  # self-hosted servers' refusals
        other = httpx.post(f"{gateway.base_url}/chat/completions", headers=AUTH,
                           json={"model": model, "messages": [user("hi")]})
        assert other.status_code == 502 and other.json()["error"]["code"] == "upstream_auth_failed"
    forwarded = httpx.get(f"{gateway.base_url}/models/bad-key", headers=AUTH)  # a forwarded route the same way
    assert forwarded.status_code == 502 and forwarded.json()["error"]["code"] == "upstream_auth_failed"
    assert "9f2c" not in forwarded.text
    entry = audit_entries(gateway)[-1]
    assert entry["event"] == "proxy" and entry["upstream_status"] == 401
    page = httpx.get(f"{gateway.base_url}/models/cdn-503", headers=AUTH)
    assert page.status_code == 503 and "HTML page titled 'Service & Unavailable'" in page.json()["error"]["message"]


@pytest.mark.parametrize(("model", "status", "says"), [
    ("cdn-502", 502, "answered 502 with an HTML page titled 'api.provider.test | 502: Bad gateway'"),
    ("cdn-503", 503, "answered 503 with an HTML page titled 'Service & Unavailable'"),
    ("wrong-base-url", 502, "answered 404 with an HTML page titled '404 Not Found'"),
    ("proxy-text", 503, "with a text/plain body: 'upstream connect error or disconnect/reset before headers. "
                        "reset reason: connection failure'"),
    ("empty-504", 504, "answered 504 with an empty body"),
    ("echo", 502, "titled 'Bad request from Bearer [provider key] at edge'"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_an_error_page_reaches_the_sdk_as_the_protocols_error(
        make_gateway: Callable[..., Gateway], provider: Provider, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        model: str, status: int, says: str, stream: bool) -> None:
    """A CDN's HTML page, a reverse proxy's text or an empty body from the provider reaches the
    SDK as an error in OpenAI's shape saying what came (it used to be the markup itself), with
    the provider's status when the SDK would retry it, 502 otherwise, the provider's retry advice,
    and never the provider key a page may echo."""
    monkeypatch.setenv("PROVIDER_KEY", "sk-prov-operator-secret-9f2c")
    gateway = connect(make_gateway, provider, api_key_env="PROVIDER_KEY")
    resp = httpx.post(f"{gateway.base_url}/chat/completions", headers={**AUTH, "X-Session-Id": f"page-{stream}"},
                      json={"model": model, "stream": stream, "messages": [user("hi")]}, timeout=30)
    assert resp.status_code == status and resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert error["code"] == "upstream_error_page" and error["type"] == "upstream_error"
    assert error["message"].startswith("upstream 'provider' ") and says in error["message"]
    assert "operator-secret" not in resp.text and "<" not in error["message"]
    if status == 503 and model == "cdn-503":
        assert resp.headers["retry-after"] == "20"
    assert resp.headers["x-request-id"].startswith("req-prov-")
    assert audit_entries(gateway)[-1]["upstream_status"] == ERROR_STATUS[model]


ERROR_STATUS = {"cdn-502": 502, "cdn-503": 503, "wrong-base-url": 404, "proxy-text": 503, "empty-504": 504,
                "echo": 400}


def test_the_anthropic_sdk_gets_an_error_page_in_its_own_shape(
        make_gateway: Callable[..., Gateway], provider: Provider) -> None:  # noqa: F811
    """On /v1/messages the same error is Anthropic's shape (``type: error``)."""
    import anthropic

    from tests.protocols.conftest import anthropic_client
    gateway = make_gateway(upstreams=[{"name": "provider", "base_url": provider.url, "models": ["*"],
                                       "protocol": "anthropic"}])
    with pytest.raises(anthropic.InternalServerError) as failed:
        anthropic_client(gateway).messages.create(model="cdn-502", max_tokens=9, messages=[user("hi")])
    assert failed.value.status_code == 502
    assert failed.value.body["type"] == "error"  # type: ignore[index]
    assert "HTML page titled" in failed.value.message


@pytest.mark.parametrize("model", ["done-then-hold", "done-then-reset"])
def test_a_stream_is_whole_at_its_final_event_whatever_the_connection_does_after(
        make_gateway: Callable[..., Gateway], provider: Provider, model: str) -> None:  # noqa: F811
    """A provider (or a proxy in front of it) that holds the connection open after ``[DONE]``,
    or breaks it off there, has sent a whole reply: the client gets it, and its end, without
    waiting for the connection (here longer than the upstream's read timeout), and the round is
    recorded complete."""
    gateway = connect(make_gateway, provider, "asked-gzip", read_timeout=3)
    try:
        stream = gateway.openai(session=model).chat.completions.create(
            model=model, stream=True, messages=[user("all of it")])
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == "provider says: all of it "
        assert not provider.released_by_test  # the provider still held the connection when the client was done
    finally:
        provider.release.set()
    entry = [e for e in audit_entries(gateway) if e.get("event") == "round"][-1]
    assert entry["outcome"] == "completed" and entry.get("ended_by") is None
    assert exported(gateway, model)["full_context"][-1] == {"role": "assistant", "content": "provider says: all of it "}


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_while_the_model_thinks_ends_the_upstream_request(
        make_gateway: Callable[..., Gateway], provider: Provider, stream: bool) -> None:  # noqa: F811
    """A client that gives up while the provider has sent nothing yet (no write to fail) was
    not noticed: the gateway held the provider's request until it answered or read_timeout
    passed, and then blamed the upstream. It is noticed within about a second: the provider's
    request is ended (a model thinking for minutes stops, for nobody) and the round is recorded
    incomplete, ended by the client."""
    import time
    gateway = connect(make_gateway, provider, "asked-gzip", read_timeout=30)
    body = {"model": "slow-start", "stream": stream, "messages": [user("think long")]}
    try:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=0.5,
                       headers={**AUTH, "X-Session-Id": f"left-{stream}"})
        deadline = time.monotonic() + 15
        while not provider.released_by_test and time.monotonic() < deadline:
            time.sleep(0.05)
            if any(e.get("event") == "round" for e in audit_entries(gateway)):
                break
        entry = [e for e in audit_entries(gateway) if e.get("event") == "round"][-1]
        assert not provider.released_by_test  # recorded while the provider still had not answered
    finally:
        provider.release.set()
    assert entry["outcome"] == "incomplete" and entry["ended_by"] == "client"
