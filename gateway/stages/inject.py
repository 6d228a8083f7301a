"""Stage: inject. Sets ``upstream`` and ``forward_body``: the bytes sent to the model.

The context window goes after the system message(s) and before the new messages, the memo
as a ``[CHAT SESSION MEMO]`` section (see ``session.model.inject``). With nothing to inject the
client's bytes are forwarded unchanged, never re-serialised. What the window and memo look like
in the forwarded body is the codec's (``gateway.codecs``): Chat messages, Responses input items,
Anthropic messages. The upstream is the first whose models match and that speaks the codec's
protocol.
"""

from __future__ import annotations

from gateway.context import Context


async def inject(ctx: Context) -> None:
    ctx.upstream = ctx.services.upstreams.route(ctx.model, ctx.codec.protocol)
    body = ctx.codec.forward_body(ctx, ctx.policy, ctx.loaded.state if ctx.loaded is not None else None)
    ctx.forward_body = ctx.raw if body is None else body
