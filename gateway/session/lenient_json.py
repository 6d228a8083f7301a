"""Session documents as Agently reads them: JSON, or JSON5 (Agently's ``load_json_session`` uses
``json5.loads``), under the same size and depth limits.

:func:`parse_session_document` tries strict JSON first (``orjson``, the common case), then reads
the body as JSON5: comments (``//``, ``/* */``), trailing commas, single-quoted strings and the
JSON5 escapes, unquoted (identifier) keys, hexadecimal numbers, leading or trailing decimal
points, a leading ``+``, ``Infinity`` and ``NaN``, and JSON5's extra white space.

JSON5 is not parsed by the ``json5`` package (pure Python: a 3.5 MB document takes over a minute,
which a client could use to hold a worker): :func:`json5_to_json` rewrites it token by token into
JSON, with a regular expression per token, and the C JSON decoder reads the result. Nesting
deeper than ``MAX_DEPTH`` is refused before anything is decoded. Errors say where the document is
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

_TOKEN = re.compile(r"""
    (?P<ws>[\s\ufeff]+)
  | (?P<comment>//[^\n\r\u2028\u2029]*|/\*.*?\*/)
  | (?P<string>"(?:[^"\\\n\r]|\\(?:\r\n|[\s\S]))*"|'(?:[^'\\\n\r]|\\(?:\r\n|[\s\S]))*')
  | (?P<punct>[{}\[\]:,])
  | (?P<number>[+-]?(?:Infinity|NaN|0[xX][0-9a-fA-F]+
                     |(?:0|[1-9][0-9]*)(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?
                     |\.[0-9]+(?:[eE][+-]?[0-9]+)?))
  | (?P<name>(?:[^\W\d]|[$]|\\u[0-9a-fA-F]{4})(?:[\w$\u200c\u200d]|\\u[0-9a-fA-F]{4})*)
""", re.VERBOSE | re.DOTALL)
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_PLAIN_STRING = re.compile(r'"(?:[^"\\]|\\["\\/bfnrtu])*"')
_ESCAPE = re.compile(r"""\\(?:\r\n|u[0-9a-fA-F]{4}|x[0-9a-fA-F]{2}|[\s\S])|"|[\u2028\u2029]""")
_LITERALS = frozenset({"true", "false", "null"})
_SIMPLE_ESCAPES = {"b": "\\b", "f": "\\f", "n": "\\n", "r": "\\r", "t": "\\t", "v": "\\u000b", '"': '\\"',
                   "\\": "\\\\", "/": "/", "'": "'"}


class JSON5Error(ValueError):
    """The text is not JSON5; ``pos`` is the offset where reading stopped."""

    def __init__(self, message: str, text: str, pos: int) -> None:
        self.line = text.count("\n", 0, pos) + 1
        self.column = pos - (text.rfind("\n", 0, pos) + 1) + 1
        super().__init__(f"{message} at line {self.line} column {self.column}")


def _escape(match: re.Match[str]) -> str:
    token = match.group()
    if token == '"':
        return '\\"'
    if token in ("\u2028", "\u2029"):
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


def _string(token: str) -> str:
    """A JSON5 string token as a JSON string."""
    if token[0] == '"' and _PLAIN_STRING.fullmatch(token) and "\u2028" not in token and "\u2029" not in token:
        return token
    return '"' + _ESCAPE.sub(_escape, token[1:-1]) + '"'


def _number(token: str) -> str:
    sign = "-" if token[0] == "-" else ""
    body = token.lstrip("+-")
    if body in ("Infinity", "NaN"):
        return "NaN" if body == "NaN" else sign + "Infinity"
    if body[:2] in ("0x", "0X"):
        return sign + str(int(body, 16))
    if _JSON_NUMBER.fullmatch(body):
        return sign + body
    return sign + repr(float(body))  # .5, 5., 5.e3


def json5_to_json(text: str) -> str:
    """Rewrite JSON5 *text* as JSON text (``Infinity``/``NaN`` as Python's ``json`` reads them).

    Raises ``JSON5Error`` for what JSON5 does not allow and for nesting deeper than ``MAX_DEPTH``.
    """
    out: list[str] = []
    stack: list[str] = []
    expect_key = False
    pos, end = 0, len(text)
    match = _TOKEN.match
    while pos < end:
        m = match(text, pos)
        if m is None:
            raise JSON5Error("unexpected character", text, pos)
        kind, token = m.lastgroup, m.group()
        if kind in ("ws", "comment"):
            out.append(" ")
        elif kind == "punct":
            if token in "[{":
                stack.append(token)
                if len(stack) > MAX_DEPTH:
                    raise JSON5Error(f"nesting deeper than {MAX_DEPTH} levels", text, pos)
                expect_key = token == "{"
            elif token in "]}":
                if not stack or stack.pop() != ("[" if token == "]" else "{"):
                    raise JSON5Error("unbalanced bracket", text, pos)
                _drop_trailing_comma(out, text, pos)
                expect_key = False
            elif token == ",":
                expect_key = bool(stack) and stack[-1] == "{"
            else:
                expect_key = False
            out.append(token)
        elif expect_key:
            if kind == "string":
                out.append(_string(token))
            elif kind == "name" or (kind == "number" and token in ("Infinity", "NaN")):
                out.append(json.dumps(_name(token, text, pos)))
            else:
                raise JSON5Error("expected a key", text, pos)
            expect_key = False
        elif kind == "string":
            out.append(_string(token))
        elif kind == "number":
            out.append(_number(token))
        elif kind == "name" and token in _LITERALS:
            out.append(token)
        else:
            raise JSON5Error("unexpected value", text, pos)
        pos = m.end()
    return "".join(out)


def _name(token: str, text: str, pos: int) -> str:
    if "\\" not in token:
        return token
    return re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), token)


def _drop_trailing_comma(out: list[str], text: str, pos: int) -> None:
    """Remove a comma that ends an array or object (JSON5 allows one after the last element)."""
    i = len(out) - 1
    while i >= 0 and out[i] == " ":
        i -= 1
    if i < 0 or out[i] != ",":
        return
    j = i - 1
    while j >= 0 and out[j] == " ":
        j -= 1
    if j < 0 or out[j] in ("[", "{", ",", ":"):
        raise JSON5Error("a comma without an element before it", text, pos)
    del out[i]


def loads_json5(text: str) -> Any:
    """Read JSON5 *text* (see :func:`json5_to_json`); ``JSON5Error`` when it is not JSON5."""
    converted = json5_to_json(text)
    try:
        return json.loads(converted, strict=False)
    except json.JSONDecodeError as exc:
        raise JSON5Error("not valid JSON5", converted, exc.pos) from None
    except RecursionError:
        raise JSON5Error(f"nesting deeper than {MAX_DEPTH} levels", converted, 0) from None


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
        if isinstance(item, dict):
            deepest = max(deepest, level)
            todo.extend((v, level + 1) for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            deepest = max(deepest, level)
            todo.extend((v, level + 1) for v in item if isinstance(v, (dict, list)))
    return deepest
