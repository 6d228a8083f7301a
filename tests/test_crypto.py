"""Sealed records: confidentiality, integrity, and binding to tenant, session, seq and field."""

from __future__ import annotations

import pytest

from gateway import crypto
from gateway.crypto import OVERHEAD, BoundedCache, DataKey, new_data_key, open_sealed, seal
from gateway.errors import IntegrityError

PLAINTEXT = b'{"role": "user", "content": "hello"}'


def _where(**changes: object) -> dict:
    where: dict = {"tenant": "acme", "session_id": "s-1", "seq": 3, "field": "round"}
    where.update(changes)
    return where


def test_round_trip() -> None:
    """A sealed record opens to the same plaintext in the same place."""
    dk = new_data_key()
    assert open_sealed(dk, seal(dk, PLAINTEXT, **_where()), **_where()) == PLAINTEXT


def test_stored_bytes_differ_from_plaintext() -> None:
    """The sealed bytes do not contain the plaintext and add exactly the fixed overhead."""
    dk = new_data_key()
    blob = seal(dk, PLAINTEXT, **_where())
    assert PLAINTEXT not in blob
    assert b"hello" not in blob
    assert len(blob) == len(PLAINTEXT) + OVERHEAD


def test_empty_plaintext_round_trips() -> None:
    """An empty payload still seals into an authenticated record."""
    dk = new_data_key()
    blob = seal(dk, b"", **_where())
    assert len(blob) == OVERHEAD
    assert open_sealed(dk, blob, **_where()) == b""


def test_flipping_any_byte_fails() -> None:
    """Changing any single byte of a record (header, nonce, ciphertext or tag) fails to open."""
    dk = new_data_key()
    blob = seal(dk, b"hi", **_where())
    for position in range(len(blob)):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(blob)
            damaged[position] ^= mask
            with pytest.raises(IntegrityError):
                open_sealed(dk, bytes(damaged), **_where())


def test_truncated_or_extended_record_fails() -> None:
    """A record cut short at any length, or with a byte appended, fails to open."""
    dk = new_data_key()
    blob = seal(dk, b"hi", **_where())
    for length in range(len(blob)):
        with pytest.raises(IntegrityError):
            open_sealed(dk, blob[:length], **_where())
    with pytest.raises(IntegrityError):
        open_sealed(dk, blob + b"\x00", **_where())


@pytest.mark.parametrize("moved", [
    {"tenant": "globex"},
    {"session_id": "s-2"},
    {"seq": 4},
    {"seq": 0},
    {"field": "state"},
])
def test_record_moved_elsewhere_fails(moved: dict) -> None:
    """A record opened as another tenant's, session's, sequence number's or field's fails."""
    dk = new_data_key()
    blob = seal(dk, PLAINTEXT, **_where())
    with pytest.raises(IntegrityError) as info:
        open_sealed(dk, blob, **_where(**moved))
    assert "authentication failed" in info.value.detail


def test_record_from_another_sessions_key_fails() -> None:
    """A record sealed with another session's data key names the key mismatch."""
    mine, theirs = new_data_key(), new_data_key()
    blob = seal(theirs, PLAINTEXT, **_where())
    with pytest.raises(IntegrityError) as info:
        open_sealed(mine, blob, **_where())
    assert theirs.id.hex() in info.value.detail
    assert mine.id.hex() in info.value.detail


def test_same_key_id_with_other_key_bytes_fails() -> None:
    """A data key that claims the right id but has other bytes cannot open the record."""
    dk = new_data_key()
    impostor = DataKey(dk.id, new_data_key().key)
    with pytest.raises(IntegrityError):
        open_sealed(impostor, seal(dk, PLAINTEXT, **_where()), **_where())


def test_associated_data_is_unambiguous() -> None:
    """Moving a separator between tenant, session and field never yields the same binding."""
    dk = new_data_key()
    blob = seal(dk, PLAINTEXT, **_where(tenant="a:b", session_id="c"))
    with pytest.raises(IntegrityError):
        open_sealed(dk, blob, **_where(tenant="a", session_id="b:c"))
    blob = seal(dk, PLAINTEXT, **_where(session_id="ab", field=""))
    with pytest.raises(IntegrityError):
        open_sealed(dk, blob, **_where(session_id="a", field="b"))


def test_unknown_version_is_named() -> None:
    """A record with another format version is refused with the version in the detail."""
    dk = new_data_key()
    blob = bytearray(seal(dk, PLAINTEXT, **_where()))
    blob[0] = 2
    with pytest.raises(IntegrityError) as info:
        open_sealed(dk, bytes(blob), **_where())
    assert "version 2" in info.value.detail


def test_same_plaintext_sealed_twice_differs() -> None:
    """Two seals of the same plaintext in the same place use fresh nonces and differ."""
    dk = new_data_key()
    first, second = seal(dk, PLAINTEXT, **_where()), seal(dk, PLAINTEXT, **_where())
    assert first != second
    assert first[9:21] != second[9:21]
    assert open_sealed(dk, first, **_where()) == open_sealed(dk, second, **_where())


def test_integrity_error_hides_detail_from_client() -> None:
    """The client-facing message is fixed; the detail stays for the log."""
    dk = new_data_key()
    with pytest.raises(IntegrityError) as info:
        open_sealed(dk, b"\x01" + b"\x00" * 40, **_where())
    assert info.value.detail not in info.value.to_body()["error"]["message"]
    assert info.value.to_body()["error"]["code"] == "integrity_check_failed"


def test_new_data_keys_are_random_and_sized() -> None:
    """Each new data key has an 8-byte id and a 32-byte key, unlike the last."""
    first, second = new_data_key(), new_data_key()
    assert (len(first.id), len(first.key)) == (8, 32)
    assert first.id != second.id and first.key != second.key


def test_data_key_repr_hides_key_bytes() -> None:
    """Logging a data key shows its id but never its key bytes."""
    dk = new_data_key()
    assert repr(dk.key) not in repr(dk)
    assert dk.key.hex() not in repr(dk)


def test_data_key_rejects_wrong_sizes() -> None:
    """A data key with a short id or key is refused at construction."""
    with pytest.raises(ValueError):
        DataKey(b"\x00" * 8, b"\x00" * 16)


def test_negative_seq_is_a_value_error() -> None:
    """A negative sequence number is a caller bug, not an integrity failure."""
    with pytest.raises(ValueError):
        seal(new_data_key(), PLAINTEXT, **_where(seq=-1))


def test_forget_drops_cached_cipher_without_breaking_later_use() -> None:
    """Forgetting a data key empties its cache slot; the key still works if used again."""
    dk = new_data_key()
    blob = seal(dk, PLAINTEXT, **_where())
    assert crypto._ciphers.get(dk.key) is not None
    crypto.forget(dk)
    assert crypto._ciphers.get(dk.key) is None
    assert open_sealed(dk, blob, **_where()) == PLAINTEXT


def test_bounded_cache_evicts_least_recently_used() -> None:
    """The cache keeps at most maxsize entries and evicts the one used longest ago."""
    cache: BoundedCache[str, int] = BoundedCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)
    assert len(cache) == 2
