"""JSONPath keys, evaluated with a bounded amount of work.

jsonpath-ng stays the parser (``jsonpath_ng.ext.parse``: its grammar is the policy language);
:func:`compile_query` turns its parsed expression into a :class:`Query` of our own, which finds
exactly the values jsonpath-ng's ``expression.find`` finds, in its order, and fails (raises) on
exactly the inputs where jsonpath-ng raises, but visits a value in a fraction of the time and
counts what it does. jsonpath-ng builds a ``DatumInContext`` and a path object for every value it
passes, about 10-20 µs each, so a 1 MB body of 400,000 empty objects kept the event loop busy for
seconds under ``$.messages[*].content``.

Every node jsonpath-ng's ext parser produces is compiled: ``$``, ``@``/```this```, ```parent```,
child (``.``), descendants (``..``), named and quoted fields, ``*``, indices, slices, unions
(``|``), ``where``/``wherenot``, filters (``[?(...)]`` with ``== = != < <= > >=``, ``!``, ``&&``,
``||``, a literal or a singular query on the right), ```len```, ```keys```, ```path```,
```sorted``` and sorts (``[/a, \\b]``); ``&`` (intersection) raises as jsonpath-ng's does.
Regular expressions, arithmetic, ``split``/``str``/``sub`` are refused before this module sees
them (``gateway.paths``); :func:`compile_query` refuses anything else it does not know.

Bounds, per evaluation (one key on one body): ``WORK_BUDGET`` units, where a unit is one value
visited (a child reached, a filter candidate, a descendant walked, a node of a comparison, a
sort comparison and the values it compares), and the output counted as it will be recorded
(every value in every match, so ``$..*``, which repeats each value once per ancestor, is
counted as the record would hold it), plus ``MAX_OUTPUT_CHARS`` characters of strings and
object keys in the output. Past either, :class:`KeyBudgetExceeded` is raised: a key never comes
out "not found" because the body was large. The budget is chosen from measurements (README,
Policies): about 0.1-0.3 µs a unit, so a key stops within a few tens of milliseconds whatever
the body.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

from jsonpath_ng import jsonpath as jp
from jsonpath_ng.ext import filter as jf
from jsonpath_ng.ext import iterable as ji

WORK_BUDGET = 25_000
"""Units of work one key may spend on one body (values visited plus values in the output)."""
MAX_OUTPUT_CHARS = 16 * 1024 * 1024
"""Characters of strings and object keys one key's output may hold, counted once per match that
holds them (four times the default ``server.max_body_bytes``)."""


class KeyBudgetExceeded(Exception):
    """A JSONPath key needs more than ``WORK_BUDGET`` units or ``MAX_OUTPUT_CHARS`` characters
    on this value. ``what`` is ``"work"`` or ``"output"``; ``limit`` the bound that was passed.
    The message names neither the key nor anything of the value."""

    def __init__(self, what: str, limit: int) -> None:
        self.what = what
        self.limit = limit
        noun = "units of work (values visited and values found)" if what == "work" else "characters of output"
        super().__init__(f"a JSONPath key needs more than {limit} {noun} on this body")


class _Step:
    """A path step that is not a field name (str) or an index (int): how ``path`` prints it."""

    __slots__ = ("text", "raw")

    def __init__(self, text: str, raw: bool = False) -> None:
        self.text = text
        self.raw = raw


_RAW = _Step(str(jp.This()), raw=True)  # the value handed to find(), not yet wrapped (jsonpath-ng: a bare value)
_THIS = _Step(str(jp.This()))
_ROOT = _Step(str(jp.Root()))
_LEN = _Step(str(ji.Len()))
_KEYS = _Step(str(ji.Keys()))
_PATH = _Step(str(ji.Path()))

# A datum is a tuple (value, parent datum or None, step, top datum or None when it is the top):
# jsonpath-ng's DatumInContext(value, context=parent, path=step), with the root of its context
# chain at hand so that ``$`` inside a path costs nothing.
Datum = tuple[Any, Any, Any, Any]
V, P, S, T = 0, 1, 2, 3


class _Bare:
    """What jsonpath-ng's ``SortedThis.find`` returns instead of a list (a bare datum): true,
    and a TypeError wherever it is iterated, added to or measured, as jsonpath-ng's is."""

    __slots__ = ("datum",)

    def __init__(self, datum: Datum) -> None:
        self.datum = datum


class _Eval:
    """One evaluation's budget."""

    __slots__ = ("left",)

    def __init__(self, units: int) -> None:
        self.left = units

    def spend(self, units: int) -> None:
        self.left -= units
        if self.left < 0:
            raise KeyBudgetExceeded("work", WORK_BUDGET)


