"""The Responses codec (``POST /v1/responses``, OpenAI's Responses API).

Reading: ``instructions`` is a system message; ``input`` (a string, or a list of items; optional:
a ``prompt`` template or ``instructions`` alone needs none) becomes neutral messages: message
items (``input_text``/``output_text`` parts → text parts, ``input_image`` → ``image_url``
parts, ``input_file`` → ``file`` parts, or the text the model read when its data is text:
``session.structured.text_file_parts``), ``function_call`` and
``custom_tool_call`` items → an assistant message's ``tool_calls`` (a custom call as Chat's
``{"type": "custom", "custom": {"name", "input"}}``), their ``*_output`` items → ``role: tool``.
Any other item (a built-in tool's call or result: ``local_shell_call_output``,
``computer_call_output``, ``mcp_call``, ``file_search_call``, ``mcp_approval_response`` ...;
``reasoning`` and ``compaction`` items; a type the gateway does not know) is something the model
reads: it becomes a user message holding the item as JSON (a screenshot as an image part, for the
media policy; an ``encrypted_content`` or an image's base64 ``result`` as a placeholder with its
size and sha256), marked ``tool_output`` so the policy's ``session.tools.results`` applies to it;
the record never leaves it out and a window never carries a call or result it cannot express.
Such an item is new input, not history (``session.model.carries_history``): a client that
answers a built-in call sends the call with its answer (``refuse_unanswerable``) and still gets
its window.

Injecting: the window goes in as input items (user and assistant messages, tool calls as
``function_call``/``custom_tool_call`` items and their ``*_output`` items) after the client's
leading system or developer items, the memo into the last user item (or as a system item,
``memo_placement: system``).

Gateway-held state (an upstream's ``responses_state: gateway``, the default): without
``X-Session-Id``, a request with ``store`` not false is a round of a *chain*, and a chain is a
session: the first response's id ``resp_<request id>`` is the session id, and each later
response of the chain gets the id ``<session id>_<request id>``. ``previous_response_id`` names
the chain (``NotFound`` when this tenant has no such chain); the gateway injects its history
itself, strips ``previous_response_id`` and sends ``store: false`` upstream, so the provider
holds nothing. With ``store: false`` as well, the chain's history is injected but the response
is not added to the chain (OpenAI would not store it): the round is audited only, its id is the
provider's, and nothing can retrieve or continue it. The ids the client sees are the gateway's
(the upstream's are replaced in the relayed bytes). With ``responses_state: provider``,
``previous_response_id`` and ``store`` go upstream untouched and only ``X-Session-Id`` makes a
session; but the provider holds one namespace for every tenant of its account, so the gateway
keeps which tenant each response id it relayed belongs to (``held_by_provider``: the id of a
JSON reply, or of a stream's ``response.created``/final event, stored by its SHA-256 with the
round, ``provider_responses``) and refuses a ``previous_response_id`` it does not know for the
caller's tenant (``check_references``: 404 ``previous_response_not_found``, the message an
unknown id gets under gateway-held state, which never repeats the id). Objects the request
names by id (files, vector stores, containers, a ``conversation``) are held to the upstream's
``forward_routes`` (``gateway.codecs.references``).

Stream: ``response.completed`` (or ``response.incomplete``/``response.failed``) is the final
event, held back until the round is committed. ``response.completed`` and
``response.incomplete`` (the model stopped at ``max_output_tokens`` or a content filter) complete
a round, as a non-streamed reply of either status does and as Chat's ``finish_reason: length``
does; ``response.failed`` is the provider's error (``upstream_error``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import re
from typing import TYPE_CHECKING, Any

import orjson

from gateway import jsonbody
from gateway.codecs import references, window_plan
from gateway.errors import BadRequest, NotFound, UpstreamError
from gateway.session.model import SessionState, memo_section, with_memo
from gateway.session.record import SYSTEM_ROLES
from gateway.session.structured import media_object, text_file_parts
from gateway.sse import EventAssembler, assistant_message
from gateway.store.base import provider_id_digest

if TYPE_CHECKING:
    from gateway.context import Context
    from gateway.policy import Policy
    from gateway.store.base import StoreReads
    from gateway.upstream import Upstream

Message = dict[str, Any]
FINAL_TYPES = frozenset({"response.completed", "response.incomplete", "response.failed"})
CHAIN_ID = re.compile(r"resp_([0-9a-f]{16})(?:_([0-9a-f]{16}))?")
PREVIOUS_NOT_FOUND = "the previous response was not found for this tenant"
"""The 404 of a ``previous_response_id`` the caller's tenant has no response of, under either
state: it never repeats the id (a client may have sent a secret there by mistake)."""


def chain_of(response_id: str) -> tuple[str, str] | None:
    """``(session id, request id)`` of a response id the gateway minted; None otherwise."""
    match = CHAIN_ID.fullmatch(response_id)
    if match is None:
        return None
    first, later = match.group(1), match.group(2)
    return f"resp_{first}", later or first


CALL_ITEMS = frozenset({"function_call", "custom_tool_call"})
"""Input and output items that are the model's tool calls (``_call``)."""

