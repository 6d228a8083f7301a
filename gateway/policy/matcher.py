"""Matching a request to its one policy, and the set rules that make the answer unambiguous.

:class:`PolicySet` is an immutable, validated set of policies. ``match(tenant, model,
session_id)`` returns the highest-priority policy whose ``match`` globs all match; globs are
compiled once into one regex per field, and answers are cached in a bounded dict, so the call
on every request is a dict look-up in the common case.

Set rules (:func:`check_set`; ``PolicySet`` raises ``ConfigError`` when one fails):

- policy ids are unique;
- there is a catch-all policy (one without restrictions), so every request gets a policy;
- two policies with the same priority must not be able to match the same request. Whether two
  glob lists can overlap is decided conservatively: two literals overlap when equal, a literal
  and a glob when the glob matches the literal, two globs unless their literal prefixes (text
  before the first ``*``, ``?`` or ``[``) or literal suffixes contradict. A field left out
  overlaps everything. Policies overlap when all three fields overlap. The fix is always the
  same: give one of them another priority.

It also warns when a policy can never be chosen because a higher-priority policy matches
every request it matches.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase, translate
from typing import TYPE_CHECKING, Literal

from gateway.errors import ConfigError
from gateway.policy.model import Match, Policy

if TYPE_CHECKING:
    from gateway.policy.loader import Diagnostic

_META = re.compile(r"[*?\[]")
_FIELDS = ("tenants", "models", "session_ids")


def compile_globs(patterns: list[str] | None) -> re.Pattern[str] | None:
    """One compiled regex matching any of ``patterns`` (case-sensitive); None for no restriction."""
    if patterns is None:
        return None
    return re.compile("|".join(f"(?:{translate(p)})" for p in patterns))


def _is_literal(pattern: str) -> bool:
    return _META.search(pattern) is None


def _literal_prefix(pattern: str) -> str:
    found = _META.search(pattern)
    return pattern if found is None else pattern[: found.start()]


def _literal_suffix(pattern: str) -> str:
    last = max(pattern.rfind("*"), pattern.rfind("?"), pattern.rfind("]"))
    return pattern[last + 1:]


def globs_may_overlap(a: str, b: str) -> bool:
    """Whether some string may match both globs (never False when one does)."""
    if _is_literal(a) and _is_literal(b):
        return a == b
    if _is_literal(a):
        return fnmatchcase(a, b)
    if _is_literal(b):
        return fnmatchcase(b, a)
    pa, pb = _literal_prefix(a), _literal_prefix(b)
    sa, sb = _literal_suffix(a), _literal_suffix(b)
    prefixes_agree = pa.startswith(pb) or pb.startswith(pa)
    suffixes_agree = sa.endswith(sb) or sb.endswith(sa)
    return prefixes_agree and suffixes_agree


def _lists_may_overlap(a: list[str] | None, b: list[str] | None) -> bool:
    if a is None or b is None:
        return True
    return any(globs_may_overlap(x, y) for x in a for y in b)


def matches_may_overlap(a: Match, b: Match) -> bool:
    """Whether one request may match both ``a`` and ``b`` (conservative: see module docstring)."""
    return all(_lists_may_overlap(getattr(a, f), getattr(b, f)) for f in _FIELDS)


def _list_covers(high: list[str] | None, low: list[str] | None, *, always_set: bool) -> bool:
    if high is None:
        return True
    if "*" in high:
        return low is not None or always_set
    if low is None:
        return False
    return all(p in high or (_is_literal(p) and any(fnmatchcase(p, h) for h in high)) for p in low)


def match_covers(high: Match, low: Match) -> bool:
    """Whether every request that ``low`` matches is certainly matched by ``high``."""
    return (_list_covers(high.tenants, low.tenants, always_set=True)
            and _list_covers(high.models, low.models, always_set=False)
            and _list_covers(high.session_ids, low.session_ids, always_set=False))


@dataclass(frozen=True, slots=True)
class SetIssue:
    """A problem of the set as a whole, attached to one policy's field (``index`` None: the set)."""

    severity: Literal["error", "warning"]
    index: int | None
    loc: tuple[str, ...]
    message: str


def _describe(policy: Policy) -> str:
    where = f" ({policy.source.name})" if policy.source is not None else ""
    return f"{policy.id!r}{where}"


def _records_less(policy: Policy, other: Policy) -> str | None:
    """What *policy* leaves out of the record that *other* keeps (None when nothing)."""
    for side, part in (("input_keys", "new input"), ("reply_keys", "reply")):
        mine, theirs = getattr(policy.session, side), getattr(other.session, side)
        if mine is None:
            continue
        if theirs is None:
            kept = "none" if not mine else "only " + ", ".join(repr(k) for k in mine[:3])
            return f"it records {kept} of the {part}, where {other.id!r} records all of it"
        dropped = sorted(set(theirs) - set(mine))
        if dropped:
            keys = ", ".join(repr(k) for k in dropped[:3])
            return f"it does not record {keys} of the {part}, which {other.id!r} does"
    return None


