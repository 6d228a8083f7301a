"""What one round records: the structured request and reply views and the recorded texts.

Pure functions, no I/O. The record stage builds a :class:`RequestView` from the chat request
(``build_request_view``) and a :class:`ReplyView` from the assembled assistant message
(``build_reply_view``), then asks ``render_user`` / ``render_reply`` for the texts of the user
and assistant messages of the round (SPEC §1 "One round"); ``None`` means "record no message".

Structured request (what non-``$``, non-``.root`` keys address), built lazily on first use:

* the *new input* is the messages after the last assistant message but the request's leading
  system/developer messages (its prompt); a system or developer message after the prompt is
  new input, recorded as user text under a ``[system message]:`` / ``[developer message]:``
  header (``new_messages``). The structured slots come from the last user message among them
  that is not a built-in tool's item (a tool-results round has none, so no slot).
  Assistant messages that end the request are a *prefill* the model continues, not history:
  the new input is what comes before them, and the recorded reply is the prefill and the reply
  (``prefill_text``);
* the text is read exactly as the client sent it: nothing is removed first. The body read here
  is the client's; the gateway's own memo is injected only into the copy it forwards, so a
  ``[CHAT SESSION MEMO]:`` section in this text is client text, recorded (null keys) or addressed
  (``chat_session_memo``) like any other;
* a message that starts with an Agently section header (``[INFO]:``, ``[INPUT]:`` ... a line of
  the form ``[NAME]:``) is split into slots named ``name`` lower-cased, spaces as underscores
  (``output_requirement``); a body that parses as a YAML/JSON mapping or list becomes that
  value, any other body stays text, an empty body gives no slot. ``info`` is read the way
  Agently writes it (``- title: content`` lines, which YAML would misread: ``#0`` is a comment
  there) into one map;
* otherwise ``input`` is the message parsed as JSON when it is an object or array, else its text.

Bounds (one client must not stall the gateway or break the record): structured parsing of one
text (a user message, a reply) has a work budget of ``MAX_PARSE_UNITS`` (YAML events, JSON
values, parse attempts); containers nest at most ``MAX_STRUCTURE_DEPTH`` deep; YAML aliases are
refused; YAML is read only with libyaml's parser (the C loader when installed), never the pure
Python one on a whim of the input. A body over a bound is not structure: it stays text. No
parse error, of any type, escapes; ``parse_*`` never raise on client text.

Structured reply: ``data`` is the content parsed as JSON (whole content, else the first
```` ```json ```` fenced block, else the first fenced block, else a JSON block in the text, as
Agently finds it: ``parse_reply_json``). Tool calls are reachable as
``tool_calls[i].id / .type / .function.name / .function.arguments.<x>`` (arguments parsed from
their JSON string when they parse): a key not found in ``data`` is looked up in
``{"tool_calls": [...]}``. JSONPath reply keys run on the raw chat.completion body (or, when
none is given, ``{"choices": [{"index": 0, "message": message}]}``), so ``$.usage.total_tokens``
can be recorded even when the content is not JSON.

Block boundaries: a keyed text is a :class:`KeyedText`, a ``str`` that also holds where each
block's value starts and ends. The text alone cannot say it (a value may hold a header-like line),
so the round record seals the boundaries next to the text (:func:`blocks_of`) and the export
redacts by them.

Lengths: ``message_length`` is Agently's ``len(str(ChatMessage(**msg).model_dump()))``.
"""

from __future__ import annotations

import ast
import contextlib
import re
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import orjson
import yaml

from gateway import jsonbody
from gateway.jsonpath import KeyBudgetExceeded
from gateway.paths import MISSING as _MISSING
from gateway.paths import KeyPath

if TYPE_CHECKING:
    from gateway.session.structured import OutputContract

MEMO_HEADER = "[CHAT SESSION MEMO]:\n"
SYSTEM_ROLES = frozenset({"system", "developer"})
MEDIA_TYPES = frozenset({"image_url", "file", "input_audio"})

