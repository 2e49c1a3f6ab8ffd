"""Router: routing rules, backend pools, health checks, circuit breakers and retries.

mitmproxy gives a reverse listener one fixed target; this addon picks the backend per request.
Rules match on host, path, headers and method (first match wins) and forward to one target or
a pool (round robin, smooth weighted round robin, least connections) of the backends that are
healthy and whose circuit breaker lets requests through. No backend available: 503
CIRCUIT_OPEN at once. Rules apply on reverse listeners and, where one matches, in forward mode.

Hooks:
- `requestheaders`: match the rule; records `record(flow)["route"]` (rule id) and
  `["route_cache"]` (the rule's `cache`, None without a rule) for the cache addon. Requests
  that mitmproxy connects for before `request` (streamed bodies, and every method but GET and
  HEAD, which the cache never looks up) are also rewritten here.
- `request`: choose the backend and rewrite the target (scheme, host, port, strip_prefix,
  Host header); records `["backend"]`. Runs after the cache looked up the client's URL.
- `waypost_upstream_failed` (our own event, fired by the retry patches): the connect to the
  chosen backend failed, or its connection failed before any response byte; for idempotent
  methods, within the per-request attempt cap and the global retry budget, wait (exponential
  backoff, full jitter) and point the flow at another backend; mitmproxy then connects (and,
  in the second case, sends the request) again. Read timeouts are not retried.
- `response` / `error`: passive health and breaker accounting, per-backend latency and
  errors; a 503 with `Retry-After` takes the backend out of rotation for that long.
- `server_connect_error`: keeps mitmproxy from answering later requests on the same client
  connection with a cached connect error for a backend that may be back.
- `running` / `done`: the active health-check task (aiohttp client); shared breakers.
- `management_routes()`: `GET /admin/backends`; `readiness_check()`: the backends' states.
- `egress_exempt(client, address)`: asked by the egress addon for operator-configured backends.

Options (flat; a profile's `routing`, `health_checks`, `circuit_breaker` sections set them):
`routing_rules` (JSON list of rules, see docs/routing.md), `routing_default_backend`,
`router_retries_{max_attempts,backoff,max_backoff,budget_percent,budget_min}`,
`router_health_checks_{enabled,interval,timeout,path,unhealthy_threshold,healthy_threshold}`,
`router_circuit_breaker_{enabled,failure_threshold,timeout,success_threshold}`;
`state_*` (`addons/state.py`): with state_backend redis, breaker failures, openings and
closings are shared by every worker and instance (`addons/routing/shared.py`).

The retry patches (`addons/routing/retry.py`, through `addons/kernel/patching.py`) give
mitmproxy a second connect after a failed one, and a resend after a connection that failed
before any response byte; on a mitmproxy version that was not checked there are no retries
(a WARNING says so), everything else works.

The addon lives in the `addons/routing/` package: `router.py` (the hooks), `options.py` (the
option table, routes and backends from the options), `balance.py` (pure matching, pools,
breakers, health, retry budget), `retry.py` (the patches), `health.py` (active checks),
`admin.py` (`/admin/backends`, readiness), `stats.py` (the metrics collector), `shared.py`
(breakers shared through Redis).
"""

from __future__ import annotations

from addons.routing.router import Router

addons = [Router()]
