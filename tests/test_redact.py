"""Export redaction: block parsing, rule actions, tenant pseudonyms and the PII detectors."""

from __future__ import annotations

from collections.abc import Collection

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import redact
from gateway.redact import (
    MASK,
    Finding,
    Redactor,
    find_pii,
    iban_ok,
    join_blocks,
    luhn_ok,
    parse_blocks,
    parse_rules,
    pseudonym,
    tenant_secret,
)

SECRET = b"export-secret-for-tests-0123456789"
ACME = tenant_secret(SECRET, "acme")
GLOBEX = tenant_secret(SECRET, "globex")
BLOCKS = "[info.task]:\nSummarize #0\n[input/lang]:\nen\n[.agent.system]:\nSYS-C"


def test_parse_blocks_round_trips() -> None:
    """Agently block content parses into (key, value) pairs and joins back unchanged."""
    blocks = parse_blocks(BLOCKS)
    assert blocks == [("info.task", "Summarize #0"), ("input/lang", "en"), (".agent.system", "SYS-C")]
    assert join_blocks(blocks) == BLOCKS


def test_parse_blocks_keeps_multiline_values() -> None:
    """A value runs over several lines (YAML) until the next header line."""
    content = "[ticket]:\nid: 7\ntags:\n- a\n- b\n\n[summary]:\nok"
    assert parse_blocks(content) == [("ticket", "id: 7\ntags:\n- a\n- b\n"), ("summary", "ok")]
    assert join_blocks(parse_blocks(content) or []) == content


def test_parse_blocks_with_known_keys_ignores_lookalike_lines() -> None:
    """Given the policy's keys, a header-like line inside a value does not split it."""
    content = "[note]:\nsee\n[not a key]:\nstill note\n[lang]:\nen"
    assert parse_blocks(content, keys={"note", "lang"}) == [("note", "see\n[not a key]:\nstill note"),
                                                            ("lang", "en")]
    assert len(parse_blocks(content) or []) == 3


def test_free_text_is_not_blocks() -> None:
    """Content that does not start with a header is free text."""
    assert parse_blocks("hello\n[x]:\ny") is None
    assert parse_blocks("[x]: inline") is None


def test_rules_drop_mask_and_hash_blocks() -> None:
    """Each action applies to its block; unnamed blocks are kept as recorded."""
    r = Redactor([{"key": "info.task", "action": "mask"}, {"key": "input/lang", "action": "drop"},
                  {"key": ".agent.system", "action": "hash"}], ACME)
    assert r.redact_content(BLOCKS) == f"[info.task]:\n{MASK}\n[.agent.system]:\n{pseudonym(ACME, 'SYS-C')}"
    assert Redactor([], ACME).redact_content(BLOCKS) == BLOCKS


def test_default_rule_covers_free_text_and_unnamed_blocks() -> None:
    """The ``*`` rule applies to free text and to blocks no rule names; ``keep`` exempts a key."""
    r = Redactor([{"key": "input/lang", "action": "keep"}, {"key": "*", "action": "mask"}], ACME)
    assert r.redact_content("anything at all") == MASK
    assert r.redact_content(BLOCKS) == f"[info.task]:\n{MASK}\n[input/lang]:\nen\n[.agent.system]:\n{MASK}"


def test_fully_dropped_messages_are_left_out() -> None:
    """A message whose every block is dropped disappears from the export."""
    r = Redactor([{"key": "*", "action": "drop"}], ACME)
    messages = [{"role": "user", "content": "secret"}, {"role": "assistant", "content": BLOCKS}]
    assert r.redact_messages(messages) == []


def test_pseudonyms_join_within_a_tenant_and_differ_across_tenants() -> None:
    """The same value gets the same pseudonym in one tenant and a different one in another."""
    rule = [{"key": "customer", "action": "hash"}]
    a = Redactor(rule, ACME).redact_content("[customer]:\nalice@example.com")
    a_again = Redactor(rule, tenant_secret(SECRET, "acme")).redact_content("[customer]:\n alice@example.com ")
    g = Redactor(rule, GLOBEX).redact_content("[customer]:\nalice@example.com")
    assert a == a_again
    assert a != g
    assert a.startswith("[customer]:\npseud:") and len(a.split("\n")[1]) == len("pseud:") + 16