_SECTION_HEADER = re.compile(r"^\[([A-Za-z][A-Za-z0-9 _-]*)\]:[ \t]*$", re.MULTILINE)
_FENCE_LANG = re.compile(r"[ \t]*([A-Za-z0-9_+-]*)")
_INFO_ITEM = re.compile(r"^- (.+?): (.*)$")
_PY_LITERAL = re.compile(r"^(?:[\[{(].*|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|True|False|None)$", re.DOTALL)


def _without_timestamps(loader: type[Any]) -> type[Any]:
    """Drop the timestamp resolver: a date-like value stays the string the client sent."""
    loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    return loader


@_without_timestamps
class _FastLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """libyaml's safe loader; only used on text that ``_yaml_fits`` has scanned first."""


MAX_PARSE_UNITS = 20_000
MAX_STRUCTURE_DEPTH = 64
MAX_LITERAL_CHARS = 10_000
_ATTEMPT_UNITS = 20
_PARSE_ERRORS = (ValueError, TypeError, OverflowError, RecursionError, MemoryError, yaml.YAMLError)


class ParseBudget:
    """The work one text's structured parse may do (``MAX_PARSE_UNITS``): a YAML event, a JSON or
    literal value is one unit, each parse attempt ``_ATTEMPT_UNITS``. Spent, it stays spent:
    later sections of the same text stay text."""

    __slots__ = ("units",)

    def __init__(self, units: int = MAX_PARSE_UNITS) -> None:
        self.units = units

    def spend(self, units: int) -> bool:
        """Take *units*; False (and nothing left) when they are not there."""
        self.units -= units
        if self.units < 0:
            self.units = 0
            return False
        return True


