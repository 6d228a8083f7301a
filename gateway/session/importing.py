"""An import is held to the session's policy: it may only bring what recording could have written.

``hold_to_policy(full_context, state, policy)`` is a pure check run on a parsed Agently session
(``session.model.from_agently``) before anything is stored. The policy is the one that matches
the tenant, session id and model at import time (:func:`session_policy`, below).

- Under a policy with ``input_keys: null`` and ``reply_keys: null`` any text goes (the whole
  text is what recording writes), and the structure recording keeps there is held to the
  policy's ``tools`` and ``media`` settings (``session.structured``): no tool calls or results
  under ``drop``, only the redaction marker as a call's arguments or a result under ``redact``,
  a call's thinking only under ``reasoning: keep`` with ``arguments: keep``, and a media part
  only under ``media.parts: keep`` and within its ``max_bytes`` (recording writes a
  placeholder, or nothing, otherwise).
- Otherwise every message the import adds to ``full_context``, and every message of
  ``context_window`` that the session does not already hold, must be in *recorded form*:
  a ``user`` message under keyed ``input_keys`` (an ``assistant`` message under keyed
  ``reply_keys``) must pass ``session.whitelist.in_recorded_form``; ``[]`` allows no message of
  that role. A role whose keys are null takes any text
  content. Recording writes no other role, so any other role is refused.
- A memo only under a policy with both key lists null: a memo is free text the whitelist cannot
  vet, so under a keyed policy the import must have none (``session.whitelist.memo_allowed``).
- ``session_settings`` are not taken from the document: the state gets the policy's own
  (built from the policy, as a recorded round would set them).

Raises ``ImportNotWhitelisted`` (422) naming the field and index, never the content.

Before that, ``check_document`` holds the document to Agently's session form (its fields are
:data:`DOCUMENT_FIELDS`, plus ``model``, the request's model for matching the policy): a field
outside it is a 400 naming it, as Agently would load such a document as an empty session.

Which policy: :func:`session_policy` is the one every session write (an import, ``add``/``set``,
a memo write) is held to, ``match(tenant, model, session_id)``. Without a model the answer must
not depend on one: when a policy that matches this tenant and session id only for some models
outranks the policy chosen without a model, the write would be held to the broader policy while
that session's rounds with those models run under the narrower one, which then sends the model
what it would never have recorded. Such a write is refused (400 ``model_required``) saying how
to pass the model. A model it names must be one a round could use (an upstream serves it:
``Upstreams.check_serves``), else 400 ``model_not_found`` as a round gets: a made-up name, or
another case of a served one, would choose a policy no round of the session runs under.
"""

from __future__ import annotations

from dataclasses import replace
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from gateway.errors import BadRequest, ImportNotWhitelisted, InvalidSession
from gateway.policy import Policy, PolicySet
from gateway.session.model import Message, SessionState, is_structured
from gateway.session.record import MEDIA_TYPES
from gateway.session.structured import REDACTED_ARGUMENTS, REDACTED_RESULT, part_size
from gateway.session.whitelist import in_recorded_form, memo_allowed

if TYPE_CHECKING:
    from gateway.upstream import Upstreams

DOCUMENT_FIELDS = ("id", "auto_resize", "full_context", "context_window", "window_context", "memo",
                   "session_settings")
"""The fields of Agently's session JSON (``Session.to_serializable_session_data``; its loader
also reads ``window_context``, an older name of ``context_window``)."""


def check_document(data: dict[str, Any]) -> None:
    """``InvalidSession`` (400) naming the first top-level field of *data* that is neither one of
    :data:`DOCUMENT_FIELDS` nor ``model``: a misspelt ``full_context`` would import nothing."""
    for name in data:
        if name not in DOCUMENT_FIELDS and name != "model":
            raise InvalidSession(
                f"'{name}' is not a field of an Agently session document: it holds "
                f"{', '.join(DOCUMENT_FIELDS[:4])}, memo and session_settings (and 'model', the model to match "
                "the session's policy with)")