def _step_text(step: Any) -> str:
    if isinstance(step, _Step):
        return step.text
    if isinstance(step, int):
        return str(jp.Index(step))
    return str(jp.Fields._compliant_constructor(step))


def _child(value: Any, parent: Datum, step: Any) -> Datum:
    return (value, parent, step, parent[T] or parent)


def _children(d: Datum) -> list[Datum]:
    """Every member of an object, every element of an array (jsonpath-ng's ``Wildcard``)."""
    value = d[V]
    top = d[T] or d
    if isinstance(value, (list, tuple)):
        return [(child, d, i, top) for i, child in enumerate(value)]
    if isinstance(value, dict):
        return [(child, d, key, top) for key, child in value.items()]
    return []


class Node:
    """A compiled JSONPath node: ``find(datum, ev)`` is jsonpath-ng's ``find``."""

    def find(self, d: Datum, ev: _Eval) -> Any:
        raise NotImplementedError


class Root(Node):
    def find(self, d: Datum, ev: _Eval) -> Any:
        ev.spend(1)
        top = d[T] or d
        return [(top[V], None, _ROOT, None)]


class This(Node):
    def find(self, d: Datum, ev: _Eval) -> Any:
        ev.spend(1)
        return [(d[V], None, _THIS, None)] if d[S] is _RAW else [d]


class Parent(Node):
    def find(self, d: Datum, ev: _Eval) -> Any:
        ev.spend(1)
        parent = d[P]
        if parent is None:
            raise AssertionError("parent of a value with no context")  # jsonpath-ng asserts
        return [(parent[V], None, _THIS, None)] if parent[S] is _RAW else [parent]


class Child(Node):
    def __init__(self, left: Node, right: Node) -> None:
        self.left, self.right = left, right

        self.name = right.name if isinstance(right, Field) else None

    def find(self, d: Datum, ev: _Eval) -> Any:
        left = self.left.find(d, ev)
        ev.spend(1)
        out: list[Datum] = []
        name = self.name
        if name is not None:  # the common `.name` step, without a call per value
            for sub in left:
                value = sub[V]
                if isinstance(value, dict) and name in value:
                    out.append((value[name], sub, name, sub[T] or sub))
            ev.spend(len(out))
            return out
        right = self.right.find
        for sub in left:
            out += right(sub, ev)
        return out


class Descendants(Node):
    def __init__(self, left: Node, right: Node) -> None:
        self.left, self.right = left, right

    def find(self, d: Datum, ev: _Eval) -> Any:
        left = self.left.find(d, ev)
        if not isinstance(left, list):
            left = [left.datum]
        ev.spend(1)
        if isinstance(self.right, Field):
            return self._find_field(left, self.right.name, ev)
        right = self.right.find
        matches: list[Datum] = []
        stack = left[::-1]
        while stack:
            x = stack.pop()
            matches.extend(right(x, ev))
            value = x[V]
            if isinstance(value, list):
                ev.spend(len(value) + 1)
                top = x[T] or x
                stack.extend([(value[i], x, i, top) for i in range(len(value) - 1, -1, -1)])
            elif isinstance(value, dict):
                ev.spend(len(value) + 1)
                top = x[T] or x
                stack.extend([(child, x, key, top) for key, child in reversed(value.items())])
        return matches

    @staticmethod
    def _find_field(left: list[Datum], name: str, ev: _Eval) -> list[Datum]:
        """``..name``: the same walk, but a scalar or an empty container, which holds no field
        and no value that could, is counted and passed."""
        matches: list[Datum] = []
        stack = left[::-1]
        containers = (list, dict)
        while stack:
            x = stack.pop()
            value = x[V]
            if isinstance(value, list):
                ev.spend(len(value))
                top = x[T] or x
                stack.extend([(value[i], x, i, top) for i in range(len(value) - 1, -1, -1)
                              if value[i] and isinstance(value[i], containers)])
            elif isinstance(value, dict):
                top = x[T] or x
                if name in value:
                    matches.append((value[name], x, name, top))
                ev.spend(len(value))
                stack.extend([(child, x, key, top) for key, child in reversed(value.items())
                              if child and isinstance(child, containers)])
        return matches


class Union(Node):
    def __init__(self, left: Node, right: Node) -> None:
        self.left, self.right = left, right

    def find(self, d: Datum, ev: _Eval) -> Any:
        ev.spend(1)
        return self.left.find(d, ev) + self.right.find(d, ev)


