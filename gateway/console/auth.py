"""Console sessions and CSRF.

A console session is created by signing in with an auditor token and lives in this process's
memory only (a restart signs everyone out; behind several replicas, route ``/console`` to one
of them or use sticky sessions). The cookie holds a random 256-bit id; the server keeps the
auditor, a per-session CSRF token and the times. Nothing secret is ever put in a URL.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from aiohttp import web

from gateway.auth import Principal

COOKIE = "sg_console"
LOGIN_COOKIE = "sg_console_login"
IDLE_SECONDS = 30 * 60
MAX_SECONDS = 8 * 3600
MAX_SESSIONS_PER_AUDITOR = 20
"""Live console sessions one auditor token may hold; signing in past it ends that token's
oldest session. Only its own: no auditor can sign another out by signing in repeatedly."""
MAX_LOGIN_FORM_BYTES = 8 * 1024
"""The largest console form post accepted from a browser with no live console session: the
sign-in form (a CSRF token and an auditor token) is a few hundred bytes, and nothing else is
read before sign-in. Larger gets 413 before any of it is read, when ``Content-Length`` says so."""
MAX_FORM_BYTES = 1024 * 1024
"""The largest console form post of a signed-in auditor: the policy explainer's request and
reply (JSON pasted into the form) are the only large fields."""


@dataclass(slots=True)
class ConsoleSession:
    id: str
    principal: Principal
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    created: float = field(default_factory=time.monotonic)
    seen: float = field(default_factory=time.monotonic)

    def can_read(self, tenant: str) -> bool:
        """Whether this auditor may see *tenant* (``Principal.can_read``: the admin routes' rule)."""
        return self.principal.can_read(tenant)


class ConsoleSessions:
    """The signed-in auditors of this process: at most ``MAX_SESSIONS_PER_AUDITOR`` per auditor
    token, that token's oldest ended first."""

    def __init__(self) -> None:
        self._by_id: dict[str, ConsoleSession] = {}
        self._by_auditor: dict[Principal, OrderedDict[str, None]] = {}  # session ids, oldest first

    def create(self, principal: Principal) -> ConsoleSession:
        session = ConsoleSession(secrets.token_urlsafe(32), principal)
        self._by_id[session.id] = session
        own = self._by_auditor.setdefault(principal, OrderedDict())
        own[session.id] = None
        while len(own) > MAX_SESSIONS_PER_AUDITOR:
            oldest, _ = own.popitem(last=False)
            self._by_id.pop(oldest, None)
        return session

    def get(self, session_id: str | None) -> ConsoleSession | None:
        """The live session named by the cookie, or None (unknown, idle too long or too old)."""
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        if session is None:
            return None
        now = time.monotonic()
        if now - session.seen > IDLE_SECONDS or now - session.created > MAX_SECONDS:
            self.drop(session_id)
            return None
        session.seen = now
        return session

    def drop(self, session_id: str | None) -> None:
        session = self._by_id.pop(session_id, None) if session_id else None
        if session is not None:
            own = self._by_auditor.get(session.principal)
            if own is not None:
                own.pop(session.id, None)
                if not own:
                    del self._by_auditor[session.principal]

    def count(self, principal: Principal) -> int:
        """How many live-or-unexpired sessions *principal* holds."""
        return len(self._by_auditor.get(principal, ()))


def set_cookie(response: web.StreamResponse, request: web.Request, name: str, value: str, max_age: int,
               public_origin: str | None = None) -> None:
    """Set a console cookie: ``HttpOnly``, ``SameSite=Strict``, path ``/console``, and ``Secure``
    when the request came over TLS or the configured *public_origin* (``console.public_origin``)
    is https (a TLS-terminating proxy forwards plain http, so the gateway cannot tell)."""
    secure = request.secure or (public_origin or "").startswith("https://")
    response.set_cookie(name, value, max_age=max_age, path="/console", httponly=True, samesite="Strict",
                        secure=secure)


def same_origin(request: web.Request, public_origin: str | None = None) -> bool:
    """True unless the browser says the request came from another site or origin.

    With *public_origin* (``console.public_origin``, behind a reverse proxy) the browser's
    ``Origin`` must be exactly it; without, it must be the scheme and ``Host`` the gateway sees
    (a missing ``Origin`` passes: the CSRF token still has to match). ``X-Forwarded-*`` headers are
    never read: anyone can send them."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if public_origin is not None:
        return origin == public_origin
    if origin is None or origin == "null":
        return origin is None
    return origin == f"{request.scheme}://{request.host}"


def token_matches(expected: str, given: object) -> bool:
    return isinstance(given, str) and bool(given) and hmac.compare_digest(expected.encode(), given.encode())


def form_limit(signed_in: bool) -> int:
    """The body limit of a console form post (:data:`MAX_LOGIN_FORM_BYTES` before sign-in)."""
    return MAX_FORM_BYTES if signed_in else MAX_LOGIN_FORM_BYTES
