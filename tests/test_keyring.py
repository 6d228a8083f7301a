"""Master keys: wrapping data keys, rotation across restarts, retirement, and the key sources."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import traceback
from pathlib import Path

import pytest

from gateway.crypto import new_data_key
from gateway.errors import ConfigError, IntegrityError
from gateway.keyring import (
    EnvKeyProvider,
    FileKeyProvider,
    Keyring,
    MasterKey,
    dump_key_document,
    ensure,
    generate_key_id,
    list_keys,
    new_master_key,
    retire,
    rotate,
)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "secrets" / "keys.json"
    assert ensure(path)
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ensure_creates_private_file_and_dirs_once(key_file: Path) -> None:
    """ensure writes a 0600 key file with one primary key in a 0700 directory, and only once."""
    assert _mode(key_file) == 0o600
    assert _mode(key_file.parent) == 0o700
    before = key_file.read_bytes()
    assert ensure(key_file) is False
    assert key_file.read_bytes() == before
    keys = FileKeyProvider(key_file).load()
    assert [key.state for key in keys] == ["primary"]


def test_wrap_unwrap_round_trip(key_file: Path) -> None:
    """A data key wrapped by the primary unwraps to the same key in a freshly loaded keyring."""
    dk = new_data_key()
    kek_id, wrapped = Keyring.from_provider(FileKeyProvider(key_file)).wrap(dk)
    assert dk.key not in wrapped
    fresh = Keyring.from_provider(FileKeyProvider(key_file))
    assert kek_id == fresh.primary_id
    assert fresh.unwrap(kek_id, dk.id, wrapped) == dk


def test_unwrap_with_unknown_kek_id_fails(key_file: Path) -> None:
    """A wrapped key naming a master key the keyring lacks is an integrity error saying so."""
    keyring = Keyring.from_provider(FileKeyProvider(key_file))
    dk = new_data_key()
    _, wrapped = keyring.wrap(dk)
    with pytest.raises(IntegrityError) as info:
        keyring.unwrap("mk-19990101-dead", dk.id, wrapped)
    assert "not in the keyring" in info.value.detail
    assert "mk-19990101-dead" in info.value.detail


def test_unwrap_with_wrong_master_key_bytes_fails() -> None:
    """A master key with the right id but other bytes cannot unwrap, and the detail says so."""
    real = new_master_key("primary")
    wrong = MasterKey(real.id, new_master_key().key, "primary", real.created_at)
    dk = new_data_key()
    kek_id, wrapped = Keyring([real]).wrap(dk)
    with pytest.raises(IntegrityError) as info:
        Keyring([wrong]).unwrap(kek_id, dk.id, wrapped)
    assert "failed authentication" in info.value.detail
    assert real.key.hex() not in info.value.detail and wrong.key.hex() not in info.value.detail


def test_wrapped_key_moved_to_another_data_key_id_fails() -> None:
    """A wrapped key copied onto another data key's row fails to unwrap."""
    master = new_master_key("primary")
    kek_id, wrapped = Keyring([master]).wrap(new_data_key())
    with pytest.raises(IntegrityError):
        Keyring([master]).unwrap(kek_id, new_data_key().id, wrapped)


def test_flipping_any_byte_of_a_wrapped_key_fails() -> None:
    """Changing any byte of a wrapped data key makes unwrap fail."""
    master = new_master_key("primary")
    dk = new_data_key()
    kek_id, wrapped = Keyring([master]).wrap(dk)
    for position in range(len(wrapped)):
        damaged = bytearray(wrapped)
        damaged[position] ^= 0x01
        with pytest.raises(IntegrityError):
            Keyring([master]).unwrap(kek_id, dk.id, bytes(damaged))


def test_unwrap_is_cached_and_forget_drops_it() -> None:
    """Repeated unwraps return the cached key; forget removes it from the cache."""
    keyring = Keyring([new_master_key("primary")])
    dk = new_data_key()
    kek_id, wrapped = keyring.wrap(dk)
    assert keyring.unwrap(kek_id, dk.id, wrapped) is dk
    keyring.forget(kek_id, dk.id, wrapped)
    again = keyring.unwrap(kek_id, dk.id, wrapped)
    assert again == dk and again is not dk


def test_rotate_keeps_old_and_new_wraps_readable_after_restart(key_file: Path) -> None:
    """After rotation both old- and new-wrapped data keys unwrap, also in a reloaded keyring."""
    provider = FileKeyProvider(key_file)
    before = Keyring.from_provider(provider)
    old_dk = new_data_key()
    old_kek, old_wrapped = before.wrap(old_dk)

    new_key = rotate(provider)
    after = Keyring.from_provider(FileKeyProvider(key_file))
    assert after.primary_id == new_key.id != old_kek
    assert after.state(old_kek) == "active"
    new_dk = new_data_key()
    new_kek, new_wrapped = after.wrap(new_dk)
    assert new_kek == new_key.id

    restarted = Keyring.from_provider(FileKeyProvider(key_file))
    assert restarted.unwrap(old_kek, old_dk.id, old_wrapped) == old_dk
    assert restarted.unwrap(new_kek, new_dk.id, new_wrapped) == new_dk
    assert restarted.needs_rewrap(old_kek) and not restarted.needs_rewrap(new_kek)
    kek, rewrapped = restarted.rewrap(old_kek, old_dk.id, old_wrapped)
    assert kek == new_key.id
    assert Keyring.from_provider(provider).unwrap(kek, old_dk.id, rewrapped) == old_dk


