"""Request-body content codings: ``gzip`` (and ``x-gzip``), ``deflate``, ``zstd``, ``identity``.

``decode_body(raw, content_encoding, limit)`` returns the body a client meant to send. It is a
pure function over bytes; ``stages.parse_request.read_limited`` is its only caller, so every route
that reads a body accepts the same codings under the same limit.

Contract:

* the limit applies to the *decoded* size. Decoding is incremental: output is produced in pieces
  of at most ``CHUNK`` bytes and counted as it comes, so a decompression bomb is refused with
  ``PayloadTooLarge`` (413) once it passes ``limit``, never by first allocating its whole output.
  A zstd frame that asks for a window larger than ``max(8 MiB, limit)`` is refused the same way.
* a body that does not decode (bad header or checksum, truncated, trailing bytes after the last
  gzip member or zstd frame) is ``CorruptBody`` (400); an empty body stays empty;
* a coding not listed above, or more than ``MAX_CODINGS`` codings, is ``UnsupportedEncoding`` (415);
* several codings (``Content-Encoding: gzip, zstd``) are undone last first, as RFC 9110 says.

Messages name the coding and the limit; they never quote body bytes.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import zstandard

from gateway.errors import CorruptBody, PayloadTooLarge, UnsupportedEncoding

CHUNK = 64 * 1024
MAX_CODINGS = 3
SUPPORTED = ("gzip", "deflate", "zstd", "identity")
_ZSTD_MIN_WINDOW = 8 * 1024 * 1024


def codings(header: str | None) -> list[str]:
    """The codings named by a ``Content-Encoding`` header, lower-cased, ``identity`` dropped.

    Raises ``UnsupportedEncoding`` for an unknown coding or too many of them.
    """
    if not header:
        return []
    names = [name.strip().lower() for name in header.split(",")]
    names = ["gzip" if name == "x-gzip" else name for name in names if name and name != "identity"]
    unknown = [name for name in names if name not in SUPPORTED]
    if unknown:
        shown = unknown[0][:20] if unknown[0].isascii() and unknown[0].isprintable() else "(not printable)"
        raise UnsupportedEncoding(f"Content-Encoding {shown!r} is not supported; send the body as "
                                  f"gzip, deflate, zstd or uncompressed")
    if len(names) > MAX_CODINGS:
        raise UnsupportedEncoding(f"Content-Encoding lists {len(names)} codings; at most {MAX_CODINGS} are accepted")
    return names


def decode_body(raw: bytes, header: str | None, limit: int) -> bytes:
    """``raw`` with the codings of ``header`` undone; the result is at most ``limit`` bytes.

    Raises ``UnsupportedEncoding`` (415), ``CorruptBody`` (400) or ``PayloadTooLarge`` (413).
    """
    data = raw
    for name in reversed(codings(header)):
        if not data:
            break  # nothing was sent: parsing says so
        data = _DECODERS[name](data, limit)
    return data


class _Output:
    """Collects decoded pieces and refuses the body as soon as their total passes ``limit``."""

    def __init__(self, coding: str, limit: int) -> None:
        self.coding, self.limit = coding, limit
        self.pieces: list[bytes] = []
        self.size = 0

    def add(self, piece: bytes) -> None:
        self.size += len(piece)
        if self.size > self.limit:
            raise PayloadTooLarge(f"the {self.coding}-decoded request body is over the limit of {self.limit} bytes")
        self.pieces.append(piece)

    def write(self, piece: bytes) -> int:
        """File-like ``write`` for zstandard's stream writer."""
        self.add(bytes(piece))
        return len(piece)

    def value(self) -> bytes:
        return b"".join(self.pieces)


def _inflate(data: bytes, wbits: int, out: _Output) -> bytes:
    """Inflate one zlib/gzip/raw-deflate stream into ``out``; returns the bytes after its end.

    Input goes in ``CHUNK`` slices and output comes out in ``CHUNK`` pieces, so neither the
    output nor re-copied input tails ever grow with the body.
    """
    stream = zlib.decompressobj(wbits)
    view, offset = memoryview(data), 0
    pending: bytes | memoryview = b""
    try:
        while not stream.eof:
            if not pending and offset < len(data):
                pending = view[offset : offset + CHUNK]
                offset += len(pending)
            before = len(pending)
            piece = stream.decompress(pending, CHUNK)
            pending = stream.unconsumed_tail
            if piece:
                out.add(piece)
            elif before == 0 or len(pending) == before:
                raise CorruptBody(f"the {out.coding} request body is truncated")
    except zlib.error:
        raise CorruptBody(f"the request body is not valid {out.coding} data") from None
    return stream.unused_data + bytes(view[offset:])


def _gzip(data: bytes, limit: int) -> bytes:
    out = _Output("gzip", limit)
    rest = _inflate(data, 16 + zlib.MAX_WBITS, out)
    while rest:  # concatenated members are one body (RFC 1952 §2.2)
        rest = _inflate(rest, 16 + zlib.MAX_WBITS, out)
    return out.value()


def _deflate(data: bytes, limit: int) -> bytes:
    out = _Output("deflate", limit)
    # HTTP's "deflate" is the zlib format (RFC 1950); some clients send raw deflate instead.
    zlib_header = len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
    if _inflate(data, zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS, out):
        raise CorruptBody("the deflate request body has bytes after its end")
    return out.value()


def _zstd(data: bytes, limit: int) -> bytes:
    """Two passes: a stream writer counts the output in pieces (bounded, refuses a bomb early),
    then decompression objects, now known to produce at most ``limit`` bytes in all, decode the
    frames one by one and check that the last one is complete and nothing follows it."""
    window = max(_ZSTD_MIN_WINDOW, 1 << max(limit - 1, 1).bit_length())
    context = zstandard.ZstdDecompressor(max_window_size=window)
    counted = _Output("zstd", limit)
    counted.pieces = _Discard()
    frames: list[bytes] = []
    try:
        with context.stream_writer(counted, write_size=CHUNK, closefd=False) as writer:  # type: ignore[arg-type]
            writer.write(data)
        rest = data
        while rest:
            stream = context.decompressobj()
            frames.append(stream.decompress(rest))
            if not stream.eof:
                raise CorruptBody("the zstd request body is truncated")
            rest = stream.unused_data
    except zstandard.ZstdError as exc:
        if "too much memory" in str(exc):
            raise PayloadTooLarge(f"the zstd request body asks for a decoding window over {window} bytes") from None
        raise CorruptBody("the request body is not valid zstd data") from None
    return b"".join(frames)


class _Discard(list):  # type: ignore[type-arg]
    """A piece list that keeps nothing (the zstd counting pass)."""

    def append(self, _piece: object) -> None:
        return None


_DECODERS: dict[str, Callable[[bytes, int], bytes]] = {
    "gzip": _gzip,
    "deflate": _deflate,
    "zstd": _zstd,
}
