"""Router: routing rules, backend pools, health checks, circuit breakers and retries.

mitmproxy gives a reverse listener one fixed target; this addon picks the backend per request.
Rules match on host, path, headers and method (first match wins) and forward to one target or
a pool (round robin, smooth weighted round robin, least connections) of the backends that are
healthy and whose circuit breaker lets requests through. No backend available: 503
CIRCUIT_OPEN at once. Rules apply on reverse listeners and, where one matches, in forward mode.

Hooks:
- `requestheaders`: match the rule; records `errors.waypost(flow)["route"]` (rule id) and
  `["route_cache"]` (the rule's `cache`, None without a rule) for the cache addon. Requests
  that mitmproxy connects for before `request` (streamed bodies, and every method but GET and
  HEAD, which the cache never looks up) are also rewritten here.
- `request`: choose the backend and rewrite the target (scheme, host, port, strip_prefix,
  Host header); records `["backend"]`. Runs after the cache looked up the client's URL.
- `waypost_upstream_failed` (our own event, fired by the patches below): the connect to the
  chosen backend failed, or its connection failed before any response byte; for idempotent
  methods, within the per-request attempt cap and the global retry budget, wait (exponential
  backoff, full jitter) and point the flow at another backend; mitmproxy then connects (and,
  in the second case, sends the request) again. Read timeouts are not retried.
- `response` / `error`: passive health and breaker accounting, per-backend latency and
  errors; a 503 with `Retry-After` takes the backend out of rotation for that long.
- `server_connect_error`: keeps mitmproxy from answering later requests on the same client
  connection with a cached connect error for a backend that may be back.
- `running` / `done`: the active health-check task (aiohttp client).
- `management_routes()`: `GET /admin/backends`; `readiness_check()`: the backends' states.
- `egress_exempt(client, address)`: asked by the egress addon for operator-configured backends.

Options (flat; a profile's `routing`, `health_checks`, `circuit_breaker` sections set them):
`routing_rules` (JSON list of rules, see README), `routing_default_backend`,
`router_retries_{max_attempts,backoff,max_backoff,budget_percent,budget_min}`,
`router_health_checks_{enabled,interval,timeout,path,unhealthy_threshold,healthy_threshold}`,
`router_circuit_breaker_{enabled,failure_threshold,timeout,success_threshold}`.

The retry patches (version-guarded for mitmproxy 11.0.2 and 12.3.1, undone in `done`), both
only for flows this addon routed, both firing `waypost_upstream_failed` (a blocking hook:
mitmproxy awaits it) and going on only when the addon pointed the flow elsewhere:
- `HttpStream.make_server_connection` asks for a connection once and answers 502 on failure;
  the patched copy asks again.
- `HttpStream.handle_protocol_error`, for a response error while waiting for the response
  headers of a fully read, buffered request (the backend closed or reset the connection before
  any response byte): instead of the error, connect again and send the request again, as
  `state_consume_request_body` does (the same code in 11.0.2 and 12.3.1).
On any other version there are no retries (a WARNING says so); everything else works.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mitmproxy import connection, ctx, exceptions, http, version
from mitmproxy.proxy import commands, mode_specs, server_hooks
from mitmproxy.proxy.layers import http as http_layer
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString
from pydantic import TypeAdapter, ValidationError

from addons import balance, errors, metrics, upstream
from addons.balance import Backend, Pool
from addons.kernel import units
from addons.schema import RouteRule

log = logging.getLogger("waypost.router")

CHECKED_VERSIONS = frozenset({"11.0.2", "12.3.1"})
# Per-flow bookkeeping beside (not in) the waypost record, which the access log prints.
_ROUTE = "waypost_router_rule"
_BACKEND = "waypost_router_backend"
_TRIED = "waypost_router_tried"
_UPSTREAM_ERROR = "waypost_router_upstream_error"
_RETRY = "waypost_router_retry"
_DONE = "waypost_router_done"
# A failed connection keeps matching its address in mitmproxy's per-client connection list
# and is answered with its old error; a `via` nobody asks for takes it out of matching.
_DEAD_VIA = ("http", ("waypost-router-failed-connection", 0))
RULES = TypeAdapter(list[RouteRule])
LATENCY_BUCKETS = metrics.BUCKETS
# Statuses from a backend that count as its failure (gateway errors, overload).
FAILURE_STATUSES = frozenset({502, 503, 504})


@dataclass(frozen=True)
class Route:
    name: str
    matcher: balance.Matcher
    pool: Pool
    strip_prefix: str | None
    timeout: float | None
    preserve_host: bool
    cache: bool | None


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


# --- metrics (plain numbers, Prometheus families at scrape; see addons/metrics.py) ------------


class RouterStore:
    def __init__(self) -> None:
        self.router: Router | None = None
        self.latency: dict[str, list[Any]] = {}  # backend -> [buckets..., sum]
        self.errors: dict[tuple[str, str], int] = {}
        self.retries: dict[str, int] = {}

    def observe(self, backend: str, seconds: float) -> None:
        h = self.latency.get(backend)
        if h is None:
            h = self.latency[backend] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]
        i = 0
        while i < len(LATENCY_BUCKETS) and seconds > LATENCY_BUCKETS[i]:
            i += 1
        h[i] += 1
        h[-1] += seconds

    def collect(self) -> Iterator[Any]:
        state = GaugeMetricFamily(
            "backend_circuit_state",
            "Circuit breaker state per backend: 0 closed, 1 open, 2 half-open.",
            labels=["backend"],
        )
        healthy = GaugeMetricFamily(
            "backend_healthy", "1 when the backend passes its health checks.", labels=["backend"]
        )
        active = GaugeMetricFamily(
            "backend_active_requests", "Requests in flight per backend.", labels=["backend"]
        )
        router = self.router
        if router is not None:
            for b in router.backends.values():
                state.add_metric([b.name], balance.STATE_VALUE[b.breaker.state])
                healthy.add_metric([b.name], 1 if b.health.healthy else 0)
                active.add_metric([b.name], b.active)
        yield state
        yield healthy
        yield active
        latency = HistogramMetricFamily(
            "backend_request_duration_seconds",
            "Request start to response end, per backend.",
            labels=["backend"],
        )
        for name, h in self.latency.items():
            acc, cumulative = 0, []
            for bound, n in zip(
                (*map(floatToGoString, LATENCY_BUCKETS), "+Inf"), h[:-1], strict=True
            ):
                acc += n
                cumulative.append((bound, acc))
            latency.add_metric([name], cumulative, h[-1])
        yield latency
        errs = CounterMetricFamily(
            "backend_errors_total",
            "Failed requests per backend and reason (connect errors, timeouts, 502/503/504).",
            labels=["backend", "reason"],
        )
        for (name, reason), n in self.errors.items():
            errs.add_metric([name, reason], n)
        yield errs
        retries = CounterMetricFamily(
            "backend_retries_total",
            "Requests retried on another backend, by the backend that failed.",
            labels=["backend"],
        )
        for name, n in self.retries.items():
            retries.add_metric([name], n)
        yield retries


if __name__ == "addons.router":
    STORE = RouterStore()
    metrics.REGISTRY.register(STORE)
else:  # a script (re)load: share the package module's collector
    try:
        from addons.router import STORE
    except ImportError:
        STORE = RouterStore()
        metrics.REGISTRY.register(STORE)


# --- the retry patch ---------------------------------------------------------------------------

if __name__ == "addons.router":

    @dataclass
    class UpstreamFailedHook(commands.StartHook):
        """A routed request's connect to its backend failed; the router may pick another."""

        name = "waypost_upstream_failed"
        flow: http.HTTPFlow

