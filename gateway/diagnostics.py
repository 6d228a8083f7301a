"""Where a YAML file is wrong, and how to say so: shared by the configuration, policy and
policy-test loaders.

:func:`parse_yaml` composes a document with PyYAML's safe loader and keeps the line and column of
every key and list item (*marks*, by location) and every repeated mapping key (PyYAML would
silently keep the last). :func:`error_diagnostic` turns one of pydantic's validation errors into
a :class:`Diagnostic` at file:line:column and field, in words a person can act on: an unknown
field names the allowed ones and the closest match, a wrong type says what it got, a validator's
message loses pydantic's ``Value error,`` prefix.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel

Loc = tuple[str | int, ...]
Marks = dict[Loc, tuple[int, int]]
Duplicate = tuple[Loc, tuple[int, int]]


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One finding of the checker. ``line`` and ``column`` are 1-based; None when the finding is
    about a whole folder or file. ``field`` is a dotted path such as ``export.redact[0].key``."""

    severity: Literal["error", "warning"]
    file: str
    line: int | None
    column: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}:{self.column or 1}"
        field = f"{self.field}: " if self.field else ""
        return f"{where}: {self.severity}: {field}{self.message}"


MAX_DEPTH = 128
"""How deep collections may nest in a YAML file (as a request body's JSON may)."""

MAX_ALIAS_NODES = 500_000
"""How many nodes aliases may add to a YAML file when expanded. A policy-test case file with one
100-turn history (about 500 nodes) anchored once and reused by 30 cases adds about 15,000; this
leaves room for a thousand such reuses. An alias bomb (each level repeating the previous one) is
refused when composing, before anything is expanded, walked or validated: the 9**7 bomb stops
at its sixth line (x5), having composed fewer than 100 nodes. What a file just under the limit costs
to read, measured (a 10,000-item list aliased 49 times, ``parse_yaml`` alone, 2-core host under
load): 142 MB peak RSS and 1.2 s; ``policy check`` of it 166 MB and 2.1 s with interpreter
start-up (0.6 s). At 1,000,000 it was 253 MB and 1.4-2.4 s, too close to a CI runner's memory
for a file nobody vetted."""


class YAMLLimitError(yaml.composer.ComposerError):
    """A YAML file nests too deeply, refers to itself, or its aliases expand too far; the mark is
    where (a ``MarkedYAMLError``, so every loader reports it at file:line like a syntax error)."""


