"""structlog set-up: JSON lines (one per request) or pretty console output on a terminal.

Contract: log events carry identifiers, sizes, timings and outcomes. Callers never pass message
content, keys or tokens, nor the text of an exception raised by code that sees content (log
``exception_fields(exc)``: types and frames only); ``drop_secrets`` is a last line of defence
that removes fields whose names say they hold them.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

SECRET_FIELDS = frozenset({"authorization", "api_key", "key", "token", "content", "messages", "body", "password"})


def drop_secrets(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name in SECRET_FIELDS.intersection(event):
        event[name] = "[dropped]"
    return event


def exception_fields(exc: BaseException) -> dict[str, Any]:
    """An exception as log fields *without its text*: its type, the types of its causes and the
    innermost frames it passed through (``file:line function``). Use it instead of
    ``log.exception`` or ``str(exc)`` wherever the failing code may have seen message content:
    exception text (a YAML error, ``int('my card is 4111…')``) can quote it."""
    causes: list[str] = []
    cause = exc.__cause__ or exc.__context__
    while cause is not None and len(causes) < 5:
        causes.append(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    frames: list[str] = []
    for frame, line in traceback.walk_tb(exc.__traceback__):
        frames.append(f"{os.path.basename(frame.f_code.co_filename)}:{line} {frame.f_code.co_name}")
        del frames[:-8]
    return {"error": type(exc).__name__, "caused_by": causes or None, "where": frames or None}


def error_cause(exc: BaseException | None) -> dict[str, Any]:
    """What an operator needs of a background failure, never text a client could have put there:
    the type, and for an ``OSError`` its errno name, the system's message for it and the file it names
    (``ENOSPC`` and ``EACCES`` call for different fixes); for the gateway's own operator-facing
    ``StoreUnavailable``, its message."""
    from gateway.errors import StoreUnavailable

    if exc is None:
        return {"error": None}
    fields: dict[str, Any] = {"error": type(exc).__name__}
    if isinstance(exc, OSError) and exc.errno is not None:
        fields["errno"] = errno.errorcode.get(exc.errno, str(exc.errno))
        fields["detail"] = os.strerror(exc.errno)  # the system's text for the number, never the raiser's
        if exc.filename is not None:
            fields["file"] = os.fsdecode(exc.filename)
    elif isinstance(exc, StoreUnavailable):
        fields["detail"] = exc.message
    return fields


def _dumps(event: Any, **_: Any) -> str:
    return orjson.dumps(event, default=str).decode()


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    stream = stream or sys.stderr
    pretty = fmt == "console" or (fmt == "auto" and stream.isatty())
    renderer: Any = (structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback) if pretty
                     else structlog.processors.JSONRenderer(serializer=_dumps))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            drop_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.WriteLoggerFactory(stream),  # one write per line
        cache_logger_on_first_use=False,
    )
