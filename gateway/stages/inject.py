"""Stage: inject. Sets ``upstream`` and ``forward_body``: the bytes sent to the model.

The context window goes after the system message(s) and before the new messages, the memo
as a ``[CHAT SESSION MEMO]`` section (see ``session.model.inject``). With nothing to inject the
client's bytes are forwarded unchanged, never re-serialised.
"""

from __future__ import annotations

import orjson

from gateway.context import Context
from gateway.session.model import inject as inject_messages


async def inject(ctx: Context) -> None:
    ctx.upstream = ctx.services.upstreams.route(ctx.model)
    ctx.forward_body = ctx.raw
    if ctx.loaded is None or ctx.policy is None:
        return
    opts = ctx.policy.session.inject
    messages = ctx.body["messages"]
    new = inject_messages(messages, ctx.loaded.state, window=opts.context_window, memo=opts.memo,
                          memo_placement=opts.memo_placement)
    if new is not messages:
        ctx.forward_body = orjson.dumps({**ctx.body, "messages": new})
