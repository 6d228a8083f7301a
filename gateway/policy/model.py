"""The policy file's schema: pydantic models that are also its documentation.

One YAML file holds one :class:`Policy`. Every model forbids unknown fields and validates
strictly (``priority: "10"`` is an error, not 10). The attribute docstrings are the field
reference: ``gateway.policy.docs`` renders them into ``policies/README.md`` and the JSON Schema.

Validation imports nothing but the bounding hooks (``module:function``), which are imported
and checked here, and compiles every key path with ``gateway.paths.compile_key``. Both raise
``ValueError`` inside pydantic, so a bad hook or key is reported at its field like any other
error. Validation never reads files; :mod:`gateway.policy.loader` does.

``Policy.version_hash`` is the SHA-256 (hex) of the validated policy dumped as JSON with sorted
keys and no whitespace, defaults included: comments, formatting, key order, and writing a
default value explicitly do not change it; any change of meaning does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationInfo,
    model_validator,
)

from gateway.policy.hooks import HOOK_MODULES, HOOK_REF_PATTERN, check_allowed, resolve_hook

if TYPE_CHECKING:
    from gateway.paths import KeyPath


def _check_key(key: str) -> str:
    """Compile ``key`` with the gateway's key-path syntax; raise ValueError when it is invalid."""
    from gateway.paths import compile_key  # lazy: paths pulls in jsonpath-ng

    compile_key(key)
    return key


def _check_hook(ref: str, info: ValidationInfo) -> str:
    """Refuse a hook whose module the configuration does not allow (nothing is imported then);
    import and check an allowed one now, so a broken hook refuses the policy at load time."""
    allowed = (info.context or {}).get(HOOK_MODULES, ())
    check_allowed(ref, allowed)
    resolve_hook(ref)
    return ref


Key = Annotated[str, StringConstraints(min_length=1), AfterValidator(_check_key)]
"""A key path: Agently syntax (``input.ticket_id``, ``input/lang``, ``.request.model``,
``.agent.system``) or JSONPath (``$.choices[0].message``)."""

Glob = Annotated[str, StringConstraints(min_length=1)]
"""A case-sensitive shell glob: ``*`` any run of characters, ``?`` one, ``[abc]`` a class."""

HookRef = Annotated[str, StringConstraints(pattern=HOOK_REF_PATTERN), AfterValidator(_check_hook)]
"""``package.module:function`` from a module ``policies.hook_modules`` allows, importable by the
gateway, taking Agently's 4 hook arguments."""

StrategyName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
PolicyId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]


class StrictModel(BaseModel):
    """Base of every policy model: immutable, strict types, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True)


class Match(StrictModel):
    """Which requests the policy applies to. A request matches when every listed field matches
    (a field matches when any of its globs does); an omitted field matches everything. A policy
    with no ``match`` (or ``match: {}``) is a catch-all; every policy set needs one."""

    tenants: Annotated[list[Glob], Field(min_length=1)] | None = None
    """Globs over the tenant of the client key (the tenant never comes from the request)."""
    models: Annotated[list[Glob], Field(min_length=1)] | None = None
    """Globs over the request's ``model``. A request without a model never matches a list."""
    session_ids: Annotated[list[Glob], Field(min_length=1)] | None = None
    """Globs over the ``X-Session-Id`` header (e.g. ``support:*``). A request without a
    session id never matches a list."""

    @property
    def is_catch_all(self) -> bool:
        """True when the policy matches every request (no restriction on any field)."""
        return (self.tenants is None or "*" in self.tenants) and self.models is None \
            and self.session_ids is None


class SimpleCut(StrictModel):
    """Keep the newest messages that fit in ``max_length``; when none fits, keep the last one
    cut to its final ``max_length`` characters. ``full_context`` and the memo are unchanged
    (Agently's default)."""

    strategy: Literal["simple_cut"]
    """Selects this strategy."""


class KeepLast(StrictModel):
    """When the window is longer than ``max_length``, keep only its last ``rounds`` rounds."""

    strategy: Literal["keep_last"]
    """Selects this strategy."""
    rounds: Annotated[int, Field(ge=1)]
    """How many rounds (a user message and its reply) to keep."""


class Summarize(StrictModel):
    """When the window is longer than ``max_length``, fold its oldest part into the memo with a
    side request to the upstream model. The side request carries no session context and is
    never recorded as a round."""

    strategy: Literal["summarize"]
    """Selects this strategy."""
    model: str | None = None
    """Model for the side request; null: the model of the request that triggered it."""
    prompt: str | None = None
    """Instruction for the summarizer; null: the gateway's built-in instruction."""
    keep_last_rounds: Annotated[int, Field(ge=0)] = 2
    """Rounds left verbatim in the window after folding."""
    max_memo_chars: Annotated[int, Field(ge=1)] = 4000
    """Upper bound on the memo's length as text; the summarizer is asked to stay under it
    and a longer answer is cut."""
    timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    """Deadline for the side request; on failure the window is bounded with ``simple_cut``."""


