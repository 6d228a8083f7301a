"""Master keys (KEKs): the keyring that wraps session data keys, where it is loaded from, and the
operations behind ``sessiongate keys generate|list|rotate|retire``.

Master keys. Each has an id (``mk-20261122-a1b2``), 32 key bytes and a state:

- ``primary``  wraps every new data key; exactly one key is primary;
- ``active``   an earlier primary, kept decrypt-only to unwrap the data keys it still wraps;
- ``retired``  no data key depends on it any more, and its bytes are destroyed: the key file
               keeps only its id, state and creation time (so ``keys list`` and errors can name
               it), never its ``key``. Retiring is what makes an erasure final in copies the
               gateway cannot reach (PostgreSQL WAL, replicas, database backups): a data key
               wrapped by a retired key can no longer be unwrapped by anyone holding today's key
               file. Copies of the key file made *before* the retirement still hold the bytes;
               the operator destroys them too.

Wrapped data keys. :meth:`Keyring.wrap` returns ``(kek_id, wrapped)`` where ``wrapped`` is
``version (1 byte, = 1) | nonce (12) | AES-256-GCM(data key) + tag (16)``, 61 bytes. The
associated data binds the wrap version, the master key id and the data key id, so a wrapped key
copied to another data key row or relabelled with another master key id fails to unwrap.
:meth:`Keyring.unwrap` keeps unwrapped data keys in a bounded LRU keyed by
``(kek_id, dk_id, wrapped)``.

Rotation. :func:`rotate` adds a new primary and demotes the old one to ``active``; the caller
then re-wraps stored data keys (:meth:`Keyring.needs_rewrap`, :meth:`Keyring.rewrap`) and may
:func:`retire` the old key once no data key uses it (the caller counts them: ``in_use``).

Sources: the plug-in point. A :class:`KeyProvider` is any object with three methods:

- ``load() -> list[MasterKey]``   every key with its state; raises ``ConfigError`` naming the source;
- ``save(keys) -> None``          persist the whole list; read-only sources raise NotImplementedError;
- ``describe() -> str``           a human name for the source ("key file /etc/...") — never key bytes.

Two local providers ship: :class:`FileKeyProvider` (a JSON key file that must be private to its
owner, mode 0600) and :class:`EnvKeyProvider` (the same JSON in an environment variable,
read-only). A KMS or Vault Transit provider implements the same three methods; it may hold the
master keys' bytes wrapped by the remote service and unwrap them in ``load``. None ships here.

The JSON document, for both local providers::

    {"version": 1, "keys": [{"id": "mk-20261122-a1b2", "key": "<base64 of 32 bytes>",
                             "state": "primary", "created_at": "2026-11-22T10:00:00Z"}]}

A retired key's entry has no ``key``; one written by an older gateway still may, and its bytes
are dropped as it is read and from the file at the next save (``keys retire`` of an already
retired key saves the file again for that).

Errors. A bad source raises ``ConfigError`` naming the file (or ``$VARIABLE``) and field; a
refused operation raises ``ConfigError`` naming the key; a data key that cannot be unwrapped
raises ``IntegrityError`` whose ``detail`` says which: :class:`MasterKeyUnavailable` when its
master key is not in the keyring or is retired (the key file's problem, or a row relabelled
with such an id: the keyring cannot tell which, the audit chain can, see ``gateway.evidence``),
a plain ``IntegrityError`` for wrong master key bytes or an altered wrap. No message ever
contains key bytes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import json
import os
import re
import secrets
import struct
import tempfile
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.crypto import KEY_ID_LEN, KEY_LEN, NONCE_LEN, TAG_LEN, BoundedCache, DataKey
from gateway.errors import ConfigError, IntegrityError, cannot_create

State = Literal["primary", "active", "retired"]
STATES: tuple[State, ...] = ("primary", "active", "retired")
FORMAT_VERSION = 1
WRAP_VERSION = 1
WRAPPED_LEN = 1 + NONCE_LEN + KEY_LEN + TAG_LEN
DATA_KEY_CACHE_SIZE = 4096
DEFAULT_ENV_VAR = "SESSIONGATE_KEYS"

_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_WRAP_PREFIX = b"sessiongate/dk-wrap" + bytes([WRAP_VERSION])
_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class MasterKey:
    """One master key. ``key`` is left out of ``repr`` and empty for a retired key (destroyed);
    ``created_at`` is Unix time."""

    id: str
    key: bytes = dataclasses.field(repr=False)
    state: State
    created_at: float

    def __post_init__(self) -> None:
        if not _KEY_ID.fullmatch(self.id):
            raise ValueError(f"master key id {self.id!r} must be 1-64 of A-Z a-z 0-9 . _ - "
                             "and start with a letter or digit")
        if self.state == "retired" and not self.key:
            pass  # destroyed
        elif len(self.key) != KEY_LEN:
            raise ValueError(f"master key {self.id!r} must be {KEY_LEN} bytes, got {len(self.key)}")
        if self.state not in STATES:
            raise ValueError(f"master key {self.id!r} has state {self.state!r}; "
                             f"use one of {', '.join(STATES)}")


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What ``keys list`` shows about a master key: never its bytes."""

    id: str
    state: State
    created_at: float


