"""``benchmarks.profile``: py-spy's samples of the gateway, counted by stage."""

from __future__ import annotations

from benchmarks.profile import by_stage, report


def test_profile_counts_each_sample_for_its_first_stage_and_innermost_gateway_function() -> None:
    """``benchmarks.profile.by_stage`` on py-spy's raw format: a sample counts once, for the
    first stage whose frame is on its stack (the store before the pipeline glue around it), and
    for the innermost frame under ``gateway/``; a stack with no marked frame is "other"."""
    raw = "\n".join([
        "run (gateway/server.py:457);_chat (gateway/handlers.py:135);"
        "SessionService.commit_round (gateway/sessions.py:394);seal (gateway/crypto.py:151) 5",
        "run (gateway/server.py:457);_chat (gateway/handlers.py:135);inject (gateway/stages/inject.py:20);"
        "ChatCodec.forward_body (gateway/codecs/chat.py:59) 3",
        "run (gateway/server.py:457);RequestHandler.start (aiohttp/web_protocol.py:500) 2",
        "Thread.run (threading.py:982);something (elsewhere.py:1) 1",
        "not a sample line",
    ])
    total, stages, inner = by_stage(raw)
    assert total == 11
    assert dict(stages) == {"store: the round's plan and its SQL (mostly the writer thread)": 5,
                            "inject the window (the forwarded body)": 3,
                            "aiohttp server (parsing, writing, tasks)": 2, "other": 1}
    assert dict(inner) == {"seal": 5, "ChatCodec.forward_body": 3, "run": 2, "(outside gateway/)": 1}
    assert "| store: the round's plan and its SQL (mostly the writer thread) | 45.5% |" in report(total, stages, inner)