def test_tenant_secret_is_derived_and_needs_a_real_secret() -> None:
    """The tenant key is deterministic per tenant, and a short export secret is refused."""
    assert tenant_secret(SECRET, "acme") == ACME != GLOBEX
    assert len(ACME) == 32
    with pytest.raises(ValueError, match="16 bytes"):
        tenant_secret(b"short", "acme")


def test_luhn_and_iban_checks() -> None:
    """The checksums accept real test numbers and reject a changed digit."""
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("DE89 3704 0044 0532 0130 00") and iban_ok("GB82WEST12345698765432")
    assert not iban_ok("DE89 3704 0044 0532 0130 01")


def test_detectors_mask_free_text_exactly() -> None:
    """E-mail, phone, Luhn-valid card and mod-97-valid IBAN are replaced; look-alikes stay."""
    r = Redactor([], ACME, {"email", "phone", "card", "iban"})
    text = ("Mail Bob.Smith@Example.org or call +49 30 1234567. Card 4111 1111 1111 1111 exp 12/27, "
            "not 4111 1111 1111 1112. IBAN DE89 3704 0044 0532 0130 00, not DE89 3704 0044 0532 0130 02. "
            "On 2024-05-01 from 192.168.10.20, pi 3.14159265, ticket 12345678.")
    assert r.redact_text(text) == (
        "Mail [EMAIL] or call [PHONE]. Card [CARD] exp 12/27, "
        "not 4111 1111 1111 1112. IBAN [IBAN], not DE89 3704 0044 0532 0130 02. "
        "On 2024-05-01 from 192.168.10.20, pi 3.14159265, ticket 12345678.")


def test_detected_values_can_be_pseudonymised_to_join() -> None:
    """With the hash action, differently written forms of one value get one pseudonym."""
    r = Redactor([], ACME, {"card": "hash", "email": "hash", "phone": "hash"})
    assert r.redact_text("4111 1111 1111 1111") == r.redact_text("4111-1111-1111-1111") == \
        pseudonym(ACME, "4111111111111111")
    assert r.redact_text("ALICE@example.com") == pseudonym(ACME, "alice@example.com")
    assert r.redact_text("(030) 123-4567") == pseudonym(ACME, "0301234567")


def test_detectors_run_on_kept_block_values_after_rules() -> None:
    """Detectors clean kept blocks; masked or hashed blocks are already replaced."""
    r = Redactor([{"key": "a", "action": "mask"}], ACME, {"email"})
    assert r.redact_content("[a]:\nx@y.com\n[b]:\nmail x@y.com now") == f"[a]:\n{MASK}\n[b]:\nmail [EMAIL] now"


def test_overlapping_hits_resolve_by_priority() -> None:
    """An IBAN's digits are not reported again as a card or phone."""
    hits = find_pii("DE89 3704 0044 0532 0130 00", {"iban", "card", "phone"})
    assert [h.kind for h in hits] == ["iban"]


def test_content_parts_are_redacted_part_by_part() -> None:
    """Text parts are redacted; other parts survive only when free text is kept."""
    parts = [{"type": "text", "text": "call +1 415 555 2671"}, {"type": "image_url", "image_url": {"url": "x"}}]
    assert Redactor([], ACME, {"phone"}).redact_content(parts) == [{"type": "text", "text": "call [PHONE]"},
                                                                   parts[1]]
    assert Redactor([{"key": "*", "action": "mask"}], ACME).redact_content(parts) == [{"type": "text",
                                                                                      "text": MASK}]


