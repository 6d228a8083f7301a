"""Compressed request bodies, as real clients send them (Codex: zstd; others: gzip, deflate), over
real loopback sockets: every route that reads a body decodes them, the size limit holds for the
decoded size (a decompression bomb is 413 without ever being inflated whole), a corrupt body is
400, an unknown coding 415, never a 500; what goes upstream is the plain body with no
``Content-Encoding``."""

from __future__ import annotations

import gzip
import threading
import tracemalloc
import zlib
from collections.abc import Callable

import httpx
import orjson
import pytest
import zstandard

from gateway.decompress import decode_body
from gateway.errors import CorruptBody, PayloadTooLarge, UnsupportedEncoding
from tests.conftest import ACME_KEY, Gateway
from tests.hostile.conftest import Capture

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}
LIMIT = 256 * 1024
CHAT = {"model": "standin", "messages": [{"role": "user", "content": "compressed hello " * 50}]}


def gz(data: bytes) -> bytes:
    return gzip.compress(data)


def zlib_deflate(data: bytes) -> bytes:
    return zlib.compress(data)


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def zst_streamed(data: bytes) -> bytes:
    """zstd as a streaming encoder writes it (no content size in the frame, two frames)."""
    packer = zstandard.ZstdCompressor(write_content_size=False)
    half = len(data) // 2
    return packer.compress(data[:half]) + packer.compress(data[half:])


CODECS: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    "gzip": ("gzip", gz),
    "x-gzip": ("x-gzip", gz),
    "deflate-zlib": ("deflate", zlib_deflate),
    "deflate-raw": ("deflate", raw_deflate),
    "zstd": ("zstd", zst),
    "zstd-streamed": ("zstd", zst_streamed),
    "gzip-then-zstd": ("gzip, zstd", lambda data: zst(gz(data))),
    "upper-case": ("GZIP", gz),
}


def bomb(coding: str, size: int) -> bytes:
    """*size* zero bytes, compressed: a few KB on the wire."""
    block = b"\0" * (1 << 20)
    if coding == "zstd":
        packer = zstandard.ZstdCompressor(write_content_size=False).compressobj()
        return b"".join(packer.compress(block) for _ in range(size >> 20)) + packer.flush()
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}[coding]
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return b"".join(packer.compress(block) for _ in range(size >> 20)) + packer.flush()


@pytest.fixture
def gw(make_gateway: Callable[..., Gateway], capture: Capture) -> Gateway:
    return make_gateway(upstreams=[{"name": "capture", "base_url": capture.url, "models": ["*"]}],
                        server={"host": "127.0.0.1", "port": 0, "max_body_bytes": LIMIT})


def post(url: str, data: bytes, encoding: str | None, **headers: str) -> httpx.Response:
    extra = {"Content-Encoding": encoding} if encoding else {}
    return httpx.post(url, content=data, headers={**AUTH, "Content-Type": "application/json", **extra, **headers},
                      timeout=30)


def assert_error(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "code"} and error["code"] == code


