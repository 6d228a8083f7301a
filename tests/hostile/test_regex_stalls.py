"""No client text makes a parser or detector take more than linear time (SPEC §3 "one client
cannot stall the others"): ``re`` holds the GIL, so a super-linear pass in a worker thread stops
the event loop too. Covered: the JSON5 reading of a session import
(``gateway.session.lenient_json``), the export's PII detectors (``gateway.redact``) and the
stand-in model's reading of an Agently prompt (``gateway.standin``, on the event loop).

Speed is not asserted as a time. Each worst shape is run in a child process at two sizes, 8x
apart, and the test compares the cost per character (best of 3, CPU time): linear work keeps
it about the same, quadratic work makes it 8 times larger. A child that does not finish within
a generous bound (the old expressions took minutes to hours) fails the test. Over HTTP, another
tenant is served while the worst bodies are sent. Where an expression was replaced, the new code
is checked against the old expression on random input."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import redact, standin
from gateway.session import lenient_json
from tests.conftest import ACME_KEY, AUDITOR_TOKEN, GLOBEX_KEY, REPO
from tests.hostile.subprocess_gateway import ServedGateway, served_gateway

SMALL, BIG = 16_000, 128_000
CHILD_SECONDS = 30  # the new code needs about 1 s per shape; the old one minutes to hours
MAX_GROWTH = 3.0  # cost per character at BIG over SMALL: about 1 when linear, 8 when quadratic

_CHILD = """
import sys, time
from {module} import {function} as run
make = eval("lambda n: " + sys.argv[1])
small, big = int(sys.argv[2]), int(sys.argv[3])

def cost(text, times):
    best = float("inf")
    for _ in range(3):
        started = time.thread_time()
        for _ in range(times):
            try:
                run(text)
            except Exception:
                pass
        best = min(best, time.thread_time() - started)
    return best

