"""Stage: match_policy. Sets ``policy``: the one policy that applies to this request.

Reads the current policy set (hot-reloaded; a request keeps the set it started with).

When the round will be recorded and the policy's ``input_keys`` hold JSONPath (``$``) keys,
they are evaluated here, within their budget (``gateway.jsonpath``), before anything is
forwarded: a body on which one does not fit is refused with 413 ``too_many_values``, so the
record never goes without a key because the client padded its body.
"""

from __future__ import annotations

import structlog

from gateway.context import Context
from gateway.errors import PayloadTooLarge
from gateway.jsonpath import KeyBudgetExceeded
from gateway.paths import check_jsonpath_keys

log = structlog.get_logger("gateway.match_policy")


async def match_policy(ctx: Context) -> None:
    policy = ctx.policy = ctx.services.policies.current.match(ctx.tenant, ctx.model, ctx.session_id)
    if ctx.session_id is None or policy.records_nothing:
        return
    try:
        check_jsonpath_keys(policy.input_paths, ctx.body)
    except KeyBudgetExceeded as exc:
        log.warning("jsonpath_key_over_budget", request_id=ctx.request_id, tenant=ctx.tenant,
                    session_id=ctx.session_id, policy=policy.id, bound=exc.what, limit=exc.limit)
        raise PayloadTooLarge(
            "this session's policy records the request through a JSONPath key, and this body holds too many "
            f"values for it (over {exc.limit} {'units of work' if exc.what == 'work' else 'characters of output'}); "
            "send fewer or smaller messages, content parts or fields (an empty object or list counts like any "
            "other value), or split the request", code="too_many_values") from None