def check_not_empty(full_context: list[Message], state: SessionState, stored: list[Message]) -> None:
    """``InvalidSession`` (400) for a document with no message and no memo into a session that
    holds no history: it would only create an empty session."""
    if not full_context and not state.context_window and state.memo is None and not stored:
        raise InvalidSession("the document holds nothing to import: no message in 'full_context' or "
                             "'context_window' and no 'memo'")


def session_policy(policies: PolicySet, tenant: str, model: str | None, session_id: str, *,
                   upstreams: Upstreams, pass_model: str) -> Policy:
    """The policy a session write is held to (see the module docstring). Raises ``BadRequest``
    (``model_not_found``) when no upstream of *upstreams* serves *model*, and ``BadRequest``
    (``model_required``) when *model* is None and a model-restricted policy that matches the
    tenant and session id outranks the one chosen without a model; *pass_model* says how to
    pass one (``?model=``, ``--model``)."""
    if model is not None:
        upstreams.check_serves(model)  # the policy of a model no round can use governs no round
        return policies.match(tenant, model, session_id)
    chosen = policies.match(tenant, None, session_id)
    for policy in policies.policies:  # highest priority first: those before *chosen* all name models
        if policy is chosen:
            break
        if _globs_match(policy.match.tenants, tenant) and _globs_match(policy.match.session_ids, session_id):
            raise BadRequest(
                f"session '{session_id}' is held to policy '{policy.id}' for models "
                f"{', '.join(policy.match.models or ())} and to '{chosen.id}' otherwise: pass the model its "
                f"rounds use ({pass_model}) so that what is written here is held to the policy those rounds "
                "run under", code="model_required")
    return chosen


def _globs_match(globs: list[str] | None, value: str) -> bool:
    return globs is None or any(fnmatchcase(value, glob) for glob in globs)


def is_keyed(policy: Policy) -> bool:
    """True when the policy records by whitelist on either side."""
    return policy.session.input_keys is not None or policy.session.reply_keys is not None


def _check_messages(messages: list[Message], field: str, policy: Policy, *, first: int = 0,
                    stored: list[Message] | None = None) -> None:
    keys = {"user": policy.session.input_keys, "assistant": policy.session.reply_keys}
    for index, message in enumerate(messages):
        if index < first or (stored and message in stored):
            continue  # already recorded by this gateway
        role = message.get("role")
        where = f"'{field}[{index}]'"
        if role not in keys:
            raise ImportNotWhitelisted(
                f"{where} has a role other than user or assistant; under policy '{policy.id}' no other "
                "role is recorded")
        allowed = keys[role]
        if allowed is None:
            continue
        content = message.get("content")
        if not in_recorded_form(content, allowed):
            listed = ", ".join(allowed) if allowed else "none"
            raise ImportNotWhitelisted(
                f"{where} ({role}) is not in the form policy '{policy.id}' records: '[key]:' blocks, one per "
                f"line-separated key, of the whitelisted keys only ({listed})")


STRUCTURE_KEYS = ("tool_calls", "tool_call_id", "reasoning", "is_error")


def _bare(message: Message) -> Message:
    """*message* as Agently keeps it: no tool structure, and no content as ``""``."""
    bare = {key: value for key, value in message.items() if key not in STRUCTURE_KEYS}
    if bare.get("content") is None:
        bare["content"] = ""
    return bare


