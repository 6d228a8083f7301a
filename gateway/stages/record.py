"""Stage: record. Sets ``user_text``, ``reply_text`` and ``prefill_chars``: what the policy whitelists of this round,
and ``recorded``: the round as structured messages when it carries tool calls, tool results or
media parts under ``null`` keys (``session.structured``), else None (the texts are recorded).

The texts are built fresh from the policy's keys (``session.record``), never by copying the
request and deleting, from the request exactly as the client sent it. Without a session id, or
under a policy that records nothing, both stay None (the round is audited, not recorded).

Fails closed, never raises: when building the texts fails, whatever the input, both texts stay
None, ``record_error`` is set to the exception's type name (never its text, which may quote
content) and a ``completed`` outcome becomes ``incomplete``. ``persist`` then stores the round with no text
and an audit entry naming the failure, and ``respond`` withholds the end of the reply
(``RecordFailed``), so the client never gets a reply that looks complete for a round that was
not recorded.

A request that ends with a prefill has its reply recorded as the prefill and the reply
(``recorded_round``); ``prefill_chars`` is how many characters the client sent at the start of
the reply text the record was read from (0 when none or nothing of the reply was recorded), for
the audit entry (``detail.prefill_chars``): an upstream that does not continue a final assistant
message (OpenAI's API) still has the client's text recorded as the start of the model's reply.

A reply key (JSONPath) too costly to evaluate on the provider's reply (``gateway.jsonpath``'s
budget) is left out of the recorded reply and named in ``keys_over_budget``; the round is then
``incomplete`` and its audit entry says ``truncated`` and which keys (``detail.keys_over_budget``).
The client still gets the whole reply. (Request keys were checked before forwarding, in ``match_policy``.)

Rounds larger than ``THREAD_ABOVE_BYTES`` (request plus reply) are built in a worker thread
(``gateway.offload``: fairly among tenants), so parsing a large request never holds up the event
loop and the other clients on it; under a keyed policy (``input_keys`` or ``reply_keys`` set)
above ``KEYED_THREAD_ABOVE_BYTES``, since a key's structured value is rendered as YAML the way
Agently renders it (PyYAML's pure-Python emitter, about a microsecond per character: 60 KB of
values held the loop some 100 ms). A message whose content is an object (Agently's
``agent.input({...})``) is recorded as that YAML too, at some 7 microseconds a value: a round
whose object contents would take more than ``YAML_INLINE_UNITS`` to render
(``session.record.object_units``, counted only that far) is built in a worker thread whatever its
size (a 58 KB object of small lists took 0.2 s a rendering). Each object is rendered once per round
(``session.record.rendering_once``).
"""

from __future__ import annotations

import structlog

from gateway import offload
from gateway.context import Context
from gateway.policy import Policy
from gateway.session.record import (
    build_reply_view,
    build_request_view,
    object_units,
    prefill_start,
    prefill_text,
    render_reply,
    render_user,
    rendering_once,
)
from gateway.session.structured import structured_round

THREAD_ABOVE_BYTES = 64 * 1024
KEYED_THREAD_ABOVE_BYTES = 4 * 1024
YAML_INLINE_UNITS = 4 * 1024
"""Object contents cheaper than this to render as YAML (``session.record.object_units``: characters'
worth, some 4 ms) are rendered on the event loop."""

log = structlog.get_logger("gateway.record")


def recorded_texts(policy: Policy, body: dict, reply_message: dict | None,
                   reply_body: dict | None, messages: list[dict] | None = None,
                   over_budget: list[str] | None = None) -> tuple[str | None, str | None]:
    """The recorded user and assistant texts of one round (pure; may raise on any input). Under
    ``reply_keys: null`` a structured reply is recorded as YAML only when the request asked for
    structured output, as Agently does. *messages* is the request in the neutral form (a chat
    request's own ``messages`` when not given); JSONPath keys run on *body* as sent. With
    *over_budget*, a reply key too costly to evaluate is left out and named there (else it raises
    ``KeyBudgetExceeded``)."""
    if messages is None:
        messages = body["messages"]
    view = build_request_view(body, messages)
    user = render_user(policy.input_paths, messages, view)
    reply = None
    if reply_message is not None:
        reply = render_reply(policy.reply_paths, build_reply_view(reply_message, reply_body, view.wants_structured),
                             structured=policy.reply_paths is None and view.wants_structured,
                             over_budget=over_budget)
    return user, reply