else:
    try:
        from addons.router import UpstreamFailedHook
    except ImportError:

        @dataclass
        class UpstreamFailedHook(commands.StartHook):  # type: ignore[no-redef]
            name = "waypost_upstream_failed"
            flow: http.HTTPFlow


_ORIGINAL = "__waypost_original__"


def _make_server_connection(self: Any) -> Any:
    # mitmproxy 11.0.2 / 12.3.1 HttpStream.make_server_connection, plus the retry loop.
    while True:
        conn, err = yield http_layer.GetHttpConnection(
            (self.flow.request.host, self.flow.request.port),
            self.flow.request.scheme == "https",
            self.flow.server_conn.via,
            self.flow.server_conn.transport_protocol,
        )
        if not err:
            self.context.server = self.flow.server_conn = conn
            return True
        if _BACKEND in self.flow.metadata:
            self.flow.metadata[_UPSTREAM_ERROR] = err
            yield UpstreamFailedHook(self.flow)
            if self.flow.metadata.pop(_RETRY, False):
                continue
        # The original handler: the router has seen this failure already.
        original = getattr(_handle_protocol_error, _ORIGINAL)
        yield from original(self, _connect_error(self.stream_id, err))
        return False


def _handle_protocol_error(self: Any, event: Any) -> Any:
    flow = self.flow
    if (
        isinstance(event, http_layer.ResponseProtocolError)
        and _BACKEND in flow.metadata
        and flow.response is None
        and flow.error is None
        and flow.live
        and not flow.request.stream
        and self.client_state == self.state_done
        and self.server_state == self.state_wait_for_response_headers
    ):
        flow.metadata[_UPSTREAM_ERROR] = event.message
        yield UpstreamFailedHook(flow)
        if flow.metadata.pop(_RETRY, False):
            yield from _resend(self)
            return
    yield from getattr(_handle_protocol_error, _ORIGINAL)(self, event)


