"""Client and auditor authentication by key hash.

Keys are compared by SHA-256 digest only: the configuration holds digests, never keys, and a
key that reached the gateway is never logged, forwarded or echoed in an error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from multidict import CIMultiDictProxy

from gateway.errors import BadRequest, Forbidden, Unauthorized
from gateway.settings import Settings


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    tenant: str | None  # None for auditors
    role: str  # "client", "auditor" or "scraper" (``metrics.token_sha256``)
    tenants: frozenset[str] | None = None  # an auditor's scope; None: every tenant

    def can_read(self, tenant: str) -> bool:
        """Whether this principal may read *tenant*'s records and audit chain: a client only its
        own tenant, an auditor the tenants it is scoped to (all when unscoped)."""
        if self.role == "client":
            return self.tenant == tenant
        return self.tenants is None or tenant in self.tenants

    def check_tenant(self, tenant: str) -> str:
        """*tenant* when :meth:`can_read` allows it; ``Forbidden`` otherwise (the one check every
        admin route makes)."""
        if not self.can_read(tenant):
            raise Forbidden(f"this token is not scoped to tenant '{tenant[:64]}'")
        return tenant


UNKNOWN_KEY = "unknown API key: use a key issued for this gateway (sessiongate clients new)"
"""What a key the route does not take is told: the same for an unknown key and for another
role's (an auditor token on a model route), so unthrottled routes confirm no guess."""


@dataclass(frozen=True, slots=True)
class Wording:
    """What a refused credential is told, per kind of route: each names the credential that
    route takes and where to send it, never the credential sent."""

    missing: str
    malformed: str
    unknown: str


CLIENT = Wording(
    missing="missing API key: send 'Authorization: Bearer <your gateway key>' or 'x-api-key: <your gateway key>'",
    malformed="malformed Authorization header: expected 'Bearer <your gateway key>'",
    unknown=UNKNOWN_KEY)
AUDITOR = Wording(
    missing="missing auditor token: /admin routes take 'Authorization: Bearer <auditor token>', a token listed "
            "under auditors in the gateway configuration",
    malformed="malformed Authorization header: expected 'Bearer <auditor token>'",
    unknown="unknown auditor token: /admin routes take a token listed under auditors in the gateway configuration")
AUDITOR_IN_API_KEY = ("/admin routes read the auditor token from 'Authorization: Bearer <auditor token>' only, "
                      "not from x-api-key: send it there")
SCRAPER = Wording(
    missing="missing metrics token: /metrics takes 'Authorization: Bearer <metrics token>', the token whose "
            "SHA-256 is metrics.token_sha256 in the gateway configuration",
    malformed="malformed Authorization header: expected 'Bearer <metrics token>'",
    unknown="not the metrics token: /metrics takes only the token whose SHA-256 is metrics.token_sha256 in the "
            "gateway configuration (client keys and auditor tokens do not reach it)")
"""The same ``unknown`` for an unknown token and for a client key or auditor token: ``/metrics``
is not throttled, so it must not tell which guesses are tokens of another kind (401 for all, as
RFC 9110 has it for credentials that are not valid for the resource)."""


