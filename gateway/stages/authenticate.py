"""Stage: authenticate. Reads the Authorization header (or Anthropic's ``x-api-key`` with a gateway
client key, ``auth.auth_header``); sets ``tenant`` and ``client``.

Raises ``Unauthorized`` (401) or ``Forbidden`` (403 for an auditor token). The key is consumed
here: nothing later sees it, and ``upstream.py`` forwards only an allow-list of headers.
"""

from __future__ import annotations

from gateway.auth import auth_header
from gateway.context import Context


async def authenticate(ctx: Context) -> None:
    principal = ctx.services.auth.client(auth_header(ctx.request.headers))
    ctx.client = principal.name
    ctx.tenant = principal.tenant or ""
