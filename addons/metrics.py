"""Prometheus metrics for every request the proxy handles.

The metrics live in one `CollectorRegistry` per process (`REGISTRY`), which the management
app (`addons/management.py`) exposes on its metrics path. Label values come only from a fixed
method set, the status code and the `decision`/`rule` ids other addons record in
`errors.waypost(flow)`, never from raw hosts or paths.

Metrics:
    http_requests_total{method,status}        requests answered (CONNECT counts as CONNECT;
                                              status "error" when no response was sent)
    http_request_duration_seconds             request start to response end (histogram)
    http_request_bytes_total{direction}       body bytes, "in" from clients, "out" to clients
    proxy_active_connections                  open client connections
    policy_decisions_total{decision,rule}     flows with a recorded policy decision

Hooks: response, error, http_connected, http_connect_error, client_connected,
client_disconnected. Options: none. Add it last in the chain so it sees every decision.
Flows answered locally (`waypost(flow)["local"]`, e.g. health probes on the proxy port) are
not counted.
"""

from __future__ import annotations

import time
from typing import NamedTuple

from mitmproxy import connection, http
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from addons import errors

METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
# Proxy latencies: sub-millisecond cache hits up to long uploads and slow origins.
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Bound on distinct (decision, rule) pairs: rules are config ids, but a misbehaving addon must
# not be able to grow the registry without limit.
MAX_DECISION_SERIES = 1000
_COUNTED = "metrics_counted"


def method_label(method: str) -> str:
    """The method as a label: one of the standard methods, else "OTHER"."""
    return method if method in METHODS else "OTHER"


class _Metrics(NamedTuple):
    registry: CollectorRegistry
    requests: Counter
    duration: Histogram
    bytes_in: Counter
    bytes_out: Counter
    connections: Gauge
    decisions: Counter
    request_children: dict[tuple[str, int | str], Counter]
    decision_children: dict[tuple[str, str], Counter]
    open_clients: set[str]


def _define() -> _Metrics:
    registry = CollectorRegistry(auto_describe=True)
    size = Counter(
        "http_request_bytes_total",
        "Body bytes received from clients (in) and sent to clients (out).",
        ["direction"],
        registry=registry,
    )
    return _Metrics(
        registry=registry,
        requests=Counter(
            "http_requests_total",
            "Requests answered, by method and response status.",
            ["method", "status"],
            registry=registry,
        ),
        duration=Histogram(
            "http_request_duration_seconds",
            "Time from the first request byte to the last response byte.",
            buckets=BUCKETS,
            registry=registry,
        ),
        bytes_in=size.labels("in"),
        bytes_out=size.labels("out"),
        connections=Gauge(
            "proxy_active_connections", "Open client connections.", registry=registry
        ),
        decisions=Counter(
            "policy_decisions_total",
            "Flows with a policy decision, by decision and the rule id that made it.",
            ["decision", "rule"],
            registry=registry,
        ),
        request_children={},
        decision_children={},
        open_clients=set(),
    )


if __name__ == "addons.metrics":
    METRICS = _define()
else:
    # Loaded by mitmproxy as a script (`-s addons/metrics.py`, module `__mitmproxy_script__.*`,
    # re-executed on every reload): share the package module's registry, which is the one the
    # management app serves, instead of registering a second set of metrics.
    try:
        from addons.metrics import METRICS
    except ImportError:  # the package is not importable: this file is all there is
        METRICS = _define()

REGISTRY: CollectorRegistry = METRICS.registry


def _record(flow: http.HTTPFlow, status: int | str, end: float) -> None:
    meta = errors.waypost(flow)
    if _COUNTED in meta or "local" in meta:  # counted already / a probe the proxy answered
        return
    meta[_COUNTED] = True
    m = METRICS
    req = flow.request
    method = req.method
    key = (method if method in METHODS else "OTHER", status)
    child = m.request_children.get(key)
    if child is None:
        child = m.request_children[key] = m.requests.labels(key[0], str(status))
    child.inc()
    m.duration.observe(max(0.0, end - req.timestamp_start))
    if method != "CONNECT":
        body = req.raw_content
        if body:
            m.bytes_in.inc(len(body))
        resp = flow.response
        if resp is not None:
            body = resp.raw_content
            if body:
                m.bytes_out.inc(len(body))
    decision = meta.get("decision")
    if decision:
        dkey = (str(decision), str(meta.get("rule") or ""))
        dchild = m.decision_children.get(dkey)
        if dchild is None:
            if len(m.decision_children) >= MAX_DECISION_SERIES:
                dkey = (dkey[0], "_other")
            dchild = m.decision_children.get(dkey) or m.decisions.labels(*dkey)
            m.decision_children[dkey] = dchild
        dchild.inc()


class Metrics:
    def response(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is not None:
            _record(flow, resp.status_code, resp.timestamp_end or time.time())

    def error(self, flow: http.HTTPFlow) -> None:
        # A response may already be (partly) on the wire, e.g. a client that left mid-stream.
        resp = flow.response
        status: int | str = resp.status_code if resp is not None else "error"
        end = flow.error.timestamp if flow.error is not None else time.time()
        _record(flow, status, end)

    def http_connected(self, flow: http.HTTPFlow) -> None:
        self.http_connect_error(flow)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is not None:
            _record(flow, resp.status_code, time.time())

    def client_connected(self, client: connection.Client) -> None:
        if client.id not in METRICS.open_clients:
            METRICS.open_clients.add(client.id)
            METRICS.connections.inc()

    def client_disconnected(self, client: connection.Client) -> None:
        # Only connections this process counted: a reload or a late load never goes negative.
        if client.id in METRICS.open_clients:
            METRICS.open_clients.discard(client.id)
            METRICS.connections.dec()


addons = [Metrics()]
