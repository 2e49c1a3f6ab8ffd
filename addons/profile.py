"""Profiles: the YAML schema, strict validation with file/line errors, and the env overrides.

A profile is parsed into an immutable `Profile` (pydantic, unknown keys refused), then turned
into the flat options of the addons (`to_options`), which is all the addons ever read. So an
addon loaded alone with `--set` and the same addon driven by a profile behave identically.

    load("profiles/prod.yaml", os.environ) -> Profile     # raises ProfileError listing every problem
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from addons.kernel.units import format_duration, parse_duration, parse_size

Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
Port = Annotated[int, Field(ge=0, le=65535)]


def _network(value: Any) -> str:
    try:
        return str(ipaddress.ip_network(str(value), strict=False))
    except ValueError as e:
        raise ValueError(f"not an IP network in CIDR form (e.g. 10.0.0.0/8): {e}") from None


Network = Annotated[str, BeforeValidator(_network)]


def _port_spec(value: Any) -> str:
    text = str(value).strip()
    low, _, high = text.partition("-")
    try:
        ports = [int(low)] + ([int(high)] if high else [])
    except ValueError:
        raise ValueError("expected a port (443) or a range (8000-8999)") from None
    if not all(1 <= p <= 65535 for p in ports) or ports != sorted(ports):
        raise ValueError("ports go from 1 to 65535, ranges low-high")
    return text


PortSpec = Annotated[str, BeforeValidator(_port_spec)]

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _method(value: Any) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise ValueError(
            "an HTTP method is a token such as TRACE (letters, digits, !#$%&'*+.^_`|~-)"
        )
    return value.upper()


Method = Annotated[str, BeforeValidator(_method)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Section):
    connect: Duration = 10.0
    read: Duration = 60.0


class Tls(_Section):
    """The certificate reverse listeners serve to TLS clients (addons/tlslistener.py).

    The files are checked here too (readable, PEM, the key belongs to the certificate), so
    validate-config and a reload point at the line of the file that is wrong.
    """

    cert: str | None = None
    key: str | None = None
    chain: str | None = None

    @field_validator("cert")
    @classmethod
    def _cert(cls, v: str | None) -> str | None:
        if v:
            _tls().load_certificates(v, "cert")
        return v

    @field_validator("key")
    @classmethod
    def _key(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v:
            tls = _tls()
            tls.load_private_key(v)
            if info.data.get("cert"):
                tls.load_keypair(info.data["cert"], v)
        return v

    @field_validator("chain")
    @classmethod
    def _chain(cls, v: str | None) -> str | None:
        if v:
            _tls().load_certificates(v, "chain")
        return v

    @model_validator(mode="after")
    def _both(self) -> Tls:
        if (self.cert or self.key or self.chain) and not (self.cert and self.key):
            raise ValueError("a TLS listener needs both cert and key")
        return self


def _tls() -> Any:
    # Imported when used: it pulls in OpenSSL, which profiles without TLS never need.
    from addons import tlslistener

    return tlslistener


class Server(_Section):
    host: str = "127.0.0.1"
    port: Port = 8080
    shutdown_timeout: Duration = 30.0
    timeouts: Timeouts = Timeouts()
    tls: Tls = Tls()


class Logging(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    output: Literal["stdout", "file"] = "stdout"
    file: str | None = None

    @model_validator(mode="after")
    def _file_needed(self) -> Logging:
        if self.output == "file" and not self.file:
            raise ValueError("output: file needs logging.file (the path to write to)")
        return self


class Metrics(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 9090
    path: str = "/metrics"

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with /")
        return v


class Limits(_Section):
    max_url_length: Annotated[int, Field(gt=0)] = 8192
    max_header_size: Size = 16384
    max_headers_count: Annotated[int, Field(gt=0)] = 100
    max_body_size: Size = 10 * 1024 * 1024
    header_timeout: Duration = 10.0
    blocked_methods: list[Method] = ["TRACE", "TRACK"]


class Egress(_Section):
    connect_ports: list[PortSpec] = ["443"]
    block_private: bool = True
    allowed_networks: list[Network] = []


class TlsInterception(_Section):
    hosts: list[str] = []


Mode = Literal["enforce", "shadow"]
# Rule ids become metric labels and quoted policy names in RateLimit headers.
RuleId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]


class Acl(_Section):
    allowed_ips: list[Network] = []
    denied_ips: list[Network] = []
    mode: Mode = "enforce"


class RateLimitRule(_Section):
    id: RuleId
    host: str | None = None
    path: str | None = None
    requests_per_second: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    burst: Annotated[int, Field(ge=0)] = 0
    mode: Mode | None = None

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"(\*\.)?[A-Za-z0-9_.-]+", v):
            raise ValueError("a host name, or *.example.com for every subdomain")
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError("a path prefix starting with /")
        return v

    @model_validator(mode="after")
    def _matches_something(self) -> RateLimitRule:
        if self.host is None and self.path is None:
            raise ValueError("a rule needs a host or a path (or both)")
        return self


class RateLimiting(_Section):
    requests_per_second: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0
    burst: Annotated[int, Field(ge=0)] = 0
    mode: Mode = "enforce"
    exempt: list[Network] = []
    max_connections_per_ip: Annotated[int, Field(ge=0)] = 0
    max_clients: Annotated[int, Field(ge=1)] = 100_000
    rules: list[RateLimitRule] = []

    @field_validator("rules")
    @classmethod
    def _unique_ids(cls, v: list[RateLimitRule]) -> list[RateLimitRule]:
        ids = [r.id for r in v]
        dup = sorted({i for i in ids if ids.count(i) > 1 or i == "default"})
        if dup:
            raise ValueError(f"rule ids must be unique and not 'default': {', '.join(dup)}")
        return v


def _header_value(value: Any) -> str:
    if not isinstance(value, str) or any(c < " " or c == "\x7f" for c in value):
        raise ValueError("a header value: text without control characters (empty turns it off)")
    return value.strip()


HeaderValue = Annotated[str, BeforeValidator(_header_value)]


class SecurityHeaders(_Section):
    enabled: bool = False
    hsts: HeaderValue = "max-age=31536000; includeSubDomains"
    content_type_options: Literal["nosniff", ""] = "nosniff"
    frame_options: Literal["DENY", "SAMEORIGIN", ""] = "DENY"
    content_security_policy: HeaderValue = ""
    override: bool = False

    @field_validator("hsts")
    @classmethod
    def _hsts(cls, v: str) -> str:
        if v and not re.match(r"(?i)\s*max-age=\d+\s*(;|$)", v):
            raise ValueError("HSTS starts with max-age=<seconds> (RFC 6797 §6.1)")
        return v


PolicyMode = Literal["enforce", "shadow"]


def _policy_mode(value: Any) -> Any:
    if value in ("blocklist", "allowlist", "mixed"):
        raise ValueError(f"mode is enforce or shadow; {value} goes in list_mode")
    return value


class FilterFile(_Section):
    path: str
    id: str | None = None  # the rule id (metric label); default: the file name without suffix
    list: Literal["blocked", "allowed"] = "blocked"
    mode: PolicyMode | None = None  # default: the policy's mode


def _file_spec(value: Any) -> Any:
    return {"path": value} if isinstance(value, str) else value


class FilterDomains(_Section):
    blocked: list[str] = []
    allowed: list[str] = []
    files: list[Annotated[FilterFile, BeforeValidator(_file_spec)]] = []


class FilterResponse(_Section):
    body: str = ""  # the message of the 403 JSON error; empty: a default naming host and rule


class Filtering(_Section):
    mode: Annotated[PolicyMode, BeforeValidator(_policy_mode)] = "enforce"
    list_mode: Literal["blocklist", "allowlist", "mixed"] = "blocklist"
    domains: FilterDomains = FilterDomains()
    ip_literals: Literal["allow", "deny", "check"] = "check"
    check_sni: bool = True
    reload_interval: Duration = 2.0
    response: FilterResponse = FilterResponse()


class ContentFiltering(_Section):
    mode: PolicyMode = "enforce"
    blocked_types: list[str] = []
    check_request: bool = False


class Security(_Section):
    trusted_proxies: list[Network] = []
    egress: Egress = Egress()
    tls_interception: TlsInterception = TlsInterception()
    acl: Acl = Acl()
    rate_limiting: RateLimiting = RateLimiting()
    headers: SecurityHeaders = SecurityHeaders()
    filtering: Filtering = Filtering()
    content_filtering: ContentFiltering = ContentFiltering()


class Headers(_Section):
    x_forwarded: bool = True
    via: bool = True
    request_id: bool = True
    proxy_id: str = "waypost"


class Admin(_Section):
    token: str = ""


def _command_path(value: Any) -> str:
    text = str(value)
    if not text.startswith("/") or text != os.path.normpath(text):
        raise ValueError("must be a normalised absolute path such as /usr/bin/uptime")
    return text


def _env_name(value: Any) -> str:
    text = str(value)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text):
        raise ValueError("not an environment variable name")
    return text


class CliArgumentRule(_Section):
    """Per-command argument rules (cli.argument_rules; cli.py validates cli_argument_rules with
    it too)."""

    prefix: list[str] = []  # fixed arguments always placed before the client's
    patterns: list[str] = []  # every client argument must fully match one of these
    max_args: Annotated[int, Field(ge=0)] | None = None

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"pattern {p!r} is not a regular expression: {e}") from None
        return v

    @field_validator("prefix")
    @classmethod
    def _no_nul(cls, v: list[str]) -> list[str]:
        if any("\0" in a for a in v):
            raise ValueError("prefix arguments cannot contain NUL")
        return v


class Cli(_Section):
    enabled: bool = False
    token: str = ""
    allowed_commands: list[Annotated[str, BeforeValidator(_command_path)]] = []
    argument_rules: dict[str, CliArgumentRule] = {}
    env_allowlist: list[Annotated[str, BeforeValidator(_env_name)]] = []
    max_concurrent: Annotated[int, Field(ge=1)] = 10
    process_timeout: Duration = 30.0
    grace_period: Duration = 5.0
    max_memory_per_process: Size = 512 * 1024 * 1024
    max_cpu_time: Duration = 60.0
    max_file_size: Size = 64 * 1024 * 1024
    max_processes: Annotated[int, Field(ge=0)] = 64
    max_output_bytes: Size = 10 * 1024 * 1024
    working_directory: str = "/"
    run_as_user: str = "nobody"
    heartbeat_interval: Duration = 10.0

    @model_validator(mode="after")
    def _rules_name_commands(self) -> Cli:
        names = {c for p in self.allowed_commands for c in (p, p.rsplit("/", 1)[-1])}
        for name in self.argument_rules:
            if name not in names:
                raise ValueError(f"argument_rules: {name!r} is not in allowed_commands")
        if self.process_timeout <= 0 or self.heartbeat_interval <= 0:
            raise ValueError("process_timeout and heartbeat_interval must be more than 0s")
        return self


def _rules_json(rules: dict[str, CliArgumentRule]) -> str:
    return json.dumps({k: v.model_dump() for k, v in rules.items()}) if rules else ""


# Text formats that compress well. text/event-stream is left out on purpose: it is meant to be
# streamed, and held whole it would arrive all at once anyway.
COMPRESSIBLE_TYPES = [
    "text/html",
    "text/plain",
    "text/css",
    "text/javascript",
    "text/xml",
    "text/csv",
    "text/markdown",
    "application/json",
    "application/javascript",
    "application/xml",
    "application/xhtml+xml",
    "application/rss+xml",
    "application/atom+xml",
    "application/ld+json",
    "application/manifest+json",
    "application/problem+json",
    "application/wasm",
    "image/svg+xml",
    "*/*+json",
    "*/*+xml",
]


class CompressionLevels(_Section):
    gzip: Annotated[int, Field(ge=1, le=9)] = 4
    br: Annotated[int, Field(ge=0, le=11)] = 3
    zstd: Annotated[int, Field(ge=1, le=19)] = 3


class Compression(_Section):
    # Opt-in, as in nginx, Envoy and Traefik: a forward proxy that rewrites bodies surprises.
    enabled: bool = False
    algorithms: list[Literal["zstd", "br", "gzip"]] = ["zstd", "br", "gzip"]
    levels: CompressionLevels = CompressionLevels()
    min_size: Size = 1024
    content_types: list[str] = COMPRESSIBLE_TYPES
    offload_threshold: Size = 32 * 1024
    memo_size: Size = 16 * 1024 * 1024

    @field_validator("algorithms")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a coding is listed twice")
        return v


class Cache(_Section):
    enabled: bool = True
    max_memory: Annotated[int, BeforeValidator(parse_size), Field(gt=0)] = 256 * 1024 * 1024
    max_entries: Annotated[int, Field(gt=0)] = 10000
    max_object_size: Annotated[int, BeforeValidator(parse_size), Field(gt=0)] = 1024 * 1024
    default_ttl: Duration = 300.0
    mode: Literal["rfc", "default_ttl"] = "rfc"
    patterns: list[str] = []
    coalesce_timeout: Duration = 5.0
    max_waiters: Annotated[int, Field(ge=0)] = 100
    surrogate: bool = True
    surrogate_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")] = "waypost"
    stale_on_error: bool = False

    @model_validator(mode="after")
    def _object_fits(self) -> Cache:
        if self.max_object_size > self.max_memory:
            raise ValueError("max_object_size must not be larger than max_memory")
        return self


_ROUTE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


def _backend_url(value: Any) -> str:
    """`http://host[:port]` or `https://...`, no path: a backend the router connects to."""
    from urllib.parse import urlsplit

    text = str(value).strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"not a backend URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("a backend is a URL such as http://10.0.0.5:8080 (http or https)")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError("a backend URL has no path, query or credentials (http://host:port)")
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{shown}:{port or (443 if parts.scheme == 'https' else 80)}"


BackendUrl = Annotated[str, BeforeValidator(_backend_url)]


def _route_id(value: Any) -> str:
    if not isinstance(value, str) or not _ROUTE_ID.fullmatch(value):
        raise ValueError("an id is 1-64 letters, digits and _.:- (it becomes a metric label)")
    return value


RouteId = Annotated[str, BeforeValidator(_route_id)]


def _methods(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _host_pattern(value: Any) -> str:
    text = str(value).strip().lower().rstrip(".")
    body = text[2:] if text.startswith("*.") else text
    if text != "*" and (not body or "*" in body or "/" in body or " " in body):
        raise ValueError("a host is a name (api.example.com), *.example.com or *")
    return text


def _path_pattern(value: Any) -> str:
    text = str(value)
    if not text.startswith("/"):
        raise ValueError(
            "a path starts with / (a prefix such as /api, or a glob such as /static/*)"
        )
    return text


class HeaderMatch(_Section):
    name: Annotated[str, Field(min_length=1, pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")]
    value: str | None = None
    regex: str | None = None

    @model_validator(mode="after")
    def _one_way(self) -> HeaderMatch:
        if self.value is not None and self.regex is not None:
            raise ValueError("a header match has a value or a regex, not both")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as e:
                raise ValueError(f"regex {self.regex!r} does not compile: {e}") from None
        return self


class RouteMatch(_Section):
    host: Annotated[str, BeforeValidator(_host_pattern)] | None = None
    path: Annotated[str, BeforeValidator(_path_pattern)] | None = None
    headers: list[HeaderMatch] = []
    method: Annotated[list[Method], BeforeValidator(_methods)] = []


class BackendSpec(_Section):
    url: BackendUrl
    weight: Annotated[int, Field(ge=1, le=1000)] = 1
    name: RouteId | None = None


class RouteForward(_Section):
    target: BackendUrl | None = None
    backends: list[BackendSpec] = []
    strategy: Literal["round_robin", "weighted_round_robin", "least_connections"] = "round_robin"
    strip_prefix: Annotated[str, BeforeValidator(_path_pattern)] | None = None
    timeout: Duration | None = None
    preserve_host: bool = False

    @model_validator(mode="after")
    def _one_target(self) -> RouteForward:
        if (self.target is None) == (not self.backends):
            raise ValueError("forward needs either target (one URL) or backends (a pool)")
        return self


class RouteRule(_Section):
    name: RouteId | None = None
    match: RouteMatch = RouteMatch()
    forward: RouteForward
    cache: bool | None = None


class Listener(_Section):
    # forward: the forward proxy (server.host/server.port unless given); reverse: every
    # request is routed by routing.rules / routing.default_backend.
    mode: Literal["forward", "reverse"] = "reverse"
    host: str | None = None
    port: Port | None = None


class Retries(_Section):
    max_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    backoff: Duration = 0.025
    max_backoff: Duration = 1.0
    budget_percent: Annotated[float, Field(ge=0, le=100)] = 20.0
    budget_min: Annotated[int, Field(ge=0)] = 3


class Routing(_Section):
    listeners: list[Listener] = []
    default_backend: BackendUrl | None = None
    rules: list[RouteRule] = []
    retries: Retries = Retries()

    @model_validator(mode="after")
    def _consistent(self) -> Routing:
        names = [r.name for r in self.rules if r.name]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"rule names must be unique: {', '.join(dup)}")
        reverse = [x for x in self.listeners if x.mode == "reverse"]
        if reverse and not (self.default_backend or self.rules):
            raise ValueError("a reverse listener needs routing.rules or routing.default_backend")
        if any(x.mode == "reverse" and x.port is None for x in self.listeners):
            raise ValueError("a reverse listener needs a port")
        return self


class HealthChecks(_Section):
    enabled: bool = True
    interval: Duration = 10.0
    timeout: Duration = 2.0
    path: Annotated[str, BeforeValidator(_path_pattern)] = "/health"
    unhealthy_threshold: Annotated[int, Field(ge=1)] = 3
    healthy_threshold: Annotated[int, Field(ge=1)] = 2


class CircuitBreaker(_Section):
    enabled: bool = True
    failure_threshold: Annotated[int, Field(ge=1)] = 5
    timeout: Duration = 30.0
    success_threshold: Annotated[int, Field(ge=1)] = 2


class Profile(_Section):
    server: Server = Server()
    logging: Logging = Logging()
    metrics: Metrics = Metrics()
    limits: Limits = Limits()
    security: Security = Security()
    headers: Headers = Headers()
    admin: Admin = Admin()
    cli: Cli = Cli()
    compression: Compression = Compression()
    cache: Cache = Cache()
    routing: Routing = Routing()
    health_checks: HealthChecks = HealthChecks()
    circuit_breaker: CircuitBreaker = CircuitBreaker()
    # Core mitmproxy options by their own names (block_global, connection_strategy, ...);
    # checked against the running mitmproxy's options when applied.
    mitmproxy: dict[str, Any] = {}


# Environment variables that override the profile (PRD §8.2), applied before validation so
# their errors name the variable. Lists are comma-separated.
ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "PROXY_HOST": ("server", "host"),
    "PROXY_PORT": ("server", "port"),
    "SHUTDOWN_TIMEOUT": ("server", "shutdown_timeout"),
    "CONNECT_TIMEOUT": ("server", "timeouts", "connect"),
    "READ_TIMEOUT": ("server", "timeouts", "read"),
    "LOG_LEVEL": ("logging", "level"),
    "LOG_FORMAT": ("logging", "format"),
    "LOG_OUTPUT": ("logging", "output"),
    "LOG_FILE": ("logging", "file"),
    "METRICS_ENABLED": ("metrics", "enabled"),
    "METRICS_HOST": ("metrics", "host"),
    "METRICS_PORT": ("metrics", "port"),
    "MAX_BODY_SIZE": ("limits", "max_body_size"),
    "TRUSTED_PROXIES": ("security", "trusted_proxies"),
    "ADMIN_TOKEN": ("admin", "token"),
    "CLI_TOKEN": ("cli", "token"),
    "CLI_TIMEOUT": ("cli", "process_timeout"),
    "CACHE_MAX_MEMORY": ("cache", "max_memory"),
    "RATE_LIMIT_RPS": ("security", "rate_limiting", "requests_per_second"),
}
_LIST_ENV = {"TRUSTED_PROXIES"}


class ProfileError(ValueError):
    """Every problem of one profile, each as `file:line: key.path: message (hint)`."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        n = len(problems)
        super().__init__(
            f"{source}: {n} problem{'s' if n != 1 else ''}:\n"
            + "\n".join(f"  {p}" for p in problems)
        )