def test_rules_accept_policy_objects_and_refuse_unknown_actions() -> None:
    """Rules come from mappings or objects with key/action; bad actions and detectors are refused."""

    class PolicyRule:
        key, action = "x", "mask"

    assert parse_rules([PolicyRule()])[0].action == "mask"
    with pytest.raises(ValueError, match="action"):
        parse_rules([{"key": "x", "action": "encrypt"}])
    with pytest.raises(ValueError, match="detector"):
        Redactor([], ACME, {"ssn"})


def test_describe_names_the_rules_without_secrets() -> None:
    """The manifest description lists rules and detectors and holds no key material."""
    d = Redactor([{"key": "a", "action": "hash"}], ACME, {"email"}).describe()
    assert d["rules"] == [{"key": "a", "action": "hash"}]
    assert d["detectors"] == {"email": "mask"}
    assert ACME.hex() not in str(d)


# --------------------------------------------------------------------------- block boundaries

INJECTED = "[input.ticket_id]:\nT-77\n[input.intent]:\nSECRET\n[input.intent]:\nrefund"
TICKET_RULES = [{"key": "input.ticket_id", "action": "hash"}]
TICKET_KEYS = ["input.ticket_id", "input.intent"]


def _ticket_redactor() -> Redactor:
    return Redactor(TICKET_RULES, ACME, keys=TICKET_KEYS)


def test_recorded_boundaries_keep_a_fake_header_inside_its_value() -> None:
    """With the round record's boundaries, a header-like line inside a hashed value is hashed with it."""
    from gateway.session.record import blocks_of, format_keyed

    text = format_keyed([("input.ticket_id", "T-77\n[input.intent]:\nSECRET"), ("input.intent", "refund")])
    assert text == INJECTED
    expected = f"[input.ticket_id]:\n{pseudonym(ACME, 'T-77' + chr(10) + '[input.intent]:' + chr(10) + 'SECRET')}" \
               "\n[input.intent]:\nrefund"
    assert _ticket_redactor().redact_content(str(text), blocks_of(text)) == expected
    assert _ticket_redactor().redact_content(text) == expected  # a KeyedText carries its own
    message = {"role": "user", "content": str(text), "blocks": blocks_of(text)}
    assert _ticket_redactor().redact_messages([message]) == [{"role": "user", "content": expected}]


def test_empty_boundaries_mean_free_text() -> None:
    """``blocks: []`` is free text: a reply that starts like a keyed block gets the default rule."""
    r = Redactor([*TICKET_RULES, {"key": "input.intent", "action": "keep"}, {"key": "*", "action": "drop"}], ACME,
                 keys=TICKET_KEYS)
    assert r.redact_content("[input.intent]:\nanything", []) is None
    assert r.redact_content("[input.intent]:\nanything") == "[input.intent]:\nanything"


def test_boundaries_that_do_not_fit_the_text_are_not_trusted() -> None:
    """Boundaries off by one, out of range or naming another key fall back to the strict parse."""
    for bad in ([["input.ticket_id", 18, 22]], [["input.ticket_id", 19, 999]], [["other", 0, 4]], "x",
                [["input.ticket_id", 19, 23], ["input.intent", 40, 46]]):
        out = _ticket_redactor().redact_content(INJECTED, bad)
        assert "SECRET" not in out and "refund" not in out


def test_without_boundaries_a_repeated_or_misordered_header_puts_the_message_under_the_strictest_rule() -> None:
    """Parsed text whose keys repeat or break the policy's order has every block under the strictest rule."""
    out = _ticket_redactor().redact_content(INJECTED)
    assert "SECRET" not in out and "refund" not in out and out.count("pseud:") == 3
    backwards = "[input.intent]:\nrefund\n[input.ticket_id]:\nT-1"
    assert "refund" not in _ticket_redactor().redact_content(backwards)
    r = Redactor([{"key": "a", "action": "mask"}, {"key": "b", "action": "hash"}], ACME, keys=["a", "b"])
    assert r.redact_content("[a]:\nx\n[b]:\ny\n[b]:\nz") == f"[a]:\n{MASK}\n[b]:\n{MASK}\n[b]:\n{MASK}"


