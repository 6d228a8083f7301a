"""The memo section, byte for byte as Agently 4.1 renders it (``Session.apply_request_prefix`` then
the prompt generator: Agently itself is the oracle here), rendered once per memo rather than once
per request, and the memo size limit on every path that writes a memo."""

from __future__ import annotations

import asyncio
import uuid
import warnings
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import yaml
from agently import Agently
from agently.core.session.Session import Session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidSession
from gateway.session import bounding
from gateway.session.model import MEMO_MAX_BYTES, SessionState, from_agently, inject, memo_over_limit, with_memo


def agently_user_text(memo: Any, text: str = "q") -> str:
    """The final user message Agently sends with *memo* as its session's memo and *text* as input."""
    prompt = Agently.create_prompt()
    session = Session()
    session._memo = memo  # what load_json_session / a resize handler leave there
    Session.apply_request_prefix(prompt, session)
    prompt.set("input", text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        messages = list(prompt.to_messages(rich_content=False, strict_role_orders=True))
    return str(messages[-1]["content"])


@pytest.mark.parametrize("memo", [
    "  spaced  ", "line1\nline2\n", "\n\nlead", "   a\n   b", "    a\n    b\n", "\t tab \t",
    "${INPUT}", "${INFO.task}", "${OUTPUT}", "see ${ instructions . step-1 } and ${unknown.x}", "${Output_Requirement}",
    {"b": "${INPUT}"}, {"a": ["${INFO.task}", {"c": "${EXAMPLES}"}], "${INPUT}": "key kept"},
    ["  kept  ", "x\ny\n"], {"long": "word " * 40 + "\n  indented"},
    "x" * 300 + "${INPUT}", " " + "y" * 300 + "\n",
], ids=lambda m: repr(m)[:40])
def test_memo_renders_as_agently_renders_it(memo: Any) -> None:
    """Agently strips and dedents a text memo (``Prompt.set``) and replaces slot references in
    text and in a structure's values (not its keys); the gateway sent the memo as it was."""
    assert with_memo("q", memo) == agently_user_text(memo)


TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80) | st.sampled_from([
    "  lead", "trail  ", "a\n\nb\n", "\n  x\n  y\n", "${INPUT}", "${info.k}", "${OUTPUT}", "${nope}", "é" * 90,
    ("word " * 30).strip(), "a: b", "- x", "#c", "yes", "null", "1e3", "'q'", "a\u2028b", "x\x85y"])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False) | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(memo=TEXT | st.lists(JSON, max_size=4) | st.dictionaries(TEXT, JSON, max_size=4))
def test_any_memo_renders_as_agently_renders_it(memo: Any) -> None:
    assert with_memo("q", memo) == agently_user_text(memo)