class Intersect(Node):
    def find(self, d: Datum, ev: _Eval) -> Any:
        raise NotImplementedError("jsonpath-ng does not implement '&'")


class Where(Node):
    def __init__(self, left: Node, right: Node, keep: bool) -> None:
        self.left, self.right, self.keep = left, right, keep

    def find(self, d: Datum, ev: _Eval) -> Any:
        ev.spend(1)
        right, keep = self.right.find, self.keep
        return [sub for sub in self.left.find(d, ev) if bool(right(sub, ev)) is keep]


class Fields(Node):
    def __init__(self, fields: tuple[str, ...]) -> None:
        self.fields = fields

    def find(self, d: Datum, ev: _Eval) -> Any:
        ev.spend(1)
        value = d[V]
        if not isinstance(value, dict):
            return []
        ev.spend(len(self.fields))
        top = d[T] or d
        return [(value[name], d, name, top) for name in self.fields if name in value]


class Field(Node):
    """One named field (the common case of ``Fields``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find(self, d: Datum, ev: _Eval) -> Any:
        value = d[V]
        name = self.name
        ev.left -= 1
        if isinstance(value, dict) and name in value:
            ev.left -= 1
            if ev.left < 0:
                raise KeyBudgetExceeded("work", WORK_BUDGET)
            return [(value[name], d, name, d[T] or d)]
        return []


class Wildcard(Node):
    def find(self, d: Datum, ev: _Eval) -> Any:
        ev.spend(1)
        value = d[V]
        if isinstance(value, (list, tuple, dict)):
            ev.spend(len(value))
            return _children(d)
        return []


class Index(Node):
    def __init__(self, indices: tuple[int, ...]) -> None:
        self.indices = indices

    def find(self, d: Datum, ev: _Eval) -> Any:
        ev.spend(1)
        value = d[V]
        if not isinstance(value, (list, tuple)):
            return []
        ev.spend(len(self.indices))
        n = len(value)
        top = d[T] or d
        return [(value[i], d, i, top) for i in self.indices if value and -n <= i < n]


class Slice(Node):
    def __init__(self, start: int | None, end: int | None, step: int | None) -> None:
        self.start, self.end, self.step = start, end, step

    def find(self, d: Datum, ev: _Eval) -> Any:
        ev.spend(1)
        value = d[V]
        if not isinstance(value, (list, tuple)) or self.step == 0:
            return []
        positions = range(len(value))[self.start:self.end:self.step]
        ev.spend(len(positions))
        top = d[T] or d
        return [(value[i], d, i, top) for i in positions]


class Filter(Node):
    def __init__(self, expressions: list[Node], references_root: bool) -> None:
        self.expressions = expressions
        self.references_root = references_root

    def find(self, d: Datum, ev: _Eval) -> Any:
        ev.spend(1)
        value = d[V]
        if isinstance(value, dict):
            candidates: Any = value.items()
        elif isinstance(value, list):
            candidates = enumerate(value)
        else:
            return []
        ev.spend(len(value))
        expressions = self.expressions
        top = d[T] or d
        if self.references_root:
            out = []
            for key, item in candidates:
                candidate = (item, d, key, top)
                if all(e.find(candidate, ev) for e in expressions):
                    out.append(candidate)
            return out
        return [(item, d, key, top) for key, item in candidates
                if all(e.find((item, None, _THIS, None), ev) for e in expressions)]


class Expression(Node):
    def __init__(self, target: Node, op: str | None, value: Any) -> None:
        self.target, self.op = target, op
        self.value = value  # a literal, or a compiled singular query (Node)

    def find(self, d: Datum, ev: _Eval) -> Any:
        ev.spend(1)
        op = self.op
        found = self.target.find(d, ev)
        if op == "!":
            return [] if found else [d]
        if isinstance(self.value, Node):
            assert op is not None  # the grammar gives a query operand only after an operator
            values = [m[V] for m in self.value.find(d, ev)]
            if not found or not values:
                if jf.EQUALITY_ONLY_OPERATOR_MAP[op](not found and not values):
                    return found or [d]
                return []
            return [m for m in found if any(_compare(op, m[V], v, ev) for v in values)]
        literal = self.value
        if not found:
            return [d] if op == "!=" else []
        if op is None:
            return found
        null_comparison = literal is None
        result = []
        for m in found:
            value = m[V]
            if null_comparison:
                if jf.EQUALITY_ONLY_OPERATOR_MAP[op](value is None):
                    result.append(m)
                continue
            if isinstance(value, bool) or isinstance(literal, bool):
                if jf.EQUALITY_ONLY_OPERATOR_MAP[op](value is literal):
                    result.append(m)
                continue
            if _compare(op, value, literal, ev):
                result.append(m)
        return result


class Logical(Node):
    def __init__(self, operands: list[Node], any_of: bool) -> None:
        self.operands, self.any_of = operands, any_of

    def find(self, d: Datum, ev: _Eval) -> Any:
        ev.spend(1)
        test = any if self.any_of else all
        return [d] if test(o.find(d, ev) for o in self.operands) else []


class Len(Node):
    def find(self, d: Datum, ev: _Eval) -> Any:
        ev.spend(1)
        try:
            n = len(d[V])
        except TypeError:
            return []
        return [(n, None, _LEN, None)]


class Keys(Node):
    def find(self, d: Datum, ev: _Eval) -> Any:
        ev.spend(1)
        try:
            keys = list(d[V].keys())
        except Exception:  # noqa: BLE001 - jsonpath-ng: anything without keys() has none
            return []
        ev.spend(len(keys))
        return [(key, None, _KEYS, None) for key in keys]


class PathOf(Node):
    def find(self, d: Datum, ev: _Eval) -> Any:
        ev.spend(5)  # printing the step builds one of jsonpath-ng's path objects
        return [(_step_text(d[S]), d, _PATH, d[T] or d)]


class Sorted(Node):
    def __init__(self, expressions: list[tuple[Node, bool]] | None) -> None:
        self.expressions = expressions

    def find(self, d: Datum, ev: _Eval) -> Any:
        ev.spend(1)
        if d[S] is _RAW:
            raise AttributeError("jsonpath-ng's sorted reads .value of the bare value")
        value = d[V]
        if isinstance(value, dict) and self.expressions:
            return _Bare(d)
        if not isinstance(value, (dict, list)):
            return _Bare(d)
        rounds = max(1, math.ceil(math.log2(len(value) + 1)))
        if self.expressions:
            key: Callable[[Any], Any] | None = functools.cmp_to_key(functools.partial(self._compare, ev))
        else:
            ev.spend(len(value) * rounds)
            if isinstance(value, list) and any(isinstance(item, (list, dict)) for item in value):
                ev.spend(sum(_size(item, ev) for item in value) * rounds)  # Python compares them element by element
            key = None
        return [(list(sorted(value, key=key)), None, _THIS, None)]

    def _compare(self, ev: _Eval, left: Any, right: Any) -> int:
        ev.spend(1)
        expressions = self.expressions
        assert expressions is not None
        ldatum, rdatum = (left, None, _THIS, None), (right, None, _THIS, None)
        for field, reverse in expressions:
            lfound = field.find(ldatum, ev)
            rfound = field.find(rdatum, ev)
            if not lfound or not rfound or len(lfound) > 1 or len(rfound) > 1:
                continue
            lvalue, rvalue = lfound[0][V], rfound[0][V]
            if isinstance(lvalue, (list, dict)) or isinstance(rvalue, (list, dict)):
                ev.spend(min(_size(lvalue, ev), _size(rvalue, ev)))
            if lvalue == rvalue:
                continue
            if lvalue < rvalue:
                return 1 if reverse else -1
            return -1 if reverse else 1
        return 0


def _size(value: Any, ev: _Eval) -> int:
    """How many values *value* holds (itself included); each one costs a unit to count."""
    count = 0
    stack = [value]
    while stack:
        item = stack.pop()
        count += 1
        if isinstance(item, list):
            ev.spend(len(item))
            stack += item
        elif isinstance(item, dict):
            ev.spend(len(item))
            stack += item.values()
    return count


def _equal(left: Any, right: Any, ev: _Eval) -> bool:
    """jsonpath-ng's ``_equal`` (RFC 9535 equality), a unit per pair of values compared."""
    pairs = [(left, right)]
    while pairs:
        ev.spend(1)
        left, right = pairs.pop()
        if isinstance(left, bool) or isinstance(right, bool):
            if left is not right:
                return False
        elif isinstance(left, list) and isinstance(right, list):
            if len(left) != len(right):
                return False
            pairs.extend(zip(left, right, strict=True))
        elif isinstance(left, dict) and isinstance(right, dict):
            if left.keys() != right.keys():
                return False
            pairs.extend((value, right[key]) for key, value in left.items())
        elif isinstance(left, (list, dict)) or isinstance(right, (list, dict)) or left != right:
            return False
    return True


