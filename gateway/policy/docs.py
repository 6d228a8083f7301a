"""The policy reference and JSON Schema, generated from the models in ``gateway.policy.model``.

:func:`write_docs` writes ``README.md`` (how policies work, then one table per model: every
field with its type, default and description, taken from the attribute docstrings) and
``policy.schema.json`` (for editors: the YAML language server reads the
``# yaml-language-server: $schema=./policy.schema.json`` line at the top of each example).
:func:`render_reference` and :func:`render_schema` return the same text; a test compares them
with the committed files, so the reference cannot fall behind the code.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from gateway.policy.model import Glob, HookRef, Key, Policy, PolicyId, StrategyName

SCHEMA_FILE = "policy.schema.json"
REFERENCE_FILE = "README.md"

_ALIASES: list[tuple[Any, str]] = [
    (Key, "key path"),
    (Glob, "glob"),
    (HookRef, "hook `module:function`"),
    (StrategyName, "strategy name"),
    (PolicyId, "id (`[A-Za-z0-9][A-Za-z0-9_.-]*`)"),
]
_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}

INTRO = """\
# Policy files

<!-- Generated from gateway/policy/model.py by gateway.policy.docs.write_docs(); do not edit.
     Regenerate: python -c "from gateway.policy.docs import write_docs; write_docs('policies')" -->

Each `*.yaml` (or `*.yml`) file in this folder holds one policy. The gateway gives every
request exactly one policy, records only what that policy whitelists, and stores the policy's
`id` and `version_hash` with every record. Editors that speak the YAML language server
validate and complete fields with [`policy.schema.json`](policy.schema.json) when a file
starts with `# yaml-language-server: $schema=./policy.schema.json`.

Check files before they go live: `sessiongate policy check [PATH...]` prints every error as
`file:line:column: error: field.path: message` (and warnings, e.g. keys that can never match,
or a tenant or session-id glob that no valid tenant or session id can match, such as
`support/*` for `support:*`) and exits 1 on any error. A running gateway reloads this folder
within about two seconds of an edit; an invalid edit is refused, logged with the same messages,
and the last good set of policies keeps serving. Subfolders are not read as policies.

Keep examples of what must and must not be recorded in [`cases/`](cases/README.md) and run
them with `sessiongate policy test`; `sessiongate policy diff OLD_DIR NEW_DIR` shows what a
change does before it goes live, and flags every change that widens recording.

## Choosing the policy

- A policy's `match` lists globs (`*`, `?`, `[abc]`, case-sensitive) for `tenants`, `models`
  and `session_ids`. A request matches when every listed field matches; an omitted field
  matches everything. A request without a model or a session id never matches a policy that
  lists `models` or `session_ids`.
- Among the matching policies the highest `priority` wins.
- A **catch-all** policy (no `match`) is required, so every request gets a policy.
- Two policies with the same priority that **can** match the same request are a load error,
  not a runtime surprise. The check is conservative: two globs are taken to overlap unless
  their literal prefixes (text before the first `*`, `?` or `[`) or literal suffixes
  contradict; `gpt-4o*` and `claude-*` are disjoint, `*-mini` and `gpt-*` are not. Give one
  of them another priority.
- A policy that a higher-priority policy always takes first gets a warning.
- `models` and `session_ids` are chosen by the client, `tenants` by its key. A policy matched
  only by model or session id can be chosen by any client of every tenant. When it records
  less than the policy it takes the request from, any client could keep text out of the
  record by choosing it, so `policy check` (and the gateway at load) warns, naming what it
  leaves out: give it a `tenants` list. The shipped `record-nothing` policy is opted into by
  naming a session `private:*`, by clients of tenant `acme` only.

## What is recorded

`session.input_keys` and `session.reply_keys` follow Agently's session settings:

- `null` records the whole text: the round's new input (the messages after the last
  assistant message) and the whole reply;
- a list records one `[key]:` block per key found, in list order (scalars as text, other
  values as YAML); a missing key is skipped, and when no key is found no message is recorded;
- `[]` for both records nothing: the round leaves only audit metadata
  (`records_nothing`).

Key paths use Agently's syntax: `input.ticket_id`, `input/lang` (split on `/` only),
`items[0].name`, `items[*].name`; `.request.model` (or `.execution.model`) for the request as
sent, `.agent.system` for the system prompt; a bare `lang` means `input.lang` when there is no
top-level `lang`. A key starting with `$` is JSONPath over the raw request or reply body.
Filters are allowed, but not regular expressions (`=~` filters, `sub(/regex/, ...)`) nor
values computed from the client's (arithmetic `+ - * /`, `` `split(...)` ``, `` `str()` ``):
keys run on client values for every request, where a regex could stall every client and
`$.a * $.b` could allocate gigabytes. `` `len` ``, `` `keys` ``, `` `sorted` `` and `` `path` ``
stay. An operator that fails on the value a request holds (`` `sorted` `` of a string) finds
nothing.
Reply keys are looked up in the reply parsed as JSON.

