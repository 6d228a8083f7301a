"""Bounding strategies that cannot run inside a store transaction: ``summarize`` and hooks.

``simple_cut`` and ``keep_last`` are pure and run inside the round's own transaction
(``session.model.bound_sync``). ``summarize`` needs a side request to the model and hooks are
user code, so :func:`maintain` runs them after the round is committed:

1. read the latest state; stop if there is nothing to do (the window is within ``max_length``
   for ``summarize``; no append is waiting for analysis for hooks);
2. compute a new window and memo (side request / hooks) from that snapshot;
3. write them with :meth:`SessionService.update_state` only if the state is still the one the
   snapshot saw; when a concurrent write got there first, start again (a few times).

**Hooks run on Agently's timing.** Agently analyses the window after each append (so after a
round's user message and again after its reply, once after ``add_chat_history``, once after a
reset). The store records which appends were not analysed yet (``SessionState.pending``);
:func:`maintain` replays them in order: for each append, the analysis hook sees the window as
it was right after that append (and ``full_context`` up to it), and its strategy's execution
hook runs on that window. A chat request on a session whose maintenance is still running waits
for it (``Background.settled``), so the next request sees the window Agently would send.

**Hooks get Agently's types.** Messages are :class:`HookMessage`: a dict (``m["role"]``) that
also has attribute access (``m.role``, ``m.content``) and ``model_dump()``, like Agently's
``ChatMessage``; ``session_settings`` is a dict with ``max_length``, ``input_keys`` and
``reply_keys`` (``.get()`` works as on Agently's settings namespace). An execution hook may
return dicts, Agently ``ChatMessage`` objects or anything with ``role``/``content`` attributes.

**Failures keep the bound.** A hook that raises, returns something that is not a strategy name
or not ``(full_context, context_window, memo)`` with well-formed messages (and a memo within
``session.model.MEMO_MAX_BYTES``), falls back to
``simple_cut`` (when the window is over ``max_length``), and so does a failed ``summarize`` side
request. The log names the hook and the exception type, never the exception's text (it may
quote conversation content). A hook's ``full_context`` result is ignored with a warning:
recorded history is append-only here. The side request of ``summarize`` carries no session
context and is never recorded as a round (Agently's ``create_temp_request``).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson
import structlog

from gateway.policy import HookBounding, Policy, Summarize, call_hook
from gateway.session.model import (
    MEMO_MAX_BYTES,
    Message,
    SessionState,
    memo_over_limit,
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
            if state.context_window != snapshot.context_window or state.memo != snapshot.memo \
                    or state.pending != snapshot.pending:
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
    memo = "" if state.memo is None else memo_text(state.memo).rstrip("\n")
    messages: list[Message] = [
        {"role": "system", "content": prompt},
        {"role": "user", "content": f"[EXISTING MEMO]:\n{memo or '(empty)'}\n\n[CONVERSATION EXCERPT]:\n{excerpt}"},
    ]
    try:
        summary = await asyncio.wait_for(summarizer(cfg.model or model, messages, cfg.timeout_seconds),
                                         cfg.timeout_seconds)
        if not summary.strip():
            raise ValueError("the summarizer answered with an empty text")
    except Exception as exc:  # noqa: BLE001 - the spec'd fallback: cut instead, log the failure (type only)
        log.warning("summarize_failed_cut_instead", error=type(exc).__name__)
        return state.with_window(simple_cut(state.context_window, max_length or 0), pending=[])
    window = kept
    if max_length is not None and context_length(window) > max_length:
        window = simple_cut(window, max_length)
    return state.with_window(window, memo=summary.strip()[: cfg.max_memo_chars], pending=[])


# --- hooks -----------------------------------------------------------------------------------

class HookMessage(dict[str, Any]):
    """A chat message as a hook sees it: a dict (``m["role"]``, ``m.get("content")``) with
    Agently ``ChatMessage``'s attribute access (``m.role``, ``m.content``) and ``model_dump()``.
    ``str(m)`` is Agently's ``str(m.model_dump())``, so ``len(str(m))`` counts as Agently does."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def model_dump(self, **_: Any) -> dict[str, Any]:
        return dict(self)


def hook_messages(messages: Sequence[Message]) -> list[HookMessage]:
    """*messages* as :class:`HookMessage` objects (copies: a hook cannot change the state in place)."""
    return [HookMessage({"role": m.get("role", "user"), "content": m.get("content")}) for m in messages]


