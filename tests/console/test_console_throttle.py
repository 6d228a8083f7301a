"""Failed auditor authentications are throttled per client address (console sign-in and
``/admin``), logged with the address, and the example configuration's demo tokens are warned about."""

from __future__ import annotations

import hashlib
import json

import httpx
import yaml

from gateway.console.throttle import DEMO_TOKENS, MAX_ADDRESSES, MAX_FAILURES, WINDOW_SECONDS, FailureThrottle
from tests.conftest import AUDITOR_TOKEN, REPO, Gateway
from tests.console.conftest import login_csrf

ELSEWHERE = "127.0.0.2"  # another loopback address: the token's holder, signing in from somewhere else


def _client(gateway: Gateway, source: str = "127.0.0.1") -> httpx.Client:
    return httpx.Client(base_url=gateway.url, timeout=30, transport=httpx.HTTPTransport(local_address=source))


def _sign_in(client: httpx.Client, gateway: Gateway, token: str) -> httpx.Response:
    form = client.get("/console/login")
    return client.post("/console/login", data={"token": token, "csrf": login_csrf(form.text)},
                       headers={"Origin": gateway.url})


def test_failed_sign_ins_are_throttled_per_address_and_logged(console_gateway: Gateway) -> None:
    """After MAX_FAILURES wrong tokens from one address, that address gets 429 with Retry-After
    (the right token included), while the right token still signs in from another address; each
    failure is logged as console_login_failed with the peer address, never the token. Wrong
    tokens used to be answered 401 without end and logged with no address."""
    guesses = [f"sg-guess-{i}" for i in range(MAX_FAILURES)]
    with _client(console_gateway) as attacker:
        for guess in guesses:
            assert _sign_in(attacker, console_gateway, guess).status_code == 401
        held = _sign_in(attacker, console_gateway, AUDITOR_TOKEN)
        assert held.status_code == 429 and 1 <= int(held.headers["Retry-After"]) <= WINDOW_SECONDS
        assert "Too many failed sign-ins" in held.text and "sg_console=" not in held.headers.get("set-cookie", "")
    with _client(console_gateway, ELSEWHERE) as holder:
        signed = _sign_in(holder, console_gateway, AUDITOR_TOKEN)
        assert signed.status_code == 303 and signed.headers["location"] == "/console/overview"
    lines = [json.loads(line) for line in console_gateway.log_path.read_text().splitlines() if line.startswith("{")]
    failed = [line for line in lines if line.get("event") == "console_login_failed"]
    assert len(failed) == MAX_FAILURES and all(line["peer"] == "127.0.0.1" for line in failed)
    log_text = console_gateway.log_path.read_text()
    assert not any(guess in log_text for guess in guesses) and AUDITOR_TOKEN not in log_text


def test_failed_admin_bearer_tokens_are_throttled_per_address(console_gateway: Gateway) -> None:
    """/admin answers an address past MAX_FAILURES wrong bearer tokens with 429 in the route's
    error shape and Retry-After, and logs admin_auth_failed with the address; the right token from
    another address still gets in."""
    with _client(console_gateway) as attacker:
        for i in range(MAX_FAILURES):
            resp = attacker.get("/admin/public-key", headers={"Authorization": f"Bearer sg-guess-{i}"})
            assert resp.status_code == 401
        held = attacker.get("/admin/public-key", headers={"Authorization": f"Bearer {AUDITOR_TOKEN}"})
    assert held.status_code == 429 and int(held.headers["Retry-After"]) >= 1
    error = held.json()["error"]
    assert set(error) == {"message", "type", "code"} and error["code"] == "too_many_failed_attempts"
    with _client(console_gateway, ELSEWHERE) as holder:
        assert holder.get("/admin/public-key", headers={"Authorization": f"Bearer {AUDITOR_TOKEN}"}).status_code == 200
    lines = [json.loads(line) for line in console_gateway.log_path.read_text().splitlines() if line.startswith("{")]
    failed = [line for line in lines if line.get("event") == "admin_auth_failed"]
    assert len(failed) == MAX_FAILURES and all(line["peer"] == "127.0.0.1" for line in failed)


def test_the_throttle_forgets_failures_after_the_window() -> None:
    """An address is held back until its oldest counted failure is WINDOW_SECONDS old, and told
    how long that is; failures of other addresses do not count against it."""
    now = [1000.0]
    throttle = FailureThrottle(clock=lambda: now[0])
    for _ in range(MAX_FAILURES - 1):
        throttle.failed("10.0.0.1")
        throttle.failed("10.0.0.2")
    assert throttle.retry_after("10.0.0.1") is None
    now[0] += 10
    throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") == WINDOW_SECONDS - 10  # when the first failure leaves the window
    assert throttle.retry_after("10.0.0.2") is None and throttle.retry_after("10.0.0.3") is None
    now[0] += WINDOW_SECONDS - 10 + 0.5  # the first nine are out of the window
    assert throttle.retry_after("10.0.0.1") is None


def test_the_throttle_remembers_a_bounded_number_of_addresses() -> None:
    """Failures from many addresses keep at most MAX_ADDRESSES of them, the stalest forgotten."""
    throttle = FailureThrottle(clock=lambda: 5.0)
    for i in range(MAX_ADDRESSES + 5):
        throttle.failed(f"addr-{i}")
    assert len(throttle._failures) == MAX_ADDRESSES and "addr-0" not in throttle._failures


def test_a_demo_token_in_use_is_warned_about_at_start_up(console_gateway: Gateway) -> None:
    """The gateway logs demo_credential_configured (naming the auditor, never the token) when the
    example configuration's public demo auditor token is accepted."""
    lines = [json.loads(line) for line in console_gateway.log_path.read_text().splitlines() if line.startswith("{")]
    warned = [line for line in lines if line.get("event") == "demo_credential_configured"]
    assert {(w["role"], w["name"]) for w in warned} >= {("auditor", "demo-auditor")}
    assert all(w["level"] == "warning" for w in warned)
    assert not any(token in json.dumps(warned) for token in DEMO_TOKENS)


def test_the_demo_tokens_are_the_example_configurations() -> None:
    """DEMO_TOKENS are exactly the tokens whose hashes config/sessiongate.yaml lists."""
    config = yaml.safe_load((REPO / "config/sessiongate.yaml").read_text())
    listed = {c["key_sha256"] for c in config["clients"]} | {a["token_sha256"] for a in config["auditors"]}
    assert listed == {hashlib.sha256(t.encode()).hexdigest() for t in DEMO_TOKENS}


def test_client_keys_offered_at_sign_in_count_as_failures(console_gateway: Gateway) -> None:
    """A client key at the sign-in was refused (403) without being counted, so the page told valid
    client keys from guesses at full speed; it counts as a failed sign-in now."""
    from tests.conftest import ACME_KEY

    with _client(console_gateway) as attacker:
        for _ in range(MAX_FAILURES):
            assert _sign_in(attacker, console_gateway, ACME_KEY).status_code == 403
        assert _sign_in(attacker, console_gateway, AUDITOR_TOKEN).status_code == 429
