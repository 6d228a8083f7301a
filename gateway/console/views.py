"""The console's pages. Each handler is small: check who is asking, read through the services
the rest of the gateway uses (store, audit trail, policies, redaction), render a template.

Routes (all under ``/console``): ``login``, ``logout``, ``overview``, ``sessions``,
``sessions/{tenant}/{session_id}``, ``audit/{tenant}/{request_id}``, ``verify`` (POST),
``export`` (POST), ``jobs/{id}``, ``jobs/{id}/download``, ``public-key``, ``policies``,
``policies/explain`` (POST), ``static/*``.
"""

from __future__ import annotations

import asyncio
import datetime
import fnmatch
import functools
import hashlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import markupsafe
import orjson
import structlog
import yaml
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.audit import VerifyReport, entry_fields
from gateway.console.auth import (
    COOKIE,
    IDLE_SECONDS,
    LOGIN_COOKIE,
    ConsoleSession,
    ConsoleSessions,
    form_limit,
    same_origin,
    set_cookie,
    token_matches,
)
from gateway.console.jobs import MAX_RUNNING_PER_AUDITOR, Counting, Job, JobProgress, Jobs, TooManyRunning
from gateway.console.pool import Busy, close_pool, work_pool
from gateway.console.stats import DAYS_SHOWN, StatsCache
from gateway.console.throttle import FailureThrottle, peer, warn_demo_credentials
from gateway.errors import GatewayError, IntegrityError, PayloadTooLarge, Unauthorized
from gateway.export import FORMATS, RoundLabels, check_range, record_columns
from gateway.handlers import SERVICES, parse_time
from gateway.observe import route_label
from gateway.redact import Redactor
from gateway.stages.resolve_session import check_session_id
from gateway.store.base import SYSTEM_TENANT, Changes, RoundRow
from gateway.visible import HIDDEN, tag_text

log = structlog.get_logger("gateway.console")
HERE = Path(__file__).parent
PAGE = 50
ROUNDS_PER_PAGE = 50
"""Rounds on one page of a session (``?after=<seq>`` for the next)."""
PAGES_PER_AUDITOR = 6
"""Session pages one auditor may have loading at once (one renders at a time, the rest wait);
more are refused with 429."""
CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; "
       "base-uri 'none'")
_TENANT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Page = Callable[[web.Request, ConsoleSession], Awaitable[web.StreamResponse]]


@dataclass
class Console:
    sessions: ConsoleSessions = field(default_factory=ConsoleSessions)
    jobs: Jobs = field(default_factory=Jobs)
    stats: StatsCache = field(default_factory=StatsCache)
    throttle: FailureThrottle = field(default_factory=FailureThrottle)
    """Failed auditor authentications per address (console sign-in and ``/admin``)."""
    templates: jinja2.Environment = field(default_factory=lambda: _environment())


CONSOLE = web.AppKey("console", Console)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["when"] = _when
    env.filters["pretty"] = lambda value: orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()
    env.filters["visible"] = visible
    env.filters["role_class"] = role_class
    return env


ROLE_CLASSES = {"system": "role-system", "developer": "role-developer", "user": "role-user",
                "assistant": "role-assistant", "tool": "role-tool", "function": "role-function"}
"""The class of a message of each role the wire protocols know. A recorded role is data (an
import or a history edit may hold any string): it is never put into a class attribute, where
``"user skip"`` would add the stylesheet's off-screen class and hide the message."""
OTHER_ROLE = "role-other"


def role_class(role: object) -> str:
    """The fixed class of a message with *role*: from :data:`ROLE_CLASSES`, else
    :data:`OTHER_ROLE` (shown plainly, its role marked as unrecognised)."""
    return ROLE_CLASSES.get(role, OTHER_ROLE) if isinstance(role, str) else OTHER_ROLE


def visible(text: str) -> markupsafe.Markup:
    """*text* escaped, with every hidden character (``gateway.visible.HIDDEN``) shown as a
    marked ``⟨U+202E⟩`` and a run of Unicode tags as the ASCII it spells: an auditor sees what
    the model read, and a bidirectional override cannot reorder what is shown."""
    out: list[str] = []
    last = 0
    for match in HIDDEN.finditer(text):
        out.append(str(markupsafe.escape(text[last:match.start()])))
        run = match.group()
        if match.group("tags"):
            label = "tags spelling " + orjson.dumps(tag_text(run)).decode()
        else:
            label = " ".join(f"U+{ord(c):04X}" for c in run)
        out.append(f'<mark class="hidden-char" title="hidden characters">⟨{markupsafe.escape(label)}⟩</mark>')
        last = match.end()
    out.append(str(markupsafe.escape(text[last:])))
    return markupsafe.Markup("".join(out))


