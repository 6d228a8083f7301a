"""Stage: parse_request. Reads the body once; sets ``raw``, ``body``, ``messages`` (the request
in the neutral form, ``ctx.codec.messages``), ``model``, ``stream``. The body is checked by the
codec of the route (a chat, Responses or Messages request).

``raw`` is the body as the client meant it: a ``Content-Encoding`` of ``gzip``, ``deflate`` or
``zstd`` is undone here (``gateway.decompress``), so ``raw`` and everything forwarded from it are
plain bytes and no ``Content-Encoding`` travels upstream.

Refuses with 413 when the body (chunked or not, compressed or not: the limit applies to both the
bytes received and the decoded bytes) is over ``server.max_body_bytes``; with 415 for a coding
it cannot decode; with 400 for a corrupt compressed body, invalid UTF-8, malformed JSON, JSON
nested deeper than ``MAX_JSON_DEPTH``, a body that is not an object, a chat request without a
non-empty ``messages`` list of objects with a ``role`` and a string, part-list or object (or,
on an assistant turn, null) ``content``, or a ``model`` that is not a printable string of at
most ``MAX_MODEL_CHARS`` characters (absent or null too: Chat and Messages require one,
Responses one unless a ``prompt`` template names it; :func:`require_model`). Messages never
quote the body or the model.

Large bodies are decoded and parsed in a worker thread, so one big request never holds up the
event loop (and with it every other client).

orjson reads an integer beyond 64 bits as a float (``gateway.jsonbody``). Looking for one in
every body would cost as much as the parse, so ``inject``, which serialises the body anyway,
looks at its output (``jsonbody.widened``) and, when one may be there, has the body read again
here exactly (:func:`reparse_exact`): ``body`` and ``messages`` then hold the client's integers
as sent, for the forwarded body and the record alike.
"""

from __future__ import annotations

import re
from array import array
from itertools import accumulate

import orjson
from aiohttp import web

from gateway import offload
from gateway.codecs import Codec
from gateway.context import Context
from gateway.decompress import decode_body
from gateway.errors import BadRequest, InvalidJSON, PayloadTooLarge
from gateway.jsonbody import loads_exact

MAX_JSON_DEPTH = 128
MAX_MODEL_CHARS = 256
THREAD_ABOVE_BYTES = 256 * 1024  # bodies larger than this are decoded and parsed off the event loop


async def read_limited(request: web.Request, limit: int, tenant: str) -> bytes:
    """The request body with its ``Content-Encoding`` undone, refused as soon as it passes *limit*
    bytes, as received and as decoded (413). Every route that reads a body reads it here. A large
    compressed body is decoded on the offload pool, as *tenant*'s work (``gateway.offload``).

    Raises ``PayloadTooLarge`` (413), ``UnsupportedEncoding`` (415) or ``CorruptBody`` (400).
    """
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body is {request.content_length} bytes; the limit is {limit}")
    encoding = request.headers.get("Content-Encoding")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not encoding:
        return raw
    if len(raw) > THREAD_ABOVE_BYTES // 4:
        return await offload.run(tenant, decode_body, raw, encoding, limit)
    return decode_body(raw, encoding, limit)


_ESCAPED_BACKSLASH, _ESCAPED_QUOTE = b"\\\\", b'\\"'
_STRING = re.compile(rb'"[^"]*"')
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_SIGN = bytes.maketrans(b"[]{}", b"\x01\xff\x01\xff")


def json_depth(raw: bytes) -> int:
    """How deep the containers of valid JSON text *raw* nest (``{}`` is 1, ``{"a": []}`` is 2).

    Works on the bytes, iteratively and at C speed: escapes are removed (an escaped backslash,
    then an escaped quote, left to right as JSON reads them), then strings, then everything but
    brackets; the depth is the highest running sum of +1 per opening and -1 per closing bracket.
    """
    text = _STRING.sub(b"", raw.replace(_ESCAPED_BACKSLASH, b"").replace(_ESCAPED_QUOTE, b""))
    signs = text.translate(None, _NOT_BRACKET).translate(_BRACKET_SIGN)
    return max(accumulate(array("b", signs)), default=0)


