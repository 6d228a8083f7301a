"""Session documents as Agently reads them: JSON, or JSON5 (Agently's ``load_json_session`` uses
``json5.loads``), under the same size and depth limits.

:func:`parse_session_document` tries strict JSON first (``orjson``, the common case), then reads
the body as JSON5: comments (``//``, ``/* */``), trailing commas, single-quoted strings and the
JSON5 escapes, unquoted (identifier) keys, hexadecimal numbers, leading or trailing decimal
points, a leading ``+``, ``Infinity`` and ``NaN``, and JSON5's extra white space.

JSON5 is not parsed by the ``json5`` package (pure Python: a 3.5 MB document takes over a minute,
which a client could use to hold a worker): :func:`json5_to_json` rewrites only what is JSON5 and
not JSON (one regular-expression pass, in time linear in the text: ``re`` holds the GIL, so one
client's body must not be able to make it slower than that), and the C JSON decoder reads and
checks the result. A string or block comment that is not closed is refused where it opens.
Nesting deeper than ``MAX_DEPTH`` is refused, as for strict JSON. Errors say where the document is
wrong (line and column), never what it holds.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from gateway.errors import InvalidJSON, InvalidSession

MAX_DEPTH = 128
"""Deepest nesting of arrays and objects a session document may have (as for request bodies)."""

_GAP = r"(?:\s++|//[^\n\r\u2028\u2029]*+|(?>/\*[\s\S]*?\*/))*+"
"""White space and comments between two tokens, read as the main pass reads them and never
given back: a block comment ends at its first ``*/``, a line comment at its line's end."""
_JSON5 = re.compile(r"""
    (?=["'/,\[{A-Za-z_$\\+.\-0\x80-\U0010ffff\v\f])  # cheap: only these can start a rewrite
    (?:
    (?P<dq>"(?:[^"\\\n\r]++|\\(?:\r\n|[\s\S]))*+")
  | (?P<sq>'(?:[^'\\\n\r]++|\\(?:\r\n|[\s\S]))*+')
  | (?P<unclosed>["'])
  | (?P<comment>//[^\n\r\u2028\u2029]*+|(?>/\*[\s\S]*?\*/))
  | (?P<open>/\*)
  | (?P<space>[\v\f\xa0\ufeff\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000])
  | (?P<empty>[\[{](?=GAP,))
  | (?P<comma>,(?=GAP[\]}]))
  | (?<![\w$\u200c\u200d\\])(?P<key>(?:[^\W\d]|\$|\\u[0-9a-fA-F]{4})(?:[\w$\u200c\u200d]++|\\u[0-9a-fA-F]{4})*+(?=GAP:))
  | (?<![\w.$])(?P<hex>0[xX][0-9a-fA-F]++)(?![\w.$])
  | (?<![\w.$eE])(?P<plus>\+)(?=[0-9.]|Infinity|NaN)
  | (?<![\w.$])(?P<nan>-NaN)(?![\w.$])
  | (?<=[0-9])(?P<dot>\.)(?![0-9])
  | (?<![\w.$])(?P<lead>\.)(?=[0-9])
  | (?P<other>[\s\S])
    )
""".replace("GAP", _GAP), re.VERBOSE)
"""What JSON5 has and JSON has not; everything else is copied as it is and checked by the JSON
decoder. Strings are matched whole so that nothing inside them is taken for anything else.

It runs in time linear in the text (``re`` holds the GIL, so a super-linear pass would stop every
other client): no part rescans what an earlier attempt read. Quantifiers are possessive and a
block comment atomic (ends at its first ``*/``, never extended by backtracking); a key is tried
only where an identifier starts, not at each of its characters; and a string or block comment
that is not closed is refused where it opens (``unclosed``, ``open``) instead of being copied and
read again from the next character (it could never be JSON5). A character that may start a
rewrite but does not is matched by ``other`` and copied by the callback, so that a long run of
them (4 MiB of ``[`` or of letters) is not one C call that holds the GIL for seconds: between
two callbacks the event loop's thread can run."""
_ESCAPE = re.compile(r"""\\(?:\r\n|u[0-9a-fA-F]{4}|x[0-9a-fA-F]{2}|[\s\S])|"|[\u2028\u2029\x00-\x1f]""")
_CONTROL = re.compile(r"[\x00-\x1f]")
_SIMPLE_ESCAPES = {"b": "\\b", "f": "\\f", "n": "\\n", "r": "\\r", "t": "\\t", "v": "\\u000b", '"': '\\"',
                   "\\": "\\\\", "/": "/", "'": "'"}