class KeyProvider(Protocol):
    """Where master keys live; see the module docstring for the contract."""

    def load(self) -> list[MasterKey]: ...

    def save(self, keys: list[MasterKey]) -> None: ...

    def describe(self) -> str: ...


class MasterKeyUnavailable(IntegrityError):
    """A data key names a master key the keyring lacks (:attr:`retired` False) or has retired
    (True), so it cannot be unwrapped. ``key_unavailable`` is set, as readers of the error check."""

    key_unavailable = True

    def __init__(self, detail: str, kek_id: str, *, retired: bool) -> None:
        super().__init__(detail)
        self.kek_id, self.retired = kek_id, retired


# --- ids and new keys -------------------------------------------------------------------------


def generate_key_id(taken: Collection[str] = ()) -> str:
    """A new master key id, ``mk-YYYYMMDD-xxxx`` (UTC date, random hex), not in ``taken``."""
    day = datetime.now(UTC).strftime("%Y%m%d")
    while True:
        key_id = f"mk-{day}-{secrets.token_hex(2)}"
        if key_id not in taken:
            return key_id


def new_master_key(state: State = "primary", *, taken: Collection[str] = ()) -> MasterKey:
    """A fresh random master key with a new id not in ``taken``."""
    return MasterKey(generate_key_id(taken), secrets.token_bytes(KEY_LEN), state, time.time())


def check_keys(keys: list[MasterKey], where: str) -> None:
    """Raise ``ConfigError`` (naming ``where``) unless ids are unique and exactly one key is primary."""
    seen: set[str] = set()
    for key in keys:
        if key.id in seen:
            raise ConfigError(f"master key id {key.id!r} appears twice", file=where, field="keys")
        seen.add(key.id)
    primaries = [key.id for key in keys if key.state == "primary"]
    if len(primaries) != 1:
        found = ", ".join(primaries) or "none"
        raise ConfigError(f"exactly one master key must be primary, found {found}", file=where, field="keys")


# --- the keyring --------------------------------------------------------------------------------


def _wrap_aad(kek_id: str, dk_id: bytes) -> bytes:
    kek = kek_id.encode()
    return b"".join((_WRAP_PREFIX, _U32.pack(len(kek)), kek, dk_id))


