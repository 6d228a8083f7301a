"""Hot reload of the policy folder: edits take effect without a restart, bad edits are refused.

:class:`PolicyWatcher` loads the folder when it is built (raising ``PolicyConfigError``, so a
gateway never starts on invalid policies), then, once started, polls the folder every
``interval`` seconds (default 0.5) in an asyncio task. A poll compares a fingerprint of the
policy files (name, mtime in ns, size, inode); when it has changed and then stays the same for
one more poll (so a half-written file is not read), the folder is loaded again in a worker
thread. A valid set replaces ``current`` in one assignment, so a request sees either the old
set or the new one, never a mix and never an error; ``last_diff`` is set to what changed
(:func:`gateway.policy.diff.diff_sets`), the ``policy_reloaded`` log line carries its one-line
summary and ``widens_recording``, and ``on_change(new_set)`` is then called (sync or async; when
it raises, the poll fails and is retried). An invalid set is refused: the check's messages are
logged with structlog (``policy_reload_refused``), ``last_error`` is set, ``on_refused(error)``
is called, and the last good set keeps serving. With the default interval an edit is live
within about 1.5 seconds.

A poll or load that fails for another reason (``OSError`` under descriptor exhaustion, a
folder that cannot be read) is not a refusal: the watcher logs the exception type, reports
itself unhealthy (``/readyz`` answers 503) and retries with backoff until it can read the folder
again; the change is then picked up as usual.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import structlog

from gateway.background import Worker
from gateway.errors import ConfigError
from gateway.policy.diff import PolicyDiff, diff_sets
from gateway.policy.loader import POLICY_SUFFIXES, load_policy_set
from gateway.policy.matcher import PolicySet

log = structlog.get_logger("sessiongate.policy")

Fingerprint = tuple[tuple[str, int, int, int], ...]
OnChange = Callable[[PolicySet], Awaitable[None] | None]


def fingerprint(folder: Path) -> Fingerprint:
    """What a poll compares: (name, mtime_ns, size, inode) of each policy file, sorted."""
    entries = []
    try:
        children = list(folder.iterdir()) if folder.is_dir() else [folder]
    except OSError:
        return ()
    for child in children:
        if child.suffix not in POLICY_SUFFIXES:
            continue
        try:
            st = child.stat()
        except OSError:
            continue
        entries.append((child.name, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(sorted(entries))


class PolicyWatcher(Worker):
    """Serves the current :class:`PolicySet` of ``path`` and reloads it on change.

    Raises ``ConfigError`` from the constructor when the folder is invalid at start-up.
    ``start()``/``stop()`` run and end the polling task.
    """

    name = "policy-watcher"

    def __init__(self, path: Path | str, on_change: OnChange | None = None, *,
                 interval: float = 0.5, on_refused: Callable[[ConfigError], None] | None = None,
                 hook_modules: Sequence[str] = ()) -> None:
        self.path = Path(path)
        self.hook_modules = tuple(hook_modules)
        """``policies.hook_modules``: the only modules a policy's hooks may come from."""
        self.interval = interval
        self._on_change = on_change
        self._on_refused = on_refused
        self._current = load_policy_set(self.path, hook_modules=self.hook_modules)
        try:
            self._seen = fingerprint(self.path)
        except OSError:
            self._seen = ()  # the first poll that can read the folder reloads it
        self._pending: Fingerprint | None = None
        self.last_error: ConfigError | None = None
        """The error of the last refused reload; None after a successful one."""
        self.last_diff: PolicyDiff | None = None
        """What the last successful reload changed (``gateway.policy.diff``); None before one."""

    @property
    def current(self) -> PolicySet:
        """The set serving requests now (read it once per request)."""
        return self._current

    async def reload(self) -> bool:
        """Load the folder now; swap it in when valid. Returns whether the new set was taken."""
        try:
            new = await asyncio.to_thread(functools.partial(load_policy_set, self.path,
                                                            hook_modules=self.hook_modules))
        except ConfigError as exc:
            self.last_error = exc
            log.error("policy_reload_refused", path=str(self.path), errors=str(exc).splitlines(),
                      kept=[p.id for p in self._current])
            if self._on_refused is not None:
                self._on_refused(exc)
            return False
        old, self._current = self._current, new
        self.last_error = None
        try:
            self.last_diff = await asyncio.to_thread(diff_sets, old, new)
        except Exception:  # noqa: BLE001 - the new set is valid and serves; only its summary is missing
            self.last_diff = None
            log.exception("policy_diff_failed", path=str(self.path))
        log.info("policy_reloaded", path=str(self.path),
                 policies={p.id: p.version_hash[:12] for p in new},
                 warnings=[str(w) for w in new.warnings],
                 diff=self.last_diff.summary_line() if self.last_diff else None,
                 widens_recording=self.last_diff.widens_recording if self.last_diff else None)
        if self._on_change is not None:
            # raises when it fails (the reload's audit entry could not be written): the poll
            # that called this then fails and is retried, so the change is reported again
            result = self._on_change(new)
            if inspect.isawaitable(result):
                await result
        return True

    async def step(self) -> None:
        """One poll. Raises (and is retried by ``Worker.run``) when the folder cannot be read;
        the fingerprint is taken as seen only once its load has been done."""
        now = await asyncio.to_thread(fingerprint, self.path)
        if now == self._seen:
            self._pending = None
        elif now != self._pending:
            self._pending = now  # changed: wait one poll for the writer to finish
        else:
            await self.reload()
            self._seen, self._pending = now, None
