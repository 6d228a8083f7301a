"""Characters a reader does not see but a model reads, made visible wherever people read
recorded text: the console's session pages (``gateway.console.views.visible``) and the CLI's JSON
output (``json_escaped``).

``HIDDEN`` matches runs of them: Unicode tags (U+E0020-E007E, the ``tags`` group; they spell
ASCII invisibly and carry prompt injections), and controls (but tab and newline), the soft
hyphen, zero-width characters, bidirectional overrides and isolates (which reorder what a
screen or a terminal shows), line and paragraph separators, the BOM, the other tag characters,
variation selectors (U+FE00-FE0F and U+E0100-E01EF: 256 of them spell bytes invisibly), blank
fillers (the Hangul fillers U+115F, U+1160, U+3164, U+FFA0, the braille blank U+2800), the
combining grapheme joiner U+034F, Khmer's inherent vowels U+17B4/17B5, Mongolian's variation
selectors U+180B-180F, Egyptian hieroglyph format controls (U+13430-1343F; U+13439-1343F came
with Unicode 15, which Python 3.11's tables do not know), musical and shorthand format
controls. One exception keeps ordinary emoji readable: a single U+FE0E or U+FE0F right after a
symbol or emoji (or a keycap's digit), where it only picks how that symbol is drawn, is not
matched; a second one, or one after a letter, is. Stored data is never changed: only what is
shown.
"""

from __future__ import annotations

import re

_EMOJI_BASES = ("0-9#*\u00a9\u00ae\u203c\u2049\u2122\u2139\u2190-\u21ff\u2300-\u23ff\u24c2\u25a0-\u27bf"
                "\u2900-\u297f\u2b00-\u2bff\u3030\u303d\u3297\u3299\U0001f000-\U0001faff")
"""Characters a presentation selector (U+FE0E text, U+FE0F emoji) may follow in an ordinary
emoji or symbol: digits, ``#`` and ``*`` (keycaps), the symbol, arrow, dingbat and emoji blocks."""

HIDDEN = re.compile(
    "(?P<tags>[\U000e0020-\U000e007e]+)"
    "|(?:[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f"
    "\u202a-\u202e\u2028\u2029\u2060-\u206f\u2800\u3164\ufe00-\ufe0d\ufeff\uffa0\ufff9-\ufffb"
    "\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e001f\U000e007f\U000e0100-\U000e01ef]"
    f"|(?<![{_EMOJI_BASES}])[\ufe0e\ufe0f])+")


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