def _compare(op: str, left: Any, right: Any, ev: _Eval) -> bool:
    """jsonpath-ng's ``_compare``: only two numbers or two strings are ordered."""
    if (jf._is_number(left) and jf._is_number(right)) or (isinstance(left, str) and isinstance(right, str)):
        return bool(jf.OPERATOR_MAP[op](left, right))  # type: ignore[index]
    return jf.EQUALITY_ONLY_OPERATOR_MAP[op](_equal(left, right, ev))


def _measure(matches: list[Datum], ev: _Eval) -> None:
    """Count the output as the record will hold it: every value of every match (a unit each),
    and the characters of its strings and keys, against ``MAX_OUTPUT_CHARS``."""
    chars = 0
    for match in matches:
        stack = [match[V]]
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                chars += len(item)
            elif isinstance(item, list):
                ev.spend(len(item))
                stack += item
            elif isinstance(item, dict):
                ev.spend(len(item))
                for key in item:
                    chars += len(key)
                stack += item.values()
        if chars > MAX_OUTPUT_CHARS:
            raise KeyBudgetExceeded("output", MAX_OUTPUT_CHARS)
    ev.spend(len(matches))


class Query:
    """A compiled JSONPath key. ``source`` is jsonpath-ng's parsed expression (for the record)."""

    def __init__(self, node: Node, source: Any) -> None:
        self.node = node
        self.source = source

    def values(self, data: Any, budget: int | None = None) -> list[Any]:
        """The values jsonpath-ng's ``source.find(data)`` yields, in its order.

        Raises :class:`KeyBudgetExceeded` past the budget (``WORK_BUDGET`` unless given), and
        whatever jsonpath-ng would raise on *data* (a ``TypeError`` for ``sorted`` of a string,
        say): callers treat that as "not found", as they did with jsonpath-ng.
        """
        ev = _Eval(WORK_BUDGET if budget is None else budget)
        matches = self.node.find((data, None, _RAW, None), ev)
        matches = [m for m in matches]  # a bare result raises TypeError here, as in jsonpath-ng
        _measure(matches, ev)
        return [m[V] for m in matches]

    def cost(self, data: Any, budget: int | None = None) -> int:
        """Units :meth:`values` spends on *data* (for tests and measurements)."""
        ev = _Eval(WORK_BUDGET if budget is None else budget)
        matches = [m for m in self.node.find((data, None, _RAW, None), ev)]
        _measure(matches, ev)
        return (WORK_BUDGET if budget is None else budget) - ev.left


