"""``benchmarks.profile``: py-spy's samples of the gateway, counted by stage."""

from __future__ import annotations

from benchmarks.profile import by_stage, report


def test_profile_counts_each_sample_for_its_first_stage_and_innermost_gateway_function() -> None:
    """``benchmarks.profile.by_stage`` on py-spy's raw format: a sample counts once, for the
    first stage whose frame is on its stack (the store before the pipeline glue around it), and
    for the innermost frame under ``gateway/``; the aiohttp client's own task counts for the
    upstream request although it runs under the server's loop; a stack with no marked frame
    (the loop's own, say) is "other"."""
    raw = "\n".join([
        "run (gateway/server.py:457);_chat (gateway/handlers.py:135);"
        "SessionService.commit_round (gateway/sessions.py:394);seal (gateway/crypto.py:151) 5",
        "run (gateway/server.py:457);_chat (gateway/handlers.py:135);inject (gateway/stages/inject.py:20);"
        "ChatCodec.forward_body (gateway/codecs/chat.py:59) 3",
        "run (gateway/server.py:457);RequestHandler.start (aiohttp/web_protocol.py:500) 2",
        "run (gateway/server.py:457);Runner.run (asyncio/runners.py:118);"
        "ClientRequest.write_bytes (aiohttp/client_reqrep.py:1594) 4",
        "run (gateway/server.py:457);Runner.run (asyncio/runners.py:118) 6",
        "run (gateway/server.py:457);WriteQueue._next (gateway/store/sqlite.py:330);"
        "run_transaction (gateway/store/sqlite.py:400) 2",
        "Thread.run (threading.py:982);something (elsewhere.py:1) 1",
        "not a sample line",
    ])
    total, stages, inner = by_stage(raw)
    assert total == 23
    store = "store: the round's plan and its SQL (batched on the loop, or the writer thread)"
    assert dict(stages) == {store: 7,  # a batch's savepoints on the loop count for the store
                            "inject the window (the forwarded body)": 3,
                            "aiohttp server (parsing, writing, tasks)": 2,
                            "upstream request (aiohttp client)": 4,  # the client's task, not the server's
                            "other": 7}  # the loop's own frame is no stage's mark
    assert dict(inner) == {"seal": 5, "ChatCodec.forward_body": 3, "run": 12, "run_transaction": 2,
                           "(outside gateway/)": 1}
    assert f"| {store} | 30.4% |" in report(total, stages, inner)