small_cost = cost(make(small), big // small)
print(cost(make(big), 1) / max(small_cost, 1e-6))
"""


def growth(module: str, function: str, shape: str) -> float:
    """Cost per character of ``module.function(text)`` at ``BIG`` over ``SMALL``, for the text the
    expression *shape* (of ``n``) builds; fails when the child does not finish in time."""
    script = _CHILD.format(module=module, function=function)
    try:
        done = subprocess.run([sys.executable, "-c", script, shape, str(SMALL), str(BIG)], cwd=REPO,
                              capture_output=True, text=True, timeout=CHILD_SECONDS, check=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{function} on {shape} did not finish in {CHILD_SECONDS} s (super-linear)")
    return float(done.stdout.strip())


# --- F8: JSON5 session import --------------------------------------------------------------------

JSON5_SHAPES = {
    "unterminated comments": '"{" + "/*x" * (n // 3)',
    "unterminated double-quoted string": """'{a: "' + '\\\\"' * (n // 2)""",
    "unterminated single-quoted string": """"['" + "\\\\'" * (n // 2)""",
    "many short strings": """'["' * (n // 2)""",
    "a run of slashes": '"[" + "/" * n + "\\nx"',
    "line comments in a gap": '"[" + "// x ," * (n // 6) + "\\nx"',
    "block comments in a gap": '"[" + "/**/ " * (n // 5) + "x"',
    "block comments after a comma": '"[1," + "/*a*/" * (n // 5) + "x"',
    "comment ends to extend": '"[/*" + "*/ */" * (n // 5)',
    "white space in a gap": '"[" + " " * n + "x"',
    "a long unquoted key candidate": '"{" + "a" * n',
    "a key candidate of escapes": '"{" + "\\\\u0061" * (n // 6)',
    "key candidates with comments": '"{" + "a /**/" * (n // 6) + "x"',
    "a long hexadecimal number": '"[0x" + "f" * n + "g]"',
}


@pytest.mark.parametrize("shape", JSON5_SHAPES.values(), ids=JSON5_SHAPES.keys())
def test_json5_reading_is_linear_on_worst_bodies(shape: str) -> None:
    """Each worst shape of a JSON5 import body costs the same per character at 16 KB and 128 KB
    (unterminated comments used to cost 25 s at 48 KB; 40 slashes or 25 comments in a row ran
    for minutes: the comment expression backtracked into itself)."""
    assert growth("gateway.session.lenient_json", "json5_to_json", shape) < MAX_GROWTH


_OLD_GAP = r"(?:\s|//[^\n\r\u2028\u2029]*|/\*[\s\S]*?\*/)*"
_OLD_JSON5 = re.compile(r"""
    (?=["'/,\[{A-Za-z_$\\+.\-0\x80-\U0010ffff\v\f])
    (?:
    (?P<dq>"(?:[^"\\\n\r]|\\(?:\r\n|[\s\S]))*")
  | (?P<sq>'(?:[^'\\\n\r]|\\(?:\r\n|[\s\S]))*')
  | (?P<comment>//[^\n\r\u2028\u2029]*|/\*[\s\S]*?\*/)
  | (?P<space>[\v\f\xa0\ufeff\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000])
  | (?P<empty>[\[{](?=GAP,))
  | (?P<comma>,(?=GAP[\]}]))
  | (?P<key>(?:[^\W\d]|\$|\\u[0-9a-fA-F]{4})(?:[\w$\u200c\u200d]|\\u[0-9a-fA-F]{4})*(?=GAP:))
  | (?<![\w.$])(?P<hex>0[xX][0-9a-fA-F]+)(?![\w.$])
  | (?<![\w.$eE])(?P<plus>\+)(?=[0-9.]|Infinity|NaN)
  | (?<![\w.$])(?P<nan>-NaN)(?![\w.$])
  | (?<=[0-9])(?P<dot>\.)(?![0-9])
  | (?<![\w.$])(?P<lead>\.)(?=[0-9])
    )
""".replace("GAP", _OLD_GAP), re.VERBOSE)
"""The JSON5 rewrite before it was made linear, as the reference on small inputs."""


def old_loads_json5(text: str) -> Any:
    try:
        return json.loads(_OLD_JSON5.sub(lenient_json._rewrite, text))
    except lenient_json._Refused as exc:
        raise ValueError(exc.message) from None


_GAPS = ["", " ", "\n", "\t", "\u00a0", "// note\n", "/* c */", "/* a * b / c */", " /**/ ", "\r\n"]


@st.composite
def json5_text(draw: st.DrawFn, value: Any = None, depth: int = 0) -> str:
    """A JSON5 rendering of a random value: comments, trailing commas, either quote, unquoted
    keys, hexadecimal and signed numbers, as a person or Agently would write them."""
    gap = lambda: draw(st.sampled_from(_GAPS))  # noqa: E731
    kind = draw(st.sampled_from(["null", "bool", "int", "float", "str", "list", "dict"] if depth < 3
                                else ["null", "bool", "int", "str"]))
    if kind == "null":
        return "null"
    if kind == "bool":
        return draw(st.sampled_from(["true", "false"]))
    if kind == "int":
        number = draw(st.integers(-10**6, 10**6))
        style = draw(st.sampled_from(["plain", "hex", "plus"]))
        if style == "hex" and number >= 0:
            return hex(number)
        return ("+" if style == "plus" and number >= 0 else "") + str(number)
    if kind == "float":
        return draw(st.sampled_from(["1.5", ".5", "5.", "-0.25", "1e3", "+2.5E-2", "Infinity", "-Infinity", "NaN"]))
    if kind == "str":
        return quoted(draw, draw(st.text(st.sampled_from("ab '\"\\/*,:[]{}\n\té€"), max_size=8)))
    if kind == "list":
        items = [draw(json5_text(depth=depth + 1)) for _ in range(draw(st.integers(0, 3)))]
        comma = "," + gap() if items and draw(st.booleans()) else ""
        return "[" + gap() + ("," + gap()).join(items) + comma + "]"
    keys = draw(st.lists(st.text(st.sampled_from("ab_$1 'x"), min_size=1, max_size=4), max_size=3, unique=True))
    members = []
    for key in keys:
        name = key if re.fullmatch(r"[A-Za-z_$][\w$]*", key) and draw(st.booleans()) else quoted(draw, key)
        members.append(name + gap() + ":" + gap() + draw(json5_text(depth=depth + 1)))
    comma = "," + gap() if members and draw(st.booleans()) else ""
    return "{" + gap() + ("," + gap()).join(members) + comma + "}"


def quoted(draw: st.DrawFn, text: str) -> str:
    quote = draw(st.sampled_from(["'", '"']))
    escaped = text.replace("\\", "\\\\").replace("\n", "\\n").replace(quote, "\\" + quote)
    return quote + escaped + quote


def same(a: Any, b: Any) -> bool:
    """Equal as JSON values, NaN included."""
    return repr(a) == repr(b) and (not isinstance(a, float) or math.isnan(a) == math.isnan(b))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json5_text())
