"""Bounding strategies that cannot run inside a store transaction: ``summarize`` and hooks.

``simple_cut`` and ``keep_last`` are pure and run inside the round's own transaction
(``session.model.bound_sync``). ``summarize`` needs a side request to the model and hooks are
user code, so :func:`maintain` runs them after the round is committed:

1. read the latest state; stop if the window is within ``max_length`` (or the hook's analysis
   says nothing to do);
2. compute a new window and memo (side request / hook) from that snapshot;
3. write them with :meth:`SessionService.update_state` only if the window is still the one
   the snapshot saw; when a concurrent round got there first, start again (a few times).

The side request of ``summarize`` carries no session context and is never recorded as a round
(Agently's ``create_temp_request``); when it fails the window is cut with ``simple_cut``
instead and the failure is logged. A hook's ``full_context`` result is ignored with a warning:
recorded history is append-only here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog

from gateway.policy import HookBounding, Policy, Summarize, call_hook
from gateway.session.model import (
    Message,
    SessionState,
    memo_text,
    over_limit,
    simple_cut,
    split_rounds,
)
from gateway.session.record import context_length
from gateway.sessions import SessionService

log = structlog.get_logger("gateway.bounding")
ATTEMPTS = 3
SUMMARY_PROMPT = (
    "You maintain the memory of a long conversation. Merge the existing memo and the conversation "
    "excerpt below into one concise memo that keeps every fact, decision, name, number and open "
    "question a later turn may need. Answer with the memo text only, under {limit} characters."
)

# (model, messages, timeout) -> summary text; the caller supplies it so that this module never
# talks to the provider itself (``upstream.py`` stays the one place that does).
Summarizer = Callable[[str | None, list[Message], float], Awaitable[str]]


def needs_maintenance(policy: Policy) -> bool:
    return policy.session.bounding.strategy in ("summarize", "hook")


async def maintain(sessions: SessionService, tenant: str, session_id: str, policy: Policy,
                   summarizer: Summarizer, model: str | None) -> bool:
    """Bound the session's window with the policy's async strategy. Returns True when it wrote."""
    for _ in range(ATTEMPTS):
        loaded = await sessions.load(tenant, session_id)
        if loaded is None:
            return False
        snapshot = loaded.state
        new = await _compute(sessions, tenant, session_id, policy, snapshot, summarizer, model)
        if new is None:
            return False

        def change(state: SessionState, snapshot: SessionState = snapshot,
                   new: SessionState = new) -> SessionState | None:
            if state.context_window != snapshot.context_window or state.memo != snapshot.memo:
                raise _Moved
            return new

        try:
            return await sessions.update_state(tenant, session_id, change, {
                "event": "bounding", "policy_id": policy.id, "policy_hash": policy.version_hash})
        except _Moved:
            continue
    log.warning("bounding_gave_up", tenant=tenant, session_id=session_id, attempts=ATTEMPTS)
    return False


class _Moved(Exception):
    """The session changed between the snapshot and the write."""


async def _compute(sessions: SessionService, tenant: str, session_id: str, policy: Policy,
                   state: SessionState, summarizer: Summarizer, model: str | None) -> SessionState | None:
    settings = policy.session
    bounding = settings.bounding
    if isinstance(bounding, Summarize):
        if not over_limit(state, settings.max_length):
            return None
        return await _summarize(state, bounding, settings.max_length, summarizer, model)
    if isinstance(bounding, HookBounding):
        return await _hook(sessions, tenant, session_id, state, bounding, settings.max_length)
    return None


async def _summarize(state: SessionState, cfg: Summarize, max_length: int | None, summarizer: Summarizer,
                     model: str | None) -> SessionState:
    rounds = split_rounds(state.context_window)
    keep = rounds[len(rounds) - cfg.keep_last_rounds:] if cfg.keep_last_rounds else []
    old = [m for group in rounds[: len(rounds) - len(keep)] for m in group]
    kept = [m for group in keep for m in group]
    prompt = (cfg.prompt or SUMMARY_PROMPT).format(limit=cfg.max_memo_chars)
    excerpt = "\n".join(f"{m.get('role')}: {_text(m.get('content'))}" for m in old)
    memo = "" if state.memo is None else memo_text(state.memo)
    messages: list[Message] = [
        {"role": "system", "content": prompt},
        {"role": "user", "content": f"[EXISTING MEMO]:\n{memo or '(empty)'}\n\n[CONVERSATION EXCERPT]:\n{excerpt}"},
    ]
    try:
        summary = await asyncio.wait_for(summarizer(cfg.model or model, messages, cfg.timeout_seconds),
                                         cfg.timeout_seconds)
        if not summary.strip():
            raise ValueError("the summarizer answered with an empty text")
    except Exception as exc:  # noqa: BLE001 - the spec'd fallback: cut instead, log the failure
        log.warning("summarize_failed_cut_instead", error=type(exc).__name__, detail=str(exc)[:200])
        return state.with_window(simple_cut(state.context_window, max_length or 0))
    window = kept
    if max_length is not None and context_length(window) > max_length:
        window = simple_cut(window, max_length)
    return state.with_window(window, memo=summary.strip()[: cfg.max_memo_chars])


async def _hook(sessions: SessionService, tenant: str, session_id: str, state: SessionState,
                cfg: HookBounding, max_length: int | None) -> SessionState | None:
    session_settings = dict(state.settings)
    session_settings.setdefault("max_length", max_length)
    full = await sessions.full_context(tenant, session_id)
    window = list(state.context_window)
    if cfg.analysis_fn is not None:
        strategy = await call_hook(cfg.analysis_fn, full, window, state.memo, session_settings)
    else:
        strategy = "simple_cut" if over_limit(state, max_length) else None
    if strategy is None:
        return None
    fn = cfg.execution_fns.get(strategy)
    if fn is None:
        if strategy != "simple_cut" or max_length is None:
            log.warning("bounding_unknown_strategy", strategy=str(strategy)[:64], session_id=session_id)
            return None
        return state.with_window(simple_cut(window, max_length))
    result = await call_hook(fn, full, window, state.memo, session_settings)
    if not isinstance(result, tuple) or len(result) != 3:
        raise TypeError(f"execution hook for '{strategy}' must return (full_context, context_window, memo)")
    new_full, new_window, new_memo = result
    if new_full is not None:
        log.warning("bounding_hook_full_context_ignored", strategy=strategy,
                    note="recorded history is append-only; the hook's full_context is not applied")
    window = state.context_window if new_window is None else [dict(m) for m in new_window]
    return state.with_window(window, memo=state.memo if new_memo is None else new_memo)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else orjson.dumps(content).decode()