def messages_from_hook(value: Any, what: str) -> list[Message]:
    """A hook's message list back as plain ``{"role", "content"}`` dicts: each item may be a
    mapping, an Agently ``ChatMessage`` (``model_dump()``) or any object with ``role`` and
    ``content`` attributes. Raises ``TypeError`` for anything else (the caller falls back)."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(f"{what} must be a list of chat messages")
    out: list[Message] = []
    for item in value:
        if isinstance(item, Mapping):
            data: Mapping[str, Any] = item
        elif callable(getattr(item, "model_dump", None)):
            data = item.model_dump()
        else:
            data = {"role": getattr(item, "role", None), "content": getattr(item, "content", None)}
        role, content = data.get("role", "user"), data.get("content")
        if not isinstance(role, str) or not isinstance(content, (str, list)):
            raise TypeError(f"{what} holds a message without a string role and a string or list content")
        out.append({"role": role, "content": content})
    return out


def _cut_if_over(window: list[Message], max_length: int | None) -> list[Message]:
    """Agently's ``simple_cut`` step: cut only when the window is over *max_length*."""
    if max_length is None or context_length(window) <= max_length:
        return window
    return simple_cut(window, max_length)


async def _hook(sessions: SessionService, tenant: str, session_id: str, state: SessionState,
                cfg: HookBounding, max_length: int | None) -> SessionState | None:
    """Replay the appends the hooks have not analysed yet (``state.pending``), one analysis (and
    execution) per append, as Agently does; None when nothing is pending."""
    if not state.pending:
        return None
    session_settings = dict(state.settings)
    session_settings.setdefault("max_length", max_length)
    full = await sessions.full_context(tenant, session_id)
    window = list(state.context_window)
    waiting = min(sum(state.pending), len(window))
    base, rest = window[: len(window) - waiting], window[len(window) - waiting:]
    memo = state.memo
    for size in state.pending:
        base, rest = base + rest[:size], rest[size:]
        seen = full[: len(full) - len(rest)] if len(rest) <= len(full) else full
        base, memo = await _resize(cfg, seen, base, memo, session_settings, max_length)
    base = base + rest  # only when pending claimed more than the window holds (it never should)
    return state.with_window(base, memo=memo, pending=[])


async def _resize(cfg: HookBounding, full: list[Message], window: list[Message], memo: Any,
                  session_settings: dict[str, Any], max_length: int | None) -> tuple[list[Message], Any]:
    """One Agently ``async_resize``: the analysis picks a strategy, its execution runs."""
    try:
        if cfg.analysis_fn is not None:
            strategy = await call_hook(cfg.analysis_fn, hook_messages(full), hook_messages(window),
                                       copy.deepcopy(memo), dict(session_settings))
            if strategy is not None and not isinstance(strategy, str):
                raise TypeError("an analysis hook must return a strategy name or None")
        else:
            strategy = "simple_cut" if max_length is not None and context_length(window) > max_length else None
    except Exception as exc:  # noqa: BLE001 - the spec'd fallback: cut, log hook and type only
        log.warning("bounding_hook_failed_cut_instead", hook=cfg.analysis, error=type(exc).__name__)
        return _cut_if_over(window, max_length), memo
    if strategy is None:
        return window, memo
    try:
        fn = cfg.execution_fns.get(strategy)
    except Exception as exc:  # noqa: BLE001 - a hook that no longer resolves: cut, log type only
        log.warning("bounding_hook_failed_cut_instead", hook=cfg.execution.get(strategy), error=type(exc).__name__)
        return _cut_if_over(window, max_length), memo
    if fn is None:
        if strategy == "simple_cut":
            return _cut_if_over(window, max_length), memo
        # Agently warns and goes on; the name is not logged (a hook may return any text)
        log.warning("bounding_unknown_strategy", hook=cfg.analysis)
        return window, memo
    try:
        result = await call_hook(fn, hook_messages(full), hook_messages(window), copy.deepcopy(memo),
                                 dict(session_settings))
        if not isinstance(result, (tuple, list)) or len(result) != 3:
            raise TypeError("an execution hook must return (full_context, context_window, memo)")
        new_full, new_window, new_memo = result
        if new_window is not None:
            new_window = messages_from_hook(new_window, "context_window")
        if memo_over_limit(new_memo) is not None:
            raise ValueError(f"an execution hook's memo is over MEMO_MAX_BYTES ({MEMO_MAX_BYTES})")
    except Exception as exc:  # noqa: BLE001 - the spec'd fallback: cut, log hook and type only
        log.warning("bounding_hook_failed_cut_instead", hook=cfg.execution.get(strategy),
                    error=type(exc).__name__)
        return _cut_if_over(window, max_length), memo
    if new_full is not None:
        log.warning("bounding_hook_full_context_ignored", strategy=strategy,
                    note="recorded history is append-only; the hook's full_context is not applied")
    return (window if new_window is None else new_window), (memo if new_memo is None else new_memo)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else orjson.dumps(content).decode()
