"""Exports say which protocol each round came from, and a bundle with rounds of every protocol
verifies offline; a previous_response_id chain is exported and erased like any session."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import httpx
import orjson

from gateway.export import verify_bundle
from tests.conftest import AUDITOR_TOKEN, Gateway
from tests.protocols.conftest import anthropic_client

AUDITOR = {"Authorization": f"Bearer {AUDITOR_TOKEN}"}


def test_export_records_name_their_protocol(pgw: Gateway, tmp_path: Path) -> None:
    """One round per protocol: each exported record carries its protocol; the bundle verifies."""
    pgw.openai(session="x-chat").chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}])
    pgw.openai(session="x-resp").responses.create(model="m", input="b")
    chain = pgw.openai().responses.create(model="m", input="c")
    anthropic_client(pgw, session="x-msg").messages.create(model="c", max_tokens=9,
                                                           messages=[{"role": "user", "content": "d"}])
    r = httpx.get(f"{pgw.url}/admin/export?tenant=acme&format=jsonl", headers=AUDITOR, timeout=30)
    assert r.status_code == 200, r.text
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        tar.extractall(tmp_path, filter="data")
    records = tmp_path / "acme-export.jsonl"
    lines = [orjson.loads(line) for line in records.read_bytes().splitlines()]
    assert {rec["session_id"]: rec["protocol"] for rec in lines} == {
        "x-chat": "chat", "x-resp": "responses", chain.id: "responses", "x-msg": "messages"}
    public_key = httpx.get(f"{pgw.url}/admin/public-key", headers=AUDITOR).content
    report = verify_bundle(records, public_key)
    assert report.ok, report.summary()
