"""The session model (SPEC §1): state, rounds, bounding, injection and Agently's JSON form.

Everything here is pure: no I/O, no clock. The store seals :class:`SessionState` as one record
and keeps ``full_context`` as the append-only list of round records; this module only says
what a round does to the state and what a forwarded request looks like.

Bounding counts characters exactly as Agently does (``len(str({"role": r, "content": c}))``
per message), so a session bounded here has the same window in Agently.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from textwrap import dedent
from typing import Any

import orjson
import yaml

from gateway.errors import InvalidSession
from gateway.session.encoded import EncodedList
from gateway.session.record import MEMO_HEADER, context_length, message_length, prefill_start

Message = dict[str, Any]
SYNC_STRATEGIES = frozenset({"simple_cut", "keep_last"})
"""Strategies pure enough to run inside the round's own transaction."""


@dataclass(slots=True)
class SessionState:
    """The mutable part of a session; ``full_context`` lives in the round records."""

    context_window: list[Message] = field(default_factory=list)
    memo: Any = None
    settings: dict[str, Any] = field(default_factory=dict)
    auto_resize: bool = True
    chars: int | None = None
    """The window's Agently length, cached (None: not known yet). Change the window only through
    :meth:`with_window`, which keeps this right."""
    pending: list[int] = field(default_factory=list)
    """Under a ``hook`` strategy: the sizes of the appends at the end of the window that the
    hooks have not analysed yet, oldest first (a round appends ``[1, 1]``: its user message, then
    its reply; ``add`` of n messages ``[n]``; ``0`` is an analysis with nothing appended, after a
    reset). Agently analyses after each append; window maintenance replays them in order
    (``session.bounding``) and empties this. Always empty under the other strategies."""
    _normal: _Normal | None = field(default=None, init=False, repr=False, compare=False)
    """The window as injected (:meth:`normalised`), kept once made. Never stored; ``replace``
    drops it; :meth:`appended` and a cut from the front carry it over instead of normalising
    the whole window again."""
    _encoded: EncodedList | None = field(default=None, init=False, repr=False, compare=False)
    """The window's JSON text (``session.encoded``), kept and carried over like ``_normal``."""
    _simple: bool | None = field(default=None, init=False, repr=False, compare=False)
    """Whether the window is *simple* (:func:`_simple`; None: not known yet), kept and carried
    over like ``_normal``. A simple window normalises to itself between the markers, so its JSON
    text is the normalised window's and no ``_normal`` needs to be made or carried."""

    def normalised(self) -> list[Message]:
        """:func:`normalise_window` of the window (a new list; its messages are shared, never
        change them)."""
        if self._normal is None or self._normal.out is None:
            self._normal = _Normal.of(self.context_window)
        assert self._normal.out is not None
        return list(self._normal.out)

    def sendable(self, messages: Sequence[Message], *, tools: bool = True) -> list[Message] | None:
        """The normalised window as it must go before a request's *messages* when that differs
        from :meth:`normalised`: its last message's tool calls that *messages* do not answer
        left out, or every tool call and result without *tools* (:func:`paired`). None when the
        kept window goes as it is (always, for a window without tool calls)."""
        if self._simple is None:
            self._simple = _simple(self.context_window)
        if self._simple:
            return None
        if self._normal is None:
            self._normal = _Normal.of(self.context_window, keep_out=False)
        if self._normal.plain:
            return None
        answered = answered_calls(messages)
        last = self._normal.last
        calls = last.get("tool_calls") if last is not None else None
        if tools and not (calls and any(call.get("id") not in answered for call in calls)):
            return None
        return _normalise(self.context_window, answered, tools)[0]

    def normalised_items(self) -> bytes:
        """The JSON text of :meth:`normalised`'s messages, comma-separated, without brackets."""
        if self._simple is None:
            self._simple = _simple(self.context_window)
        if self._simple:
            window = self.context_window
            if self._encoded is None:
                self._encoded = EncodedList.of(window)
            first, last = (window[0]["role"], window[-1]["role"]) if window else (None, None)
            return _dressed_items(*_markers(first, last), self._encoded.items())
        if self._normal is None:
            self._normal = _Normal.of(self.context_window, keep_out=False)
        return self._normal.items()

    def to_json(self) -> bytes:
        """``orjson.dumps(self.to_dict())``, the window copied from its kept text."""
        if self._encoded is None:
            self._encoded = EncodedList.of(self.context_window)
        return orjson.dumps({**self.to_dict(), "context_window": orjson.Fragment(self._encoded.data)})

    def with_settings(self, settings: dict[str, Any]) -> SessionState:
        """A copy with other settings (the window, and what is kept of it, unchanged)."""
        new = replace(self, settings=settings)
        new._normal, new._encoded, new._simple = self._normal, self._encoded, self._simple
        return new

    def window_chars(self) -> int:
        if self.chars is None:
            self.chars = context_length(self.context_window)
        return self.chars

    def with_window(self, window: list[Message], chars: int | None = None, **changes: Any) -> SessionState:
        """A copy with another window (and *chars*, its length, when the caller knows it)."""
        if changes:
            return replace(self, context_window=window, chars=chars, **changes)
        # what replace() makes, built directly: a round makes two of these
        return SessionState(window, self.memo, self.settings, self.auto_resize, chars, self.pending)

    def appended(self, messages: list[Message]) -> SessionState:
        """A copy with *messages* added to the window, its length kept without a recount."""
        new = self.with_window(self.context_window + messages, self.window_chars() + context_length(messages))
        if self._normal is not None:
            new._normal = self._normal.appended(messages)
        if self._encoded is not None:
            new._encoded = self._encoded.appended(messages)
        if self._simple is not None:  # a window that was not simple stays so
            last = self.context_window[-1]["role"] if self.context_window else None
            new._simple = self._simple and _simple(messages, after=last)
        return new

    def to_dict(self) -> dict[str, Any]:
        out = {"context_window": self.context_window, "memo": self.memo, "settings": self.settings,
               "auto_resize": self.auto_resize, "chars": self.window_chars()}
        if self.pending:
            out["pending"] = self.pending
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SessionState:
        chars = data.get("chars")
        pending = data.get("pending")
        return cls(list(data.get("context_window") or []), data.get("memo"), dict(data.get("settings") or {}),
                   bool(data.get("auto_resize", True)), chars if isinstance(chars, int) else None,
                   [n for n in pending if isinstance(n, int)] if isinstance(pending, list) else [])


