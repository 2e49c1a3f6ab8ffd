"""The router's flat options and what `configure` derives from them: routes and backends.

`OPTIONS` is the table `load` declares; `settings(options, backends)` checks every value
(`OptionsError` naming the option) and builds the routes, reusing each backend's state
(breaker, health) by name so a reload keeps it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mitmproxy import exceptions
from pydantic import TypeAdapter, ValidationError

from addons.kernel import options as opts
from addons.routing import balance
from addons.routing.balance import Backend, Pool
from addons.schema import RouteRule

RULES = TypeAdapter(list[RouteRule])

OPTIONS: tuple[tuple[str, type, Any, str], ...] = (
    ("routing_rules", str, "[]", 'Routing rules as a JSON list, first match wins, e.g. [{"name": "api", "match": {"host": "api.example.com", "path": "/v1"}, "forward": {"backends": [{"url": "http://10.0.0.5:8080", "weight": 2}], "strip_prefix": "/v1"}}]; see docs/routing.md for every field.'),
    ("routing_default_backend", str, "", "Backend URL (http://host:port) for requests on a reverse listener that match no rule; empty: such requests get 404 NOT_FOUND."),
    ("router_retries_max_attempts", int, 3, "Attempts per request (the first included) when connecting to a backend fails; idempotent methods only."),
    ("router_retries_backoff", str, "25ms", "Base delay before a retry; doubles per attempt, full jitter."),
    ("router_retries_max_backoff", str, "1s", "Upper bound of the delay before a retry."),
    ("router_retries_budget_percent", int, 20, "Retries allowed as a percentage of requests over 10 s (retry budget)."),
    ("router_retries_budget_min", int, 3, "Retries per second always allowed, whatever the budget percentage."),
    ("router_health_checks_enabled", bool, True, "Check every backend actively with GET requests."),
    ("router_health_checks_interval", str, "10s", "Time between two health checks of a backend."),
    ("router_health_checks_timeout", str, "2s", "Timeout of one health check."),
    ("router_health_checks_path", str, "/health", "Path of the health check request; any 2xx or 3xx answer passes."),
    ("router_health_checks_unhealthy_threshold", int, 3, "Consecutive failures (checks or real requests) that make a backend unhealthy."),
    ("router_health_checks_healthy_threshold", int, 2, "Consecutive passed checks that make an unhealthy backend healthy again."),
    ("router_circuit_breaker_enabled", bool, True, "Open a backend's circuit after consecutive failures."),
    ("router_circuit_breaker_failure_threshold", int, 5, "Consecutive failures that open a backend's circuit."),
    ("router_circuit_breaker_timeout", str, "30s", "How long a circuit stays open before one trial request (half-open)."),
    ("router_circuit_breaker_success_threshold", int, 2, "Consecutive successes in half-open state that close the circuit."),
)  # fmt: skip

_DURATIONS = (
    "router_retries_backoff",
    "router_retries_max_backoff",
    "router_health_checks_interval",
    "router_health_checks_timeout",
    "router_circuit_breaker_timeout",
)
_AT_LEAST_ONE = (
    "router_retries_max_attempts",
    "router_health_checks_unhealthy_threshold",
    "router_health_checks_healthy_threshold",
    "router_circuit_breaker_failure_threshold",
    "router_circuit_breaker_success_threshold",
)


@dataclass(frozen=True)
class Route:
    name: str
    matcher: balance.Matcher
    pool: Pool
    strip_prefix: str | None
    timeout: float | None
    preserve_host: bool
    cache: bool | None


@dataclass(frozen=True)
class Settings:
    routes: list[Route]
    default: Route | None
    backends: dict[str, Backend]
    retries: tuple[int, float, float]  # max attempts, backoff, max backoff
    budget_percent: int
    budget_min: int
    breaker_enabled: bool
    check_interval: float
    check_timeout: float


def parse_rules(text: str) -> list[RouteRule]:
    """`routing_rules` JSON as rule models; ValueError with a readable reason."""
    try:
        return RULES.validate_json(text or "[]")
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-"))
            problems.append(f"{loc or 'rules'}: {err['msg'].removeprefix('Value error, ')}")
        raise ValueError("; ".join(problems)) from None


def split_url(backend_url: str) -> tuple[str, str, int]:
    scheme, _, rest = backend_url.partition("://")
    host, _, port = rest.rpartition(":")
    return scheme, host.strip("[]").lower(), int(port)


def settings(o: Any, previous: Mapping[str, Backend]) -> Settings:
    """Check the router's options (`OptionsError`) and build routes and backends."""
    rules, default = _rules(o)
    durations = {name: opts.duration(name, getattr(o, name)) for name in _DURATIONS}
    for name in _AT_LEAST_ONE:
        if getattr(o, name) < 1:
            raise exceptions.OptionsError(f"{name}: must be at least 1")
    if durations["router_health_checks_interval"] <= 0:
        raise exceptions.OptionsError("router_health_checks_interval: must be more than 0s")
    if not o.router_health_checks_path.startswith("/"):
        raise exceptions.OptionsError("router_health_checks_path: must start with /")
    builder = _Builder(o, previous, durations["router_circuit_breaker_timeout"])
    routes = [builder.route(r, i) for i, r in enumerate(rules)]
    default_route = builder.route(default, 0) if default is not None else None
    if not o.router_health_checks_enabled:
        for b in builder.backends.values():  # nothing would ever make them healthy again
            b.health.healthy = True
    return Settings(
        routes=routes,
        default=default_route,
        backends=builder.backends,
        retries=(
            o.router_retries_max_attempts,
            durations["router_retries_backoff"],
            durations["router_retries_max_backoff"],
        ),
        budget_percent=o.router_retries_budget_percent,
        budget_min=o.router_retries_budget_min,
        breaker_enabled=o.router_circuit_breaker_enabled,
        check_interval=durations["router_health_checks_interval"],
        check_timeout=durations["router_health_checks_timeout"],
    )


