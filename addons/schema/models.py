"""The profile: `Profile` and its sections other than security and routing.

Every field is a profile key with its default; a field an environment variable overrides says
so with `Env(...)`. Sections are frozen and refuse unknown keys.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    PositiveInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from addons.kernel import tls as certfiles
from addons.kernel.units import parse_size
from addons.schema.fields import Duration, Env, Method, Port, Section, Size, Workers
from addons.schema.routes import CircuitBreaker, HealthChecks, Routing
from addons.schema.security import Security


class Timeouts(Section):
    connect: Annotated[Duration, Env("CONNECT_TIMEOUT")] = 10.0
    read: Annotated[Duration, Env("READ_TIMEOUT"), Env("BACKEND_TIMEOUT")] = 60.0
    write: Duration = 30.0
    idle: Duration = 120.0


def _tls_version(value: Any) -> str:
    text = str(value).upper().replace("_", ".").replace("V", "")
    if text in ("TLS1.0", "TLS1", "TLS1.1"):
        raise ValueError("TLS 1.0 and 1.1 are insecure (RFC 8996); the minimum is TLS1.2")
    if text not in ("TLS1.2", "TLS1.3"):
        raise ValueError("must be TLS1.2 or TLS1.3")
    return text


class Tls(Section):
    """The certificate reverse listeners serve to TLS clients (addons/tlslistener.py).

    The files are checked here too (`addons/kernel/tls.py`: readable, PEM, the key belongs to
    the certificate), so validate-config and a reload point at the line of the file that is
    wrong.

    `enabled: false` (the requirements' switch) turns TLS off and leaves the files unread; unset, TLS
    is on when a certificate is given. `min_version` is the lowest TLS version accepted from
    clients (mitmproxy's `tls_version_client_min`).
    """

    enabled: Annotated[bool | None, Env("PROXY_TLS_ENABLED")] = None
    cert: str | None = None
    key: str | None = None
    chain: str | None = None
    min_version: Annotated[Literal["TLS1.2", "TLS1.3"], BeforeValidator(_tls_version)] = "TLS1.2"

    @field_validator("cert")
    @classmethod
    def _cert(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v and info.data.get("enabled") is not False:
            certfiles.load_certificates(v, "cert")
        return v

    @field_validator("key")
    @classmethod
    def _key(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v and info.data.get("enabled") is not False:
            certfiles.load_private_key(v)
            if info.data.get("cert"):
                certfiles.load_keypair(info.data["cert"], v)
        return v

    @field_validator("chain")
    @classmethod
    def _chain(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v and info.data.get("enabled") is not False:
            certfiles.load_certificates(v, "chain")
        return v

    @model_validator(mode="after")
    def _both(self) -> Tls:
        if self.enabled is False:
            return self
        if self.enabled and not (self.cert and self.key):
            raise ValueError("enabled: true needs cert and key (PEM files)")
        if (self.cert or self.key or self.chain) and not (self.cert and self.key):
            raise ValueError("a TLS listener needs both cert and key")
        return self


def _gc_threshold(value: Any) -> Any:
    # `700,10,10` as the environment gives it; a YAML list as it is
    return [part.strip() for part in value.split(",")] if isinstance(value, str) else value


class Server(Section):
    host: Annotated[str, Env("PROXY_HOST")] = "127.0.0.1"
    port: Annotated[Port, Env("PROXY_PORT")] = 8080
    shutdown_timeout: Annotated[Duration, Env("SHUTDOWN_TIMEOUT")] = 30.0
    workers: Workers = 1
    timeouts: Timeouts = Timeouts()
    tls: Tls = Tls()
    event_loop: Annotated[Literal["auto", "uvloop", "asyncio"], Env("WAYPOST_EVENT_LOOP")] = (
        "asyncio"
    )
    gc_freeze: bool = True
    gc_threshold: Annotated[
        tuple[PositiveInt, PositiveInt, PositiveInt], BeforeValidator(_gc_threshold)
    ] = (2_000, 10, 100)
    memory_trim_interval: Duration = 60.0


def _log_level(value: Any) -> Any:
    # `warn` is the Go and Node spelling the requirements use; Python's level is WARNING.
    text = str(value).lower() if isinstance(value, str) else value
    return "warning" if text == "warn" else text


def _log_file(value: Any) -> Any:
    """The requirements' `file: {path: ...}` is the path (its rotation keys are aliases of
    `logging.rotation`, moved out by the loader)."""
    if not isinstance(value, dict):
        return value
    rest = sorted(set(value) - {"path"})
    if rest:
        raise ValueError(
            f"{', '.join(rest)}: unknown; a file mapping has path, max_size, "
            "max_age and max_backups"
        )
    if "path" not in value:
        raise ValueError("file as a mapping needs path (the file to write to)")
    return value["path"]


class Rotation(Section):
    max_size: Size = 0
    max_age: Annotated[int, Field(ge=0)] = 0  # days, as the requirements write it
    max_backups: Annotated[int, Field(ge=0)] = 0


class Logging(Section):
    level: Annotated[
        Literal["debug", "info", "warning", "error"], BeforeValidator(_log_level), Env("LOG_LEVEL")
    ] = "info"
    format: Annotated[Literal["json", "text"], Env("LOG_FORMAT")] = "json"
    output: Annotated[Literal["stdout", "file"], Env("LOG_OUTPUT")] = "stdout"
    file: Annotated[str | None, BeforeValidator(_log_file), Env("LOG_FILE")] = None
    rotation: Rotation = Rotation()

    @model_validator(mode="after")
    def _file_needed(self) -> Logging:
        if self.output == "file" and not self.file:
            raise ValueError("output: file needs logging.file (the path to write to)")
        return self


class ProxyPortEndpoints(Section):
    """Which management endpoints the proxy port answers too (PRD §11.3 uses them there)."""

    health: bool = True
    metrics: bool = True
    admin: bool = True


class Metrics(Section):
    enabled: Annotated[bool, Env("METRICS_ENABLED")] = True
    host: Annotated[str, Env("METRICS_HOST")] = "127.0.0.1"
    port: Annotated[Port, Env("METRICS_PORT")] = 9090
    path: str = "/metrics"
    proxy_port: ProxyPortEndpoints = ProxyPortEndpoints()
    worker_label: bool = False

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with /")
        return v


def _otlp_protocol(value: Any) -> Any:
    if value == "grpc":
        raise ValueError(
            "grpc is not supported: use http/protobuf (OTLP over HTTP, usually port 4318, "
            "path /v1/traces)"
        )
    return value


class Tracing(Section):
    """OpenTelemetry tracing (PRD §5.4.2), exported over OTLP/HTTP."""

    enabled: bool = False
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    protocol: Annotated[Literal["http/protobuf"], BeforeValidator(_otlp_protocol)] = "http/protobuf"
    sample_ratio: Annotated[float, Field(ge=0, le=1)] = 1.0
    service_name: Annotated[str, Field(min_length=1)] = "waypost"

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not re.match(r"https?://[^/\s]+", v):
            raise ValueError(
                "must be an http:// or https:// URL (e.g. http://collector:4318/v1/traces)"
            )
        return v


class Limits(Section):
    max_url_length: Annotated[int, Field(gt=0)] = 8192
    max_header_size: Size = 16384
    max_headers_count: Annotated[int, Field(gt=0)] = 100
    max_body_size: Annotated[Size, Env("MAX_BODY_SIZE")] = 10 * 1024 * 1024
    header_timeout: Duration = 10.0
    blocked_methods: list[Method] = ["TRACE", "TRACK"]
    origin_form: Literal["refuse", "relay"] = "refuse"
    max_concurrent_connections: Annotated[int, Field(ge=0)] = 0
    max_accepts_per_event: Annotated[int, Field(ge=0)] = 4


class Headers(Section):
    x_forwarded: bool = True
    via: bool = True
    request_id: bool = True
    proxy_id: str = "waypost"


class Admin(Section):
    token: Annotated[str, Env("ADMIN_TOKEN")] = ""


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


class CliArgumentRule(Section):
    """Per-command argument rules (cli.argument_rules; cli.py validates cli_argument_rules with
    it too)."""

    prefix: list[str] = []  # fixed arguments always placed before the client's
    patterns: list[str] = []  # every client argument must fully match one of these
    max_args: Annotated[int, Field(ge=0)] | None = None
    # "any": arguments may name paths outside cli.working_directory (cli.confine_paths)
    paths: Literal["confined", "any"] = "confined"

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


class Cli(Section):
    enabled: Annotated[bool, Env("CLI_ENABLED")] = False
    token: Annotated[str, Env("CLI_TOKEN")] = ""
    allowed_commands: list[Annotated[str, BeforeValidator(_command_path)]] = []
    argument_rules: dict[str, CliArgumentRule] = {}
    env_allowlist: list[Annotated[str, BeforeValidator(_env_name)]] = []
    max_concurrent: Annotated[int, Field(ge=1), Env("CLI_MAX_CONCURRENT")] = 10
    process_timeout: Annotated[Duration, Env("CLI_TIMEOUT")] = 30.0
    grace_period: Duration = 5.0
    max_memory_per_process: Size = 512 * 1024 * 1024
    max_cpu_time: Duration = 60.0
    max_file_size: Size = 64 * 1024 * 1024
    max_processes: Annotated[int, Field(ge=0)] = 64
    max_output_bytes: Size = 10 * 1024 * 1024
    working_directory: str = "/"
    confine_paths: bool = True
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


class CompressionLevels(Section):
    gzip: Annotated[int, Field(ge=1, le=9)] = 4
    br: Annotated[int, Field(ge=0, le=11)] = 3
    zstd: Annotated[int, Field(ge=1, le=19)] = 3


class Compression(Section):
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


class Cache(Section):
    enabled: Annotated[bool, Env("CACHE_ENABLED")] = True
    max_memory: Annotated[
        int, BeforeValidator(parse_size), Field(gt=0), Env("CACHE_MAX_MEMORY")
    ] = 256 * 1024 * 1024
    max_entries: Annotated[int, Field(gt=0)] = 10000
    max_object_size: Annotated[int, BeforeValidator(parse_size), Field(gt=0)] = 1024 * 1024
    default_ttl: Annotated[Duration, Env("CACHE_DEFAULT_TTL")] = 300.0
    mode: Literal["rfc", "default_ttl"] = "rfc"
    patterns: list[str] = []
    coalesce_timeout: Duration = 5.0
    max_waiters: Annotated[int, Field(ge=0)] = 100
    surrogate: bool = True
    surrogate_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")] = "waypost"
    stale_on_error: bool = False

    @model_validator(mode="before")
    @classmethod
    def _respect_cache_headers(cls, data: Any) -> Any:
        """The requirements' `respect_cache_headers: true|false` is `mode: rfc|default_ttl`."""
        if not isinstance(data, dict) or "respect_cache_headers" not in data:
            return data
        data = dict(data)
        respect = data.pop("respect_cache_headers")
        if not isinstance(respect, bool):
            raise ValueError("respect_cache_headers is true or false")
        mode = "rfc" if respect else "default_ttl"
        if data.setdefault("mode", mode) != mode:
            raise ValueError(f"respect_cache_headers: {str(respect).lower()} means mode: {mode}")
        return data

    @model_validator(mode="after")
    def _object_fits(self) -> Cache:
        if self.max_object_size > self.max_memory:
            raise ValueError("max_object_size must not be larger than max_memory")
        return self


def _redis_url(value: Any) -> Any:
    if isinstance(value, str) and value.split("://", 1)[0] not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return value


class State(Section):
    """Where shared state lives: each process (memory) or Redis, shared by every worker and
    instance (addons/state.py)."""

    backend: Literal["memory", "redis"] = "memory"
    redis_url: Annotated[str, BeforeValidator(_redis_url)] = "redis://127.0.0.1:6379/0"
    key_prefix: Annotated[str, Field(min_length=1)] = "waypost"
    timeout: Annotated[Duration, Field(gt=0)] = 0.05


class Profile(Section):
    server: Server = Server()
    logging: Logging = Logging()
    metrics: Metrics = Metrics()
    tracing: Tracing = Tracing()
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
    state: State = State()
    # Core mitmproxy options by their own names (block_global, connection_strategy, ...);
    # checked against the running mitmproxy's options when applied.
    mitmproxy: dict[str, Any] = {}


KeyPath = tuple[str, ...]

# The product requirements' names for keys Waypost keeps elsewhere: alias path -> the key it stands for. The
# loader moves them before validation (both given: an error); docs/configuration.md lists them.
ALIASES: dict[KeyPath, KeyPath] = {
    ("listener",): ("server",),  # the listener component
    ("filtering",): ("security", "filtering"),  # the domain filtering example
    ("server", "limits", "max_header_bytes"): ("limits", "max_header_size"),
    ("server", "limits", "max_concurrent_connections"): ("limits", "max_concurrent_connections"),
    **{
        ("logging", "file", key): ("logging", "rotation", key)
        for key in ("max_size", "max_age", "max_backups")
    },
}