class HookBounding(StrictModel):
    """Python hooks with Agently's signatures (sync or async), imported and checked when the
    policy loads. ``analysis(full_context, context_window, memo, session_settings)`` returns a
    strategy name or null; the named ``execution`` hook (or the built-in ``simple_cut``) then
    returns ``(full_context | null, context_window | null, memo)``; null leaves that part as it
    is. Without ``analysis``, Agently's default picks ``simple_cut`` when the window is longer
    than ``max_length``, so ``execution`` must then define ``simple_cut``."""

    strategy: Literal["hook"]
    """Selects this strategy."""
    analysis: HookRef | None = None
    """Analysis hook, ``package.module:function``; null: Agently's default analysis."""
    execution: dict[StrategyName, HookRef] = Field(default_factory=dict)
    """Execution hooks by strategy name, e.g. ``{compress: "pkg.mod:compress"}``."""

    @model_validator(mode="after")
    def _needs_a_runnable_hook(self) -> HookBounding:
        if self.analysis is None and "simple_cut" not in self.execution:
            raise ValueError("without an analysis hook only 'simple_cut' ever runs: "
                             "set analysis, or name an execution hook 'simple_cut'")
        return self

    @property
    def analysis_fn(self) -> Callable[..., Any] | None:
        """The imported analysis hook, or None for Agently's default analysis."""
        return resolve_hook(self.analysis) if self.analysis else None

    @property
    def execution_fns(self) -> dict[str, Callable[..., Any]]:
        """The imported execution hooks by strategy name."""
        return {name: resolve_hook(ref) for name, ref in self.execution.items()}


Bounding = Annotated[SimpleCut | KeepLast | Summarize | HookBounding, Field(discriminator="strategy")]


class Inject(StrictModel):
    """What the gateway puts into the request it forwards (only when it has a session id)."""

    context_window: bool = True
    """Insert the session's context window after the system message(s), before the new messages."""
    memo: bool = True
    """Inject the memo when it is not null."""
    memo_placement: Literal["user_section", "system"] = "user_section"
    """``user_section``: a ``[CHAT SESSION MEMO]:`` section in the final user message, rendered
    and placed as Agently does (after INFO and extra sections, before INSTRUCT/INPUT/OUTPUT);
    ``system``: an extra system message."""


class ToolRecording(StrictModel):
    """What is recorded of tool calls and results (under ``null`` keys)."""

    arguments: Literal["keep", "redact", "drop"] = "keep"
    """``keep``: the call's arguments as sent; ``redact``: the call is kept with its name and id,
    its arguments replaced by ``{"redacted": true}``; ``drop``: calls and their results are not
    recorded at all (the round keeps its text)."""
    results: Literal["keep", "redact", "drop"] = "keep"
    """``keep``: tool results as sent; ``redact``: the result message is kept (so the sequence
    stays valid) with its content replaced by ``[redacted tool result]``; ``drop``: results are
    not recorded, and neither are the calls they answer (a call without its result would make an
    invalid history)."""
    reasoning: Literal["keep", "drop"] = "keep"
    """``keep``: the model's thinking that came with its tool calls (Anthropic's ``thinking`` and
    ``redacted_thinking`` blocks, signatures included) is recorded with the calls and injected
    back before them, as Anthropic requires to continue a tool call made with thinking on;
    ``drop``: not recorded (a client that sends only its tool result then gets the provider's
    400 while thinking is on). Recorded only while ``arguments`` is ``keep``: thinking may
    restate what a redacted or dropped call held."""

    def recorded(self) -> dict[str, str]:
        """What is recorded in effect, by the rules above (``gateway.session.structured`` applies
        them): a ``drop`` of arguments or results drops calls, results and reasoning; reasoning
        is kept only while arguments are kept."""
        if "drop" in (self.arguments, self.results):
            return {"arguments": "drop", "results": "drop", "reasoning": "drop"}
        return {"arguments": self.arguments, "results": self.results,
                "reasoning": self.reasoning if self.arguments == "keep" else "drop"}


class MediaRecording(StrictModel):
    """What happens to media parts (images, files) in recorded history (under ``null`` keys)."""

    parts: Literal["keep", "placeholder", "drop"] = "placeholder"
    """``keep``: the part is recorded (encrypted like the rest) and injected back;
    ``placeholder`` (default): a text part saying what was there, for example
    ``[image: image/png, 12345 bytes, sha256 3f2a…]``, so the model never sees a history that
    silently lost a part; ``drop``: the part is left out."""
    max_bytes: Annotated[int, Field(ge=0)] = 1_048_576
    """Largest media part kept under ``keep`` (its URL or data, in bytes); a larger one is
    recorded as its placeholder."""