def test_retire_refuses_while_in_use_then_succeeds(key_file: Path) -> None:
    """Retiring a key that still wraps data keys is refused; once free it retires and stops unwrapping."""
    provider = FileKeyProvider(key_file)
    old_keyring = Keyring.from_provider(provider)
    dk = new_data_key()
    old_kek, wrapped = old_keyring.wrap(dk)
    rotate(provider)
    with pytest.raises(ConfigError) as info:
        retire(provider, old_kek, in_use=2)
    assert "still wraps 2" in str(info.value)
    assert Keyring.from_provider(provider).state(old_kek) == "active"

    retired = retire(provider, old_kek, in_use=0)
    assert retired.state == "retired"
    reloaded = Keyring.from_provider(provider)
    assert reloaded.state(old_kek) == "retired"
    with pytest.raises(IntegrityError) as unwrap_info:
        reloaded.unwrap(old_kek, dk.id, wrapped)
    assert "retired" in unwrap_info.value.detail


def test_retire_refuses_primary_and_unknown_ids(key_file: Path) -> None:
    """The primary key and ids not in the keyring cannot be retired."""
    provider = FileKeyProvider(key_file)
    primary = Keyring.from_provider(provider).primary_id
    with pytest.raises(ConfigError, match="primary"):
        retire(provider, primary, in_use=0)
    with pytest.raises(ConfigError, match="no master key"):
        retire(provider, "mk-19990101-dead", in_use=0)


def test_list_keys_shows_ids_and_states_not_bytes(key_file: Path) -> None:
    """keys list reports every id with its state, oldest first, and no key bytes."""
    provider = FileKeyProvider(key_file)
    first = Keyring.from_provider(provider).primary_id
    second = rotate(provider)
    infos = list_keys(provider)
    assert [(info.id, info.state) for info in infos] == [(first, "active"), (second.id, "primary")]
    assert not hasattr(infos[0], "key")


def test_file_provider_refuses_group_or_world_readable_file(key_file: Path) -> None:
    """A key file readable by group or others is refused with the fix named in the message."""
    for mode in (0o644, 0o640, 0o604):
        os.chmod(key_file, mode)
        with pytest.raises(ConfigError) as info:
            FileKeyProvider(key_file).load()
        assert str(key_file) in str(info.value)
        assert "chmod 600" in str(info.value)
    os.chmod(key_file, 0o600)
    assert FileKeyProvider(key_file).load()


def test_save_writes_0600_even_with_open_umask(key_file: Path) -> None:
    """Rotation rewrites the key file 0600 even under umask 0, leaving no temp files behind."""
    old_umask = os.umask(0)
    try:
        rotate(FileKeyProvider(key_file))
    finally:
        os.umask(old_umask)
    assert _mode(key_file) == 0o600
    assert sorted(p.name for p in key_file.parent.iterdir()) == ["keys.json"]


def test_missing_key_file_names_the_command(tmp_path: Path) -> None:
    """Loading a key file that does not exist says how to create one."""
    with pytest.raises(ConfigError, match="keys generate"):
        FileKeyProvider(tmp_path / "absent.json").load()