@dataclass(frozen=True)
class Loaded:
    profile: Profile
    source: str
    lines: Mapping[tuple[str | int, ...], int]
    env: Mapping[tuple[str, ...], str]

    def where(self, path: tuple[str | int, ...]) -> str:
        """`file:line` (or the env var) that set the value at `path`, for error messages."""
        for target, var in self.env.items():
            if path[: len(target)] == target:
                return f"environment variable {var}"
        line = _nearest_line(self.lines, path)
        return f"{self.source}:{line}" if line else self.source


def load(path: str | Path | None, environ: Mapping[str, str]) -> Loaded:
    """Read, merge env overrides into, and validate one profile (None: defaults + env)."""
    source = str(path) if path else "<defaults>"
    data: Any = {}
    lines: dict[tuple[str | int, ...], int] = {}
    problems: list[str] = []
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ProfileError(source, [f"{source}: cannot read the profile: {e.strerror}"]) from e
        data, lines, problems = _parse_yaml(text, source)
    env_paths: dict[tuple[str, ...], str] = {}
    for var, target in ENV_OVERRIDES.items():
        if var in environ and isinstance(data, dict):
            raw: Any = environ[var]
            if var in _LIST_ENV:
                raw = [item.strip() for item in raw.split(",") if item.strip()]
            _set_path(data, target, raw)
            env_paths[target] = var
    profile = None
    if isinstance(data, dict):
        try:
            profile = Profile.model_validate(data)
        except ValidationError as e:
            problems += [_describe(err, source, lines, env_paths) for err in e.errors()]
    if problems or profile is None:
        raise ProfileError(source, problems)
    return Loaded(profile, source, lines, env_paths)


