"""Policy test cases: examples of what must and must not be recorded, run like unit tests.

A case file (YAML; format in ``policies/cases/README.md``) holds ``cases``: each a request, an
optional reply, a tenant and session id, an optional prior session state, and expectations.
:func:`evaluate` computes what the running gateway would do with the case, with the gateway's
own functions and no server, store or upstream:

- the policy: ``PolicySet.match`` (via :func:`gateway.policy.explain.explain`);
- the recorded user and assistant text and the forwarded messages: ``explain``, which calls
  ``stages.record.recorded_round`` (the record stage's own function) and
  ``session.model.inject``, as the ``record`` and ``inject`` stages do;
- the export form: the round's messages (``session.model.round_messages``, as the store keeps
  them) through the policy's redactor (``gateway.auditor.policy_redactor``, as the export
  writes them), with the pseudonym key derived from the file's ``export_secret``.

:func:`check_case` compares an :class:`Outcome` with the case's expectations and returns one
:class:`Failure` per unmet expectation; :func:`main_test` is ``sessiongate policy test``.

Raises :class:`CaseFileError` (a ``ConfigError``; exit code 2 in the CLI) for a case file that
cannot be read or validated; its diagnostics name file, line, column and field.
"""

from __future__ import annotations

import copy
import difflib
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TextIO

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from gateway.diagnostics import Diagnostic, Loc, Marks, at, decode_text, error_diagnostic, format_field, parse_yaml
from gateway.errors import ConfigError, GatewayError
from gateway.policy.loader import POLICY_SUFFIXES
from gateway.policy.matcher import PolicySet

DEFAULT_EXPORT_SECRET = "sessiongate-policy-test-cases"
"""The export secret used for pseudonyms (``hash`` redaction) when a case file names none.
Test-only: pseudonyms in expectations are stable because this is fixed."""

Message = dict[str, Any]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class State(_Model):
    """The session's state before the case's round (as loaded from the store)."""

    context_window: list[Message] = Field(default_factory=list)
    """The context window: chat messages with ``role`` and ``content``."""
    memo: Any = None
    """The memo: a string, a mapping, or null."""

    @field_validator("context_window")
    @classmethod
    def _messages(cls, value: list[Message]) -> list[Message]:
        for i, m in enumerate(value):
            if not isinstance(m.get("role"), str) or "content" not in m:
                raise ValueError(f"message {i} needs a string 'role' and a 'content'")
        return value


class Recorded(_Model):
    """The exact recorded messages; a field left out is not checked, null means not recorded."""

    user: str | None = None
    assistant: str | None = None


class Expect(_Model):
    """What the case expects; every field is optional and only given fields are checked."""

    policy: str | None = None
    """The id of the policy the request gets."""
    recorded: Recorded | None = None
    """``{user, assistant}``: the exact recorded text, null for nothing; ``recorded: null``:
    nothing is recorded at all."""
    injected: list[Message] | None = None
    """The messages forwarded to the model (after injection)."""
    never_recorded: list[Annotated[str, StringConstraints(min_length=1)]] = Field(default_factory=list)
    """Canaries: strings that must not appear in the recorded text or its export."""
    export: list[Message] | None = None
    """The round's messages as an export writes them, under the policy's redaction."""


class Case(_Model):
    """One request through the policies, and what must come of it."""

    name: Annotated[str, StringConstraints(min_length=1)]
    tenant: Annotated[str, StringConstraints(min_length=1)] = "default"
    session_id: str | None = None
    protocol: Literal["chat"] = "chat"
    request: dict[str, Any]
    reply: Any = None
    state: State | None = None
    expect: Expect

    @field_validator("session_id")
    @classmethod
    def _session_id(cls, value: str | None) -> str | None:
        from gateway.stages.resolve_session import check_session_id

        if value is not None:
            try:
                check_session_id(value)
            except GatewayError as exc:
                raise ValueError(exc.message) from None
        return value

    @field_validator("request")
    @classmethod
    def _request(cls, value: dict[str, Any]) -> dict[str, Any]:
        from gateway.stages.parse_request import check_chat

        try:
            check_chat(value)
        except GatewayError as exc:
            raise ValueError(exc.message) from None
        return value

    @field_validator("reply")
    @classmethod
    def _reply(cls, value: Any) -> Any:
        from gateway.policy.explain import reply_message

        if value is not None:
            reply_message(value)  # raises ValueError saying what a reply may be
        return value


class CaseFile(_Model):
    """A case file: the cases, and the export secret their pseudonyms are computed with."""

    export_secret: Annotated[str, StringConstraints(min_length=16)] = DEFAULT_EXPORT_SECRET
    cases: Annotated[list[Case], Field(min_length=1)]


class CaseFileError(ConfigError):
    """A case file is unusable; ``diagnostics`` lists every error (file:line:column: field)."""

    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        super().__init__("\n".join(str(d) for d in diagnostics))
        self.diagnostics = list(diagnostics)
        first = diagnostics[0]
        self.file, self.line, self.column, self.field = first.file, first.line, first.column, first.field