# --- reading -------------------------------------------------------------------------------

def _part(part: Any) -> Any:
    if not isinstance(part, dict):
        return part
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": part.get("text")}
    if kind == "input_image":
        url = part.get("image_url") or (f"file:{part['file_id']}" if part.get("file_id") else None)
        image: dict[str, Any] = {"url": url}
        if part.get("detail"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        return {"type": "file", "file": {k: v for k, v in part.items() if k != "type"}}
    return part


def _parts(part: Any) -> list[Any]:
    """One input part as neutral parts: an ``input_file`` whose data is text as the text the model
    read (``session.structured.text_file_parts``), any other as one part (``_part``)."""
    neutral = _part(part)
    text = text_file_parts(neutral)
    return [neutral] if text is None else text


def _content(content: Any) -> Any:
    if isinstance(content, list):
        parts = [q for p in content for q in _parts(p)]
        if all(isinstance(p, dict) and p.get("type") == "text" for p in parts) and len(parts) == 1:
            return parts[0]["text"]
        return parts
    return content


def to_messages(body: dict[str, Any]) -> list[Message]:
    """The request as neutral messages (instructions first)."""
    out: list[Message] = []
    if isinstance(body.get("instructions"), str) and body["instructions"]:
        out.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        out.append({"role": "user", "content": items})
        return out
    for item in items or ():
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if kind == "message" or (kind is None and "role" in item):
            out.append({"role": item.get("role", "user"), "content": _content(item.get("content"))})
        elif kind in CALL_ITEMS:
            call = _call(item)
            if out and out[-1].get("role") == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind in ("function_call_output", "custom_tool_call_output"):
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": output if isinstance(output, str)
                        else _content(output) if isinstance(output, list) else jsonbody.dumps(output).decode()})
        else:  # any other item the provider reads: a built-in tool's call or result, reasoning ...
            out.append({"role": "user", "content": _other_item(item), "tool_output": True})
    return out


OPAQUE_FIELDS = {"encrypted_content": "encrypted content", "result": "image"}
"""Members of an input item that hold an opaque blob (``reasoning``/``compaction``'s
``encrypted_content``, an ``image_generation_call``'s base64 ``result``): recorded as a
placeholder with their size and sha256 (:func:`_opaque`), never the blob."""


def _other_item(item: dict[str, Any]) -> Any:
    """An input item that is neither a message nor a function or custom tool call or result (a
    built-in tool's call or result: ``mcp_call``, ``file_search_call``, ``local_shell_call_output``
    ...; ``reasoning``, ``compaction``; a type the gateway does not know) as user content: the
    item as JSON text, its opaque blobs as placeholders (:data:`OPAQUE_FIELDS`), and a screenshot
    (``computer_call_output``) as an image part beside it, for the media policy."""
    kind = item.get("type")
    blobs = {key: _opaque(label, item[key]) for key, label in OPAQUE_FIELDS.items()
             if isinstance(item.get(key), str) and (key != "result" or kind == "image_generation_call")}
    item = {**item, **blobs} if blobs else item
    output = item.get("output")
    if isinstance(output, dict) and output.get("type") == "computer_screenshot" and output.get("image_url"):
        rest = {**item, "output": {k: v for k, v in output.items() if k != "image_url"}}
        return [{"type": "text", "text": jsonbody.dumps(rest).decode()},
                {"type": "image_url", "image_url": {"url": output["image_url"]}}]
    return jsonbody.dumps(item, default=str).decode()