def _same(value: Any) -> Any:
    return value


def _filter_files(files: list[FilterFile]) -> str:
    if not files:
        return ""
    return json.dumps([f.model_dump(exclude_none=True) for f in files])


def _int(value: float) -> int:
    return int(round(value))


def _json_list(models: list[BaseModel]) -> str:
    import json

    return json.dumps([m.model_dump(mode="json", exclude_none=True) for m in models])


# Every flat option a profile sets: option -> (profile key path, conversion to the option's
# type). The single place the two vocabularies meet; also points option errors at their line.
OPTIONS: dict[str, tuple[tuple[str, ...], Any]] = {
    "listen_host": (("server", "host"), _same),
    "listen_port": (("server", "port"), _same),
    "server_shutdown_timeout": (("server", "shutdown_timeout"), format_duration),
    "upstream_connect_timeout": (("server", "timeouts", "connect"), format_duration),
    "upstream_read_timeout": (("server", "timeouts", "read"), format_duration),
    "tls_listener_cert": (("server", "tls", "cert"), lambda v: v or ""),
    "tls_listener_key": (("server", "tls", "key"), lambda v: v or ""),
    "tls_listener_chain": (("server", "tls", "chain"), lambda v: v or ""),
    "log_level": (("logging", "level"), _same),
    "log_format": (("logging", "format"), _same),
    "log_output": (("logging", "output"), _same),
    "log_file": (("logging", "file"), lambda v: v or ""),
    "metrics_enabled": (("metrics", "enabled"), _same),
    "metrics_host": (("metrics", "host"), _same),
    "metrics_port": (("metrics", "port"), _same),
    "metrics_path": (("metrics", "path"), _same),
    "limits_max_url_length": (("limits", "max_url_length"), _same),
    "limits_max_header_size": (("limits", "max_header_size"), _same),
    "limits_max_headers_count": (("limits", "max_headers_count"), _same),
    "limits_max_body_size": (("limits", "max_body_size"), str),
    "limits_header_timeout": (("limits", "header_timeout"), format_duration),
    "limits_blocked_methods": (("limits", "blocked_methods"), list),
    "forwarding_trusted_proxies": (("security", "trusted_proxies"), list),
    "forwarding_x_forwarded": (("headers", "x_forwarded"), _same),
    "forwarding_via": (("headers", "via"), _same),
    "forwarding_request_id": (("headers", "request_id"), _same),
    "forwarding_proxy_id": (("headers", "proxy_id"), _same),
    "egress_connect_ports": (("security", "egress", "connect_ports"), list),
    "egress_block_private": (("security", "egress", "block_private"), _same),
    "egress_allowed_networks": (("security", "egress", "allowed_networks"), list),
    "tls_intercept_hosts": (("security", "tls_interception", "hosts"), list),
    "filter_mode": (("security", "filtering", "mode"), _same),
    "filter_list_mode": (("security", "filtering", "list_mode"), _same),
    "filter_blocked": (("security", "filtering", "domains", "blocked"), list),
    "filter_allowed": (("security", "filtering", "domains", "allowed"), list),
    "filter_files": (("security", "filtering", "domains", "files"), _filter_files),
    "filter_ip_literals": (("security", "filtering", "ip_literals"), _same),
    "filter_check_sni": (("security", "filtering", "check_sni"), _same),
    "filter_reload_interval": (("security", "filtering", "reload_interval"), format_duration),
    "filter_response_body": (("security", "filtering", "response", "body"), _same),
    "content_filter_mode": (("security", "content_filtering", "mode"), _same),
    "content_filter_blocked_types": (("security", "content_filtering", "blocked_types"), list),
    "content_filter_check_request": (("security", "content_filtering", "check_request"), _same),
    "admin_token": (("admin", "token"), _same),
    "cli_enabled": (("cli", "enabled"), _same),
    "cli_token": (("cli", "token"), _same),
    "cli_allowed_commands": (("cli", "allowed_commands"), list),
    "cli_argument_rules": (("cli", "argument_rules"), _rules_json),
    "cli_env_allowlist": (("cli", "env_allowlist"), list),
    "cli_max_concurrent": (("cli", "max_concurrent"), _same),
    "cli_process_timeout": (("cli", "process_timeout"), format_duration),
    "cli_grace_period": (("cli", "grace_period"), format_duration),
    "cli_max_memory_per_process": (("cli", "max_memory_per_process"), str),
    "cli_max_cpu_time": (("cli", "max_cpu_time"), format_duration),
    "cli_max_file_size": (("cli", "max_file_size"), str),
    "cli_max_processes": (("cli", "max_processes"), _same),
    "cli_max_output_bytes": (("cli", "max_output_bytes"), str),
    "cli_working_directory": (("cli", "working_directory"), _same),
    "cli_run_as_user": (("cli", "run_as_user"), _same),
    "cli_heartbeat_interval": (("cli", "heartbeat_interval"), format_duration),
    "compress_enabled": (("compression", "enabled"), _same),
    "compress_algorithms": (("compression", "algorithms"), list),
    "compress_gzip_level": (("compression", "levels", "gzip"), _same),
    "compress_br_level": (("compression", "levels", "br"), _same),
    "compress_zstd_level": (("compression", "levels", "zstd"), _same),
    "compress_min_size": (("compression", "min_size"), str),
    "compress_content_types": (("compression", "content_types"), list),
    "compress_offload_threshold": (("compression", "offload_threshold"), str),
    "compress_memo_size": (("compression", "memo_size"), str),
    "cache_enabled": (("cache", "enabled"), _same),
    "cache_max_memory": (("cache", "max_memory"), str),
    "cache_max_entries": (("cache", "max_entries"), _same),
    "cache_max_object_size": (("cache", "max_object_size"), str),
    "cache_default_ttl": (("cache", "default_ttl"), format_duration),
    "cache_mode": (("cache", "mode"), _same),
    "cache_patterns": (("cache", "patterns"), list),
    "cache_coalesce_timeout": (("cache", "coalesce_timeout"), format_duration),
    "cache_max_waiters": (("cache", "max_waiters"), _same),
    "cache_surrogate": (("cache", "surrogate"), _same),
    "cache_surrogate_name": (("cache", "surrogate_name"), _same),
    "cache_stale_on_error": (("cache", "stale_on_error"), _same),
    "acl_allowed_ips": (("security", "acl", "allowed_ips"), list),
    "acl_denied_ips": (("security", "acl", "denied_ips"), list),
    "acl_mode": (("security", "acl", "mode"), _same),
    "ratelimit_requests_per_second": (
        ("security", "rate_limiting", "requests_per_second"),
        lambda v: f"{v:g}",
    ),
    "ratelimit_burst": (("security", "rate_limiting", "burst"), _same),
    "ratelimit_mode": (("security", "rate_limiting", "mode"), _same),
    "ratelimit_exempt": (("security", "rate_limiting", "exempt"), list),
    "ratelimit_max_connections_per_ip": (
        ("security", "rate_limiting", "max_connections_per_ip"),
        _same,
    ),
    "ratelimit_max_clients": (("security", "rate_limiting", "max_clients"), _same),
    "ratelimit_rules": (
        ("security", "rate_limiting", "rules"),
        lambda rules: json.dumps([r.model_dump(exclude_none=True) for r in rules]) if rules else "",
    ),
    "secheaders_enabled": (("security", "headers", "enabled"), _same),
    "secheaders_hsts": (("security", "headers", "hsts"), _same),
    "secheaders_content_type_options": (("security", "headers", "content_type_options"), _same),
    "secheaders_frame_options": (("security", "headers", "frame_options"), _same),
    "secheaders_content_security_policy": (
        ("security", "headers", "content_security_policy"),
        _same,
    ),
    "secheaders_override": (("security", "headers", "override"), _same),
    "routing_rules": (("routing", "rules"), lambda rules: _json_list(rules)),
    "routing_default_backend": (("routing", "default_backend"), lambda v: v or ""),
    "router_retries_max_attempts": (("routing", "retries", "max_attempts"), _same),
    "router_retries_backoff": (("routing", "retries", "backoff"), format_duration),
    "router_retries_max_backoff": (("routing", "retries", "max_backoff"), format_duration),
    "router_retries_budget_percent": (("routing", "retries", "budget_percent"), _int),
    "router_retries_budget_min": (("routing", "retries", "budget_min"), _same),
    "router_health_checks_enabled": (("health_checks", "enabled"), _same),
    "router_health_checks_interval": (("health_checks", "interval"), format_duration),
    "router_health_checks_timeout": (("health_checks", "timeout"), format_duration),
    "router_health_checks_path": (("health_checks", "path"), _same),
    "router_health_checks_unhealthy_threshold": (
        ("health_checks", "unhealthy_threshold"),
        _same,
    ),
    "router_health_checks_healthy_threshold": (("health_checks", "healthy_threshold"), _same),
    "router_circuit_breaker_enabled": (("circuit_breaker", "enabled"), _same),
    "router_circuit_breaker_failure_threshold": (
        ("circuit_breaker", "failure_threshold"),
        _same,
    ),
    "router_circuit_breaker_timeout": (("circuit_breaker", "timeout"), format_duration),
    "router_circuit_breaker_success_threshold": (
        ("circuit_breaker", "success_threshold"),
        _same,
    ),
}

