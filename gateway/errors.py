"""The gateway's error tree. Every refusal a client can see is one of these.

Each class carries the HTTP status, the OpenAI error ``type`` and a stable ``code``; the one
middleware in ``app.py`` turns any of them into ``{"error": {"message", "type", "code"}}``.
Messages are written for the person who has to fix the problem and never contain message
content, keys or tokens.

    GatewayError
    ├── BadRequest               400 invalid_request_error
    │   ├── InvalidJSON          400  (malformed JSON, invalid UTF-8)
    │   ├── InvalidSessionId     400
    │   ├── InvalidSession       400  (a session document that cannot be loaded)
    │   └── CorruptBody          400  (a compressed request body that does not decode)
    ├── Unauthorized             401 authentication_error
    ├── Forbidden                403 permission_error
    ├── NotFound                 404 not_found_error
    ├── Conflict                 409 conflict_error
    ├── RequestTimeout           408 invalid_request_error (a body that stopped arriving)
    ├── PayloadTooLarge          413 invalid_request_error (also after decompression)
    ├── UnsupportedEncoding      415 invalid_request_error (a Content-Encoding we cannot decode)
    ├── ExpectationFailed        417 invalid_request_error (an Expect other than 100-continue)
    ├── ImportNotWhitelisted     422 invalid_request_error (an import the session's policy would not record)
    ├── NotWhitelisted           422 invalid_request_error (history outside the policy's whitelist)
    ├── IntegrityError           500 integrity_error (stored data failed an integrity check)
    ├── RecordFailed             500 server_error (the round could not be recorded; reply withheld)
    ├── UnsupportedTransferCoding 501 invalid_request_error (a transfer coding other than a lone chunked)
    ├── StoreUnavailable         503 service_unavailable
    ├── UpstreamError            502 upstream_error (unreachable, broken reply, an error page)
    │   ├── UpstreamAuthFailed   502  (the provider refused the gateway's provider key)
    │   └── UpstreamTimeout      504
    └── ConfigError              not for clients: start-up and CLI errors naming file and field
"""

from __future__ import annotations

from collections.abc import Sequence


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"
    retry_after: int | None = None
    """Seconds for a ``Retry-After`` header: set on errors a client should simply retry."""
    headers: dict[str, str] = {}
    """Further response headers (an upstream's retry advice and request id, ``x-should-retry``)."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_body(self) -> dict[str, dict[str, str]]:
        """The OpenAI error shape for this error."""
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}


class BadRequest(GatewayError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class InvalidJSON(BadRequest):
    code = "invalid_json"


class InvalidSessionId(BadRequest):
    code = "invalid_session_id"


class InvalidSession(BadRequest):
    code = "invalid_session"


class CorruptBody(BadRequest):
    code = "corrupt_body"


class Unauthorized(GatewayError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class Forbidden(GatewayError):
    status, type, code = 403, "permission_error", "forbidden"


class NotFound(GatewayError):
    status, type, code = 404, "not_found_error", "not_found"


class Conflict(GatewayError):
    status, type, code = 409, "conflict_error", "conflict"


class RequestTimeout(GatewayError):
    status, type, code = 408, "invalid_request_error", "request_timeout"


class PayloadTooLarge(GatewayError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class ImportNotWhitelisted(GatewayError):
    """A session import holds something the session's policy would never have recorded; the
    message names the field and message index, never the content."""

    status, type, code = 422, "invalid_request_error", "import_not_whitelisted"


class NotWhitelisted(GatewayError):
    """Messages or a memo that the session's policy would never have recorded (names the message, never its text)."""

    status, type, code = 422, "invalid_request_error", "not_whitelisted"


class UnsupportedEncoding(GatewayError):
    status, type, code = 415, "invalid_request_error", "unsupported_content_encoding"

    def to_body(self) -> dict[str, dict[str, str]]:
        """One fixed message: the header's value is the client's (a key pasted in the wrong place
        would come back), so it is never quoted."""
        return {"error": {"message": UNSUPPORTED_ENCODING_MESSAGE, "type": self.type, "code": self.code}}


UNSUPPORTED_ENCODING_MESSAGE = ("the request's Content-Encoding is not one the gateway decodes: send the body "
                                "uncompressed, or as gzip, deflate or zstd (at most 3 codings)")
"""What a client is told for every :class:`UnsupportedEncoding`."""


class ExpectationFailed(GatewayError):
    """An ``Expect`` header other than ``100-continue`` (RFC 9110 §10.1.1). The value is never quoted."""

    status, type, code = 417, "invalid_request_error", "expectation_failed"


class UnsupportedTransferCoding(GatewayError):
    """A ``Transfer-Encoding`` other than a lone ``chunked`` (``gzip, chunked``, say): RFC 9112 §6.1
    answers a transfer coding the server does not implement with 501, as nginx does. Only the
    framing would be undone, so the gateway, and a proxy in front of it that decodes the coding,
    would read different bodies: the request is refused before its body is read, never forwarded.
    The value is never quoted; ``x-should-retry: false``, since the SDKs retry a 5xx."""

    status, type, code = 501, "invalid_request_error", "unsupported_transfer_encoding"
    headers = {"x-should-retry": "false"}

    def __init__(self) -> None:
        super().__init__("the request's Transfer-Encoding is not one the gateway implements: send the body with "
                         "Content-Length or 'Transfer-Encoding: chunked' alone (compress it with Content-Encoding)")