def _opaque(label: str, value: str) -> str:
    """``[image: 12345 bytes, sha256 3f2a…]``: an opaque blob as media placeholders put it
    (``session.structured.placeholder``): an image's size and sha256 of its base64-decoded bytes,
    encrypted content's of the text as sent (what a client holding it can hash)."""
    raw = value.encode("utf-8", "surrogatepass")
    if label == "image":
        with contextlib.suppress(binascii.Error, ValueError):
            raw = base64.b64decode(value, validate=True)
    return f"[{label}: {len(raw)} bytes, sha256 {hashlib.sha256(raw).hexdigest()}]"


# --- writing -------------------------------------------------------------------------------

def _out_part(part: Any, role: str) -> Any:
    if not isinstance(part, dict):
        return part
    if part.get("type") == "text":
        return {"type": "output_text" if role == "assistant" else "input_text", "text": part.get("text")}
    if part.get("type") == "image_url":
        image = media_object(part.get("image_url"), "url")
        url = image.get("url")
        if isinstance(url, str) and url.startswith("file:"):  # an image by file id (``_part``)
            return {"type": "input_image", "file_id": url[5:], "detail": image.get("detail", "auto")}
        return {"type": "input_image", "image_url": url, "detail": image.get("detail", "auto")}
    return part


def to_items(messages: list[Message]) -> list[dict[str, Any]]:
    """Neutral messages as Responses input items."""
    items: list[dict[str, Any]] = []
    custom: set[Any] = set()  # ids of custom calls: their results are custom_tool_call_output
    for m in messages:
        role = str(m.get("role"))
        if role == "tool":
            result = m.get("content")
            output = [_out_part(p, "user") for p in result] if isinstance(result, list) else result
            kind = "custom_tool_call_output" if m.get("tool_call_id") in custom else "function_call_output"
            items.append({"type": kind, "call_id": m.get("tool_call_id"), "output": output or ""})
            continue
        content = m.get("content")
        if content not in (None, "", []):
            if isinstance(content, list):
                content = [_out_part(p, role) for p in content]
            items.append({"role": role, "content": content})
        for call in m.get("tool_calls") or ():
            if call.get("type") == "custom":
                spec = call.get("custom") or {}
                custom.add(call.get("id"))
                items.append({"type": "custom_tool_call", "call_id": call.get("id"), "name": spec.get("name"),
                              "input": spec.get("input") if isinstance(spec.get("input"), str) else ""})
                continue
            fn = call.get("function") or {}
            items.append({"type": "function_call", "call_id": call.get("id"), "name": fn.get("name"),
                          "arguments": fn.get("arguments") if isinstance(fn.get("arguments"), str)
                          else orjson.dumps(fn.get("arguments")).decode()})
    return items


BUILT_IN_ANSWERS = frozenset({"mcp_approval_response"})
"""Items answering a built-in tool's item by id, besides every ``*_output`` item but function and
custom tool results: ``computer_call_output``, ``local_shell_call_output`` and the like."""


