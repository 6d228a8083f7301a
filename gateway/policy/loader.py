"""Loading and checking policy files, with every error located at file:line:column and field.

Reads ``*.yaml`` / ``*.yml`` files (one policy each; names starting with ``.`` or ending with
``~`` are skipped). YAML is composed with PyYAML's safe loader so that every node keeps its
mark; pydantic's error locations are mapped back through those marks. Bad YAML reports the
parser's own line; a repeated mapping key is an error (PyYAML would silently keep the last).

- :func:`check` returns every :class:`Diagnostic` for the given files and folders (the function
  behind ``sessiongate policy check``); :func:`main_check` prints them and returns the exit code.
- :func:`load_policy_set` returns a :class:`~gateway.policy.matcher.PolicySet` or raises
  :class:`PolicyConfigError` (a ``ConfigError``) listing all errors.

A folder is checked as one set (unique ids, no same-priority overlap, a catch-all policy is
required). Files named one by one are checked together as a set too, except that they need no
catch-all, so a single new file can be checked before it joins the folder.

Warnings (never fatal): keys that can never match (a reply key on the request or system
prompt, a redaction key the policy does not record, repeated keys), a bounding strategy that
never runs, a policy shadowed by a higher-priority one.
"""

from __future__ import annotations

import difflib
import errno
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from gateway.errors import ConfigError
from gateway.policy.hooks import HOOK_MODULES
from gateway.policy.matcher import PolicySet, check_set
from gateway.policy.model import Policy, SimpleCut

Loc = tuple[str | int, ...]
Marks = dict[Loc, tuple[int, int]]
Duplicate = tuple[Loc, tuple[int, int]]

POLICY_SUFFIXES = (".yaml", ".yml")


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


class PolicyConfigError(ConfigError):
    """The policies cannot be loaded. ``str()`` lists every error, one per line;
    ``diagnostics`` holds them all; ``file``/``line``/``field`` are those of the first."""

    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        errors = [d for d in diagnostics if d.severity == "error"]
        super().__init__("\n".join(str(d) for d in errors))
        first = errors[0] if errors else None
        self.diagnostics = list(diagnostics)
        if first is not None:
            self.file, self.line, self.column, self.field = first.file, first.line, first.column, first.field


# --- files ---------------------------------------------------------------------------------


TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EIO, errno.EAGAIN, errno.EINTR})
"""Read errors that say nothing about the file (descriptor exhaustion, I/O): raised, not reported."""


def policy_files(folder: Path) -> list[Path]:
    """The policy files of ``folder`` (not recursive), sorted by name."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix in POLICY_SUFFIXES and not p.name.startswith(".")
                  and not p.name.endswith("~") and p.is_file())


@dataclass(slots=True)
class _Loaded:
    file: str
    policy: Policy | None
    marks: Marks
    diagnostics: list[Diagnostic]


def load_policy_file(path: Path, *, hook_modules: Sequence[str] = ()) -> tuple[Policy | None, list[Diagnostic]]:
    """Load and validate one file. Returns the policy (None on any error) and its diagnostics.

    *hook_modules* is the configuration's ``policies.hook_modules``: a hook from any other
    module is an error at its field, and is not imported.
    """
    loaded = _load_file(path, hook_modules)
    return loaded.policy, loaded.diagnostics


def _load_file(path: Path, hook_modules: Sequence[str] = ()) -> _Loaded:
    file = str(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        if exc.errno in TRANSIENT_ERRNOS:
            raise  # the machine, not the file: the caller retries (a reload is not refused)
        return _Loaded(file, None, {}, [Diagnostic("error", file, None, None, "", f"cannot read: {exc}")])
    except UnicodeDecodeError as exc:
        return _Loaded(file, None, {}, [Diagnostic("error", file, None, None, "", f"cannot read: {exc}")])
    try:
        data, marks, duplicates = _parse_yaml(text)
    except yaml.MarkedYAMLError as exc:
        return _Loaded(file, None, {}, [_yaml_diagnostic(file, exc)])
    except yaml.YAMLError as exc:
        return _Loaded(file, None, {}, [Diagnostic("error", file, 1, 1, "", f"invalid YAML: {exc}")])
    diagnostics = [Diagnostic("error", file, line, column, format_field(loc), f"duplicate key {loc[-1]!r}")
                   for loc, (line, column) in duplicates]
    if not isinstance(data, dict):
        what = "empty" if data is None else f"a {type(data).__name__}"
        diagnostics.append(_at(file, marks, (), f"a policy file holds one mapping (id, match, session, ...); "
                                                 f"this one is {what}"))
        return _Loaded(file, None, marks, diagnostics)
    try:
        policy = Policy.model_validate(data, context={HOOK_MODULES: tuple(hook_modules)})
    except ValidationError as exc:
        diagnostics += [_error_diagnostic(file, marks, data, err) for err in exc.errors(include_url=False)]
        return _Loaded(file, None, marks, diagnostics)
    policy._source = path
    diagnostics += [_at(file, marks, loc, msg, "warning") for loc, msg in policy_warnings(policy)]
    if any(d.severity == "error" for d in diagnostics):
        return _Loaded(file, None, marks, diagnostics)
    return _Loaded(file, policy, marks, diagnostics)


def _parse_yaml(text: str) -> tuple[Any, Marks, list[Duplicate]]:
    """Compose, record marks and duplicate keys, then construct the data."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {(): (1, 1)}, []
        marks: Marks = {(): _pos(node.start_mark)}
        duplicates: list[Duplicate] = []
        _walk(loader, node, (), marks, duplicates)
        return loader.construct_document(node), marks, duplicates
    finally:
        loader.dispose()


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
            if key in seen:
                duplicates.append((here, _pos(key_node.start_mark)))
                continue
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