class Keyring:
    """The loaded master keys: wraps data keys with the primary, unwraps with any non-retired key.

    Raises ``ConfigError`` (naming ``source``) unless ids are unique and one key is primary.
    """

    def __init__(self, keys: Iterable[MasterKey], *, source: str = "keyring",
                 cache_size: int = DATA_KEY_CACHE_SIZE) -> None:
        key_list = list(keys)
        check_keys(key_list, source)
        self.source = source
        self._keys = {key.id: key for key in key_list}
        self._ciphers = {key.id: AESGCM(key.key) for key in key_list if key.state != "retired"}
        self.primary_id = next(key.id for key in key_list if key.state == "primary")
        self._data_keys: BoundedCache[tuple[str, bytes, bytes], DataKey] = BoundedCache(cache_size)

    @classmethod
    def from_provider(cls, provider: KeyProvider) -> Keyring:
        """Load the keyring from ``provider``."""
        return cls(provider.load(), source=provider.describe())

    def ids(self) -> list[str]:
        """Every master key id in the keyring, retired ones included."""
        return list(self._keys)

    def state(self, kek_id: str) -> State | None:
        """The state of master key ``kek_id``, or None when it is not in the keyring."""
        key = self._keys.get(kek_id)
        return key.state if key else None

    def wrap(self, dk: DataKey) -> tuple[str, bytes]:
        """Wrap ``dk`` with the primary master key; returns ``(kek_id, wrapped)``."""
        kek_id = self.primary_id
        nonce = os.urandom(NONCE_LEN)
        sealed = self._ciphers[kek_id].encrypt(nonce, dk.key, _wrap_aad(kek_id, dk.id))
        wrapped = b"".join((bytes([WRAP_VERSION]), nonce, sealed))
        self._data_keys.put((kek_id, dk.id, wrapped), dk)
        return kek_id, wrapped

    def unwrap(self, kek_id: str, dk_id: bytes, wrapped: bytes) -> DataKey:
        """The data key ``dk_id`` wrapped by master key ``kek_id``; ``IntegrityError`` if it fails
        (also when a value is not of the type the gateway stores: a row edited outside it)."""
        binary = bytes | bytearray | memoryview
        if not isinstance(dk_id, binary) or not isinstance(wrapped, binary):
            raise IntegrityError(f"a wrapped data key of master key {kek_id!r} is stored as "
                                 f"{type(dk_id).__name__}/{type(wrapped).__name__}, not bytes: "
                                 "its data_keys row was edited outside the gateway")
        cache_key = (kek_id, bytes(dk_id), bytes(wrapped))
        dk = self._data_keys.get(cache_key)
        if dk is not None:
            return dk
        dk = self._unwrap(kek_id, cache_key[1], cache_key[2])
        self._data_keys.put(cache_key, dk)
        return dk

    def _unwrap(self, kek_id: str, dk_id: bytes, wrapped: bytes) -> DataKey:
        what = f"data key {dk_id.hex()}"
        key = self._keys.get(kek_id)
        if key is None:
            raise MasterKeyUnavailable(f"{what} is wrapped by master key {kek_id!r}, which is not in the keyring "
                                       f"({self.source}; it has {', '.join(self._keys)})", kek_id, retired=False)
        if key.state == "retired":
            raise MasterKeyUnavailable(f"{what} is wrapped by master key {kek_id!r}, which is retired "
                                       f"in {self.source}", kek_id, retired=True)
        if len(dk_id) != KEY_ID_LEN or len(wrapped) != WRAPPED_LEN or wrapped[0] != WRAP_VERSION:
            raise IntegrityError(f"{what}: malformed wrapped data key ({len(wrapped)} bytes, id "
                                 f"{len(dk_id)} bytes)")
        nonce, sealed = wrapped[1 : 1 + NONCE_LEN], wrapped[1 + NONCE_LEN :]
        try:
            raw = self._ciphers[kek_id].decrypt(nonce, sealed, _wrap_aad(kek_id, dk_id))
        except InvalidTag as exc:
            raise IntegrityError(f"{what} failed authentication under master key {kek_id!r}: the "
                                 "key bytes for that id are wrong, or the wrapped key was altered "
                                 "or moved") from exc
        return DataKey(dk_id, raw)

    def needs_rewrap(self, kek_id: str) -> bool:
        """True when a data key wrapped by ``kek_id`` should be re-wrapped with the primary."""
        return kek_id != self.primary_id

    def rewrap(self, kek_id: str, dk_id: bytes, wrapped: bytes) -> tuple[str, bytes]:
        """Unwrap with ``kek_id`` and wrap again with the primary; returns ``(kek_id, wrapped)``."""
        return self.wrap(self.unwrap(kek_id, dk_id, wrapped))

    def forget(self, kek_id: str, dk_id: bytes, wrapped: bytes) -> None:
        """Drop a cached unwrapped data key (call when its session is erased)."""
        self._data_keys.discard((kek_id, bytes(dk_id), bytes(wrapped)))


# --- the JSON document ---------------------------------------------------------------------------