def compile_query(expression: Any) -> Query:
    """Compile jsonpath-ng's parsed *expression*; ``ValueError`` for a node this module does not know."""
    return Query(_compile(expression), expression)


def _compile(node: Any) -> Node:
    kind = type(node)
    if kind is jp.Root:
        return Root()
    if kind is jp.This:
        return This()
    if kind is jp.Parent:
        return Parent()
    if kind is jp.Child:
        return Child(_compile(node.left), _compile(node.right))
    if kind is jp.Descendants:
        return Descendants(_compile(node.left), _compile(node.right))
    if kind is jp._Union:
        return Union(_compile(node.left), _compile(node.right))
    if kind is jp._Intersect:
        return Intersect()
    if kind in (jp.Where, jp.WhereNot):
        return Where(_compile(node.left), _compile(node.right), keep=kind is jp.Where)
    if kind is jp.Fields and not node._deprecated_wildcard_use:
        fields = tuple(node.fields)
        return Field(fields[0]) if len(fields) == 1 else Fields(fields)
    if kind is jp.Wildcard:
        return Wildcard()
    if kind is jp.Index:
        return Index(tuple(node.indices))
    if kind is jp.Slice and not node._deprecated_wildcard_use:
        return Slice(node.start, node.end, node.step)
    if kind is jf.Filter:
        return Filter([_compile(e) for e in node.expressions], node._references_root())
    if kind is jf.Expression:
        if node.op == "=~":
            raise ValueError("regular-expression filters are not compiled")
        value = _compile(node.value) if isinstance(node.value, jp.JSONPath) else node.value
        return Expression(_compile(node.target), node.op, value)
    if kind in (jf.And, jf.Or):
        return Logical([_compile(o) for o in node.operands], any_of=kind is jf.Or)
    if kind is ji.Len:
        return Len()
    if kind is ji.Keys:
        return Keys()
    if kind is ji.Path:
        return PathOf()
    if kind is ji.SortedThis:
        expressions = node.expressions
        return Sorted(None if not expressions else [(_compile(f), bool(r)) for f, r in expressions])
    raise ValueError(f"unsupported JSONPath construct {type(node).__name__}")
