"""Typed gateway configuration, validated once at start-up.

``load_settings(path)`` reads a YAML file into :class:`Settings`; any problem raises
``ConfigError`` naming the file, the line and the field (``environment=True``, for ``serve``,
also each environment variable a setting names that is not set). ``with_server_flags`` lays
``serve --host/--port`` over them, validated as the file is. Secrets never sit in the file in
plaintext: client keys and auditor tokens are stored as SHA-256 hashes, and provider keys,
DSNs and master keys come from environment variables the file names. Relative paths are
resolved against the working directory. Nothing here is per-request.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from gateway.diagnostics import (
    Diagnostic,
    Marks,
    at,
    decode_text,
    error_diagnostic,
    format_field,
    parse_yaml,
    yaml_diagnostic,
)
from gateway.errors import ConfigError
from gateway.store.base import SYSTEM_TENANT

DEFAULT_CONFIG = Path("config/sessiongate.yaml")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class _Strict(BaseModel):
    """Base of every settings model: immutable, unknown fields refused, and strict types as the
    policies have (``port: true`` or ``port: "8787"`` is an error, not 1 or 8787; an integer is
    still a valid number of seconds), no infinite or NaN numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    _source: str | None = PrivateAttr(default=None)
    _marks: Marks = PrivateAttr(default_factory=dict)
    _loc: tuple[str | int, ...] = PrivateAttr(default=())

    def _unset_env(self, name: str, variable: str) -> ConfigError:
        """The error for setting *name* naming an environment variable that is not set: at the
        setting's file, line and field when the settings came from a file."""
        loc = (*self._loc, name)
        message = f"environment variable {variable} is not set"
        if self._source is None:
            return ConfigError(message, field=format_field(loc))
        found = at(self._source, self._marks, loc, message)
        return ConfigError(message, file=self._source, line=found.line, column=found.column, field=found.field)


FilePath = Annotated[Path, Field(strict=False)]
"""A path: YAML has no path type, so a string is the way to write one."""


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8787, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0, description="larger request bodies get 413")
    header_timeout: float = Field(10.0, gt=0, description="seconds to receive a request's line and headers")
    body_idle_timeout: float = Field(30.0, gt=0, description="seconds a request body may pause between chunks")
    body_timeout: float = Field(300.0, gt=0, description="seconds to receive a whole request body")
    body_min_rate: int = Field(500, ge=0, description="bytes per second a request body must average once past "
                               "body_rate_grace (one more second per body_min_rate bytes received); slower "
                               "ones get 408. 0 turns the floor off")
    body_rate_grace: float = Field(20.0, gt=0, description="seconds a request body has before body_min_rate "
                                   "applies")
    keepalive_timeout: float = Field(75.0, gt=0, description="seconds an idle keep-alive connection stays open")
    max_connections: int = Field(1024, gt=0, description="open client connections; at the cap idle ones are "
                                 "closed first, then the slowest body still arriving, then new ones get 503")
    shutdown_timeout: float = Field(2.0, ge=0, description="seconds in-flight requests get to finish on shutdown")


_CREDENTIAL = re.compile(r"key|token|secret|passw|signature|^sig$|auth|credential", re.IGNORECASE)
"""Query parameter names that would put a credential in the upstream's URLs."""


