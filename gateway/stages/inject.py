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

orjson reads an integer beyond 64 bits as a float (``gateway.jsonbody``); when the serialised
body shows one may be there (``jsonbody.widened``: an exponent of 18 or more, one ``memchr`` in
the common case), the body is read again exactly (``parse_request.reparse_exact``) and
serialised again, so the provider gets, and the record holds, the integer the client sent.

A memo not rendered yet in this process (after a restart, in another worker, or written by an
import, a hook or the summarize strategy) is rendered on the offload pool first: a large one
takes PyYAML long enough to hold up every other request if rendered on the loop.

A ``window_only`` session (``resolve_session``) is let go here, once its window is in the body:
the round is audited only, as a request without a session.
"""

from __future__ import annotations

from gateway import jsonbody, offload
from gateway.context import Context
from gateway.session.model import memo_rendered, memo_text
from gateway.stages.parse_request import THREAD_ABOVE_BYTES, reparse_exact


async def inject(ctx: Context) -> None:
    ctx.upstream = ctx.services.upstreams.route(ctx.model, ctx.codec.protocol)
    if ctx.loaded is not None and not memo_rendered(memo := ctx.loaded.state.memo):
        await offload.run(ctx.tenant, memo_text, memo)  # rendered once per memo (and process), off the loop
    ctx.forward_body = await _serialise(ctx)
    if len(ctx.forward_body) > THREAD_ABOVE_BYTES:
        wide = await offload.run(ctx.tenant, jsonbody.widened, ctx.forward_body)
    else:
        wide = jsonbody.widened(ctx.forward_body)
    if wide:  # an integer beyond 64 bits may have been read as a float
        await reparse_exact(ctx)
        ctx.forward_body = await _serialise(ctx)
    await ctx.codec.check_references(ctx)
    if ctx.window_only:  # e.g. a store: false continuation of a chain: the round is not added to it
        ctx.session_id = None


async def _serialise(ctx: Context) -> bytes:
    """The body to forward: the codec's (window and memo injected), else the parsed body's JSON."""
    body = ctx.codec.forward_body(ctx, ctx.policy, ctx.loaded.state if ctx.loaded is not None else None)
    if body is not None:
        return body
    if len(ctx.raw) > THREAD_ABOVE_BYTES:
        return await offload.run(ctx.tenant, jsonbody.dumps, ctx.body)
    return jsonbody.dumps(ctx.body)
