"""``gateway.upstream.Decoder``: a provider's ``Content-Encoding`` undone piece by piece, whole
whatever the network's reads, and bounded in memory whatever the compression ratio."""

from __future__ import annotations

import gzip
import zlib

import pytest
import zstandard

from gateway.errors import UpstreamError
from gateway.upstream import Decoder

BODY = b'{"choices": [{"message": {"content": "' + b"two members, one body. " * 200 + b'"}}]}'


def decoded(header: str, reads: list[bytes]) -> bytes:
    decoder = Decoder.for_header(header, "provider")
    return b"".join([piece for data in reads for piece in decoder.feed(data)] + list(decoder.flush()))


def cuts(data: bytes, *at: int) -> list[bytes]:
    bounds = [0, *at, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def test_a_gzip_body_of_several_members_decodes_whole_wherever_the_reads_end() -> None:
    """RFC 1952 §2.2: members one after another are one body. The decoder dropped or replaced
    the second member when the first ended inside a read, or at a read's end."""
    half = len(BODY) // 2
    first, second = gzip.compress(BODY[:half]), gzip.compress(BODY[half:])
    data = first + second
    assert decoded("gzip", [data]) == BODY
    for cut in range(1, len(data)):
        assert decoded("gzip", cuts(data, cut)) == BODY, cut
    assert decoded("gzip", cuts(data, len(first), len(first) + 3)) == BODY
    assert decoded("gzip", [first, b"\0" * 8, second]) == BODY  # zero padding between members


def test_deflate_ignores_bytes_after_its_end_and_gzip_refuses_a_bad_second_member() -> None:
    """Bytes after a gzip member that are neither zero padding nor a member are a body that does
    not decode, wherever the reads end (they were ignored when they came in the member's read
    and refused when they came in the next one)."""
    assert decoded("deflate", [zlib.compress(BODY) + b"trailing junk"]) == BODY
    with pytest.raises(UpstreamError) as caught:
        decoded("gzip", [gzip.compress(BODY) + b"not a gzip member"])
    assert caught.value.code == "bad_upstream_reply"
    with pytest.raises(UpstreamError):
        decoded("gzip", [gzip.compress(BODY), b"not a gzip member"])


def bomb_pieces(header: str, data: bytes, read: int) -> tuple[int, int]:
    """The largest piece and the total a decoder hands out for *data* in reads of *read* bytes,
    never holding the whole output."""
    decoder = Decoder.for_header(header, "provider")
    largest = total = 0
    for start in range(0, len(data), read):
        for piece in decoder.feed(data[start:start + read]):
            largest, total = max(largest, len(piece)), total + len(piece)
    for piece in decoder.flush():
        largest, total = max(largest, len(piece)), total + len(piece)
    return largest, total


@pytest.mark.parametrize("header", ["zstd", "gzip"])
def test_a_small_bomb_decodes_in_bounded_pieces(header: str) -> None:
    """64 MiB of zeros is a few KiB compressed; one network read of it made zstd hand out all of
    its output at once (a 16 KiB reply took the gateway from 84 MB to 1.1 GB). Every piece is at
    most a little over a MiB now, and the body still decodes whole."""
    size = 64 << 20
    compress = zstandard.ZstdCompressor().compress if header == "zstd" else gzip.compress
    data = compress(b"\0" * size)
    assert len(data) < 128 << 10
    largest, total = bomb_pieces(header, data, read=len(data))
    assert total == size
    assert largest <= (1 << 20) + (128 << 10), largest


def test_zstd_decodes_across_reads_and_a_broken_frame_is_a_bad_upstream_reply() -> None:
    data = zstandard.ZstdCompressor().compress(BODY)
    assert decoded("zstd", [data]) == BODY
    assert decoded("zstd", cuts(data, 1, 7, len(data) // 2)) == BODY
    with pytest.raises(UpstreamError) as caught:
        decoded("zstd", [b"\x28\xb5\x2f\xfd" + b"\xff" * 64])
    assert caught.value.code == "bad_upstream_reply"


def test_brotli_is_an_encoding_the_gateway_cannot_read() -> None:
    """``br`` was decoded, unbounded, only when the ``brotli`` package happened to be installed;
    the gateway never asks for it, and it is a clear refusal now either way."""
    with pytest.raises(UpstreamError) as caught:
        Decoder.for_header("br", "provider")
    assert caught.value.code == "bad_upstream_reply"
