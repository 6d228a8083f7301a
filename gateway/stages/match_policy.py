"""Stage: match_policy. Sets ``policy``: the one policy that applies to this request.

Reads the current policy set (hot-reloaded; a request keeps the set it started with).
"""

from __future__ import annotations

from gateway.context import Context


async def match_policy(ctx: Context) -> None:
    ctx.policy = ctx.services.policies.current.match(ctx.tenant, ctx.model, ctx.session_id)