def round_messages(user: str | None, assistant: str | None) -> list[Message]:
    """The messages one round appends: a user then an assistant message, each when recorded."""
    out: list[Message] = []
    if user is not None:
        out.append({"role": "user", "content": user})
    if assistant is not None:
        out.append({"role": "assistant", "content": assistant})
    return out


# --- bounding ------------------------------------------------------------------------------

def simple_cut(window: list[Message], max_length: int) -> list[Message]:
    """Keep the newest messages that fit in *max_length*; if none fits, the last one cut to its
    final *max_length* characters (Agently's ``simple_cut``)."""
    return _simple_cut(window, max_length)[0]


def _simple_cut(window: list[Message], max_length: int, total: int | None = None) -> tuple[list[Message], int | None]:
    """:func:`simple_cut` and the kept window's length (None when it had to cut a message).

    With *total*, the whole window's length (``context_length``), it drops the oldest messages
    until the rest fits: the same longest fitting suffix, measuring only what is dropped (a round
    on a full window drops one or two messages, instead of measuring the whole window again)."""
    if total is not None:
        start = 0
        while total > max_length and start < len(window):
            total -= message_length(window[start])
            start += 1
        kept, fits = window[start:], total
    else:
        kept, fits = [], 0
        for message in reversed(window):
            size = message_length(message)
            if fits + size > max_length:
                break
            kept.append(message)
            fits += size
        kept.reverse()
    if not kept and window:
        last = window[-1]
        text = str(last.get("content"))
        return [{"role": last.get("role"), "content": text[len(text) - max_length:]}], None
    return kept, fits


def split_rounds(window: list[Message]) -> list[list[Message]]:
    """Group a window into rounds: a round starts at a user message, or at an assistant
    message that does not follow a user message."""
    rounds: list[list[Message]] = []
    for message in window:
        starts = message.get("role") != "assistant" or not rounds or rounds[-1][-1].get("role") == "assistant"
        if starts:
            rounds.append([message])
        else:
            rounds[-1].append(message)
    return rounds


def keep_last(window: list[Message], rounds: int) -> list[Message]:
    """Keep the last *rounds* rounds of the window."""
    groups = split_rounds(window)
    return [m for group in groups[len(groups) - rounds:] for m in group] if rounds > 0 else []


def over_limit(state: SessionState, max_length: int | None) -> bool:
    return max_length is not None and state.window_chars() > max_length


def appended_bounded(state: SessionState, messages: list[Message], strategy: str, max_length: int | None,
                     rounds: int = 0) -> SessionState:
    """*state* with a round's *messages* appended one after the other, bounded as Agently bounds
    them: its ``add_chat_history`` of each message resizes the window right after that append
    (``_session_finally`` adds the user message, then the reply), so a synchronous strategy
    (:func:`bound_sync`, when ``auto_resize``) runs after each message, not once after all.

    Bounding once at the end gives the same window unless a message before the last would have
    been cut: ``simple_cut`` drops whole messages from the front, and dropping later drops a
    superset, so only a message that alone is over *max_length* (Agently keeps its last
    characters, a remnant that may stay next to the reply) and, under ``keep_last``, a message
    followed by one that starts a new round (keeping the last rounds at that point may keep
    fewer messages than the window holds at the end) need a resize right after them. Everything
    else, a window that fits above all, is one append and at most one bound, as before."""
    whole = state.appended(messages)
    if not state.auto_resize or strategy not in SYNC_STRATEGIES or not over_limit(whole, max_length):
        return whole  # every earlier append fitted too: no resize ran
    assert max_length is not None
    ends = [i + 1 for i in range(len(messages) - 1)
            if message_length(messages[i]) > max_length or (strategy == "keep_last" and (
                messages[i + 1].get("role") != "assistant" or messages[i].get("role") == "assistant"))]
    if not ends:
        return bound_sync(whole, strategy, max_length, rounds)
    start = 0
    for end in [*ends, len(messages)]:
        state = bound_sync(state.appended(messages[start:end]), strategy, max_length, rounds)
        start = end
    return state


def bound_sync(state: SessionState, strategy: str, max_length: int | None, rounds: int = 0) -> SessionState:
    """Apply a synchronous strategy (``simple_cut`` or ``keep_last``) when the window is over
    *max_length*. ``keep_last`` is followed by ``simple_cut`` if still over. Like Agently's own
    ``simple_cut``, this can leave one message over *max_length*: the cut keeps the last
    *max_length* characters of its content, and the message's Agently length also counts its
    role and quoting (and escapes), so the window stays over the limit by that much."""
    if max_length is None or strategy not in SYNC_STRATEGIES or not over_limit(state, max_length):
        return state
    window = state.context_window
    if strategy == "keep_last":
        window = keep_last(window, rounds)
        chars = context_length(window)
    else:
        chars = state.window_chars()
    if chars <= max_length:
        return state.with_window(window, chars)
    kept, fits = _simple_cut(window, max_length, chars)
    new = state.with_window(kept, fits)
    if window is state.context_window and fits is not None:  # kept is a suffix of the window
        dropped = len(window) - len(kept)
        if state._normal is not None:
            new._normal = state._normal.without_first(dropped)
        if state._encoded is not None:
            new._encoded = state._encoded.without_first(dropped)
        if state._simple:
            new._simple = True  # a suffix of a simple window is simple
    return new


