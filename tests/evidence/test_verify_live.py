"""Verification of a gateway that is serving, on SQLite and PostgreSQL.

Auditors verify live systems: the console's and ``/admin/verify``'s checks run inside the
gateway, the CLI beside it. Verification reads the chain, then the rounds and state rows it checks
them against; a round committed between those reads must not look like tampering. Rounds go on
from several clients while ``audit verify`` runs again and again: every run must pass, and a run
after the load must count every round.
"""

from __future__ import annotations

import threading

import httpx

from tests.conftest import ACME_KEY, Gateway
from tests.evidence.conftest import Tables, verify
from tests.evidence.test_tamper_data import record

CLIENTS = 6
TURNS = 40
VERIFIES = 12


def test_verify_passes_while_rounds_are_committed(db_gateway: tuple[Gateway, Tables]) -> None:
    gw, tables = db_gateway
    failures: list[str] = []

    def client(n: int) -> None:
        with httpx.Client(base_url=gw.base_url, timeout=30,
                          headers={"Authorization": f"Bearer {ACME_KEY}", "X-Session-Id": f"live-{n}"}) as http:
            for turn in range(TURNS):
                resp = http.post("/chat/completions", json={"model": "standin", "messages": [
                    {"role": "user", "content": f"client {n} turn {turn}"}]})
                if resp.status_code != 200:
                    failures.append(resp.text)
                    return

    record(gw, "before", 1)  # the tenant exists before the first verification
    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    outcomes = []
    try:
        for _ in range(VERIFIES):
            outcomes.append(verify(gw, "--tenant", "acme"))
            if not any(t.is_alive() for t in threads):
                break
    finally:
        for t in threads:
            t.join(timeout=120)
    assert not failures, failures[:1]
    assert len(outcomes) >= 2, "the load ended before verification overlapped it"
    for code, out in outcomes:
        assert code == 0, out
    code, out = verify(gw, "--tenant", "acme")
    assert code == 0, out
    (rounds,), = tables.sql("SELECT count(*) FROM rounds WHERE tenant='acme'")
    assert rounds == CLIENTS * TURNS + 1
