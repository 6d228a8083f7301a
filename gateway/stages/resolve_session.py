"""Stage: resolve_session. Reads ``X-Session-Id``; sets ``session_id`` (None without one) and
``reply_id``. Without the header, the codec may name a session the request implies (a Responses
``previous_response_id`` chain, ``gateway.codecs.responses``), and the response id to show; a
chain the request continues (its response id is not the session id) must exist in the caller's
tenant, else ``NotFound`` (404) before anything reaches the upstream. A session the codec names
without a response id (a ``store: false`` continuation) sets ``window_only``: ``inject`` reads
its window, and the round is then audited only, not added to it.

The id is scoped by the tenant set in ``authenticate``: the same id under two tenants is two
sessions, so no client can reach another tenant's session whatever id it sends.
"""

from __future__ import annotations

import re

from gateway.auth import Authenticator
from gateway.context import Context
from gateway.errors import InvalidSessionId, NotFound

SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,127}")


def check_session_id(value: str) -> str:
    """*value* when it is a valid session id; ``InvalidSessionId`` saying the rule otherwise."""
    if not SESSION_ID.fullmatch(value):
        raise InvalidSessionId(
            "invalid session id: use 1-128 characters from letters, digits and . _ : @ + = -, "
            "starting with a letter or digit")
    return value


_KEY_SEPARATORS = re.compile(r"[:@+=.]")
"""Session-id characters no generated key holds (``sg-`` and URL-safe base64): what an id built
around a key (``x:<key>``, ``<key>.1``) puts next to it."""


def check_not_a_key(auth: Authenticator, session_id: str) -> str:
    """*session_id*, unless it is, or holds between separators (``: @ + = .``), one of the
    gateway's keys or tokens: session ids are stored, listed and logged in plaintext, so such an
    id is refused (400 ``key_in_session_id``) before anything keeps it, as a key in a forwarded
    URL is. One SHA-256 per part: an id of one or two parts costs about a microsecond."""
    if auth.knows(session_id) or any(auth.knows(part) for part in _KEY_SEPARATORS.split(session_id)
                                     if part and part != session_id):
        raise InvalidSessionId("the session id is one of this gateway's keys: session ids are stored and logged "
                               "in plaintext, so send another id (and never a key) as X-Session-Id",
                               code="key_in_session_id")
    return session_id


async def resolve_session(ctx: Context) -> None:
    value = ctx.request.headers.get("X-Session-Id")
    if value is not None:
        ctx.session_id = check_not_a_key(ctx.services.auth, check_session_id(value))
        return
    ctx.session_id, ctx.reply_id = ctx.codec.implied_session(ctx)
    if ctx.session_id is not None and ctx.reply_id != ctx.session_id and not await _exists(ctx, ctx.session_id):
        raise NotFound("the previous response was not found for this tenant", code="previous_response_not_found")
    ctx.window_only = ctx.session_id is not None and not ctx.reply_id


async def _exists(ctx: Context, session_id: str) -> bool:
    rows = await ctx.services.sessions.page_sessions(ctx.tenant, limit=1, prefix=session_id)
    return bool(rows) and rows[0].session_id == session_id