def _fits(value: Any, budget: ParseBudget) -> bool:
    """True when *value* nests at most ``MAX_STRUCTURE_DEPTH`` deep and its values fit the budget.
    Iterative: deep input cannot exhaust the stack here."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not budget.spend(1):
            return False
        if isinstance(item, (dict, list)):
            if depth > MAX_STRUCTURE_DEPTH:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return True


def _yaml_fits(text: str, budget: ParseBudget) -> bool:
    """Scan *text*'s YAML events with libyaml: no alias, nesting at most ``MAX_STRUCTURE_DEPTH``,
    every event paid for. Stops at the first event over a bound."""
    depth = 0
    for event in yaml.parse(text, Loader=_FastLoader):
        if not budget.spend(1) or isinstance(event, yaml.AliasEvent):
            return False
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_STRUCTURE_DEPTH:
                return False
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return True


# --- messages -----------------------------------------------------------------------------


def content_text(content: Any) -> str:
    """The text of a message content: a string, or the text parts of a content-part list joined by
    "\\n"; a JSON object (Agently's ``agent.input({...})`` alone) as the YAML (sorted keys) Agently
    renders it in as its ``[INPUT]`` section (once per object within :func:`rendering_once`)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join([text for part in content if (text := _part_text(part)) is not None])
    if isinstance(content, dict):
        return _object_text(content)
    return str(content)


_RENDERED: ContextVar[dict[int, tuple[Any, str]] | None] = ContextVar("rendered_objects", default=None)
"""Within :func:`rendering_once`: each object content rendered so far, by ``id``, with the object
(so that the id stays its own) and its text."""


class rendering_once:  # noqa: N801 - used as a function: ``with rendering_once():``
    """Within the block, an object content is rendered as YAML once, however many times its text
    is asked for (the recorded input, the output-format check, the prefill): PyYAML's pure-Python
    emitter takes some 7 microseconds a node, a quarter of a second for a 60 KB object. The objects
    must not change within the block (a round's request does not). Within an outer block, the
    outer block's renderings serve. A class, not a generator: entering costs a fraction of a
    microsecond on every round."""

    __slots__ = ("token",)

    def __enter__(self) -> None:
        self.token = _RENDERED.set({}) if _RENDERED.get() is None else None

    def __exit__(self, *exc: object) -> None:
        if self.token is not None:
            _RENDERED.reset(self.token)


def _object_text(content: dict[str, Any]) -> str:
    """*content* as the YAML Agently renders (``yaml.safe_dump``, sorted keys), or as JSON when
    YAML cannot render it. libyaml's emitter is not used: it writes many texts differently
    (an empty key, characters outside the BMP), and the record must read as Agently's."""
    rendered = _RENDERED.get()
    if rendered is not None and (done := rendered.get(id(content))) is not None and done[0] is content:
        return done[1]
    try:
        text = yaml.safe_dump(content, allow_unicode=True).rstrip("\n")  # Agently's [INPUT] section body
    except (yaml.YAMLError, RecursionError):
        text = jsonbody.dumps(content).decode()
    if rendered is not None:
        rendered[id(content)] = (content, text)
    return text


YAML_NODE_UNITS = 8
"""What rendering one value of an object as YAML costs, in characters of text rendered in the
same time (about 7 and 1 microseconds with PyYAML's pure-Python emitter)."""


def object_units(contents: Iterable[Any], enough: int) -> int:
    """About how much rendering the object (``dict``) contents among *contents* as YAML costs, in
    characters (``YAML_NODE_UNITS`` a key or value, and each string's length); counting stops
    once past *enough*, so it costs at most that much whatever the objects. Other contents count
    nothing: text is used as it is, a list's parts are joined or written by the C JSON encoder."""
    units = 0
    todo = [content for content in contents if type(content) is dict]
    while todo and units <= enough:
        item = todo.pop()
        units += YAML_NODE_UNITS
        if type(item) is dict:
            todo.extend(item)
            todo.extend(item.values())
        elif type(item) is list:
            todo.extend(item)
        elif type(item) is str:
            units += len(item)
    return units


def _input_content_text(content: Any) -> str:
    """``content_text`` of client input, where a part that is not text (a type the gateway does
    not know, a text part whose ``text`` is not a string, a bare string) is recorded as its
    JSON rather than left out: a lenient provider may show it to the model. Media parts are
    left to the structured record (``session.structured``), which a round with them is."""
    if not isinstance(content, list):
        return content_text(content)
    texts = []
    for part in content:
        if (text := _part_text(part)) is not None:
            texts.append(text)
        elif not (isinstance(part, dict) and part.get("type") in MEDIA_TYPES):
            texts.append(jsonbody.dumps(part).decode())
    return "\n".join(texts)


def _part_text(part: Any) -> str | None:
    """The text of one content part, None for a non-text part."""
    if isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    return None


def prefill_start(messages: Sequence[dict[str, Any]]) -> int:
    """Where the request's *prefill* begins: the assistant messages without tool calls at its
    end, which the model continues (Anthropic's prefill; OpenAI-compatible servers' "continue
    the final message"). ``len(messages)`` when it ends with no such message."""
    start = len(messages)
    while start and messages[start - 1].get("role") == "assistant" and not messages[start - 1].get("tool_calls"):
        start -= 1
    return start


def prefill_text(messages: Sequence[dict[str, Any]]) -> str:
    """The text of the request's prefill ("" when none): the start of the model's turn, which
    the reply goes on from, so the recorded assistant message is the prefill and the reply."""
    return "".join(_input_content_text(message.get("content")) for message in messages[prefill_start(messages):])


def new_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """This round's new input: the messages after the last assistant message before the prefill
    (``prefill_start``), up to the prefill, but the request's leading system and developer
    messages (its prompt, never recorded). A system or developer message anywhere after the
    prompt reaches the model as such, so it is new input like any other: it comes back with its
    content under a header naming its role (:func:`marked_instruction`), and is recorded as the
    user's text (a window holds no system message after the first user one)."""
    end = prefill_start(messages)
    start = 0
    for index in range(end - 1, -1, -1):
        if messages[index].get("role") == "assistant":
            start = index + 1
            break
    prompt = 0
    while prompt < len(messages) and messages[prompt].get("role") in SYSTEM_ROLES:
        prompt += 1
    return [marked_instruction(message) if message.get("role") in SYSTEM_ROLES else message
            for message in messages[max(start, prompt):end]]


def marked_instruction(message: dict[str, Any]) -> dict[str, Any]:
    """A system or developer message after the prompt, its content under a ``[system message]:``
    (``[developer message]:``) header line, so the record says what it was; an empty one as is."""
    content = message.get("content")
    if content in (None, "", []):
        return message
    header = f"[{message.get('role')} message]:"
    if isinstance(content, str):
        marked: Any = f"{header}\n{content}"
    elif isinstance(content, list):
        marked = [{"type": "text", "text": header}, *content]
    else:
        marked = f"{header}\n{_input_content_text(content)}"
    return {**message, "content": marked}


def input_text(messages: Sequence[dict[str, Any]]) -> str | None:
    """The full text of this round's new messages, exactly as the client sent them, joined by a
    blank line; None when empty. Nothing the client sent is left out: a role the gateway does not
    know (``narrator``, ``User``), which a lenient provider may still show the model, is
    recorded like a user's, and a message of white space alone is recorded as it is (Agently's
    ``_session_finally`` records any user content but ``""``)."""
    texts = []
    for message in new_messages(messages):
        text = _input_content_text(message.get("content"))
        if text:
            texts.append(text)
    return "\n\n".join(texts) if texts else None


def message_length(message: dict[str, Any]) -> int:
    """Agently's length of one message: ``len(str(ChatMessage(**message).model_dump()))``."""
    if len(message) == 2 and "content" in message:
        role = message.get("role")
        if isinstance(role, str):
            # len("{'role': " + repr(role) + ", 'content': " + repr(content) + "}"), without building it
            return 23 + len(repr(role)) + len(repr(message["content"]))
    dumped = {"role": message.get("role", "user"), "content": message.get("content")}
    dumped.update((key, value) for key, value in message.items() if key not in ("role", "content"))
    return len(str(dumped))


def context_length(messages: Sequence[dict[str, Any]]) -> int:
    """Agently's ``Session._calculate_context_length``: the sum of the message lengths."""
    return sum(message_length(message) for message in messages)


# --- parsing ------------------------------------------------------------------------------


def _load_json(text: str, budget: ParseBudget | None = None) -> Any:
    """The JSON object or array in ``text`` (surrounding whitespace allowed), else MISSING;
    MISSING too when it is deeper or larger than the bounds (see the module docstring).
    Integers beyond 64 bits are read exactly (``jsonbody.loads``), as the model wrote them."""
    stripped = text.strip()
    if not stripped or stripped[0] not in "{[":
        return _MISSING
    try:
        value = jsonbody.loads(stripped)
    except orjson.JSONDecodeError:
        return _MISSING
    return value if _fits(value, budget or ParseBudget()) else _MISSING


def _load_structure(text: str, budget: ParseBudget | None = None) -> Any:
    """A section body as a mapping or list (JSON or YAML); MISSING when it is a scalar, not
    parseable, holds a YAML alias, or is over the depth or work bounds. Never raises."""
    budget = budget or ParseBudget()
    if not budget.spend(_ATTEMPT_UNITS):
        return _MISSING
    value = _load_json(text, budget)
    if value is not _MISSING:
        return value
    try:
        if not _yaml_fits(text, budget):
            return _MISSING
        value = yaml.load(text, Loader=_FastLoader)  # a safe loader, on text already scanned
    except _PARSE_ERRORS:
        return _MISSING
    return value if isinstance(value, (dict, list)) else _MISSING


def _info_value(text: str, budget: ParseBudget) -> Any:
    """One ``- title: content`` value: Agently wrote ``str(value)``, so read Python literals back
    (within ``MAX_LITERAL_CHARS`` and the budget; otherwise, or when it does not parse, the text)."""
    if len(text) <= MAX_LITERAL_CHARS and _PY_LITERAL.match(text) and budget.spend(_ATTEMPT_UNITS):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return text
        return value if _fits(value, budget) else text
    return text


def _parse_info(body: str, budget: ParseBudget) -> Any:
    """Agently's ``[INFO]:`` body: ``- title: content`` lines make one map, ``- line`` lines a list."""
    items: list[tuple[str | None, list[str]]] = []  # (title or None, content lines)
    keyed = True
    for line in body.split("\n"):
        if line.startswith("- "):
            match = _INFO_ITEM.match(line)
            keyed = keyed and match is not None
            items.append((match.group(1), [match.group(2)]) if match else (None, [line[2:]]))
        elif items:
            items[-1][1].append(line)  # joined once below: growing a string here would be quadratic
        else:
            return _parse_body(body, budget)
    if keyed:
        return {title: _info_value("\n".join(lines), budget) for title, lines in items}
    return ["\n".join(lines) if title is None else f"{title}: " + "\n".join(lines) for title, lines in items]


def _parse_body(body: str, budget: ParseBudget) -> Any:
    value = _load_structure(body, budget)
    return body if value is _MISSING else value


def parse_sections(text: str, budget: ParseBudget | None = None) -> dict[str, Any] | None:
    """Split an Agently-rendered prompt into slots; None when ``text`` does not start with a header.

    Every section body shares one ``ParseBudget``: once it is spent, later bodies stay text.
    """
    headers = list(_SECTION_HEADER.finditer(text))
    if not headers or text[: headers[0].start()].strip():
        return None
    budget = budget or ParseBudget()
    slots: dict[str, Any] = {}
    for position, header in enumerate(headers):
        end = headers[position + 1].start() if position + 1 < len(headers) else len(text)
        body = text[header.end() : end].strip("\n").rstrip()
        name = header.group(1).strip().lower().replace(" ", "_")
        if not body.strip() or name in slots:
            continue
        slots[name] = _parse_info(body, budget) if name == "info" else _parse_body(body, budget)
    return slots


def parse_user_text(text: str) -> dict[str, Any]:
    """The structured slots of one user message text, read as the client sent it."""
    budget = ParseBudget()
    value = _load_json(text, budget)
    if value is not _MISSING:
        return {"input": value}
    sections = parse_sections(text, budget)
    if sections is not None:
        return sections
    return {"input": text} if text.strip() else {}


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """The ```` ``` ```` fenced blocks of ``text`` as ``(lang, body)``, in order, in linear time.

    A block opens at ```` ``` ````, an optional language tag and the rest of that line; its body
    runs to the next ```` ``` ````. (The regular expression this replaces backtracked over every
    opener, so a reply of many backticks held the interpreter for seconds.)
    """
    blocks: list[tuple[str, str]] = []
    position = text.find("```")
    while position >= 0:
        newline = text.find("\n", position + 3)
        if newline < 0:
            break  # no opener from here on has a line end
        end = text.find("```", newline + 1)
        if end < 0:
            break  # nor a closing fence
        match = _FENCE_LANG.match(text, position + 3, newline)
        blocks.append((match.group(1) if match else "", text[newline + 1 : end]))
        position = text.find("```", end + 3)
    return blocks


def parse_reply_json(text: str | None) -> Any:
    """The reply content as JSON, found as Agently's parser finds it: the whole content, else a
    ```` ```json ```` fenced block, else the first fenced block, else a ``{...}``/``[...]`` block
    in the text (:func:`json_blocks`: the one the text starts with, or else the last of them that
    parses), each read as JSON or else as JSON5 (a trailing comma, single quotes)."""
    if not text:
        return _MISSING
    value = _load_json(text)
    if value is not _MISSING:
        return value
    blocks = fenced_blocks(text)
    ordered = [body for lang, body in blocks if lang.lower() == "json"] + [body for _, body in blocks[:1]]
    for body in ordered:
        value = _load_json(body)
        if value is not _MISSING:
            return value
    budget = ParseBudget()
    found = json_blocks(text)
    if text.lstrip()[:1] in ("{", "["):
        found = found[:1]  # Agently reads a text that starts with JSON as that JSON, whatever follows
    for block in reversed(found):
        value = _load_json(block, budget)
        if value is _MISSING and budget.spend(_ATTEMPT_UNITS):
            value = _load_json5(block, budget)
        if value is not _MISSING:
            return value
    return _MISSING


_JSON_MARKS = re.compile(r'[{}\[\]"\\]')
MAX_JSON_BLOCKS = 16


def json_blocks(text: str) -> list[str]:
    """The outermost balanced ``{...}`` and ``[...]`` blocks of *text*, in order (brackets
    inside JSON strings do not count), at most :data:`MAX_JSON_BLOCKS`: where Agently's
    ``DataLocator`` looks for the JSON in a reply with text around it. One pass, skipping from
    one bracket or quote to the next."""
    blocks: list[str] = []
    depth, start, quoted, escaped = 0, 0, False, -1
    for mark in _JSON_MARKS.finditer(text):
        char, at = mark.group(), mark.start()
        if quoted:
            if at == escaped:
                continue
            if char == "\\":
                escaped = at + 1  # the next character is escaped: skip it if it is a mark
            elif char == '"':
                quoted = False
            continue
        if depth and char == '"':
            quoted = True
        elif char in "{[":
            if not depth:
                start = at
            depth += 1
        elif char in "}]" and depth:
            depth -= 1
            if not depth:
                blocks.append(text[start:at + 1])
                if len(blocks) == MAX_JSON_BLOCKS:
                    break
    return blocks


def _load_json5(text: str, budget: ParseBudget) -> Any:
    """*text* read as JSON5 (an object or array within the bounds), else MISSING."""
    from gateway.session.lenient_json import loads_json5

    try:
        value = loads_json5(text)
    except Exception:  # noqa: BLE001 - any failure is "not JSON5": client text never raises here
        return _MISSING
    return value if isinstance(value, (dict, list)) and _fits(value, budget) else _MISSING


def _tool_call_view(call: Any) -> Any:
    """A tool call with ``function.arguments`` parsed from its JSON string when it parses
    (integers beyond 64 bits exact: ``jsonbody.loads``)."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    function = dict(call["function"])
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        with contextlib.suppress(orjson.JSONDecodeError):
            function["arguments"] = jsonbody.loads(arguments)
    return {**call, "function": function}


# --- views ----------------------------------------------------------------------------------


class RequestView:
    """What request keys address. Everything but the raw body is computed on first use."""

    kind: ClassVar[str] = "request"

    def __init__(self, body: dict[str, Any], messages: list[dict[str, Any]] | None = None) -> None:
        self.request = body
        if messages is not None:
            self.messages = [m for m in messages if isinstance(m, dict)]  # fills the cached property

    @property
    def raw(self) -> dict[str, Any]:
        """The request body as the client sent it (what JSONPath keys run on)."""
        return self.request

    @cached_property
    def messages(self) -> list[dict[str, Any]]:
        """The request's messages (an empty list when absent or malformed)."""
        messages = self.request.get("messages")
        if not isinstance(messages, list):
            return []
        return [message for message in messages if isinstance(message, dict)]

    @cached_property
    def system(self) -> str | None:
        """The system/developer messages' text joined by "\\n" (``.agent.system``); None when none."""
        texts = [content_text(m.get("content")) for m in self.messages if m.get("role") in SYSTEM_ROLES]
        return "\n".join(texts) if texts else None

    @cached_property
    def slots(self) -> dict[str, Any]:
        """The structured request: ``input``, ``info``, ``instruct``, ``output_requirement`` ..."""
        users = _user_turns(self.messages)
        if not users:
            return {}
        content = users[-1].get("content")
        if isinstance(content, dict):
            return {"input": content}  # Agently's agent.input({...}) alone: the object is the input
        return parse_user_text(content_text(content))

    @cached_property
    def wants_structured(self) -> OutputContract | None:
        """The structured output the request asks for (truthy), None when it asks for none: a JSON
        ``response_format``, or Agently's ``[OUTPUT REQUIREMENT]:`` in the last user message with
        a ``Data Format:`` Agently parses (JSON, or the ``flat_markdown``, ``hybrid``,
        ``xml_field`` and ``yaml_literal`` formats of its ``.output(..., format=...)``:
        ``session.structured.output_contract``). Agently's ``get_data()`` parses the reply only
        then, and in that format, so only then is it recorded as data."""
        from gateway.session.structured import OutputContract, output_contract

        response_format = self.request.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
            return OutputContract("json")
        users = _user_turns(self.messages)
        return output_contract(content_text(users[-1].get("content"))) if users else None


def _user_turns(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The user messages of the new input, but a built-in tool's item (a Responses ``mcp_call``,
    ``reasoning``, ``*_output`` ...: ``tool_output``), which is no user turn to read slots from."""
    return [m for m in new_messages(messages) if m.get("role") == "user" and not m.get("tool_output")]


class ReplyView:
    """What reply keys address: the parsed content, the tool calls, the raw reply."""

    kind: ClassVar[str] = "reply"

    def __init__(self, message: dict[str, Any], response: dict[str, Any] | None = None,
                 output: OutputContract | None = None) -> None:
        self.message = message
        self.response = response
        self.output = output

    @cached_property
    def text(self) -> str | None:
        """The reply content as text, and the model's ``refusal`` after it (a blank line between)
        when the reply has both (the client is shown both); when it gave no content, the refusal
        or its audio reply's ``transcript`` (what the client was given instead); None when empty."""
        text = content_text(self.message.get("content"))
        refusal = self.message.get("refusal")
        if text:
            return f"{text}\n\n{refusal}" if isinstance(refusal, str) and refusal else text
        audio = self.message.get("audio")
        transcript = audio.get("transcript") if isinstance(audio, dict) else None
        for other in (refusal, transcript):
            if isinstance(other, str) and other:
                return other
        return None

    @cached_property
    def data(self) -> Any:
        """The content parsed as the request's *output* contract asked (as JSON when it names
        none); ``None`` when it does not parse: no Agently key finds anything."""
        value = parse_reply_json(self.text) if self.output is None else self.output.parse(self.text)
        return None if value is _MISSING else value

    @cached_property
    def tool_calls(self) -> list[Any]:
        """The tool calls with their arguments parsed."""
        calls = self.message.get("tool_calls")
        return [_tool_call_view(call) for call in calls] if isinstance(calls, list) else []

    @cached_property
    def tools(self) -> dict[str, Any] | None:
        """``{"tool_calls": [...]}`` when the reply has tool calls, else None."""
        return {"tool_calls": self.tool_calls} if self.tool_calls else None

    @cached_property
    def raw(self) -> dict[str, Any]:
        """The raw chat.completion body (what JSONPath keys run on)."""
        if self.response is not None:
            return self.response
        return {"choices": [{"index": 0, "message": self.message}]}


def build_request_view(body: dict[str, Any], messages: list[dict[str, Any]] | None = None) -> RequestView:
    """The view of one request, as the client sent it; *messages* is its neutral form (a chat
    request's ``messages`` when not given: ``gateway.codecs``)."""
    return RequestView(body, messages)


def build_reply_view(message: dict[str, Any], response: dict[str, Any] | None = None,
                     output: OutputContract | None = None) -> ReplyView:
    """The view of one assembled assistant message (and the whole reply body, for JSONPath);
    *output* is the structured output its request asked for (``RequestView.wants_structured``),
    which reply keys are read from (JSON when None)."""
    return ReplyView(message, response, output)


# --- rendering ------------------------------------------------------------------------------


def format_value(value: Any) -> str:
    """Agently's ``_format_session_value``: scalars as text, anything else as YAML."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)) or value is None:
        return str(value)
    try:
        return yaml.safe_dump(value, allow_unicode=True, sort_keys=False).rstrip("\n")
    except yaml.YAMLError:
        return str(value)


Span = tuple[str, int, int]
"""One recorded block: its key and where its value is in the text (``text[start:end]``)."""


class KeyedText(str):
    """Text in Agently block form, as :func:`format_keyed` wrote it, that knows where each
    block's value is (``blocks``: ``(key, start, end)`` in text order).

    A value may itself hold a line that looks like a header (``"T-77\\n[input.intent]:\\n..."``),
    so the text alone cannot say where a block ends; the boundaries are kept with the round
    (``blocks_of``, sealed next to the text by ``SessionService.commit_round``) and the export
    redacts by them (``gateway.redact``). It is an ordinary ``str`` everywhere else: the text
    recorded, injected and exported in Agently's JSON is exactly Agently's.
    """

    blocks: tuple[Span, ...]

    def __new__(cls, text: str, blocks: Sequence[Span]) -> KeyedText:
        made = super().__new__(cls, text)
        made.blocks = tuple(blocks)
        return made


def format_keyed(items: Sequence[tuple[str, Any]]) -> KeyedText:
    """Agently's ``_format_session_keyed_content``: ``[key]:\\nvalue`` blocks joined by "\\n",
    stripped; the returned text also knows each value's span (:class:`KeyedText`)."""
    lines: list[str] = []
    spans: list[Span] = []
    at = 0
    for key, value in items:
        header = f"[{key}]:"
        text = format_value(value)
        start = at + len(header) + 1
        spans.append((key, start, start + len(text)))
        lines.append(header)
        lines.append(text)
        at = start + len(text) + 1
    joined = "\n".join(lines)
    stripped = joined.strip()  # the first line is a header: only the end can lose whitespace
    end = len(stripped)
    return KeyedText(stripped, [(key, min(start, end), min(stop, end)) for key, start, stop in spans])


def blocks_of(text: str | None) -> list[list[Any]]:
    """What is sealed next to a recorded text (``"blocks"`` of its message in the round
    record): ``[key, start, end]`` per block of a :class:`KeyedText`; ``[]`` for any other
    text, which is free text (the policy's keys for that role were null)."""
    if isinstance(text, KeyedText):
        return [[key, start, end] for key, start, end in text.blocks]
    return []


BLOCKS_FIELD = "blocks"
"""The field of a message in a sealed round record that holds its block boundaries; it is never
in the session's state, its window or its Agently JSON (:func:`without_blocks`)."""


def with_blocks(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages of a text round as its record is sealed: each with its ``blocks``."""
    return [{**message, BLOCKS_FIELD: blocks_of(message.get("content"))} for message in messages]


def without_blocks(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A round record's messages as the session holds them (Agently's form): no ``blocks``."""
    return [{k: v for k, v in message.items() if k != BLOCKS_FIELD} if BLOCKS_FIELD in message else message
            for message in messages]


def render_keys(keys: Sequence[KeyPath], view: RequestView | ReplyView,
                over_budget: list[str] | None = None) -> str | None:
    """One block per key found in ``view``, in key order; None when no key is found.

    A JSONPath key too costly to evaluate on ``view`` raises ``KeyBudgetExceeded``, unless
    *over_budget* is given: then the key is left out and its name appended there, for the
    caller to mark the round truncated (it is never left out silently)."""
    items = []
    for key in keys:
        try:
            found, value = key.find(view)
        except KeyBudgetExceeded:
            if over_budget is None:
                raise
            over_budget.append(key.source)
            continue
        if found:
            items.append((key.source, value))
    return format_keyed(items) if items else None


def render_user(
    keys: Sequence[KeyPath] | None, messages: Sequence[dict[str, Any]], view: RequestView
) -> str | None:
    """The recorded user message: the whole new input (``keys`` None) or the keyed blocks."""
    if keys is None:
        return input_text(messages)
    return render_keys(keys, view)


def render_reply(keys: Sequence[KeyPath] | None, view: ReplyView, structured: bool | OutputContract | None = False,
                 over_budget: list[str] | None = None) -> str | None:
    """The recorded assistant message: the whole reply (``keys`` None) or the keyed blocks.

    The whole reply is its text, or, when the request asked for structured output
    (*structured*: ``RequestView.wants_structured``; ``True`` means JSON) and the reply parses
    in the format asked for, that data as YAML, as Agently records ``get_data()``; tool calls are
    added as a YAML ``tool_calls:`` document after a blank line (alone when there is no text).
    None when the reply is empty.
    *over_budget*: see :func:`render_keys`.
    """
    if keys is not None:
        return render_keys(keys, view, over_budget)
    if structured and view.text:
        contract = view.output or (structured if not isinstance(structured, bool) else None)
        data = parse_reply_json(view.text) if contract is None else contract.parse(view.text)
        if data is not _MISSING and not view.tool_calls:
            return format_value(data)
    parts = [view.text] if view.text else []
    if view.tool_calls:
        parts.append(format_value({"tool_calls": view.tool_calls}))
    return "\n\n".join(parts) if parts else None
