"""The request lifecycle, top to bottom. Each stage is ``async def stage(ctx) -> None``.

    authenticate → parse_request → resolve_session → match_policy → load_state → inject
      → forward → record → persist → respond

The same list serves every wire protocol (Chat Completions, Responses, Messages): what differs
between them is ``ctx.codec`` (``gateway.codecs``), set by the handler of the route; the stages
call it and never branch on the protocol.

``run`` is a loop over that list. Its ``finally`` is the settle step: a round that reached
``forward`` but was not committed (client gone, upstream broke off, an error after the reply
began) is recorded there, exactly once, with the outcome it had, never dropped silently.

A round whose record step failed is not an early end: ``record`` never raises, so ``persist``
stores it as ``incomplete`` (no text, ``record_failed`` in its audit entry) and ``respond``
raises ``RecordFailed`` instead of completing the reply.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from gateway.context import Context
from gateway.logs import exception_fields
from gateway.stages.authenticate import authenticate
from gateway.stages.forward import forward
from gateway.stages.inject import inject
from gateway.stages.load_state import load_state
from gateway.stages.match_policy import match_policy
from gateway.stages.parse_request import parse_request
from gateway.stages.persist import persist
from gateway.stages.record import record
from gateway.stages.resolve_session import resolve_session
from gateway.stages.respond import respond

Stage = Callable[[Context], Awaitable[None]]

CHAT: tuple[Stage, ...] = (
    authenticate,
    parse_request,
    resolve_session,
    match_policy,
    load_state,
    inject,
    forward,
    record,
    persist,
    respond,
)

log = structlog.get_logger("gateway.pipeline")


async def run(ctx: Context, stages: tuple[Stage, ...] = CHAT) -> None:
    """Run *stages* in order; settle an unrecorded round on the way out."""
    tracing = ctx.services.tracing
    try:
        for stage in stages:
            if tracing is None:
                await stage(ctx)
            else:
                with tracing.stage(stage.__name__):
                    await stage(ctx)
    finally:
        if ctx.outcome and not ctx.persist_attempted:
            await asyncio.shield(settle(ctx))


async def settle(ctx: Context) -> None:
    """Record a round that ended early. Its own failure is logged loudly (exception type and
    frames, never its text: the code that failed saw content), never raised over the error
    that ended the round."""
    if ctx.outcome == "completed":
        ctx.outcome = "incomplete"
    try:
        await record(ctx)
        await persist(ctx)
    except Exception as exc:  # noqa: BLE001 - logged as an error; the original error propagates
        log.error("round_not_recorded", request_id=ctx.request_id, tenant=ctx.tenant,
                  session_id=ctx.session_id, **exception_fields(exc))
