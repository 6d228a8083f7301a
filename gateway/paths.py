"""Agently key paths and JSONPath: compile a policy key once, find its value in a request or reply.

A key is compiled by :func:`compile_key` into a :class:`KeyPath` (cached, so policies and the
recorder share one object per key). ``KeyPath.find(view)`` returns ``(found, value)`` from a
:class:`~gateway.session.record.RequestView` or :class:`~gateway.session.record.ReplyView`.

Syntax (Agently's ``Session._extract_input_value`` / ``DataLocator.locate_path_in_dict``):

* a key starting with ``$`` is JSONPath (``jsonpath_ng.ext``, filters allowed except ``=~``; no arithmetic, no
  ``split``/``str()``/``sub()``), evaluated against
  the raw request body or the raw chat.completion reply; one match gives that value, several a
  list of the values;
* ``.request`` / ``.execution`` (both spellings) is the whole request body; ``.request.X`` looks
  up ``X`` in the body first, then in the structured request (so ``.execution.input.lang`` works
  as in Agently);
* ``.agent.system`` is the text of the request's system message(s);
* any other key addresses the structured view. A key containing ``/`` is split on ``/`` only
  (``input/lang``, ``a/0/b``: a part indexes a list when the value is one, ``*`` maps over a
  list); otherwise it is split on ``.``, a part may carry one index ``a[1]``, ``a[-1]`` or a
  wildcard ``a[*]`` (``a[]`` too). The whole key is first tried as a literal dict key. On a
  request, a key not found at the top is looked up inside ``input`` (``lang`` means
  ``input.lang``).

A wildcard follows Agently exactly: it yields the list of the values found in every item, and
the key is not found when any item lacks the rest of the path (an empty list gives ``[]``).

Raises ``ValueError`` (with the key and the reason) for a key that cannot be compiled: empty,
unknown ``.root``, empty ``.`` segment, bad index (``a[x]``), bad JSONPath, a JSONPath holding a
regular expression (a ``=~`` filter or ``sub()``: keys run on client text, where a regex could
stall every client) or computing new values from client values (arithmetic ``+ - * /``,
``split()``, ``str()``: ``"x" * n`` lets one request allocate gigabytes). What stays only
selects or measures what the body already holds (filters with ``==``/``<``..., ``len``, ``keys``,
``sorted``, ``path``). A JSONPath operator that fails on the value it meets (``sorted`` of a
string, ``len`` of a number ...) means the key is not found.

JSONPath keys are parsed by jsonpath-ng and evaluated by ``gateway.jsonpath`` within a budget of
work and output: ``find`` raises ``KeyBudgetExceeded`` for a value too large to evaluate the
key on (it never reports such a key as not found); :func:`check_jsonpath_keys` is the same
check for a request's keys before it is forwarded. Nothing else in ``find`` raises.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from jsonpath_ng import JSONPath
from jsonpath_ng.ext import parse as jsonpath_parse
from jsonpath_ng.ext.arithmetic import Operation
from jsonpath_ng.ext.filter import Expression
from jsonpath_ng.ext.string import Split, Str, Sub

from gateway.jsonpath import KeyBudgetExceeded, Query, compile_query

if TYPE_CHECKING:
    from gateway.session.record import ReplyView, RequestView

Root = Literal["request", "agent_system", "jsonpath", "view"]

_REQUEST_ROOTS = (".request", ".execution")
_AGENT_SYSTEM = ".agent.system"
_INDEXED_PART = re.compile(r"^([^\[\]]*)\[([^\[\]]*)\]$")
_INDEX = re.compile(r"^-?\d+$")


class _Missing:
    """Sentinel for "no value here" (None is a real value)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class Step(NamedTuple):
    """One compiled path step.

    ``kind`` is ``key`` (mapping key, dot style), ``index`` (list index, dot style), ``part``
    (slash style: mapping key, or list index when the value is a list) or ``all`` (wildcard).
    """

    kind: Literal["key", "index", "part", "all"]
    value: str | int | None = None


@dataclass(frozen=True, slots=True)
class Path:
    """An Agently path: tried first as a literal dict key, then step by step."""

    literal: str
    steps: tuple[Step, ...]

    def extract(self, data: Any) -> tuple[bool, Any]:
        """Agently's ``Session._extract_by_path``: only a dict root can hold a value."""
        if not isinstance(data, dict):
            return False, None
        if self.literal in data:
            return True, data[self.literal]
        value = walk(data, self.steps)
        return (False, None) if value is MISSING else (True, value)


