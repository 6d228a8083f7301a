"""What a change of the policy folder does: ``sessiongate policy diff OLD_DIR NEW_DIR``.

:func:`diff_sets` compares two :class:`~gateway.policy.matcher.PolicySet` and returns a
:class:`PolicyDiff`; it is pure (it loads nothing) and is also run by the hot reload, whose log
line and ``policy_reload`` audit entry carry :meth:`PolicyDiff.summary_line` and
:meth:`PolicyDiff.audit_detail` (policy ids, field and key names, actions and day counts:
configuration only, never a tenant, session id or case content).

**Policies** are paired by ``id``: ids only in NEW are *added*, only in OLD *removed*. For a
pair whose ``version_hash`` differs, :func:`compare_policies` lists each changed field:
whitelist keys added and removed (``input_keys``, ``reply_keys``, a list turned into ``null``
and back), ``max_length`` and bounding, injection, each redaction key's *effective* action
(the first rule for the key, else the ``"*"`` rule, else ``keep``), each PII detector,
retention days, match globs, priority, description, and what is kept of tool calls, tool results,
reasoning and media (``session.tools``, ``session.media``). Every setting of the policy model is
compared (:data:`COMPARED_FIELDS`): one whose change has no other effect (redaction rules
reordered) is still listed, and one not yet classified there is listed as widening.

**Match moves** are computed, not guessed: both sets' matchers are evaluated over the same
sample of requests, and every (tenant, model, session id) that the two sets give different
policies is a move. The sample is the product of, per field, every glob of every policy on
either side turned into a concrete value that it matches (literals as they are; ``*`` -> ``x``,
``?`` -> ``x``, ``[abc]`` -> ``a``), the tenants, models and session ids of the cases given,
``"(other)"`` (a value that only match-all globs match), and for model and session id also
"none given" (shown ``(none)``). Every move reported is exact: a real request that changes
policy. A change that no sampled value witnesses is not reported; a case with that tenant,
model or session id pins it. When no policy's id, priority or globs changed, no request can
move and nothing is evaluated; otherwise the cost is the product of the three value counts.
Evaluation uses copies of the sets, so the live set's match cache is never touched.

**Widening.** A change *widens recording* when, for the requests it affects, more may be kept
or exported in the clear: a whitelist key added, a list whitelist turned into ``null`` (the
whole text), ``records_nothing`` turned off, a redaction action loosened (order ``drop`` >
``mask`` > ``hash`` > ``keep``, a rule removed counts as its fallback), a detector loosened
(``mask`` > ``hash`` > off), retention lengthened or removed (``null`` = kept forever), tool
arguments or results kept more (``drop`` > ``redact`` > ``keep``), reasoning or media kept more
(``drop`` > ``keep``; ``drop`` > ``placeholder`` > ``keep``) or a larger ``media.max_bytes`` under
``keep``, while the new policy records free text; for tools, what is kept in effect
(:meth:`~gateway.policy.model.ToolRecording.recorded`: reasoning only while arguments are kept,
nothing while arguments or results are dropped), so ``reasoning: keep`` under ``arguments:
redact`` widens nothing (a ``null`` whitelist, where these apply). A match
move widens when the new policy, compared with the old one as above, widens. A case widens
when its recorded text or export gains a line it did not have (masks and pseudonyms aside).

Exit codes of the command (:data:`EXIT_SAME`, :data:`EXIT_CHANGED`, :data:`EXIT_WIDENS`):
0 no difference, 1 differences none of which widens recording, 3 at least one widens; 2 is
an invalid policy folder or case file.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from pydantic import BaseModel

from gateway.diagnostics import unwrap
from gateway.policy.matcher import PolicySet
from gateway.policy.model import Policy, ToolRecording

EXIT_SAME, EXIT_CHANGED, EXIT_WIDENS = 0, 1, 3
WIDENS = "WIDENS RECORDING"
OTHER = "(other)"
NONE = "(none)"
REDACT_STRENGTH = {"keep": 0, "hash": 1, "mask": 2, "drop": 3}
DETECTOR_STRENGTH = {None: 0, "hash": 1, "mask": 2}
_OPAQUE_LINE = re.compile(r"^(\*\*\*\*|pseud:[0-9a-f]{16}|\[(EMAIL|PHONE|CARD|IBAN)\])$")


@dataclass(frozen=True, slots=True)
class Change:
    """One changed field of a policy present on both sides (values are configuration)."""

    policy: str
    field: str
    old: Any
    new: Any
    text: str
    widens: bool = False


@dataclass(frozen=True, slots=True)
class Move:
    """A request that the new set gives another policy than the old one did."""

    tenant: str
    model: str | None
    session_id: str | None
    old: str
    new: str
    widens: bool


@dataclass(frozen=True, slots=True)
class CaseChange:
    """A case whose outcome differs: ``field`` is ``policy``, ``recorded.user``,
    ``recorded.assistant``, ``injected`` or ``export``."""

    file: str
    line: int
    name: str
    field: str
    old: Any
    new: Any
    widens: bool


@dataclass(slots=True)
class PolicyDiff:
    """The difference between two policy sets (see the module docstring)."""

    added: list[tuple[str, str | None]] = field(default_factory=list)
    """``(id, file name)`` of policies only in the new set."""
    removed: list[tuple[str, str | None]] = field(default_factory=list)
    """``(id, file name)`` of policies only in the old set."""
    changes: list[Change] = field(default_factory=list)
    moves: list[Move] = field(default_factory=list)
    cases: list[CaseChange] = field(default_factory=list)
    sample: tuple[list[str], list[str | None], list[str | None]] = ([], [], [])
    """The tenants, models and session ids the match moves were evaluated over."""

    @property
    def changed(self) -> list[str]:
        """Ids of the policies on both sides whose meaning changed, in order."""
        return list(dict.fromkeys(c.policy for c in self.changes))

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changes or self.moves or self.cases)

    def widening(self) -> list[str]:
        """Every widening, one phrase each, names only (no tenants, sessions or case content)."""
        out = [c.text for c in self.changes if c.widens]
        for (old, new), count in self._move_pairs().items():
            if count[1]:
                out.append(f"match: {count[0]} sampled request kind(s) move from {old} to {new}, "
                           f"which records more")
        out += [f"case {c.name!r}: {c.field} records more" for c in self.cases if c.widens]
        return out

    @property
    def widens_recording(self) -> bool:
        return bool(self.widening())

    @property
    def exit_code(self) -> int:
        if self.empty:
            return EXIT_SAME
        return EXIT_WIDENS if self.widens_recording else EXIT_CHANGED

    def _move_pairs(self) -> dict[tuple[str, str], list[int]]:
        pairs: dict[tuple[str, str], list[int]] = {}
        for move in self.moves:
            entry = pairs.setdefault((move.old, move.new), [0, 0])
            entry[0] += 1
            entry[1] += move.widens
        return pairs

    def summary_line(self) -> str:
        """One line for the reload log: counts and ids, and whether recording widens."""
        def ids(items: Iterable[str]) -> str:
            return ",".join(items) or "-"

        return (f"{len(self.added)} added [{ids(i for i, _ in self.added)}], {len(self.removed)} removed "
                f"[{ids(i for i, _ in self.removed)}], {len(self.changed)} changed [{ids(self.changed)}], "
                f"{len(self.moves)} match move(s); widens recording: {'yes' if self.widens_recording else 'no'}")

    def audit_detail(self) -> dict[str, Any]:
        """The diff for the ``policy_reload`` audit entry: ids, field names and widenings only."""
        return {
            "added": [i for i, _ in self.added],
            "removed": [i for i, _ in self.removed],
            "changed": {pid: sorted({c.field for c in self.changes if c.policy == pid}) for pid in self.changed},
            "moves": [{"from": old, "to": new, "count": n[0]} for (old, new), n in self._move_pairs().items()],
            "widens_recording": self.widens_recording,
            "widening": self.widening(),
        }

    def to_json(self) -> dict[str, Any]:
        """The whole diff as JSON-ready data (``policy diff --format json``)."""
        return {
            "added": [{"id": i, "file": f} for i, f in self.added],
            "removed": [{"id": i, "file": f} for i, f in self.removed],
            "changed": [asdict(c) for c in self.changes],
            "moves": [asdict(m) for m in self.moves],
            "cases": [asdict(c) for c in self.cases],
            "widens_recording": self.widens_recording,
            "widening": self.widening(),
            "exit_code": self.exit_code,
        }

    def render(self) -> list[str]:
        """The diff as text lines for reviewers; widenings carry ``WIDENS RECORDING``."""
        lines: list[str] = []
        widening = self.widening()
        if widening:
            lines.append(f"*** {WIDENS}: {len(widening)} change(s) widen what is recorded or exported ***")
        lines += [f"added: {i}" + (f" ({f})" if f else "") for i, f in self.added]
        lines += [f"removed: {i}" + (f" ({f})" if f else "") for i, f in self.removed]
        for change in self.changes:
            lines.append(f"changed: {change.text}" + (f"  <-- {WIDENS}" if change.widens else ""))
        for tenants, models, sessions, move in group_moves(self.moves, self.sample):
            lines.append(f"moved: tenant {tenants}, model {models}, session {sessions}: {move.old} -> {move.new}"
                         + (f"  <-- {WIDENS}" if move.widens else ""))
        for case in self.cases:
            lines.append(f"case {case.file}:{case.line} {case.name!r}: {case.field} changed"
                         + (f"  <-- {WIDENS}" if case.widens else ""))
            lines += ["    " + row for row in side_by_side(case.old, case.new)]
        if self.empty:
            lines.append("no difference")
        else:
            lines.append(f"summary: {self.summary_line()}")
        return lines


# --- comparing two policies ----------------------------------------------------------------


def _keys(keys: list[str] | None) -> str:
    return "null (the whole text)" if keys is None else "[" + ", ".join(keys) + "]"


def _whitelist(policy_id: str, name: str, old: list[str] | None, new: list[str] | None) -> list[Change]:
    if old == new:
        return []
    if old is None or new is None:
        return [Change(policy_id, name, old, new, f"{policy_id}: {name}: {_keys(old)} -> {_keys(new)}",
                       widens=new is None)]
    out = [Change(policy_id, name, None, key, f"{policy_id}: {name}: + {key}", widens=True)
           for key in new if key not in old]
    out += [Change(policy_id, name, key, None, f"{policy_id}: {name}: - {key}") for key in old if key not in new]
    if not out:  # same keys, another order: the blocks' order changes
        out.append(Change(policy_id, name, old, new, f"{policy_id}: {name}: order {_keys(old)} -> {_keys(new)}"))
    return out


def effective_action(policy: Policy, key: str) -> str:
    """The redaction an export applies to ``key``: its first rule, else the ``"*"`` rule, else keep."""
    by_key: dict[str, str] = {}
    for rule in policy.export.redact:
        by_key.setdefault(rule.key, rule.action)
    return by_key.get(key, by_key.get("*", "keep"))


def _days(days: int | None) -> str:
    return "null (kept until deleted)" if days is None else f"{days} days"


def compare_policies(old: Policy, new: Policy, label: str | None = None) -> list[Change]:
    """Every changed field from ``old`` to ``new`` (widenings flagged); ``label`` names the pair
    in the texts (default: the new policy's id).

    Every setting of the policy model is compared (:data:`COMPARED_FIELDS`, in this order); a
    changed setting its comparison finds no effect of (redaction rules reordered with the same
    effective actions) is still reported, as a plain change. A field of the model that is missing
    from :data:`COMPARED_FIELDS` is reported as widening, so a new setting is flagged until its
    effect is classified."""
    pid = label or new.id
    a_doc, b_doc = old.model_dump(mode="json"), new.model_dump(mode="json")
    out: list[Change] = []
    for name, compare in COMPARED_FIELDS.items():
        a, b = _value_at(a_doc, name), _value_at(b_doc, name)
        if a != b:
            out += compare(pid, name, old, new) or [_changed(pid, name, a, b)]
        if name == "session.reply_keys":
            out += _records_nothing(pid, old, new)
    for name in policy_fields():
        if name not in COMPARED_FIELDS:
            a, b = _value_at(a_doc, name), _value_at(b_doc, name)
            if a != b:
                out.append(_changed(pid, name, a, b, widens=True))
    return out


def policy_fields(model: type[BaseModel] = Policy, prefix: str = "") -> list[str]:
    """The dotted names of every setting of ``model``: nested models are walked into, any other
    field (a list, a mapping, a union such as ``bounding``) is one setting."""
    out: list[str] = []
    for name, info in model.model_fields.items():
        annotation = unwrap(info.annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += policy_fields(annotation, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def _value_at(document: dict[str, Any], name: str) -> Any:
    value: Any = document
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _changed(pid: str, name: str, a: Any, b: Any, widens: bool = False) -> Change:
    return Change(pid, name, a, b, f"{pid}: {name}: {_flow(a)} -> {_flow(b)}", widens)


_Compare = Callable[[str, str, Policy, Policy], list[Change]]


def _unchanged_pairing(pid: str, name: str, old: Policy, new: Policy) -> list[Change]:
    return []  # policies are paired by id: the same on both sides


def _description(pid: str, name: str, old: Policy, new: Policy) -> list[Change]:
    return [Change(pid, "description", None, None, f"{pid}: description changed")]


def _priority(pid: str, name: str, old: Policy, new: Policy) -> list[Change]:
    return [Change(pid, "priority", old.priority, new.priority, f"{pid}: priority: {old.priority} -> {new.priority}")]


def _match(pid: str, name: str, old: Policy, new: Policy) -> list[Change]:
    field_name = name.split(".")[-1]
    a, b = getattr(old.match, field_name), getattr(new.match, field_name)
    return [Change(pid, name, a, b, f"{pid}: {name}: {_flow(a)} -> {_flow(b)}")]


def _input_keys(pid: str, name: str, old: Policy, new: Policy) -> list[Change]:
    return _whitelist(pid, "input_keys", old.session.input_keys, new.session.input_keys)


def _reply_keys(pid: str, name: str, old: Policy, new: Policy) -> list[Change]:
    return _whitelist(pid, "reply_keys", old.session.reply_keys, new.session.reply_keys)


def _records_nothing(pid: str, old: Policy, new: Policy) -> list[Change]:
    if old.records_nothing and not new.records_nothing:
        return [Change(pid, "records_nothing", True, False, f"{pid}: records_nothing: true -> false", True)]
    if new.records_nothing and not old.records_nothing:
        return [Change(pid, "records_nothing", False, True, f"{pid}: records_nothing: false -> true")]
    return []


def _max_length(pid: str, name: str, old: Policy, new: Policy) -> list[Change]:
    a, b = old.session.max_length, new.session.max_length
    return [Change(pid, "max_length", a, b, f"{pid}: max_length: {a} -> {b}")]


def _bounding(pid: str, name: str, old: Policy, new: Policy) -> list[Change]:
    a, b = old.session.bounding.model_dump(mode="json"), new.session.bounding.model_dump(mode="json")
    return [Change(pid, "bounding", a, b, f"{pid}: bounding: {_flow(a)} -> {_flow(b)}")]


def _inject(pid: str, name: str, old: Policy, new: Policy) -> list[Change]:
    field_name = name.split(".")[-1]
    a, b = getattr(old.session.inject, field_name), getattr(new.session.inject, field_name)
    return [Change(pid, f"inject.{field_name}", a, b, f"{pid}: inject.{field_name}: {_flow(a)} -> {_flow(b)}")]


RECORDS_MORE: dict[str, tuple[str, ...]] = {
    "session.tools.arguments": ("drop", "redact", "keep"),
    "session.tools.results": ("drop", "redact", "keep"),
    "session.tools.reasoning": ("drop", "keep"),
    "session.media.parts": ("drop", "placeholder", "keep"),
}
"""Settings whose values record more from left to right: a move to the right widens recording."""


def _records_free_text(policy: Policy) -> bool:
    """Tool calls, tool results and media are recorded only under ``null`` keys."""
    return policy.session.input_keys is None or policy.session.reply_keys is None


def _recording_order(pid: str, name: str, old: Policy, new: Policy) -> list[Change]:
    order = RECORDS_MORE[name]
    a, b = _value_at(old.model_dump(mode="json"), name), _value_at(new.model_dump(mode="json"), name)
    widens = order.index(b) > order.index(a) and _records_free_text(new)
    if widens and name.startswith("session.tools."):
        widens = _tools_record_more(name.rsplit(".", 1)[1], a, new.session.tools)
    return [_changed(pid, name, a, b, widens)]


def _tools_record_more(field_name: str, old_value: str, new: ToolRecording) -> bool:
    """Whether the new tool settings record more, in effect (:meth:`ToolRecording.recorded`), than
    the same settings with only *field_name* as it was: ``reasoning: keep`` records nothing while
    ``arguments`` is not ``keep``, and nothing of tools is recorded while either is ``drop``.
    Settings only record more as their values move right, so a widening of what is recorded in
    effect is always flagged on at least one of the changes that make it."""
    before = new.model_copy(update={field_name: old_value}).recorded()
    after = new.recorded()
    return any(RECORDS_MORE[f"session.tools.{key}"].index(after[key]) >
               RECORDS_MORE[f"session.tools.{key}"].index(before[key]) for key in after)


def _media_max_bytes(pid: str, name: str, old: Policy, new: Policy) -> list[Change]:
    a, b = old.session.media.max_bytes, new.session.media.max_bytes
    widens = b > a and new.session.media.parts == "keep" and _records_free_text(new)
    return [Change(pid, name, a, b, f"{pid}: {name}: {a} -> {b} bytes", widens)]


def _redact(pid: str, name: str, old: Policy, new: Policy) -> list[Change]:
    out = []
    rule_keys = list(dict.fromkeys([*(r.key for r in old.export.redact), *(r.key for r in new.export.redact), "*"]))
    for key in rule_keys:
        a, b = effective_action(old, key), effective_action(new, key)
        if a != b:
            out.append(Change(pid, "export.redact", {key: a}, {key: b}, f"{pid}: redaction of {key}: {a} -> {b}",
                              widens=REDACT_STRENGTH[b] < REDACT_STRENGTH[a] and not new.records_nothing))
    return out


def _detectors(pid: str, name: str, old: Policy, new: Policy) -> list[Change]:
    out = []
    do, dn = dict(old.export.detectors), dict(new.export.detectors)
    for detector in sorted(set(do) | set(dn)):
        a, b = do.get(detector), dn.get(detector)
        if a != b:
            out.append(Change(pid, "export.detectors", {detector: a}, {detector: b},
                              f"{pid}: detector {detector}: {a or 'off'} -> {b or 'off'}",
                              widens=DETECTOR_STRENGTH[b] < DETECTOR_STRENGTH[a] and not new.records_nothing))
    return out


def _retention(pid: str, name: str, old: Policy, new: Policy) -> list[Change]:
    a, b = old.retention.days, new.retention.days
    longer = a is not None and (b is None or b > a) and not new.records_nothing
    return [Change(pid, "retention.days", a, b, f"{pid}: retention: {_days(a)} -> {_days(b)}", longer)]


COMPARED_FIELDS: dict[str, _Compare] = {
    "session.input_keys": _input_keys,
    "session.reply_keys": _reply_keys,  # then records_nothing, which both whitelists decide
    "session.max_length": _max_length,
    "session.bounding": _bounding,
    "session.inject.context_window": _inject,
    "session.inject.memo": _inject,
    "session.inject.memo_placement": _inject,
    "session.tools.arguments": _recording_order,
    "session.tools.results": _recording_order,
    "session.tools.reasoning": _recording_order,
    "session.media.parts": _recording_order,
    "session.media.max_bytes": _media_max_bytes,
    "export.redact": _redact,
    "export.detectors": _detectors,
    "retention.days": _retention,
    "match.tenants": _match,
    "match.models": _match,
    "match.session_ids": _match,
    "priority": _priority,
    "description": _description,
    "id": _unchanged_pairing,
}
"""Every setting of :class:`Policy` (:func:`policy_fields`) and how a change of it is reported,
in report order. A test walks the model and fails when a setting is missing here."""


def _flow(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


# --- match moves ---------------------------------------------------------------------------


def witness(pattern: str) -> str | None:
    """A concrete value that glob ``pattern`` matches (None when none is found)."""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch in "*?":
            out.append("x")
        elif ch == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            if body.startswith("!"):
                out.append(next((c for c in "xyz0_" if c not in body[1:]), "x"))
            else:
                out.append(body[0])
            i = end
        else:
            out.append(ch)
        i += 1
    value = "".join(out)
    return value if fnmatchcase(value, pattern) else None


def sample_values(sets: Iterable[PolicySet], extra: Iterable[tuple[str, str | None, str | None]] = ()
                  ) -> tuple[list[str], list[str | None], list[str | None]]:
    """The tenants, models and session ids the match moves are evaluated over (module docstring)."""
    tenants: dict[str, None] = {}
    models: dict[str | None, None] = {}
    sessions: dict[str | None, None] = {}
    for policies in sets:
        for policy in policies:
            for patterns, bucket in ((policy.match.tenants, tenants), (policy.match.models, models),
                                     (policy.match.session_ids, sessions)):
                for pattern in patterns or ():
                    value = witness(pattern)
                    if value is not None:
                        bucket[value] = None  # type: ignore[index]
    for tenant, model, session_id in extra:
        tenants[tenant] = None
        models[model] = None
        sessions[session_id] = None
    tenants[OTHER] = None
    for bucket in (models, sessions):
        bucket[OTHER] = None
        bucket[None] = None
    return list(tenants), list(models), list(sessions)


def match_moves(old: PolicySet, new: PolicySet, sample: tuple[list[str], list[str | None], list[str | None]]
                ) -> list[Move]:
    """Every (tenant, model, session id) of ``sample`` that ``old`` and ``new`` give different policies."""
    if _matching(old) == _matching(new):
        return []  # the same globs and priorities under the same ids: no request can move
    tenants, models, sessions = sample
    old, new = PolicySet(old), PolicySet(new)  # private match caches: the live set's stays as it is
    moves = []
    for tenant, model, session_id in itertools.product(tenants, models, sessions):
        a, b = old.match(tenant, model, session_id), new.match(tenant, model, session_id)
        if a.id != b.id:
            widens = any(c.widens for c in compare_policies(a, b, f"{a.id} -> {b.id}"))
            moves.append(Move(tenant, model, session_id, a.id, b.id, widens))
    return moves


def _matching(policies: PolicySet) -> set[tuple[str, int, str]]:
    return {(p.id, p.priority, p.match.model_dump_json()) for p in policies}


def _shown(value: str | None) -> str:
    return NONE if value is None else value


def group_moves(moves: Sequence[Move], sample: tuple[list[str], list[str | None], list[str | None]]
                ) -> list[tuple[str, str, str, Move]]:
    """Moves as text rows ``(tenants, models, sessions, a move of the row)``, exact: the moves of one
    (old, new, widens) that form a full product of their tenants, models and session ids are one
    row, values joined by ``|`` (``any`` when a field takes every sampled value); others one row each."""
    groups: dict[tuple[str, str, bool], list[Move]] = {}
    for move in moves:
        groups.setdefault((move.old, move.new, move.widens), []).append(move)
    rows = []
    for group in groups.values():
        fields = [list(dict.fromkeys(getattr(m, name) for m in group)) for name in ("tenant", "model", "session_id")]
        if len(group) == len(fields[0]) * len(fields[1]) * len(fields[2]):
            shown = ["any" if len(values) == len(sample[i]) else "|".join(_shown(v) for v in values)
                     for i, values in enumerate(fields)]
            rows.append((shown[0], shown[1], shown[2], group[0]))
        else:
            rows += [(m.tenant, _shown(m.model), _shown(m.session_id), m) for m in group]
    return rows


# --- the whole diff ------------------------------------------------------------------------


def _file(policy: Policy) -> str | None:
    return policy.source.name if policy.source is not None else None


def diff_sets(old: PolicySet, new: PolicySet, cases: Sequence[Any] = ()) -> PolicyDiff:
    """The difference from ``old`` to ``new``; ``cases`` (``LoadedCase`` from
    :mod:`gateway.policy.cases`) add their requests to the match sample and their outcome changes."""
    old_ids, new_ids = {p.id: p for p in old}, {p.id: p for p in new}
    result = PolicyDiff()
    result.added = [(pid, _file(p)) for pid, p in sorted(new_ids.items()) if pid not in old_ids]
    result.removed = [(pid, _file(p)) for pid, p in sorted(old_ids.items()) if pid not in new_ids]
    for pid in sorted(set(old_ids) & set(new_ids)):
        a, b = old_ids[pid], new_ids[pid]
        if a.version_hash != b.version_hash:
            result.changes += compare_policies(a, b)
    extra = [(item.case.tenant, _model(item.case.request), item.case.session_id) for item in cases]
    result.sample = sample_values((old, new), extra)
    result.moves = match_moves(old, new, result.sample)
    result.cases = case_changes(old, new, cases)
    return result


def _model(request: dict[str, Any]) -> str | None:
    model = request.get("model")
    return model if isinstance(model, str) else None


def _lines(value: Any) -> set[str]:
    if value is None:
        return set()
    if isinstance(value, str):
        return {line.strip() for line in value.splitlines() if line.strip()}
    if isinstance(value, list):
        return set().union(*(_lines(m.get("content") if isinstance(m, dict) else m) for m in value)) \
            if value else set()
    return {json.dumps(value, sort_keys=True)}


def _records_more(old: Any, new: Any) -> bool:
    gained = _lines(new) - _lines(old)
    return any(not _OPAQUE_LINE.match(line) for line in gained)


def case_changes(old: PolicySet, new: PolicySet, cases: Sequence[Any]) -> list[CaseChange]:
    """Each case field (policy, recorded text, injection, export) whose outcome differs."""
    from gateway.policy.cases import evaluate

    out = []
    for item in cases:
        a = evaluate(old, item.case, item.export_secret)
        b = evaluate(new, item.case, item.export_secret)
        for name, va, vb, widening in (
                ("policy", a.policy, b.policy, False),
                ("recorded.user", a.user, b.user, True),
                ("recorded.assistant", a.assistant, b.assistant, True),
                ("injected", a.injected, b.injected, False),
                ("export", a.export, b.export, True)):
            if va != vb:
                out.append(CaseChange(item.file, item.line, item.case.name, name, va, vb,
                                      widening and _records_more(va, vb)))
    return out


def side_by_side(old: Any, new: Any, width: int = 48) -> list[str]:
    """``old`` and ``new`` in two columns headed ``old`` and ``new`` (long lines wrapped)."""
    def lines(value: Any) -> list[str]:
        if value is None:
            text = "(nothing)"
        elif isinstance(value, str):
            text = value
        elif isinstance(value, list):
            text = "\n".join(_message_text(m) for m in value) if value else "(nothing)"
        else:
            text = json.dumps(value, ensure_ascii=False)
        wrapped: list[str] = []
        for line in text.splitlines() or [""]:
            wrapped += [line[i:i + width] for i in range(0, max(len(line), 1), width)]
        return wrapped

    left, right = lines(old), lines(new)
    rows = [f"{'old':<{width}} | new", f"{'-' * width}-+-{'-' * width}"]
    for a, b in itertools.zip_longest(left, right, fillvalue=""):
        rows.append(f"{a:<{width}} | {b}".rstrip())
    return rows


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return json.dumps(message, ensure_ascii=False)
    content = message.get("content")
    body = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    return f"{message.get('role')}:\n" + "\n".join("  " + line for line in body.splitlines())