# --- injection -----------------------------------------------------------------------------
#
# Agently 4.1 is the reference, byte for byte (``AgentlyPromptGenerator.to_messages`` with the
# ``OpenAICompatible`` defaults ``strict_role_orders: true``, ``rich_content: false``): the window
# is Agently's ``chat_history`` and the memo its ``CHAT SESSION MEMO`` prompt section.

AGENTLY_ROLES = frozenset({"system", "developer", "user", "assistant"})
"""The roles Agently's default ``prompt.role_mapping`` sends as themselves; any other (``_``) it
sends as ``assistant``."""
CHAT_HISTORY_OPENER = "[CHAT HISTORY]"
"""The user message Agently puts before a history that does not start with a user message."""
CONTINUE_INPUT = "[User continue input]"
"""The assistant message Agently puts after a history that does not end with an assistant message."""
LATE_SECTIONS = frozenset({"INSTRUCT", "EXAMPLES", "INPUT", "OUTPUT REQUIREMENT", "OUTPUT"})
"""Agently renders these after its extra sections (the memo is one): TOOLS, ACTION RESULTS,
INFO, extra sections, then these, in this order, ``[OUTPUT]:`` last."""
_HEADER = re.compile(r"^\[([A-Za-z][A-Za-z0-9 _-]*)\]:[ \t]*$", re.MULTILINE)


MEMO_MAX_BYTES = 64 * 1024
"""The most a memo may hold, as JSON text (UTF-8 bytes). The memo goes into every request of its
session; its section is rendered by PyYAML's pure-Python emitter (the bytes Agently sends), about
2 s per 600 KB of small items, so a larger memo is refused where it is written (``PUT .../memo``,
an import, a hook's result) rather than sent and rendered."""


def memo_over_limit(memo: Any) -> int | None:
    """The memo's size as JSON (UTF-8 bytes) when it is over :data:`MEMO_MAX_BYTES`, else None."""
    if memo is None or (isinstance(memo, str) and len(memo) * 4 <= MEMO_MAX_BYTES):
        return None
    try:
        size = len(orjson.dumps(memo))
    except TypeError:
        return None  # not storable: refused as such by its writer
    return size if size > MEMO_MAX_BYTES else None


def memo_limit_message(size: int) -> str:
    """What a client is told when its memo is over :data:`MEMO_MAX_BYTES`."""
    return (f"the memo is {size} bytes as JSON; a memo may hold at most {MEMO_MAX_BYTES} bytes "
            f"({MEMO_MAX_BYTES // 1024} KiB), since it is sent with every request of its session: "
            "keep durable facts and summaries in it, not transcripts")


_SLOT_REFERENCE = re.compile(r"\$\{([^}]+)\}")
_SLOT_TITLES = {"system": "SYSTEM", "developer": "DEVELOPER DIRECTIONS", "chat_history": "CHAT HISTORY",
                "info": "INFO", "tools": "TOOLS", "action_results": "ACTION RESULTS", "instruct": "INSTRUCT",
                "examples": "EXAMPLES", "input": "INPUT", "output_requirement": "OUTPUT REQUIREMENT",
                "output": "OUTPUT", "attachment": "ATTACHMENT"}
_SLOT_ALIASES = {"instruction": "instruct", "instructions": "instruct", "output": "output_requirement",
                 "outputrequirement": "output_requirement"}
"""Agently's prompt slot references (``AgentlyPromptGenerator._render_slot_reference``, default
``prompt.prompt_title_mapping``): ``${INPUT}`` reads ``[INPUT]``, ``${INFO.task}`` ``[INFO > task]``,
``${OUTPUT}`` ``[OUTPUT REQUIREMENT]``; a name that is no slot stays as written."""


def _slot_title(match: re.Match[str]) -> str:
    slot, _, path = match.group(1).strip().partition(".")
    key = slot.strip().lower().replace("-", "_")
    title = _SLOT_TITLES.get(_SLOT_ALIASES.get(key, key))
    if title is None:
        return match.group(0)
    path = path.strip()
    return f"[{title} > {path}]" if path else f"[{title}]"