def _resend(self: Any) -> Any:
    # The sending half of HttpStream.state_consume_request_body (11.0.2 and 12.3.1).
    ok = yield from self.make_server_connection()
    if not ok:
        return
    request = self.flow.request
    content = request.raw_content
    done_after_headers = not (content or request.trailers)
    server = self.context.server
    yield http_layer.SendHttp(
        http_layer.RequestHeaders(self.stream_id, request, done_after_headers), server
    )
    if content:
        yield http_layer.SendHttp(http_layer.RequestData(self.stream_id, content), server)
    if request.trailers:
        yield http_layer.SendHttp(
            http_layer.RequestTrailers(self.stream_id, request.trailers), server
        )
    yield http_layer.SendHttp(http_layer.RequestEndOfMessage(self.stream_id), server)


def _connect_error(stream_id: int, err: str) -> Any:
    try:
        from mitmproxy.proxy.layers.http._events import ErrorCode  # type: ignore[attr-defined]
    except ImportError:  # mitmproxy 11: no error codes
        return http_layer.ResponseProtocolError(stream_id, err)
    return http_layer.ResponseProtocolError(stream_id, err, ErrorCode.CONNECT_FAILED)


def install_patch() -> bool:
    if version.VERSION not in CHECKED_VERSIONS:
        log.warning(
            "mitmproxy %s is not a version Waypost checked (%s): no retries on another backend",
            version.VERSION,
            ", ".join(sorted(CHECKED_VERSIONS)),
        )
        return False
    uninstall_patch()
    stream = http_layer.HttpStream
    for name, patched in _PATCHES.items():
        setattr(patched, _ORIGINAL, getattr(stream, name))
        setattr(stream, name, patched)
    return True


def uninstall_patch() -> None:
    for name in _PATCHES:
        current = http_layer.HttpStream.__dict__.get(name)
        if hasattr(current, _ORIGINAL):
            setattr(http_layer.HttpStream, name, getattr(current, _ORIGINAL))


_PATCHES = {
    "make_server_connection": _make_server_connection,
    "handle_protocol_error": _handle_protocol_error,
}


# --- the addon ---------------------------------------------------------------------------------