class SessionPolicy(StrictModel):
    """What is recorded for each round and how the session's window is kept bounded
    (Agently's ``session_settings`` plus the gateway's bounding and injection)."""

    input_keys: list[Key] | None
    """Required. null: record the full text of the round's new input. A list: record one
    ``[key]:`` block per key found in the request, in order; ``[]`` records no user message."""
    reply_keys: list[Key] | None
    """Required. null: record the whole reply text. A list: record one block per key found in
    the reply parsed as JSON; ``[]`` records no assistant message."""
    max_length: Annotated[int, Field(ge=1)] | None = 12000
    """Bound of the context window in characters; null: never bounded (Agently's default)."""
    bounding: Bounding = Field(default_factory=lambda: SimpleCut(strategy="simple_cut"))
    """Strategy run when the window is longer than ``max_length``: ``simple_cut`` (default),
    ``keep_last``, ``summarize`` or ``hook``, selected by ``strategy``."""
    inject: Inject = Field(default_factory=Inject)
    """What to inject into forwarded requests."""
    tools: ToolRecording = Field(default_factory=lambda: ToolRecording())
    """Under ``null`` keys: what is recorded of tool calls (an assistant's ``tool_calls``,
    Anthropic's ``tool_use`` blocks, Responses' ``function_call`` and ``custom_tool_call`` items)
    and of the tool results that answer them. They are recorded as structured messages, so the
    injected window is a sequence the provider accepts. A Responses built-in tool's call or result
    item (``mcp_call``, ``local_shell_call_output``, ``computer_call_output`` ...; a
    ``reasoning`` or ``compaction`` item too) is recorded as user content and counts as a result
    here."""
    media: MediaRecording = Field(default_factory=lambda: MediaRecording())
    """Under ``null`` keys: what happens to images and files in recorded history."""


class RedactRule(StrictModel):
    """One export redaction rule, applied to the recorded block of ``key``."""

    key: Key
    """A key this policy records (one of ``input_keys`` or ``reply_keys``, written the same),
    or ``"*"``: free text (keys were null) and blocks that no rule names."""
    action: Literal["keep", "drop", "mask", "hash"]
    """``keep``: export as recorded; ``drop``: leave the block out; ``mask``: replace its value
    with a fixed mask; ``hash``: replace it with a keyed per-tenant pseudonym, so equal values
    can still be joined."""


class Export(StrictModel):
    """How auditors' exports of this policy's records are redacted."""

    redact: list[RedactRule] = Field(default_factory=list)
    """Rules by key; the first rule for a key wins; keys no rule names follow the ``"*"`` rule,
    or are exported as recorded when there is none."""
    detectors: dict[Literal["iban", "card", "email", "phone"], Literal["mask", "hash"]] = \
        Field(default_factory=dict)
    """PII detectors run on what is kept, after the rules: each hit is replaced by a typed
    placeholder (``mask``) or by its pseudonym (``hash``), e.g. ``{email: hash, card: mask}``."""


class Retention(StrictModel):
    """How long records made under this policy are kept."""

    days: Annotated[int, Field(ge=1)] | None = None
    """Days after which records are deleted; null: kept until deleted explicitly."""


class Policy(StrictModel):
    """A recording policy: one per YAML file. Every request gets exactly one policy: among
    those whose ``match`` matches, the highest ``priority`` wins."""

    id: PolicyId
    """Unique id across the policy folder; recorded with every round."""
    description: str = ""
    """What the policy is for, in a sentence, for the people who review it."""
    priority: int = 0
    """Higher wins. Two policies that can match the same request may not share a priority."""
    match: Match = Field(default_factory=Match)
    """Which requests the policy applies to; omitted: all (a catch-all)."""
    session: SessionPolicy
    """What to record and how to bound and inject the session."""
    export: Export = Field(default_factory=Export)
    """Redaction applied to exports."""
    retention: Retention = Field(default_factory=Retention)
    """How long records are kept."""

    _source: Path | None = PrivateAttr(default=None)

    @property
    def source(self) -> Path | None:
        """The file the policy was loaded from (None when built in code)."""
        return self._source

    @cached_property
    def version_hash(self) -> str:
        """SHA-256 hex of the canonical JSON of the validated policy (see module docstring)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def __hash__(self) -> int:
        return hash((self.id, self.version_hash))

    @property
    def session_settings(self) -> dict[str, Any]:
        """Agently's ``session_settings`` for sessions under this policy (for its JSON form)."""
        session = self.session
        return {"max_length": session.max_length, "input_keys": session.input_keys,
                "reply_keys": session.reply_keys}

    @property
    def records_nothing(self) -> bool:
        """True when no message is ever recorded (``input_keys: []`` and ``reply_keys: []``):
        rounds leave only audit metadata."""
        return self.session.input_keys == [] and self.session.reply_keys == []

    @cached_property
    def input_paths(self) -> list[KeyPath] | None:
        """``session.input_keys`` compiled, or None to record the full new input."""
        return _compile(self.session.input_keys)

    @cached_property
    def reply_paths(self) -> list[KeyPath] | None:
        """``session.reply_keys`` compiled, or None to record the whole reply."""
        return _compile(self.session.reply_keys)


def _compile(keys: list[str] | None) -> list[KeyPath] | None:
    from gateway.paths import compile_key

    return None if keys is None else [compile_key(key) for key in keys]