class Authenticator:
    """Resolves ``Authorization: Bearer <key>`` to a client (with its tenant) or an auditor."""

    def __init__(self, settings: Settings) -> None:
        self._by_digest: dict[str, Principal] = {}
        for c in settings.clients:
            self._by_digest[c.digest()] = Principal(c.name, c.tenant, "client")
        for a in settings.auditors:
            scope = frozenset(a.tenants) if a.tenants is not None else None
            self._by_digest[a.token_sha256] = Principal(a.name, None, "auditor", scope)
        if settings.metrics.token_sha256 is not None:
            self._by_digest[settings.metrics.token_sha256] = Principal("metrics", None, "scraper")
        self.scraper_required = settings.metrics.token_sha256 is not None

    def identify(self, authorization: str | None, wording: Wording = CLIENT) -> Principal:
        """The principal behind an Authorization header; ``Unauthorized`` otherwise, in the
        *wording* of the route asking."""
        if not authorization:
            raise Unauthorized(wording.missing)
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized(wording.malformed)
        try:
            raw = key.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 (aiohttp keeps them as surrogates)
            raise Unauthorized("malformed Authorization header: it holds bytes that no key or token of this "
                               "gateway has") from None
        principal = self._by_digest.get(hashlib.sha256(raw).hexdigest())
        if principal is None:
            raise Unauthorized(wording.unknown)
        return principal

    def knows(self, value: str) -> bool:
        """Whether *value* is one of this gateway's client keys or auditor tokens."""
        try:
            raw = value.strip().encode("utf-8")
        except UnicodeEncodeError:
            return False
        return bool(raw) and hashlib.sha256(raw).hexdigest() in self._by_digest

    def client(self, authorization: str | None) -> Principal:
        """A client key (client routes take either header: ``auth_header``); ``Unauthorized``
        otherwise."""
        p = self.identify(authorization, CLIENT)
        if p.role != "client":  # answered as an unknown key: these routes are not throttled, so they must
            raise Unauthorized(UNKNOWN_KEY)  # not tell which guesses are auditor or metrics tokens
        return p

    def scraper(self, headers: Mapping[str, str]) -> None:
        """``GET /metrics``: nothing to check without ``metrics.token_sha256``; with it, the
        scraper's token and no other (``Unauthorized``, one message for every wrong token)."""
        if not self.scraper_required:
            return
        if self.identify(headers.get("Authorization"), SCRAPER).role != "scraper":
            raise Unauthorized(SCRAPER.unknown)  # as on the model routes: no other token is told apart here

    def auditor(self, headers: Mapping[str, str]) -> Principal:
        """An ``/admin`` request's auditor, from ``Authorization`` only (``Unauthorized`` saying
        so when the token came in ``x-api-key``); ``Forbidden`` for another role's key (the
        routes are throttled: ``console.throttle``)."""
        authorization = headers.get("Authorization")
        if authorization is None and headers.get("x-api-key") is not None:
            raise Unauthorized(AUDITOR_IN_API_KEY)
        p = self.identify(authorization, AUDITOR)
        if p.role != "auditor":
            raise Forbidden("this route takes an auditor token (listed under auditors in the gateway "
                            "configuration); client keys and the metrics token do not reach it")
        return p


SINGLE_HEADERS = ("Authorization", "x-api-key", "X-Session-Id")
"""Headers that say who is asking and for which session: each may come at most once."""


def check_single_headers(headers: CIMultiDictProxy[str]) -> None:
    """``BadRequest`` when a request carries one of ``SINGLE_HEADERS`` more than once, or both
    ``Authorization`` and ``x-api-key`` with different keys. The gateway reads the first of a
    repeated header and ``Authorization`` before ``x-api-key``; a proxy in front of it may read
    the other (and authorise, log or route on it), so the request is refused rather than read one
    way here and another there."""
    for name in SINGLE_HEADERS:
        if len(headers.getall(name, ())) > 1:
            raise BadRequest(f"the {name} header was sent more than once: send it once", code="duplicate_header")
    authorization, api_key = headers.get("Authorization"), headers.get("x-api-key")
    if authorization is not None and api_key is not None:
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or key.strip() != api_key.strip():
            raise BadRequest("Authorization and x-api-key name different keys: send the gateway key in one of "
                             "them", code="conflicting_credentials")


def auth_header(headers: Mapping[str, str]) -> str | None:
    """A client's credentials on any client route (model, forwarded, sessions): ``Authorization``,
    else Anthropic's ``x-api-key`` (a gateway client key, as ``Bearer <key>``). Neither header ever
    travels upstream (``gateway.upstream``). Auditor routes take ``Authorization`` only."""
    value = headers.get("Authorization")
    if value is None and (key := headers.get("x-api-key")) is not None:
        return f"Bearer {key}"
    return value