def _yaml_diagnostic(file: str, exc: yaml.MarkedYAMLError) -> Diagnostic:
    mark = exc.problem_mark or exc.context_mark
    line, column = _pos(mark) if mark is not None else (1, 1)
    problem = " ".join(part for part in (exc.context, exc.problem) if part)
    return Diagnostic("error", file, line, column, "", f"invalid YAML: {problem or exc}")


# --- locating and phrasing errors -----------------------------------------------------------


def _at(file: str, marks: Marks, loc: Loc, message: str,
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


def _data_loc(data: Any, loc: Loc) -> Loc:
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


def _error_diagnostic(file: str, marks: Marks, data: Any, err: Any) -> Diagnostic:
    loc = _data_loc(data, tuple(err["loc"]))
    kind, message = err["type"], err["msg"]
    if kind == "extra_forbidden":
        message = _unknown_field_message(tuple(err["loc"]))
    elif kind == "missing":
        message = f"required field {loc[-1]!r} is missing"
    elif kind == "union_tag_not_found":
        message = f"'strategy' is required ({_expected_tags(tuple(err['loc']))})"
    elif kind.endswith("_type") and "input" in err:
        message = f"{message}, got {_kind_of(err['input'])}"
    elif kind in ("value_error", "assertion_error"):
        message = message.split(", ", 1)[1] if ", " in message else message
    return _at(file, marks, loc, message)


def _kind_of(value: Any) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "a list",
             dict: "a mapping", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")


def _unknown_field_message(loc: Loc) -> str:
    name = str(loc[-1])
    allowed = _fields_at(loc[:-1])
    if not allowed:
        return f"unknown field {name!r}"
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown field {name!r}{hint} (allowed: {', '.join(allowed)})"


def _expected_tags(loc: Loc) -> str:
    member = _type_at(loc)
    tags = [_tag(m) for m in _union_models(member)]
    return "one of " + ", ".join(tags) if tags else "see the reference"


def _fields_at(loc: Loc) -> list[str]:
    target = _type_at(loc)
    return list(target.model_fields) if _is_model(target) else []


def _type_at(loc: Loc) -> Any:
    """The annotation that pydantic validated at ``loc`` (tags select a union member)."""
    current: Any = Policy
    for part in loc:
        current = _unwrap(current)
        if _is_model(current):
            field = current.model_fields.get(str(part))
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
    return _unwrap(current)


def _unwrap(tp: Any) -> Any:
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
    tp = _unwrap(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if _is_model(a)]
    return []


def _tag(model: type[BaseModel]) -> str:
    return str(typing.get_args(model.model_fields["strategy"].annotation)[0])


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


# --- warnings --------------------------------------------------------------------------------


def policy_warnings(policy: Policy) -> list[tuple[Loc, str]]:
    """Findings in one valid policy that are legal but almost certainly mistakes."""
    from gateway.paths import compile_key

    found: list[tuple[Loc, str]] = []
    session = policy.session
    for name in ("input_keys", "reply_keys"):
        keys: list[str] = getattr(session, name) or []
        for index, key in enumerate(keys):
            if key in keys[:index]:
                found.append((("session", name, index), f"key {key!r} is listed twice"))
    for index, key in enumerate(session.reply_keys or []):
        if compile_key(key).root in ("request", "agent_system"):
            found.append((("session", "reply_keys", index),
                          f"key {key!r} addresses the request, not the reply: it can never match"))
    recorded = set(session.input_keys or []) | set(session.reply_keys or [])
    for index, rule in enumerate(policy.export.redact):
        loc: Loc = ("export", "redact", index, "key")
        if rule.key in {r.key for r in policy.export.redact[:index]}:
            found.append((loc, f"a rule for key {rule.key!r} comes earlier; this one never applies"))
        elif rule.key != "*" and rule.key not in recorded:
            found.append((loc, f"key {rule.key!r} is not among session.input_keys or session.reply_keys: "
                               "this rule can never match"))
    if session.max_length is None and not isinstance(session.bounding, SimpleCut):
        found.append((("session", "bounding"),
                      f"strategy {session.bounding.strategy!r} never runs: session.max_length is null"))
    return found


# --- sets ----------------------------------------------------------------------------------


def _load_group(files: Sequence[Path], *, label: str, require_catch_all: bool,
                hook_modules: Sequence[str] = ()) -> tuple[list[Policy], list[Diagnostic]]:
    loaded = [_load_file(path, hook_modules) for path in files]
    diagnostics = [d for item in loaded for d in item.diagnostics]
    valid = [item for item in loaded if item.policy is not None]
    policies = [item.policy for item in valid if item.policy is not None]
    set_wide = require_catch_all and len(valid) == len(loaded)
    for issue in check_set(policies, require_catch_all=set_wide):
        if issue.index is None:
            diagnostics.append(Diagnostic(issue.severity, label, None, None, "", issue.message))
        else:
            item = valid[issue.index]
            diagnostics.append(_at(item.file, item.marks, issue.loc, issue.message, issue.severity))
    diagnostics.sort(key=lambda d: (d.file, d.line or 0, d.column or 0))
    return policies, diagnostics


def _group(path: Path) -> tuple[list[Path], bool] | None:
    if path.is_dir():
        return policy_files(path), True
    if path.is_file():
        return [path], True
    return None


def check(paths: list[Path], *, hook_modules: Sequence[str] = ()) -> list[Diagnostic]:
    """Every error and warning for ``paths`` (folders and files; see the module docstring).

    Imports no hook module outside *hook_modules* (``policies.hook_modules``)."""
    diagnostics: list[Diagnostic] = []
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            diagnostics += _load_group(policy_files(path), label=str(path), require_catch_all=True,
                                       hook_modules=hook_modules)[1]
        elif path.is_file():
            files.append(path)
        else:
            diagnostics.append(Diagnostic("error", str(path), None, None, "", "no such file or folder"))
    if files:
        diagnostics += _load_group(files, label=str(files[0]), require_catch_all=False,
                                   hook_modules=hook_modules)[1]
    return diagnostics


def load_policy_set(path: Path, *, hook_modules: Sequence[str] = ()) -> PolicySet:
    """Load a policy folder (or one file holding a catch-all policy) as a set; hooks only from
    *hook_modules* (``policies.hook_modules``).

    Raises:
        PolicyConfigError: any error; its message lists all of them, one per line.
    """
    path = Path(path)
    group = _group(path)
    if group is None:
        raise PolicyConfigError([Diagnostic("error", str(path), None, None, "", "no such file or folder")])
    files, require_catch_all = group
    policies, diagnostics = _load_group(files, label=str(path), require_catch_all=require_catch_all,
                                        hook_modules=hook_modules)
    if any(d.severity == "error" for d in diagnostics):
        raise PolicyConfigError(diagnostics)
    return PolicySet(policies, warnings=diagnostics)


def main_check(argv: Sequence[str] | None = None, *, hook_modules: Sequence[str] = ()) -> int:
    """``sessiongate policy check [PATH...]``: print diagnostics; 1 on any error, else 0.

    ``argv`` holds the paths only (default: ``policies``); *hook_modules* the configuration's
    allow-list (nothing outside it is imported).
    """
    paths = [Path(arg) for arg in (argv if argv else ["policies"])]
    diagnostics = check(paths, hook_modules=hook_modules)
    for diagnostic in diagnostics:
        print(diagnostic)
    errors = sum(d.severity == "error" for d in diagnostics)
    warnings = len(diagnostics) - errors
    print(f"{errors} error(s), {warnings} warning(s)", file=sys.stderr)
    return 1 if errors else 0