def test_json5_documents_read_as_json5_reads_them(text: str) -> None:
    """On random valid JSON5 the linear reader gives what ``json5.loads`` (Agently's loader) gives.
    (The old reader did not always: it backtracked into a comment to find a ``]`` after a comma,
    and read ``[1,/* c */2,/* c */]`` as ``[1, 2]`` with the first comma dropped, so as invalid.)"""
    import json5

    assert same(lenient_json.loads_json5(text), json5.loads(text)), text


_SOUP = ["{", "}", "[", "]", ",", ":", "'", '"', "\\", "/", "*", "//", "/*", "*/", "\n", " ", "a", "$", "0x1",
         "1", ".", "+", "-", "NaN", "Infinity", "e", "true", "null", "\u00a0", "\u2028", "é", "\\u0061"]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_SOUP), max_size=14).map("".join))
def test_what_the_old_reader_accepted_as_json5_is_read_the_same(text: str) -> None:
    """On random token soup, every text the old reader and ``json5.loads`` both accept is read to
    the same value; the linear reader accepts nothing that both refuse."""
    import json5

    try:
        expected: Any = json5.loads(text)
    except ValueError:
        expected = None
        accepted = False
    else:
        accepted = True
    try:
        new: Any = lenient_json.loads_json5(text)
    except lenient_json.JSON5Error:
        new = lenient_json.JSON5Error
    try:
        old: Any = old_loads_json5(text)
    except ValueError:
        old = ValueError
    if accepted and old is not ValueError and same(old, expected):
        assert same(new, expected), text
    if new is not lenient_json.JSON5Error:  # e.g. a raw U+2028 in a string: JSON5 allows it, json5 0.12 not
        assert (accepted and same(new, expected)) or (old is not ValueError and same(new, old)), text


# --- F9: export detectors ------------------------------------------------------------------------

REDACT_SHAPES = {
    "local part with no @": '"a" * n',
    "dashes after an @": '"a@" + "b-" * (n // 2)',
    "dots after an @": '"a@" + "b." * (n // 2)',
    "many @": '"a.@" * (n // 3)',
    "labels without a top-level domain": '"x@" + "ab." * (n // 3) + "1"',
    "digits and dashes": '"1-" * (n // 2) + "x"',
    "digit groups": '"1 " * (n // 2) + "1x"',
    "bracketed digits": '"(1)" * (n // 3) + "x"',
    "an IBAN that does not end": '"DE12" + "ABCD" * (n // 4) + "_"',
    "signed digits": '"+1" * (n // 2)',
    "digit groups with no-break spaces": '"1\\u00a0" * (n // 2) + "1x"',
    "digit groups with double separators": '"1 \\t" * (n // 3) + "1x"',
    "dotted digits": '"1." * (n // 2) + "1x"',
    "zero-width spaces between digits": '"1\\u200b" * (n // 2) + "1x"',
    "a run of format characters": '"4111" + "\\u200b\\u200d" * (n // 2) + "1111x"',
    "format characters before many @": '"a\\u200b@" * (n // 3)',
    "a lower-case IBAN that does not end": '"de12" + "abcd" * (n // 4) + "_"',
    "a dashed IBAN that does not end": '"DE12" + "-ABCD" * (n // 5) + "_"',
    "phone groups with zero-width spaces": '"+1\\u200b" * (n // 3)',
}


def find_all_pii(text: str) -> list[redact.Finding]:
    return redact.find_pii(text, redact.DETECTORS)


@pytest.mark.parametrize("shape", REDACT_SHAPES.values(), ids=REDACT_SHAPES.keys())
def test_pii_detectors_are_linear_on_worst_text(shape: str) -> None:
    """Each worst shape for the e-mail, card, IBAN and phone detectors costs the same per
    character at 16 KB and 128 KB (40,000 letters used to cost 3 s in the e-mail detector)."""
    assert growth("tests.hostile.test_regex_stalls", "find_all_pii", shape) < MAX_GROWTH


_OLD_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")

_MAIL_PIECES = st.sampled_from(["a", "B", "z9", ".", "-", "_", "%", "+", "@", "@@", " ", "\n", "com", "de", ".io",
                                "x.y", "1", "é", "!", "a@b.cc", ".d@e.ff"])


@settings(max_examples=3000, deadline=None)
@given(st.lists(_MAIL_PIECES, max_size=20).map("".join))
def test_the_email_detector_finds_what_the_old_expression_found(text: str) -> None:
    """On random text the linear e-mail detector finds exactly the old expression's hits."""
    expected = [(m.start(), m.end(), m.group().lower()) for m in _OLD_EMAIL.finditer(text)]
    assert [(f.start, f.end, f.normalized) for f in redact._find_email(text)] == expected