# Core mitmproxy options the bundle sets unless the profile's `mitmproxy:` section or the
# command line says otherwise: bodies over 1 MiB are streamed, never held whole in memory; the
# flow dumper stays quiet because the access log says the same thing as JSON; and the mitm.it
# onboarding app (a CA download page for interception debugging) is not served to clients.
CORE_DEFAULTS: dict[str, Any] = {"stream_large_bodies": "1m", "flow_detail": 0, "onboarding": False}


def to_options(profile: Profile) -> dict[str, Any]:
    """The flat options (addons' and core mitmproxy's) that a profile asks for."""
    out: dict[str, Any] = {}
    for option, (path, convert) in OPTIONS.items():
        value: Any = profile
        for key in path:
            value = getattr(value, key)
        out[option] = convert(value)
    return out | CORE_DEFAULTS | listener_options(profile) | profile.mitmproxy


def listener_options(profile: Profile) -> dict[str, Any]:
    """Core options for `routing.listeners`: mitmproxy modes, lazy connects, the client's Host.

    A reverse listener's target is only where mitmproxy points the flow before the router
    rewrites it (routing.default_backend, else the first rule's first backend). Lazy
    connects are what per-request backend choice needs (an eager reverse listener connects to
    that target when the client connects), and the client's Host header is kept so host rules
    can match it (the router rewrites Host per rule).
    """
    routing = profile.routing
    if not routing.listeners:
        return {}
    first = routing.rules[0].forward if routing.rules else None
    target = routing.default_backend or (
        first.target or first.backends[0].url if first is not None else None
    )
    modes = []
    for lst in routing.listeners:
        port = lst.port if lst.port is not None or not lst.host else profile.server.port
        at = ""
        if port is not None:
            at = f"@{lst.host}:{port}" if lst.host else f"@{port}"
        if lst.mode == "forward":
            modes.append(f"regular{at}")
        elif target is not None:  # always, see Routing._consistent
            modes.append(f"reverse:{target}{at}")
    return {"mode": modes, "connection_strategy": "lazy", "keep_host_header": True}


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[tuple[str | int, ...], int], list[str]]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        return None, {}, [f"{where}: not valid YAML: {getattr(e, 'problem', e)}"]
    if root is None:
        return {}, {}, []
    lines: dict[tuple[str | int, ...], int] = {}
    problems: list[str] = []
    _walk(root, (), lines, problems, source)
    if not isinstance(root, yaml.MappingNode):
        return (
            [],
            lines,
            [f"{source}:{root.start_mark.line + 1}: a profile is a mapping of sections"],
        )
    data = yaml.safe_load(text)
    return data, lines, problems


