"""What encryption costs per gateway request, for comparing with the benchmark's CPU per request.

A recorded round does this crypto work: unwrap the session's data key (cached after the first
use), open the sealed state twice (to inject, and inside the commit), seal the new state and
seal the round. This times exactly those calls on a state of the size the benchmark reaches
(a full 12,000-character window) and prints the microseconds per request.

    python -m benchmarks.crypto_cost [--window-chars 12000] [--gateway-cpu-ms 0.6]
"""

from __future__ import annotations

import argparse
import time

import orjson

from gateway import crypto
from gateway.keyring import Keyring, new_master_key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window-chars", type=int, default=12000)
    parser.add_argument("--gateway-cpu-ms", type=float, default=None,
                        help="the benchmark's gateway CPU ms per request, to print the share")
    parser.add_argument("--rounds", type=int, default=20000)
    args = parser.parse_args()

    keyring = Keyring([new_master_key()])
    dk = crypto.new_data_key()
    kek, wrapped = keyring.wrap(dk)
    per_message = 150
    window = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x" * per_message}
              for i in range(max(1, args.window_chars // (per_message + 30)))]
    state = orjson.dumps({"context_window": window, "memo": None, "settings": {}})
    round_plain = orjson.dumps(window[-2:])
    sealed_state = crypto.seal(dk, state, tenant="acme", session_id="bench-1", seq=7, field="state")
    aad = {"tenant": "acme", "session_id": "bench-1"}

    start = time.perf_counter()
    for _ in range(args.rounds):
        key = keyring.unwrap(kek, dk.id, wrapped)
        crypto.open_sealed(key, sealed_state, seq=7, field="state", **aad)
        crypto.open_sealed(key, sealed_state, seq=7, field="state", **aad)
        crypto.seal(key, state, seq=8, field="state", **aad)
        crypto.seal(key, round_plain, seq=9, field="round", **aad)
    per_request_us = (time.perf_counter() - start) / args.rounds * 1e6
    print(f"state {len(state)} bytes, round {len(round_plain)} bytes: "
          f"crypto per recorded request {per_request_us:.1f} us")
    if args.gateway_cpu_ms:
        print(f"share of {args.gateway_cpu_ms} ms gateway CPU per request: "
              f"{per_request_us / (args.gateway_cpu_ms * 1000) * 100:.1f}%")


if __name__ == "__main__":
    main()