_TEXT_PIECES = st.sampled_from(["a", "@", "b.com", "1", "4111", "1111", "-", " ", "+49", "(0)", "DE44", "5001",
                                "0532", "0130", "00", ".", "x", "\n", "[k]:"])


@settings(max_examples=1500, deadline=None)
@given(st.lists(_TEXT_PIECES, max_size=24).map("".join))
def test_redaction_of_ordinary_text_is_unchanged(text: str) -> None:
    """All four detectors together redact random text as they did with the old e-mail expression."""
    old_finders = {**redact._FINDERS, "email": lambda t: (redact.Finding("email", m.start(), m.end(),
                                                                         m.group().lower())
                                                         for m in _OLD_EMAIL.finditer(t))}
    new = redact.find_pii(text, redact.DETECTORS)
    original = redact._FINDERS
    try:
        redact._FINDERS = old_finders  # type: ignore[misc]
        old = redact.find_pii(text, redact.DETECTORS)
    finally:
        redact._FINDERS = original  # type: ignore[misc]
    assert new == old


# --- F10: the stand-in's reading of an Agently prompt ----------------------------------------------

_HEAD = '"[OUTPUT REQUIREMENT]:\\nData Format: JSON\\nData Structure:\\n{\\n"'
STANDIN_SHAPES = {
    "a line of spaces": _HEAD + ' + " " * n + "x\\n}\\n"',
    "blank lines": _HEAD + ' + "\\n" * n + "x\\n}\\n"',
    "lines of spaces": _HEAD + ' + " \\n" * (n // 2) + "x\\n}\\n"',
    "slashes": _HEAD + ' + "x//" * (n // 3) + "\\n}\\n"',
    "ellipses": _HEAD + ' + "...x" * (n // 4) + "\\n}\\n"',
    "ellipsis lines": _HEAD + ' + "\\n ... x" * (n // 7) + "\\n}\\n"',
    "placeholders": _HEAD + ' + "<" * n + "\\n}\\n"',
    "commas": _HEAD + ' + ", " * (n // 2) + "x\\n}\\n"',
}


@pytest.mark.parametrize("shape", STANDIN_SHAPES.values(), ids=STANDIN_SHAPES.keys())
def test_standin_prompt_reading_is_linear(shape: str) -> None:
    """The stand-in reads each worst Agently structure at the same cost per character at 16 KB
    and 128 KB (a 40,000-space line used to hold the event loop for 4.5 s)."""
    assert growth("gateway.standin", "sample_json", shape) < MAX_GROWTH


_OLD_COMMENT = re.compile(r"\s+//.*$", re.MULTILINE)
_OLD_ELLIPSIS = re.compile(r"^\s*\.\.\.\s*$\n?", re.MULTILINE)


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(["/", "//", ".", "...", "....", "\n", "\n\n", " ", "\t", "\r", "\u3000", "\x85",
                                 "\v", "a", "{", "}", "x//y", "<int>"]), max_size=25).map("".join))
def test_standin_comment_and_ellipsis_removal_match_the_old_expressions(text: str) -> None:
    """The linear comment and ``...`` removal give what the old expressions gave."""
    assert standin.strip_comments(text) == _OLD_COMMENT.sub("", text)
    assert standin.strip_ellipsis_lines(text) == _OLD_ELLIPSIS.sub("", text)


# --- F11: Agently output-format placeholders in a reply ----------------------------------------

PLACEHOLDER_SHAPES = {
    "a run of spaces after a parenthesis": '"(" + " " * n + "x"',
    "a run of spaces after json": '"json" + " " * n + "x"',
    "a comment of spaces": '"<!-- (" + " " * n + "x -->"',
    "spaces around a parenthesis": '"( " + " " * (n // 2) + ")" + " " * (n // 2) + "x"',
}


@pytest.mark.parametrize("shape", PLACEHOLDER_SHAPES.values(), ids=PLACEHOLDER_SHAPES.keys())
def test_output_format_placeholder_reading_is_linear(shape: str) -> None:
    """A reply section the record stage reads for Agently's non-JSON formats is checked for a
    copied placeholder at the same cost per character at 16 KB and 128 KB (a 2,500-space run
    after ``(`` in a model's reply held the event loop for 10 s)."""
    assert growth("gateway.session.structured", "_placeholder", shape) < MAX_GROWTH