class Router:
    def __init__(self) -> None:
        self.routes: list[Route] = []
        self.default: Route | None = None
        self.backends: dict[str, Backend] = {}
        self.addresses: frozenset[tuple[str, int]] = frozenset()
        self.budget = balance.RetryBudget(20.0, 3)
        self.retries = (3, 0.025, 1.0)  # max attempts, backoff, max backoff
        self.breaker_enabled = True
        self._routed: dict[str, set[tuple[str, int]]] = {}
        self._checker: asyncio.Task[None] | None = None
        self._running = False
        self._patched = False

    def load(self, loader: Any) -> None:
        loader.add_option(
            "routing_rules",
            str,
            "[]",
            'Routing rules as a JSON list, first match wins, e.g. [{"name": "api", "match": {"host": "api.example.com", "path": "/v1"}, "forward": {"backends": [{"url": "http://10.0.0.5:8080", "weight": 2}], "strip_prefix": "/v1"}}]; see the README for every field.',
        )
        loader.add_option(
            "routing_default_backend",
            str,
            "",
            "Backend URL (http://host:port) for requests on a reverse listener that match no rule; empty: such requests get 404 NOT_FOUND.",
        )
        for name, typ, default, text in (
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
        ):  # fmt: skip
            loader.add_option(name, typ, default, text)
        self._patched = install_patch()

    def configure(self, updated: set[str]) -> None:
        if not any(k.startswith(("routing_", "router_")) for k in updated):
            return
        o = ctx.options
        try:
            rules = parse_rules(o.routing_rules)
        except ValueError as e:
            raise exceptions.OptionsError(f"routing_rules: {e}") from None
        try:
            default = (
                RULES.validate_python(
                    [{"name": "default", "forward": {"target": o.routing_default_backend}}]
                )[0]
                if o.routing_default_backend
                else None
            )
        except ValidationError as e:
            msg = e.errors()[0]["msg"].removeprefix("Value error, ")
            raise exceptions.OptionsError(f"routing_default_backend: {msg}") from None
        durations = {}
        for name in (
            "router_retries_backoff",
            "router_retries_max_backoff",
            "router_health_checks_interval",
            "router_health_checks_timeout",
            "router_circuit_breaker_timeout",
        ):
            try:
                durations[name] = units.parse_duration(getattr(o, name))
            except ValueError as e:
                raise exceptions.OptionsError(f"{name}: {e}") from None
        for name in (
            "router_retries_max_attempts",
            "router_health_checks_unhealthy_threshold",
            "router_health_checks_healthy_threshold",
            "router_circuit_breaker_failure_threshold",
            "router_circuit_breaker_success_threshold",
        ):
            if getattr(o, name) < 1:
                raise exceptions.OptionsError(f"{name}: must be at least 1")
        if durations["router_health_checks_interval"] <= 0:
            raise exceptions.OptionsError("router_health_checks_interval: must be more than 0s")
        if not o.router_health_checks_path.startswith("/"):
            raise exceptions.OptionsError("router_health_checks_path: must start with /")

        # Build the new state, reusing each backend's state (breaker, health) by name.
        backends: dict[str, Backend] = {}

        def backend(spec_url: str, name: str | None) -> Backend:
            scheme, host, port = split_url(spec_url)
            key = name or (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            b = backends.get(key)
            if b is None:
                b = self.backends.get(key)
                if b is None or (b.scheme, b.host, b.port) != (scheme, host, port):
                    b = Backend(key, scheme, host, port)
                backends[key] = b
            b.breaker.failure_threshold = o.router_circuit_breaker_failure_threshold
            b.breaker.timeout = durations["router_circuit_breaker_timeout"]
            b.breaker.success_threshold = o.router_circuit_breaker_success_threshold
            b.health.unhealthy_threshold = o.router_health_checks_unhealthy_threshold
            b.health.healthy_threshold = o.router_health_checks_healthy_threshold
            return b

        def route(rule: RouteRule, index: int) -> Route:
            fwd = rule.forward
            if fwd.target is not None:
                members, weights = [backend(fwd.target, None)], [1]
            else:
                members = [backend(s.url, s.name) for s in fwd.backends]
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

        self.routes = [route(r, i) for i, r in enumerate(rules)]
        self.default = route(default, 0) if default is not None else None
        self.backends = backends
        self.addresses = frozenset((b.host, b.port) for b in backends.values())
        self.retries = (
            o.router_retries_max_attempts,
            durations["router_retries_backoff"],
            durations["router_retries_max_backoff"],
        )
        self.budget.percent = o.router_retries_budget_percent
        self.budget.minimum = o.router_retries_budget_min
        self.breaker_enabled = o.router_circuit_breaker_enabled
        self.check_interval = durations["router_health_checks_interval"]
        self.check_timeout = durations["router_health_checks_timeout"]
        if not o.router_health_checks_enabled:
            for b in backends.values():  # nothing would ever make them healthy again
                b.health.healthy = True
        STORE.router = self
        if self._running:  # restart with the new backends and settings
            self._start_checks()

    # --- lifecycle ---------------------------------------------------------------------------

    def running(self) -> None:
        STORE.router = self
        self._running = True
        self._start_checks()

    def done(self) -> None:
        uninstall_patch()
        self._running = False
        if self._checker is not None:
            self._checker.cancel()
            self._checker = None

    def _start_checks(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
            self._checker = None
        if ctx.options.router_health_checks_enabled and self.backends:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # configure outside the loop (unit tests)
                return
            self._checker = loop.create_task(self._check_loop(list(self.backends.values())))

    async def _check_loop(self, backends: list[Backend]) -> None:
        import aiohttp

        path = ctx.options.router_health_checks_path
        timeout = aiohttp.ClientTimeout(total=self.check_timeout)
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
            while True:
                await asyncio.gather(
                    *(self._check(session, b, path) for b in backends), return_exceptions=True
                )
                await asyncio.sleep(self.check_interval)

    async def _check(self, session: Any, b: Backend, path: str) -> None:
        try:
            async with session.get(b.url + path, allow_redirects=False) as resp:
                ok = resp.status < 400
                reason = f"health check status {resp.status}"
        except TimeoutError:
            ok, reason = False, "health check timeout"
        except Exception as e:  # connection refused, reset, DNS: all mean not healthy
            ok, reason = False, f"health check failed: {type(e).__name__}"
        if not ok:
            b.failures.append(balance.Failure(time.time(), reason))
        changed = b.health.record(ok)
        if changed is not None:
            self._log_health(b, reason if not ok else "health check passed")

    # --- hooks -------------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or flow.websocket:
            return
        req = flow.request
        if req.method == "CONNECT":
            return
        if not self.routes and self.default is None:
            return
        if errors.waypost(flow).get("local"):
            return  # rerouted to the proxy itself (CLI on the proxy port): never a backend's
        reverse = isinstance(flow.client_conn.proxy_mode, mode_specs.ReverseMode)
        host = balance.request_host(req.host_header, req.host)
        path = req.path.partition("?")[0]
        chosen = None
        for r in self.routes:
            if r.matcher.matches(req.method, host, path, req.headers):
                chosen = r
                break
        if chosen is None and reverse:
            chosen = self.default
        meta = errors.waypost(flow)
        if chosen is None:
            meta["route_cache"] = None
            if reverse and self.routes:
                meta["decision"] = "no_route"
                flow.response = errors.make(
                    "NOT_FOUND", "No routing rule matches this request.", flow
                )
            return
        meta["route"] = chosen.name
        meta["route_cache"] = chosen.cache
        flow.metadata[_ROUTE] = chosen
        if req.stream or req.method not in ("GET", "HEAD"):
            # mitmproxy connects before `request` for these (streamed bodies), and the cache
            # never looks them up: rewrite now.
            self._dispatch(flow, chosen)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        chosen = flow.metadata.get(_ROUTE)
        if chosen is not None and _BACKEND not in flow.metadata:
            self._dispatch(flow, chosen)

    def _dispatch(self, flow: http.HTTPFlow, route: Route) -> None:
        now = time.monotonic()
        self.budget.request(now)
        b = route.pool.choose(now, breaker=self.breaker_enabled)
        if b is None:
            meta = errors.waypost(flow)
            meta["decision"] = "circuit_open"
            flow.response = errors.make(
                "CIRCUIT_OPEN",
                "No backend is available for this request (all unhealthy or circuits open).",
                flow,
                headers={"Retry-After": "1"},
            )
            return
        req = flow.request
        if route.strip_prefix:
            req.path = balance.strip_prefix(req.path, route.strip_prefix)
        if route.timeout is not None:
            errors.waypost(flow)["read_timeout"] = route.timeout
        flow.metadata[_TRIED] = [b]
        self._point(flow, route, b, now)

    def _point(self, flow: http.HTTPFlow, route: Route, b: Backend, now: float) -> None:
        req = flow.request
        req.scheme = b.scheme
        req.data.host = b.host
        req.data.port = b.port
        if not route.preserve_host:  # else the client's Host (or h2 :authority) stays
            req.host_header = b.hostport
        if self.breaker_enabled:
            b.breaker.start_trial(now)
            if b.breaker.half_opened:
                b.breaker.half_opened = False
                self._log_circuit(b, ("open", "half_open"), "timeout passed, trial request")
        b.active += 1
        b.requests += 1
        flow.metadata[_BACKEND] = b
        errors.waypost(flow)["backend"] = b.name
        self._routed.setdefault(flow.client_conn.id, set()).add((b.host, b.port))

    async def waypost_upstream_failed(self, flow: http.HTTPFlow) -> None:
        b: Backend | None = flow.metadata.get(_BACKEND)
        err = str(flow.metadata.pop(_UPSTREAM_ERROR, ""))
        if b is None or err.startswith("Connection killed"):  # refused by policy, not down
            return
        now = time.monotonic()
        meta = errors.waypost(flow)
        timed_out = meta.get("timed_out")
        reason = timed_out or upstream.reason_of(err)
        self._outcome(flow, b, False, reason)
        if timed_out:  # the backend may still be working on it: never sent twice
            return
        route: Route | None = flow.metadata.get(_ROUTE)
        tried: list[Backend] = flow.metadata.setdefault(_TRIED, [b])
        max_attempts, base, cap = self.retries
        if route is None or flow.request.method not in balance.IDEMPOTENT:
            return
        if len(tried) >= max_attempts:
            return
        nxt = route.pool.choose(now, exclude=tried, breaker=self.breaker_enabled)
        if nxt is None:
            return
        if not self.budget.try_retry(now):
            meta["retry_budget_exhausted"] = True
            log.warning("retry budget exhausted; not retrying %s", errors.request_id(flow))
            return
        await asyncio.sleep(balance.backoff(len(tried), base, cap))
        if not flow.live or flow.error:
            return
        STORE.retries[b.name] = STORE.retries.get(b.name, 0) + 1
        tried.append(nxt)
        meta["retries"] = len(tried) - 1
        flow.metadata.pop(_DONE, None)
        self._point(flow, route, nxt, time.monotonic())
        flow.metadata[_RETRY] = True
        log.info(
            "retrying on %s after %s failed (%s) request_id=%s",
            nxt.name,
            b.name,
            reason,
            errors.request_id(flow),
        )

    def response(self, flow: http.HTTPFlow) -> None:
        b: Backend | None = flow.metadata.get(_BACKEND)
        resp = flow.response
        if b is None or resp is None or flow.metadata.get(_DONE):
            return
        failed = errors.waypost(flow).get("backend_error")
        if failed is not None:  # the backend failed and the cache answered stale instead
            self._outcome(flow, b, False, failed)
            return
        status = resp.status_code
        ok = status not in FAILURE_STATUSES
        if status == 503:
            pause = balance.retry_after(resp.headers.get("retry-after"))
            if pause:
                b.unavailable_until = time.monotonic() + pause
        end = resp.timestamp_end or time.time()
        STORE.observe(b.name, max(0.0, end - flow.request.timestamp_start))
        self._outcome(flow, b, ok, f"status {status}")

    def error(self, flow: http.HTTPFlow) -> None:
        b: Backend | None = flow.metadata.get(_BACKEND)
        if b is None or flow.metadata.get(_DONE) or flow.error is None:
            return
        reason = errors.waypost(flow).get("timed_out") or upstream.reason_of(flow.error.msg)
        if reason in ("client_disconnected", "connection_killed"):
            self._release(flow, b)
            return
        self._outcome(flow, b, False, reason)

    def _release(self, flow: http.HTTPFlow, b: Backend) -> None:
        if not flow.metadata.get(_DONE):
            flow.metadata[_DONE] = True
            b.active = max(0, b.active - 1)

    def _outcome(self, flow: http.HTTPFlow, b: Backend, ok: bool, reason: str) -> None:
        self._release(flow, b)
        now = time.monotonic()
        if not ok:
            b.failures.append(balance.Failure(time.time(), reason))
            key = (b.name, reason)
            STORE.errors[key] = STORE.errors.get(key, 0) + 1
            if ctx.options.router_health_checks_enabled:
                if b.health.record(False) is not None:
                    self._log_health(b, reason)
        if self.breaker_enabled:
            if b.breaker.half_opened:  # went half-open while not chosen: report it first
                b.breaker.half_opened = False
                self._log_circuit(b, ("open", "half_open"), "timeout passed")
            change = b.breaker.record(ok, now)
            if change is not None:
                self._log_circuit(b, change, reason if not ok else "trial succeeded")

    @staticmethod
    def _log_circuit(b: Backend, change: tuple[str, str], why: str) -> None:
        log.warning(
            "circuit %s -> %s for backend %s (%s)",
            change[0],
            change[1],
            b.name,
            why,
            extra={
                "waypost": {"backend": b.name, "circuit_from": change[0], "circuit_to": change[1]}
            },
        )

    @staticmethod
    def _log_health(b: Backend, reason: str) -> None:
        state = "healthy" if b.health.healthy else "unhealthy"
        log.warning(
            "backend %s is %s (%s)",
            b.name,
            state,
            reason,
            extra={"waypost": {"backend": b.name, "health": state}},
        )

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        server = data.server
        if server.address and (server.address[0].lower(), server.address[1]) in self.addresses:
            server.via = _DEAD_VIA  # type: ignore[assignment]

    def client_disconnected(self, client: connection.Client) -> None:
        self._routed.pop(client.id, None)

    # --- for other addons ----------------------------------------------------------------------

    def egress_exempt(self, client: connection.Client, address: tuple[str, int] | None) -> bool:
        """Whether `address` is a backend the operator configured, dialled on a reverse
        listener or for a request this addon routed on that client connection."""
        if not address:
            return False
        key = (str(address[0]).lower().strip("[]"), int(address[1]))
        if key not in self.addresses:
            return False
        if isinstance(client.proxy_mode, mode_specs.ReverseMode):
            return True
        return key in self._routed.get(client.id, ())

    def backend_states(self) -> list[dict[str, Any]]:
        now, wall = time.monotonic(), time.time()
        out = []
        for b in self.backends.values():
            out.append(
                {
                    "name": b.name,
                    "url": b.url,
                    "status": "healthy" if b.health.healthy else "unhealthy",
                    "circuit": b.breaker.state,
                    "available": b.health.healthy
                    and now >= b.unavailable_until
                    and (not self.breaker_enabled or b.breaker.peek(now)),
                    "active_requests": b.active,
                    "requests": b.requests,
                    "consecutive_failures": b.breaker.failures,
                    "retry_after_seconds": round(max(0.0, b.unavailable_until - now), 3),
                    "circuit_opened": (
                        _iso(wall - (now - b.breaker.opened_at))
                        if b.breaker.state != "closed"
                        else None
                    ),
                    "last_failures": [
                        {"at": _iso(f.at), "reason": f.reason} for f in reversed(b.failures)
                    ],
                }
            )
        return out

    def readiness_check(self) -> tuple[str, dict[str, Any]]:
        states = self.backend_states()
        ok = not states or any(s["available"] for s in states)
        return "backends", {
            "ok": ok,
            "backends": {
                s["name"]: {"status": s["status"], "circuit": s["circuit"], "url": s["url"]}
                for s in states
            },
        }

    def management_routes(self) -> dict[str, Any]:
        return {"/admin/backends": self._admin_backends}

    async def _admin_backends(self, request: Any) -> Any:
        from aiohttp import web

        if request.method not in ("GET", "HEAD"):
            return web.json_response(
                json.loads(errors.body("METHOD_NOT_ALLOWED", "Use GET.", errors.new_request_id())),
                status=405,
                headers={"Allow": "GET, HEAD"},
            )
        return web.json_response(
            {"timestamp": errors.timestamp(), "backends": self.backend_states()},
            headers={"Cache-Control": "no-store"},
        )


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


addons = [Router()]
