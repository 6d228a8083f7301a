"""``sessiongate policy explain``: which policy a request gets, why, and exactly what would be
recorded and injected — computed by the same functions the request pipeline runs.

``explain(policies, request, ...)`` is pure: it takes parsed JSON and an optional session state
and returns a report (a dict, printed as YAML by the CLI). Nothing is stored or sent.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.policy.matcher import PolicySet, compile_globs
from gateway.policy.model import Policy
from gateway.session.model import SessionState, carries_history, inject


def _criterion(patterns: list[str] | None, value: str | None, what: str) -> tuple[bool, str]:
    if patterns is None:
        return True, f"any {what}"
    regex = compile_globs(patterns)
    ok = value is not None and regex is not None and bool(regex.match(value))
    shown = "none given" if value is None else repr(value)
    return ok, f"{what} {shown} {'matches' if ok else 'does not match'} {patterns}"


def why(policy: Policy, tenant: str, model: str | None, session_id: str | None) -> tuple[bool, list[str]]:
    """Whether *policy* matches, and one line per match criterion saying why."""
    results = [_criterion(policy.match.tenants, tenant, "tenant"),
               _criterion(policy.match.models, model, "model"),
               _criterion(policy.match.session_ids, session_id, "session id")]
    return all(ok for ok, _ in results), [line for _, line in results]


def reply_message(reply: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Accept a chat.completion body, an assistant message, plain reply text, or any other JSON
    object or array (taken as the reply's JSON content). Raises ``ValueError`` saying what is
    wrong for anything else, and for a chat.completion whose first choice or its message is not
    an object."""
    if isinstance(reply, str):
        return {"role": "assistant", "content": reply}, None
    if isinstance(reply, dict) and isinstance(reply.get("choices"), list) and reply["choices"]:
        choice = reply["choices"][0]
        if not isinstance(choice, dict):
            raise ValueError("the reply's choices[0] must be an object (a chat.completion choice with a message)")
        message = choice.get("message")
        if message is not None and not isinstance(message, dict):
            raise ValueError("the reply's choices[0].message must be an object (the assistant message)")
        return dict(message or {}), reply
    if isinstance(reply, dict) and "content" in reply and "role" in reply:
        return reply, None
    if isinstance(reply, (dict, list)):
        return {"role": "assistant", "content": orjson.dumps(reply).decode()}, None
    raise ValueError("the reply must be a chat.completion object, an assistant message, a JSON value or a string")


def detect_protocol(request: dict[str, Any]) -> str:
    """The protocol a request body is written in: ``responses`` when it has ``input`` and no
    ``messages``; ``messages`` (Anthropic) when it has a top-level ``system``, ``stop_sequences``
    or a ``tool_use``/``tool_result``/``image`` block; else ``chat``. ``--protocol`` overrides."""
    if "input" in request and "messages" not in request:
        return "responses"
    messages = request.get("messages")
    if not isinstance(messages, list):
        return "chat"
    if "system" in request or "stop_sequences" in request:
        return "messages"
    blocks = [b for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
              for b in m["content"] if isinstance(b, dict)]
    return "messages" if any(b.get("type") in ("tool_use", "tool_result", "image") for b in blocks) else "chat"


def unrecorded(policy: Policy, user: str | None, reply: str | None, reply_given: bool) -> str | None:
    """Why *policy* records no user message (*user* None) or no assistant message (*reply* None,
    when a reply was given), a line each: the keys it looked for and did not find, or that it
    records none. None when both are recorded."""
    reasons = []
    for role, text, keys, where in (
            ("user", user, policy.session.input_keys, "the request's new input holds none of them (they are read "
             "from an Agently [INPUT] section or a JSON object message, see policies/README.md)"),
            ("assistant", reply if reply_given else "", policy.session.reply_keys,
             "the reply holds none of them (they are read from the reply's JSON)")):
        if text is not None:
            continue
        if keys is None:
            reasons.append(f"no {role} message is recorded, as the round has no {role} text")
        elif not keys:
            reasons.append(f"no {role} message is recorded, as the policy's "
                           f"{'input' if role == 'user' else 'reply'}_keys is []")
        else:
            reasons.append(f"no {role} message is recorded, as the policy records only the "
                           f"{'input' if role == 'user' else 'reply'} keys {', '.join(keys)} and {where}")
    return "\n".join(reasons) or None


def explain(policies: PolicySet, request: dict[str, Any], *, tenant: str, session_id: str | None,
            reply: Any = None, state: SessionState | None = None, protocol: str = "chat") -> dict[str, Any]:
    """The report for *request* written in *protocol* (``chat``, ``responses`` or ``messages``).
    For the other protocols the forwarded messages are shown in the neutral (Chat) form the
    gateway reads them into (``gateway.codecs``)."""
    from gateway.codecs import by_name
    from gateway.stages.record import recorded_round

    codec = by_name(protocol)
    model = request.get("model") if isinstance(request.get("model"), str) else None
    chosen = policies.match(tenant, model, session_id)
    considered = []
    for policy in policies:
        ok, reasons = why(policy, tenant, model, session_id)
        considered.append({"policy": policy.id, "priority": policy.priority, "matches": ok, "why": reasons,
                           "chosen": policy is chosen})
    messages = (request.get("messages") or []) if protocol == "chat" else codec.messages(request)
    recorded_user = recorded_reply = None
    structured = None
    if session_id is not None and not chosen.records_nothing:
        message = body = None
        if reply is not None:
            # a Responses ``response`` object or an Anthropic ``message``; anything else as for chat
            native = protocol != "chat" and isinstance(reply, dict) and (
                "output" in reply or reply.get("type") == "message")
            message, body = (codec.parse_reply(reply), reply) if native else reply_message(reply)
        # what the record stage itself computes (a prefill, structured rounds and all)
        recorded_user, recorded_reply, structured = recorded_round(chosen, request, message, body, messages)
    opts = chosen.session.inject
    injected = inject(messages, state, window=opts.context_window, memo=opts.memo,
                      memo_placement=opts.memo_placement) if session_id is not None else messages
    return {
        "policy": {"id": chosen.id, "version_hash": chosen.version_hash, "priority": chosen.priority,
                   "file": str(chosen.source) if chosen.source else None},
        "considered": considered,
        "recorded": None if session_id is None else {
            "user": recorded_user, "assistant": recorded_reply if reply is not None else "(no --reply given)",
            **({"note": note} if (note := unrecorded(chosen, recorded_user, recorded_reply, reply is not None))
               else {}),
            **({"messages": structured} if structured is not None else {})},
        "injected": {
            "client_sends_history": carries_history(messages),
            "session_state": "loaded from the store" if state is not None else "none (new or unknown session)",
            "forwarded_messages": injected,
        },
        "audit": {"input_keys": chosen.session.input_keys, "reply_keys": chosen.session.reply_keys,
                  **({"protocol": protocol} if protocol != "chat" else {})},
    }
