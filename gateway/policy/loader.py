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
prompt, a redaction key the policy does not record, repeated keys), a tenant or session-id glob
that can never match (a character no tenant or session id may hold, such as ``/`` in
``support/*``, or a class of none), a bounding strategy that never runs, a policy shadowed by a
higher-priority one.
"""

from __future__ import annotations

import errno
import string
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import yaml
from pydantic import ValidationError

from gateway.diagnostics import (
    Diagnostic,
    Loc,
    Marks,
    at,
    decode_text,
    error_diagnostic,
    format_field,
    parse_yaml,
    yaml_diagnostic,
)
from gateway.errors import ConfigError
from gateway.policy.hooks import HOOK_MODULES
from gateway.policy.matcher import PolicySet, check_set
from gateway.policy.model import Policy, SimpleCut

POLICY_SUFFIXES = (".yaml", ".yml")


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
        text = decode_text(file, path.read_bytes())
    except OSError as exc:
        if exc.errno in TRANSIENT_ERRNOS:
            raise  # the machine, not the file: the caller retries (a reload is not refused)
        return _Loaded(file, None, {}, [Diagnostic("error", file, None, None, "", f"cannot read: {exc}")])
    if isinstance(text, Diagnostic):
        return _Loaded(file, None, {}, [text])
    try:
        data, marks, duplicates = parse_yaml(text)
    except yaml.MarkedYAMLError as exc:
        return _Loaded(file, None, {}, [yaml_diagnostic(file, exc)])
    except yaml.YAMLError as exc:
        return _Loaded(file, None, {}, [Diagnostic("error", file, 1, 1, "", f"invalid YAML: {exc}")])
    diagnostics = [Diagnostic("error", file, line, column, format_field(loc), f"duplicate key {loc[-1]!r}")
                   for loc, (line, column) in duplicates]
    if not isinstance(data, dict):
        what = "empty" if data is None else f"a {type(data).__name__}"
        diagnostics.append(at(file, marks, (), f"a policy file holds one mapping (id, match, session, ...); "
                                                 f"this one is {what}"))
        return _Loaded(file, None, marks, diagnostics)
    try:
        policy = Policy.model_validate(data, context={HOOK_MODULES: tuple(hook_modules)})
    except ValidationError as exc:
        diagnostics += [error_diagnostic(file, marks, data, err, Policy) for err in exc.errors(include_url=False)]
        return _Loaded(file, None, marks, diagnostics)
    policy._source = path
    diagnostics += [at(file, marks, loc, msg, "warning") for loc, msg in policy_warnings(policy)]
    if any(d.severity == "error" for d in diagnostics):
        return _Loaded(file, None, marks, diagnostics)
    return _Loaded(file, policy, marks, diagnostics)


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
    for name, alphabet, first, longest in _GLOB_FIELDS:
        for index, pattern in enumerate(getattr(policy.match, name) or []):
            why = never_matches(pattern, alphabet, first, longest)
            if why is not None:
                what = name[:-1].replace("_", " ")
                found.append((("match", name, index), f"glob {pattern!r} can never match a {what}: {why}"))
    if session.max_length is None and not isinstance(session.bounding, SimpleCut):
        found.append((("session", "bounding"),
                      f"strategy {session.bounding.strategy!r} never runs: session.max_length is null"))
    return found


_TENANT_CHARS = frozenset(string.ascii_letters + string.digits + "_.-")
_SESSION_CHARS = frozenset(string.ascii_letters + string.digits + "._:@+=-")
_GLOB_FIELDS = (("tenants", _TENANT_CHARS, _TENANT_CHARS, 64),
                ("session_ids", _SESSION_CHARS, frozenset(string.ascii_letters + string.digits), 128))
"""Globbed fields whose values have a fixed alphabet (``TENANT_PATTERN``, the session-id rule of
``gateway.stages.resolve_session``): (field, characters, first characters, longest value)."""


def never_matches(pattern: str, alphabet: frozenset[str], first: frozenset[str], longest: int) -> str | None:
    """Why glob *pattern* matches no value made of *alphabet* (starting with one of *first*, at most
    *longest* characters long), or None when some value may match. Brackets are read as
    ``fnmatch`` reads them: ``[`` with no closing ``]`` is a literal character."""
    at_start, minimum, i = True, 0, 0
    while i < len(pattern):
        char, allowed = pattern[i], first if at_start else alphabet
        i += 1
        if char == "*":
            at_start = False
            continue
        at_start, minimum = False, minimum + 1
        if char == "?":
            continue
        if char == "[":
            end = i + 1 if pattern[i:i + 1] == "!" else i
            end += 1 if pattern[end:end + 1] == "]" else 0
            end = pattern.find("]", end)
            if end != -1:
                body = pattern[i:end]
                if not any(fnmatchcase(c, f"[{body}]") for c in allowed):
                    verb = "begin with" if allowed is first else "contain"
                    return f"the class [{body}] holds no character a value may {verb}"
                i = end + 1
                continue
        if char not in allowed:
            return f"a value cannot {'begin with' if char in alphabet else 'contain'} {char!r}"
    if minimum > longest:
        return f"a value has at most {longest} characters"
    return None


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
            diagnostics.append(at(item.file, item.marks, issue.loc, issue.message, issue.severity))
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
