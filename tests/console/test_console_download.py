"""A bundle download streams the bundle's files from disk: the archive is never built in memory."""

from __future__ import annotations

import hashlib
import tarfile
import tracemalloc
from pathlib import Path

from gateway.console.views import CONSOLE
from gateway.export import bundle_paths
from tests.conftest import Gateway, wait_for
from tests.console.conftest import login_csrf, signed_in_client

BIG = 24 * 1024 * 1024


def test_a_big_bundle_downloads_without_being_held_in_memory(console_gateway: Gateway, tmp_path: Path) -> None:
    """A 24 MB bundle downloads as a tar of exactly its files while the gateway's memory peak
    grows by far less than the bundle (the archive was built in memory per download: +size each)."""
    client = signed_in_client(console_gateway)
    csrf = login_csrf(client.get("/console/overview").text)
    resp = client.post("/console/export", data={"csrf": csrf, "tenant": "acme", "format": "jsonl"},
                       headers={"Origin": console_gateway.url})
    assert resp.status_code == 303, resp.text
    job_url = resp.headers["location"]
    wait_for(lambda: "Done:" in client.get(job_url).text, seconds=30)
    job = console_gateway.app[CONSOLE].jobs._jobs[job_url.rsplit("/", 1)[1]]
    assert job is not None and job.out is not None
    records = bundle_paths(job.out)[0]
    with records.open("ab") as f:  # grown on disk: the download does not check it, only sends it
        for _ in range(BIG // (1024 * 1024)):
            f.write(b"x" * (1024 * 1024 - 1) + b"\n")
    expected = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in bundle_paths(job.out)}

    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        with client.stream("GET", f"{job_url}/download") as download, (tmp_path / "got.tar").open("wb") as got:
            assert download.status_code == 200
            assert int(download.headers["content-length"]) > BIG
            for chunk in download.iter_bytes():
                got.write(chunk)
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (tmp_path / "got.tar").stat().st_size == int(download.headers["content-length"])
    assert peak - start < BIG // 3
    with tarfile.open(tmp_path / "got.tar") as tar:
        files = {m.name: hashlib.sha256(tar.extractfile(m).read()).hexdigest() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert files == expected