class RecordFailed(GatewayError):
    """The record step failed for this round: the round was stored as ``incomplete`` with no text
    and an audit entry naming the failure's type; the client must not see a complete reply."""

    status, type, code = 500, "server_error", "record_failed"

    def __init__(self) -> None:
        super().__init__("the gateway could not record this round, so the reply was withheld; the round's "
                         "audit entry marks it incomplete and names the failure for the operator")


class IntegrityError(GatewayError):
    """Stored data failed authentication (flipped byte, moved record, unknown or wrong key).

    The client only ever sees the fixed message; details go to the log.
    """

    status, type, code = 500, "integrity_error", "integrity_check_failed"

    def __init__(self, detail: str) -> None:
        super().__init__("stored data for this session failed an integrity check; the operator has been told")
        self.detail = detail


class EvidenceRefused(IntegrityError):
    """An integrity failure met while serving an auditor (``/admin/export``): the auditor is told
    what failed, as ``sessiongate export`` and ``audit verify`` tell the operator. Details name
    tenants, sessions, rounds, entries and columns, never stored values."""

    def __init__(self, detail: str, tenant: str) -> None:
        super().__init__(detail)
        self.message = (f"the export stopped: {detail}. Nothing was exported; "
                        f"'sessiongate audit verify --tenant {tenant}' reports every finding")


class StoreUnavailable(GatewayError):
    """Any failure to reach or use the database; answered with ``Retry-After``.

    The message is the operator's: it may name the database file or server and quote the
    driver's error, so the CLI prints it and the gateway logs it (``store_unavailable``), but a
    client is only ever sent :data:`STORE_UNAVAILABLE_MESSAGE`."""

    status, type, code = 503, "service_unavailable", "store_unavailable"
    retry_after = 1

    def to_body(self) -> dict[str, dict[str, str]]:
        return {"error": {"message": STORE_UNAVAILABLE_MESSAGE, "type": self.type, "code": self.code}}


STORE_UNAVAILABLE_MESSAGE = ("the gateway cannot use its session store right now; retry after the Retry-After "
                             "delay (the operator's log has the cause)")
"""What a client is told for every :class:`StoreUnavailable`: no path, server or driver text."""


class UpstreamError(GatewayError):
    status, type, code = 502, "upstream_error", "upstream_unreachable"
    upstream_status: int | None = None
    """The status the provider answered with, when it answered (for the audit entry)."""


class UpstreamAuthFailed(UpstreamError):
    """The provider refused the gateway's own provider key (its 401): nothing the client can fix
    or should retry, and the provider's message (which quotes part of that key) is not relayed."""

    code = "upstream_auth_failed"
    headers = {"x-should-retry": "false"}


class UpstreamTimeout(UpstreamError):
    status, code = 504, "upstream_timeout"


class ConfigError(Exception):
    """A configuration, policy or key file is invalid. ``str()`` names file, line and field;
    *also* holds further findings, each a line of its own after the first."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 column: int | None = None, field: str | None = None, also: Sequence[str] = ()) -> None:
        self.file, self.line, self.column, self.field = file, line, column, field
        where = file or ""
        if line is not None:
            where += f":{line}"
            if column is not None:
                where += f":{column}"
        prefix = f"{where}: " if where else ""
        at = f"{field}: " if field else ""
        super().__init__("\n".join([f"{prefix}{at}{message}", *also]))
        self.message = message


def cannot_create(exc: OSError, path: object, what: str, field: str | None = None, *,
                  doing: str = "create") -> ConfigError:
    """*exc*, raised while *doing* (create, write) *what* (``"audit signing key"``) at *path* or
    its folder, as a one-line ``ConfigError`` naming *path*, the setting *field*, the path the
    system refused and what to do: a read-only filesystem, a permission, a full disk, a file
    where a folder goes."""
    import errno
    import os

    failed = os.fsdecode(exc.filename) if exc.filename is not None else str(path)
    elsewhere = f"or set {field} to a path the gateway can write" if field else "or choose another path"
    fixes = {
        errno.EROFS: f"{failed} is on a read-only filesystem: mount it read-write, {elsewhere}",
        errno.EACCES: f"permission denied at {failed}: let the gateway's user write there, {elsewhere}",
        errno.EPERM: f"not permitted at {failed}: let the gateway's user write there, {elsewhere}",
        errno.ENOSPC: f"no space left on the disk of {failed}: free some, {elsewhere}",
        errno.EDQUOT: f"the disk quota is used up at {failed}: free some, {elsewhere}",
        errno.ENOTDIR: f"a part of {failed} is a file, not a folder: move that file, {elsewhere}",
    }
    fix = fixes.get(exc.errno or 0, f"{exc.strerror or exc} at {failed}: {elsewhere.removeprefix('or ')}")
    return ConfigError(f"cannot {doing} the {what}: {fix}", file=str(path), field=field)