@dataclass(frozen=True, slots=True)
class KeyPath:
    """A compiled key. ``source`` is the key as written (it names the recorded block)."""

    source: str
    root: Root
    path: Path | None = None
    input_path: Path | None = None
    jsonpath: Any = field(default=None, compare=False)

    def find(self, view: RequestView | ReplyView) -> tuple[bool, Any]:
        """Return ``(True, value)`` when the key addresses a value in ``view``, else ``(False, None)``."""
        if self.root == "jsonpath":
            return _find_jsonpath(self.jsonpath, view.raw)
        if view.kind == "reply":
            return self._find_in_reply(view)  # type: ignore[arg-type]
        return self._find_in_request(view)  # type: ignore[arg-type]

    def _find_in_request(self, view: RequestView) -> tuple[bool, Any]:
        if self.root == "agent_system":
            system = view.system
            return (False, None) if system is None else (True, system)
        if self.root == "request":
            if self.path is None:
                return True, view.request
            found, value = self.path.extract(view.request)
            return (found, value) if found else self.path.extract(view.slots)
        if self.path is None or self.input_path is None:
            return False, None
        slots = view.slots
        found, value = self.path.extract(slots)
        if found:
            return found, value
        return self.input_path.extract(slots.get("input"))

    def _find_in_reply(self, view: ReplyView) -> tuple[bool, Any]:
        if self.root != "view" or self.path is None:
            return False, None
        found, value = self.path.extract(view.data)
        if found or view.tools is None:
            return found, value
        return self.path.extract(view.tools)


def walk(value: Any, steps: Sequence[Step]) -> Any:
    """Follow ``steps`` from ``value`` as Agently's ``DataLocator`` does; MISSING when a step fails."""
    for position, step in enumerate(steps):
        if step.kind == "all":
            if not _is_list(value):
                return MISSING
            rest = steps[position + 1 :]
            values = []
            for item in value:
                item_value = walk(item, rest)
                if item_value is MISSING:
                    return MISSING
                values.append(item_value)
            return values
        value = _step(value, step)
        if value is MISSING:
            return MISSING
    return value


def _step(value: Any, step: Step) -> Any:
    if step.kind == "key":
        return value.get(step.value, MISSING) if isinstance(value, Mapping) else MISSING
    if step.kind == "index":
        return _item(value, step.value) if _is_list(value) else MISSING
    if isinstance(value, Mapping):
        return value.get(step.value, MISSING)
    if _is_list(value):
        try:
            return _item(value, int(str(step.value)))
        except ValueError:
            return MISSING
    return MISSING


def _item(value: Sequence[Any], index: Any) -> Any:
    try:
        return value[index]
    except (IndexError, TypeError):
        return MISSING


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))


def check_jsonpath_keys(keys: Sequence[KeyPath] | None, data: Any) -> None:
    """Evaluate the JSONPath keys among *keys* on *data* (a request body) within their budget.

    Raises :class:`~gateway.jsonpath.KeyBudgetExceeded` for the first that does not fit; the
    match_policy stage runs this before the request is forwarded, so a body that the record
    could not evaluate is refused instead of being recorded without the key."""
    for key in keys or ():
        if key.root == "jsonpath" and data is not None:
            try:
                key.jsonpath.values(data)
            except KeyBudgetExceeded:
                raise
            except Exception:  # noqa: BLE001 - not found, as in find(): nothing to refuse
                pass


def _find_jsonpath(query: Query, data: Any) -> tuple[bool, Any]:
    if data is None:
        return False, None
    try:
        matches = query.values(data)
    except KeyBudgetExceeded:
        raise
    except Exception:  # noqa: BLE001 - as jsonpath-ng, an operator that fails on the value it meets: not found
        return False, None
    if not matches:
        return False, None
    return True, matches[0] if len(matches) == 1 else matches