def _parse_time(value: Any, where: str, field: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    raise ConfigError("must be an ISO 8601 time or a Unix timestamp", file=where, field=field)


def _parse_key(entry: Any, where: str, field: str) -> MasterKey:
    if not isinstance(entry, dict):
        raise ConfigError("must be an object with id, key, state and created_at", file=where, field=field)
    key_id, encoded, state = entry.get("id"), entry.get("key"), entry.get("state")
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise ConfigError("must be 1-64 of A-Z a-z 0-9 . _ - starting with a letter or digit",
                          file=where, field=f"{field}.id")
    if state == "retired":  # destroyed: an older file's bytes are not kept, even in memory
        return MasterKey(key_id, b"", state, _parse_time(entry.get("created_at"), where, f"{field}.created_at"))
    if not isinstance(encoded, str):
        raise ConfigError("must be a base64 string", file=where, field=f"{field}.key")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("is not valid base64", file=where, field=f"{field}.key") from None
    if len(raw) != KEY_LEN:
        raise ConfigError(f"must decode to {KEY_LEN} bytes, got {len(raw)}", file=where, field=f"{field}.key")
    if state not in STATES:
        raise ConfigError(f"must be one of {', '.join(STATES)}", file=where, field=f"{field}.state")
    created_at = _parse_time(entry.get("created_at"), where, f"{field}.created_at")
    return MasterKey(key_id, raw, state, created_at)


def parse_key_document(text: str, where: str) -> list[MasterKey]:
    """Parse the keyring JSON; ``ConfigError`` naming ``where`` and the field when it is invalid.

    Errors are raised ``from None``: the decoder's exceptions carry the document, key bytes included.
    """
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON: {exc.msg}", file=where, line=exc.lineno,
                          column=exc.colno) from None
    if not isinstance(doc, dict):
        raise ConfigError('must be a JSON object {"version": 1, "keys": [...]}', file=where)
    if doc.get("version") != FORMAT_VERSION:
        raise ConfigError(f"unsupported key file version {doc.get('version')!r}; expected {FORMAT_VERSION}",
                          file=where, field="version")
    entries = doc.get("keys")
    if not isinstance(entries, list) or not entries:
        raise ConfigError("must be a non-empty list of master keys", file=where, field="keys")
    keys = [_parse_key(entry, where, f"keys[{i}]") for i, entry in enumerate(entries)]
    check_keys(keys, where)
    return keys


def dump_key_document(keys: list[MasterKey]) -> bytes:
    """The keyring JSON for ``keys`` (UTF-8, indented, trailing newline)."""
    doc = {"version": FORMAT_VERSION, "keys": [
        {"id": key.id, **({"key": base64.b64encode(key.key).decode()} if key.state != "retired" else {}),
         "state": key.state,
         "created_at": datetime.fromtimestamp(key.created_at, UTC).isoformat().replace("+00:00", "Z")}
        for key in keys
    ]}
    return (json.dumps(doc, indent=2) + "\n").encode()


# --- private files -------------------------------------------------------------------------------