def _walk(
    node: yaml.Node,
    path: tuple[str | int, ...],
    lines: dict[tuple[str | int, ...], int],
    problems: list[str],
    source: str,
) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                # PyYAML silently keeps the last duplicate; a profile that says two things is wrong.
                dotted = ".".join(map(str, path + (key,)))
                problems.append(f"{source}:{key_node.start_mark.line + 1}: {dotted}: duplicate key")
            seen.add(key)
            _walk(value_node, path + (key,), lines, problems, source)
            lines[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), lines, problems, source)


def _set_path(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        child = data.get(key)
        if not isinstance(child, dict):
            child = data[key] = {}
        data = child
    data[path[-1]] = value


def _nearest_line(lines: Mapping[tuple[str | int, ...], int], path: tuple[str | int, ...]) -> int:
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return 0


def _describe(
    err: Any,
    source: str,
    lines: Mapping[tuple[str | int, ...], int],
    env: Mapping[tuple[str, ...], str],
) -> str:
    loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
    dotted = ".".join(map(str, loc)) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    hint = ""
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
        allowed = _allowed_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(allowed)})"
    elif "input" in err and not isinstance(err["input"], dict) and repr(err["input"]) not in msg:
        hint = f" (got {err['input']!r})"
    for target, var in env.items():
        if loc[: len(target)] == target:
            return f"environment variable {var}: {dotted}: {msg}{hint}"
    line = _nearest_line(lines, loc)
    where = f"{source}:{line}" if line else source
    return f"{where}: {dotted}: {msg}{hint}"