def test_env_provider_loads_and_is_read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment provider loads the same JSON, refuses to save, and names a missing variable."""
    master = new_master_key("primary")
    monkeypatch.setenv("SG_TEST_KEYS", dump_key_document([master]).decode())
    provider = EnvKeyProvider("SG_TEST_KEYS")
    keyring = Keyring.from_provider(provider)
    assert keyring.primary_id == master.id
    assert "SG_TEST_KEYS" in provider.describe()
    with pytest.raises(NotImplementedError):
        provider.save([master])
    monkeypatch.delenv("SG_TEST_KEYS")
    with pytest.raises(ConfigError, match="SG_TEST_KEYS"):
        provider.load()


def test_keyring_requires_exactly_one_primary_and_unique_ids() -> None:
    """A keyring with no primary, two primaries, or a repeated id is refused."""
    a, b = new_master_key("primary"), new_master_key("primary")
    with pytest.raises(ConfigError, match="exactly one"):
        Keyring([a, b])
    with pytest.raises(ConfigError, match="exactly one"):
        Keyring([MasterKey(a.id, a.key, "active", a.created_at)])
    with pytest.raises(ConfigError, match="twice"):
        Keyring([a, MasterKey(a.id, b.key, "active", b.created_at)])


def test_key_bytes_never_appear_in_errors(tmp_path: Path) -> None:
    """No error raised for a broken key file shows the key bytes, in its message or its traceback."""
    secret = base64.b64encode(os.urandom(32)).decode()
    short = base64.b64encode(os.urandom(16)).decode()
    entry = {"id": "mk-20260101-abcd", "key": secret, "state": "primary", "created_at": 0}
    broken = [
        json.dumps({"version": 1, "keys": [entry]})[:-3],
        json.dumps({"version": 1, "keys": [{**entry, "key": short}]}),
        json.dumps({"version": 1, "keys": [{**entry, "key": secret + "!"}]}),
        json.dumps({"version": 1, "keys": [{**entry, "state": "sideways"}]}),
        json.dumps({"version": 1, "keys": [{**entry, "created_at": "yesterday"}]}),
        json.dumps({"version": 1, "keys": [{**entry, "id": secret}]}),
        json.dumps({"version": 1, "keys": [entry, entry]}),
        json.dumps({"version": 2, "keys": [entry]}),
    ]
    path = tmp_path / "keys.json"
    for text in broken:
        path.write_text(text)
        os.chmod(path, 0o600)
        with pytest.raises(ConfigError) as info:
            FileKeyProvider(path).load()
        shown = "".join(traceback.format_exception(info.value))
        for needle in (secret, short, secret[:16]):
            assert needle not in shown
            assert needle not in repr(info.value)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError) as info:
        FileKeyProvider(path).load()
    assert secret not in str(info.value)


def test_master_key_repr_hides_bytes() -> None:
    """Logging a master key shows its id and state, never its bytes."""
    master = new_master_key("primary")
    assert master.id in repr(master)
    assert master.key.hex() not in repr(master) and repr(master.key) not in repr(master)


def test_generated_ids_have_the_documented_shape() -> None:
    """Key ids look like mk-YYYYMMDD-xxxx."""
    assert re.fullmatch(r"mk-\d{8}-[0-9a-f]{4}", generate_key_id())


def test_file_round_trip_preserves_keys(key_file: Path) -> None:
    """Saving and loading a keyring keeps ids, bytes, states and creation times."""
    provider = FileKeyProvider(key_file)
    rotate(provider)
    keys = provider.load()
    provider.save(keys)
    reloaded = provider.load()
    assert [(k.id, k.key, k.state) for k in reloaded] == [(k.id, k.key, k.state) for k in keys]
    assert [round(k.created_at, 3) for k in reloaded] == [round(k.created_at, 3) for k in keys]


def test_retire_destroys_the_key_bytes_in_the_file(key_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A retired key keeps its id, state and time in the key file, never its bytes: the file is
    replaced atomically (0600) and the old file's content is overwritten with zeros."""
    provider = FileKeyProvider(key_file)
    old_id = Keyring.from_provider(provider).primary_id
    old_bytes = next(key.key for key in provider.load() if key.id == old_id)
    new = rotate(provider)
    before = key_file.with_name("same-inode-as-before")
    os.link(key_file, before)  # the file as it was, by its inode (what a scrub must reach)
    retire(provider, old_id, in_use=0)

    text = key_file.read_text()
    entries = {entry["id"]: entry for entry in json.loads(text)["keys"]}
    assert entries[old_id]["state"] == "retired" and "key" not in entries[old_id]
    assert base64.b64encode(old_bytes).decode() not in text and entries[new.id]["state"] == "primary"
    assert _mode(key_file) == 0o600
    assert set(before.read_bytes()) == {0}  # the replaced file's bytes were zeroed in place
    keyring = Keyring.from_provider(provider)
    dk = new_data_key()
    kek_id, wrapped = keyring.wrap(dk)
    assert keyring.state(old_id) == "retired" and kek_id == new.id and keyring.unwrap(kek_id, dk.id, wrapped) == dk
    monkeypatch.setenv("SG_TEST_FLIPPED", text.replace('"retired"', '"active"'))
    with pytest.raises(ConfigError, match=r"keys\[0\]\.key"):  # no bytes to bring back by editing the state
        EnvKeyProvider("SG_TEST_FLIPPED").load()


def test_retiring_again_drops_bytes_an_older_gateway_left(key_file: Path) -> None:
    """A key file whose retired entry still holds bytes (written before retiring destroyed them)
    loses them when the key is retired again; they are not kept in memory meanwhile."""
    provider = FileKeyProvider(key_file)
    old = new_master_key("retired")
    doc = json.loads(key_file.read_text())
    doc["keys"].append({"id": old.id, "key": base64.b64encode(old.key).decode(), "state": "retired",
                        "created_at": "2026-01-01T00:00:00Z"})
    key_file.write_text(json.dumps(doc))
    assert next(key for key in provider.load() if key.id == old.id).key == b""
    retire(provider, old.id, in_use=0)
    assert base64.b64encode(old.key).decode() not in key_file.read_text()
    assert Keyring.from_provider(provider).state(old.id) == "retired"