def merged_prefill(messages: list[dict], reply_message: dict | None) -> str:
    """The request's prefill (``session.record.prefill_text``) when the record puts it in front of
    the reply's content ("" when there is none, or the reply's content is not text)."""
    if reply_message is None or not isinstance(reply_message.get("content"), str | None):
        return ""
    return prefill_text(messages)


def recorded_round(policy: Policy, body: dict, reply_message: dict | None, reply_body: dict | None,
                   messages: list[dict], over_budget: list[str] | None = None,
                   ) -> tuple[str | None, str | None, list[dict] | None]:
    """The recorded texts, and the structured messages of a round with tool calls, tool results
    or media parts under ``null`` keys (``session.structured``; None otherwise). A request that
    ends with a prefill (``session.record.prefill_text``) has its reply recorded as the prefill
    and the reply: the assistant turn the model gave, when the upstream continues a final
    assistant message (Anthropic does; OpenAI's API does not, and then the record starts with
    the client's text: the audit entry says how much, ``detail.prefill_chars``)."""
    with rendering_once():
        prefill = merged_prefill(messages, reply_message)
        if prefill and reply_message is not None:
            reply_message = {**reply_message, "content": prefill + (reply_message.get("content") or "")}
        user, reply = recorded_texts(policy, body, reply_message, reply_body, messages, over_budget)
        return user, reply, structured_round(policy, messages, reply_message, reply)


def builds_off_loop(ctx: Context, keyed: bool) -> bool:
    """True when the round is too costly to build on the event loop: larger than the threshold
    (request plus reply bytes), or with object contents costly to render as YAML. Under ``null``
    keys only the new input, the prefill and the reply are rendered as text, so only they are
    looked at (a long history costs nothing here); keys may read any system message."""
    if len(ctx.raw) + ctx.bytes_out + len(ctx.tail) > (KEYED_THREAD_ABOVE_BYTES if keyed else THREAD_ABOVE_BYTES):
        return True
    messages = ctx.messages
    start = 0
    if not keyed:  # from just after the last assistant message before the prefill (session.record.new_messages)
        start = prefill_start(messages)
        while start and messages[start - 1].get("role") != "assistant":
            start -= 1
    objects = [content for message in messages[start:] if type(content := message.get("content")) is dict]
    if ctx.reply_message is not None and type(ctx.reply_message.get("content")) is dict:
        objects.append(ctx.reply_message["content"])
    return bool(objects) and object_units(objects, YAML_INLINE_UNITS) > YAML_INLINE_UNITS


def _recorded_with_prefill(policy: Policy, body: dict, reply_message: dict | None, reply_body: dict | None,
                           messages: list[dict], over_budget: list[str],
                           ) -> tuple[str | None, str | None, list[dict] | None, int]:
    """``recorded_round`` and the length of the prefill put in front of the recorded reply (0 when
    none, or no reply is recorded), in one rendering of the round's objects."""
    with rendering_once():
        user, reply, recorded = recorded_round(policy, body, reply_message, reply_body, messages, over_budget)
        prefill_chars = len(merged_prefill(messages, reply_message)) if reply is not None else 0
    return user, reply, recorded, prefill_chars


async def record(ctx: Context) -> None:
    policy = ctx.policy
    if policy is None or ctx.session_id is None or policy.records_nothing:
        return
    over_budget: list[str] = []
    args = (policy, ctx.body, ctx.reply_message, ctx.reply_body, ctx.messages, over_budget)
    try:
        keyed = policy.session.input_keys is not None or policy.session.reply_keys is not None
        if builds_off_loop(ctx, keyed):
            built = await offload.run(ctx.tenant, _recorded_with_prefill, *args)
        else:
            built = _recorded_with_prefill(*args)
        ctx.user_text, ctx.reply_text, ctx.recorded, ctx.prefill_chars = built
        if over_budget:
            ctx.keys_over_budget = over_budget
            if ctx.outcome == "completed":
                ctx.outcome = "incomplete"
            log.warning("reply_key_over_budget", request_id=ctx.request_id, tenant=ctx.tenant,
                        session_id=ctx.session_id, policy=policy.id, keys=over_budget)
    except Exception as exc:  # noqa: BLE001 - fail closed: persisted as incomplete, reply withheld
        ctx.user_text = ctx.reply_text = ctx.recorded = None
        ctx.record_error = type(exc).__name__
        if ctx.outcome == "completed":
            ctx.outcome = "incomplete"
        log.error("record_failed", request_id=ctx.request_id, tenant=ctx.tenant, session_id=ctx.session_id,
                  policy=policy.id, error=ctx.record_error)