def _allowed_keys(loc: tuple[str | int, ...]) -> list[str]:
    model: type[BaseModel] = Profile
    for key in loc:
        field = model.model_fields.get(str(key))
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return []
        model = field.annotation
    return list(model.model_fields)


def main(argv: list[str]) -> int:
    """`scripts/validate-config PROFILE`: print every problem and exit 1, or a summary and 0."""
    import os
    import sys

    if len(argv) != 1:
        print("usage: scripts/validate-config PROFILE.yaml", file=sys.stderr)
        return 2
    try:
        loaded = load(argv[0], os.environ)
    except ProfileError as e:
        print(e, file=sys.stderr)
        return 1
    core = _core_options()
    unknown = [k for k in loaded.profile.mitmproxy if k not in core]
    if unknown:
        problems = [
            f"{loaded.where(('mitmproxy', k))}: mitmproxy.{k}: not a mitmproxy option"
            for k in unknown
        ]
        print(ProfileError(loaded.source, problems), file=sys.stderr)
        return 1
    p = loaded.profile
    egress = p.security.egress
    print(
        f"{loaded.source}: valid\n"
        f"  proxy        {p.server.host}:{p.server.port} (shutdown {p.server.shutdown_timeout:g}s, "
        f"connect {p.server.timeouts.connect:g}s, read {p.server.timeouts.read:g}s)\n"
        f"  management   {'off' if not p.metrics.enabled else f'{p.metrics.host}:{p.metrics.port}'}"
        f" metrics at {p.metrics.path}, admin {'on' if p.admin.token else 'off (no token)'}\n"
        f"  logging      {p.logging.level} {p.logging.format} to "
        f"{p.logging.file if p.logging.output == 'file' else 'stdout'}\n"
        f"  limits       url {p.limits.max_url_length} B, headers {p.limits.max_header_size} B / "
        f"{p.limits.max_headers_count}, body {p.limits.max_body_size} B, "
        f"header timeout {p.limits.header_timeout:g}s\n"
        f"  egress       CONNECT ports {', '.join(egress.connect_ports)}; private targets "
        f"{'blocked' if egress.block_private else 'allowed'}"
        f"{' except ' + ', '.join(egress.allowed_networks) if egress.allowed_networks else ''}\n"
        f"  tls          "
        f"{'intercept ' + ', '.join(p.security.tls_interception.hosts) if p.security.tls_interception.hosts else 'pass every tunnel through'}\n"
        f"  tls listener "
        f"{p.server.tls.cert + ' (key ' + str(p.server.tls.key) + ')' if p.server.tls.cert else 'mitmproxy certificate'}\n"
        f"  compression  "
        f"{', '.join(f'{a} {getattr(p.compression.levels, a)}' for a in p.compression.algorithms) if p.compression.enabled else 'off'}"
        f" (bodies of {p.compression.min_size} B or more)\n"
        f"  cache        {'off' if not p.cache.enabled else f'{p.cache.max_memory} B, {p.cache.max_entries} entries, mode {p.cache.mode}'}\n"
        f"  acl          {_acl_summary(p.security.acl)}\n"
        f"  rate limit   {_rate_summary(p.security.rate_limiting)}\n"
        f"  sec headers  {'on' if p.security.headers.enabled else 'off'}\n"
        f"  routing      {len(p.routing.rules)} rules, default backend "
        f"{p.routing.default_backend or 'none'}, listeners "
        f"{', '.join(listener_options(p).get('mode', [])) or '(mitmproxy default)'}; health checks "
        f"{'every ' + format_duration(p.health_checks.interval) if p.health_checks.enabled else 'off'}"
        f", circuit breaker "
        f"{'after ' + str(p.circuit_breaker.failure_threshold) + ' failures' if p.circuit_breaker.enabled else 'off'}\n"
        f"  mitmproxy    {', '.join(f'{k}={v}' for k, v in p.mitmproxy.items()) or '(defaults)'}"
    )
    return 0


