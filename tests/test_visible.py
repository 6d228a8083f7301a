"""``gateway.visible``: hidden characters escaped in JSON output without changing its value."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.visible import HIDDEN, json_escaped, tag_text

HIDDEN_CHARS = ("\u202e\u2066\u200b\u00ad\u2028\ufeff\x1b\x00\ufe0f\ufe01\u3164\u2800\u2764"
                + chr(0xE0041) + chr(0xE0001) + chr(0xE0100))


@settings(max_examples=200, derandomize=True, database=None)
@given(st.recursive(st.text(alphabet=st.one_of(st.characters(exclude_categories=["Cs"]),
                                               st.sampled_from(HIDDEN_CHARS))),
                    lambda inner: st.one_of(st.lists(inner, max_size=3),
                                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                    max_leaves=6))
def test_json_escaped_is_the_same_json_value_with_no_hidden_character(value: object) -> None:
    for ensure_ascii in (False, True):
        text = json_escaped(json.dumps(value, ensure_ascii=ensure_ascii, indent=2))
        assert json.loads(text) == value
        assert HIDDEN.search(text) is None


def test_tags_spell_ascii() -> None:
    run = "".join(chr(0xE0000 + ord(c)) for c in "ignore previous")
    match = HIDDEN.fullmatch(run)
    assert match is not None and match.group("tags") == run
    assert tag_text(run) == "ignore previous"
    assert HIDDEN.fullmatch("\u202e\u200b").group("tags") is None  # type: ignore[union-attr]
    assert HIDDEN.search("plain text, é, 中, emoji 👍\ufe0f, tab\tand newline\n") is None


FILLERS = ["\ufe00", "\ufe0d", "\ufe0e", "\u115f", "\u1160", "\u3164", "\uffa0", "\u034f", "\u17b4", "\u17b5",
           "\u180b", "\u180c", "\u180d", "\u180f", "\u2800", "\U0001d173", "\U0001d17a", "\U0001bca0"]


def test_fillers_and_variation_selectors_are_hidden_characters() -> None:
    """Variation selectors, Hangul fillers, the grapheme joiner, Khmer and Mongolian invisibles and
    the braille blank render as nothing (or blank) and carry text: each is matched."""
    for c in FILLERS:
        assert HIDDEN.search(f"a{c}b") is not None, f"U+{ord(c):04X}"
    assert HIDDEN.search("a\ufe0fb") is not None  # not after a symbol: a variation selector carrying a byte
    assert HIDDEN.search("\u2764\ufe0f\ufe0f").group() == "\ufe0f"  # type: ignore[union-attr]  # the second is extra
    assert HIDDEN.search("heart \u2764\ufe0f, keycap 1\ufe0f\u20e3, text style \u2764\ufe0e, \U0001f44d\ufe0f") is None


def test_every_format_character_is_hidden() -> None:
    """Every format character (Unicode Cf) of this Python but the visible prepended marks, and the
    Egyptian hieroglyph format controls Python 3.11 does not know yet (U+13439-1343F, Unicode 15),
    are matched: U+13430-13438 and the newer ones were shown as they were."""
    import sys
    import unicodedata

    shown = {0x0600, 0x0601, 0x0602, 0x0603, 0x0604, 0x0605, 0x06DD, 0x070F, 0x0890, 0x0891, 0x08E2, 0x110BD,
             0x110CD}  # number signs and marks that draw a visible glyph over what follows
    every = [c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf" and c not in shown]
    missing = [f"U+{c:04X}" for c in [*every, *range(0x13430, 0x13440)] if HIDDEN.fullmatch(chr(c)) is None]
    assert missing == []