class JSON5Error(ValueError):
    """The text is not JSON5; ``line`` and ``column`` say where reading stopped."""

    def __init__(self, message: str, text: str, pos: int) -> None:
        self.line = text.count("\n", 0, pos) + 1
        self.column = pos - (text.rfind("\n", 0, pos) + 1) + 1
        super().__init__(f"{message} at line {self.line} column {self.column}")


def _escape(match: re.Match[str]) -> str:
    token = match.group()
    if token == '"':
        return '\\"'
    if len(token) == 1:  # a raw control character or line separator inside a string
        return f"\\u{ord(token):04x}"
    char = token[1:]
    if char in ("\n", "\r", "\r\n", "\u2028", "\u2029"):
        return ""  # a line continuation
    if char in _SIMPLE_ESCAPES:
        return _SIMPLE_ESCAPES[char]
    if char[0] == "u":
        return token
    if char[0] == "x":
        return f"\\u00{char[1:]}"
    if char == "0":
        return "\\u0000"
    return json.dumps(char)[1:-1]  # any other escaped character stands for itself


def _name(token: str) -> str:
    if "\\" not in token:
        return '"' + token + '"'  # an identifier holds no quote, backslash or control character
    token = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), token)
    return json.dumps(token, ensure_ascii=False)


def _rewrite(match: re.Match[str]) -> str:
    kind, token = match.lastgroup, match.group()
    if kind == "dq":
        if "\\" not in token and not _CONTROL.search(token):
            return token
        return '"' + _ESCAPE.sub(_escape, token[1:-1]) + '"'
    if kind == "sq":
        return '"' + _ESCAPE.sub(_escape, token[1:-1]) + '"'
    if kind == "other":
        return token  # a character that may start a rewrite but does not (copied; see _JSON5)
    if kind == "unclosed":
        raise _Refused("a string that is not closed on its line", match.start())
    if kind == "open":
        raise _Refused("a comment that is not closed", match.start())
    if kind == "comment":
        return " " + "\n" * token.count("\n")
    if kind == "space":
        return " "
    if kind == "empty":
        raise _Refused("a comma without an element before it", match.start())
    if kind == "comma":
        return ""  # JSON5 allows one after the last element
    if kind == "key":
        return _name(token)
    if kind == "hex":
        try:
            return str(int(token, 16))
        except ValueError:  # more decimal digits than Python converts (4300), as for a decimal number
            raise _Refused("a number too long to read", match.start()) from None
    if kind == "plus":
        return ""
    if kind == "nan":
        return "NaN"
    if kind == "dot":
        return ".0"  # 5. and 5.e3
    return "0."  # .5


class _Refused(Exception):
    def __init__(self, message: str, pos: int) -> None:
        super().__init__(message)
        self.message, self.pos = message, pos


def json5_to_json(text: str) -> str:
    """Rewrite what is JSON5-only in *text* as JSON (``Infinity``/``NaN`` as Python's ``json``
    reads them); what is neither is left for the JSON decoder to refuse."""
    try:
        return _JSON5.sub(_rewrite, text)
    except _Refused as exc:
        raise JSON5Error(exc.message, text, exc.pos) from None


def loads_json5(text: str) -> Any:
    """Read JSON5 *text*; ``JSON5Error`` when it is not JSON5 or nests deeper than ``MAX_DEPTH``."""
    converted = json5_to_json(text)
    try:
        data = json.loads(converted)
    except json.JSONDecodeError as exc:
        raise JSON5Error("not valid JSON5", converted, exc.pos) from None
    except ValueError:  # an integer longer than Python converts (4300 digits)
        raise JSON5Error("a number too long to read", converted, 0) from None
    except RecursionError:
        raise JSON5Error(f"nesting deeper than {MAX_DEPTH} levels", converted, 0) from None
    if _depth(data) > MAX_DEPTH:
        raise JSON5Error(f"nesting deeper than {MAX_DEPTH} levels", converted, 0)
    return data