class UpstreamSettings(_Strict):
    name: str
    base_url: str = Field(description="the provider's API root, e.g. https://api.openai.com/v1")
    api_key_env: str | None = Field(None, description="environment variable holding the provider key")
    models: list[str] = Field(default_factory=lambda: ["*"], description="glob patterns of model names")
    connect_timeout: float = Field(5.0, gt=0)
    read_timeout: float = Field(120.0, gt=0, description="seconds to the first byte and between bytes")
    max_connections: int = Field(256, gt=0)
    accept_encoding: Literal["identity", "gzip", "deflate", "gzip, deflate"] = Field(
        "identity", description="what the gateway asks the provider for; a compressed reply is decoded either way")
    forward_routes: list[str] = Field(
        default_factory=lambda: ["models", "embeddings", "moderations", "messages/count_tokens"],
        description="forwarded /v1/* routes allowed, as prefixes of whole path segments ('models' allows "
                    "/v1/models and /v1/models/{id}); '*' allows all. Others get 403")
    max_reply_bytes: int = Field(
        8 * 1024 * 1024, gt=0, description="recorded reply cap; past it the client still gets the whole reply "
                                           "and the round is recorded as incomplete (truncated)")
    protocol: Literal["openai", "anthropic"] = Field(
        "openai", description="the wire protocol the upstream speaks: 'openai' (Chat Completions, Responses, "
                              "and the forwarded /v1/* routes) or 'anthropic' (Messages); each model route goes "
                              "to an upstream speaking its protocol")
    key_header: str | None = Field(
        None, pattern=r"^[A-Za-z0-9-]{1,64}$",
        description="the request header that carries the provider key: 'Authorization' sends 'Bearer <key>', "
                    "any other header (x-api-key, Azure's api-key) the key itself. Default: Authorization for "
                    "openai, x-api-key for anthropic")
    responses_state: Literal["gateway", "provider"] = Field(
        "gateway", description="who holds Responses conversation state: gateway (previous_response_id chains "
                               "are sessions in the gateway's encrypted store; store: false upstream) or "
                               "provider (previous_response_id and store go upstream untouched)")
    query: dict[str, str] = Field(
        default_factory=dict,
        description="query parameters sent with every request to this upstream, such as Azure OpenAI's "
                    "{api-version: 2024-10-21}; a forwarded request's own value of one of them is replaced. "
                    "Never a credential: keys go in api_key_env and key_header")

    @field_validator("query")
    @classmethod
    def _query(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not name or not name.isprintable() or not value.isprintable():
                raise ValueError(f"{name[:64]!r}: query parameter names and values are printable text, names "
                                 "not empty")
            if _CREDENTIAL.search(name):
                raise ValueError(f"{name[:64]!r} looks like a credential, which would travel in every URL (and "
                                 "proxies' logs): give the key in api_key_env, sent in key_header")
        return v

    @field_validator("forward_routes")
    @classmethod
    def _routes(cls, v: list[str]) -> list[str]:
        for rule in v:
            parts = rule.split("/")
            if rule != "*" and (not rule or any(p in ("", ".", "..") or not p.isprintable() for p in parts)):
                raise ValueError(f"{rule[:64]!r} is not a route: give path segments after /v1 such as "
                                 "'models' or 'audio/speech', or '*'")
            if parts[0].casefold() in ("sessions", "chat"):
                raise ValueError(f"{rule[:64]!r} is served by the gateway itself and is never forwarded")
        return v

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        parts = urlsplit(v)
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not hold a user or password (the URL would carry a secret): give the key in "
                             "api_key_env")
        if parts.query or parts.fragment or "?" in v or "#" in v:
            raise ValueError("must end with the path (paths are appended to it): give fixed query parameters, "
                             "such as Azure's api-version, in the upstream's query setting")
        return v.rstrip("/")

    def key_headers(self) -> dict[str, str]:
        """The header carrying the provider key, as the upstream expects it (``{}`` without a key).

        ``Authorization`` carries ``Bearer <key>``; any other ``key_header`` the key itself.
        Raises ConfigError like :meth:`api_key`."""
        key = self.api_key()
        if key is None:
            return {}
        header = self.key_header or ("x-api-key" if self.protocol == "anthropic" else "Authorization")
        return {header: f"Bearer {key}" if header.lower() == "authorization" else key}

    def api_key(self) -> str | None:
        """The provider key from the environment; ConfigError when the variable is unset."""
        if self.api_key_env is None:
            return None
        value = os.environ.get(self.api_key_env)
        if not value:
            raise self._unset_env("api_key_env", self.api_key_env)
        return value


