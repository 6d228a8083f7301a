"""Python bounding hooks named in a policy as ``module:function``.

A hook has Agently's signature, sync or async:

- analysis ``(full_context, context_window, memo, session_settings) -> strategy name | None``
- execution ``(full_context, context_window, memo, session_settings)
  -> (full_context | None, context_window | None, memo)``

:func:`resolve_hook` imports a reference and checks it when the policy loads (it is the
validator behind the ``HookRef`` fields of :mod:`gateway.policy.model`); :func:`call_hook` runs
one and awaits it when it is async. A hook module is imported once per process: editing a
policy file reloads the policy, editing the hook's code needs a restart.

Hooks run in the process that holds the master keys, so a policy file may only name modules the
operator's configuration allows (``policies.hook_modules``: module names or globs such as
``myhooks`` and ``myhooks.*``; empty by default, which refuses every hook policy).
:func:`check_allowed` decides that from the reference's text alone, before anything is imported;
the policy loader passes the allow-list as pydantic validation context (``HOOK_MODULES``), so a
policy file that names a module outside it is refused at load time (``policy check`` included)
and nothing of it is imported.

Raises ``ValueError`` (never ``ImportError``) so that pydantic reports it at the field.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterable
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Any

HOOK_REF_PATTERN = r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$"
"""``package.module:function`` (the attribute part may be dotted: ``mod:Class.method``)."""

HOOK_PARAMETERS = ("full_context", "context_window", "memo", "session_settings")

_REF = re.compile(HOOK_REF_PATTERN)

HOOK_MODULES = "hook_modules"
"""The validation-context key holding the allowed hook modules (``policies.hook_modules``)."""
SETTING = "policies.hook_modules"


def check_allowed(ref: str, allowed: Iterable[str]) -> str:
    """Check that *ref* is ``module:function`` and that its module is in *allowed* (names or
    globs; ``pkg.*`` covers ``pkg``'s submodules). Imports nothing.

    Raises:
        ValueError: malformed reference, or a module the configuration does not allow.
    """
    if not _REF.fullmatch(ref):
        raise ValueError(f"hook {ref!r} must look like 'package.module:function'")
    module = ref.partition(":")[0]
    patterns = list(allowed)
    if not any(fnmatchcase(module, pattern) for pattern in patterns):
        listed = ", ".join(repr(p) for p in patterns) if patterns else "empty"
        raise ValueError(f"hook module {module!r} is not allowed by the gateway configuration: add it to "
                         f"{SETTING} (now {listed}) to let policies run it; hooks run in the process that "
                         "holds the master keys")
    return ref


@lru_cache(maxsize=256)
def resolve_hook(ref: str) -> Callable[..., Any]:
    """Import ``module:function`` and check that it is a callable taking 4 positional arguments.

    Args:
        ref: the reference as written in the policy.
    Returns:
        The callable (sync or async). Successful look-ups are cached; failures are not.
    Raises:
        ValueError: the reference is malformed, the module cannot be imported, the attribute
            is missing, not callable, or cannot be called with the 4 hook arguments.
    """
    if not _REF.match(ref):
        raise ValueError(f"hook {ref!r} must look like 'package.module:function'")
    module_name, _, attr_path = ref.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is a policy error
        raise ValueError(f"cannot import module {module_name!r} of hook {ref!r}: {exc}") from exc
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise ValueError(f"module {module_name!r} has no attribute {attr_path!r}") from exc
    if not callable(target):
        raise ValueError(f"hook {ref!r} is not callable")
    _check_arity(ref, target)
    return target


def _check_arity(ref: str, fn: Callable[..., Any]) -> None:
    """Raise ValueError unless ``fn`` accepts exactly the 4 hook arguments positionally."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot read the signature of hook {ref!r}: {exc}") from exc
    try:
        signature.bind(*HOOK_PARAMETERS)
    except TypeError as exc:
        raise ValueError(
            f"hook {ref!r} must take 4 positional parameters ({', '.join(HOOK_PARAMETERS)}); "
            f"its signature is {signature}"
        ) from exc


async def call_hook(fn: Callable[..., Any], full_context: Any, context_window: Any, memo: Any,
                    session_settings: Any) -> Any:
    """Call a hook with Agently's four arguments and await the result when it is awaitable.

    Exceptions raised by the hook propagate unchanged; the caller decides how to fail.
    """
    result = fn(full_context, context_window, memo, session_settings)
    if inspect.isawaitable(result):
        result = await result
    return result