def _slots_replaced(value: Any) -> Any:
    """*value* with every slot reference in its strings replaced (not in keys), as Agently does to
    a prompt section before it renders it."""
    if isinstance(value, str):
        return _SLOT_REFERENCE.sub(_slot_title, value) if "${" in value else value
    if isinstance(value, dict):
        return {key: _slots_replaced(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_slots_replaced(item) for item in value]
    return value


def section_text(value: Any) -> str:
    """A prompt section's body as Agently renders it: a scalar as ``str()``, anything else as YAML
    with sorted keys and YAML's trailing newline kept."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return str(value)
    return yaml.safe_dump(value, allow_unicode=True)


def memo_text(memo: Any) -> str:
    """The memo's section body, byte for byte as Agently renders its ``CHAT SESSION MEMO``
    section: a text memo stripped and dedented (``Prompt.set``), slot references such as
    ``${INPUT}`` replaced in text and in a structure's values, then :func:`section_text`.

    Kept once rendered (:class:`_MemoRenders`, by the memo's JSON text): a session's memo is
    rendered once per change, not once per request."""
    if type(memo) is str and len(memo) <= 256 and "${" not in memo:  # the common text memo, as it is
        text = memo.strip()
        return dedent(text) if "\n" in text else text
    key = _memo_key(memo)
    if key is None:
        return _render_memo(memo)
    kept = _RENDERS.get(key)
    if kept is None:
        kept = _render_memo(memo)
        _RENDERS.put(key, kept)
    return kept


def memo_rendered(memo: Any) -> bool:
    """Whether :func:`memo_text` of *memo* is at hand (no memo, a scalar, a short plain text, or
    rendered and kept): when it is not, its first rendering may be long (PyYAML in pure Python),
    so the request path has it made off the event loop first."""
    if memo is None or isinstance(memo, (bool, int, float)) or (type(memo) is str and len(memo) <= 256
                                                                 and "${" not in memo):
        return True  # a scalar is never kept (no key) and renders in microseconds (its str())
    key = _memo_key(memo)
    return key is not None and _RENDERS.get(key) is not None


def _render_memo(memo: Any) -> str:
    if isinstance(memo, str):
        memo = memo.strip()
        if "\n" in memo:
            memo = dedent(memo)
    return section_text(_slots_replaced(memo))


def _memo_key(memo: Any) -> bytes | None:
    """What tells one memo's rendering from another's: its JSON text (a text memo's quoted, so
    ``"[1]"`` and ``[1]`` differ), or its ``repr`` when that text holds a ``null`` (orjson writes
    NaN and infinities, which a hook or a JSON5 import may leave, as ``null`` too). None for a
    memo not worth keeping (a short text without slots, a scalar) or one that is not JSON."""
    if isinstance(memo, (dict, list)) or (isinstance(memo, str) and ("${" in memo or len(memo) > 256)):
        try:
            key = orjson.dumps(memo)
        except TypeError:
            return None
        return b"r" + repr(memo).encode("utf-8", "surrogatepass") if b"null" in key else b"j" + key
    return None


class _MemoRenders:
    """Rendered memos by their JSON text, least recently used dropped first: at most
    ``entries`` of them and ``chars`` characters of keys and texts together. Thread-safe (a
    memo may be rendered in a worker thread to warm this, ``handlers.put_memo``)."""

    def __init__(self, entries: int, chars: int) -> None:
        self.entries, self.chars = entries, chars
        self._held: OrderedDict[bytes, str] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: bytes) -> str | None:
        with self._lock:
            text = self._held.get(key)
            if text is not None:
                self._held.move_to_end(key)
            return text

    def put(self, key: bytes, text: str) -> None:
        size = len(key) + len(text)
        if size > self.chars:
            return
        with self._lock:
            old = self._held.pop(key, None)
            if old is not None:
                self._size -= len(key) + len(old)
            self._held[key] = text
            self._size += size
            while len(self._held) > self.entries or self._size > self.chars:
                dropped, dropped_text = self._held.popitem(last=False)
                self._size -= len(dropped) + len(dropped_text)

    def drop(self, key: bytes) -> None:
        with self._lock:
            text = self._held.pop(key, None)
            if text is not None:
                self._size -= len(key) + len(text)

    def clear(self) -> None:
        with self._lock:
            self._held.clear()
            self._size = 0


_RENDERS = _MemoRenders(entries=1024, chars=8 * 1024 * 1024)


def forget_memo_render(memo: Any) -> None:
    """Drop *memo*'s rendering, if kept (its session was erased: its text leaves this process).
    Other sessions' renders stay: one tenant's erasures cost no one else a rendering."""
    if (key := _memo_key(memo)) is not None:
        _RENDERS.drop(key)


def memo_section(memo: Any) -> str:
    """``[CHAT SESSION MEMO]:`` and the memo, ending with the blank line that ends a section
    (the next section, if any, follows directly)."""
    return f"{MEMO_HEADER}{memo_text(memo)}\n"


def carries_history(messages: Sequence[Message]) -> bool:
    """True when the client sent its own conversation history (an assistant message before the
    prefill, ``session.record.prefill_start``: assistant messages that end the request are the
    start of the model's turn, not history).

    Such a client manages its history itself: the gateway injects no window (it would repeat
    what the client already sent) and records only the messages after the last assistant one.
    """
    return any(m.get("role") == "assistant" for m in messages[:prefill_start(messages)])


def sent_role(role: Any) -> str:
    """The role a window message is sent under: Agently's default ``prompt.role_mapping`` keeps
    system, developer, user and assistant, and sends any other role as ``assistant`` (``_:
    assistant``), so a ``narrator`` message or a ``tool`` message without a ``tool_call_id``
    (which no provider takes back as it is) goes as the assistant's. The window keeps the role."""
    return role if type(role) is str and role in AGENTLY_ROLES else "assistant"


def normalise_window(window: Sequence[Message]) -> list[Message]:
    """The window as Agently sends a chat history (strict role order): each role mapped as Agently
    maps it (:func:`sent_role`), then consecutive messages of
    one role are merged into one (their texts joined by a blank line), a history that does not
    start with a user message gets a user ``[CHAT HISTORY]`` first, and one that does not end
    with an assistant message gets an assistant ``[User continue input]`` last.

    Agently (``rich_content: false``) also drops non-text parts; the gateway keeps them: a merged
    message with a non-text part keeps its content as a part list. Structured messages (tool
    calls and their results, ``is_structured``) are kept as they are; a tool result at the start
    (its call was bounded away) is left out."""
    return _normalise(window)[0]


def _normalise(window: Sequence[Message], answered: Sequence[str] | None = None,
               tools: bool = True) -> tuple[list[Message], list[int], bool]:
    """:func:`normalise_window`, how many window messages each result message stands for (0
    for a marker) and whether the window was plain (text only, nothing structured). A window
    with tool calls is :func:`paired` first (*answered* and *tools* as there)."""
    plain = not any(is_structured(m) for m in window)  # counts stand for a paired window's messages
    if not plain:
        window = paired(window, answered=answered, tools=tools)
    out: list[Message] = []
    counts: list[int] = []
    runs: dict[int, list[Any]] = {}  # index in out -> contents to join (a run of several, or not text)
    run_role: str | None = None  # the role of out[-1] while more of its run may follow
    for message in window:
        role = message.get("role")
        if message.get("tool_calls") or (role == "tool" and "tool_call_id" in message):  # is_structured
            plain = False
            out.append(dict(message))
            counts.append(1)
            run_role = None
            continue
        role = sent_role(role)
        content = message.get("content")
        if type(content) is not str:
            plain = False
        if role == run_role:
            index = len(out) - 1
            runs.setdefault(index, [out[index]["content"]]).append(content)
            counts[index] += 1
            continue
        if type(content) is not str:
            runs[len(out)] = [content]
        out.append({"role": role, "content": content})  # a lone text message is already joined
        counts.append(1)
        run_role = role
    if not out:
        return [], [], plain
    for index, contents in runs.items():
        out[index] = _joined(out[index]["role"], [part for content in contents for part in _parts(content)])
    if out[0]["role"] != "user":
        out.insert(0, {"role": "user", "content": CHAT_HISTORY_OPENER})
        counts.insert(0, 0)
    if out[-1]["role"] != "assistant":
        out.append({"role": "assistant", "content": CONTINUE_INPUT})
        counts.append(0)
    return out, counts, plain


def paired(window: Sequence[Message], *, answered: Sequence[str] | None = None,
           tools: bool = True) -> list[Message]:
    """*window* as a provider takes a history back: every tool call followed by its answer.

    Providers refuse a call that no tool result answers next (a client that went on without
    running it: LangChain's structured output, a ``tool_choice`` extraction) and a result whose
    call is not right before it (the call was bounded away). So a call is left out of its
    assistant message unless one of the tool results that follow the message answers it, and
    a result is left out unless it answers a call so kept; an assistant message left with no
    content and no call is left out. The calls of the window's last message are answered by the
    request itself: *answered* are the ids of its leading tool results (None: kept, unchecked).
    Without *tools* (a Messages request that defines no tools: Anthropic refuses any tool block
    then) every call and result is left out, and the thinking recorded with the calls. The
    record is not changed: this is what is sent."""
    out: list[Message] = []
    i, n = 0, len(window)
    while i < n:
        message = window[i]
        i += 1
        calls = message.get("tool_calls")
        if not calls:
            if not (message.get("role") == "tool" and "tool_call_id" in message):  # an unpaired result goes
                out.append(message)
            continue
        results: list[Message] = []
        while i < n and window[i].get("role") == "tool" and "tool_call_id" in window[i]:
            results.append(window[i])
            i += 1
        if not tools:
            ids: set[Any] = set()
        elif i == n and answered is None:
            ids = {call.get("id") for call in calls}
        else:
            ids = {r["tool_call_id"] for r in results} | (set(answered or ()) if i == n else set())
        kept = [call for call in calls if call.get("id") in ids]
        ids = {call.get("id") for call in kept}
        if len(kept) == len(calls):
            out.append(message)
        elif kept:
            out.append({**message, "tool_calls": kept})
        elif message.get("content"):  # its text stays; the thinking that came with the calls goes with them
            out.append({k: v for k, v in message.items() if k not in ("tool_calls", "reasoning")})
        done: set[Any] = set()
        for result in results:  # each kept call's first answer
            if result["tool_call_id"] in ids and result["tool_call_id"] not in done:
                done.add(result["tool_call_id"])
                out.append(result)
    return out


def answered_calls(messages: Sequence[Message]) -> list[str]:
    """The ids of the tool calls a request's new messages answer first (its leading tool
    results, after its system messages): what may follow a window that ends with tool calls."""
    ids: list[str] = []
    for message in messages:
        role = message.get("role")
        if role in ("system", "developer") and not ids:
            continue
        if role != "tool" or not isinstance(message.get("tool_call_id"), str):
            break
        ids.append(message["tool_call_id"])
    return ids


@dataclass(frozen=True, slots=True)
class _Normal:
    """A normalised window, kept for a *plain* window (text messages only, no tool calls or
    results, no part lists) so that a round's append and a cut from the front carry it over.

    Its *core* is the normalised window without the ``[CHAT HISTORY]`` and ``[User continue
    input]`` markers: ``counts`` (how many window messages each core message stands for),
    ``roles``, the ``last`` message and ``core``, their JSON text (``session.encoded``). ``out``,
    the whole normalised window as message objects, is kept only once asked for
    (``SessionState.normalised``): the Chat Completions path forwards the JSON text alone, and
    carrying the objects would touch every one of them each round."""

    plain: bool
    counts: list[int]
    roles: list[str]
    last: Message | None
    core: EncodedList
    out: list[Message] | None

    @classmethod
    def of(cls, window: Sequence[Message], *, keep_out: bool = True) -> _Normal:
        out, counts, plain = _normalise(window)
        start = 1 if counts and counts[0] == 0 else 0
        end = len(counts) - 1 if len(counts) > start and counts[-1] == 0 else len(counts)
        core = out[start:end]
        chat = [openai_form(m) for m in core]  # the JSON text is what Chat Completions is sent
        return cls(plain, counts[start:end], [str(m.get("role")) for m in core], core[-1] if core else None,
                   EncodedList.of(chat), out if keep_out else None)

    @property
    def opener(self) -> bool:
        """Whether a ``[CHAT HISTORY]`` user message goes first (the core starts otherwise)."""
        return _markers(*self._ends())[0]

    @property
    def closer(self) -> bool:
        """Whether a ``[User continue input]`` assistant message goes last."""
        return _markers(*self._ends())[1]

    def _ends(self) -> tuple[str | None, str | None]:
        return (self.roles[0], self.roles[-1]) if self.roles else (None, None)

    def items(self) -> bytes:
        """The JSON text of the normalised window's messages, comma-separated, without brackets
        (without Anthropic-only keys: :func:`openai_form`)."""
        return _dressed_items(*_markers(*self._ends()), self.core.items())

    def _core_out(self) -> list[Message] | None:
        if self.out is None:
            return None
        return self.out[1 if self.opener else 0:len(self.out) - 1 if self.closer else len(self.out)]

    @classmethod
    def _dressed(cls, counts: list[int], roles: list[str], last: Message | None, core: EncodedList,
                 body: list[Message] | None) -> _Normal:
        new = cls(True, counts, roles, last, core, None)
        if body is None:
            return new
        head = [{"role": "user", "content": CHAT_HISTORY_OPENER}] if new.opener else []
        tail = [{"role": "assistant", "content": CONTINUE_INPUT}] if new.closer else []
        return replace(new, out=[*head, *body, *tail])

    def appended(self, messages: list[Message]) -> _Normal | None:
        """This normalised window with *messages* appended (None unless all is plain)."""
        if not self.plain or not all(_is_plain(m) for m in messages):
            return None
        counts, roles, last = list(self.counts), list(self.roles), self.last
        body = self._core_out()
        body = None if body is None else list(body)
        added: list[Message] = []  # the core's new last messages, after its last *replaced* ones
        replaced = 0
        for message in messages:
            role, content = sent_role(message.get("role")), message["content"]
            if last is not None and last["role"] == role:  # a run of one role: texts joined by a blank line
                last = {"role": role, "content": f"{last['content']}\n\n{content}"}
                counts[-1] += 1
                if added:
                    added[-1] = last
                else:
                    replaced, added = 1, [last]
                if body is not None:
                    body[-1] = last
            else:
                last = {"role": role, "content": content}
                counts.append(1)
                roles.append(role)
                added.append(last)
                if body is not None:
                    body.append(last)
        return self._dressed(counts, roles, last, self.core.appended(added, replacing=replaced), body)

    def without_first(self, dropped: int) -> _Normal | None:
        """This normalised window without the window's first *dropped* messages (None unless
        plain, or when the cut splits a merged run)."""
        if not self.plain:
            return None
        start = 0
        while dropped > 0 and start < len(self.counts):
            if self.counts[start] > dropped:
                return None
            dropped -= self.counts[start]
            start += 1
        body = self._core_out()
        return self._dressed(self.counts[start:], self.roles[start:], self.last if start < len(self.counts) else None,
                             self.core.without_first(start), None if body is None else body[start:])


_OPENER_JSON = orjson.dumps({"role": "user", "content": CHAT_HISTORY_OPENER})
_CONTINUE_JSON = orjson.dumps({"role": "assistant", "content": CONTINUE_INPUT})


def _markers(first: str | None, last: str | None) -> tuple[bool, bool]:
    """Which of Agently's markers a normalised window whose core runs from role *first* to role
    *last* takes (None: an empty core, none): ``[CHAT HISTORY]`` first unless the core starts
    with the user, ``[User continue input]`` last unless it ends with the assistant."""
    return first is not None and first != "user", last is not None and last != "assistant"


def _dressed_items(opener: bool, closer: bool, core: bytes | memoryview) -> bytes:
    """A normalised window's JSON items: *core* between the markers it needs."""
    pieces = (_OPENER_JSON if opener else b"", core, _CONTINUE_JSON if closer else b"")
    return b",".join([piece for piece in pieces if len(piece)])


def _simple(messages: Sequence[Message], after: str | None = None) -> bool:
    """Whether *messages* (following a message of role *after*) are all ``{"role": <str>,
    "content": <str>}``, keys in that order, each role one Agently sends as itself
    (:data:`AGENTLY_ROLES`), and no two in a row have the same role: then
    :func:`normalise_window` changes nothing about them but to add its markers, and their JSON
    text is that of the normalised window's messages."""
    previous = after
    for message in messages:
        role = message.get("role")
        if (len(message) != 2 or type(role) is not str or role not in AGENTLY_ROLES or role == previous
                or type(message.get("content")) is not str or next(iter(message)) != "role"):
            return False
        previous = role
    return True


def _is_plain(message: Message) -> bool:
    return type(message.get("content")) is str and not is_structured(message)


ANTHROPIC_ONLY = ("reasoning", "is_error")
"""Keys a structured message may carry for Anthropic alone (``session.structured``): the thinking
recorded with tool calls, a failed tool result's flag."""


def openai_form(message: Message) -> Message:
    """*message* without the Anthropic-only keys (:data:`ANTHROPIC_ONLY`): what the OpenAI
    protocols are sent."""
    if not any(key in message for key in ANTHROPIC_ONLY):
        return message
    return {k: v for k, v in message.items() if k not in ANTHROPIC_ONLY}


def is_structured(message: Message) -> bool:
    """An assistant message with ``tool_calls``, or a tool result answering one
    (``session.structured``): kept whole in the window, never merged with its neighbours."""
    return bool(message.get("tool_calls")) or (message.get("role") == "tool" and "tool_call_id" in message)


def _parts(content: Any) -> list[Any]:
    if isinstance(content, list):
        return list(content)
    return [{"type": "text", "text": str(content)}]


def _joined(role: str, parts: list[Any]) -> Message:
    texts = [p["text"] for p in parts if isinstance(p, dict) and p.get("type") == "text" and "text" in p]
    if len(texts) == len(parts):
        return {"role": role, "content": "\n\n".join(str(t) for t in texts)}
    return {"role": role, "content": parts}


def with_memo(content: Any, memo: Any) -> Any:
    """The final user message's content with the memo section placed as Agently places it.

    - an Agently-rendered prompt (it starts with a ``[SECTION]:`` line and ends with
      ``[OUTPUT]:``): the memo goes before the first of INSTRUCT, EXAMPLES, INPUT, OUTPUT
      REQUIREMENT, OUTPUT, so after TOOLS, ACTION RESULTS, INFO and any other section;
    - a JSON object (Agently sends ``agent.input({...})`` alone as one): it becomes the
      ``[INPUT]`` section, as YAML with sorted keys, between the memo and ``[OUTPUT]:``;
    - any other text: ``[CHAT SESSION MEMO]`` + ``[INPUT]`` (the text) + ``[OUTPUT]:``.

    A content-part list gets this done to its first text part (a memo part first if it has none).
    """
    if isinstance(content, list):
        for i, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                return [*content[:i], {**part, "text": with_memo(part["text"], memo)}, *content[i + 1:]]
        return [{"type": "text", "text": memo_section(memo)}, *content]
    section = memo_section(memo) + "\n"
    if isinstance(content, str):
        headers = list(_HEADER.finditer(content))
        rendered = bool(headers) and headers[0].start() == 0 and headers[-1].group(1) == "OUTPUT" \
            and not content[headers[-1].end():].strip()
        if rendered:
            late = next(h for h in headers if h.group(1).strip().upper() in LATE_SECTIONS)
            return content[: late.start()] + section + content[late.start():]
        body = content
    elif content is None:
        body = ""
    else:
        body = section_text(content)
    return f"{section}[INPUT]:\n{body}\n\n[OUTPUT]:"


def inject(messages: list[Message], state: SessionState | None, *, window: bool = True,
           memo: bool = True, memo_placement: str = "user_section", encoded: bool = False) -> list[Any]:
    """The messages to forward: system messages, then the context window (normalised as Agently
    normalises a chat history), then the new messages; the memo placed in the final user
    message as Agently places it (:func:`with_memo`), or as a system message after the
    request's own. Returns *messages* itself when nothing is injected.

    With *encoded* the window's messages are one ``orjson.Fragment`` of their kept JSON text
    (:meth:`SessionState.normalised_items`): the list is then only for ``orjson.dumps``, which
    writes the same bytes as for the messages themselves."""
    if state is None:
        return messages
    add_window = window and bool(state.context_window) and not carries_history(messages)
    add_memo = memo and state.memo is not None
    if not add_window and not add_memo:
        return messages
    head = 0
    while head < len(messages) and messages[head].get("role") in ("system", "developer"):
        head += 1
    system, rest = list(messages[:head]), list(messages[head:])
    if add_memo and memo_placement == "system":
        system.append({"role": "system", "content": memo_section(state.memo)})
    elif add_memo:
        for i in range(len(rest) - 1, -1, -1):
            if rest[i].get("role") == "user":
                rest[i] = {**rest[i], "content": with_memo(rest[i].get("content"), state.memo)}
                break
    if not add_window:
        return system + rest
    sendable = state.sendable(rest)
    if sendable is not None:
        return system + ([openai_form(m) for m in sendable] if encoded else sendable) + rest
    if encoded:
        items = state.normalised_items()
        return system + ([orjson.Fragment(items)] if items else []) + rest
    return system + state.normalised() + rest


# --- Agently's JSON form -------------------------------------------------------------------

def _messages(value: Any, name: str) -> list[Message]:
    """Agently's ``{"role", "content"}`` messages, and the structure this gateway's own export
    writes (``session.structured``): an assistant message's ``tool_calls`` (and the ``reasoning``
    recorded with them) and a tool result's ``tool_call_id`` (and ``is_error``), rebuilt field by
    field. Other keys
    are left out, as Agently leaves them."""
    if not isinstance(value, list):
        raise InvalidSession(f"'{name}' must be a list of chat messages")
    out: list[Message] = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise InvalidSession(f"'{name}[{i}]' must be an object with 'role' and 'content'")
        content = m["content"]
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidSession(f"'{name}[{i}].content' must be a string or a list of content parts")
        if content is None and m.get("tool_calls") is None:
            raise InvalidSession(f"'{name}[{i}].content' must be a string or a list of content parts (null only "
                                 "on an assistant message with tool_calls)")
        if m["role"] == "tool" and m.get("tool_call_id") is None:
            raise InvalidSession(f"'{name}[{i}]' is a tool result without 'tool_call_id': a session with tool "
                                 "calls that lost them going through Agently (its Session keeps no tool calls); "
                                 "import the gateway's own export of it instead")
        message: Message = {"role": m["role"], "content": content}
        if m.get("tool_calls") is not None:
            if m["role"] != "assistant":
                raise InvalidSession(f"'{name}[{i}].tool_calls' is only for an assistant message")
            message["tool_calls"] = _tool_calls(m["tool_calls"], f"{name}[{i}].tool_calls")
            if content == "":  # how an export writes a message that is only tool calls (agently_message)
                message["content"] = None
            if m.get("reasoning") is not None:
                message["reasoning"] = _reasoning(m["reasoning"], f"{name}[{i}].reasoning")
        if m.get("tool_call_id") is not None:
            if m["role"] != "tool" or not isinstance(m["tool_call_id"], str):
                raise InvalidSession(f"'{name}[{i}].tool_call_id' must be a string, on a tool message")
            message["tool_call_id"] = m["tool_call_id"]
            if m.get("is_error") is True:
                message["is_error"] = True
        out.append(message)
    return out


def _reasoning(value: Any, where: str) -> list[dict[str, str]]:
    """Anthropic's ``thinking`` (``thinking`` and ``signature``) and ``redacted_thinking``
    (``data``) blocks, all strings."""
    fields = {"thinking": ("thinking", "signature"), "redacted_thinking": ("data",)}
    if not isinstance(value, list):
        raise InvalidSession(f"'{where}' must be a list of thinking blocks")
    blocks: list[dict[str, str]] = []
    for i, block in enumerate(value):
        names = fields.get(str(block.get("type"))) if isinstance(block, dict) else None
        if names is None or not all(isinstance(block.get(n), str) for n in names):
            raise InvalidSession(f"'{where}[{i}]' must be {{\"type\": \"thinking\", \"thinking\", \"signature\"}} "
                                 "or {\"type\": \"redacted_thinking\", \"data\"}, all strings")
        blocks.append({"type": block["type"], **{n: block[n] for n in names}})
    return blocks


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """Tool calls as Chat Completions writes them: ``{"id", "type": "function", "function":
    {"name", "arguments"}}``, or ``type: custom`` with ``custom: {"name", "input"}``."""
    if not isinstance(value, list) or not value:
        raise InvalidSession(f"'{where}' must be a non-empty list of tool calls")
    calls: list[dict[str, Any]] = []
    for i, call in enumerate(value):
        kind = str(call.get("type", "function")) if isinstance(call, dict) else ""
        spec = call.get(kind) if isinstance(call, dict) and kind in ("function", "custom") else None
        text = "arguments" if kind == "function" else "input"
        if not isinstance(spec, dict) or not isinstance(call.get("id"), str) \
                or not isinstance(spec.get("name"), str) or not isinstance(spec.get(text), str):
            raise InvalidSession(f"'{where}[{i}]' must be {{\"id\", \"type\": \"function\", \"function\": "
                                 f"{{\"name\", \"arguments\"}}}} (or type custom with custom.name and "
                                 "custom.input), all strings")
        calls.append({"id": call["id"], "type": kind, kind: {"name": spec["name"], text: spec[text]}})
    return calls


def to_agently(session_id: str, full_context: list[Message], state: SessionState) -> dict[str, Any]:
    """The session in Agently's JSON form (``Session.to_serializable_session_data``)."""
    return {"id": session_id, "auto_resize": state.auto_resize,
            "full_context": [agently_message(m) for m in full_context],
            "context_window": [agently_message(m) for m in state.context_window], "memo": state.memo,
            "session_settings": state.settings}


def agently_message(message: Message) -> Message:
    """*message* as Agently's loader takes it: an assistant message that is only tool calls has
    ``content: ""`` (Agently refuses ``null``; :func:`_messages` reads it back as none)."""
    if message.get("content") is None and message.get("tool_calls"):
        return {**message, "content": ""}
    return message


def from_agently(data: Any) -> tuple[list[Message], SessionState]:
    """Read Agently's JSON form; a missing ``context_window`` falls back to ``full_context``
    as Agently does. Raises ``InvalidSession`` saying which field is wrong."""
    if not isinstance(data, dict):
        raise InvalidSession("a session must be a JSON object (Agently's get_json_session() output)")
    full = _messages(data.get("full_context", []), "full_context")
    raw_window = data.get("context_window", data.get("window_context"))
    window = full if raw_window is None else _messages(raw_window, "context_window")
    settings = data.get("session_settings") or {}
    if not isinstance(settings, dict):
        raise InvalidSession("'session_settings' must be an object")
    memo = data.get("memo")
    if memo is not None and not isinstance(memo, (str, dict, list)):
        raise InvalidSession("'memo' must be a string, an object, a list or null")
    size = memo_over_limit(memo)
    if size is not None:
        raise InvalidSession(f"'memo': {memo_limit_message(size)}")
    for name, value in (("full_context", full), ("context_window", window), ("memo", memo),
                        ("session_settings", settings)):
        _storable(value, name)
    return full, SessionState(list(window), memo, dict(settings), bool(data.get("auto_resize", True)))


def _storable(value: Any, name: str) -> None:
    """Raise ``InvalidSession`` naming the first place in *value* that cannot be stored and sent
    as it is: a string (or key) holding a lone surrogate (JSON5's ``"\\ud83d"`` escape without its
    pair: no UTF-8 text, so no JSON body, holds it), or an integer beyond 64 bits."""
    try:
        orjson.dumps(value)
    except TypeError:
        where, what = _unstorable(value, name) or (name, "a value that cannot be stored")
        raise InvalidSession(f"'{where}' holds {what}") from None


def _unstorable(value: Any, where: str) -> tuple[str, str] | None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where, ("a lone surrogate (a \\ud800-\\udfff escape without its pair), which no UTF-8 text "
                           "and so no request to a provider can carry")
        return None
    if isinstance(value, (bool, float)) or value is None:
        return None
    if isinstance(value, int):
        return None if -(2 ** 63) <= value < 2 ** 64 else (where, "an integer beyond 64 bits")
    if isinstance(value, dict):
        for key, item in value.items():
            found = _unstorable(key, f"{where} (a key)") or _unstorable(item, f"{where}.{key}")
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _unstorable(item, f"{where}[{i}]")
            if found:
                return found
    return None


def with_pending(state: SessionState, strategy: str, appends: list[int]) -> SessionState:
    """*state* with *appends* waiting for the hooks' analysis (``SessionState.pending``) under the
    ``hook`` strategy; under any other strategy nothing waits, so ``pending`` is emptied."""
    if strategy == "hook":
        return replace(state, pending=[*state.pending, *appends])
    return replace(state, pending=[]) if state.pending else state
