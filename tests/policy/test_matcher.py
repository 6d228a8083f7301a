"""Matching: one policy per request, highest priority first, and the set rules behind it."""

from __future__ import annotations

import pytest

from gateway.errors import ConfigError
from gateway.policy import Match, Policy, PolicySet
from gateway.policy.matcher import check_set, globs_may_overlap, match_covers, matches_may_overlap


def _policy(pid: str, priority: int = 0, **match: list[str]) -> Policy:
    return Policy.model_validate({"id": pid, "priority": priority, "match": match,
                                  "session": {"input_keys": None, "reply_keys": None}})


def _set(*policies: Policy, **kwargs: int) -> PolicySet:
    return PolicySet([_policy("default"), *policies], **kwargs)


def test_highest_priority_match_wins():
    """When several policies match, the one with the highest priority is chosen."""
    policies = _set(_policy("acme", 5, tenants=["acme"]),
                    _policy("support", 10, tenants=["acme"], session_ids=["support:*"]))
    assert policies.match("acme", "gpt-4o", "support:7").id == "support"
    assert policies.match("acme", "gpt-4o", "chat:7").id == "acme"
    assert policies.match("globex", "gpt-4o", "support:7").id == "default"


def test_every_listed_field_must_match():
    """A policy with tenants and models matches only when both do."""
    policies = _set(_policy("p", 1, tenants=["acme"], models=["gpt-4o*"]))
    assert policies.match("acme", "gpt-4o-mini", None).id == "p"
    assert policies.match("acme", "claude-3", None).id == "default"


def test_missing_model_or_session_never_matches_a_list():
    """A request without a session id does not match a policy that lists session ids, even '*'."""
    policies = _set(_policy("sessions", 1, session_ids=["*"]), _policy("models", 2, models=["*"]))
    assert policies.match("acme", None, None).id == "default"
    assert policies.match("acme", None, "s").id == "sessions"


def test_globs_are_case_sensitive():
    """Tenant and model globs compare case-sensitively."""
    policies = _set(_policy("p", 1, models=["GPT-*"]))
    assert policies.match("acme", "gpt-4o", None).id == "default"
    assert policies.match("acme", "GPT-4o", None).id == "p"


def test_answers_stay_right_beyond_the_cache_size():
    """The bounded cache evicts old entries without changing any answer."""
    policies = _set(_policy("even", 1, session_ids=["*0", "*2", "*4", "*6", "*8"]), cache_size=3)
    answers = [policies.match("acme", None, str(n)).id for n in range(20)] * 2
    assert answers == ["even" if n % 2 == 0 else "default" for n in range(20)] * 2


def test_set_without_catch_all_is_refused():
    """A PolicySet built in code is validated like a loaded one."""
    with pytest.raises(ConfigError, match="catch-all"):
        PolicySet([_policy("p", 1, tenants=["acme"])])


def test_set_with_same_priority_overlap_is_refused():
    """Two catch-alls with one priority could both match every request."""
    with pytest.raises(ConfigError, match="priority 0"):
        PolicySet([_policy("a"), _policy("b")])


def test_policies_are_listed_highest_priority_first():
    """Iteration and get() expose the set in precedence order and by id."""
    policies = _set(_policy("low", 1, tenants=["a"]), _policy("high", 9, tenants=["b"]))
    assert [p.id for p in policies] == ["high", "low", "default"]
    assert policies.get("low").priority == 1 and policies.get("nope") is None


@pytest.mark.parametrize(("a", "b", "overlap"), [
    ("acme", "acme", True),
    ("acme", "globex", False),
    ("acme", "ac*", True),
    ("acme", "gl*", False),
    ("gpt-4o*", "claude*", False),
    ("*-mini", "*-large", False),
    ("*-mini", "gpt-*", True),
    ("support:*", "*:*", True),
    ("a[bc]d", "a[xy]d", True),
])
def test_glob_overlap_is_conservative(a, b, overlap):
    """Globs are called disjoint only when literal text proves it."""
    assert globs_may_overlap(a, b) is overlap and globs_may_overlap(b, a) is overlap


def test_match_overlap_needs_every_field_to_overlap():
    """Policies restricted to different tenants cannot overlap whatever their models."""
    assert not matches_may_overlap(Match(tenants=["acme"], models=["*"]), Match(tenants=["globex"]))
    assert matches_may_overlap(Match(tenants=["acme"]), Match(models=["gpt-*"]))


def test_cover_is_certain_only():
    """A '*' model list covers a literal model list but not requests without a model."""
    assert match_covers(Match(models=["*"]), Match(models=["gpt-4o"]))
    assert not match_covers(Match(models=["*"]), Match(tenants=["acme"]))
    assert match_covers(Match(tenants=["*"]), Match(tenants=["acme"], session_ids=["x"]))


def test_shadowed_policy_is_reported_as_warning():
    """check_set warns about a policy that a higher-priority policy always takes first."""
    issues = check_set([_policy("default"), _policy("wide", 5, models=["gpt-*"]),
                        _policy("narrow", 1, models=["gpt-4o"])])
    assert [(i.severity, i.index, i.loc) for i in issues] == [("warning", 2, ("match",))]


def _recording(pid: str, priority: int, input_keys: list[str] | None, reply_keys: list[str] | None,
               **match: list[str]) -> Policy:
    return Policy.model_validate({"id": pid, "priority": priority, "match": match,
                                  "session": {"input_keys": input_keys, "reply_keys": reply_keys}})


def _lapses(*policies: Policy) -> list[str]:
    return [i.message for i in check_set([_policy("default"), *policies]) if "keep text out" in i.message]


def test_a_policy_any_client_can_choose_that_records_less_is_warned_about():
    """Chosen by session id or model alone, for every tenant, recording less than the policy it
    takes the request from: any client could keep its text out of the record."""
    (by_session,) = _lapses(_recording("private", 9, [], [], session_ids=["private:*"]))
    assert "session id ['private:*']" in by_session and "records none of the new input" in by_session
    assert "'default' records all of it" in by_session and "match.tenants" in by_session
    (by_model,) = _lapses(_recording("terse", 9, None, ["answer"], models=["cheap-*"]))
    assert "model ['cheap-*']" in by_model and "records only 'answer' of the reply" in by_model
    keyed = _recording("keyed", 3, ["input.a", "input.b"], None, tenants=["acme"])
    (narrower,) = _lapses(keyed, _recording("narrow", 9, ["input.a"], None, tenants=["*"], session_ids=["n:*"]))
    assert "does not record 'input.b' of the new input, which 'keyed' does" in narrower


def test_no_warning_when_the_key_chooses_or_nothing_is_left_out():
    """Limited to tenants, recording as much, or matched by nothing the client picks: no lapse."""
    assert _lapses(_recording("private", 9, [], [], tenants=["acme"], session_ids=["private:*"])) == []
    assert _lapses(_recording("same", 9, None, None, session_ids=["x:*"])) == []
    assert _lapses(_recording("tenant-wide", 9, [], [], tenants=["acme"])) == []
    # the shipped examples: record-nothing names its tenant
    from pathlib import Path

    from gateway.policy import load_policy_set
    shipped = load_policy_set(Path(__file__).parents[2] / "policies")
    assert not [w for w in shipped.warnings if "keep text out" in w.message]