def refuse_unanswerable(items: list[Any]) -> None:
    """``BadRequest`` for the first item of *items* (a request's input, about to follow an injected
    window) that answers a built-in tool's call (``computer_call``, ``local_shell_call``,
    ``mcp_approval_request`` ...) not among *items* itself. The window keeps messages and
    function calls, never a built-in tool's call items, so the model would get an answer without
    its call: the provider refuses that ("no tool call found"), after the gateway has injected a
    turn with the call left out. The client can send the call with its answer, or keep the
    conversation at the provider."""
    def answers(item: Any) -> str | None:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind in BUILT_IN_ANSWERS:
            return str(item.get("approval_request_id"))
        if isinstance(kind, str) and kind.endswith("_output") and kind not in (
                "function_call_output", "custom_tool_call_output"):
            return str(item.get("call_id"))
        return None

    own = {str(v) for item in items if isinstance(item, dict) and answers(item) is None
           for v in (item.get("call_id"), item.get("id")) if v is not None}
    for i, item in enumerate(items):
        if (ref := answers(item)) is not None and ref not in own:
            raise BadRequest(
                f"'input[{i}]' ({item['type']}) answers a built-in tool's call that is not in this request, and the "
                "session's window cannot carry it (it keeps messages and function calls only): send the call item "
                "(with the reasoning item before it, if any) in 'input' before its answer, or use an upstream whose "
                "responses_state is provider", code="tool_call_not_in_window")


def _memo_into(item: dict[str, Any], memo: Any) -> dict[str, Any]:
    content = item.get("content")
    if isinstance(content, list):
        for i, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "input_text" and isinstance(part.get("text"), str):
                return {**item, "content": [*content[:i], {**part, "text": with_memo(part["text"], memo)},
                                            *content[i + 1:]]}
        return {**item, "content": [{"type": "input_text", "text": memo_section(memo)}, *content]}
    return {**item, "content": with_memo(content, memo)}


class ResponsesAssembler(EventAssembler):
    """Builds the assistant message of a Responses stream from its events."""

    final_types = FINAL_TYPES

    def __init__(self, max_bytes: int | None = None) -> None:
        super().__init__(max_bytes)
        self.id: str | None = None
        self.final: dict[str, Any] | None = None
        self.final_type = ""
        self.text: list[str] = []
        self.calls: dict[str, dict[str, Any]] = {}
        self.created: dict[str, Any] = {}

    def on_event(self, ev: dict[str, Any]) -> bool:
        """``response.completed``, ``.incomplete`` or ``.failed`` is the final event."""
        kind = ev.get("type")
        seq = ev.get("sequence_number")
        if type(seq) is int:
            self.last_seq = seq
        response = ev.get("response")
        if isinstance(response, dict):
            self.id = self.id or response.get("id")
            if kind == "response.created":
                self.created = response
            if kind in FINAL_TYPES:
                self.final = response
        if kind in FINAL_TYPES:
            self.final_type = str(kind)
        if self.truncated:
            return kind in FINAL_TYPES
        if kind in ("response.output_text.delta", "response.refusal.delta") and isinstance(ev.get("delta"), str):
            self.text.append(ev["delta"])
        elif kind == "response.output_item.done" and isinstance(ev.get("item"), dict):
            item = ev["item"]
            if item.get("type") in CALL_ITEMS:
                self.calls[str(item.get("id") or item.get("call_id"))] = item
        return kind in FINAL_TYPES

    @property
    def finished(self) -> bool:
        return bool(self.final_type)

    @property
    def completed(self) -> bool:
        return self.final_type in ("response.completed", "response.incomplete")

    def message(self) -> Message:
        return assistant_message(self.text, [_call(item) for item in self.calls.values()])

    def response(self) -> dict[str, Any]:
        if self.final is not None and not self.truncated:
            return self.final
        return {**self.created, "id": self.id, "object": "response", "status": "incomplete"}


