"""The benchmark's request bodies (``benchmarks.load.request_body``): a ``history`` client sends
its earlier turns in each protocol's own form, so the gateway sees a client with its own history."""

from __future__ import annotations

import orjson

from benchmarks.load import REPLY_TEXT, request_body


def test_a_window_client_sends_only_its_new_message() -> None:
    body = orjson.loads(request_body(7, False, "standin"))
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "request 7" in body["messages"][-1]["content"]


def test_a_history_client_sends_its_earlier_turns_in_every_protocol() -> None:
    earlier = ["first question", "second question"]
    chat = orjson.loads(request_body(9, True, "standin", "chat", earlier))
    assert [m["role"] for m in chat["messages"]] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert chat["messages"][1]["content"] == "first question"
    assert chat["messages"][2]["content"] == REPLY_TEXT
    messages = orjson.loads(request_body(9, False, "standin", "messages", earlier))
    assert [m["role"] for m in messages["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    responses = orjson.loads(request_body(9, False, "standin", "responses", earlier))
    assert [item["role"] for item in responses["input"]] == ["user", "assistant", "user", "assistant", "user"]
    assert orjson.loads(request_body(9, False, "standin", "responses"))["input"].startswith("Benchmark request 9")
