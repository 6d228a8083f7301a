"""Load generator: closed-loop workers sending chat completions, measuring what a client sees.

:func:`run_cell` runs one measurement cell: ``concurrency`` workers share one keep-alive
``aiohttp.ClientSession`` and send ``POST <base_url>/chat/completions`` back to back until
``requests`` have been sent or ``time_cap`` seconds have passed (requests in flight then
finish). Given several base URLs (replicas of one service), request ``n`` goes to URL
``n mod len(urls)`` (``n`` counts the cell's requests): round-robin per request, so the
rounds of one session are spread over the replicas too, as behind a load balancer without
session affinity.

Worker ``w`` sends ``Authorization: Bearer <api_key>`` and ``X-Session-Id:
<session_prefix>-<w>``, so every worker holds one conversation that grows by one round per
request; with ``client="history"`` it also sends that conversation's earlier turns itself
(see :data:`CLIENTS`). A request counts as ok when it answers 200 and, streamed, its body ends with
``data: [DONE]``; anything else (status, broken stream, timeout) counts as an error.

Latency is from just before the request is sent to the last body byte; TTFB (streams only) to
the first body chunk.

    python -m benchmarks.load --url http://127.0.0.1:9100/v1 --concurrency 16 --requests 1000 --stream
    python -m benchmarks.load --url http://127.0.0.1:9101/v1 --url http://127.0.0.1:9102/v1
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import orjson

T = TypeVar("T")
DONE = b"data: [DONE]\n\n"
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=60)


@dataclass
class CellResult:
    """What one cell measured. Times are in seconds."""

    requested: int
    ok: int = 0
    errors: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    first_error: str | None = None

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0

    @property
    def p50(self) -> float | None:
        return percentile(self.latencies, 0.50)

    @property
    def p99(self) -> float | None:
        return percentile(self.latencies, 0.99)

    @property
    def ttfb_p50(self) -> float | None:
        return percentile(self.ttfb, 0.50)

    def error(self, reason: str) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = reason


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile of ``values`` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


PROTOCOLS = ("chat", "responses", "messages")
"""The wire protocols a cell can speak: Chat Completions, OpenAI Responses, Anthropic Messages."""
PATHS = {"chat": "/chat/completions", "responses": "/responses", "messages": "/messages"}
FINAL = {"chat": DONE, "responses": b"event: response.completed", "messages": b"event: message_stop"}
"""What a complete stream of each protocol carries (its final event)."""


CLIENTS = ("window", "history")
"""How a session's client talks: ``window`` sends only its new message and relies on the
gateway's injected window; ``history`` sends its whole conversation each turn (as most OpenAI
clients do), keeping the last :data:`HISTORY_ROUNDS` rounds."""
HISTORY_ROUNDS = 12
REPLY_TEXT = "A benchmark reply of about the length the stand-in gives, one sentence or so, no more."
"""What a ``history`` client appends as the model's turn: the load generator does not parse
replies, and the gateway records only what follows the last assistant message anyway."""


def request_body(n: int, stream: bool, model: str, protocol: str = "chat",
                 history: Sequence[str] = ()) -> bytes:
    """Request *n* of a cell. *history* is the client's earlier user texts (a ``history``
    client): each is sent followed by an assistant turn, before the new message."""
    system = "You are the benchmark's model."
    text = user_text(n)
    turns: list[dict[str, Any]] = []
    for earlier in history:
        turns += [{"role": "user", "content": earlier}, {"role": "assistant", "content": REPLY_TEXT}]
    turns.append({"role": "user", "content": text})
    if protocol == "responses":
        return orjson.dumps({"model": model, "stream": stream, "instructions": system,
                             "input": turns if history else text})
    if protocol == "messages":
        return orjson.dumps({"model": model, "stream": stream, "max_tokens": 256, "system": system,
                             "messages": turns})
    return orjson.dumps({"model": model, "stream": stream, "messages": [{"role": "system", "content": system}, *turns]})


def user_text(n: int) -> str:
    return f"Benchmark request {n}: please answer in one sentence."


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
               stream: bool, result: CellResult, final: bytes = DONE) -> None:
    started = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as response:
            first = await response.content.readany()
            first_at = time.perf_counter()
            tail, seen = first, final in first
            async for chunk in response.content.iter_any():
                seen = seen or final in tail[-len(final):] + chunk
                tail = (tail + chunk)[-len(final):]
            finished = time.perf_counter()
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        result.error(f"{type(exc).__name__}: {exc}")
        return
    if status != 200:
        result.error(f"HTTP {status}: {first[:200]!r}")
    elif stream and not seen:
        result.error(f"stream ended without its final event ({final.decode()})")
    else:
        result.ok += 1
        result.latencies.append(finished - started)
        if stream:
            result.ttfb.append(first_at - started)


async def run_cell(base_url: str | Sequence[str], *, stream: bool, concurrency: int, requests: int,
                   time_cap: float, api_key: str = "sg-demo-acme", session_prefix: str | None = "bench",
                   model: str = "standin", protocol: str = "chat", client: str = "window") -> CellResult:
    """Run one cell against ``base_url`` (ending in ``/v1``), or round-robin over several, and
    return what it measured. With ``session_prefix`` None no ``X-Session-Id`` is sent (each
    request stands alone). With *client* ``history`` each worker sends its whole conversation
(see :data:`CLIENTS`). Raises ``ValueError`` for an empty list of URLs."""
    bases = [base_url] if isinstance(base_url, str) else list(base_url)
    if not bases:
        raise ValueError("run_cell needs at least one base URL")
    urls = [base.rstrip("/") + PATHS[protocol] for base in bases]
    result = CellResult(requested=requests)
    numbers = itertools.count()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
        deadline = time.perf_counter() + time_cap

        async def worker(w: int) -> None:
            headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
            if protocol == "messages":
                headers["anthropic-version"] = "2023-06-01"
            if session_prefix is not None:
                headers["X-Session-Id"] = f"{session_prefix}-{w}"
            earlier: list[str] = []
            while time.perf_counter() < deadline:
                n = next(numbers)
                if n >= requests:
                    return
                body = request_body(n, stream, model, protocol, earlier)
                await _one(session, urls[n % len(urls)], body, headers, stream, result, FINAL[protocol])
                if client == "history":
                    earlier = [*earlier, user_text(n)][-HISTORY_ROUNDS:]

        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        result.elapsed = time.perf_counter() - started
    return result


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a new event loop (uvloop when installed)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description="Send chat completions and print throughput and latency.")
    parser.add_argument("--url", required=True, action="append",
                        help="base URL ending in /v1; repeat it to spread requests round-robin")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--time-cap", type=float, default=30.0, help="seconds")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--api-key", default="sg-demo-acme")
    args = parser.parse_args()
    result = run_sync(run_cell(args.url, stream=args.stream, concurrency=args.concurrency,
                             requests=args.requests, time_cap=args.time_cap, api_key=args.api_key))
    print(f"ok={result.ok} errors={result.errors} req/s={result.rps:.0f} p50={_ms(result.p50)}ms "
          f"p99={_ms(result.p99)}ms ttfb_p50={_ms(result.ttfb_p50)}ms")
    if result.first_error:
        print(f"first error: {result.first_error}")


if __name__ == "__main__":
    main()