def test_a_memo_is_rendered_once_not_on_every_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pure-Python YAML render (about 2 s for a 600 KB memo of small items) ran on the event
    loop for every request of the session; now once per memo, also for the same memo read back
    from the store as a new object."""
    calls = []
    real = yaml.safe_dump

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(yaml, "safe_dump", counting)
    memo = {"run": uuid.uuid4().hex, "items": [[i] for i in range(500)]}
    state = SessionState([], memo)
    first = inject([{"role": "user", "content": "hi"}], state)
    for _ in range(3):
        assert inject([{"role": "user", "content": "hi"}], state) == first
    reloaded = SessionState.from_dict(orjson.loads(state.to_json()))
    assert inject([{"role": "user", "content": "again"}], reloaded)[-1]["content"].startswith(
        first[-1]["content"].split("[INPUT]")[0])
    assert len(calls) == 1


def test_renders_of_memos_that_json_cannot_tell_apart_stay_apart() -> None:
    """orjson writes NaN as null: a memo holding NaN is not given the render of one holding null."""
    assert with_memo("q", {"a": None}) != with_memo("q", {"a": float("nan")})
    assert with_memo("q", {"a": 1}) != with_memo("q", {"a": 1.0}) != with_memo("q", {"a": True})
    assert with_memo("q", "[1]" + " " * 300) != with_memo("q", [1])


def test_memo_over_the_limit_is_refused_by_an_import() -> None:
    big = {"a": [[1]] * 150000}
    assert memo_over_limit(big) == len(orjson.dumps(big)) > MEMO_MAX_BYTES
    assert memo_over_limit({"a": "x" * (MEMO_MAX_BYTES - 100)}) is None
    with pytest.raises(InvalidSession) as refused:
        from_agently({"full_context": [], "memo": big})
    assert str(MEMO_MAX_BYTES) in refused.value.message and "'memo'" in refused.value.message


def test_a_hook_memo_over_the_limit_falls_back_to_the_cut() -> None:
    """An execution hook that returns a memo over the limit is a failed hook: the memo stays."""
    window = [{"role": "user", "content": "u" * 50}, {"role": "assistant", "content": "a" * 50}]

    def execution(full: Any, window: Any, memo: Any, settings: Any) -> Any:
        return None, None, {"a": [[1]] * 150000}

    cfg = SimpleNamespace(analysis_fn=lambda *_: "fold", analysis="m:analysis",
                          execution_fns={"fold": execution}, execution={"fold": "m:fold"})
    new_window, memo = asyncio.run(bounding._resize(cfg, window, window, "old", {}, 10_000))  # type: ignore[arg-type]
    assert memo == "old" and new_window == window


def test_erasing_a_session_drops_its_rendered_memo_and_no_other(make_gateway: Any) -> None:
    """A rendered memo is the memo's text in the gateway's memory: erasing a session drops its
    rendering, so its memo does not outlive it there, and only its: another tenant's memo stays
    rendered (one tenant's erasures cost no one else a rendering)."""
    import httpx

    from gateway.session import model
    from tests.conftest import ACME_KEY, GLOBEX_KEY

    gateway = make_gateway()
    memos = {ACME_KEY: {"customer": "ERASE-ME-7731", "notes": ["one", "two"]},
             GLOBEX_KEY: {"customer": "KEEP-ME-4410", "notes": ["three"]}}
    for key, memo in memos.items():
        auth = {"Authorization": f"Bearer {key}"}
        put = httpx.put(f"{gateway.base_url}/sessions/erase-memo/memo", json={"memo": memo}, headers=auth,
                        timeout=30)
        assert put.status_code == 200, put.text
        gateway.openai(key=key, session="erase-memo").chat.completions.create(
            model="standin", messages=[{"role": "user", "content": "hi"}])

    def kept(marker: str) -> bool:
        return any(marker in text for text in model._RENDERS._held.values())

    assert kept("ERASE-ME-7731") and kept("KEEP-ME-4410")
    erased = httpx.delete(f"{gateway.base_url}/sessions/erase-memo", headers={"Authorization": f"Bearer {ACME_KEY}"},
                          timeout=30)
    assert erased.status_code == 200, erased.text
    assert not kept("ERASE-ME-7731") and kept("KEEP-ME-4410")


def test_a_memo_not_rendered_yet_is_rendered_off_the_event_loop(make_gateway: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A memo this process has not rendered (after a restart, in another worker, or written by an
    import) is rendered on the offload pool before the request's body is built, never on the
    event loop, where a large one would hold up every other request; then it is kept."""
    import threading

    import httpx

    from gateway import offload
    from gateway.session import model
    from tests.conftest import ACME_KEY

    gateway = make_gateway()
    auth = {"Authorization": f"Bearer {ACME_KEY}"}
    memo = {"items": [{"n": i, "tags": ["a", "b"]} for i in range(200)]}
    put = httpx.put(f"{gateway.base_url}/sessions/cold-memo/memo", json={"memo": memo}, headers=auth, timeout=30)
    assert put.status_code == 200, put.text
    model._RENDERS.clear()  # as after a restart
    rendered_on: list[str] = []
    render = model._render_memo

    def spy(value: Any) -> str:
        rendered_on.append(threading.current_thread().name)
        return render(value)

    monkeypatch.setattr(model, "_render_memo", spy)
    client = gateway.openai(session="cold-memo")
    for text in ("one", "two"):
        client.chat.completions.create(model="standin", messages=[{"role": "user", "content": text}])
    assert len(rendered_on) == 1 and rendered_on[0].startswith(offload.THREAD_PREFIX), rendered_on


@pytest.mark.parametrize("memo", [5, True, 1.5, -3, 0.0, False])
def test_a_scalar_memo_is_at_hand(memo: Any) -> None:
    """A scalar memo (a hook or an import may leave one) counts as rendered: it is never kept, so
    otherwise every request of its session would make a trip to the offload pool for a str()."""
    from gateway.session.model import memo_rendered, memo_text

    assert memo_rendered(memo) and memo_text(memo) == str(memo)
