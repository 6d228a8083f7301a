"""The policy models: strict validation, derived properties, hooks, and the generated docs."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.policy import Match, Policy, call_hook, check, load_policy_file
from gateway.policy.docs import models_in_order, render_reference, render_schema

POLICIES = Path(__file__).resolve().parents[2] / "policies"
MINIMAL = {"id": "p", "session": {"input_keys": None, "reply_keys": None}}


def _policy(**changes: object) -> Policy:
    data = json.loads(json.dumps(MINIMAL))
    data.update(changes)
    return Policy.model_validate(data, context={"hook_modules": ["sg_hooks_*"]})


def _hook_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> str:
    name = f"sg_hooks_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def test_example_policies_load_together_without_findings():
    """The shipped examples form one valid set with no errors and no warnings."""
    assert check([POLICIES]) == []


def test_unknown_field_is_refused():
    """A field the schema does not define is a validation error, not ignored."""
    with pytest.raises(ValidationError, match="extra"):
        _policy(retention={"days": 3, "weeks": 1})


def test_types_are_strict():
    """A quoted number is not accepted where an integer is expected."""
    with pytest.raises(ValidationError):
        _policy(priority="10")


def test_input_and_reply_keys_must_be_spelled_out():
    """Leaving out input_keys is an error, so recording everything is always a visible choice."""
    with pytest.raises(ValidationError, match="input_keys"):
        Policy.model_validate({"id": "p", "session": {"reply_keys": None}})


def test_records_nothing_only_when_both_lists_are_empty():
    """records_nothing is true for [] and [] and false when either side records."""
    nothing = _policy(session={"input_keys": [], "reply_keys": []})
    replies = _policy(session={"input_keys": [], "reply_keys": None})
    assert nothing.records_nothing and not replies.records_nothing


def test_key_paths_are_compiled():
    """input_paths holds compiled key paths in order; null keys give None."""
    policy = _policy(session={"input_keys": ["input.ticket_id", ".agent.system"], "reply_keys": None})
    assert [(k.source, k.root) for k in policy.input_paths] == [("input.ticket_id", "view"),
                                                                 (".agent.system", "agent_system")]
    assert policy.reply_paths is None


def test_invalid_key_is_refused_at_its_index():
    """A key that does not compile is reported at its position in the list."""
    with pytest.raises(ValidationError) as info:
        _policy(session={"input_keys": ["ok", "a..b"], "reply_keys": None})
    assert info.value.errors()[0]["loc"] == ("session", "input_keys", 1)


def test_version_hash_ignores_formatting_and_spelled_out_defaults(tmp_path):
    """Comments, layout and explicit defaults keep the hash; a changed value changes it."""
    (tmp_path / "a.yaml").write_text("id: p\nsession: {input_keys: null, reply_keys: null}\n")
    (tmp_path / "b.yaml").write_text("# same\nid: p\npriority: 0\nsession:\n  reply_keys: ~\n"
                                     "  input_keys: null\n  max_length: 12000\n")
    (tmp_path / "c.yaml").write_text("id: p\nsession: {input_keys: null, reply_keys: null, max_length: 5}\n")
    hashes = [load_policy_file(tmp_path / f"{n}.yaml")[0].version_hash for n in "abc"]
    assert hashes[0] == hashes[1] != hashes[2]
    assert len(hashes[0]) == 64


def test_catch_all_is_a_match_without_restrictions():
    """An empty match (or tenants ['*'] only) is a catch-all; any model or session list is not."""
    assert Match().is_catch_all and Match(tenants=["*"]).is_catch_all
    assert not Match(models=["*"]).is_catch_all


def test_sync_and_async_hooks_load_and_run(tmp_path, monkeypatch):
    """Hooks named module:function are imported at load and callable through call_hook."""
    mod = _hook_module(tmp_path, monkeypatch,
                       "def analyse(full_context, context_window, memo, settings):\n    return 'compress'\n"
                       "async def compress(full_context, context_window, memo, settings):\n"
                       "    return None, context_window[-1:], memo\n")
    policy = _policy(session={"input_keys": None, "reply_keys": None, "bounding": {
        "strategy": "hook", "analysis": f"{mod}:analyse", "execution": {"compress": f"{mod}:compress"}}})
    bounding = policy.session.bounding
    assert asyncio.run(call_hook(bounding.analysis_fn, [], [], None, {})) == "compress"
    assert asyncio.run(call_hook(bounding.execution_fns["compress"], [], [1, 2], "m", {})) == (None, [2], "m")


def test_hook_with_wrong_parameter_count_is_refused(tmp_path, monkeypatch):
    """A hook that cannot take Agently's four arguments refuses the policy."""
    mod = _hook_module(tmp_path, monkeypatch, "def analyse(full_context, context_window):\n    return None\n")
    with pytest.raises(ValidationError, match="4 positional parameters"):
        _policy(session={"input_keys": None, "reply_keys": None,
                         "bounding": {"strategy": "hook", "analysis": f"{mod}:analyse"}})


def test_hook_bounding_needs_a_hook_that_can_run(tmp_path, monkeypatch):
    """Without an analysis hook, only an execution hook named simple_cut could ever run."""
    mod = _hook_module(tmp_path, monkeypatch, "def squash(a, b, c, d):\n    return None, None, None\n")
    with pytest.raises(ValidationError, match="simple_cut"):
        _policy(session={"input_keys": None, "reply_keys": None,
                         "bounding": {"strategy": "hook", "execution": {"squash": f"{mod}:squash"}}})


def test_every_field_is_documented():
    """Each field of every policy model has a description for the generated reference."""
    undocumented = [f"{m.__name__}.{name}" for m in models_in_order()
                    for name, field in m.model_fields.items() if not field.description]
    assert undocumented == []


def test_schema_refuses_unknown_fields_everywhere():
    """The JSON Schema sets additionalProperties false on the policy and every nested object."""
    schema = json.loads(render_schema())
    objects = [schema, *schema["$defs"].values()]
    assert all(o.get("additionalProperties") is False for o in objects if o.get("type") == "object")


def test_committed_docs_are_up_to_date():
    """policies/README.md and policy.schema.json match what write_docs generates now."""
    assert (POLICIES / "README.md").read_text(encoding="utf-8") == render_reference(), \
        "run: python -c \"from gateway.policy.docs import write_docs; write_docs('policies')\""
    assert (POLICIES / "policy.schema.json").read_text(encoding="utf-8") == render_schema()