def _call(item: dict[str, Any]) -> dict[str, Any]:
    """A ``function_call`` or ``custom_tool_call`` item as a neutral (Chat) tool call."""
    if item.get("type") == "custom_tool_call":
        return {"id": item.get("call_id"), "type": "custom",
                "custom": {"name": item.get("name"), "input": item.get("input", "")}}
    return {"id": item.get("call_id"), "type": "function",
            "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}


def reply_message(body: dict[str, Any]) -> Message:
    """The assistant message of a ``response`` object: its output text and function calls."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for item in body["output"]:
        if item.get("type") == "message":
            for p in item.get("content") or ():
                if p.get("type") == "output_text":
                    texts.append(p.get("text", ""))
                elif p.get("type") == "refusal":  # shown to the client instead of text
                    texts.append(p.get("refusal", ""))
        elif item.get("type") in CALL_ITEMS:
            calls.append(_call(item))
    return assistant_message(texts, calls)


class ResponsesCodec:
    name = "responses"
    protocol = "openai"
    upstream_path = "/responses"

    def check(self, body: dict[str, Any]) -> None:
        from gateway.stages.parse_request import check_flags, check_model, require_model

        items = body.get("input")
        if isinstance(items, list):
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    raise BadRequest(f"'input[{i}]' must be an object (an input item)", code="invalid_input")
                if "role" in item and item.get("type", "message") in ("message", None) \
                        and not isinstance(item.get("content"), (str, list)):  # as to_messages reads a message
                    raise BadRequest(f"'input[{i}].content' must be a string or a list of content parts",
                                     code="invalid_content")
        elif items is not None and not isinstance(items, str):  # optional: a prompt template, instructions
            raise BadRequest("'input' must be a string or a list of input items", code="invalid_input")
        if body.get("instructions") is not None and not isinstance(body["instructions"], str):
            raise BadRequest("'instructions' must be a string", code="invalid_instructions")
        prev = body.get("previous_response_id")
        if prev is not None and not isinstance(prev, str):
            raise BadRequest("'previous_response_id' must be a string", code="invalid_previous_response_id")
        if body.get("prompt") is None:  # a prompt template may name the model itself
            require_model(body)
        check_model(body.get("model"))
        check_flags(body)

    def messages(self, body: dict[str, Any]) -> list[Message]:
        return to_messages(body)

    def implied_session(self, ctx: Context) -> tuple[str | None, str]:
        if _state_mode(ctx) != "gateway":
            return None, ""
        prev = ctx.body.get("previous_response_id")
        if isinstance(prev, str):
            chain = chain_of(prev)
            if chain is None:
                raise NotFound(PREVIOUS_NOT_FOUND, code="previous_response_not_found")
            if ctx.body.get("store") is False:  # continues the chain, is not kept in it (as OpenAI keeps nothing)
                return chain[0], ""
            return chain[0], f"{chain[0]}_{ctx.request_id}"
        if ctx.body.get("store") is False:
            return None, ""
        return f"resp_{ctx.request_id}", f"resp_{ctx.request_id}"

    def forward_body(self, ctx: Context, policy: Policy | None, state: SessionState | None) -> bytes | None:
        body = prepare_body(ctx, ctx.body)
        if state is None or policy is None:
            return jsonbody.dumps(body) if body is not ctx.body else None
        opts = policy.session.inject
        window, add_memo = window_plan(ctx.messages, state, window=opts.context_window, memo=opts.memo)
        if not window and not add_memo:
            return jsonbody.dumps(body) if body is not ctx.body else None
        items = body.get("input")
        items = [{"role": "user", "content": items}] if isinstance(items, str) else list(items or ())
        if window:
            refuse_unanswerable(items)
        head = 0
        while head < len(items) and items[head].get("role") in SYSTEM_ROLES:
            head += 1
        system, rest = items[:head], items[head:]
        if add_memo and opts.memo_placement == "system":
            system.append({"role": "system", "content": memo_section(state.memo)})
        elif add_memo:
            for i in range(len(rest) - 1, -1, -1):
                if rest[i].get("role") == "user":
                    rest[i] = _memo_into(rest[i], state.memo)
                    break
        return jsonbody.dumps({**body, "input": system + to_items(window) + rest})

    async def check_references(self, ctx: Context) -> None:
        """Account-wide objects named by id only where the upstream forwards their routes
        (``gateway.codecs.references``); under provider-held state, a ``previous_response_id``
        only when it is one of this tenant's (one primary-key lookup, made only then)."""
        assert ctx.upstream is not None
        await check_references(ctx.body, ctx.upstream, ctx.tenant, ctx.services.sessions.store)

    def held_by_provider(self, ctx: Context) -> tuple[str, ...]:
        """Under provider-held state, the id of the response the provider now keeps (unless the
        request said ``store: false``): the reply's, or the stream's first response event's."""
        up = ctx.upstream
        if up is None or up.responses_state != "provider" or ctx.body.get("store") is False:
            return ()
        rid = ctx.reply_body.get("id") if ctx.reply_body is not None else None
        return (rid,) if isinstance(rid, str) and rid else ()

    def parse_reply(self, body: Any) -> Message:
        try:
            return reply_message(body)
        except (KeyError, TypeError, AttributeError) as exc:
            raise UpstreamError("upstream sent a reply that is not a response object",
                                code="bad_upstream_reply") from exc

    def failed(self, body: dict[str, Any]) -> bool:
        """A response object whose ``status`` is ``failed`` (as a stream's ``response.failed``)."""
        return body.get("status") == "failed"

    def refused(self, body: dict[str, Any] | None) -> bool:
        """A ``refusal`` part is an answer the conversation may go on from, as in Chat."""
        return False

    def assembler(self, max_bytes: int | None) -> ResponsesAssembler:
        return ResponsesAssembler(max_bytes)

    def reply_prefix(self, prefix: bytes) -> str | None:
        return None

    def error_body(self, body: dict[str, Any], status: int) -> dict[str, Any]:
        return body

    def stream_error(self, body: dict[str, Any], after: int | None = None) -> bytes:
        """The ``error`` event, numbered after the last event the client got (*after*)."""
        err = body.get("error") or {}
        event = {"type": "error", "code": err.get("code"), "message": err.get("message"), "param": None,
                 "sequence_number": after + 1 if after is not None else 0}
        return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"


def prepare_body(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
    """Under gateway-held state, what goes upstream: no ``previous_response_id``, ``store: false``,
    and no provider-held ``conversation`` (refused: the provider holds nothing then).
    A ``background`` request on a recorded session is refused: its output arrives after this
    request (the client polls for it), where the gateway cannot record it, and under gateway-held
    state it would go upstream with ``store: false``, which background mode does not accept."""
    if ctx.session_id is not None and body.get("background") is True:
        raise BadRequest("'background' responses cannot be recorded: their output arrives after this request, "
                         "outside the gateway. Send it without 'background', or without a session: no X-Session-Id, "
                         "to an upstream whose responses_state is provider",
                         code="background_not_supported")
    if _state_mode(ctx) != "gateway":
        return body
    if body.get("conversation") is not None:
        raise BadRequest("'conversation' keeps the conversation at the provider, and this upstream's conversations "
                         "are held by the gateway (responses_state: gateway): continue with "
                         "previous_response_id or X-Session-Id instead", code="conversation_not_supported")
    return {**{k: v for k, v in body.items() if k != "previous_response_id"}, "store": False}


async def check_references(body: dict[str, Any], upstream: Upstream, tenant: str, store: StoreReads) -> None:
    """Refuse a Responses body (``POST /v1/responses``, or one forwarded below it:
    ``input_tokens``, ``compact``) that names account-wide objects the upstream does not forward
    (``Forbidden``, ``gateway.codecs.references``) or, under provider-held state, a
    ``previous_response_id`` that is not one of *tenant*'s (``NotFound``, :data:`PREVIOUS_NOT_FOUND`)."""
    references.refuse(references.references_responses(body), upstream)
    prev = body.get("previous_response_id")
    if upstream.responses_state == "provider" and isinstance(prev, str) and \
            not await store.holds_provider_response(tenant, provider_id_digest(prev)):
        raise NotFound(PREVIOUS_NOT_FOUND, code="previous_response_not_found")


def _state_mode(ctx: Context) -> str:
    up = ctx.services.upstreams.route(ctx.model, ctx.codec.protocol)
    return getattr(up, "responses_state", "gateway")


RESPONSES = ResponsesCodec()
