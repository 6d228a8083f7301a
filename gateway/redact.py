"""Export redaction: the policy's rules on recorded blocks, then optional PII detectors.

**What it reads.** A recorded message's content is either Agently block form,
``"[key]:\\nvalue\\n[key2]:\\nvalue2"`` (the policy listed keys), or free text (keys were null).
Content counts as blocks when its first line is a header ``[name]:``; a block's value runs,
over any number of lines, until the next line that is exactly a header. Given the policy's key
names (``keys``), only ``[k]:`` lines for those names are headers, so a value that happens to
contain a header-like line is not split. OpenAI content-part lists are handled part by part:
text parts as free text; other parts (images, audio) are kept only when the free-text action
is ``keep``.

**Where a block ends.** A value may itself hold a line that looks like a header (a client can
send ``ticket_id = "T-77\\n[input.intent]:\\nSECRET"``), so the text alone cannot say where a
block ends. A round recorded since block boundaries are kept carries them next to its text
(the message's ``blocks``: ``[key, start, end]`` per block, ``[]`` for free text; see
``session.record.KeyedText``), and they decide, whatever header-like lines the values hold.
Without them (rounds recorded before, imports and chat-history edits, whose text was checked
to be in recorded form, and text given directly) the text is parsed by header lines, and the
parse is never trusted further than it can be: when a key's header appears more than once, or
out of the policy's key order, a value ran over the header that follows it, and every block of
that message gets the strictest rule among its keys (drop, then mask, then hash, then keep).
For a *round* recorded before boundaries were kept (``legacy``), whose values no check vetted,
any block may be the tail of an earlier value, so each block gets the strictest rule of its own
key and of every key before it in the message.

**Rules.** A rule ``{key, action}`` selects a block by its exact key name; the key ``"*"`` is
the default for free text and for blocks no rule names. The first rule for a key wins.
Actions:

- ``keep``: exported as recorded (then the detectors run on it). The default without rules.
- ``drop``: the block is left out; a message left with nothing is left out.
- ``mask``: the value becomes :data:`MASK` (``"****"``, fixed, so that lengths do not leak).
- ``hash``: the value (surrounding whitespace stripped) becomes a pseudonym
  ``"pseud:" + first 16 hex digits of HMAC-SHA256(tenant key, value)``: equal values give equal
  pseudonyms within a tenant, different ones across tenants.

**Tenant key.** :func:`tenant_secret` derives it with HKDF-SHA256 from the configured export
secret (at least 16 bytes), salt ``b"sessiongate-export-pseudonym-v1"``, info
``b"tenant:" + tenant`` (UTF-8), 32 bytes.

**Detectors** (``email``, ``phone``, ``card`` with the Luhn check, ``iban`` with the mod-97
check) run on kept free text and kept block values, after the rules. A hit is replaced by a
typed placeholder (``[EMAIL]``, ``[PHONE]``, ``[CARD]``, ``[IBAN]``) or, with action ``hash``,
by the pseudonym of its normalised form (e-mail lower-cased; phone ``+`` and digits; card
digits, in ASCII; IBAN upper-case, letters and digits only), so detected values still join.
Where hits overlap, the order iban, card, email, phone decides. Digit groups (cards, phones,
IBANs) may be separated by a space, a no-break, thin or other Unicode space, a dash, and for
cards and phones also a dot, a tab or (cards) a slash or two such characters; an IBAN may be
lower-case. Format characters (Unicode Cf: zero-width spaces and joiners, the soft hyphen,
bidirectional controls ...) are not read at all: ``bob\u200b@example.com`` is an address and a
zero-width space separates digit groups as a space does; a hit's span in the original text
covers them, so they are masked with it. The phone detector is a heuristic: 7 to 15 digits
that start with ``+`` or contain separators, not a date or an IPv4 address. Every detector takes
time linear in the text (an export runs them on whatever a client recorded). Not detected:
look-alike letters (a Cyrillic ``а`` in a domain, a full-width ``＠``), a value split over two
messages, and escaped forms (``\u0040`` in JSON text, ``%40``).

Raises ``ValueError`` for an unknown action or detector, or a too-short export secret.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.session.record import BLOCKS_FIELD, KeyedText

MASK = "****"
ACTIONS = ("keep", "drop", "mask", "hash")
DETECTORS = ("iban", "card", "email", "phone")
"""Detector names, in the order that settles overlapping hits."""
DEFAULT_KEY = "*"
STRICTNESS = ("keep", "hash", "mask", "drop")
"""Actions from the least to the most strict: a span whose key is in doubt gets the strictest."""
PSEUDONYM_PREFIX = "pseud:"

_SALT = b"sessiongate-export-pseudonym-v1"
_HEADER = re.compile(r"\[(.+)\]:")


# --------------------------------------------------------------------------- rules and secrets


@dataclass(frozen=True, slots=True)
class RedactionRule:
    """Apply ``action`` to the block named ``key`` (``"*"``: free text and unnamed blocks)."""

    key: str
    action: str

    def to_dict(self) -> dict[str, str]:
        return {"key": self.key, "action": self.action}


def parse_rules(rules: Iterable[Any]) -> tuple[RedactionRule, ...]:
    """Rules from mappings or objects with ``key`` and ``action`` (e.g. the policy's ``RedactRule``).

    Raises ``ValueError`` for a missing key or an unknown action.
    """
    out = []
    for number, rule in enumerate(rules, start=1):
        key = rule.get("key") if isinstance(rule, Mapping) else getattr(rule, "key", None)
        action = rule.get("action") if isinstance(rule, Mapping) else getattr(rule, "action", None)
        if not isinstance(key, str) or not key:
            raise ValueError(f"redaction rule {number}: key must be a non-empty string")
        if action not in ACTIONS:
            raise ValueError(f"redaction rule {number}: action must be one of {', '.join(ACTIONS)}")
        out.append(RedactionRule(key, action))
    return tuple(out)


def tenant_secret(export_secret: bytes, tenant: str) -> bytes:
    """The tenant's 32-byte pseudonym key (HKDF-SHA256, see the module docstring).

    Raises ``ValueError`` when ``export_secret`` is shorter than 16 bytes.
    """
    if len(export_secret) < 16:
        raise ValueError("the export secret must be at least 16 bytes")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=b"tenant:" + tenant.encode())
    return hkdf.derive(export_secret)


def pseudonym(secret: bytes, value: str) -> str:
    """``"pseud:"`` + the first 16 hex digits of HMAC-SHA256(secret, value)."""
    return PSEUDONYM_PREFIX + hmac.new(secret, value.encode(), hashlib.sha256).hexdigest()[:16]


# --------------------------------------------------------------------------- detectors


@dataclass(frozen=True, slots=True)
class Finding:
    """A detected value: ``text[start:end]`` of ``kind``, ``normalized`` for pseudonyms."""

    kind: str
    start: int
    end: int
    normalized: str


_FORMAT = re.compile(
    "[\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]+")
"""Runs of format characters (Unicode category Cf: zero-width spaces and joiners, the soft hyphen,
bidirectional controls, the BOM, tags ...), which a reader does not see: the detectors read the
text without them, and a hit's span in the original text covers those inside it."""
_SPACE = "\u00a0\u2000-\u200a\u202f\u205f\u3000"
"""Spaces other than the ASCII one that people paste between digit groups (NBSP, thin, narrow ...)."""
_IBAN = re.compile(
    rf"\b[A-Za-z]{{2}}\d{{2}}(?:[ \-{_SPACE}]?[A-Za-z0-9]{{4}}){{2,7}}(?:[ \-{_SPACE}]?[A-Za-z0-9]{{1,3}})?\b")
_DIGIT_RUN = re.compile(rf"(?<![\w-])\d+(?:[ \t./\-{_SPACE}]{{1,2}}\d+)*(?![\w-])")
_LOCAL_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-"
_AT = re.compile(r"(?<=[A-Za-z0-9._%+-])@(?=[A-Za-z0-9-])")
_DOMAIN = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
r"""An e-mail address is ``[A-Za-z0-9._%+-]+@`` then ``_DOMAIN``, found as the expression
``[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}`` finds it (leftmost, then
from the end of the last hit), but from each ``@`` outwards: that expression, tried at every
character, read a long run of local-part characters with no ``@`` once per character
(quadratic: 40,000 characters took 3 s, with the GIL held). Here each character is read a bounded
number of times: the local part is the run of local characters before the ``@`` (not before the
last hit's end), and ``_DOMAIN`` only runs from an ``@``, over a run no other ``@`` shares."""
_PHONE = re.compile(
    rf"(?<![\w+.])\+?(?:\(\d{{1,5}}\)|\d)(?:[ \t.\-{_SPACE}]?(?:\(\d{{1,5}}\)|\d)){{6,24}}(?!\w)")
_NOT_PHONE = re.compile(r"\d{4}-\d{2}-\d{2}|\d{1,2}[./-]\d{1,2}[./-]\d{2,4}|\d{1,3}(?:\.\d{1,3}){3}|\d+\.\d+")


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a string of digits holds."""
    total = 0
    if not digits.isascii():  # any Unicode decimal digit (Arabic-Indic, full-width ...) counts as its value
        digits = "".join(str(int(ch)) for ch in digits)
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """The ISO 13616 mod-97 check of an IBAN (separators ignored, 15 to 34 characters) holds."""
    s = _iban_form(iban)
    if not 15 <= len(s) <= 34 or not s.isalnum():
        return False
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _iban_form(iban: str) -> str:
    """An IBAN as it is normalised: its letters and digits, upper-case."""
    return "".join(ch for ch in iban if ch.isalnum()).upper()


def _find_iban(text: str) -> Iterable[Finding]:
    for m in _IBAN.finditer(text):
        if iban_ok(m.group()):
            yield Finding("iban", m.start(), m.end(), _iban_form(m.group()))


def _find_card(text: str) -> Iterable[Finding]:
    """Card numbers: 13-19 digits, Luhn-valid, made of whole groups of a digit run."""
    for m in _DIGIT_RUN.finditer(text):
        run = m.group()  # once: a copy per group made a long run of short groups quadratic
        groups = [(g.start(), g.end()) for g in re.finditer(r"\d+", run)]
        i = 0
        while i < len(groups):
            hit = _longest_card(run, groups, i)
            if hit is None:
                i += 1
                continue
            j, digits = hit
            yield Finding("card", m.start() + groups[i][0], m.start() + groups[j][1], digits)
            i = j + 1


def _longest_card(run: str, groups: list[tuple[int, int]], i: int) -> tuple[int, str] | None:
    best = None
    digits = ""
    for j in range(i, len(groups)):
        if len(digits) + groups[j][1] - groups[j][0] > 19:
            break
        chunk = run[groups[j][0]:groups[j][1]]
        digits += chunk if chunk.isascii() else "".join(str(int(ch)) for ch in chunk)  # normalised to ASCII
        if len(digits) >= 13 and luhn_ok(digits):
            best = (j, digits)
    return best


def _find_email(text: str) -> Iterable[Finding]:
    """E-mail addresses, in linear time (see ``_DOMAIN``)."""
    end = 0  # where the last hit ended: a local part starts there at the earliest
    low = 0  # just after the last '@' looked at: no local part reaches back past it
    for at in _AT.finditer(text):
        a = at.start()
        before = text[max(end, low):a]
        local = len(before) - len(before.rstrip(_LOCAL_CHARS))
        low = a + 1
        domain = _DOMAIN.match(text, a + 1) if local else None
        if domain is not None:
            yield Finding("email", a - local, domain.end(), text[a - local:domain.end()].lower())
            end = domain.end()


def _find_phone(text: str, hidden: Callable[[int, int], bool] | None = None) -> Iterable[Finding]:
    """Phone numbers; *hidden(start, end)* says whether format characters were taken out of that
    span (they separated the digit groups, as a space would)."""
    for m in _PHONE.finditer(text):
        s = m.group()
        digits = "".join(str(int(ch)) for ch in s if ch.isdecimal())
        if not 7 <= len(digits) <= 15 or _NOT_PHONE.fullmatch(s):
            continue
        if not s.startswith("+") and s.isdigit() and not (hidden and hidden(m.start(), m.end())):
            continue
        yield Finding("phone", m.start(), m.end(), ("+" if s.startswith("+") else "") + digits)


_FINDERS: dict[str, Callable[[str], Iterable[Finding]]] = {
    "iban": _find_iban, "card": _find_card, "email": _find_email, "phone": _find_phone}


class _Visible:
    """*text* without its format characters (``_FORMAT``), and the way back: ``span(start, end)``
    of the visible text is the span of the original text it was read from (format characters
    inside it included). Linear: one entry per run of visible characters."""

    def __init__(self, text: str) -> None:
        pieces: list[str] = []
        self.starts: list[int] = []  # where each visible run starts in the visible text
        self.origins: list[int] = []  # and in the original text
        at = shown = 0
        for m in _FORMAT.finditer(text):
            if m.start() > at:
                self.starts.append(shown)
                self.origins.append(at)
                pieces.append(text[at:m.start()])
                shown += m.start() - at
            at = m.end()
        if at < len(text) or not self.starts:
            self.starts.append(shown)
            self.origins.append(at)
            pieces.append(text[at:])
        self.text = "".join(pieces)

    def _origin(self, index: int) -> int:
        run = bisect.bisect_right(self.starts, index) - 1
        return self.origins[run] + index - self.starts[run]

    def span(self, start: int, end: int) -> tuple[int, int]:
        return self._origin(start), self._origin(end - 1) + 1

    def hidden(self, start: int, end: int) -> bool:
        """True when format characters were taken out between ``start`` and ``end``."""
        first, last = self.span(start, end)
        return last - first != end - start


def find_pii(text: str, detectors: Collection[str]) -> list[Finding]:
    """Non-overlapping hits of ``detectors`` in ``text``, in text order. Format characters
    (zero-width spaces and the like) are not read: a hit may have them inside, and its span in
    ``text`` covers them."""
    visible = _Visible(text) if _FORMAT.search(text) else None
    read = visible.text if visible is not None else text
    taken = _disjoint(
        _find_phone(read, visible.hidden) if kind == "phone" and visible is not None else _FINDERS[kind](read)
        for kind in DETECTORS if kind in detectors)
    if visible is not None:
        taken = [Finding(hit.kind, *visible.span(hit.start, hit.end), hit.normalized) for hit in taken]
    return taken


def _start(hit: Finding) -> int:
    return hit.start


def _overlaps(spans: list[Finding], hit: Finding) -> bool:
    """True when *hit* overlaps one of *spans* (disjoint, non-empty, sorted by start): only the
    last span starting before *hit* ends can reach into it, as their ends are sorted too."""
    before = bisect.bisect_left(spans, hit.end, key=_start)
    return before > 0 and spans[before - 1].end > hit.start


def _disjoint(runs: Iterable[Iterable[Finding]]) -> list[Finding]:
    """The hits of *runs* (one per detector, in priority order) that overlap no hit kept before
    them, sorted by start: a hit is kept when it overlaps neither an earlier detector's kept hit
    nor one its own detector yielded before it. O(n log n): checking each hit against every kept
    one made 20,000 e-mail addresses take 40 s."""
    taken: list[Finding] = []
    for hits in runs:
        kept: list[Finding] = []
        for hit in hits:
            if _overlaps(taken, hit) or _overlaps(kept, hit):
                continue
            if not kept or kept[-1].start <= hit.start:
                kept.append(hit)  # a detector yields in text order: this is the usual case
            else:
                bisect.insort(kept, hit, key=_start)
        taken = sorted(taken + kept, key=_start)  # two sorted runs: merged in linear time
    return taken


# --------------------------------------------------------------------------- blocks


def parse_blocks(content: str, keys: Collection[str] | None = None) -> list[tuple[str, str]] | None:
    """``[(key, value), ...]`` of block-form content, or None when it is free text."""
    lines = content.split("\n")
    if _header(lines[0], keys) is None:
        return None
    blocks: list[tuple[str, list[str]]] = []
    for line in lines:
        key = _header(line, keys)
        if key is not None:
            blocks.append((key, []))
        else:
            blocks[-1][1].append(line)
    return [(key, "\n".join(value)) for key, value in blocks]


def join_blocks(blocks: Iterable[tuple[str, str]]) -> str:
    """The inverse of :func:`parse_blocks`: ``"[key]:\\nvalue"`` joined by newlines."""
    return "\n".join(f"[{key}]:\n{value}" for key, value in blocks)


def _header(line: str, keys: Collection[str] | None) -> str | None:
    m = _HEADER.fullmatch(line)
    if m is None or (keys is not None and m.group(1) not in keys):
        return None
    return m.group(1)


def _valid_spans(text: str, blocks: Any) -> list[tuple[str, int, int]] | None:
    """*blocks* as ``(key, start, end)`` when they describe *text* exactly as
    ``session.record.format_keyed`` writes it (each value right after its ``[key]:`` line, blocks
    joined by newlines, the last reaching the end of the text); ``[]`` for free text; None when
    they do not describe it (then the caller parses the text)."""
    if not isinstance(blocks, (list, tuple)):
        return None
    n = len(text)
    out: list[tuple[str, int, int]] = []
    at = 0
    for item in blocks:
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            return None
        key, start, end = item
        if not isinstance(key, str) or type(start) is not int or type(end) is not int:
            return None
        header = f"[{key}]:"
        after = at + len(header)
        if text[at:after] != header:
            return None
        if not (start == min(after + 1, n) and (start == after or text[after] == "\n") and start <= end <= n):
            return None
        out.append((key, start, end))
        if end < n and text[end] != "\n":
            return None
        at = end + 1
    if out and out[-1][2] != n:
        return None
    return out


# --------------------------------------------------------------------------- the redactor


class Redactor:
    """Applies one policy's export redaction for one tenant (see the module docstring)."""

    def __init__(self, rules: Iterable[Any], tenant_secret: bytes,
                 detectors: Iterable[str] | Mapping[str, str] = (), *,
                 keys: Sequence[str] | None = None) -> None:
        """``detectors``: names (hits masked) or ``{name: "mask" | "hash"}``; ``keys``: the
        policy's block names (input and reply keys), to split blocks only on those."""
        self.rules = parse_rules(rules)
        self._by_key: dict[str, str] = {}
        for rule in self.rules:
            self._by_key.setdefault(rule.key, rule.action)
        self._secret = tenant_secret
        chosen = dict(detectors) if isinstance(detectors, Mapping) else dict.fromkeys(detectors, "mask")
        for name, action in chosen.items():
            if name not in DETECTORS:
                raise ValueError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}")
            if action not in ("mask", "hash"):
                raise ValueError(f"detector {name}: action must be mask or hash")
        self.detectors = chosen
        self._keys = frozenset(keys) if keys is not None else None
        self._order = tuple(keys) if keys is not None else None

    def pseudonym(self, value: str) -> str:
        """This tenant's pseudonym of ``value``."""
        return pseudonym(self._secret, value)

    def describe(self) -> dict[str, Any]:
        """What this redactor does, for an export manifest (no secret material)."""
        return {
            "rules": [r.to_dict() for r in self.rules],
            "default": self._by_key.get(DEFAULT_KEY, "keep"),
            "detectors": dict(sorted(self.detectors.items())),
            "mask": MASK,
            "pseudonym": "pseud: + 16 hex of HMAC-SHA256(HKDF-SHA256(export secret, tenant), value)",
            "pseudonym_key_id": hmac.new(self._secret, b"key-id", hashlib.sha256).hexdigest()[:16],
        }

    def redact_messages(self, messages: Iterable[Mapping[str, Any]], *, legacy: bool = False) -> list[dict[str, Any]]:
        """New ``{"role", "content"}`` messages; messages left with nothing are left out. A
        message's ``blocks`` (a round record's block boundaries) decide where its blocks are;
        *legacy*: the messages are a round recorded before boundaries were kept (see the module
        docstring). A structured tool call keeps its id and function name, its arguments (a
        custom tool's ``input``) redacted as text, and the thinking recorded with it its text,
        redacted; a tool result keeps its ``tool_call_id`` (``session.structured``)."""
        out = []
        for message in messages:
            content = self.redact_content(message.get("content"), message.get(BLOCKS_FIELD), legacy=legacy)
            calls = [self._redact_call(c) for c in message.get("tool_calls") or () if isinstance(c, Mapping)]
            if content is None and not calls:
                continue
            doc: dict[str, Any] = {"role": message.get("role"), "content": content}
            if calls:
                doc["tool_calls"] = calls
                if thinking := self._redact_reasoning(message.get("reasoning")):
                    doc["reasoning"] = thinking
            if isinstance(message.get("tool_call_id"), str):
                doc["tool_call_id"] = message["tool_call_id"]
                if message.get("is_error") is True:
                    doc["is_error"] = True
            out.append(doc)
        return out

    def _redact_reasoning(self, blocks: Any) -> list[dict[str, Any]]:
        """The thinking recorded with a tool call: its text redacted as text; neither its
        signature nor a ``redacted_thinking`` block's data (the provider's opaque bytes) is
        exported."""
        out: list[dict[str, Any]] = []
        for block in blocks if isinstance(blocks, list) else ():
            if isinstance(block, Mapping) and block.get("type") == "thinking":
                out.append({"type": "thinking", "thinking": self.redact_content(block.get("thinking"))})
            elif isinstance(block, Mapping) and block.get("type") == "redacted_thinking":
                out.append({"type": "redacted_thinking"})
        return out

    def _redact_call(self, call: Mapping[str, Any]) -> dict[str, Any]:
        if call.get("type") == "custom":  # a custom tool's free-text input, redacted as text
            raw_spec = call.get("custom")
            spec: Mapping[str, Any] = raw_spec if isinstance(raw_spec, Mapping) else {}
            text = self.redact_content(spec.get("input")) if spec.get("input") else None
            return {"id": call.get("id"), "type": "custom", "custom": {"name": spec.get("name"), "input": text}}
        raw = call.get("function")
        function: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
        arguments = self.redact_content(function.get("arguments")) if function.get("arguments") else None
        return {"id": call.get("id"), "type": call.get("type", "function"),
                "function": {"name": function.get("name"), "arguments": arguments}}

    def redact_content(self, content: Any, blocks: Any = None, *, legacy: bool = False) -> Any:
        """Redacted content (string or part list), or None when nothing is left. *blocks*: the
        round record's ``[key, start, end]`` boundaries of *content* (``[]``: free text); a
        :class:`~gateway.session.record.KeyedText` carries its own. Boundaries that do not
        describe *content* exactly are ignored (the text is then parsed, see the module
        docstring)."""
        if isinstance(content, list):
            return self._redact_parts(content)
        if content is None:
            return None
        text = content if isinstance(content, str) else str(content)
        if blocks is None and isinstance(content, KeyedText):
            blocks = content.blocks
        parsed = self._blocks(text, blocks, legacy)
        if parsed is None:
            return self._apply(self._by_key.get(DEFAULT_KEY, "keep"), text)
        kept = []
        changed = False
        for key, value, action in parsed:
            new = self._apply(action, value)
            changed = changed or new != value
            if new is not None:
                kept.append((key, new))
        if not kept:
            return None
        return text if not changed else join_blocks(kept)

    def _blocks(self, text: str, blocks: Any, legacy: bool) -> list[tuple[str, str, str]] | None:
        """``(key, value, action)`` per block of *text*, or None when it is free text."""
        spans = _valid_spans(text, blocks) if blocks is not None else None
        if spans is not None:
            return [(key, text[start:end], self._action_for(key)) for key, start, end in spans] or None
        parsed = parse_blocks(text, self._keys)
        if parsed is None:
            return None
        actions = [self._action_for(key) for key, _ in parsed]
        if not self._in_order([key for key, _ in parsed]):
            strictest = max(actions, key=STRICTNESS.index)  # some value ran over a header: which one is unknown
            actions = [strictest] * len(actions)
        elif legacy:  # any block may be the tail of an earlier value
            actions = [max(actions[: i + 1], key=STRICTNESS.index) for i in range(len(actions))]
        return [(key, value, action) for (key, value), action in zip(parsed, actions, strict=True)]

    def _in_order(self, keys: list[str]) -> bool:
        """True when *keys* are distinct and in the policy's key order (as recording writes them)."""
        if len(set(keys)) != len(keys):
            return False
        if self._order is None:
            return True
        at = 0
        for key in keys:
            try:
                at = self._order.index(key, at) + 1
            except ValueError:
                return False
        return True

    def redact_text(self, text: str) -> str:
        """``text`` with the detectors' hits replaced."""
        if not self.detectors:
            return text
        hits = find_pii(text, self.detectors)
        if not hits:
            return text
        pieces, at = [], 0
        for hit in hits:
            pieces.append(text[at:hit.start])
            if self.detectors[hit.kind] == "hash":
                pieces.append(self.pseudonym(hit.normalized))
            else:
                pieces.append(f"[{hit.kind.upper()}]")
            at = hit.end
        pieces.append(text[at:])
        return "".join(pieces)

    def _action_for(self, key: str) -> str:
        return self._by_key.get(key, self._by_key.get(DEFAULT_KEY, "keep"))

    def _apply(self, action: str, value: str) -> str | None:
        if action == "drop":
            return None
        if action == "mask":
            return MASK
        if action == "hash":
            return self.pseudonym(value.strip())
        return self.redact_text(value)

    def _redact_parts(self, parts: list[Any]) -> list[Any] | None:
        default = self._by_key.get(DEFAULT_KEY, "keep")
        out: list[Any] = []
        for part in parts:
            if isinstance(part, Mapping) and part.get("type") == "text":
                new = self.redact_content(str(part.get("text", "")))
                if new is not None:
                    out.append({"type": "text", "text": new})
            elif default == "keep":
                out.append(part)
        return out or None
