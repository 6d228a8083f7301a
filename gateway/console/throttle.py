"""Failed auditor authentications, counted per client address, and the demo-token warning.

An auditor token can be guessed in two places: the console's sign-in form and the ``/admin``
routes (``Authorization: Bearer``). Each failure there (an unknown or malformed token) counts
against the client's address; after ``MAX_FAILURES`` of them within ``WINDOW_SECONDS`` that
address is refused with 429 and ``Retry-After`` until the oldest failure leaves the window. Only
that address: the token's holder signs in from anywhere else as usual. The address is the TCP
peer (``request.remote``), never ``X-Forwarded-For``, which anyone can send: behind a reverse
proxy every client has the proxy's address, so limit sign-ins per client there as well. At most
``MAX_ADDRESSES`` addresses are remembered (the one that failed longest ago is forgotten first).

Failed console sign-ins are logged as ``console_login_failed`` and refused ``/admin`` requests as
``admin_auth_failed``, each with the peer address and never the token.
"""

from __future__ import annotations

import functools
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from gateway.auth import Authenticator
from gateway.errors import GatewayError, Unauthorized
from gateway.observe import route_label

log = structlog.get_logger("gateway.console")
MAX_FAILURES = 10
WINDOW_SECONDS = 60.0
MAX_ADDRESSES = 10_000


class TooManyFailures(GatewayError):
    """An address with too many failed auditor authentications: 429 with ``Retry-After``."""

    status, type, code = 429, "rate_limit_error", "too_many_failed_attempts"

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many failed attempts with an auditor token from this address: try again in "
                         f"{retry_after} seconds")
        self.retry_after = retry_after


class FailureThrottle:
    """Failure times per address within the last ``WINDOW_SECONDS``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()  # the most recent failure last

    def retry_after(self, address: str) -> int | None:
        """Seconds until *address* may try again, or None when it is not held back."""
        failures = self._recent(address)
        if failures is None or len(failures) < MAX_FAILURES:
            return None
        return max(1, math.ceil(failures[0] + WINDOW_SECONDS - self._clock()))

    def failed(self, address: str) -> None:
        """Count a failed authentication from *address*."""
        failures = self._recent(address) or deque(maxlen=MAX_FAILURES)
        failures.append(self._clock())
        self._failures[address] = failures
        self._failures.move_to_end(address)
        while len(self._failures) > MAX_ADDRESSES:
            self._failures.popitem(last=False)

    def _recent(self, address: str) -> deque[float] | None:
        failures = self._failures.get(address)
        if failures is None:
            return None
        horizon = self._clock() - WINDOW_SECONDS
        while failures and failures[0] <= horizon:
            failures.popleft()
        if not failures:
            del self._failures[address]
            return None
        return failures


def peer(request: web.Request) -> str:
    """The client's address as the gateway's socket sees it."""
    return request.remote or "unknown"


def admin_throttled(handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """*handler* (an ``/admin/*`` route) behind the console's failure throttle: a held-back
    address is refused (:class:`TooManyFailures`, in the route's error shape through the error
    middleware) and each ``Unauthorized`` is counted. A wrapper on those routes, not a middleware:
    the model routes pay nothing for it."""

    @functools.wraps(handler)
    async def throttled(request: web.Request) -> web.StreamResponse:
        from gateway.console.views import CONSOLE

        counter, address = request.app[CONSOLE].throttle, peer(request)
        wait = counter.retry_after(address)
        if wait is not None:
            raise TooManyFailures(wait)
        try:
            return await handler(request)
        except Unauthorized:
            counter.failed(address)
            log.warning("admin_auth_failed", peer=address, route=route_label(request))
            raise

    return throttled


DEMO_TOKENS = ("sg-demo-auditor", "sg-demo-acme", "sg-demo-globex")
"""The credentials of ``config/sessiongate.yaml``, published in its comments and the README."""


def warn_demo_credentials(auth: Authenticator) -> None:
    """Log ``demo_credential_configured`` (a warning) for each of the example configuration's
    public demo tokens this gateway accepts, naming whose it is and never the token."""
    for token in DEMO_TOKENS:
        try:
            principal = auth.identify(f"Bearer {token}")
        except Unauthorized:
            continue
        log.warning("demo_credential_configured", role=principal.role, name=principal.name,
                    hint="this is one of the example configuration's published demo tokens: anyone can use it; "
                    "replace it before the gateway is reachable by others")
