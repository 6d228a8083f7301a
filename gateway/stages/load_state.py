"""Stage: load_state. Sets ``loaded``: the session's unsealed state, or None.

Nothing is loaded without a session id, or when the policy injects neither window nor memo
(the session's rows are still checked against the audit chain then, without opening them).
Under a ``hook`` bounding strategy it first waits (at most ``HOOK_WAIT_SECONDS``) for this
session's window maintenance still running in this process, so the window it injects is the one
Agently would send: Agently resizes before its call returns (``session.bounding``).
Raises ``IntegrityError`` when the stored state fails authentication or does not match the
chain, or the session is quarantined (``gateway.sessions``): refused before the upstream call.
"""

from __future__ import annotations

from gateway.context import Context

HOOK_WAIT_SECONDS = 10.0


async def load_state(ctx: Context) -> None:
    if ctx.session_id is None or ctx.policy is None:
        return
    inject = ctx.policy.session.inject
    if not (inject.context_window or inject.memo):
        await ctx.services.sessions.check(ctx.tenant, ctx.session_id, ctx.request_id)
        return
    if ctx.policy.session.bounding.strategy == "hook":
        await ctx.services.background.settled((ctx.tenant, ctx.session_id), HOOK_WAIT_SECONDS)
    ctx.loaded = await ctx.services.sessions.load(ctx.tenant, ctx.session_id, ctx.request_id, for_round=True)
