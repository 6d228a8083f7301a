"""The per-request context, and the process-wide services the stages use.

Each ``Context`` field names the stage that sets it; a stage sets only its own fields. Nothing
per-tenant lives in module globals: it is all reached through ``Context.services``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.background import Background
from gateway.codecs.chat import CHAT

if TYPE_CHECKING:
    from gateway.auditor import AuditTrail
    from gateway.auth import Authenticator
    from gateway.codecs import Codec
    from gateway.metrics import Metrics
    from gateway.policy import Policy, PolicyWatcher
    from gateway.sessions import LoadedSession, SessionService
    from gateway.settings import Settings
    from gateway.tracing import Tracing
    from gateway.upstream import Upstream, Upstreams


@dataclass(slots=True)
class Services:
    """What the app builds once at start-up (see ``app.build_services``)."""

    settings: Settings
    auth: Authenticator
    upstreams: Upstreams
    sessions: SessionService
    policies: PolicyWatcher
    metrics: Metrics
    audit: AuditTrail
    background: Background = field(default_factory=Background)
    tracing: Tracing | None = None  # None unless OpenTelemetry is configured


@dataclass(slots=True)
class Context:
    request: web.Request
    services: Services
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    route: str = "chat"
    codec: Codec = CHAT  # the handler's: what differs per wire protocol (gateway.codecs)

    # authenticate
    tenant: str = ""
    client: str = ""
    # parse_request
    raw: bytes = b""
    body: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    stream: bool = False
    messages: list[dict[str, Any]] = field(default_factory=list)  # the request in the neutral form
    # resolve_session
    session_id: str | None = None
    reply_id: str = ""  # the response id the client is shown instead of the upstream's ("" none)
    window_only: bool = False  # the session is read for its window; inject then drops it: audited only
    # match_policy
    policy: Policy | None = None
    # load_state
    loaded: LoadedSession | None = None
    # inject
    upstream: Upstream | None = None
    forward_body: bytes = b""
    # forward
    response: web.StreamResponse | None = None
    upstream_status: int = 0
    reply_message: dict[str, Any] | None = None
    reply_body: dict[str, Any] | None = None
    tail: bytes = b""
    tail_type: str = ""
    tail_headers: dict[str, str] = field(default_factory=dict)
    outcome: str = ""  # set by forward and record; persist sets the one committed (erased_meanwhile)
    ended_by: str = ""  # "client", "upstream" or "shutdown" when the reply was cut off
    reply_truncated: bool = False  # the reply was over the upstream's max_reply_bytes
    event_open: bool = False  # the client has an event's start, its end is held in tail: no other event may follow
    error_relayed: bool = False  # the stream's last event was the provider's own error event
    stream_seq: int | None = None  # the last relayed event's sequence_number (Responses numbers them)
    bytes_out: int = 0
    first_byte_at: float = 0.0  # perf_counter() when the first streamed byte was written
    # record
    user_text: str | None = None
    reply_text: str | None = None
    recorded: list[dict[str, Any]] | None = None  # structured messages, when the round has tool calls or media
    record_error: str = ""  # the type name of the exception that made recording fail
    keys_over_budget: list[str] = field(default_factory=list)  # reply keys left out: too costly on this reply
    prefill_chars: int = 0  # characters of the recorded reply's text that the client sent (its prefill)
    # persist
    persist_attempted: bool = False
    persisted: bool = False

    @property
    def reply_bytes(self) -> int:
        """The reply's bytes for the client: those relayed, and the held-back ``tail`` that goes
        after the commit (unless the reply was cut off)."""
        return self.bytes_out + (0 if self.ended_by else len(self.tail))
