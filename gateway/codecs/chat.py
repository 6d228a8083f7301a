"""The Chat Completions codec (``POST /v1/chat/completions``): the neutral form is this
protocol's own (but for a ``file`` part holding text, read as its text), so reading the request
and injecting the window are the identity and
``session.model.inject``; a stream ends with ``data: [DONE]``, held back until the round is
committed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from gateway import jsonbody
from gateway.codecs import references
from gateway.errors import BadRequest, UpstreamError
from gateway.session.model import SessionState
from gateway.session.model import inject as inject_messages
from gateway.session.structured import is_text_file, text_file_parts
from gateway.sse import ReplyAssembler, part_text

if TYPE_CHECKING:
    from gateway.context import Context
    from gateway.policy import Policy

Message = dict[str, Any]


class ChatAssembler(ReplyAssembler):
    """``ReplyAssembler`` with the codec's end-of-stream view: a finish reason ends it."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def completed(self) -> bool:
        return True  # a chat stream that ended (``[DONE]`` or a finish reason) is a completed reply


class ChatCodec:
    name = "chat"
    protocol = "openai"
    upstream_path = "/chat/completions"

    def check(self, body: dict[str, Any]) -> None:
        from gateway.stages.parse_request import check_chat, require_model

        check_chat(body)
        require_model(body)

    def messages(self, body: dict[str, Any]) -> list[Message]:
        """The request's own messages; a ``file`` part whose data is text is read as the text the
        model read (``session.structured.text_file_parts``), in a copy: the body is sent as is."""
        messages: list[Message] = body["messages"]
        for m in messages:  # most messages' content is a string: one type check each
            if type(m) is dict and type(m.get("content")) is list and _has_text_file(m):
                break
        else:
            return messages
        return [{**m, "content": [q for p in m["content"] for q in (text_file_parts(p) or [p])]}
                if _has_text_file(m) else m for m in messages]

    async def check_references(self, ctx: Context) -> None:
        """A ``file`` part naming a file by id only where the upstream forwards ``files``."""
        assert ctx.upstream is not None
        references.refuse(references.references_chat(ctx.body), ctx.upstream)

    def held_by_provider(self, ctx: Context) -> tuple[str, ...]:
        return ()  # a stored chat completion is read only by /v1/chat/completions/{id}, never forwarded

    def implied_session(self, ctx: Context) -> tuple[str | None, str]:
        return None, ""

    def forward_body(self, ctx: Context, policy: Policy | None, state: SessionState | None) -> bytes | None:
        check_choices(ctx, policy)
        check_store(ctx)
        if state is None or policy is None:
            return None
        opts = policy.session.inject
        messages = ctx.body["messages"]
        new = inject_messages(messages, state, window=opts.context_window, memo=opts.memo,
                              memo_placement=opts.memo_placement, encoded=True)
        return jsonbody.dumps({**ctx.body, "messages": new}) if new is not messages else None

    def parse_reply(self, body: Any) -> Message:
        """Choice 0's message, its members of the types a chat completion has (content as text,
        or as text parts, which some compatible providers send, read as their text); anything
        else is a ``bad_upstream_reply`` (502) rather than a record that fails or holds garbage."""
        try:
            message = body["choices"][0]["message"]
            content = message.get("content")
            if isinstance(content, list):
                message = {**message, "content": part_text(content)}
            elif content is not None and not isinstance(content, str):
                raise TypeError("content")
            calls = message.get("tool_calls")
            if calls is not None and not (isinstance(calls, list) and all(map(_well_typed_call, calls))):
                raise TypeError("tool_calls")
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise UpstreamError("upstream sent a reply that is not a chat completion",
                                code="bad_upstream_reply") from exc
        return message  # type: ignore[no-any-return]

    def failed(self, body: dict[str, Any]) -> bool:
        """A chat completion never reports a failure in a 200 reply."""
        return False

    def refused(self, body: dict[str, Any] | None) -> bool:
        """A ``refusal`` is an answer the conversation may go on from (OpenAI asks nothing else)."""
        return False

    def assembler(self, max_bytes: int | None) -> ChatAssembler:
        return ChatAssembler(max_bytes=max_bytes)

    def reply_prefix(self, prefix: bytes) -> str | None:
        from gateway.stages.forward import content_prefix

        return content_prefix(prefix)

    def error_body(self, body: dict[str, Any], status: int) -> dict[str, Any]:
        return body

    def stream_error(self, body: dict[str, Any], after: int | None = None) -> bytes:
        return b"data: " + orjson.dumps(body) + b"\n\n"


CHAT = ChatCodec()


def _well_typed_call(call: Any) -> bool:
    """Whether a reply's tool call is an object whose function or custom spec, if any, is one of
    strings."""
    if not isinstance(call, dict):
        return False
    spec = call.get("function", call.get("custom"))
    return spec is None or (isinstance(spec, dict) and all(isinstance(v, str) for k, v in spec.items()
                                                          if k in ("name", "arguments", "input")))


def _has_text_file(message: Any) -> bool:
    content = message.get("content") if isinstance(message, dict) else None
    return isinstance(content, list) and any(is_text_file(p) for p in content)


def check_store(ctx: Context) -> None:
    """Refuse ``store: true`` unless the upstream's conversations are the provider's to hold
    (``responses_state: provider``): a stored chat completion stays at the provider, listed and
    read back with the provider's key, beyond the gateway's encryption, erasure and audit."""
    up = ctx.upstream
    if ctx.body.get("store") is True and up is not None and up.responses_state != "provider":
        raise BadRequest(f"'store: true' would have the provider keep this conversation, outside the gateway's "
                         f"encryption, erasure and audit. Send it without 'store' (or with false); an operator "
                         f"who wants the provider to keep conversations sets responses_state: provider on "
                         f"upstream '{up.name}'", code="store_not_supported")


def check_choices(ctx: Context, policy: Policy | None) -> None:
    """Refuse ``n`` above 1 on a session whose policy records the reply: the client would get
    several replies and a round records one (a session's window continues from one reply)."""
    n = ctx.body.get("n")
    if (ctx.session_id is not None and policy is not None and policy.session.reply_keys != []
            and isinstance(n, int) and not isinstance(n, bool) and n > 1):
        raise BadRequest(f"'n' is {n}: a recorded session records one reply per round, and the client would get "
                         f"{n}, so all but one would go unrecorded. Send n: 1 (or leave it out), or send the request "
                         "without X-Session-Id", code="multiple_choices_not_supported")