def _when(ts: float | None) -> str:
    if ts is None:
        return "—"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# --- plumbing ---------------------------------------------------------------------------------

def render(request: web.Request, template: str, status: int = 200, **values: Any) -> web.Response:
    console = request.app[CONSOLE]
    html = console.templates.get_template(template).render(**values)
    return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")


def _seq_arg(value: str | None) -> int:
    """A round number from the query (``after``): 0 when absent or not a whole number."""
    return int(value) if value is not None and value.isdigit() and len(value) < 19 else 0


async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    """Security headers on every console response."""
    if request.path.startswith("/console"):
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"  # "no-referrer" makes Chromium send Origin: null
        response.headers["X-Frame-Options"] = "DENY"
        if not request.path.startswith("/console/static/"):
            response.headers["Cache-Control"] = "no-store"


def _public_origin(request: web.Request) -> str | None:
    """``console.public_origin``: the origin browsers reach the console at behind a proxy."""
    return request.app[SERVICES].settings.console.public_origin


class UnreadableForm(Exception):
    """A console form post that cannot be read (not text in its declared charset, a charset no
    codec has, a malformed multipart body): no browser sends one from a console page. Its message
    says what was wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


UNREADABLE_FORM = ("The form could not be read: its body holds bytes that are not UTF-8 text, which no console "
                   "page sends. Open the console and submit the form again.")
UNKNOWN_CHARSET = ("The form could not be read: its Content-Type (or a part's) names a charset this gateway has "
                   "no codec for. Console pages send UTF-8: open the console and submit the form again.")
MALFORMED_FORM = ("The form could not be read: it is not a well-formed application/x-www-form-urlencoded or "
                  "multipart/form-data body (a multipart form needs a boundary in its Content-Type, and each part "
                  "well-formed headers and a Content-Disposition naming its field). Open the console and submit "
                  "the form again.")


async def read_form(request: web.Request) -> Any:
    """The posted form (``request.post()``); :class:`UnreadableForm` saying why when it cannot be
    read (aiohttp raises whatever its decoders raise: these were 500s, before sign-in too)."""
    try:
        return await request.post()
    except UnicodeDecodeError as exc:
        raise UnreadableForm(UNREADABLE_FORM) from exc
    except LookupError as exc:  # codecs.lookup of the declared charset
        raise UnreadableForm(UNKNOWN_CHARSET) from exc
    except (ValueError, RuntimeError, HttpProcessingError) as exc:  # multipart: no boundary, bad part headers
        raise UnreadableForm(MALFORMED_FORM) from exc


def signed_in(page: Page) -> Handler:
    """Only for a live console session; a POST must also be same-origin and carry its CSRF token."""

    @functools.wraps(page)
    async def handler(request: web.Request) -> web.StreamResponse:
        console = request.app[CONSOLE]
        session = console.sessions.get(request.cookies.get(COOKIE))
        if request.method == "POST":
            try:
                form = await read_form(request)
            except UnreadableForm as exc:
                return render(request, "error.html", status=400, session=None, title="Form not readable",
                              message=exc.message)
            if (not same_origin(request, _public_origin(request)) or session is None
                    or not token_matches(session.csrf, form.get("csrf"))):
                return render(request, "error.html", status=403, session=None, title="Request refused",
                              message="This request did not come from a console page of this gateway (the "
                              "cross-site check failed). Open the console and try again.")
        if session is None:
            raise web.HTTPSeeOther("/console/login")
        return await page(request, session)

    return handler


def _forbidden(request: web.Request, session: ConsoleSession, tenant: str) -> web.Response:
    return render(request, "error.html", status=403, session=session, title="Not your tenant",
                  message=f"Your auditor token is not scoped to tenant {tenant!r}.")


def _tenant_arg(value: str | None) -> str | None:
    return value if value is not None and _TENANT.match(value) else None


async def _tenants(request: web.Request, session: ConsoleSession, *, signed: bool = False) -> list[str]:
    """The tenants this auditor may read that have data; with *signed* (the overview, where
    verification starts), also those with only a signed checkpoint left: a tenant whose rows
    were all deleted is still listed there, and fails its verification."""
    services = request.app[SERVICES]
    store = services.sessions.store
    every = await services.audit.tenants(store) if signed else await store.tenants()
    return [t for t in every if t != SYSTEM_TENANT and session.can_read(t)]


async def _audit(request: web.Request, tenant: str, fields: dict[str, Any]) -> None:
    store = request.app[SERVICES].sessions.store
    await store.transact(tenant, None, lambda cur: Changes(audit=[fields]))


# --- sign in and out ----------------------------------------------------------------------------

async def index(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther("/console/overview")


async def login_form(request: web.Request, error: str | None = None, status: int = 200) -> web.Response:
    import secrets

    token = secrets.token_urlsafe(32)
    response = render(request, "login.html", status=status, session=None, csrf=token, error=error)
    set_cookie(response, request, LOGIN_COOKIE, token, max_age=600, public_origin=_public_origin(request))
    return response


async def login(request: web.Request) -> web.StreamResponse:
    """Sign in with an auditor token posted from the login form (same origin, login CSRF token)."""
    try:
        form = await read_form(request)
    except UnreadableForm as exc:
        return await login_form(request, exc.message, 400)
    if (not same_origin(request, _public_origin(request))
            or not token_matches(request.cookies.get(LOGIN_COOKIE, ""), form.get("csrf"))):
        return await login_form(request, "The sign-in form expired or came from another site. Try again.", 403)
    throttle, address = request.app[CONSOLE].throttle, peer(request)
    wait = throttle.retry_after(address)
    if wait is not None:
        log.warning("console_login_throttled", peer=address)
        response = await login_form(request, f"Too many failed sign-ins from your address. Try again in {wait} "
                                    "seconds.", 429)
        response.headers["Retry-After"] = str(wait)
        return response
    token = form.get("token")
    services = request.app[SERVICES]
    try:
        principal = services.auth.identify(f"Bearer {token}" if isinstance(token, str) else None)
    except (Unauthorized, GatewayError):
        throttle.failed(address)
        log.warning("console_login_failed", peer=address, reason="unknown_token")
        return await login_form(request, "That token is not known to this gateway.", 401)
    if principal.role != "auditor":  # counted like an unknown token: the sign-in must not test keys unthrottled
        throttle.failed(address)
        log.warning("console_login_failed", peer=address, reason="not_an_auditor")
        return await login_form(request, "Only auditor tokens can sign in to the console; client keys cannot.", 403)
    session = request.app[CONSOLE].sessions.create(principal)
    log.info("console_sign_in", auditor=principal.name)
    response = web.HTTPSeeOther("/console/overview")
    set_cookie(response, request, COOKIE, session.id, max_age=IDLE_SECONDS * 16,
               public_origin=_public_origin(request))
    response.del_cookie(LOGIN_COOKIE, path="/console")
    raise response


@signed_in
async def logout(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    request.app[CONSOLE].sessions.drop(session.id)
    response = web.HTTPSeeOther("/console/login")
    response.del_cookie(COOKIE, path="/console")
    raise response


# --- overview -------------------------------------------------------------------------------------

@signed_in
async def overview(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    services = request.app[SERVICES]
    console = request.app[CONSOLE]
    store = services.sessions.store
    cards = []
    for tenant in await _tenants(request, session, signed=True):
        stats = await console.stats.get(store, tenant)
        checkpoints = services.audit.log.for_tenant(tenant)
        cards.append({"tenant": tenant, "stats": stats, "checkpoint": checkpoints[-1] if checkpoints else None,
                      "chart": _chart(stats.days())})
    system = None
    if getattr(session.principal, "tenants", None) is None:
        system = await console.stats.get(store, SYSTEM_TENANT)
    return render(request, "overview.html", session=session, cards=cards, system=system, formats=FORMATS)


COLOURS = ("#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626", "#0891b2", "#4b5563")


def _chart(days: list[tuple[str, Any]]) -> dict[str, Any]:
    """Rounds per day by policy as stacked bars: plain numbers for an inline SVG (no script)."""
    policies = sorted({p for _, counts in days for p in counts})
    colour = {p: COLOURS[i % len(COLOURS)] for i, p in enumerate(policies)}
    top = max((sum(c.values()) for _, c in days), default=0) or 1
    bars = []
    for i, (day, counts) in enumerate(days):
        y = 120.0
        parts = []
        for policy in policies:
            h = 110.0 * counts.get(policy, 0) / top
            if h:
                y -= h
                parts.append({"y": round(y, 2), "h": round(h, 2), "fill": colour[policy], "policy": policy,
                              "n": counts[policy]})
        bars.append({"x": 40 + i * 36, "day": day, "total": sum(counts.values()), "parts": parts})
    return {"bars": bars, "legend": [{"policy": p, "fill": colour[p]} for p in policies], "top": top,
            "width": 40 + 36 * DAYS_SHOWN}


# --- sessions ---------------------------------------------------------------------------------------

@signed_in
async def sessions_page(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    query = request.query
    tenants = await _tenants(request, session)
    tenant = _tenant_arg(query.get("tenant")) or (tenants[0] if tenants else None)
    if tenant is not None and not session.can_read(tenant):
        return _forbidden(request, session, tenant)
    prefix = query.get("q", "").strip()[:128]
    error = None
    since = until = None
    try:
        since = parse_time(query["since"]) if query.get("since") else None
        until = parse_time(query["until"]) if query.get("until") else None
    except ValueError:
        error = "Times are ISO 8601 (2026-01-31T09:00) or Unix timestamps."
    after = query.get("after") or None
    rows: list[Any] = []
    more = False
    if tenant is not None and error is None:
        try:
            after = check_session_id(after) if after else None
        except GatewayError:
            after = None
        rows = await request.app[SERVICES].sessions.page_sessions(tenant, after=after, limit=PAGE + 1,
                                                                  prefix=prefix, since=since, until=until)
        more = len(rows) > PAGE
        rows = rows[:PAGE]
    quarantined = await request.app[SERVICES].sessions.store.quarantined(tenant) if tenant is not None else {}
    return render(request, "sessions.html", session=session, tenants=tenants, tenant=tenant, rows=rows, more=more,
                  q=prefix, since=query.get("since", ""), until=query.get("until", ""), error=error,
                  quarantined=quarantined)


@signed_in
async def session_page(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    """One session's rounds, ``ROUNDS_PER_PAGE`` at a time (``?after=<seq>``), redacted exactly as
    an export redacts them; the read is audited. Redacting and rendering a page (megabytes of
    text, for an imported session) run in a worker thread, never holding up model requests."""
    tenant = _tenant_arg(request.match_info["tenant"])
    if tenant is None:
        return _no_tenant(request, session)
    if not session.can_read(tenant):
        return _forbidden(request, session, tenant)
    try:
        sid = check_session_id(request.match_info["session_id"])
    except GatewayError:
        return render(request, "error.html", status=404, session=session, title="No such session",
                      message="That is not a session id the gateway accepts, so no session has it. Pick a "
                      "session from the Sessions page.")
    after = _seq_arg(request.query.get("after"))
    services = request.app[SERVICES]
    store = services.sessions.store
    current = await store.read_session(tenant, sid)
    if current.session is None and not current.rounds and current.head is None and current.quarantine is None:
        # nothing stored and nothing the chain vouches for: not a read, so nothing is audited (an
        # entry here would start an audit chain for a tenant that never existed)
        return render(request, "error.html", status=404, session=session, title="No such session",
                      message=f"Tenant {tenant!r} has no session {sid!r}.")
    await _audit(request, tenant, {"event": "console_read", "session_id": sid,
                                   "detail": {"auditor": session.principal.name, "view": "session",
                                              **({"after_seq": after} if after else {})}})
    quarantine = current.quarantine
    if quarantine is not None:  # its rows failed a check and no one has released it
        return _quarantined(request, session, tenant, sid, quarantine)
    try:  # the check the gateway runs when it loads a session (a failure quarantines it)
        await services.sessions.check(tenant, sid, for_round=False)
    except IntegrityError as exc:
        log.error("integrity_error", route=route_label(request), tenant=tenant, session_id=sid, detail=exc.detail)
        return _integrity_failure(request, session, tenant, sid, exc)
    redactors = await services.audit.redactors(store, services.policies.current, tenant)
    labels = RoundLabels(lambda after_seq: store.iter_audit(tenant, after_seq=after_seq), session_id=sid)
    page: list[tuple[RoundRow, list[dict[str, Any]], Redactor]] = []
    more = False
    try:
        async for row, messages in services.sessions.decrypted_rounds(tenant, sid, after_seq=after):
            if len(page) == ROUNDS_PER_PAGE:
                more = True
                break
            # the redaction follows the row's policy labels: they must be the ones its audit entry records
            digest = hashlib.sha256(row.ct).hexdigest()
            problem = await labels.problem(tenant=tenant, session_id=sid, seq=row.seq, ciphertext_sha256=digest,
                                           columns=record_columns(row), created_at=row.created_at)
            if problem is not None:
                raise IntegrityError(problem)
            page.append((row, messages, redactors(row, versioned=labels.versioned(sid, digest))))
    except IntegrityError as exc:  # a round that does not open, or whose labels are not its entry's
        log.error("integrity_error", route=route_label(request), tenant=tenant, session_id=sid, detail=exc.detail)
        return _integrity_failure(request, session, tenant, sid, exc)
    if not page:
        return render(request, "error.html", status=404, session=session, title="No such session",
                      message=f"Tenant {tenant!r} has no recorded rounds in session {sid!r}"
                      + (f" after round {after}." if after else "."))

    def rendered() -> web.Response:  # redacting and rendering a page of rounds: in a worker thread
        rounds = []
        for row, messages, redactor in page:
            shown = redactor.redact_messages(messages, legacy=row.kind == "round")  # as the export does
            rounds.append({"row": row, "messages": shown, "sha256": hashlib.sha256(row.ct).hexdigest(),
                           "chars": sum(len(str(m.get("content") or "")) for m in shown), "bytes": len(row.ct)})
        return render(request, "session.html", session=session, tenant=tenant, sid=sid, rounds=rounds, after=after,
                      more=more)
    try:  # the console's own threads, one per auditor at a time: request work keeps asyncio's and its own
        return await work_pool().run(f"auditor:{session.principal.name}", rendered, limit=PAGES_PER_AUDITOR)
    except Busy:
        return _too_many(request, session, "Too many pages loading", f"You already have {PAGES_PER_AUDITOR} session "
                         "pages loading. Wait for them, then load this one again.", retry_after=5)


def _integrity_failure(request: web.Request, session: ConsoleSession, tenant: str, sid: str,
                       exc: IntegrityError) -> web.Response:
    """The page for a session whose stored rows the audit trail does not vouch for: none of its
    rounds are shown (the redaction a round gets depends on the rows). *exc*'s detail names
    tenant, session, round and audit entry, never content."""
    if getattr(exc, "key_unavailable", False):
        return render(request, "error.html", status=500, session=session, title="Session cannot be read",
                      message=f"The data key of session {sid!r} is wrapped by a master key the gateway's key file "
                      f"lacks or has retired ({exc.detail}). The operator restores the key file.")
    return render(request, "error.html", status=500, session=session, title="Session failed its integrity check",
                  message=f"The stored data of session {sid!r} does not match the audit trail, so none of its rounds "
                  f"are shown. What differs: {exc.detail}. Verify tenant {tenant!r} from the overview for the full "
                  "report; the operator restores the rows from a backup and releases the session, or erases it.")


def _quarantined(request: web.Request, session: ConsoleSession, tenant: str, sid: str, reason: str) -> web.Response:
    """The page for a quarantined session: its rows failed a check and no one has released it."""
    return render(request, "error.html", status=500, session=session, title="Session quarantined",
                  message=f"Session {sid!r} is quarantined: its stored data failed an integrity check ({reason}). "
                  "None of its rounds are shown, and the gateway refuses every new round on it, until the operator "
                  f"restores its rows and releases it ('sessiongate sessions release --tenant {tenant} {sid}') or "
                  "erases it. Verify the tenant from the overview for the full report.")


@signed_in
async def audit_entry(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    """The audit entries that carry one request id (a round's entry, and any that name it)."""
    tenant = _tenant_arg(request.match_info["tenant"])
    if tenant is None:
        return _no_tenant(request, session)
    if not session.can_read(tenant):
        return _forbidden(request, session, tenant)
    request_id = request.match_info["request_id"]
    entries = []
    async for row in request.app[SERVICES].sessions.store.iter_audit(tenant):
        fields = entry_fields(row)
        if fields.get("request_id") == request_id:
            entries.append({"row": row, "fields": fields})
    if not entries:
        return render(request, "error.html", status=404, session=session, title="No such audit entry",
                      message=f"No audit entry of tenant {tenant!r} carries request id {request_id[:128]!r}. "
                      "Follow a round's audit link from its session page.")
    return render(request, "audit.html", session=session, tenant=tenant, request_id=request_id, entries=entries)


# --- verify and export -------------------------------------------------------------------------------

EXPLAIN_KINDS = {
    "edited": "was changed after it was written: its content no longer matches its fingerprint",
    "gap": "is missing: entries before it were removed",
    "reordered": "is out of order: entries were moved",
    "inserted": "does not belong to this chain: an entry was added or copied in",
    "bad_link": "does not link to the entry before it: the chain was cut or spliced",
    "truncated": "is missing: the chain ends before a signed checkpoint says it reached",
    "bad_signature": "has a checkpoint whose signature does not hold under the gateway's public key",
    "checkpoint_mismatch": "is not the entry that a signed checkpoint vouched for",
    "forged": "was not written by this gateway: its MAC does not hold under the gateway's key",
    "unauthenticated": "carries no MAC under the gateway's key though entries before it do: it was written "
                       "around the gateway (or by a gateway still on an old version)",
}
DATA_KINDS = {
    "round_missing": "a round the audit trail records is missing from the stored data",
    "round_unrecorded": "a stored round has no entry in the audit trail",
    "round_mismatch": "a stored round differs from the one the audit trail records",
    "state_missing": "a session's stored state is missing though the audit trail says it exists",
    "state_mismatch": "a session's stored state is not the one the audit trail last recorded (rolled back or "
                      "edited)",
    "state_unrecorded": "a session's stored state has no entry in the audit trail",
    "round_relabelled": "a stored round's time, request, policy or outcome was changed from what the audit trail "
                        "records",
    "policy_version_missing": "the policy version a round was recorded under is no longer kept, so its "
                              "redaction and retention would follow another version",
    "policy_version_altered": "the kept copy of the policy version a round was recorded under was edited",
    "quarantine_lifted": "a session the audit trail quarantined is no longer marked quarantined, though no one "
                         "released it through the gateway",
    "quarantine_unrecorded": "a session is marked quarantined without a quarantine in the audit trail",
    "purge_premature": "a retention purge deleted a round before its policy's retention expired it, going by the "
                       "time the audit trail records for the round",
    "data_key_missing": "a session's sealed data is still stored but its data key is gone, so it can no longer be "
                        "read, and the audit trail records no erasure",
    "data_key_mismatch": "a session's data key was replaced by one its data was not sealed under",
    "data_key_altered": "a session's stored data key was altered (it no longer unwraps, or names another master "
                        "key than the audit trail records)",
    "erasure_unmatched": "the audit trail records an erasure as completed that it never records as started: the "
                         "pending erasure was written into the database around the gateway",
}


def explain_report(report: VerifyReport) -> str:
    """A verification result in words an auditor understands."""
    if report.ok:
        data = (f" The stored data matches it ({report.records:,} rounds checked)."
                if report.records is not None else "")
        return (f"The chain of tenant {report.tenant!r} is intact: all {report.entries:,} entries check out, "
                f"and {report.checkpoints} signed checkpoint(s) match.{data}")
    error = report.first_error
    assert error is not None
    if error.kind in DATA_KINDS:
        where = f"session {error.session_id!r}" if getattr(error, "session_id", None) else "a session"
        if getattr(error, "round_seq", None) is not None:
            where += f", round {error.round_seq}"
        return (f"The chain of tenant {report.tenant!r} is intact, but the stored data does not match it. "
                f"The first problem, in {where}: {DATA_KINDS[error.kind]}.")
    what = EXPLAIN_KINDS.get(error.kind)
    if what is None or error.seq is None:
        return f"The chain of tenant {report.tenant!r} does not verify. The first problem: {error.message}."
    return f"The chain of tenant {report.tenant!r} is broken. The first problem: entry #{error.seq} {what}."


@signed_in
async def verify(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    form = await request.post()
    tenant = _tenant_arg(str(form.get("tenant", "")))
    if tenant is None:
        raise web.HTTPSeeOther("/console/overview")
    if not session.can_read(tenant):
        return _forbidden(request, session, tenant)
    services = request.app[SERVICES]

    async def work(job: Job) -> None:
        def data_phase() -> None:
            job.phase = "data"  # the stored rounds and session states against the chain

        job.report = await services.audit.verify(services.sessions.store, tenant, open_key=services.sessions.unwrap,
                                                 watch=lambda rows: Counting(rows.__aiter__(), job),
                                                 on_data=data_phase)
        await _audit(request, tenant, {"event": "verify", "detail": {
            "auditor": session.principal.name, "ok": job.report.ok, "entries": job.report.entries}})

    return _started(request, session, "verify", tenant, {}, work)


@signed_in
async def export(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    form = await request.post()
    tenant = _tenant_arg(str(form.get("tenant", "")))
    fmt = str(form.get("format", "jsonl"))
    if tenant is None or fmt not in FORMATS:
        return render(request, "error.html", status=400, session=session, title="Export not started",
                      message="Choose a tenant and one of the formats jsonl, csv or agently.")
    if not session.can_read(tenant):
        return _forbidden(request, session, tenant)
    try:
        sid = check_session_id(str(form["session"])) if form.get("session") else None
        since = parse_time(str(form["since"])) if form.get("since") else None
        until = parse_time(str(form["until"])) if form.get("until") else None
    except (GatewayError, ValueError):
        return render(request, "error.html", status=400, session=session, title="Export not started",
                      message="The session id or a time is not valid (times: ISO 8601 or Unix timestamps).")
    try:
        check_range(since, until)
    except GatewayError as exc:
        return render(request, "error.html", status=400, session=session, title="Export not started",
                      message=exc.message)
    console = request.app[CONSOLE]
    services = request.app[SERVICES]

    async def work(job: Job) -> None:
        folder = console.jobs.private_folder(job)
        job.out = folder / f"{tenant}-export.{'csv' if fmt == 'csv' else 'jsonl'}"
        job.manifest = await services.audit.export(services.sessions, services.policies.current, job.out,
                                                   tenant=tenant, fmt=fmt, session_id=sid, since=since,
                                                   until=until, progress=JobProgress(job))
        for path in folder.iterdir():
            path.chmod(0o600)
        log.info("export", auditor=session.principal.name, tenant=tenant, session_id=sid, format=fmt, via="console")

    return _started(request, session, "export", tenant, {"format": fmt, "session": sid}, work)


def _started(request: web.Request, session: ConsoleSession, kind: str, tenant: str, params: dict[str, Any],
             work: Callable[[Job], Awaitable[None]]) -> web.StreamResponse:
    """Start *work* as the auditor's job and send the browser to its page; 429 when the auditor
    already has ``MAX_RUNNING_PER_AUDITOR`` running."""
    try:
        job = request.app[CONSOLE].jobs.start(kind, tenant, session.id, session.principal, params, work)
    except TooManyRunning:
        return _too_many(request, session, "Too many jobs running", f"You already have {MAX_RUNNING_PER_AUDITOR} "
                         "verifications or exports running. Wait for one of them to finish, then start this one "
                         "again.", retry_after=10)
    raise web.HTTPSeeOther(f"/console/jobs/{job.id}")


def _too_many(request: web.Request, session: ConsoleSession, title: str, message: str, *,
              retry_after: int) -> web.Response:
    """The 429 page of an auditor who already has as much under way as the console lets one have."""
    response = render(request, "error.html", status=429, session=session, title=title, message=message)
    response.headers["Retry-After"] = str(retry_after)
    return response


def _no_job(request: web.Request, session: ConsoleSession) -> web.Response:
    return render(request, "error.html", status=404, session=session, title="No such job",
                  message="This console session has no job with that id: it was started from another console "
                  "session, dropped (each auditor keeps its 50 latest), or the gateway restarted since. Start it "
                  "again from the overview.")


def _no_bundle(request: web.Request, session: ConsoleSession) -> web.Response:
    return render(request, "error.html", status=404, session=session, title="No bundle to download",
                  message="This job has no bundle to download: it is not an export, it has not finished, it "
                  "failed, or its bundle was deleted. Its job page says which.")


def _no_tenant(request: web.Request, session: ConsoleSession) -> web.Response:
    return render(request, "error.html", status=404, session=session, title="No such tenant",
                  message="That is not a tenant name (letters, digits, '.', '_' and '-', at most 64), so no "
                  "tenant has it. Pick one from the overview.")


@signed_in
async def job_page(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    job = request.app[CONSOLE].jobs.get(request.match_info["job_id"], session.id)
    if job is None:
        return _no_job(request, session)
    summary = explain_report(job.report) if job.report is not None else None
    name = job.out.name + ".tar" if job.out is not None else ""
    return render(request, "job.html", session=session, job=job, summary=summary, bundle=name)


@signed_in
async def job_download(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    job = request.app[CONSOLE].jobs.get(request.match_info["job_id"], session.id)
    if job is None:
        return _no_job(request, session)
    if job.kind != "export" or job.status != "done" or job.out is None:
        return _no_bundle(request, session)
    pool, key = work_pool(), f"auditor:{session.principal.name}"
    try:
        tar = await pool.run(key, job.bundle)
    except OSError:  # deleted under it (an erasure): as gone as a dropped job
        return _no_bundle(request, session)
    try:  # streamed from disk, read off the event loop: one chunk in memory per download, not the bundle
        response = web.StreamResponse(headers={"Content-Type": "application/x-tar",
                                               "Content-Disposition": f'attachment; filename="{job.out.name}.tar"'})
        response.content_length = tar.size
        await response.prepare(request)
        while chunk := await pool.run(key, tar.read_chunk):
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        tar.close()


@signed_in
async def public_key(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    return web.Response(body=request.app[SERVICES].audit.signer.public_key_pem(),
                        content_type="application/x-pem-file",
                        headers={"Content-Disposition": 'attachment; filename="sessiongate-audit.pub"'})


# --- policies --------------------------------------------------------------------------------------

def _applies_to_scope(policy: Any, session: ConsoleSession) -> bool:
    """Whether *policy* can apply to a tenant this auditor may read: always for an unscoped
    auditor; for a scoped one, when the policy matches any tenant or one of its globs matches one
    of the auditor's tenants."""
    scope = session.principal.tenants
    globs = policy.match.tenants
    return scope is None or globs is None or any(fnmatch.fnmatchcase(t, g) for t in scope for g in globs)


def _scoped(session: ConsoleSession) -> bool:
    return session.principal.tenants is not None


@signed_in
async def policies_page(request: web.Request, session: ConsoleSession,
                        explained: dict[str, Any] | None = None, status: int = 200) -> web.StreamResponse:
    """The policies in force that can apply to the auditor's tenants (all, unscoped), their YAML
    and the rounds each recorded in those tenants."""
    services = request.app[SERVICES]
    counts: dict[tuple[str, str], int] = {}
    for tenant in await _tenants(request, session):
        for key, n in (await services.sessions.store.count_rounds_by_policy(tenant)).items():
            counts[key] = counts.get(key, 0) + n
    shown = []
    for policy in services.policies.current:
        if not _applies_to_scope(policy, session):
            continue
        source = policy.source
        text = source.read_text(encoding="utf-8") if source is not None and source.is_file() else ""
        shown.append({"policy": policy, "yaml": text, "file": source.name if source else "",
                      "rounds": counts.get((policy.id, policy.version_hash), 0)})
    scope = session.principal.tenants
    default_tenant = sorted(scope)[0] if scope else "acme"
    return render(request, "policies.html", status=status, session=session, policies=shown,
                  explained=explained or {}, default_tenant=default_tenant)


@signed_in
async def explain_form(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    """What the policies would record and inject for a pasted request. A scoped auditor explains
    only for its tenants (403 otherwise), sees only the policies that can apply to them, and the
    chosen policy's file by name, not its path on the server."""
    from gateway.policy.explain import explain
    from gateway.stages.parse_request import check_chat

    form = await request.post()
    values = {k: str(form.get(k, "")) for k in ("request", "reply", "tenant", "session")}
    result: dict[str, Any] = {"values": values}
    tenant = values["tenant"] or "default"
    if not session.can_read(tenant):
        result["error"] = f"Your auditor token is not scoped to tenant {tenant[:64]!r}: explain for one of yours."
        return await policies_page.__wrapped__(request, session, result, 403)  # type: ignore[attr-defined]
    try:
        body = orjson.loads(values["request"])
        if not isinstance(body, dict):
            raise ValueError("the request must be a JSON object (a chat completion request)")
        check_chat(body)
        reply = orjson.loads(values["reply"]) if values["reply"].strip() else None
        sid = check_session_id(values["session"]) if values["session"] else None
        policies = request.app[SERVICES].policies.current
        report = explain(policies, body, tenant=tenant, session_id=sid, reply=reply)
        if _scoped(session):
            visible_ids = {p.id for p in policies if _applies_to_scope(p, session)}
            report["considered"] = [c for c in report["considered"] if c["policy"] in visible_ids]
            if report["policy"].get("file"):
                report["policy"]["file"] = Path(report["policy"]["file"]).name
        result["report"] = yaml.safe_dump(report, allow_unicode=True, sort_keys=False, width=100)
    except orjson.JSONDecodeError as exc:
        result["error"] = f"Not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})."
    except GatewayError as exc:
        result["error"] = exc.message
    except ValueError as exc:
        result["error"] = str(exc)
    return await policies_page.__wrapped__(request, session, result)  # type: ignore[attr-defined]


# --- wiring ----------------------------------------------------------------------------------------

async def _lifecycle(app: web.Application) -> Any:
    warn_demo_credentials(app[SERVICES].auth)  # the services start first (``app._services``)
    app[SERVICES].sessions.on_erase.append(app[CONSOLE].jobs.erased)  # an erased session leaves no bundle behind
    yield
    await app[CONSOLE].jobs.close()
    close_pool(asyncio.get_running_loop())  # a page still rendering is abandoned: nothing waits for its thread


def form_limited(handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                 ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """*handler* with its form body read under the console's own limit (``auth.form_limit``), not
    ``server.max_body_bytes``: a login form's worth until the browser has a live console
    session, so nobody who has not signed in can make the gateway wait for, or hold, a large
    body. Refused with 413 before the body is read when ``Content-Length`` is over it. (On the
    console's POST routes only: the model routes pay nothing for it.)"""

    @functools.wraps(handler)
    async def limited(request: web.Request) -> web.StreamResponse:
        console = request.app.get(CONSOLE)
        signed_in = console is not None and console.sessions.get(request.cookies.get(COOKIE)) is not None
        limit = form_limit(signed_in)
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"console form posts are at most {limit} bytes"
                                  + ("" if signed_in else " before sign-in"))
        request._client_max_size = limit  # what request.post() reads up to (aiohttp has no setter)
        return await handler(request)

    return limited


def setup(app: web.Application) -> None:
    """Register the console on *app*."""
    app[CONSOLE] = Console()
    app.on_response_prepare.append(_headers)
    app.cleanup_ctx.append(_lifecycle)
    r = app.router
    r.add_get("/console", index)
    r.add_get("/console/", index)
    r.add_get("/console/login", login_form)
    r.add_post("/console/login", form_limited(login))
    r.add_post("/console/logout", form_limited(logout))
    r.add_get("/console/overview", overview)
    r.add_get("/console/sessions", sessions_page)
    r.add_get("/console/sessions/{tenant}/{session_id}", session_page)
    r.add_get("/console/audit/{tenant}/{request_id}", audit_entry)
    r.add_post("/console/verify", form_limited(verify))
    r.add_post("/console/export", form_limited(export))
    r.add_get("/console/jobs/{job_id}", job_page)
    r.add_get("/console/jobs/{job_id}/download", job_download)
    r.add_get("/console/public-key", public_key)
    r.add_get("/console/policies", policies_page)
    r.add_post("/console/policies/explain", form_limited(explain_form))
    r.add_static("/console/static/", HERE / "static", append_version=False)