@dataclass(frozen=True, slots=True)
class LoadedCase:
    """A validated case with where it came from: ``line`` of the case, ``marks`` of the file."""

    case: Case
    file: str
    index: int
    marks: Marks
    export_secret: str

    @property
    def line(self) -> int:
        return self.marks.get(("cases", self.index), (1, 1))[0]

    def line_of(self, *loc: str | int) -> int:
        """The line of a field of this case (``"expect", "recorded", "user"``), or the case's."""
        full: Loc = ("cases", self.index, *loc)
        for end in range(len(full), 1, -1):
            if full[:end] in self.marks:
                return self.marks[full[:end]][0]
        return self.line

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


# --- loading -------------------------------------------------------------------------------


def case_files(paths: Iterable[Path]) -> list[Path]:
    """The case files named: files as given, folders searched recursively for ``*.yaml``/``*.yml``.

    Raises ``CaseFileError`` for a path that does not exist.
    """
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.suffix in POLICY_SUFFIXES and p.is_file()
                          and not p.name.startswith("."))
        elif path.is_file():
            out.append(path)
        else:
            raise CaseFileError([Diagnostic("error", str(path), None, None, "", "no such file or folder")])
    return out


def load_case_file(path: Path) -> list[LoadedCase]:
    """The validated cases of one file.

    Raises ``CaseFileError`` naming file, line, column and field of every error.
    """
    file = str(path)
    try:
        text = decode_text(file, path.read_bytes())
    except OSError as exc:
        raise CaseFileError([Diagnostic("error", file, None, None, "", f"cannot read: {exc}")]) from None
    if isinstance(text, Diagnostic):
        raise CaseFileError([text])
    try:
        data, marks, duplicates = parse_yaml(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        raise CaseFileError([Diagnostic("error", file, line, column, "", f"invalid YAML: {exc.problem or exc}")]) \
            from None
    except yaml.YAMLError as exc:
        raise CaseFileError([Diagnostic("error", file, 1, 1, "", f"invalid YAML: {exc}")]) from None
    errors = [Diagnostic("error", file, line, column, format_field(loc), f"duplicate key {loc[-1]!r}")
              for loc, (line, column) in duplicates]
    if not isinstance(data, dict):
        errors.append(at(file, marks, (), "a case file holds one mapping with a 'cases' list"))
        raise CaseFileError(errors)
    try:
        parsed = CaseFile.model_validate(data)
    except ValidationError as exc:
        errors += [error_diagnostic(file, marks, data, err, CaseFile) for err in exc.errors(include_url=False)]
        raise CaseFileError(errors) from None
    loaded = [LoadedCase(case, file, i, marks, parsed.export_secret) for i, case in enumerate(parsed.cases)]
    for item in loaded:
        recorded = item.case.expect.recorded
        if item.case.reply is None and recorded is not None and recorded.assistant is not None:
            errors.append(at(file, marks, ("cases", item.index, "expect", "recorded", "assistant"),
                              "expects recorded assistant text, but the case has no reply"))
    if errors:
        raise CaseFileError(errors)
    return loaded


def load_cases(paths: Iterable[Path]) -> list[LoadedCase]:
    """Every case of the files and folders named, in file order.

    Raises ``CaseFileError`` listing the errors of every invalid file.
    """
    cases: list[LoadedCase] = []
    errors: list[Diagnostic] = []
    for path in case_files(paths):
        try:
            cases += load_case_file(path)
        except CaseFileError as exc:
            errors += exc.diagnostics
    if errors:
        raise CaseFileError(errors)
    return cases


# --- evaluating ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the gateway does with one case: the policy, the recorded text, the forwarded
    messages and the export form of the recorded round."""

    policy: str
    user: str | None
    assistant: str | None
    injected: list[Message]
    export: list[Message]

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "recorded": {"user": self.user, "assistant": self.assistant},
                "injected": self.injected, "export": self.export}


def evaluate(policies: PolicySet, case: Case, export_secret: str = DEFAULT_EXPORT_SECRET) -> Outcome:
    """Run ``case`` through ``policies`` with the gateway's own functions (module docstring)."""
    from gateway.auditor import policy_redactor
    from gateway.policy.explain import explain
    from gateway.redact import tenant_secret
    from gateway.session.model import SessionState, round_messages

    state = None
    if case.state is not None:
        state = SessionState(copy.deepcopy(case.state.context_window), copy.deepcopy(case.state.memo))
    report = explain(policies, copy.deepcopy(case.request), tenant=case.tenant, session_id=case.session_id,
                     reply=copy.deepcopy(case.reply), state=state)
    policy = policies.get(report["policy"]["id"])
    assert policy is not None
    recorded = report["recorded"]
    user = recorded["user"] if recorded is not None else None
    assistant = recorded["assistant"] if recorded is not None and case.reply is not None else None
    redactor = policy_redactor(policy, tenant_secret(export_secret.encode(), case.tenant))
    return Outcome(policy.id, user, assistant, report["injected"]["forwarded_messages"],
                   redactor.redact_messages(round_messages(user, assistant)))


# --- checking ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Failure:
    """One unmet expectation: ``field`` such as ``expect.recorded.user``, at ``line``."""

    field: str
    line: int
    expected: Any
    got: Any
    message: str = ""


def check_case(item: LoadedCase, outcome: Outcome) -> list[Failure]:
    """Every expectation of ``item`` that ``outcome`` does not meet."""
    expect = item.case.expect
    failures: list[Failure] = []

    def compare(loc: tuple[str, ...], expected: Any, got: Any) -> None:
        if expected != got:
            failures.append(Failure(".".join(loc), item.line_of(*loc), expected, got))

    if expect.policy is not None:
        compare(("expect", "policy"), expect.policy, outcome.policy)
    if "recorded" in expect.model_fields_set:
        if expect.recorded is None:
            compare(("expect", "recorded"), None, None if outcome.user is None and outcome.assistant is None
                    else {"user": outcome.user, "assistant": outcome.assistant})
        else:
            for role in ("user", "assistant"):
                if role in expect.recorded.model_fields_set:
                    compare(("expect", "recorded", role), getattr(expect.recorded, role), getattr(outcome, role))
    if expect.injected is not None:
        compare(("expect", "injected"), expect.injected, outcome.injected)
    if expect.export is not None:
        compare(("expect", "export"), expect.export, outcome.export)
    exported = json.dumps(outcome.export, ensure_ascii=False)
    for index, canary in enumerate(expect.never_recorded):
        where = [name for name, text in (("recorded user message", outcome.user),
                                         ("recorded assistant message", outcome.assistant),
                                         ("export", exported)) if text and canary in text]
        if where:
            failures.append(Failure(f"expect.never_recorded[{index}]",
                                    item.line_of("expect", "never_recorded", index), canary, None,
                                    f"canary {canary!r} appears in the {' and the '.join(where)}"))
    return failures


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as ``|`` blocks, so a diff of messages reads line by line."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _represent_str)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    return yaml.dump(value, Dumper=_Dumper, allow_unicode=True, sort_keys=False, width=100).rstrip("\n")


def render_failure(item: LoadedCase, failure: Failure) -> str:
    """A readable failure: where, which expectation, expected vs got (a unified diff for long
    or multi-line values)."""
    head = f"{item.file}:{failure.line}: FAIL {item.case.name!r} (case at line {item.line}): {failure.field}"
    if failure.message:
        return f"{head}: {failure.message}"
    expected, got = _text(failure.expected), _text(failure.got)
    if "\n" not in expected + got and len(expected) + len(got) <= 120:
        return f"{head}\n    expected: {json.dumps(failure.expected, ensure_ascii=False)}\n" \
               f"    got:      {json.dumps(failure.got, ensure_ascii=False)}"
    diff = difflib.unified_diff(expected.splitlines(), got.splitlines(), "expected", "got", lineterm="")
    return head + "\n" + "\n".join("    " + line for line in diff)


def run_cases(policies: PolicySet, cases: Sequence[LoadedCase], out: TextIO) -> int:
    """Run and check ``cases``; print each failure to ``out``; return how many cases failed."""
    failed = 0
    for item in cases:
        try:
            failures = check_case(item, evaluate(policies, item.case, item.export_secret))
        except (GatewayError, ValueError) as exc:  # the gateway would refuse this request
            message = exc.message if isinstance(exc, GatewayError) else str(exc)
            failures = [Failure("request", item.line_of("request"), None, None, f"the gateway refuses it: {message}")]
        if failures:
            failed += 1
            for failure in failures:
                print(render_failure(item, failure), file=out)
    return failed


def main_test(policy_dir: Path, case_paths: Sequence[Path], out: TextIO | None = None) -> int:
    """``sessiongate policy test``: 0 when every case passes, 1 when one fails.

    Raises ``PolicyConfigError`` / ``CaseFileError`` (exit code 2 in the CLI) for invalid
    policies or case files, and ``CaseFileError`` when no case is found.
    """
    from gateway.policy.loader import load_policy_set

    out = out or sys.stdout
    policies = load_policy_set(policy_dir)
    paths = list(case_paths) or [policy_dir / "cases"]
    cases = load_cases(paths)
    if not cases:
        raise CaseFileError([Diagnostic("error", ", ".join(map(str, paths)), None, None, "",
                                        "no case files (*.yaml, *.yml) found")])
    failed = run_cases(policies, cases, out)
    files = len({item.file for item in cases})
    print(f"{len(cases)} case(s) in {files} file(s): {len(cases) - failed} passed, {failed} failed",
          file=sys.stderr)
    return 1 if failed else 0
