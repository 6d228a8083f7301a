"""Envelope encryption of stored records: AES-256-GCM under a per-session data key.

Every session has its own random 256-bit :class:`DataKey`; the store keeps it only wrapped by a
master key (see ``gateway.keyring``). Each stored payload is a *sealed record*::

    version (1 byte, = 1) | data key id (8) | nonce (12, random) | ciphertext + GCM tag (16)

The associated data binds the record to where it belongs, so a record copied to another tenant,
session, sequence number or field fails to open::

    version | data key id | u32 len + tenant | u32 len + session id | u64 seq | u32 len + field

Strings are UTF-8 and length-prefixed, so ``("a:b", "c")`` and ``("a", "b:c")`` never encode the
same. ``field`` is what the record holds: the gateway uses ``"round"`` and ``"state"``.

:func:`seal` returns the record; :func:`open_sealed` returns the plaintext or raises
:class:`gateway.errors.IntegrityError` (with a ``detail`` for the log) for a record that is too
short, has an unknown version, names another data key, or fails authentication. Wrong arguments
(negative ``seq``) raise ``ValueError``.

This is on the request path: ``AESGCM`` objects are cached per data key in a bounded LRU, and the
work per record is one header slice, one AAD join and one AES-GCM call. :func:`forget` drops a
data key's cipher when its session is erased.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.errors import IntegrityError

VERSION = 1
KEY_ID_LEN = 8
KEY_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
HEADER_LEN = 1 + KEY_ID_LEN + NONCE_LEN
OVERHEAD = HEADER_LEN + TAG_LEN
"""Bytes a sealed record adds to its plaintext."""

CIPHER_CACHE_SIZE = 4096

_VERSION_BYTE = bytes([VERSION])
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class DataKey:
    """A session's data key: ``id`` (8 random bytes, stored in clear) and ``key`` (32 bytes).

    ``key`` is left out of ``repr`` so a logged key object never shows its bytes.
    """

    id: bytes
    key: bytes = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        if len(self.id) != KEY_ID_LEN or len(self.key) != KEY_LEN:
            raise ValueError(f"a data key needs a {KEY_ID_LEN}-byte id and a {KEY_LEN}-byte key")


def new_data_key() -> DataKey:
    """A fresh random data key for a new session."""
    return DataKey(os.urandom(KEY_ID_LEN), os.urandom(KEY_LEN))


class BoundedCache(Generic[K, V]):
    """A thread-safe LRU mapping that holds at most ``maxsize`` entries."""

    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value for ``key`` (marked as recently used), or ``None``."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def peek(self, key: K) -> V | None:
        """The value for ``key`` without marking it used, or ``None``."""
        return self._items.get(key)

    def put(self, key: K, value: V) -> None:
        """Store ``value``, evicting the least recently used entry when full."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            if len(self._items) > self._maxsize:
                self._items.popitem(last=False)

    def discard(self, key: K) -> None:
        """Drop ``key`` if present."""
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


_ciphers: BoundedCache[bytes, AESGCM] = BoundedCache(CIPHER_CACHE_SIZE)


def _cipher(dk: DataKey) -> AESGCM:
    cipher = _ciphers.get(dk.key)
    if cipher is None:
        cipher = AESGCM(dk.key)
        _ciphers.put(dk.key, cipher)
    return cipher


def forget(dk: DataKey) -> None:
    """Drop the cached cipher of ``dk`` (call when its session is erased)."""
    _ciphers.discard(dk.key)


def _aad(prefix: bytes, tenant: str, session_id: str, seq: int, field: str) -> bytes:
    t, s, f = tenant.encode(), session_id.encode(), field.encode()
    try:
        seq_bytes = _U64.pack(seq)
    except struct.error as exc:
        raise ValueError(f"seq must be an integer in 0..2**64-1, got {seq!r}") from exc
    return b"".join((prefix, _U32.pack(len(t)), t, _U32.pack(len(s)), s, seq_bytes, _U32.pack(len(f)), f))


def seal(dk: DataKey, plaintext: bytes, *, tenant: str, session_id: str, seq: int, field: str) -> bytes:
    """Encrypt ``plaintext`` into a sealed record bound to (tenant, session_id, seq, field)."""
    prefix = _VERSION_BYTE + dk.id
    nonce = os.urandom(NONCE_LEN)
    aad = _aad(prefix, tenant, session_id, seq, field)
    return b"".join((prefix, nonce, _cipher(dk).encrypt(nonce, plaintext, aad)))


def key_id_of(blob: bytes) -> bytes:
    """The id of the data key a sealed record names in its header."""
    return bytes(blob[1 : 1 + KEY_ID_LEN])


def open_sealed(dk: DataKey, blob: bytes, *, tenant: str, session_id: str, seq: int, field: str) -> bytes:
    """Decrypt a sealed record; raise ``IntegrityError`` unless it is intact and belongs here."""
    if len(blob) < OVERHEAD:
        raise IntegrityError(f"{field} record seq {seq}: record is {len(blob)} bytes, "
                             f"shorter than the {OVERHEAD}-byte minimum")
    if blob[0] != VERSION:
        raise IntegrityError(f"{field} record seq {seq}: unsupported record format version {blob[0]}")
    prefix = bytes(blob[: 1 + KEY_ID_LEN])
    if prefix[1:] != dk.id:
        raise IntegrityError(
            f"{field} record seq {seq}: record was sealed with data key {prefix[1:].hex()}, "
            f"not this session's data key {dk.id.hex()} (moved from another session?)"
        )
    view = memoryview(blob)
    nonce = view[1 + KEY_ID_LEN : HEADER_LEN]
    aad = _aad(prefix, tenant, session_id, seq, field)
    try:
        return _cipher(dk).decrypt(nonce, view[HEADER_LEN:], aad)
    except InvalidTag as exc:
        raise IntegrityError(
            f"{field} record seq {seq}: authentication failed (record altered, or moved from another "
            "tenant, session, sequence number or field)"
        ) from exc