def parse_json_object(raw: bytes, exact: bool = False) -> dict:
    """The body as a JSON object; ``InvalidJSON`` says what is wrong (never quoting the body).

    Containers may nest at most ``MAX_JSON_DEPTH`` deep, so no later step (recording, YAML
    rendering, key lookup, audit) can hit Python's recursion limit on client input. With
    *exact*, the body orjson accepted is read again with integers beyond 64 bits exact
    (``jsonbody.loads_exact``); what orjson refuses stays refused.
    """
    if not raw:
        raise InvalidJSON("request body is empty; send a JSON object")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJSON(f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth" in exc.msg.lower() or "recursion" in exc.msg.lower():  # orjson stops at 1024
            raise InvalidJSON(f"request body nests deeper than {MAX_JSON_DEPTH} levels") from None
        raise InvalidJSON(f"request body is not valid JSON: {exc.msg} at line {exc.lineno} "
                          f"column {exc.colno}") from None
    if not isinstance(body, dict):
        raise InvalidJSON("request body must be a JSON object")
    if (raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH) and json_depth(raw) > MAX_JSON_DEPTH:
        raise InvalidJSON(f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    return loads_exact(raw) if exact else body


def check_model(model: object) -> None:
    """``model`` is absent/null or a printable string of at most ``MAX_MODEL_CHARS`` characters
    (no control or format characters), checked before anything logs or audits it."""
    if model is None:
        return
    if not isinstance(model, str):
        raise BadRequest("'model' must be a string", code="invalid_model")
    if not model or len(model) > MAX_MODEL_CHARS:
        raise BadRequest(f"'model' must be 1 to {MAX_MODEL_CHARS} characters long", code="invalid_model")
    if not model.isprintable():
        raise BadRequest("'model' must be printable text (no control characters)", code="invalid_model")


FLAGS = ("stream", "store", "background")
"""Fields the gateway decides on (how the reply comes, whether the provider keeps it): true,
false or null, nothing a lenient upstream would read otherwise ("true", 1)."""


def check_flags(body: dict) -> None:
    """Refuse a flag (:data:`FLAGS`) that is not a JSON boolean, and an ``n`` that is not a
    whole number: the gateway's checks read them as sent, and a server that coerces ``"true"``
    or ``2.0`` would act on what the gateway let through (two replies to a round that records
    one, a stored or background response on a recorded session)."""
    for name in FLAGS:
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            raise BadRequest(f"'{name}' must be true or false (a JSON boolean, not a string or a number)",
                             code=f"invalid_{name}")
    n = body.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool)):
        raise BadRequest("'n' must be a whole number (a JSON integer such as 1)", code="invalid_n")


def require_model(body: dict) -> None:
    """``BadRequest`` (``missing_model``) when a model route's body names no model (absent or
    null): the provider needs one, and the gateway routes by it (``upstreams[].models``), so a
    request without one would go to whichever upstream comes first."""
    if body.get("model") is None:
        raise BadRequest("'model' is required: the name of the model to run, as a string",
                         code="missing_model")


NULL_CONTENT_ROLES = frozenset({"assistant", "function"})
"""Chat roles whose ``content`` may be null or absent: an assistant turn that is only tool calls
(or a refusal, or audio, echoed back as history), and the legacy ``function`` result."""


def check_content(content: object, where: str, role: str) -> None:
    """``BadRequest`` (``invalid_content``) unless a Chat message's *content* is a string, a list
    of content part objects, an object (Agently's ``agent.input({...})`` sends one: the structured
    input, recorded as such), or null on a role that allows it (:data:`NULL_CONTENT_ROLES`).
    OpenAI's API refuses anything else too; a number or a boolean would otherwise reach the model
    as the provider reads it and be recorded as the gateway reads it, two different texts."""
    if isinstance(content, (str, dict)) or (content is None and role in NULL_CONTENT_ROLES):
        return
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise BadRequest(f"'{where}.content[{j}]' must be a content part object (such as "
                                 "{\"type\": \"text\", \"text\": ...})", code="invalid_content")
        return
    if content is None:
        raise BadRequest(f"'{where}.content' is required for a '{role[:32]}' message: a string or a list of "
                         "content parts", code="invalid_content")
    raise BadRequest(f"'{where}.content' must be a string or a list of content parts, not a JSON "
                     f"{_json_type(content)}", code="invalid_content")


def _json_type(value: object) -> str:
    """The JSON name of a scalar's type (never the value: it may be content)."""
    return "boolean" if isinstance(value, bool) else "number"


def check_chat(body: dict) -> None:
    """A Chat Completions request as the gateway reads it: a non-empty ``messages`` list of
    objects with a string ``role`` and a content :func:`check_content` takes, a ``model`` that
    is absent or printable, and boolean flags. ``model`` is required on the wire
    (``ChatCodec.check`` adds :func:`require_model`), not in a policy test case or explain."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' is required: a non-empty list of chat messages", code="missing_messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"'messages[{i}]' must be an object with a string 'role'", code="invalid_messages")
        check_content(m.get("content"), f"messages[{i}]", m["role"])
    check_model(body.get("model"))
    check_flags(body)


def parse_for(codec: Codec, raw: bytes, exact: bool = False) -> tuple[dict, list[dict]]:
    """A request body of *codec*'s protocol, parsed and checked, and its neutral messages
    (integers beyond 64 bits exact with *exact*: :func:`parse_json_object`)."""
    body = parse_json_object(raw, exact)
    codec.check(body)
    return body, codec.messages(body)


async def parse_request(ctx: Context) -> None:
    ctx.raw = await read_limited(ctx.request, ctx.services.settings.server.max_body_bytes, ctx.tenant)
    if len(ctx.raw) > THREAD_ABOVE_BYTES:
        ctx.body, ctx.messages = await offload.run(ctx.tenant, parse_for, ctx.codec, ctx.raw)
    else:
        ctx.body, ctx.messages = parse_for(ctx.codec, ctx.raw)
    ctx.model = ctx.body.get("model")
    ctx.stream = bool(ctx.body.get("stream"))


async def reparse_exact(ctx: Context) -> None:
    """Set ``body`` and ``messages`` again from ``raw``, integers beyond 64 bits exact. Called by
    ``inject`` when the serialised body shows one may have been read as a float; ``model`` and
    ``stream`` are strings and booleans, the same either way."""
    if len(ctx.raw) > THREAD_ABOVE_BYTES:
        ctx.body, ctx.messages = await offload.run(ctx.tenant, parse_for, ctx.codec, ctx.raw, True)
    else:
        ctx.body, ctx.messages = parse_for(ctx.codec, ctx.raw, True)
