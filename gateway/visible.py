"""Characters a reader does not see but a model reads, made visible wherever people read
recorded text: the console's session pages (``gateway.console.views.visible``) and the CLI's JSON
output (``json_escaped``).

``HIDDEN`` matches runs of them: Unicode tags (U+E0020-E007E, the ``tags`` group; they spell
ASCII invisibly and carry prompt injections), and controls (but tab and newline), the soft
hyphen, zero-width characters, bidirectional overrides and isolates (which reorder what a
screen or a terminal shows), line and paragraph separators, the BOM, the other tag characters
and the supplementary variation selectors. Stored data is never changed: only what is shown.
"""

from __future__ import annotations

import re

HIDDEN = re.compile(
    "(?P<tags>[\U000e0020-\U000e007e]+)"
    "|[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2028\u2029"
    "\u2060-\u206f\ufeff\ufff9-\ufffb\U000e0000-\U000e001f\U000e007f\U000e0100-\U000e01ef]+")


def tag_text(run: str) -> str:
    """The ASCII a run of Unicode tag characters spells."""
    return "".join(chr(ord(c) - 0xE0000) for c in run)


def _escape(match: re.Match[str]) -> str:
    out = []
    for c in match.group():
        code = ord(c)
        if code > 0xFFFF:  # JSON escapes a code point above the BMP as a UTF-16 surrogate pair
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
        else:
            out.append(f"\\u{code:04x}")
    return "".join(out)


def json_escaped(text: str) -> str:
    """JSON text *text* (``json.dumps`` output) with every hidden character written as its
    ``\\uXXXX`` escape: the same JSON value, but a terminal shows the escape instead of applying
    a bidirectional override or hiding a tag. Such characters only occur inside JSON strings,
    where an escape is always valid."""
    return HIDDEN.sub(_escape, text)
