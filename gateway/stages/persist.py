"""Stage: persist. Commits the round and its audit entry durably; sets ``persisted``, and
``outcome`` to the one the entry was committed with (``erased_meanwhile`` when the session was
erased while the round was in flight: nothing of it is recorded).

Runs before ``respond`` sends the last byte, so a reply that reached the client whole is
already on disk. Once started, the commit finishes even if the request is cancelled
(``SessionService.commit_round`` waits for the store inside ``asyncio.shield``; a quiet SQLite
store commits at once, with nothing to wait for). A failure propagates (fail closed): the client
never gets a reply that looks complete for a round that was not stored.
"""

from __future__ import annotations

import functools

from gateway.context import Context
from gateway.observe import model_label
from gateway.policy import HookBounding, Policy
from gateway.session.bounding import maintain, needs_maintenance
from gateway.sessions import Bounding, RoundRecord
from gateway.store.base import provider_id_digest


@functools.lru_cache(maxsize=256)
def bounding_of(policy: Policy) -> Bounding:
    """What the store plan needs of the policy to bound the window inside the transaction."""
    s = policy.session
    b = s.bounding
    return Bounding(max_length=s.max_length, strategy=b.strategy, rounds=getattr(b, "rounds", 0),
                    settings=policy.session_settings)


def audit_fields(ctx: Context) -> dict[str, object]:
    """The audit entry of this round: names, sizes and outcome, never values (the model is one the
    gateway vouches for: ``observe.model_label``). When the record step failed, ``record_failed``
    names the exception's type (never its text); ``detail.keys_over_budget`` the reply keys left out
    of the record because they were too costly to evaluate on this reply (``truncated`` is then set);
    ``detail.refusal`` a reply the codec says is a refusal to keep out of the conversation (the
    round is recorded, its messages stay out of the window); ``detail.prefill_chars`` how many
    characters at the start of the reply the record was read from the client sent (its prefill:
    a size, never the text)."""
    policy = ctx.policy
    fields: dict[str, object] = {
        "event": "round",
        "request_id": ctx.request_id,
        "session_id": ctx.session_id,
        "policy_id": policy.id if policy else None,
        "policy_hash": policy.version_hash if policy else None,
        "route": ctx.request.path,
        "protocol": ctx.codec.name,
        "model": model_label(ctx.model, ctx.upstream, ctx.reply_body),  # never the client's text as sent
        "outcome": ctx.outcome,
        "ended_by": ctx.ended_by or None,
        "upstream_status": ctx.upstream_status or None,
        "input_keys": policy.session.input_keys if policy else None,
        "reply_keys": policy.session.reply_keys if policy else None,
        "recorded": [role for role, text in (("user", ctx.user_text), ("assistant", ctx.reply_text)) if text],
        "bytes_in": len(ctx.raw),
        "bytes_out": ctx.reply_bytes,
        **({"truncated": True} if ctx.reply_truncated or ctx.keys_over_budget else {}),
    }
    detail: dict[str, object] = {}
    if ctx.keys_over_budget:
        detail["keys_over_budget"] = ctx.keys_over_budget
    if ctx.codec.refused(ctx.reply_body):
        detail["refusal"] = True
    if ctx.prefill_chars:
        detail["prefill_chars"] = ctx.prefill_chars
    if detail:
        fields["detail"] = detail
    if ctx.record_error:
        fields["record_failed"] = ctx.record_error
    return fields


async def persist(ctx: Context) -> None:
    policy = ctx.policy
    assert policy is not None
    ctx.persist_attempted = True
    rec = RoundRecord(ctx.request_id, policy.id, policy.version_hash, ctx.outcome, ctx.user_text,
                      ctx.reply_text, audit_fields(ctx), ctx.recorded,
                      tuple(provider_id_digest(rid) for rid in ctx.codec.held_by_provider(ctx)),
                      windowed=not ctx.codec.refused(ctx.reply_body))
    sessions = ctx.services.sessions
    changes = await sessions.commit_round(ctx.tenant, ctx.session_id, rec, bounding_of(policy), ctx.loaded)
    ctx.persisted = True
    # the outcome the round's entry was committed with, for the request's log line and metric:
    # erased_meanwhile (nothing recorded) when its session was erased while it was in flight
    ctx.outcome = next((str(a["outcome"]) for a in changes.audit if a.get("event") == "round"), ctx.outcome)
    if changes.rounds:
        ctx.services.metrics.round_recorded(ctx.outcome)
    if ctx.session_id is not None and needs_maintenance(policy) and (changes.result or _hooks(policy)):
        ctx.services.background.start((ctx.tenant, ctx.session_id), functools.partial(
            maintain, sessions, ctx.tenant, ctx.session_id, policy, ctx.services.upstreams.complete, ctx.model))


def _hooks(policy: Policy) -> bool:
    """Hooks analyse after every append (Agently's timing), so every round asks for maintenance."""
    return isinstance(policy.session.bounding, HookBounding)