@functools.lru_cache(maxsize=4096)
def compile_key(key: str) -> KeyPath:
    """Compile one policy key; raises ``ValueError`` naming the key and what is wrong with it."""
    if not isinstance(key, str):
        raise ValueError(f"key {key!r} must be a string")
    text = key.strip()
    if not text:
        raise ValueError("key is empty")
    if text.startswith("$"):
        return KeyPath(source=key, root="jsonpath", jsonpath=_compile_jsonpath(text))
    if text in _REQUEST_ROOTS:
        return KeyPath(source=key, root="request")
    for root in _REQUEST_ROOTS:
        if text.startswith(root + "."):
            return KeyPath(source=key, root="request", path=compile_path(text[len(root) + 1 :], key))
    if text == _AGENT_SYSTEM:
        return KeyPath(source=key, root="agent_system")
    if text.startswith("."):
        raise ValueError(
            f"key {key!r}: unknown root; keys starting with '.' must be .request, .execution or .agent.system"
        )
    path = compile_path(text, key)
    input_path = compile_path(text[len("input.") :], key) if text.startswith("input.") else path
    return KeyPath(source=key, root="view", path=path, input_path=input_path)


def compile_path(text: str, key: str | None = None) -> Path:
    """Compile an Agently path (``/`` style when it contains ``/``, else ``.`` style)."""
    name = key if key is not None else text
    if not text:
        raise ValueError(f"key {name!r}: empty path after the root")
    steps = _slash_steps(text, name) if "/" in text else _dot_steps(text, name)
    return Path(literal=text, steps=steps)


def _slash_steps(text: str, key: str) -> tuple[Step, ...]:
    parts = [part for part in text.split("/") if part]
    if not parts:
        raise ValueError(f"key {key!r}: no path parts between the '/'")
    steps = []
    for part in parts:
        if part.startswith("[") and part.endswith("]"):
            part = part[1:-1]
        steps.append(Step("all") if part in ("*", "") else Step("part", part))
    return tuple(steps)


def _dot_steps(text: str, key: str) -> tuple[Step, ...]:
    steps: list[Step] = []
    for part in text.split("."):
        if not part:
            raise ValueError(f"key {key!r}: empty segment (two dots, or a dot at an end)")
        if "[" not in part and "]" not in part:
            steps.append(Step("key", part))
            continue
        match = _INDEXED_PART.match(part)
        if match is None:
            raise ValueError(f"key {key!r}: bad list index in {part!r}; write a[1] or a[*]")
        name, index = match.groups()
        if name:
            steps.append(Step("key", name))
        if index in ("*", ""):
            steps.append(Step("all"))
        elif _INDEX.match(index):
            steps.append(Step("index", int(index)))
        else:
            raise ValueError(f"key {key!r}: bad list index {index!r}; use a number or *")
    return tuple(steps)


def _compile_jsonpath(text: str) -> Query:
    try:
        expression = jsonpath_parse(text)
    except Exception as exc:  # jsonpath-ng raises several unrelated types for bad input
        raise ValueError(f"key {text!r}: invalid JSONPath: {exc}") from exc
    _refuse_computing(expression, text)
    try:
        return compile_query(expression)
    except ValueError as exc:
        raise ValueError(f"key {text!r}: {exc}") from exc


_COMPUTES = "a key runs on client values for every request"


def _refuse_computing(expression: Any, text: str) -> None:
    """Refuse a JSONPath that runs a regular expression (a ``=~`` filter, ``sub(/regex/, ...)``) or
    builds new values from client values (arithmetic, ``split()``, ``str()``): keys are evaluated
    on the event loop for every request, so either would let one request stall every client or
    allocate without bound (``$.a * $.b`` with ``{"a": "x"*1000, "b": 2000000}`` is 2 GB).

    Every node of the parsed expression is visited, inside filters and sort keys too."""
    stack: list[Any] = [expression]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if isinstance(node, (list, tuple)):
            stack += node
            continue
        if not isinstance(node, JSONPath) or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, Expression) and node.op == "=~":
            raise ValueError(f"key {text!r}: regular-expression filters (=~) are not allowed: {_COMPUTES}, "
                             "where a regex can stall the gateway; use == or record the field and filter in "
                             "the export")
        if isinstance(node, Sub):
            raise ValueError(f"key {text!r}: sub(/regex/, ...) is not allowed: {_COMPUTES}, where a regex "
                             "can stall the gateway")
        if isinstance(node, Operation):
            raise ValueError(f"key {text!r}: arithmetic ({node.op_symbol!r}) is not allowed: {_COMPUTES}, "
                             "where '*' of a string by a number can allocate gigabytes; record the fields "
                             "and compute in the export")
        if isinstance(node, (Split, Str)):
            raise ValueError(f"key {text!r}: {node.method.strip()} is not allowed: {_COMPUTES}, where it builds "
                             "new strings or lists from them; record the field as it is")
        stack += vars(node).values() if hasattr(node, "__dict__") else ()
