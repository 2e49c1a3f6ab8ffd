"""The Router addon: picks the backend per request, keeps the backends' health and breakers.

The hooks, in the order mitmproxy runs them (see addons/router.py for the whole addon):
- `requestheaders`: match the rule (`route`, `route_cache` in the waypost record); requests
  mitmproxy connects for before `request` (streamed bodies, every method but GET and HEAD)
  are rewritten here too.
- `request`: choose the backend, rewrite the target (`backend` in the record).
- `waypost_upstream_failed` (fired by `retry.py`'s patches): maybe retry on another backend.
- `response` / `error`: passive health and breaker accounting, latency and error metrics.
  Only the backend's failures count (`balance.backend_fault`): connect failures, a close or
  reset before the response ended, a read timeout, a 502/503/504 it sent; a client's mistakes
  and policy kills never do. Every response from the backend counts as a success.
- `server_connect_error`, `client_disconnected`: connection bookkeeping.
- `running` / `done`: the health-check task, the retry patches, shared breakers (`shared.py`:
  with state_backend redis, openings and closings reach every process and instance).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from mitmproxy import connection, ctx, http
from mitmproxy.proxy import mode_specs, server_hooks

from addons import errors, state
from addons.kernel.record import record
from addons.routing import admin, balance, health, options, retry
from addons.routing.balance import Backend
from addons.routing.options import Route
from addons.routing.retry import BACKEND, RETRY, UPSTREAM_ERROR
from addons.routing.shared import SharedBreakers
from addons.routing.stats import STORE

log = logging.getLogger("waypost.router")

# Per-flow bookkeeping beside (not in) the waypost record, which the access log prints.
_ROUTE = "waypost_router_rule"
_TRIED = "waypost_router_tried"
_DONE = "waypost_router_done"
_TRIAL = "waypost_router_trial"  # this flow holds its backend's half-open trial slot
# A failed connection keeps matching its address in mitmproxy's per-client connection list
# and is answered with its old error; a `via` nobody asks for takes it out of matching.
_DEAD_VIA = ("http", ("waypost-router-failed-connection", 0))


class Router:
    def __init__(self) -> None:
        self.routes: list[Route] = []
        self.default: Route | None = None
        self.backends: dict[str, Backend] = {}
        self.addresses: frozenset[tuple[str, int]] = frozenset()
        self.budget = balance.RetryBudget(20.0, 3)
        self.retries = (3, 0.025, 1.0)  # max attempts, backoff, max backoff
        self.breaker_enabled = True
        self.check_interval = 10.0
        self.check_timeout = 2.0
        self._routed: dict[str, set[tuple[str, int]]] = {}
        self._checks = health.HealthChecks()
        # Without breakers there is nothing to share (and no Redis call to make for them).
        self.shared = SharedBreakers(lambda: self.backends if self.breaker_enabled else {})
        self._running = False
        self._patched = False

    def load(self, loader: Any) -> None:
        for name, typ, default, text in options.OPTIONS:
            loader.add_option(name, typ, default, text)
        state.load(loader)
        self._patched = retry.install()

    def configure(self, updated: set[str]) -> None:
        state.configure(updated)
        if self._running and any(k.startswith("state_") for k in updated):
            self.shared.start()
        if not any(k.startswith(("routing_", "router_")) for k in updated):
            return
        s = options.settings(ctx.options, self.backends)
        self.routes, self.default, self.backends = s.routes, s.default, s.backends
        self.addresses = frozenset((b.host, b.port) for b in s.backends.values())
        self.retries = s.retries
        self.budget.percent = s.budget_percent
        self.budget.minimum = s.budget_min
        self.breaker_enabled = s.breaker_enabled
        self.check_interval, self.check_timeout = s.check_interval, s.check_timeout
        STORE.router = self
        if self._running:  # restart with the new backends and settings
            self._start_checks()

    def running(self) -> None:
        STORE.router = self
        self._running = True
        self._start_checks()
        self.shared.start()

    def done(self) -> None:
        retry.uninstall()
        self._running = False
        self._checks.stop()
        self.shared.stop()
        state.done()

    def _start_checks(self) -> None:
        self._checks.stop()
        if ctx.options.router_health_checks_enabled:
            self._checks.start(
                list(self.backends.values()),
                ctx.options.router_health_checks_path,
                self.check_interval,
                self.check_timeout,
            )

    # --- choosing the backend ----------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or flow.websocket:
            return
        req = flow.request
        if req.method == "CONNECT" or (not self.routes and self.default is None):
            return
        meta = record(flow)
        if meta.get("local"):
            return  # rerouted to the proxy itself (CLI on the proxy port): never a backend's
        chosen = self._match(flow)
        if chosen is None:
            meta["route_cache"] = None
            if self.routes and isinstance(flow.client_conn.proxy_mode, mode_specs.ReverseMode):
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

    def _match(self, flow: http.HTTPFlow) -> Route | None:
        req = flow.request
        host = balance.request_host(req.host_header, req.host)
        path = req.path.partition("?")[0]
        for r in self.routes:
            if r.matcher.matches(req.method, host, path, req.headers):
                return r
        if isinstance(flow.client_conn.proxy_mode, mode_specs.ReverseMode):
            return self.default
        return None

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        chosen = flow.metadata.get(_ROUTE)
        if chosen is not None and BACKEND not in flow.metadata:
            self._dispatch(flow, chosen)

    def _dispatch(self, flow: http.HTTPFlow, route: Route) -> None:
        now = time.monotonic()
        self.budget.request(now)
        b = route.pool.choose(now, breaker=self.breaker_enabled)
        if b is None:
            meta = record(flow)
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
            record(flow)["read_timeout"] = route.timeout
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
            if b.breaker.start_trial(now):
                flow.metadata[_TRIAL] = True
            if b.breaker.half_opened:
                b.breaker.half_opened = False
                health.log_circuit(b, ("open", "half_open"), "timeout passed, trial request")
        b.active += 1
        b.requests += 1
        flow.metadata[BACKEND] = b
        record(flow)["backend"] = b.name
        self._routed.setdefault(flow.client_conn.id, set()).add((b.host, b.port))

    # --- retries -------------------------------------------------------------------------------

    async def waypost_upstream_failed(self, flow: http.HTTPFlow) -> None:
        b: Backend | None = flow.metadata.get(BACKEND)
        err = str(flow.metadata.pop(UPSTREAM_ERROR, ""))
        if b is None:
            return
        meta = record(flow)
        timed_out = meta.get("timed_out")
        reason = timed_out or errors.reason_of(err)
        complete = flow.request.timestamp_end is not None
        fault = balance.backend_fault(reason, complete, flow.response is not None)
        if fault is None:  # refused by policy, or the client's side: not down, not retried
            self._release(flow, b)
            return
        self._outcome(flow, b, fault)
        if timed_out:  # the backend may still be working on it: never sent twice
            return
        route: Route | None = flow.metadata.get(_ROUTE)
        tried: list[Backend] = flow.metadata.setdefault(_TRIED, [b])
        nxt = self._next_backend(flow, route, tried)
        if route is None or nxt is None:
            return
        await asyncio.sleep(balance.backoff(len(tried), self.retries[1], self.retries[2]))
        if not flow.live or flow.error:
            return
        STORE.retries[b.name] = STORE.retries.get(b.name, 0) + 1
        tried.append(nxt)
        meta["retries"] = len(tried) - 1
        flow.metadata.pop(_DONE, None)
        self._point(flow, route, nxt, time.monotonic())
        flow.metadata[RETRY] = True
        log.info(
            "retrying on %s after %s failed (%s) request_id=%s",
            nxt.name,
            b.name,
            reason,
            errors.request_id(flow),
        )

    def _next_backend(
        self, flow: http.HTTPFlow, route: Route | None, tried: list[Backend]
    ) -> Backend | None:
        """Another backend to retry on, if the method, the attempt cap and the budget allow."""
        if route is None or flow.request.method not in balance.IDEMPOTENT:
            return None
        if len(tried) >= self.retries[0]:
            return None
        now = time.monotonic()
        nxt = route.pool.choose(now, exclude=tried, breaker=self.breaker_enabled)
        if nxt is None:
            return None
        if not self.budget.try_retry(now):
            record(flow)["retry_budget_exhausted"] = True
            log.warning("retry budget exhausted; not retrying %s", errors.request_id(flow))
            return None
        return nxt

    # --- outcomes ------------------------------------------------------------------------------

    def response(self, flow: http.HTTPFlow) -> None:
        b: Backend | None = flow.metadata.get(BACKEND)
        resp = flow.response
        if b is None or resp is None or flow.metadata.get(_DONE):
            return
        meta = record(flow)
        failed = meta.get("backend_error")
        if failed is not None:  # the backend failed and the cache answered stale instead
            self._outcome(flow, b, failed)
            return
        if "error_code" in meta or meta.get("cache_hit"):  # answered by the proxy, not by b
            self._release(flow, b)
            return
        status = resp.status_code
        if status == 503:
            pause = balance.retry_after(resp.headers.get("retry-after"))
            if pause:
                b.unavailable_until = time.monotonic() + pause
        end = resp.timestamp_end or time.time()
        STORE.observe(b.name, max(0.0, end - flow.request.timestamp_start))
        failure = status in balance.FAILURE_STATUSES
        self._outcome(flow, b, f"status {status}" if failure else None)

    def error(self, flow: http.HTTPFlow) -> None:
        b: Backend | None = flow.metadata.get(BACKEND)
        if b is None or flow.metadata.get(_DONE) or flow.error is None:
            return
        reason = record(flow).get("timed_out") or errors.reason_of(flow.error.msg)
        complete = flow.request.timestamp_end is not None
        fault = balance.backend_fault(reason, complete, flow.response is not None)
        if fault is None:
            self._release(flow, b)
            return
        self._outcome(flow, b, fault)

    def _release(self, flow: http.HTTPFlow, b: Backend) -> None:
        if not flow.metadata.get(_DONE):
            flow.metadata[_DONE] = True
            b.active = max(0, b.active - 1)
            if flow.metadata.pop(_TRIAL, False):
                # A trial that tells nothing (the client's mistake) frees its slot now rather
                # than after the breaker's timeout; an outcome recorded next overrides this.
                b.breaker.cancel_trial()

    def _outcome(self, flow: http.HTTPFlow, b: Backend, fault: str | None) -> None:
        """The backend answered (`fault` None) or failed for `fault`: its health and breaker."""
        self._release(flow, b)
        now = time.monotonic()
        if fault is None:
            b.health.served()
        else:
            b.failures.append(balance.Failure(time.time(), fault))
            key = (b.name, fault)
            STORE.errors[key] = STORE.errors.get(key, 0) + 1
            if ctx.options.router_health_checks_enabled:
                if b.health.record(False) is not None:
                    health.log_health(b, fault)
        if self.breaker_enabled:
            if b.breaker.half_opened:  # went half-open while not chosen: report it first
                b.breaker.half_opened = False
                health.log_circuit(b, ("open", "half_open"), "timeout passed")
            counted = b.breaker.state == "closed"
            change = b.breaker.record(fault is None, now)
            if change is not None:
                health.log_circuit(b, change, fault or "trial succeeded")
            self.shared.outcome(b, fault is None, counted, change)

    # --- connections ---------------------------------------------------------------------------

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
        return admin.backend_states(self.backends.values(), self.breaker_enabled)

    def readiness_check(self) -> tuple[str, list[dict[str, Any]], bool]:
        return admin.readiness(self.backend_states())

    def management_routes(self) -> dict[str, Any]:
        return {"/admin/backends": self._admin_backends}

    async def _admin_backends(self, request: Any) -> Any:
        return await admin.backends_page(request, self.backend_states)

    def explain(self, flow: http.HTTPFlow) -> dict[str, Any] | None:
        """POST /admin/explain: the rule that matches and its backends with their health and
        breaker state (read with `peek`: no trial taken, no request counted)."""
        if not self.routes and self.default is None:
            return None
        if flow.request.method == "CONNECT":
            return {"addon": "router", "decision": "tunnel", "rule": None}
        chosen = self._match(flow)
        if chosen is None:
            refuses = bool(self.routes) and isinstance(
                flow.client_conn.proxy_mode, mode_specs.ReverseMode
            )
            decision = "no_route" if refuses else "pass"
            return {"addon": "router", "decision": decision, "rule": None, "refuses": refuses}
        states = admin.backend_states(chosen.pool.backends, self.breaker_enabled)
        available = any(s["available"] for s in states)
        return {
            "addon": "router",
            "decision": "route" if available else "circuit_open",
            "rule": chosen.name,
            "refuses": not available,
            "strategy": chosen.pool.strategy,
            "backends": states,
            "cache": chosen.cache,
        }