TENANT_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
"""What a tenant name may be (clients' ``tenant``; checked again wherever a tenant comes from a request)."""
RESERVED_TENANT = (f"tenant {SYSTEM_TENANT!r} is the gateway's own audit chain (policy reloads, key rotations): "
                   "a client's rounds there would mix with them and be hidden from the console's tenant lists; "
                   "pick another name")


class ClientSettings(_Strict):
    name: str
    tenant: str = Field(pattern=TENANT_PATTERN)
    key_sha256: str | None = Field(None, description="hex SHA-256 of the client key")
    key_env: str | None = Field(None, description="or: environment variable holding the key itself")

    @field_validator("tenant")
    @classmethod
    def _not_reserved(cls, tenant: str) -> str:
        if tenant == SYSTEM_TENANT:
            raise ValueError(RESERVED_TENANT)
        return tenant

    @model_validator(mode="after")
    def _one_source(self) -> ClientSettings:
        if (self.key_sha256 is None) == (self.key_env is None):
            raise ValueError("give exactly one of key_sha256 or key_env")
        if self.key_sha256 is not None and not _HEX64.match(self.key_sha256):
            raise ValueError("key_sha256 must be 64 lower-case hex digits (sessiongate clients new prints one)")
        return self

    def digest(self) -> str:
        if self.key_sha256 is not None:
            return self.key_sha256
        assert self.key_env is not None
        value = os.environ.get(self.key_env)
        if not value:
            raise self._unset_env("key_env", self.key_env)
        return hashlib.sha256(value.encode()).hexdigest()


