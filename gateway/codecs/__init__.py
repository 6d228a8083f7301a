"""One codec per wire protocol: what differs between Chat Completions, Responses and Messages.

The stages (``gateway.stages``) run the same for every protocol and call ``ctx.codec`` for the
few things that differ. A codec is a stateless object with:

``name``            ``chat``, ``responses`` or ``messages`` (in audit entries and exports)
``protocol``        the upstream protocol it needs (``openai`` or ``anthropic``; see routing)
``upstream_path``   the path sent upstream, relative to the upstream's ``base_url``
``check(body)``     raises ``BadRequest`` when the body is not a request of this protocol
``messages(body)``  the request as protocol-neutral messages: Chat Completions messages
                    (system first, ``tool_calls`` on assistant messages, ``role: tool`` answers,
                    content strings or part lists with ``text`` and ``image_url`` parts)
``implied_session`` a session the request names by itself (a ``previous_response_id`` chain)
                    and the response id the client is shown instead of the upstream's ("" none;
                    a session with no response id is read for its window, the round is not
                    added to it: a ``store: false`` continuation)
``forward_body``    the body sent upstream with the window and memo injected in its own form
                    (None: nothing to inject; the parsed body is sent as parsed)
``check_references`` (async) refuses what the request names at the provider that the client
                    may not reach: an account-wide object whose routes the upstream does not
                    forward (403, ``gateway.codecs.references``), another tenant's provider-held
                    response (404); called by ``inject`` once ``upstream`` is known
``held_by_provider`` the ids of what this round left at the provider for the tenant (a
                    provider-held response), recorded as the tenant's with the round
``parse_reply``     the assistant message (neutral form) of a JSON reply body
``refused``         whether a reply (a JSON body, or what a stream assembled) is a refusal the
                    provider says must not stay in the conversation (Anthropic's
                    ``stop_reason: "refusal"``): the round is recorded, its turn kept out of
                    the window
``assembler``       a fresh stream assembler (``add_event(event)``: True for the final event,
                    held back until the round is committed; ``message()``, ``response()``,
                    ``finished``: the reply says it is over; ``completed``: a stream that ended
                    (its final event or ``finished``) ended as a completed reply)
``reply_prefix``    the reply text in the first bytes of an oversized JSON reply (or None)
``error_body``      an OpenAI-shaped error body in this protocol's shape
``stream_error``    the SSE event that ends a stream with an error in this protocol's shape

The session window is kept in the neutral form, so bounding counts characters the same way for
every protocol; each codec renders the window in its own form when it injects it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from gateway.session.model import SessionState, carries_history

if TYPE_CHECKING:
    from gateway.context import Context
    from gateway.policy import Policy

Message = dict[str, Any]


class Assembler(Protocol):
    """Builds the assistant message a stream amounts to, within a byte budget."""

    truncated: bool
    errored: bool
    id: str | None
    last_seq: int | None

    def add_event(self, event: bytes) -> bool: ...
    def add_oversized(self, head: bytes) -> bool: ...
    def message(self) -> Message: ...
    def response(self) -> dict[str, Any]: ...
    @property
    def finished(self) -> bool: ...
    @property
    def completed(self) -> bool: ...


class Codec(Protocol):
    name: str
    protocol: str
    upstream_path: str

    def check(self, body: dict[str, Any]) -> None: ...
    def messages(self, body: dict[str, Any]) -> list[Message]: ...
    def implied_session(self, ctx: Context) -> tuple[str | None, str]: ...
    def forward_body(self, ctx: Context, policy: Policy | None, state: SessionState | None) -> bytes | None: ...
    async def check_references(self, ctx: Context) -> None: ...
    def held_by_provider(self, ctx: Context) -> tuple[str, ...]: ...
    def parse_reply(self, body: Any) -> Message: ...
    def failed(self, body: dict[str, Any]) -> bool: ...
    def refused(self, body: dict[str, Any] | None) -> bool: ...
    def assembler(self, max_bytes: int | None) -> Assembler: ...
    def reply_prefix(self, prefix: bytes) -> str | None: ...
    def error_body(self, body: dict[str, Any], status: int) -> dict[str, Any]: ...
    def stream_error(self, body: dict[str, Any], after: int | None = None) -> bytes: ...
    """An error event ending a stream; *after*: the last event's sequence number, if numbered."""


def window_plan(messages: list[Message], state: SessionState, *, window: bool,
                memo: bool, tools: bool = True) -> tuple[list[Message], bool]:
    """What to inject, in the neutral form: the normalised window (empty when none is injected:
    the client sent its own history, or the window is empty), its tool calls paired with their
    answers (``SessionState.sendable``; none at all without *tools*), and whether the memo goes
    in. The same rule for every protocol (``session.model.inject``)."""
    add_window = window and bool(state.context_window) and not carries_history(messages)
    add_memo = memo and state.memo is not None
    if not add_window:
        return [], add_memo
    sendable = state.sendable(messages, tools=tools)
    return (state.normalised() if sendable is None else sendable), add_memo


def codec_for_path(path: str) -> Codec:
    """The codec of a model route (Chat Completions for anything else)."""
    from gateway.codecs.chat import CHAT
    from gateway.codecs.messages import MESSAGES
    from gateway.codecs.responses import RESPONSES

    if path.startswith("/v1/messages"):
        return MESSAGES
    if path.startswith("/v1/responses"):
        return RESPONSES
    return CHAT


def by_name(name: str) -> Codec:
    """The codec called *name* (``chat``, ``responses``, ``messages``); KeyError otherwise."""
    from gateway.codecs.chat import CHAT
    from gateway.codecs.messages import MESSAGES
    from gateway.codecs.responses import RESPONSES

    codecs: dict[str, Codec] = {"chat": CHAT, "responses": RESPONSES, "messages": MESSAGES}
    return codecs[name]


def render_error(path: str, body: dict[str, Any], status: int) -> dict[str, Any]:
    """An OpenAI-shaped error *body* in the shape of the protocol served at *path* (for a doubled
    ``/v1/v1/...``, the shape of the path meant: the Anthropic SDK reads Anthropic's)."""
    return codec_for_path(path[3:] if path.startswith("/v1/v1/") else path).error_body(body, status)
