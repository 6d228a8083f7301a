"""A list of messages kept as its JSON text too, carried across appends and cuts at either end.

Under load the gateway serves many sessions in turn, so when a session's next request comes its
window's message objects are cold in the CPU caches. Serialising them again walks about a hundred
dicts and two hundred strings at scattered addresses: about 30 µs for a 12,000-character window in
the benchmark's gateway at concurrency 64 (6 µs for the same call repeated at once, caches warm).
Copying the same 12 KB of contiguous bytes takes about 1 µs. So the window a round seals and the
normalised window a request forwards are kept as text alongside the objects (``session.model``),
and a round only serialises the messages it adds.

The text is exactly ``orjson.dumps(messages)``: orjson writes a list as ``[``, the items joined by
``,`` and ``]``, with no whitespace, so slicing and joining items keeps it byte for byte.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class EncodedList:
    """``orjson.dumps`` of a list (``data``) and where each item starts in it.

    ``starts[i] - shift`` is the offset in ``data`` of item *i*'s first byte; the ``shift`` lets a
    cut from the front keep the offsets as they are instead of rewriting every one."""

    data: bytes
    starts: array[int]
    shift: int = 0

    @classmethod
    def of(cls, items: Sequence[Any]) -> EncodedList:
        return _EMPTY.appended(items)

    def __len__(self) -> int:
        return len(self.starts)

    def items(self) -> memoryview:
        """The items as JSON separated by commas, without the brackets (empty for no item)."""
        return memoryview(self.data)[1:-1]

    def appended(self, items: Sequence[Any], *, replacing: int = 0) -> EncodedList:
        """This list without its last *replacing* items, then with *items* added at the end
        (only they are serialised; the kept text is copied once)."""
        kept = self.without_last(replacing) if replacing else self
        if not items:
            return kept
        parts = [orjson.dumps(item) for item in items]
        starts = array("q", kept.starts)
        pos = len(kept.data) if kept.starts else 1  # where the first new item begins
        for part in parts:
            starts.append(pos + kept.shift)
            pos += len(part) + 1
        head = (memoryview(kept.data)[:-1], b",") if kept.starts else (b"[",)
        return EncodedList(b"".join((*head, b",".join(parts), b"]")), starts, kept.shift)

    def without_first(self, n: int) -> EncodedList:
        """This list without its first *n* items."""
        if n <= 0:
            return self
        if n >= len(self.starts):
            return _EMPTY
        offset = self.starts[n] - self.shift
        return EncodedList(b"".join((b"[", memoryview(self.data)[offset:])), self.starts[n:],
                           self.shift + offset - 1)

    def without_last(self, n: int) -> EncodedList:
        """This list without its last *n* items."""
        if n <= 0:
            return self
        if n >= len(self.starts):
            return _EMPTY
        end = self.starts[len(self.starts) - n] - self.shift  # the first dropped item; a comma before it
        return EncodedList(b"".join((memoryview(self.data)[:end - 1], b"]")), self.starts[:len(self.starts) - n],
                           self.shift)


_EMPTY = EncodedList(b"[]", array("q"))
