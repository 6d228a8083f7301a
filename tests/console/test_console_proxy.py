"""The console behind a TLS-terminating reverse proxy: ``console.public_origin`` is the origin
the browser's ``Origin`` must equal, and makes the cookies ``Secure``; ``X-Forwarded-*`` headers
are never trusted."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from gateway.errors import ConfigError
from gateway.settings import parse_settings
from tests.conftest import AUDITOR_TOKEN, Gateway
from tests.console.conftest import login_csrf

PUBLIC = "https://audit.example.com"


def _sign_in(gateway: Gateway, origin: str, extra: dict[str, str] | None = None) -> httpx.Response:
    """Post the sign-in form the way a browser behind the proxy does: the gateway sees plain http
    on its own address, the browser sends the public origin (and the login cookie, Secure or not)."""
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        form = client.get("/console/login")
        login_cookie = form.cookies["sg_console_login"]
        return client.post("/console/login", data={"token": AUDITOR_TOKEN, "csrf": login_csrf(form.text)},
                           headers={"Origin": origin, "Cookie": f"sg_console_login={login_cookie}", **(extra or {})})


def test_sign_in_behind_a_tls_proxy_takes_the_public_origin_and_sets_secure_cookies(
        make_gateway: Callable[..., Gateway]) -> None:
    """With console.public_origin set, a sign-in from that origin succeeds, where it used to be 403
    (the gateway compared it with the http://host it sees itself), and both cookies are Secure;
    the gateway's own address is then not an accepted origin."""
    gateway = make_gateway(console={"public_origin": PUBLIC})
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        cookie = client.get("/console/login").headers["set-cookie"]
    assert cookie.startswith("sg_console_login=") and "secure" in cookie.lower()
    signed = _sign_in(gateway, PUBLIC)
    assert signed.status_code == 303 and signed.headers["location"] == "/console/overview", signed.text
    session_cookie = next(c for c in signed.headers.get_list("set-cookie") if c.startswith("sg_console="))
    assert "secure" in session_cookie.lower()
    session_id = session_cookie.split(";")[0].split("=", 1)[1]
    with httpx.Client(base_url=gateway.url, timeout=30, cookies={"sg_console": session_id}) as client:
        overview = client.get("/console/overview")
        assert overview.status_code == 200
        csrf = login_csrf(overview.text)
        for origin, status in ((gateway.url, 403), ("https://evil.example", 403), (PUBLIC, 303)):
            resp = client.post("/console/verify", data={"csrf": csrf, "tenant": "acme"}, headers={"Origin": origin})
            assert resp.status_code == status, (origin, resp.text)
    assert _sign_in(gateway, gateway.url).status_code == 403


def test_forwarded_headers_are_not_trusted_without_a_public_origin(console_gateway: Gateway) -> None:
    """Without console.public_origin, X-Forwarded-Proto/Host claiming the public origin change
    nothing: the Origin must be the scheme and Host the gateway sees."""
    forged = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "audit.example.com", "Forwarded":
              "proto=https;host=audit.example.com"}
    assert _sign_in(console_gateway, PUBLIC, forged).status_code == 403
    plain = _sign_in(console_gateway, console_gateway.url, forged)
    assert plain.status_code == 303 and "secure" not in plain.headers["set-cookie"].lower()


@pytest.mark.parametrize("value", ["audit.example.com", "https://audit.example.com/console", "ftp://audit.example.com",
                                   "https://user@audit.example.com", "https://audit.example.com:99999",
                                   # no browser sends these: every sign-in would be 403 at run time
                                   "https://audit example.com", "https://audit.example.com;x",
                                   "https://audit.example.com:0", "https://audit_example.com"])
def test_a_public_origin_that_is_not_an_origin_stops_start_up_naming_file_line_and_field(value: str) -> None:
    """A public_origin that is not scheme://host[:port] is a ConfigError at file:line:column: field."""
    with pytest.raises(ConfigError) as caught:
        parse_settings(f"logging:\n  level: info\nconsole:\n  public_origin: {value!r}\n", "cfg.yaml")
    assert str(caught.value).startswith("cfg.yaml:4:") and "console.public_origin:" in str(caught.value)


def test_a_public_origin_is_kept_as_a_browser_writes_it() -> None:
    """Case and a default port do not matter: the setting is compared as the browser's Origin."""
    settings = parse_settings("console:\n  public_origin: HTTPS://Audit.Example.com:443/\n", "cfg.yaml")
    assert settings.console.public_origin == PUBLIC
