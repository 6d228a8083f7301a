"""Master-key rotation over a live store: re-wrap data keys, follow keyring changes; loading the
audit signing key.

``rewrap_all`` re-wraps every data key that is not under the keyring's primary, one compare-
and-set transaction each with its ``rewrap`` audit entry (``SessionService.rewrap``: the chain
records which master key wraps each data key, so a row relabelled in the database is found), so
it runs safely beside live traffic and beside another process doing the same. ``KeyringWatcher``
lets a running gateway follow a keyring file edited by ``sessiongate keys rotate``: it reloads the
keyring when the file changes and then re-wraps in the background. Data keys are never exposed;
only ids and counts are logged.

``load_signer`` loads the Ed25519 key that signs audit checkpoints. Like the keyring (whose file
is generated only for a store without data keys), it is generated only while the checkpoint file
holds no checkpoint, with an ``audit_signing_key_generated`` warning; a missing key, or a key
other than the one that signed the file's last checkpoint, over existing checkpoints is a
``ConfigError`` naming the file and what to do, since every checkpoint signed from then on would
verify only under a public key auditors have never seen.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from gateway.audit import Checkpoint, CheckpointLog, Signer
from gateway.background import Worker
from gateway.errors import ConfigError, IntegrityError
from gateway.keyring import Keyring
from gateway.sessions import SessionService
from gateway.settings import Settings
from gateway.store.base import SYSTEM_TENANT, Changes

log = structlog.get_logger("gateway.keys")


def load_signer(settings: Settings) -> Signer:
    """The audit signing key of *settings* (see the module docstring). Raises ``ConfigError``
    (file, field, what to do) when it is missing or replaced while ``audit.checkpoint_file`` holds
    checkpoints, and as ``Signer.load_or_create`` does for an unreadable or open file."""
    path = settings.audit.signing_key_file
    checkpoints = settings.audit.checkpoint_file
    last: Checkpoint | None = None
    for checkpoint in CheckpointLog(checkpoints):  # streamed: only the last one is kept
        last = checkpoint
    aside = (f"If that key is lost for good, move {checkpoints} aside and keep it (its checkpoints verify only "
             "with the lost key's public key: 'sessiongate audit verify --checkpoints OLD_FILE --public-key "
             "OLD_KEY.pem'), then start again: a new key is generated and auditors need its public key "
             "('sessiongate audit public-key')")
    if not path.exists():
        if last is not None:
            raise ConfigError(f"the audit signing key is missing, but {checkpoints} holds checkpoints it signed (the "
                              f"last: tenant {last.tenant}, entry {last.seq}, key {last.key_id}): restore the key "
                              f"file from your backup. {aside}", file=str(path), field="audit.signing_key_file")
        signer = Signer.load_or_create(path)
        log.warning("audit_signing_key_generated", path=str(path), key_id=signer.key_id,
                    note="a new audit signing key was generated: back it up and give auditors its public key "
                    "('sessiongate audit public-key'); checkpoints signed by an earlier key verify only with that "
                    "key's public key")
        return signer
    signer = Signer.load_or_create(path)
    if last is not None and last.key_id != signer.key_id:
        raise ConfigError(f"this is not the key that signed the checkpoints in {checkpoints}: the last (tenant "
                          f"{last.tenant}, entry {last.seq}) was signed by key {last.key_id}, this key is "
                          f"{signer.key_id}. Restore the key that signed them. {aside}", file=str(path),
                          field="audit.signing_key_file")
    return signer


@dataclass(frozen=True, slots=True)
class RewrapReport:
    rewrapped: int
    already_primary: int
    raced: int
    failed: int = 0


async def rewrap_all(sessions: SessionService) -> RewrapReport:
    """Re-wrap every data key not under the primary master key; audit the rotation."""
    keyring = sessions.keyring
    done = same = raced = failed = 0
    async for row in sessions.store.iter_data_keys():
        if not keyring.needs_rewrap(row.kek_id):
            same += 1
            continue
        try:
            rewrapped = await sessions.rewrap(row)
        except IntegrityError as exc:  # that session is unreadable (or altered) already; the others still rotate
            failed += 1
            log.error("rewrap_integrity_error", tenant=row.tenant, session_id=row.session_id, detail=exc.detail)
            continue
        if rewrapped:
            done += 1
        else:
            raced += 1  # erased or re-wrapped meanwhile: nothing left to do for it
    await sessions.store.transact(SYSTEM_TENANT, None, lambda cur: Changes(audit=[{
        "event": "key_rotation", "detail": {"primary": keyring.primary_id, "rewrapped": done,
                                            "already_primary": same, "raced": raced, "failed": failed}}]))
    log.info("data_keys_rewrapped", primary=keyring.primary_id, rewrapped=done, already_primary=same, raced=raced,
             failed=failed)
    return RewrapReport(done, same, raced, failed)


class KeyringWatcher(Worker):
    """Polls a keyring file; on change reloads it into *sessions* and re-wraps in the background.

    A change is taken as seen only once the new keyring is loaded, and a new primary only once
    every data key is re-wrapped under it: a file that cannot be read or loaded (descriptor
    exhaustion, an invalid edit, a missing file) or a re-wrap that fails is retried with backoff,
    and the watcher reports itself unhealthy (``/readyz`` 503) until it succeeds.
    """

    name = "keyring-watcher"

    def __init__(self, path: os.PathLike[str] | str, load: Callable[[], Keyring], sessions: SessionService,
                 interval: float = 1.0) -> None:
        self.path, self.load, self.sessions, self.interval = path, load, sessions, interval
        self._seen = self._stamp()
        # the primary this watcher last re-wrapped for; not sessions.keyring.primary_id, which
        # SessionService.reload_keyring may already have advanced without re-wrapping anything
        self._primary = sessions.keyring.primary_id
        self._wanted = self._primary

    def _stamp(self) -> tuple[int, int] | None:
        """(mtime_ns, size) of the file; None when it does not exist. Other errors are raised."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    async def step(self) -> None:
        stamp = self._stamp()
        if stamp != self._seen:
            try:
                keyring = await asyncio.to_thread(self.load)
            except ConfigError as exc:  # its message names the problem (mode, JSON, field), never key bytes
                log.error("keyring_reload_refused", file=exc.file, line=exc.line, field=exc.field, detail=exc.message)
                raise
            self.sessions.keyring = keyring
            self._seen, self._wanted = stamp, keyring.primary_id
            log.info("keyring_reloaded", primary=keyring.primary_id, keys=keyring.ids())
        if self._wanted != self._primary:
            # an empty write as a barrier: plans that wrapped with the old keyring have
            # committed before it returns, so the scan below sees their data keys
            await self.sessions.store.transact(SYSTEM_TENANT, None, lambda cur: Changes())
            await rewrap_all(self.sessions)
            self._primary = self._wanted