def _client_chosen_lapse(policy: Policy, policies: list[Policy]) -> str | None:
    """A policy any client of any tenant can choose (by model or session id) that records less
    than the policy it takes the request from: a way to keep text out of the record."""
    match = policy.match
    if (match.tenants is not None and "*" not in match.tenants) or (match.models is None and match.session_ids is None):
        return None
    below = sorted((o for o in policies if o.priority < policy.priority and matches_may_overlap(o.match, match)),
                   key=lambda o: -o.priority)
    for other in below:
        how = _records_less(policy, other)
        if how is not None:
            chosen = " or ".join(f"{label} {globs}" for label, globs in (("model", match.models),
                                                                         ("session id", match.session_ids)) if globs)
            return (f"policy {policy.id!r} is chosen by the client (its {chosen}) for every tenant, and {how}: any "
                    f"client can keep text out of the record by choosing it; list the tenants whose clients may in "
                    "match.tenants")
    return None


def check_set(policies: list[Policy], *, require_catch_all: bool = True) -> list[SetIssue]:
    """The set rules of the module docstring, as issues in ``policies`` order."""
    issues: list[SetIssue] = []
    seen: dict[str, Policy] = {}
    for i, policy in enumerate(policies):
        if policy.id in seen:
            message = f"duplicate policy id {policy.id!r}, also used by {_describe(seen[policy.id])}"
            issues.append(SetIssue("error", i, ("id",), message))
        seen.setdefault(policy.id, policy)
        for other in policies[:i]:
            if other.priority == policy.priority and matches_may_overlap(other.match, policy.match):
                issues.append(SetIssue(
                    "error", i, ("priority",),
                    f"policy {policy.id!r} and {_describe(other)} both have priority {policy.priority} and "
                    "can match the same request; give one of them another priority or make their "
                    "match sets disjoint"))
        shadow = next((o for o in policies if o.priority > policy.priority
                       and match_covers(o.match, policy.match)), None)
        if shadow is not None:
            issues.append(SetIssue(
                "warning", i, ("match",),
                f"policy {policy.id!r} can never match: every request it matches goes to "
                f"{_describe(shadow)} (priority {shadow.priority})"))
        lapse = _client_chosen_lapse(policy, policies) if shadow is None else None
        if lapse is not None:
            issues.append(SetIssue("warning", i, ("match",), lapse))
    if require_catch_all and policies and not any(p.match.is_catch_all for p in policies):
        issues.append(SetIssue("error", None, (),
                               "no catch-all policy: add a default policy without 'match' so that "
                               "every request gets a policy"))
    if require_catch_all and not policies:
        issues.append(SetIssue("error", None, (), "no policy files (*.yaml, *.yml) found"))
    return issues


class PolicySet:
    """An immutable, validated set of policies; ``match`` gives each request its one policy.

    Raises ``ConfigError`` on construction when a set rule fails (see module docstring).
    """

    __slots__ = ("_policies", "_compiled", "_by_id", "_cache", "_cache_size", "warnings")

    def __init__(self, policies: Iterable[Policy], *, warnings: Iterable[Diagnostic] = (),
                 cache_size: int = 4096) -> None:
        ordered = sorted(policies, key=lambda p: (-p.priority, p.id))
        errors = [issue for issue in check_set(ordered) if issue.severity == "error"]
        if errors:
            raise ConfigError("; ".join(issue.message for issue in errors), field="policies")
        self._policies: tuple[Policy, ...] = tuple(ordered)
        self._compiled = tuple(
            (p, compile_globs(p.match.tenants), compile_globs(p.match.models),
             compile_globs(p.match.session_ids))
            for p in ordered)
        self._by_id = {p.id: p for p in ordered}
        self._cache: dict[tuple[str, str | None, str | None], Policy] = {}
        self._cache_size = cache_size
        self.warnings: tuple[Diagnostic, ...] = tuple(warnings)
        """Warnings the loader found (``Diagnostic`` objects), kept for logging and the CLI."""

    @property
    def policies(self) -> tuple[Policy, ...]:
        """All policies, highest priority first (ties by id)."""
        return self._policies

    def __iter__(self) -> Iterator[Policy]:
        return iter(self._policies)

    def __len__(self) -> int:
        return len(self._policies)

    def get(self, policy_id: str) -> Policy | None:
        """The policy with this id, or None."""
        return self._by_id.get(policy_id)

    def match(self, tenant: str, model: str | None, session_id: str | None) -> Policy:
        """The one policy for this request: the highest-priority policy whose globs match.

        Never fails: the set always has a catch-all policy.
        """
        key = (tenant, model, session_id)
        found = self._cache.get(key)
        if found is not None:
            return found
        found = self._find(tenant, model, session_id)
        if len(self._cache) >= self._cache_size:
            self._cache.pop(next(iter(self._cache)), None)
        self._cache[key] = found
        return found

    def _find(self, tenant: str, model: str | None, session_id: str | None) -> Policy:
        for policy, tenants, models, sessions in self._compiled:
            if tenants is not None and not tenants.match(tenant):
                continue
            if models is not None and (model is None or not models.match(model)):
                continue
            if sessions is not None and (session_id is None or not sessions.match(session_id)):
                continue
            return policy
        raise AssertionError("a validated PolicySet always has a catch-all policy")