class AuditorSettings(_Strict):
    name: str
    token_sha256: str
    tenants: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]] | None = Field(
        None, description="tenants this auditor may export and verify; omitted: every tenant")

    @field_validator("token_sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not _HEX64.match(v):
            raise ValueError("must be 64 lower-case hex digits")
        return v


class StoreSettings(_Strict):
    backend: Literal["sqlite", "postgres"] = "sqlite"
    path: FilePath = Path(".sessiongate/sessiongate.db")
    dsn: str | None = Field(None, description="PostgreSQL DSN (prefer dsn_env for passwords)")
    dsn_env: str | None = None
    schema_name: str = Field("public", alias="schema", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    pool_size: int = Field(10, gt=0)
    purge_interval_seconds: float = Field(3600.0, gt=0, description="how often retention purges run")

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False, populate_by_name=True)

    def postgres_dsn(self) -> str:
        if self.dsn_env:
            value = os.environ.get(self.dsn_env)
            if not value:
                raise self._unset_env("dsn_env", self.dsn_env)
            return value
        if self.dsn:
            return self.dsn
        raise ConfigError("backend postgres needs dsn or dsn_env", field="store")


class KeySettings(_Strict):
    master_key_file: FilePath | None = Path(".sessiongate/master-keys.json")
    master_key_env: str | None = None

    def check_env(self) -> None:
        """Raise ConfigError (file, line, field) when ``master_key_env`` names an unset variable."""
        if self.master_key_env and not os.environ.get(self.master_key_env):
            raise self._unset_env("master_key_env", self.master_key_env)


class PolicySettings(_Strict):
    path: FilePath = Path("policies")
    reload_interval: float = Field(0.5, gt=0)
    hook_modules: list[str] = Field(default_factory=list, description=(
        "modules policy hooks may come from (names or globs, e.g. myhooks, myhooks.*); "
        "empty: policies with hooks are refused"))


class AuditSettings(_Strict):
    signing_key_file: FilePath = Path(".sessiongate/audit-signing.key")
    checkpoint_file: FilePath = Path(".sessiongate/checkpoints.jsonl")
    checkpoint_every: int = Field(1000, gt=0)
    checkpoint_seconds: float = Field(60.0, gt=0)
    export_secret_env: str | None = Field(None, description="env variable with the pseudonym secret")


class LoggingSettings(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class TracingSettings(_Strict):
    """OpenTelemetry tracing (``pip install 'sessiongate[otel]'``). Off unless ``endpoint`` is set
    here or ``OTEL_EXPORTER_OTLP_ENDPOINT``/``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set in the
    environment; ``OTEL_SDK_DISABLED=true`` turns it off whatever is configured. The standard
    ``OTEL_*`` variables (service name, resource attributes, headers, sampler) are honoured where
    this section leaves a value unset."""

    endpoint: str | None = Field(None, description="OTLP/HTTP traces endpoint, e.g. http://collector:4318/v1/traces")
    service_name: str | None = Field(None, description="service.name (default: OTEL_SERVICE_NAME, else sessiongate)")
    sample_ratio: float | None = Field(None, ge=0.0, le=1.0,
                                       description="share of new traces sampled (default: OTEL_TRACES_SAMPLER, "
                                       "else all); a sampled parent is always followed")


class ConsoleSettings(_Strict):
    """The auditor console (``/console``)."""

    public_origin: str | None = Field(
        None, description="the origin browsers reach the console at behind a TLS-terminating reverse proxy, "
                          "e.g. https://audit.example.com: sign-in and every console form must come from it, and "
                          "the session cookie is Secure when it is https. Unset: the scheme and Host the "
                          "gateway itself sees")

    @field_validator("public_origin")
    @classmethod
    def _origin(cls, v: str | None) -> str | None:
        if v is None:
            return None
        parts = urlsplit(v)
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"{v[:100]!r} has a port that is not a number from 0 to 65535") from None
        host = parts.hostname or ""  # lower case, an IPv6 literal without its brackets
        host_ok = re.fullmatch(r"[a-z0-9.-]+", host) is not None or (
            ":" in host and re.fullmatch(r"[0-9a-f:.]+", host) is not None)
        if port == 0:
            raise ValueError(f"{v[:100]!r} has port 0, which no browser connects to")
        if parts.scheme not in ("http", "https") or not host_ok or not v.isascii() or not v.isprintable():
            raise ValueError(f"{v[:100]!r} is not an origin: give scheme and host as a browser shows them, such as "
                             "https://audit.example.com (a non-ASCII host in its xn-- form)")
        if parts.username is not None or parts.password is not None or parts.path not in ("", "/") \
                or parts.query or parts.fragment or "?" in v or "#" in v:
            raise ValueError(f"{v[:100]!r} is not an origin: only scheme, host and port, with no user, path, "
                             "query or fragment (the console is always served at /console)")
        default = 443 if parts.scheme == "https" else 80
        shown = host if ":" not in host else f"[{host}]"
        return f"{parts.scheme}://{shown}" + (f":{port}" if port is not None and port != default else "")


class MetricsSettings(_Strict):
    """``GET /metrics`` (Prometheus text)."""

    token_sha256: str | None = Field(
        None, description="SHA-256 (hex) of a bearer token /metrics then requires (Prometheus: "
                          "authorization.credentials); unset: /metrics needs no key, so bind it where only the "
                          "scraper reaches it (it names tenants and models with their token usage)")

    @field_validator("token_sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and not _HEX64.match(v):
            raise ValueError("must be 64 lower-case hex digits (printf %s TOKEN | sha256sum)")
        return v


class Settings(_Strict):
    server: ServerSettings = ServerSettings()
    upstreams: list[UpstreamSettings] = Field(default_factory=list)
    clients: list[ClientSettings] = Field(default_factory=list)
    auditors: list[AuditorSettings] = Field(default_factory=list)
    store: StoreSettings = StoreSettings()
    keys: KeySettings = KeySettings()
    policies: PolicySettings = PolicySettings()
    audit: AuditSettings = AuditSettings()
    logging: LoggingSettings = LoggingSettings()
    tracing: TracingSettings = TracingSettings()
    console: ConsoleSettings = ConsoleSettings()
    metrics: MetricsSettings = MetricsSettings()
    source: str = Field("<defaults>", exclude=True, description="the file these settings came from")

    @model_validator(mode="after")
    def _unique(self) -> Settings:
        names = [u.name for u in self.upstreams]
        if len(set(names)) != len(names):
            raise ValueError("upstream names must be unique")
        return self


def parse_settings(text: str, source: str, *, environment: bool = False) -> Settings:
    """Validate configuration text. ConfigError names *source*, line, column and field of the
    first finding, and lists every other one on a line of its own, in the order of the file:
    each repeated key, each unknown field (with the allowed ones), each wrong value, and with
    *environment* each environment variable a setting names that is not set (what ``serve``
    needs; other commands read no provider or client key)."""
    try:
        data, marks, duplicates = parse_yaml(text)
    except yaml.MarkedYAMLError as exc:
        found = yaml_diagnostic(source, exc)
        raise ConfigError(found.message, file=source, line=found.line, column=found.column) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the file must hold a mapping of settings", file=source, line=1, column=1)
    findings = [Diagnostic("error", source, line, column, format_field(loc), f"duplicate key {loc[-1]!r}")
                for loc, (line, column) in duplicates]
    if environment:  # read from the file as written, so they are listed even beside invalid values
        findings += _unset_variables(data, source, marks)
    settings = None
    try:
        settings = Settings.model_validate({**data, "source": source})
    except ValidationError as exc:
        findings += [error_diagnostic(source, marks, data, err, Settings) for err in exc.errors(include_url=False)]
    if settings is not None:
        _locate(settings, source, marks)
        findings += _credential_clashes(settings, source, marks)
    if findings or settings is None:
        first, *rest = sorted(findings, key=lambda d: (d.line or 0, d.column or 0))
        raise ConfigError(first.message, file=source, line=first.line, column=first.column,
                          field=first.field or None, also=[_plain(d) for d in rest])
    return settings


def _unset_variables(data: dict[str, object], source: str, marks: Marks) -> list[Diagnostic]:
    """Each ``api_key_env``, client ``key_env``, ``keys.master_key_env`` and (for PostgreSQL)
    ``store.dsn_env`` in *data* that names an unset or empty environment variable, at its line."""
    def section(value: object) -> dict[str, object]:
        return value if isinstance(value, dict) else {}

    def items(value: object) -> list[dict[str, object]]:
        return [section(item) for item in value] if isinstance(value, list) else []

    named: list[tuple[tuple[str | int, ...], object]] = [
        (("upstreams", i, "api_key_env"), up.get("api_key_env")) for i, up in enumerate(items(data.get("upstreams")))]
    named += [(("clients", i, "key_env"), client.get("key_env"))
              for i, client in enumerate(items(data.get("clients")))]
    named.append((("keys", "master_key_env"), section(data.get("keys")).get("master_key_env")))
    if section(data.get("store")).get("backend") == "postgres":
        named.append((("store", "dsn_env"), section(data.get("store")).get("dsn_env")))
    return [at(source, marks, loc, f"environment variable {variable} is not set; export it before starting the "
               "gateway") for loc, variable in named if isinstance(variable, str) and variable
            and not os.environ.get(variable)]


def with_server_flags(settings: Settings, **flags: object) -> Settings:
    """*settings* with the ``server`` values given on the command line (``--host``, ``--port``;
    None: not given) in place of the file's, validated as the file's are. ConfigError naming
    each flag and what is wrong with its value (``--port 70000: Input should be less than or
    equal to 65535``)."""
    given = {name: value for name, value in flags.items() if value is not None}
    if not given:
        return settings
    try:
        server = ServerSettings.model_validate({**settings.server.model_dump(), **given})
    except ValidationError as exc:
        problems = [f"--{err['loc'][0]} {given[str(err['loc'][0])]}: {err['msg']} (as server.{err['loc'][0]} "
                    "in the configuration)" for err in exc.errors(include_url=False)]
        raise ConfigError(problems[0], also=problems[1:]) from None
    return settings.model_copy(update={"server": server})


def _locate(settings: Settings, source: str, marks: Marks) -> None:
    """Tell the sections that read environment variables where they are in the file, so an unset
    variable is reported at its line."""
    sections: list[tuple[_Strict, tuple[str | int, ...]]] = [(settings.store, ("store",)), (settings.keys, ("keys",))]
    sections += [(upstream, ("upstreams", i)) for i, upstream in enumerate(settings.upstreams)]
    sections += [(client, ("clients", i)) for i, client in enumerate(settings.clients)]
    for section, loc in sections:
        if loc[:1] in marks:  # a section the file leaves out is the shared default: nothing to point at
            section._source, section._marks, section._loc = source, marks, loc


def _credential_clashes(settings: Settings, source: str, marks: Marks) -> list[Diagnostic]:
    """A client key or auditor token listed twice (the same SHA-256): authentication keeps one
    entry per key, so the later would silently win and one tenant's traffic be recorded under
    another's (or a client key be an auditor's token). A ``key_env`` client is compared by its
    variable's key when the variable is set (unset, start-up refuses it anyway)."""
    found: list[Diagnostic] = []
    first: dict[str, tuple[str, str]] = {}  # digest -> (where it was first listed, whose)
    entries: list[tuple[tuple[str | int, ...], str | None, str]] = []
    for i, client in enumerate(settings.clients):
        if client.key_sha256 is not None:
            entries.append((("clients", i, "key_sha256"), client.key_sha256, f"tenant {client.tenant!r}"))
        elif client.key_env and os.environ.get(client.key_env):
            digest = hashlib.sha256(os.environ[client.key_env].encode()).hexdigest()
            entries.append((("clients", i, "key_env"), digest, f"tenant {client.tenant!r}"))
    for i, auditor in enumerate(settings.auditors):
        entries.append((("auditors", i, "token_sha256"), auditor.token_sha256, "an auditor"))
    if settings.metrics.token_sha256 is not None:
        entries.append((("metrics", "token_sha256"), settings.metrics.token_sha256, "the metrics scraper"))
    names: dict[str, int] = {}
    for i, auditor in enumerate(settings.auditors):  # the console keeps its limits per auditor name
        if auditor.name in names:
            found.append(at(source, marks, ("auditors", i, "name"), f"auditor name {auditor.name!r} is also "
                            f"auditors[{names[auditor.name]}]'s: each auditor token needs a name of its own (the "
                            "audit trail and the console's per-auditor limits tell auditors apart by it)"))
        names.setdefault(auditor.name, i)
    for loc, listed, whose in entries:
        if listed is None:
            continue
        if listed in first:
            where, other = first[listed]
            found.append(at(source, marks, loc, f"same key as {where} ({other}), listed here for {whose}: a client "
                            "key or auditor token may be listed once (the gateway would take every request with it "
                            "as this entry's, recording one tenant's traffic under another); give one of them a new "
                            "key ('sessiongate clients new')"))
        else:
            first[listed] = (format_field(loc[:2]), whose)
    return found


def _plain(found: Diagnostic) -> str:
    """``file:line:column: field: message``, as :class:`ConfigError` puts its first finding."""
    return str(found).replace(": error: ", ": ", 1)


def load_settings(path: Path | None, *, environment: bool = False) -> Settings:
    """Read and validate the configuration file (the example config when *path* is None);
    *environment*: as for :func:`parse_settings`."""
    path = path or DEFAULT_CONFIG
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError("configuration file not found (pass --config FILE)", file=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc}", file=str(path)) from None
    text = decode_text(str(path), raw)
    if isinstance(text, Diagnostic):
        raise ConfigError(text.message, file=text.file, line=text.line, column=text.column)
    return parse_settings(text, str(path), environment=environment)