A `$` key is evaluated within a budget, so that no body can make it stall the gateway: 25,000
units of work per key and body (a unit is a value visited, a filter candidate, a comparison or
a value of the key's output; an ordinary chat request costs a key a few hundred) and 16 MiB of
text in its output (`$..*` holds each value once per ancestor). A key is never reported "not
found" because the body was large: a request on which an input key would need more is refused
before it is forwarded (413 `too_many_values`, saying to send fewer values); a reply key that
would need more is left out of the recorded reply, and the round is `incomplete`, its audit
entry `truncated` with the key named in `detail.keys_over_budget` (the client still gets the
whole reply).

## Bounding hooks

`bounding: {strategy: hook, ...}` names Python functions as `package.module:function`; the
module must be importable by the gateway (installed, or on `PYTHONPATH`). They take Agently's
four arguments `(full_context, context_window, memo, session_settings)`, sync or async, and
are imported and checked (callable, four positional parameters) when the policy loads. Hook
modules are imported once per process: a policy edit is reloaded live, a change to the
hook's code needs a restart.

Hooks run in the process that holds the master keys, so a policy may only name modules the
gateway's configuration allows: `policies.hook_modules` lists module names or globs
(`["myhooks", "myhooks.*"]`) and is empty by default. A hook from any other module refuses the
policy at load time, at the hook's line, naming the setting; nothing is imported, so
`sessiongate policy check` of a file you do not trust runs none of its code.

Nor can its YAML exhaust the checker or the gateway: collections may nest at most 128 levels
deep (counting the levels an alias brings where it stands), an alias may not refer to a node
that contains it, and aliases may add at most 500,000 nodes when expanded (a 100-turn history
reused by 30 test cases adds about 15,000; an alias bomb is refused while it is read, before
anything is expanded). Each is an error at the file and line, like bad YAML;
the same limits hold for policy test case files and the configuration file.

## Version hash

`version_hash` is the SHA-256 (hex) of the validated policy serialised as JSON with sorted
keys, no whitespace and defaults filled in. Comments, formatting, key order, or spelling out
a default do not change it; any change of meaning does.

## Field reference
"""


def render_schema() -> str:
    """The JSON Schema of a policy file, as written to ``policy.schema.json``."""
    schema = Policy.model_json_schema(mode="validation")
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
              "title": "sessiongate policy", **{k: v for k, v in schema.items() if k != "title"}}
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def render_reference() -> str:
    """The Markdown reference written to ``README.md``."""
    parts = [INTRO]
    for model in models_in_order():
        parts.append(_model_section(model))
    return "\n".join(parts).rstrip("\n") + "\n"


def write_docs(folder: Path | str) -> list[Path]:
    """Write ``README.md`` and ``policy.schema.json`` into ``folder``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in ((REFERENCE_FILE, render_reference()), (SCHEMA_FILE, render_schema())):
        target = folder / name
        target.write_text(text, encoding="utf-8")
        written.append(target)
    return written


def models_in_order() -> list[type[BaseModel]]:
    """Every model reachable from :class:`Policy`, in order of first appearance."""
    found: list[type[BaseModel]] = []

    def visit(tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp in found:
                return
            found.append(tp)
            for field in tp.model_fields.values():
                visit(field.annotation)
            return
        for arg in typing.get_args(tp):
            visit(arg)

    visit(Policy)
    return found


def _model_section(model: type[BaseModel]) -> str:
    lines = [f"### {model.__name__}", "", _clean(model.__doc__ or ""), "",
             "| Field | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        lines.append(f"| `{name}` | {_field_type(field)} | {_default(field)} | "
                     f"{_cell(field.description or '')} |")
    return "\n".join(lines) + "\n"


def _field_type(field: FieldInfo) -> str:
    annotation = typing.Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    return _cell(render_type(annotation))


def render_type(tp: Any) -> str:
    """A short human name for an annotation, with links to model sections."""
    for alias, name in _ALIASES:
        if tp == alias:
            return name
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        constraints = _constraints(tp.__metadata__)
        base = render_type(args[0])
        return f"{base} ({constraints})" if constraints else base
    if origin in (typing.Union, types.UnionType):
        return " or ".join(render_type(a) for a in args)
    if origin is typing.Literal:
        return " or ".join(f"`{a}`" for a in args)
    if origin is list:
        return f"list of {render_type(args[0])}"
    if origin is dict:
        return f"map of {render_type(args[0])} to {render_type(args[1])}"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"[{tp.__name__}](#{tp.__name__.lower()})"
    return _SCALARS.get(tp, getattr(tp, "__name__", str(tp)))


def _constraints(metadata: Any) -> str:
    out = []
    for item in metadata:
        if isinstance(item, FieldInfo):
            out += [c for c in [_constraints(item.metadata)] if c]
            continue
        for attr, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if isinstance(item, getattr(annotated_types, attr.capitalize())):
                out.append(f"{symbol} {getattr(item, attr)}")
        if isinstance(item, annotated_types.MinLen) and item.min_length > 0:
            out.append(f"at least {item.min_length}")
    return ", ".join(out)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_defaults=True)
    return _cell(f"`{json.dumps(value, ensure_ascii=False)}`")


def _clean(text: str) -> str:
    return " ".join(text.split())


def _cell(text: str) -> str:
    return _clean(text).replace("|", "\\|")