def _acl_summary(acl: Acl) -> str:
    if not acl.allowed_ips and not acl.denied_ips:
        return "off (mitmproxy's block_global decides)"
    allowed = f"allow {', '.join(acl.allowed_ips)}" if acl.allowed_ips else "allow all"
    denied = f"; deny {', '.join(acl.denied_ips)}" if acl.denied_ips else ""
    return f"{allowed}{denied} ({acl.mode})"


def _rate_summary(rl: RateLimiting) -> str:
    parts = []
    if rl.requests_per_second:
        parts.append(f"{rl.requests_per_second:g}/s burst {rl.burst or 'auto'} per client IP")
    if rl.rules:
        parts.append(f"{len(rl.rules)} rule{'s' if len(rl.rules) != 1 else ''}")
    if rl.max_connections_per_ip:
        parts.append(f"max {rl.max_connections_per_ip} connections per IP")
    return f"{', '.join(parts)} ({rl.mode})" if parts else "off"


def _core_options() -> set[str]:
    """Names of mitmproxy's own options, including those its built-in addons declare."""
    from mitmproxy.addons import default_addons
    from mitmproxy.options import Options

    opts = Options()

    class _Loader:
        def add_option(
            self, name: str, typespec: Any, default: Any, help: str, choices: Any = None
        ) -> None:
            opts.add_option(name, typespec, default, help, choices)

        def add_command(self, *args: Any, **kwargs: Any) -> None:
            pass

    for addon in default_addons():
        if hasattr(addon, "load"):
            addon.load(_Loader())
    return set(opts.keys())


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
