"""JSON for what the gateway forwards and records: orjson's speed, integers kept exact.

orjson reads an integer beyond 64 bits (above ``2**64 - 1``, below ``-2**63``) as the nearest
float, without an error (``123456789012345678901`` becomes ``1.2345678901234568e+20``), and
refuses to write a Python int that wide. A body holding one (a ``seed``, a tool schema's
``maximum``, an id in Agently's structured input, a number in a model's JSON reply) would reach
the provider and the record changed.

The fast path stays orjson's; the exact path (the standard library's ``json``, whose integers
are Python ints of any size) is taken only where a wide integer may be:

- :func:`widened` looks at orjson's own output: orjson writes a float of magnitude ``1e16`` or
  more with an exponent, so a float that was a wide integer (magnitude at least ``2**63``)
  shows as ``e+18`` to ``e+308``. The common case (no ``+`` at all) is one ``memchr``. A float
  the client wrote that large, or such text in a string, is a false positive: it only takes the
  exact path, whose result is then the same.
- :func:`loads` is ``orjson.loads``, read again exactly when :func:`widened` says so (for text
  read outside the hot path: a model's JSON reply in the record).
- :func:`loads_exact` reads JSON text orjson has already accepted, integers exact; what orjson
  refuses (NaN, Infinity, ``1e999``, an integer of hundreds of digits, which overflows a
  double) is refused before it is called, and stays refused.
- :func:`dumps` is ``orjson.dumps``; a value holding a wide int, which orjson refuses, is
  written again with each wide int as a fragment of its digits (a walk, on that path only).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import orjson

_WIDE_EXPONENT = re.compile(rb"e\+(?:1[89]|[2-9][0-9]|[1-3][0-9][0-9])")
"""The exponent of a float orjson wrote of magnitude 1e18 or more (a literal start: a fast scan)."""
_I64_MIN, _U64_MAX = -(2**63), 2**64 - 1  # the integers orjson reads and writes as integers
_PLUS_CHECKS = 8  # plus signs looked at one by one; more (base64 data) are left to one regex pass


def widened(data: bytes) -> bool:
    """Whether orjson's output *data* may hold a float that was an integer beyond 64 bits."""
    at = data.find(b"+")
    for _ in range(_PLUS_CHECKS):
        if at == -1:
            return False
        if data[at - 1:at] == b"e" and _WIDE_EXPONENT.match(data, at - 1):
            return True
        at = data.find(b"+", at + 1)
    return _WIDE_EXPONENT.search(data, max(at - 1, 0)) is not None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_exact(data: bytes | str) -> Any:
    """JSON text *data*, which ``orjson.loads`` accepts, with every integer exact.

    Raises ``ValueError`` for what orjson would refuse too (NaN, Infinity) and ``RecursionError``
    for nesting deeper than the interpreter's limit (callers bound the depth first)."""
    return json.loads(data, parse_constant=_refuse_constant)


def loads(data: bytes | str) -> Any:
    """``orjson.loads(data)``, its integers beyond 64 bits exact (:func:`widened`).

    Raises ``orjson.JSONDecodeError`` as orjson does, and for nesting deeper than orjson writes
    (255) where the exact path cannot read it either (the interpreter's recursion limit)."""
    value = orjson.loads(data)
    try:
        if not widened(orjson.dumps(value)):
            return value
    except orjson.JSONEncodeError:  # nested deeper than orjson writes: read it the exact way
        pass
    try:
        return loads_exact(data)
    except RecursionError:
        raise orjson.JSONDecodeError("JSON nests too deep", "", 0) from None


def dumps(value: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    """``orjson.dumps(value, default=default)``; a value holding an integer beyond 64 bits, which
    orjson refuses, is written with each such integer as an ``orjson.Fragment`` of its digits:
    the same bytes orjson writes for everything else (an injected window's fragment too).

    Raises ``orjson.JSONEncodeError`` (a ``TypeError``) for what orjson cannot write."""
    try:
        return orjson.dumps(value, default=default)
    except orjson.JSONEncodeError:
        try:
            digits = _digits(value)
        except RecursionError:  # nested deeper than orjson writes (255) anyway
            raise orjson.JSONEncodeError("the value nests too deep to write as JSON") from None
        return orjson.dumps(digits, default=default)


def _digits(value: Any) -> Any:
    """*value* with every int outside orjson's range as the fragment of its decimal digits."""
    if isinstance(value, dict):
        return {key: _digits(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_digits(item) for item in value]
    if type(value) is int and not _I64_MIN <= value <= _U64_MAX:
        return orjson.Fragment(str(value))
    return value
