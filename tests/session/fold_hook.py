"""A bounding hook in Agently's shape (the seed's use case 4): when the window holds more than
two rounds, fold the older ones into the memo as a list of facts."""

from __future__ import annotations

from typing import Any


def analysis(full_context: Any, context_window: Any, memo: Any, session_settings: Any) -> str | None:
    return "fold" if len(context_window) > 4 else None


async def fold(full_context: Any, context_window: Any, memo: Any, session_settings: Any) -> tuple[Any, Any, Any]:
    old, keep = context_window[:-4], context_window[-4:]
    facts = list((memo or {}).get("facts", [])) + [m["content"] for m in old if m["role"] == "user"]
    return None, keep, {"facts": facts}