def _make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and any missing parents with mode 0700."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(path: Path, data: bytes) -> Path:
    """Write ``data`` to a new 0600 file beside ``path`` (created so, never wider) and fsync it."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    os.close(fd)
    return Path(name)


def _zero(fd: int) -> None:
    """Overwrite the whole file open at *fd* with zeros, in place, and fsync it."""
    size = os.fstat(fd).st_size
    os.lseek(fd, 0, os.SEEK_SET)
    written = 0
    while written < size:
        written += os.write(fd, bytes(min(size - written, 1 << 16)))
    os.fsync(fd)


class FileKeyProvider:
    """Master keys in a JSON key file that only its owner may read (mode 0600).

    ``load`` raises ``ConfigError`` naming the file when it is missing, unreadable, invalid, or
    open to group or others; ``save`` replaces it atomically with a new 0600 file, then
    overwrites the old file's bytes with zeros (through a descriptor opened before the
    replacement, so no other file is touched): a retired key's bytes do not stay in the freed
    blocks of a filesystem that writes in place (a copy-on-write filesystem or an SSD's
    wear-levelling may still keep old blocks; see the README). A ``save`` that cannot write the
    new file raises ``ConfigError`` (``errors.cannot_create``) and changes nothing.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def describe(self) -> str:
        return f"key file {self.path}"

    def load(self) -> list[MasterKey]:
        where = str(self.path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise ConfigError("key file not found; create one with `sessiongate keys generate`",
                              file=where) from None
        except OSError as exc:
            raise ConfigError(f"cannot open key file: {exc.strerror}", file=where) from None
        with os.fdopen(fd, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode & 0o777
            if mode & 0o077:
                raise ConfigError(f"key file is open to group or others (mode {mode:04o}); "
                                  f"run: chmod 600 {self.path}", file=where)
            data = file.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError("key file is not UTF-8 text", file=where) from None
        return parse_key_document(text, where)

    def save(self, keys: list[MasterKey]) -> None:
        check_keys(keys, str(self.path))
        try:
            _make_private_dirs(self.path.parent)
            tmp = _write_temp(self.path, dump_key_document(keys))
        except OSError as exc:  # nothing changed
            raise cannot_create(exc, self.path, "key file", "keys.master_key_file", doing="write") from exc
        try:
            old: int | None = os.open(self.path, os.O_WRONLY)
        except OSError:  # no file yet, or one its owner made read-only: nothing to overwrite
            old = None
        try:
            try:
                os.replace(tmp, self.path)
            except OSError as exc:  # nothing changed
                tmp.unlink(missing_ok=True)
                raise cannot_create(exc, self.path, "key file", "keys.master_key_file", doing="write") from exc
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(self.path.parent)
            if old is not None:
                _zero(old)
        finally:
            if old is not None:
                os.close(old)


class EnvKeyProvider:
    """Master keys as the keyring JSON in an environment variable; read-only."""

    def __init__(self, var_name: str = DEFAULT_ENV_VAR) -> None:
        self.var_name = var_name

    def describe(self) -> str:
        return f"environment variable {self.var_name}"

    def load(self) -> list[MasterKey]:
        where = f"${self.var_name}"
        text = os.environ.get(self.var_name)
        if not text:
            raise ConfigError("environment variable is not set", file=where)
        return parse_key_document(text, where)

    def save(self, keys: list[MasterKey]) -> None:
        raise NotImplementedError(f"{self.describe()} is read-only; change the variable where it is set")


# --- operations (sessiongate keys ...) -----------------------------------------------------------


def ensure(path: str | os.PathLike[str]) -> bool:
    """Create a key file with one new primary key unless it exists; True when it created one.

    Missing parent directories are created 0700. The file appears whole or not at all (written
    to a 0600 temp file, then hard-linked into place), so two processes starting together never
    both create one. Raises ``ConfigError`` naming the file and what to do when it cannot be
    created (a read-only or full disk, no permission, a file where a folder goes).
    """
    path = Path(path)
    if path.exists():
        return False
    try:
        _make_private_dirs(path.parent)
        tmp = _write_temp(path, dump_key_document([new_master_key("primary")]))
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise cannot_create(exc, path, "key file", "keys.master_key_file") from exc
    return True


def list_keys(provider: KeyProvider) -> list[KeyInfo]:
    """Id, state and creation time of every master key, oldest first."""
    keys = sorted(provider.load(), key=lambda key: key.created_at)
    return [KeyInfo(key.id, key.state, key.created_at) for key in keys]


def rotate(provider: KeyProvider) -> MasterKey:
    """Add a new primary key; the old primary becomes ``active`` (unwrap only). Returns the new key."""
    keys = provider.load()
    new = new_master_key("primary", taken={key.id for key in keys})
    demoted = [dataclasses.replace(key, state="active") if key.state == "primary" else key for key in keys]
    provider.save([*demoted, new])
    return new


def retire(provider: KeyProvider, key_id: str, *, in_use: int) -> MasterKey:
    """Retire ``key_id`` and destroy its bytes: the saved key file keeps its id, state and time
    only (see the module docstring). ``in_use`` is how many stored data keys it still wraps.

    Raises ``ConfigError`` when the key is unknown, is the primary, or still wraps data keys.
    Retiring a retired key saves the file again, which drops bytes an older gateway left there.
    """
    keys = provider.load()
    where = provider.describe()
    found = next((key for key in keys if key.id == key_id), None)
    if found is None:
        raise ConfigError(f"no master key {key_id!r}; see `sessiongate keys list`", file=where)
    if found.state == "retired":
        provider.save(keys)
        return found
    if found.state == "primary":
        raise ConfigError("is the primary key; run `sessiongate keys rotate` first", file=where, field=key_id)
    if in_use > 0:
        raise ConfigError(f"still wraps {in_use} data key(s); finish re-wrapping them (after "
                          "`sessiongate keys rotate`) before retiring it", file=where, field=key_id)
    retired = dataclasses.replace(found, state="retired", key=b"")
    provider.save([retired if key.id == key_id else key for key in keys])
    return retired
