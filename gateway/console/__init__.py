"""The auditor's console: server-rendered pages at ``/console`` to browse, verify and export.

Contract:

- **Who.** Auditor tokens only. Sign-in posts the token once (never in a URL); the console then
  keeps a server-side session named by a random cookie (``HttpOnly``, ``SameSite=Strict``,
  ``Secure`` over TLS or when ``console.public_origin`` is https, 30 minutes idle and 8 hours
  at most; at most 20 per auditor token, its oldest ended first). Client keys cannot sign in.
  Failed sign-ins (and failed ``/admin`` bearer tokens) are throttled per client address
  (:mod:`.throttle`). A tenant-scoped auditor sees only its tenants, and only the policies that
  can apply to them; any other tenant's page is 403.
- **Safety.** Every state-changing request (``POST``) carries the session's CSRF token and a
  same-origin ``Origin``/``Sec-Fetch-Site`` (``console.public_origin`` behind a proxy); anything
  else is refused with 403. Every page is
  sent with a strict Content-Security-Policy (no inline script, nothing from another origin),
  ``no-store`` caching and ``nosniff``. Templates auto-escape every value, so recorded content
  is always shown as text, never as markup or a class name (a recorded role maps to a fixed class).
- **What is shown.** Rounds exactly as an export shows them: under the redaction of the policy
  that recorded them, never raw content. Reading a session, running a verification and making
  an export are each appended to the tenant's audit chain (``console_read``, ``verify``,
  ``export``).

Modules: :mod:`.auth` (console sessions, CSRF), :mod:`.views` (pages), :mod:`.jobs`
(verification and export in the background, with progress, limited per auditor), :mod:`.stats`
(overview numbers), :mod:`.throttle` (failed authentications per address, the demo-token warning),
:mod:`.pool` (the threads pages and exports are redacted and rendered on, apart from request work).
"""

from __future__ import annotations

from aiohttp import web

from gateway.console.views import setup

__all__ = ["setup"]


def add_routes(app: web.Application) -> None:
    """Register the console's routes and its clean-up on *app*."""
    setup(app)