def test_in_order_parsed_text_keeps_each_keys_rule_unless_it_is_a_legacy_round() -> None:
    """Distinct keys in order keep their own rules (imports: vetted text); a round recorded before
    boundaries were kept gives each block the strictest rule of its key and the keys before it."""
    text = "[input.ticket_id]:\nT-77\n[input.intent]:\nSECRET"
    assert _ticket_redactor().redact_content(text).endswith("\n[input.intent]:\nSECRET")
    legacy = _ticket_redactor().redact_messages([{"role": "user", "content": text}], legacy=True)
    assert "SECRET" not in legacy[0]["content"]
    assert legacy[0]["content"] == (f"[input.ticket_id]:\n{pseudonym(ACME, 'T-77')}"
                                    f"\n[input.intent]:\n{pseudonym(ACME, 'SECRET')}")


# --------------------------------------------------------------------------- ordinary formats

ORDINARY = {
    "card with no-break spaces": ("card 4111\u00a01111\u00a01111\u00a01111 ok", "4111\u00a01111\u00a01111\u00a01111"),
    "card with thin spaces": ("4111\u20091111\u20091111\u20091111", "4111\u20091111\u20091111\u20091111"),
    "card with dots": ("paid with 4111.1111.1111.1111.", "4111.1111.1111.1111"),
    "card with tabs": ("4111\t1111\t1111\t1111", "4111\t1111\t1111\t1111"),
    "card with double spaces": ("4111  1111  1111  1111", "4111  1111  1111  1111"),
    "card with zero-width spaces": ("x 4111\u200b1111\u200b1111\u200b1111 y", "4111\u200b1111\u200b1111\u200b1111"),
    "card with a zero-width space in a group": ("41\u200b11 1111 1111 1111", "41\u200b11 1111 1111 1111"),
    "card in Arabic-Indic digits": ("\u0664" + "\u0661" * 15, "\u0664" + "\u0661" * 15),
    "lower-case IBAN": ("iban de89 3704 0044 0532 0130 00.", "de89 3704 0044 0532 0130 00"),
    "dashed IBAN": ("DE89-3704-0044-0532-0130-00", "DE89-3704-0044-0532-0130-00"),
    "phone with zero-width spaces": ("call 020\u200b7946\u200b0958 now", "020\u200b7946\u200b0958"),
    "phone with no-break spaces": ("+44\u00a020\u00a07946\u00a00958", "+44\u00a020\u00a07946\u00a00958"),
    "e-mail with a zero-width space before @": ("to bob\u200b@example.com.", "bob\u200b@example.com"),
    "e-mail with a joiner in the local part": ("bo\u200db@example.com", "bo\u200db@example.com"),
    "e-mail with a soft hyphen": ("bob@exam\u00adple.com", "bob@exam\u00adple.com"),
}


@pytest.mark.parametrize(("text", "hit"), ORDINARY.values(), ids=ORDINARY.keys())
def test_detectors_find_ordinary_formats_and_mask_their_whole_span(text: str, hit: str) -> None:
    """Unicode spaces, dots, tabs, dashes, lower case and format characters do not hide a value,
    and the mask covers exactly its span in the original text, format characters included."""
    (found,) = find_pii(text, ("iban", "card", "email", "phone"))
    assert text[found.start:found.end] == hit
    redacted = Redactor([], ACME, ("iban", "card", "email", "phone")).redact_text(text)
    assert redacted == text.replace(hit, f"[{found.kind.upper()}]")


def test_normalised_forms_join_whatever_the_separators() -> None:
    """A value written with other separators or format characters hashes to the same pseudonym."""
    r = Redactor([], ACME, {"card": "hash", "iban": "hash", "email": "hash"})
    assert r.redact_text("4111\u00a01111\u200b1111.1111") == r.redact_text("4111 1111 1111 1111")
    assert r.redact_text("\u0664" + "\u0661" * 15) == r.redact_text("4111111111111111")
    assert r.redact_text("de89-3704-0044-0532-0130-00") == r.redact_text("DE89 3704 0044 0532 0130 00")
    assert r.redact_text("Bob\u200b@Example.com") == r.redact_text("bob@example.com")


