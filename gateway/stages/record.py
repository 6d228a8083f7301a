"""Stage: record. Sets ``user_text`` and ``reply_text``: what the policy whitelists of this round.

Pure apart from reading the context: the texts are built fresh from the policy's keys
(``session.record``), never by copying the request and deleting. Without a session id, or
under a policy that records nothing, both stay None (the round is audited, not recorded).
"""

from __future__ import annotations

from gateway.context import Context
from gateway.session.record import build_reply_view, build_request_view, render_reply, render_user


async def record(ctx: Context) -> None:
    policy = ctx.policy
    if policy is None or ctx.session_id is None or policy.records_nothing:
        return
    view = build_request_view(ctx.body)
    ctx.user_text = render_user(policy.input_paths, ctx.body["messages"], view)
    if ctx.reply_message is not None:
        ctx.reply_text = render_reply(policy.reply_paths, build_reply_view(ctx.reply_message, ctx.reply_body),
                                      structured=policy.reply_paths is None and view.wants_structured)
