"""Agently's chat-history operations on a stored session, shared by the HTTP routes and the CLI.

With a session activated, Agently offers ``add_chat_history``, ``set_chat_history``,
``reset_chat_history`` and ``clean_context_window``, and keeps a memo. Here each is one store
transaction with its audit entry (``SessionService.edit_history`` / ``write_memo``), held to
the policy that matches the session (tenant, session id, and the optional model; what writes
messages or a memo is refused without a model when the policy depends on one:
``session.importing.session_policy``), and bounded
as Agently bounds it: Agently resizes after each of these calls, so the window is bounded by the
policy's strategy inside the transaction (``simple_cut``, ``keep_last``) or, under hooks, by
window maintenance right after (:func:`settle_hooks`).

What each does (the memo is never touched by the four history operations):

============================  ===================================  ==========================
operation                     context window                       full_context (evidence)
============================  ===================================  ==========================
``add``                       the messages appended, then resized  messages appended
``set``                       exactly the messages, then resized   messages appended (never
                                                                   replaced: append-only)
``reset``                     emptied                              unchanged (Agently empties it)
``clean_context_window``      emptied                              unchanged
``memo`` (write)              unchanged                            unchanged
============================  ===================================  ==========================

Messages are refused with 422 (``NotWhitelisted``) under a keyed policy unless they are already
in recorded form, and a memo unless the policy records free text (``session.whitelist``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.errors import BadRequest
from gateway.policy import Policy
from gateway.session.model import Message, SessionState, _storable, memo_limit_message, memo_over_limit
from gateway.session.whitelist import check_memo, check_messages
from gateway.sessions import SessionService
from gateway.stages.persist import bounding_of

HISTORY_OPS = ("add", "set")
CLEAR_OPS = ("reset", "clean_context_window")


def parse_messages(value: Any) -> list[Message]:
    """Agently's chat history argument: one message or a list of them, each ``{"role",
    "content"}`` (a string or a content-part list). Raises ``BadRequest`` naming the bad one.

    Any non-empty role is taken and kept as given, as Agently's ``ChatMessage`` keeps it (its
    length counts it, an export writes it); injection sends it as Agently's role mapping does
    (``session.model.sent_role``: a role other than system, developer, user and assistant goes as
    the assistant's). Other keys are left out, as Agently leaves them, so a ``tool`` message here
    is never a tool result: it has no ``tool_call_id``."""
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list):
        raise BadRequest("'messages' must be a chat message or a list of chat messages")
    out: list[Message] = []
    for i, m in enumerate(items):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise BadRequest(f"'messages[{i}]' must be an object with a string 'role' and a 'content'")
        content = m.get("content")
        if not isinstance(content, (str, list)):
            raise BadRequest(f"'messages[{i}].content' must be a string or a list of content parts")
        out.append({"role": m["role"], "content": content})
    return out


def check_memo_value(memo: Any) -> Any:
    """A memo is a string, an object, a list or null (what Agently's JSON form holds)."""
    if memo is not None and not isinstance(memo, (str, dict, list)):
        raise BadRequest("'memo' must be a string, an object, a list or null")
    return memo


@dataclass(frozen=True, slots=True)
class HistoryResult:
    """What an operation left: the window's size (before any hook maintenance)."""

    op: str
    recorded: int
    state: SessionState

    def to_dict(self, session_id: str) -> dict[str, Any]:
        return {"id": session_id, "op": self.op, "recorded_messages": self.recorded,
                "context_window": {"messages": len(self.state.context_window),
                                   "chars": self.state.window_chars()},
                "memo": self.state.memo is not None}


async def change_history(sessions: SessionService, policy: Policy, tenant: str, session_id: str, op: str,
                         messages: list[Message], request_id: str) -> HistoryResult:
    """Run one chat-history operation (``add``, ``set``, ``reset``, ``clean_context_window``)
    under *policy*: whitelist check, one transaction, audit entry (``history`` for add/set,
    ``reset`` for the two that clear the window, with ``op``)."""
    if op not in HISTORY_OPS + CLEAR_OPS:
        raise BadRequest(f"'op' must be one of {', '.join(HISTORY_OPS)}")
    if op in HISTORY_OPS:
        _storable(messages, "messages")  # an integer beyond 64 bits: refused, never stored as a float
        check_messages(policy, messages)
    else:
        messages = []
    audit = {"event": "history" if op in HISTORY_OPS else "reset", "request_id": request_id,
             "policy_id": policy.id, "policy_hash": policy.version_hash}
    state = await sessions.edit_history(tenant, session_id, op, messages, bounding_of(policy), audit)
    return HistoryResult(op, len(messages), state)


async def write_memo(sessions: SessionService, policy: Policy, tenant: str, session_id: str, memo: Any,
                     request_id: str) -> None:
    """Write the memo under *policy* (refused under keyed policies, holding what cannot be
    stored, such as an integer beyond 64 bits: ``invalid_session``, or over ``MEMO_MAX_BYTES``:
    ``memo_too_large``), audited without its text."""
    check_memo(policy, check_memo_value(memo))
    _storable(memo, "memo")  # an integer beyond 64 bits: refused, never stored as a float
    if (size := memo_over_limit(memo)) is not None:
        raise BadRequest(memo_limit_message(size), code="memo_too_large")
    await sessions.write_memo(tenant, session_id, memo, policy.session_settings, {
        "event": "memo", "request_id": request_id, "policy_id": policy.id,
        "policy_hash": policy.version_hash})


def needs_hooks(policy: Policy, state: SessionState) -> bool:
    """True when the operation left appends for the policy's hooks to analyse."""
    return policy.session.bounding.strategy == "hook" and bool(state.pending)