def _rules(o: Any) -> tuple[list[RouteRule], RouteRule | None]:
    try:
        rules = parse_rules(o.routing_rules)
    except ValueError as e:
        raise exceptions.OptionsError(f"routing_rules: {e}") from None
    if not o.routing_default_backend:
        return rules, None
    try:
        default = RULES.validate_python(
            [{"name": "default", "forward": {"target": o.routing_default_backend}}]
        )[0]
    except ValidationError as e:
        msg = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise exceptions.OptionsError(f"routing_default_backend: {msg}") from None
    return rules, default


class _Builder:
    """Routes from rules, with one Backend per name, reused from `previous` when unchanged."""

    def __init__(self, o: Any, previous: Mapping[str, Backend], breaker_timeout: float) -> None:
        self.o = o
        self.previous = previous
        self.breaker_timeout = breaker_timeout
        self.backends: dict[str, Backend] = {}

    def backend(self, spec_url: str, name: str | None) -> Backend:
        o = self.o
        scheme, host, port = split_url(spec_url)
        key = name or (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        b = self.backends.get(key)
        if b is None:
            b = self.previous.get(key)
            if b is None or (b.scheme, b.host, b.port) != (scheme, host, port):
                b = Backend(key, scheme, host, port)
            self.backends[key] = b
        b.breaker.failure_threshold = o.router_circuit_breaker_failure_threshold
        b.breaker.timeout = self.breaker_timeout
        b.breaker.success_threshold = o.router_circuit_breaker_success_threshold
        b.health.unhealthy_threshold = o.router_health_checks_unhealthy_threshold
        b.health.healthy_threshold = o.router_health_checks_healthy_threshold
        return b

    def route(self, rule: RouteRule, index: int) -> Route:
        fwd = rule.forward
        if fwd.target is not None:
            members, weights = [self.backend(fwd.target, None)], [1]
        else:
            members = [self.backend(s.url, s.name) for s in fwd.backends]
            weights = [s.weight for s in fwd.backends]
        return Route(
            name=rule.name or f"rule{index + 1}",
            matcher=balance.compile_match(rule.match.model_dump()),
            pool=Pool(members, weights, fwd.strategy),
            strip_prefix=fwd.strip_prefix,
            timeout=fwd.timeout,
            preserve_host=fwd.preserve_host,
            cache=rule.cache,
        )