@pytest.mark.parametrize("name", list(CODECS))
def test_compressed_chat_bodies_are_decoded_and_forwarded_plain(gw: Gateway, capture: Capture, name: str) -> None:
    """A gzip, deflate (zlib or raw) or zstd chat body is answered, and the upstream receives the
    plain JSON with no Content-Encoding."""
    encoding, pack = CODECS[name]
    plain = orjson.dumps(CHAT)
    resp = post(f"{gw.base_url}/chat/completions", pack(plain), encoding, **{"X-Session-Id": f"c-{name}"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == "ok"
    path, headers, body = capture.seen[-1]
    assert path == "/v1/chat/completions"
    assert "content-encoding" not in {k.lower() for k in headers}
    assert orjson.loads(body)["messages"] == CHAT["messages"]
    rounds = httpx.get(f"{gw.base_url}/sessions/c-{name}", headers=AUTH).json()["full_context"]
    assert rounds[0]["content"] == CHAT["messages"][0]["content"]


def test_forwarded_route_gets_the_decoded_body(gw: Gateway, capture: Capture) -> None:
    """A zstd body on a forwarded route (as Codex sends to /v1/responses-like routes) reaches the
    upstream decoded, with no Content-Encoding."""
    plain = orjson.dumps({"model": "text-embedding-3-small", "input": "zstd body " * 100})
    resp = post(f"{gw.base_url}/embeddings", zst(plain), "zstd")
    assert resp.status_code == 200, resp.text
    path, headers, body = capture.seen[-1]
    assert path == "/v1/embeddings" and body == plain
    assert "content-encoding" not in {k.lower() for k in headers}


def test_session_import_accepts_a_gzip_body(gw: Gateway) -> None:
    """PUT /v1/sessions/{id} reads its body through the same decoder."""
    document = {"id": "imp", "full_context": [{"role": "user", "content": "from gzip"},
                                              {"role": "assistant", "content": "yes"}], "memo": None}
    resp = httpx.put(f"{gw.base_url}/sessions/imported", content=gz(orjson.dumps(document)),
                     headers={**AUTH, "Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert resp.status_code == 200, resp.text
    exported = httpx.get(f"{gw.base_url}/sessions/imported", headers=AUTH).json()
    assert [m["content"] for m in exported["full_context"]] == ["from gzip", "yes"]


@pytest.mark.parametrize("coding", ["gzip", "deflate", "zstd"])
def test_decompression_bomb_is_413(gw: Gateway, capture: Capture, coding: str) -> None:
    """A few KB that inflate to 64 MB, on a 256 KB limit, is refused with 413; nothing goes upstream."""
    payload = bomb(coding, 64 << 20)
    assert len(payload) < LIMIT
    for url in (f"{gw.base_url}/chat/completions", f"{gw.base_url}/embeddings"):
        assert_error(post(url, payload, coding), 413, "payload_too_large")
    assert capture.seen == []


def test_a_bomb_is_never_inflated_whole() -> None:
    """Decoding a 512 MB bomb under a 1 MB limit allocates a few MB at most, for every coding."""
    for coding in ("gzip", "deflate", "zstd"):
        payload = bomb(coding, 512 << 20)
        tracemalloc.start()
        try:
            with pytest.raises(PayloadTooLarge):
                decode_body(payload, coding, 1 << 20)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 16 << 20, (coding, peak)


def test_the_limit_holds_exactly_on_the_decoded_size() -> None:
    """A body that decodes to the limit passes; one byte more is 413."""
    for coding, pack in (("gzip", gz), ("deflate", zlib_deflate), ("zstd", zst)):
        assert decode_body(pack(b"a" * 1000), coding, 1000) == b"a" * 1000
        with pytest.raises(PayloadTooLarge):
            decode_body(pack(b"a" * 1001), coding, 1000)


@pytest.mark.parametrize(("coding", "payload"), [
    ("gzip", b"this is not gzip at all"),
    ("gzip", gz(orjson.dumps(CHAT))[:-12]),                       # truncated
    ("gzip", gz(orjson.dumps(CHAT)) + b"trailing junk"),          # bytes after the member
    ("gzip", b"\x1f\x8b\x08\x00" + b"\xff" * 64),                  # a header, then garbage
    ("deflate", b"\x78\x9c" + b"\x00\xff" * 40),
    ("deflate", zlib_deflate(orjson.dumps(CHAT)) + b"junk"),
    ("zstd", b"(\xb5/\xfd" + b"garbage" * 10),
    ("zstd", zst(orjson.dumps(CHAT))[:-5]),                       # truncated frame
    ("zstd", zst(orjson.dumps(CHAT)) + b"junk"),
], ids=["gzip-garbage", "gzip-truncated", "gzip-trailing", "gzip-bad-data", "deflate-bad-data",
        "deflate-trailing", "zstd-garbage", "zstd-truncated", "zstd-trailing"])
def test_corrupt_compressed_body_is_400(gw: Gateway, capture: Capture, coding: str, payload: bytes) -> None:
    """A body that does not decode is 400 corrupt_body on chat and forwarded routes, never 500."""
    for url in (f"{gw.base_url}/chat/completions", f"{gw.base_url}/embeddings"):
        assert_error(post(url, payload, coding), 400, "corrupt_body")
    assert capture.seen == []


@pytest.mark.parametrize("encoding", ["br", "compress", "gzip, br", "x-unknown", "gzip, gzip, gzip, gzip"])
def test_unknown_content_encoding_is_415(gw: Gateway, capture: Capture, encoding: str) -> None:
    """A coding the gateway cannot decode is 415 on every body route, whatever the body."""
    for url in (f"{gw.base_url}/chat/completions", f"{gw.base_url}/embeddings"):
        assert_error(post(url, orjson.dumps(CHAT), encoding), 415, "unsupported_content_encoding")
    resp = httpx.put(f"{gw.base_url}/sessions/s-415", content=b"{}",
                     headers={**AUTH, "Content-Encoding": encoding})
    assert_error(resp, 415, "unsupported_content_encoding")
    assert capture.seen == []


def test_identity_and_uncompressed_bodies_still_work(gw: Gateway) -> None:
    """``identity`` (and no header) means the body as it is."""
    for encoding in (None, "identity"):
        assert post(f"{gw.base_url}/chat/completions", orjson.dumps(CHAT), encoding).status_code == 200


def test_decoder_errors_are_typed() -> None:
    """The decoder raises only the gateway's typed errors (415, 400, 413)."""
    with pytest.raises(UnsupportedEncoding):
        decode_body(b"x", "br", 100)
    with pytest.raises(CorruptBody):
        decode_body(b"x", "gzip", 100)
    assert decode_body(b"", "gzip", 100) == b""


def test_many_compressed_requests_at_once_all_succeed(gw: Gateway) -> None:
    """Concurrent compressed requests (some decoded in worker threads) are each answered."""
    results: list[int] = []
    big = orjson.dumps({"model": "standin", "messages": [{"role": "user", "content": "y" * 200_000}]})

    def one(n: int) -> None:
        payload = zst(big) if n % 2 else gz(orjson.dumps(CHAT))
        results.append(post(f"{gw.base_url}/chat/completions", payload, "zstd" if n % 2 else "gzip").status_code)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [200] * 8


def test_large_and_multi_part_bodies_decode_exactly() -> None:
    """Bodies spanning many input slices and output pieces, concatenated gzip members and zstd
    frames decode to exactly the bytes that were compressed."""
    import os

    data = os.urandom(300_000) + b"a" * 700_000
    for coding, pack in (("gzip", gz), ("deflate", zlib_deflate), ("deflate", raw_deflate), ("zstd", zst),
                         ("zstd", zst_streamed)):
        assert decode_body(pack(data), coding, len(data)) == data
    assert decode_body(gz(b"abc") + gz(b"def"), "gzip", 100) == b"abcdef"
    assert decode_body(zst(b"abc") + zst(b"def"), "zstd", 100) == b"abcdef"
