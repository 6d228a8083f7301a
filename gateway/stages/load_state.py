"""Stage: load_state. Sets ``loaded``: the session's unsealed state, or None.

Nothing is loaded without a session id, or when the policy injects neither window nor memo.
Raises ``IntegrityError`` when the stored state fails authentication.
"""

from __future__ import annotations

from gateway.context import Context


async def load_state(ctx: Context) -> None:
    if ctx.session_id is None or ctx.policy is None:
        return
    inject = ctx.policy.session.inject
    if not (inject.context_window or inject.memo):
        return
    ctx.loaded = await ctx.services.sessions.load(ctx.tenant, ctx.session_id)