def history_difference(stored: list[Message], full_context: list[Message]) -> str:
    """Where an imported ``full_context`` stops matching the recorded history, in words: the
    first message that differs (and how), or that the document is shorter."""
    for index, (old, new) in enumerate(zip(stored, full_context, strict=False)):
        if old == new:
            continue
        lost = [key for key in STRUCTURE_KEYS if key in old and key not in new]
        if lost and _bare(old) == _bare(new):
            return (f"'full_context[{index}]' lacks the recorded {' and '.join(lost)}: Agently's Session keeps no "
                    "tool calls, so import the gateway's own export of this session, not a copy that went through "
                    "Agently")
        what = "role" if old.get("role") != new.get("role") else "content" if old.get("content") != new.get(
            "content") else "fields"
        return f"'full_context[{index}]' differs from the recorded message in its {what}"
    return (f"the document's full_context has {len(full_context)} messages and the session has recorded "
            f"{len(stored)}: an import starts with the whole recorded history")


def hold_to_policy(full_context: list[Message], state: SessionState, policy: Policy, *,
                   stored: list[Message] | None = None) -> SessionState:
    """Check an import against *policy* (see the module docstring); returns the state to store.

    *stored* is the session's recorded history, of which *full_context* must start with.
    """
    stored = stored or []
    _check_structure(full_context, "full_context", policy, first=len(stored))
    _check_structure(state.context_window, "context_window", policy, stored=stored)
    if not is_keyed(policy):  # the settings are the policy's, whatever the document says (as a round sets them)
        return replace(state, settings=dict(policy.session_settings))
    _check_messages(full_context, "full_context", policy, first=len(stored))
    _check_messages(state.context_window, "context_window", policy, stored=stored)
    if state.memo is not None and not memo_allowed(policy):
        raise ImportNotWhitelisted(
            f"'memo' must be null: policy '{policy.id}' records keyed fields only, and a memo is free text "
            "its whitelist cannot vet")
    return replace(state, settings=dict(policy.session_settings))


def _check_structure(messages: list[Message], field: str, policy: Policy, *, first: int = 0,
                     stored: list[Message] | None = None) -> None:
    """Tool calls, tool results and media parts only as recording would have written them."""
    tools, media = policy.session.tools, policy.session.media
    keyed = is_keyed(policy)
    for index, message in enumerate(messages):
        if index < first or (stored and message in stored):
            continue
        where = f"'{field}[{index}]'"
        if is_structured(message):
            if keyed or "drop" in (tools.arguments, tools.results):
                why = "records keyed fields only" if keyed else "drops tool calls and results (session.tools)"
                raise ImportNotWhitelisted(f"{where} is a tool call or tool result; policy '{policy.id}' {why}")
            if tools.arguments == "redact" and any(_call_text(c) != REDACTED_ARGUMENTS
                                                   for c in message.get("tool_calls") or ()):
                raise ImportNotWhitelisted(
                    f"{where} has tool call arguments; policy '{policy.id}' records them as "
                    f"{REDACTED_ARGUMENTS} (session.tools.arguments: redact)")
            if message.get("reasoning") and (tools.reasoning != "keep" or tools.arguments != "keep"):
                raise ImportNotWhitelisted(
                    f"{where} has the thinking of a tool call; policy '{policy.id}' does not record it "
                    "(session.tools: reasoning is kept only with arguments: keep)")
            if tools.results == "redact" and message.get("role") == "tool" \
                    and message.get("content") != REDACTED_RESULT:
                raise ImportNotWhitelisted(
                    f"{where} is a tool result; policy '{policy.id}' records its content as "
                    f"'{REDACTED_RESULT}' (session.tools.results: redact)")
        content = message.get("content")
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") in MEDIA_TYPES \
                    and (media.parts != "keep" or part_size(part) > media.max_bytes):
                raise ImportNotWhitelisted(
                    f"{where} holds a media part ({part.get('type')}); policy '{policy.id}' records "
                    + ("media parts as a placeholder text" if media.parts == "placeholder" else
                       "no media parts" if media.parts == "drop" else
                       f"media parts of at most {media.max_bytes} bytes")
                    + " (session.media)")


def _call_text(call: dict[str, object]) -> object:
    spec = call.get(str(call.get("type", "function")))
    return spec.get("input" if call.get("type") == "custom" else "arguments") if isinstance(spec, dict) else None
