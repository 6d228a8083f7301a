"""The seed's use case 4 as Agently hooks, written for Agently (attribute access on messages): the
analysis asks for ``compress`` when the window holds more than 10 messages; the execution keeps
the last 6 and counts ``compressed_rounds`` in the memo. The same functions are registered on
Agently's own Session and named in the gateway's policy."""

from __future__ import annotations

from typing import Any


def analysis(full_context: Any, context_window: Any, memo: Any, session_settings: Any) -> str | None:
    assert all(m.role in ("user", "assistant") and isinstance(m.content, str) for m in context_window)
    return "compress" if len(context_window) > 10 else None


def compress(full_context: Any, context_window: Any, memo: Any, session_settings: Any) -> tuple[Any, Any, Any]:
    kept = list(context_window)[-6:]
    assert sum(len(str(m.model_dump())) for m in kept) > 0 and session_settings.get("max_length") is None
    memo = dict(memo or {})
    memo["compressed_rounds"] = int(memo.get("compressed_rounds", 0)) + 1
    return None, kept, memo


def broken(full_context: Any, context_window: Any, memo: Any, session_settings: Any) -> str | None:
    """An analysis hook that fails with conversation text in its exception (a card number)."""
    last = context_window[-1].content
    return str(int(last))  # ValueError: invalid literal for int() with base 10: 'my card is 4111 ...'


def always(full_context: Any, context_window: Any, memo: Any, session_settings: Any) -> str:
    return "compress"


def bad_result(full_context: Any, context_window: Any, memo: Any, session_settings: Any) -> Any:
    """An execution hook that returns something that is not (full_context, context_window, memo)."""
    return [{"role": "user"}]
