"""Stage: inject. Sets ``upstream`` and ``forward_body``: the bytes sent to the model.

The context window goes after the system message(s) and before the new messages, the memo
as a ``[CHAT SESSION MEMO]`` section (see ``session.model.inject``). What the window and memo
look like in the forwarded body is the codec's (``gateway.codecs``): Chat messages, Responses
input items, Anthropic messages. The upstream is the first whose models match and that speaks
the codec's protocol. Then the codec's ``check_references`` refuses, before anything is sent,
what the request names at the provider that the client may not reach (account-wide objects
whose routes the upstream does not forward: 403; another tenant's provider-held response: 404).

The body sent is always serialised from the parsed body the record is made of, never the
client's bytes, so the model reads exactly what is recorded: a key the client sent twice (JSON
leaves its meaning to each parser, and a provider may take the first where the gateway takes
the last) reaches the model once, with the value the record holds.

A ``window_only`` session (``resolve_session``) is let go here, once its window is in the body:
the round is audited only, as a request without a session.
"""

from __future__ import annotations

import asyncio

import orjson

from gateway.context import Context
from gateway.stages.parse_request import THREAD_ABOVE_BYTES


async def inject(ctx: Context) -> None:
    ctx.upstream = ctx.services.upstreams.route(ctx.model, ctx.codec.protocol)
    body = ctx.codec.forward_body(ctx, ctx.policy, ctx.loaded.state if ctx.loaded is not None else None)
    if body is not None:
        ctx.forward_body = body
    elif len(ctx.raw) > THREAD_ABOVE_BYTES:
        ctx.forward_body = await asyncio.to_thread(orjson.dumps, ctx.body)
    else:
        ctx.forward_body = orjson.dumps(ctx.body)
    await ctx.codec.check_references(ctx)
    if ctx.window_only:  # e.g. a store: false continuation of a chain: the round is not added to it
        ctx.session_id = None
