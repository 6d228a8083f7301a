"""Is this history what the session's policy would have recorded? (SPEC §3: no client input can
make the record keep what the whitelist excludes, imports and chat-history edits included.)

Pure checks, no I/O. Under a policy with ``input_keys``/``reply_keys`` lists, a message written
straight into a session (``add``/``set`` chat history) must already be in *recorded form*: the
text the gateway itself writes for a round, ``"[<key>]:\\n<value>"`` blocks joined by ``"\\n"``,
each key one of the role's whitelisted keys, in the policy's order, at most once. A user message
is checked against ``input_keys``, an assistant message against ``reply_keys``; any other role
has no recorded form. Under null keys anything goes, as for a round.

A memo is free text the whitelist cannot vet: it may be written or imported only under a policy
that records free text both ways (``input_keys`` and ``reply_keys`` null) — :func:`memo_allowed`.
Imports (``session.importing``) and the chat-history operations (``session.history``) both use
these checks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from gateway.errors import NotWhitelisted
from gateway.policy import Policy

_HEADER_LINE = re.compile(r"^\[([^\]\n]*)\]:$", re.MULTILINE)


def keys_for(policy: Policy, role: Any) -> list[str] | None | bool:
    """The whitelisted keys of *role* under *policy*: a list, None (anything goes), or False
    (no message of that role is ever recorded in keyed form)."""
    if role == "user":
        return policy.session.input_keys
    if role == "assistant":
        return policy.session.reply_keys
    if policy.session.input_keys is None and policy.session.reply_keys is None:
        return None
    return False


def in_recorded_form(content: Any, keys: Sequence[str]) -> bool:
    """True when *content* is what ``session.record.format_keyed`` writes for some values of
    *keys*: ``[key]:`` header lines of whitelisted keys only, each at most once and in the
    policy's order, the first at the very start, no surrounding whitespace. A header line of any
    other name is refused even inside a value: it could smuggle an unlisted field in."""
    if not isinstance(content, str) or not content or content != content.strip() or not keys:
        return False
    headers = list(_HEADER_LINE.finditer(content))
    if not headers or headers[0].start() != 0:
        return False
    order = {key: i for i, key in enumerate(keys)}
    last = -1
    for header in headers:
        position = order.get(header.group(1))
        if position is None or position <= last:
            return False
        last = position
    return True


def check_messages(policy: Policy, messages: Sequence[dict[str, Any]], what: str = "messages") -> None:
    """Raise ``NotWhitelisted`` naming the first message (index and role, never its text) that
    *policy* would not have recorded."""
    for i, message in enumerate(messages):
        role = message.get("role")
        keys = keys_for(policy, role)
        if keys is None:
            continue
        if keys is False:
            raise NotWhitelisted(f"{what}[{i}]: policy '{policy.id}' records no '{str(role)[:20]}' messages")
        assert isinstance(keys, list)
        if not in_recorded_form(message.get("content"), keys):
            raise NotWhitelisted(
                f"{what}[{i}] ({role}) is not in the recorded form of policy '{policy.id}': "
                f"write it as '[key]:\\nvalue' blocks of its keys {keys} in that order")


def memo_allowed(policy: Policy) -> bool:
    """True when *policy* lets a memo be written directly (free-text recording both ways)."""
    return policy.session.input_keys is None and policy.session.reply_keys is None


def check_memo(policy: Policy, memo: Any) -> None:
    """Raise ``NotWhitelisted`` when a non-null *memo* may not be written under *policy*."""
    if memo is not None and not memo_allowed(policy):
        raise NotWhitelisted(f"policy '{policy.id}' records keyed fields only, so a memo cannot be written "
                             "directly (a null memo can)")