class _LimitedLoader(yaml.SafeLoader):
    """PyYAML's safe loader composing under :data:`MAX_DEPTH` and :data:`MAX_ALIAS_NODES`.

    PyYAML's composer keeps one node per alias target (a graph), but everything downstream (the
    marks walk, pydantic) sees the expanded tree: each node's expanded size and depth are counted
    as it is composed, every alias adds its target's size to the document's total, and its
    target's depth below the alias's own."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0
        self._alias_nodes = 0
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded nodes, expanded levels)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()
        mark: Any = event.start_mark
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)  # the anchored node, or "undefined alias"
            counted = self._sizes.get(id(node))
            if counted is None:
                raise YAMLLimitError(None, None, f"alias *{event.anchor} refers to a node that contains it "
                                     "(a recursive alias)", mark)
            size, levels = counted
            if self._depth + levels > MAX_DEPTH:
                raise YAMLLimitError(None, None, f"collections nest more than {MAX_DEPTH} levels deep (at "
                                     f"*{event.anchor}, which adds {levels} levels here)", mark)
            self._alias_nodes += size
            if self._alias_nodes > MAX_ALIAS_NODES:
                raise YAMLLimitError(None, None, f"aliases expand to more than {MAX_ALIAS_NODES} nodes "
                                     f"(at *{event.anchor}); write the values out instead", mark)
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise YAMLLimitError(None, None, f"collections nest more than {MAX_DEPTH} levels deep", mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.SequenceNode):
            children: list[yaml.Node] = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        counts = [self._sizes.get(id(child), (1, 1)) for child in children]
        self._sizes[id(node)] = (1 + sum(size for size, _ in counts), 1 + max((levels for _, levels in counts),
                                                                               default=0))
        return node


def parse_yaml(text: str) -> tuple[Any, Marks, list[Duplicate]]:
    """Compose, record marks and duplicate keys, then construct the data.

    Raises ``yaml.MarkedYAMLError`` (with the line) for bad YAML, and :class:`YAMLLimitError` for
    collections nested deeper than :data:`MAX_DEPTH` (aliases included), a recursive alias, or aliases that would
    expand to more than :data:`MAX_ALIAS_NODES` nodes; ``yaml.YAMLError`` for anything else PyYAML
    cannot read (never ``RecursionError``).
    """
    loader = _LimitedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {(): (1, 1)}, []
        marks: Marks = {(): _pos(node.start_mark)}
        duplicates: list[Duplicate] = []
        _walk(loader, node, (), marks, duplicates)
        return loader.construct_document(node), marks, duplicates
    except RecursionError:  # the limits above keep PyYAML's recursion shallow; this is a backstop
        raise yaml.YAMLError(f"nested too deeply (more than {MAX_DEPTH} levels)") from None
    finally:
        loader.dispose()


def decode_text(file: str, raw: bytes) -> str | Diagnostic:
    """``raw`` decoded as UTF-8 (a byte-order mark dropped), or an error at the line and column of
    the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = exc.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)
        before = raw[:start]
        line = before.count(b"\n") + 1
        column = len(before[before.rfind(b"\n") + 1:].decode("utf-8-sig", "replace")) + 1
        return Diagnostic("error", file, line, column, "",
                          f"not UTF-8 text (byte 0x{raw[start]:02x}); save the file as UTF-8")


def _pos(mark: yaml.Mark) -> tuple[int, int]:
    return mark.line + 1, mark.column + 1