def parse_session_document(raw: bytes) -> dict[str, Any]:
    """The body of a session import as an object: strict JSON, else JSON5 as Agently reads it.

    Raises ``InvalidJSON`` (not UTF-8, neither JSON nor JSON5, too deep) or ``InvalidSession``
    (a document that is not an object).
    """
    if not raw:
        raise InvalidJSON("request body is empty; send a session document (a JSON object)")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidJSON(f"request body is not valid UTF-8 (byte {exc.start})") from None
        try:
            data = loads_json5(text.removeprefix("\ufeff"))
        except JSON5Error as exc:
            raise InvalidJSON(f"request body is neither JSON nor JSON5: {exc}") from None
    else:
        depth = _depth(data)
        if depth > MAX_DEPTH:
            raise InvalidJSON(f"request body nests deeper than {MAX_DEPTH} levels")
    if not isinstance(data, dict):
        raise InvalidSession("a session must be a JSON object (Agently's get_json_session() output)")
    return data


def _depth(value: Any) -> int:
    """How deep arrays and objects nest in *value* (0 for a scalar), without recursion."""
    deepest = 0
    todo: list[tuple[Any, int]] = [(value, 1)]
    while todo:
        item, level = todo.pop()
        if type(item) is dict:
            item = item.values()
        elif type(item) is not list:
            continue
        deepest = max(deepest, level)
        nested = [v for v in item if type(v) in _CONTAINERS]
        if nested:
            todo.extend([(v, level + 1) for v in nested])
    return deepest


_CONTAINERS = (dict, list)


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_SPACE = re.compile(r"\s*")
_FIELD = re.compile(r"^'([A-Za-z_]+(?:\[\d+\]|\.[A-Za-z_]+)*)'|^([A-Za-z_]+(?:\[\d+\])+(?:\.[A-Za-z_]+|\[\d+\])*)")
_STEP = re.compile(r"\.?([A-Za-z_]+)|\[(\d+)\]")


def field_of(message: str) -> str | None:
    """The field an error about a document names first (``'full_context[1].tool_calls[0]'``, or
    ``messages[2]`` unquoted)."""
    match = _FIELD.match(message)
    return (match.group(1) or match.group(2)) if match else None


def line_of(text: str, field: str) -> int | None:
    """The line of *text* (strict JSON) on which the value at *field* (``full_context[1].content``;
    ``[2]`` in a list) starts; None when the text is not strict JSON or has no such value (a JSON5
    document)."""
    steps: list[str | int] = [name if name else int(index) for name, index in _STEP.findall(field)]
    try:
        pos = _SPACE.match(text, 0).end()  # type: ignore[union-attr]
        for step in steps:
            pos = _child(text, pos, step)
    except (IndexError, ValueError, AttributeError):
        return None
    return text.count("\n", 0, pos) + 1


def _child(text: str, pos: int, step: str | int) -> int:
    """The offset of member *step* (a key, or an index) of the object or array at *pos*."""
    opening = "{" if isinstance(step, str) else "["
    if text[pos] != opening:
        raise ValueError(step)
    pos = _SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
    index = 0
    while text[pos] not in "}]":
        if isinstance(step, str):
            key = _STRING.match(text, pos)
            if key is None:
                raise ValueError(step)
            pos = _SPACE.match(text, key.end()).end()  # type: ignore[union-attr]
            if text[pos] != ":":
                raise ValueError(step)
            pos = _SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
            if json.loads(key.group()) == step:
                return pos
        elif index == step:
            return pos
        pos = _SPACE.match(text, _skip(text, pos)).end()  # type: ignore[union-attr]
        if text[pos] == ",":
            pos = _SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
        index += 1
    raise ValueError(step)


def _skip(text: str, pos: int) -> int:
    """The offset just after the JSON value that starts at *pos*."""
    depth = 0
    while True:
        char = text[pos]
        if char == '"':
            pos = _STRING.match(text, pos).end()  # type: ignore[union-attr]
        else:
            if char in "[{":
                depth += 1
            elif char in "]}":
                depth -= 1
            elif depth == 0 and char in ",":
                return pos
            pos += 1
        if depth == 0 and char in '"]}':
            return pos
        if depth < 0:
            raise ValueError("unbalanced")
