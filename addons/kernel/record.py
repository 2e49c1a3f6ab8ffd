"""The flow record: what Waypost's addons note on a flow for each other and for the access log.

`record(flow)` returns `flow.metadata["waypost"]`, created empty on first use. `Record` declares
every key it may hold; `tests/unit/test_record.py` fails when code uses an undeclared key or
when a declared key is never written. It stays a plain dict at runtime (a `TypedDict`), because
mitmweb shows `flow.metadata`, flows are serialised with it, and the access log copies every key
into the request's line: values are JSON scalars or lists of strings.
"""

from __future__ import annotations

from typing import Literal, TypedDict

from mitmproxy import http


class Record(TypedDict, total=False):
    """Every key is optional: an absent key means no addon had anything to say."""

    # --- the request ---

    # Written by errors.request_id (a valid incoming X-Request-ID, else a new UUID), the first
    # time anyone asks; read back through errors.request_id by error bodies, logs, the CLI.
    request_id: str
    # The client's IP, behind trusted proxies the forwarded one. Written by kernel.net.client_ip
    # the first time any addon asks (acl, ratelimit, forwarding, ...); read by the access log.
    client_ip: str
    # The proxy answers this flow itself: "health", "metrics" or "admin" (management: its
    # endpoints on the proxy port) or "cli" (the CLI rerouted /cli/execute to its own listener). Read by metrics (not counted),
    # cache, router, filter and contentfilter (skip it) and egress ("cli" may reach that listener).
    local: Literal["health", "metrics", "admin", "cli"]
    # The trace id (32 hex digits) of the request's server span, written by tracing when the
    # request is traced; the access log shows it as trace_id.
    trace_id: str

    # --- policy decisions ---

    # The decision that ended the request. Written by policy.decide when enforcing (its
    # `decision` argument: "block", "deny", "refuse", "limit", ...), egress and hygiene
    # ("blocked"), the router ("no_route", "circuit_open"), errors.fail_closed
    # ("internal_error"). Read by metrics (policy_decisions_total unless `policy` is set) and
    # the access log.
    decision: str
    # The rule behind `decision`, a config id ("deny:192.0.2.0/24", "connect_ports", ...).
    # Written with `decision` by policy.decide, egress and hygiene; read by metrics.
    rule: str
    # The policy that decided ("acl", "filter", "ratelimit", ...), written by policy.decide;
    # metrics reads its presence to know the decision was counted already.
    policy: str
    # Shadow-mode hits as "policy:rule", in order: what would have been refused. Appended by
    # policy.decide; the access log shows them.
    shadow: list[str]
    # The policy label of a refusal not made through policy.decide's counting: "egress",
    # "hygiene", "filter", "content_filter". Written by those addons; read by metrics
    # (default "core").
    blocked_by: str
    # Requests hygiene repaired instead of refusing: "host_rewritten", "h2c_stripped".
    # Appended by hygiene; the access log shows them.
    hygiene: list[str]
    # "passthrough", "intercept" or "tcp" (not TLS, relayed raw): tlspolicy's choice for a
    # tunnel, written on its CONNECT flow. The access log shows it.
    tls: str

    # --- routing and the backend ---

    # The routing rule's name, written by the router when a rule matched; the cache treats a
    # routed request like a reverse-proxied one (Surrogate-Control).
    route: str
    # The matched rule's `cache` setting (None: no rule matched, no opinion). Written by the
    # router; the cache stores only when it is True, or None with its patterns matching.
    route_cache: bool | None
    # The rule's read timeout in seconds, overriding upstream_read_timeout. Written by the
    # router; read by upstream's read watchdog.
    read_timeout: float
    # The backend that served the request, a config id: the router's backend name, or "cli".
    # Written by the router and the CLI; read by metrics (label) and the access log.
    backend: str
    # Why the backend failed: a reason from errors.reason_of ("connection_refused",
    # "connect_timeout", "read_timeout", "closed", ...) or "status NNN" when the cache answered
    # stale for a failed origin. Written by upstream and the cache; read by the router's
    # breaker.
    backend_error: str
    # "read_timeout" once upstream's watchdog closed the backend connection: the error that
    # follows is then a timeout, not a close. Read by upstream, the router (never retried) and
    # the cache (stale-if-error reason).
    timed_out: Literal["read_timeout"]
    # How many times the router retried on another backend; the access log shows it.
    retries: int
    # True when the router wanted to retry but the retry budget was spent.
    retry_budget_exhausted: bool

    # --- the answer ---

    # The error code (an errors.STATUS key) of the answer the proxy made itself. Written by
    # errors.make and upstream; read by the access log (status of a flow without a response),
    # upstream and contentfilter (leave the proxy's own answers alone), the cache (never
    # stores them).
    error_code: str
    # The cache's result: "HIT", "MISS", "STALE", "REVALIDATED", "BYPASS", "EXPIRED" (as in
    # X-Cache-Status). Written by the cache; the access log derives cache_hit from it.
    cache: str
    # True when the cache served the answer (HIT, STALE, REVALIDATED). Written by the cache;
    # read by the access log and forwarding (no second Via on a stored answer).
    cache_hit: bool
    # The content coding compress applied to the response ("zstd", "br", "gzip");
    # the access log shows it.
    compression: str


def record(flow: http.HTTPFlow) -> Record:
    """The flow's record, created empty on first use. One dict lookup: it runs many times per
    request."""
    rec = flow.metadata.get("waypost")
    if rec is None:
        rec = flow.metadata["waypost"] = {}
    return rec