def _walk(loader: yaml.SafeLoader, node: yaml.Node, loc: Loc, marks: Marks,
          duplicates: list[Duplicate]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = _key_of(loader, key_node)
            here = (*loc, key)
            if key in seen:  # reported; its value is the one the data keeps, so its marks win
                duplicates.append((here, _pos(key_node.start_mark)))
            seen.add(key)
            block = isinstance(value_node, yaml.CollectionNode) and not value_node.flow_style
            marks[here] = _pos(key_node.start_mark if block else value_node.start_mark)
            _walk(loader, value_node, here, marks, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            marks[(*loc, index)] = _pos(item.start_mark)
            _walk(loader, item, (*loc, index), marks, duplicates)


def _key_of(loader: yaml.SafeLoader, key_node: yaml.Node) -> Any:
    try:
        key = loader.construct_object(key_node, deep=True)
        hash(key)
    except (yaml.YAMLError, TypeError):
        return str(key_node.value)
    return key


def yaml_diagnostic(file: str, exc: yaml.MarkedYAMLError) -> Diagnostic:
    mark = exc.problem_mark or exc.context_mark
    line, column = _pos(mark) if mark is not None else (1, 1)
    problem = " ".join(part for part in (exc.context, exc.problem) if part)
    return Diagnostic("error", file, line, column, "", f"invalid YAML: {problem or exc}")


def at(file: str, marks: Marks, loc: Loc, message: str,
        severity: Literal["error", "warning"] = "error") -> Diagnostic:
    """A diagnostic at the deepest position of ``loc`` that the file has a mark for."""
    for end in range(len(loc), -1, -1):
        if loc[:end] in marks:
            line, column = marks[loc[:end]]
            break
    else:
        line, column = 1, 1
    return Diagnostic(severity, file, line, column, format_field(loc), message)


def format_field(loc: Loc) -> str:
    """``("export", "redact", 0, "key")`` -> ``export.redact[0].key``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def data_loc(data: Any, loc: Loc) -> Loc:
    """Drop from pydantic's ``loc`` the parts that are not in the file (union tags, ``[key]``)."""
    out: list[str | int] = []
    current = data
    for position, part in enumerate(loc):
        if _has(current, part):
            current = current[part]
        elif position == len(loc) - 1 and part != "[key]":
            current = None
        else:
            continue
        out.append(part)
    return tuple(out)


def _has(container: Any, part: str | int) -> bool:
    if isinstance(container, dict):
        return part in container
    return isinstance(container, list) and isinstance(part, int) and 0 <= part < len(container)


def error_diagnostic(file: str, marks: Marks, data: Any, err: Any, root: type[BaseModel]) -> Diagnostic:
    """One of pydantic's errors for *data* validated as *root*, phrased for a person and placed at
    the deepest key of its location that the file has."""
    loc = data_loc(data, tuple(err["loc"]))
    kind, message = err["type"], err["msg"]
    if kind == "extra_forbidden":
        message = _unknown_field_message(root, tuple(err["loc"]))
    elif kind == "missing":
        message = f"required field {loc[-1]!r} is missing"
    elif kind == "union_tag_not_found":
        message = f"'strategy' is required ({_expected_tags(root, tuple(err['loc']))})"
    elif kind.endswith("_type") and "input" in err:
        message = f"{message}, got {_kind_of(err['input'])}"
    elif kind in ("value_error", "assertion_error"):
        message = message.split(", ", 1)[1] if ", " in message else message
    return at(file, marks, loc, message)


def _kind_of(value: Any) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "a list",
             dict: "a mapping", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")


def _unknown_field_message(root: type[BaseModel], loc: Loc) -> str:
    name = str(loc[-1])
    allowed = _fields_at(root, loc[:-1])
    if not allowed:
        return f"unknown field {name!r}"
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.7)  # 'listen' is not 'clients' (0.62)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown field {name!r}{hint} (allowed: {', '.join(allowed)})"


def _expected_tags(root: type[BaseModel], loc: Loc) -> str:
    member = _type_at(root, loc)
    tags = [_tag(m) for m in _union_models(member)]
    return "one of " + ", ".join(tags) if tags else "see the reference"


def _fields_at(root: type[BaseModel], loc: Loc) -> list[str]:
    """The names a file may use at *loc*: each field's alias where it has one; fields the file
    never sets (``exclude``) are left out."""
    target = _type_at(root, loc)
    if not _is_model(target):
        return []
    return [info.alias or name for name, info in target.model_fields.items() if not info.exclude]


def _type_at(root: type[BaseModel], loc: Loc) -> Any:
    """The annotation that pydantic validated at ``loc`` (tags select a union member)."""
    current: Any = root
    for part in loc:
        current = unwrap(current)
        if _is_model(current):
            field = _field(current, str(part))
            if field is None:
                return None
            current = field.annotation
        elif typing.get_origin(current) is list:
            current = typing.get_args(current)[0]
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        else:
            members = {_tag(m): m for m in _union_models(current)}
            current = members.get(str(part))
            if current is None:
                return None
    return unwrap(current)


def _field(model: type[BaseModel], name: str) -> Any:
    """The field a file calls *name* (by its alias, or its name)."""
    for field_name, info in model.model_fields.items():
        if name in (info.alias, field_name):
            return info
    return None


def unwrap(tp: Any) -> Any:
    """Strip ``Annotated`` and ``| None`` (a union of several models is kept)."""
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _union_models(tp: Any) -> list[type[BaseModel]]:
    tp = unwrap(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if _is_model(a)]
    return []


def _tag(model: type[BaseModel]) -> str:
    """A union member's tag: its ``strategy`` literal (the policies' one tagged union)."""
    field = model.model_fields.get("strategy")
    return str(typing.get_args(field.annotation)[0]) if field is not None else model.__name__


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)