_OLD_ANGLE = re.compile(r"\s*\(?\s*(?:json|text)?\s*\)?\s*<[^>\n]{1,160}>\s*", re.IGNORECASE)


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(["(", ")", " ", "\t", "\n", "\u3000", "json", "JSON", "text", "Text", "jso", "<",
                                 ">", "<a>", "x", "your answer", "a" * 80, "<!--", "-->"]), max_size=12).map("".join))
def test_the_placeholder_angle_reading_matches_the_old_expression(text: str) -> None:
    """The left-to-right angle reading accepts exactly what the old expression matched, as a
    prefix and as the whole text."""
    from gateway.session.structured import _angle

    assert _angle(text, whole=False) == bool(_OLD_ANGLE.match(text)), text
    assert _angle(text, whole=True) == bool(_OLD_ANGLE.fullmatch(text)), text


# --- over HTTP: another tenant is served meanwhile ---------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedGateway]:
    with served_gateway(tmp_path_factory.mktemp("stalls")) as gw:
        yield gw


def served_meanwhile(gw: ServedGateway, send: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    """Start *send* (the worst request), then ask /healthz and send another tenant's chat; both
    must be answered within a generous bound. Returns *send*'s response and the chat's seconds."""
    answers: list[httpx.Response | BaseException] = []

    def worst() -> None:
        try:
            answers.append(send())
        except BaseException as exc:  # noqa: BLE001 - reported below
            answers.append(exc)

    sender = threading.Thread(target=worst)
    sender.start()
    time.sleep(0.5)  # the worst body is uploaded and being read
    started = time.monotonic()
    with httpx.Client(timeout=20) as client:
        assert client.get(f"{gw.url}/healthz").status_code == 200
        chat = client.post(f"{gw.url}/v1/chat/completions", headers={"Authorization": f"Bearer {GLOBEX_KEY}"},
                           json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    waited = time.monotonic() - started
    assert chat.status_code == 200
    sender.join(90)
    assert answers and isinstance(answers[0], httpx.Response), answers
    return answers[0], waited


MAX_BODY = 4 * 1024 * 1024


@pytest.mark.parametrize("body", [
    b"{" + b"/*x" * ((MAX_BODY - 4096) // 3),            # the reported 48 KB body, grown to the limit
    b"[" + b"/**/ " * 40 + b"x",                          # 200 bytes that backtracked for hours
    b"[" + b"/" * 80 + b"\nx",
    b"{" + b"a" * (MAX_BODY - 4096),
], ids=["unterminated comments", "comments in a gap", "slashes", "a long key candidate"])
def test_a_hostile_json5_import_does_not_stall_other_tenants(served: ServedGateway, body: bytes) -> None:
    """While one client imports a worst JSON5 body, another tenant's chat and /healthz are
    answered, and the import gets its 400."""
    put = lambda: httpx.put(f"{served.url}/v1/sessions/acme:j5", content=body, timeout=60,  # noqa: E731
                            headers={"Authorization": f"Bearer {ACME_KEY}"})
    resp, _ = served_meanwhile(served, put)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"


def test_a_planted_round_does_not_stall_the_export(served: ServedGateway) -> None:
    """A round of a million letters (the default policy's detectors run on it at export) is
    exported while another tenant is served."""
    planted = httpx.post(f"{served.url}/v1/chat/completions", timeout=60,
                         headers={"Authorization": f"Bearer {ACME_KEY}", "X-Session-Id": "redos1"},
                         json={"model": "gpt-4o", "messages": [{"role": "user", "content": "a" * 1_000_000}]})
    assert planted.status_code == 200
    export = lambda: httpx.get(f"{served.url}/admin/export", params={"tenant": "acme", "session": "redos1"},  # noqa: E731
                               headers={"Authorization": f"Bearer {AUDITOR_TOKEN}"}, timeout=60)
    resp, _ = served_meanwhile(served, export)
    assert resp.status_code == 200 and "a" * 1000 in resp.text


def test_a_hostile_agently_prompt_does_not_stall_the_standin(served: ServedGateway) -> None:
    """An Agently JSON prompt whose structure holds a million spaces is answered by the built-in
    stand-in (on the gateway's event loop) while another tenant is served."""
    prompt = "[OUTPUT REQUIREMENT]:\nData Format: JSON\nData Structure:\n{\n" + " " * 1_000_000 + "x\n}\n\n[OUTPUT]:"
    chat = lambda: httpx.post(f"{served.url}/v1/chat/completions", timeout=60,  # noqa: E731
                              headers={"Authorization": f"Bearer {ACME_KEY}"},
                              json={"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}]})
    resp, _ = served_meanwhile(served, chat)
    assert resp.status_code == 200

