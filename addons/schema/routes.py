"""The `routing:`, `health_checks:` and `circuit_breaker:` sections: reverse listeners, rules
matching requests to backends, retries, active health checks and per-backend breakers."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, model_validator

from addons.kernel import hosts
from addons.schema.fields import Duration, Env, Method, Port, Section

_ROUTE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


def _backend_url(value: Any) -> str:
    """`http://host[:port]` or `https://...`, no path: a backend the router connects to."""
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
    """The router's grammar (`kernel.hosts`, with `*`), normalised as the router keys it."""
    return str(hosts.parse_pattern(str(value), star=True))


def _path_pattern(value: Any) -> str:
    text = str(value)
    if not text.startswith("/"):
        raise ValueError(
            "a path starts with / (a prefix such as /api, or a glob such as /static/*)"
        )
    return text


class HeaderMatch(Section):
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


class RouteMatch(Section):
    host: Annotated[str, BeforeValidator(_host_pattern)] | None = None
    path: Annotated[str, BeforeValidator(_path_pattern)] | None = None
    headers: list[HeaderMatch] = []
    method: Annotated[list[Method], BeforeValidator(_methods)] = []


class BackendSpec(Section):
    url: BackendUrl
    weight: Annotated[int, Field(ge=1, le=1000)] = 1
    name: RouteId | None = None


class RouteForward(Section):
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


class RouteRule(Section):
    name: RouteId | None = None
    match: RouteMatch = RouteMatch()
    forward: RouteForward
    cache: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _requirements_spelling(cls, data: Any) -> Any:
        """The requirements write `forward.cache` (the rule's `cache`) and `strip_prefix: true|false`
        (strip the rule's `match.path` prefix, or nothing)."""
        if not isinstance(data, dict) or not isinstance(data.get("forward"), dict):
            return data
        data, forward = dict(data), dict(data["forward"])
        if "cache" in forward:
            cache = forward.pop("cache")
            if data.setdefault("cache", cache) != cache:
                raise ValueError("cache and forward.cache disagree")
        strip = forward.get("strip_prefix")
        if isinstance(strip, bool):
            del forward["strip_prefix"]
            if strip:
                path = (data.get("match") or {}).get("path")
                prefix = str(path or "").rstrip("*").rstrip("/")
                if not prefix:
                    raise ValueError("strip_prefix: true strips match.path, which is not set")
                forward["strip_prefix"] = prefix
        data["forward"] = forward
        return data


class Listener(Section):
    # forward: the forward proxy (server.host/server.port unless given); reverse: every
    # request is routed by routing.rules / routing.default_backend.
    mode: Literal["forward", "reverse"] = "reverse"
    host: str | None = None
    port: Port | None = None


class Retries(Section):
    max_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    backoff: Duration = 0.025
    max_backoff: Duration = 1.0
    budget_percent: Annotated[float, Field(ge=0, le=100)] = 20.0
    budget_min: Annotated[int, Field(ge=0)] = 3


class Routing(Section):
    listeners: list[Listener] = []
    default_backend: Annotated[BackendUrl | None, Env("DEFAULT_BACKEND")] = None
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


class HealthChecks(Section):
    enabled: bool = True
    interval: Duration = 10.0
    timeout: Duration = 2.0
    path: Annotated[str, BeforeValidator(_path_pattern)] = "/health"
    unhealthy_threshold: Annotated[int, Field(ge=1)] = 3
    healthy_threshold: Annotated[int, Field(ge=1)] = 2


class CircuitBreaker(Section):
    enabled: bool = True
    failure_threshold: Annotated[int, Field(ge=1)] = 5
    timeout: Duration = 30.0
    success_threshold: Annotated[int, Field(ge=1)] = 2