def test_the_format_class_is_every_format_character() -> None:
    """The detectors skip exactly Unicode's format characters (category Cf) of this Python."""
    import sys
    import unicodedata

    from gateway.redact import _FORMAT

    every = "".join(chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf")
    assert _FORMAT.fullmatch(every)
    assert not _FORMAT.search("abc 123 \u00a0\u2009\t\n@.-")


def _old_find_pii(text: str, detectors: Collection[str]) -> list[Finding]:
    """find_pii as it was before O(n log n): each hit checked against every kept hit."""
    visible = redact._Visible(text) if redact._FORMAT.search(text) else None
    read = visible.text if visible is not None else text
    taken: list[Finding] = []
    for kind in redact.DETECTORS:
        if kind not in detectors:
            continue
        hits = (redact._find_phone(read, visible.hidden) if kind == "phone" and visible is not None
                else redact._FINDERS[kind](read))
        for hit in hits:
            if all(hit.end <= t.start or hit.start >= t.end for t in taken):
                taken.append(hit)
    if visible is not None:
        taken = [Finding(hit.kind, *visible.span(hit.start, hit.end), hit.normalized) for hit in taken]
    return sorted(taken, key=lambda f: f.start)


_PII_PIECES = st.sampled_from(["a", "@", "b.co", " ", "1", "4111", "1111", "-", "+49", "(0)", "DE89", "3704",
                               "0044", "0532", "0130", "00", ".", "\u200b", "\n", "x@y.de", "+1 555 0100"])


@settings(max_examples=1500, deadline=None)
@given(st.lists(_PII_PIECES, max_size=30).map("".join),
       st.sets(st.sampled_from(redact.DETECTORS), min_size=1))
def test_find_pii_keeps_what_the_quadratic_check_kept(text: str, detectors: set[str]) -> None:
    """On random text and detector sets, find_pii keeps exactly the hits the old check kept."""
    assert find_pii(text, detectors) == _old_find_pii(text, detectors)


_SPAN = st.tuples(st.integers(0, 60), st.integers(1, 8)).map(lambda s: (s[0], s[0] + s[1]))


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.lists(_SPAN, max_size=12), max_size=4))
def test_disjoint_settles_overlaps_as_the_old_check(runs: list[list[tuple[int, int]]]) -> None:
    """On random spans, in any order, a hit is kept when it overlaps no hit kept before it."""
    runs_of_hits = [[Finding(f"k{i}", s, e, "") for s, e in run] for i, run in enumerate(runs)]
    taken: list[Finding] = []
    for hits in runs_of_hits:
        for hit in hits:
            if all(hit.end <= t.start or hit.start >= t.end for t in taken):
                taken.append(hit)
    assert redact._disjoint(runs_of_hits) == sorted(taken, key=lambda f: f.start)


def test_many_hits_cost_the_same_per_hit() -> None:
    """Settling overlaps costs the same per hit at 16 KB and 128 KB of addresses (checking each
    hit against every kept one made 20,000 addresses take 40 s, 84 KB of them stall an export)."""
    from tests.hostile.test_regex_stalls import MAX_GROWTH, growth

    assert growth("tests.hostile.test_regex_stalls", "find_all_pii", '"a@b.co " * (n // 7)') < MAX_GROWTH
    assert growth("tests.hostile.test_regex_stalls", "find_all_pii", '"+1 555 0100 " * (n // 12)') < MAX_GROWTH


def test_unicode_15_format_characters_are_not_read() -> None:
    """The Egyptian hieroglyph format controls Python 3.11 does not know (U+13439-1343F) are
    skipped like other format characters: an address with one inside is still found, whole."""
    for code in range(0x13430, 0x13440):
        text = f"mail bob{chr(code)}@example.com now"
        assert [(f.start, f.end, f.normalized) for f in find_pii(text, {"email"})] == [(5, 21, "bob@example.com")]
