"""Prometheus metrics for every request the proxy handles.

The metrics live in one `CollectorRegistry` per process (`REGISTRY`), which the management
app (`addons/management.py`) exposes on its metrics path. Label values come only from a fixed
method set, the status code and the `decision`/`rule` ids other addons record in
`record(flow)`, never from raw hosts or paths.

Metrics:
    http_requests_total{method,status,backend}
                                              requests answered (CONNECT counts as CONNECT;
                                              status: the one the client received, the
                                              proxy's own 502/504 included, as the access
                                              log shows it (`sent_status`);
                                              "error" only when no response was sent;
                                              backend: the router's backend name, else "")
    http_request_duration_seconds             request start to response end (histogram)
    http_request_bytes_total{direction}       body bytes, "in" from clients, "out" to clients
    tunnel_bytes_total{direction}             CONNECT tunnel wire bytes, "in" from the client,
                                              "out" from the server(s) to the client; counted
                                              when the tunnel closes
    proxy_active_connections                  open client connections
    policy_decisions_total{policy,decision,rule}
                                              policy decisions: counted by `addons/policy.py`
                                              when made, or from a flow's recorded decision
    waypost_build_info{version,mitmproxy,python}
                                              always 1: the running versions

Tunnels: `watch_tunnel(flow)` (from `http_connected`) notes an established CONNECT tunnel;
`watch_layer(nextlayer)` (from `next_layer`) wraps the event handler of the CONNECT's HTTP
stream, the one place every event of the tunnel passes (TLS passthrough has no tcp_* hooks),
to add each DataReceived's length to the tunnel's counters: one call and one addition per
message. `end_tunnel(client)` (from `client_disconnected`) closes it. The access
log shares these calls, so each works without the other.

Hooks: response, error, http_connected, http_connect_error, next_layer, client_connected,
client_disconnected. Options: none. Add it last in the chain so it sees every decision.
Flows answered locally (`record(flow)["local"]`, e.g. health probes on the proxy port) are
not counted.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator

from mitmproxy import connection, http
from mitmproxy import version as mitmproxy_version
from mitmproxy.proxy import events, layer
from prometheus_client import CollectorRegistry, GCCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from addons import errors
from addons.kernel import patching
from addons.kernel.options import once
from addons.kernel.record import record
from addons.kernel.version import versions

METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
# Proxy latencies: sub-millisecond cache hits up to long uploads and slow origins.
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Bound on distinct (decision, rule) pairs: rules are config ids, but a misbehaving addon must
# not be able to grow the registry without limit.
MAX_DECISION_SERIES = 1000
# Kept beside, not in, the waypost decisions dict: it is bookkeeping, not something to log.
_COUNTED = "waypost_metrics_counted"


def method_label(method: str) -> str:
    """The method as a label: one of the standard methods, else "OTHER"."""
    return method if method in METHODS else "OTHER"


class Store:
    """The process's metric values as plain numbers, turned into Prometheus families on scrape.

    Everything runs on mitmproxy's event loop (hooks and the management app's scrape), so plain
    dict and list updates need no locks; prometheus-client's own Counter/Histogram objects take
    a lock per update and cost ~1-2 us each, several times this.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int | str, str], int] = {}
        self.buckets = [0] * (len(BUCKETS) + 1)  # per bucket, not cumulative; last is +Inf
        self.duration_sum = 0.0
        self.bytes = [0, 0]  # in, out
        self.tunnel_bytes = [0, 0]  # in, out
        self.decisions: dict[tuple[str, str, str], int] = {}
        self.open_clients: set[str] = set()
        self.build = versions()  # read once: package metadata is files on disk

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "http_requests_total",
            "Requests answered, by method, response status and backend (router addon).",
            labels=["method", "status", "backend"],
        )
        for (method, status, backend), n in self.requests.items():
            requests.add_metric([method, str(status), backend], n)
        yield requests
        cumulative, acc = [], 0
        for bound, n in zip((*map(floatToGoString, BUCKETS), "+Inf"), self.buckets, strict=True):
            acc += n
            cumulative.append((bound, acc))
        yield HistogramMetricFamily(
            "http_request_duration_seconds",
            "Time from the first request byte to the last response byte.",
            buckets=cumulative,
            sum_value=self.duration_sum,
        )
        size = CounterMetricFamily(
            "http_request_bytes_total",
            "Body bytes received from clients (in) and sent to clients (out).",
            labels=["direction"],
        )
        size.add_metric(["in"], self.bytes[0])
        size.add_metric(["out"], self.bytes[1])
        yield size
        tunnel = CounterMetricFamily(
            "tunnel_bytes_total",
            "CONNECT tunnel bytes from the client (in) and to the client (out), on the wire "
            "(TLS records included), counted when the tunnel closes.",
            labels=["direction"],
        )
        tunnel.add_metric(["in"], self.tunnel_bytes[0])
        tunnel.add_metric(["out"], self.tunnel_bytes[1])
        yield tunnel
        yield GaugeMetricFamily(
            "proxy_active_connections", "Open client connections.", len(self.open_clients)
        )
        decisions = CounterMetricFamily(
            "policy_decisions_total",
            "Policy decisions, by policy, decision and the rule id that made it.",
            labels=["policy", "decision", "rule"],
        )
        for labels, n in self.decisions.items():
            decisions.add_metric(list(labels), n)
        yield decisions
        build = GaugeMetricFamily(
            "waypost_build_info",
            "Always 1; the labels are the running Waypost, mitmproxy and Python versions.",
            labels=["version", "mitmproxy", "python"],
        )
        b = self.build
        build.add_metric([b["waypost"], b["mitmproxy"], b["python"]], 1)
        yield build


def _define() -> tuple[CollectorRegistry, Store]:
    registry = CollectorRegistry()
    store = Store()
    registry.register(store)
    # process_* (CPU, memory, fds) and python_gc_*: read at scrape time only.
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    return registry, store


# One registry per process, however often `-s addons/metrics.py` is reloaded: the management
# app serves this one.
REGISTRY, STORE = once("metrics.registry", _define)


def sent_response(flow: http.HTTPFlow) -> http.Response | None:
    """`flow.response` if it went (or was going) to the client, else None.

    An answer an addon set in `requestheaders` goes out only once the request body has been
    read; when reading it failed (a malformed or oversized body, a client that left) the
    client got the error page of that failure instead, or nothing. A streamed request cannot
    have such an answer (mitmproxy refuses both), so its response is the backend's.
    """
    resp = flow.response
    req = flow.request
    if resp is not None and flow.error is not None and req.timestamp_end is None:
        return resp if req.stream else None
    return resp


def sent_status(flow: http.HTTPFlow) -> int | None:
    """The status the client received for this flow; None when no response was sent."""
    resp = sent_response(flow)
    if resp is not None:
        return resp.status_code
    if flow.response is not None and flow.error is not None:  # set, but the body failed
        failure = errors.classify(None, flow.error.msg)
        # The wire guards answer a malformed (400) or oversized (413) body; a client that
        # left or a truncated body gets nothing.
        if failure.reason == "client_disconnected" or failure.status not in (400, 413):
            return None
        return failure.status
    code = record(flow).get("error_code")
    return errors.STATUS.get(code) if code else None


def _record(flow: http.HTTPFlow, status: int | str, end: float) -> None:
    meta = record(flow)
    if _COUNTED in flow.metadata or "local" in meta:
        return  # counted already / a probe the proxy answered
    flow.metadata[_COUNTED] = True
    st = STORE
    req = flow.request
    method = req.method
    # The backend is a config id (the router's backend name), never the client's host.
    key = (method if method in METHODS else "OTHER", status, meta.get("backend", ""))
    st.requests[key] = st.requests.get(key, 0) + 1
    elapsed = end - req.timestamp_start
    if elapsed < 0.0:
        elapsed = 0.0
    st.buckets[bisect_left(BUCKETS, elapsed)] += 1
    st.duration_sum += elapsed
    if method != "CONNECT":
        body = req.raw_content
        if body:
            st.bytes[0] += len(body)
        resp = sent_response(flow)
        if resp is not None:
            body = resp.raw_content
            if body:
                st.bytes[1] += len(body)
    decision = meta.get("decision")
    if decision and "policy" not in meta:  # policy.decide counted it when it was made
        count_decision(meta.get("blocked_by", "core"), str(decision), str(meta.get("rule") or ""))


def count_decision(policy: str, decision: str, rule: str) -> None:
    """One more policy_decisions_total{policy,decision,rule}; series beyond the cap share
    rule "_other"."""
    key = (policy, decision, rule)
    counts = STORE.decisions
    if key not in counts and len(counts) >= MAX_DECISION_SERIES:
        key = (policy, decision, "_other")
    counts[key] = counts.get(key, 0) + 1


# --- CONNECT tunnels ------------------------------------------------------------------------------


class Tunnel:
    """An established CONNECT tunnel: its flow and what crossed it."""

    __slots__ = ("flow", "client", "up", "down", "closed_by", "end", "watchers", "watched")

    def __init__(self, flow: http.HTTPFlow) -> None:
        self.flow = flow
        self.client = flow.client_conn
        self.up = 0  # bytes received from the client (client -> server)
        self.down = 0  # bytes received from the server side (server -> client)
        self.closed_by: str | None = None  # "client" or "server": who closed first
        self.end: float | None = None
        self.watchers = 0  # addons that will call end_tunnel for it
        self.watched = False  # the tunnel's layer is wrapped

    def outcome(self) -> str:
        """ "error" when either connection failed, else who closed first ("closed": unknown)."""
        if self.client.error or self.flow.server_conn.error:
            return "error"
        return f"{self.closed_by}_closed" if self.closed_by else "closed"


# Open tunnels by client connection id: an HTTP/1 client connection carries one tunnel once
# CONNECT succeeded. Shared across reloads, like the registry.
TUNNELS: dict[str, Tunnel] = once("metrics.tunnels", dict)


def watch_tunnel(flow: http.HTTPFlow) -> None:
    """Note an established CONNECT tunnel (called once per addon that will end it)."""
    resp = flow.response
    if resp is None or not 200 <= resp.status_code < 300:
        return
    t = TUNNELS.get(flow.client_conn.id)
    if t is None or t.flow is not flow:
        t = TUNNELS[flow.client_conn.id] = Tunnel(flow)
    t.watchers += 1


def watch_layer(nextlayer: layer.NextLayer) -> None:
    """Count the bytes of the tunnel whose contents `nextlayer` is about to choose a layer for.

    Script addons see this hook before mitmproxy's own next-layer addon has chosen, so the
    wrapped method is the CONNECT stream's: after the `200`, it hands every event of the
    tunnel, both connections', to `nextlayer`. What `nextlayer` buffered so far is added here.
    This wraps one object's method of mitmproxy's HTTP layer (no hook reports a tunnel's bytes),
    so, like every patch in kernel/patching.py, only on the mitmproxy versions it was read for.
    """
    t = TUNNELS.get(nextlayer.context.client.id)
    if t is None or t.watched or not patching.checked(mitmproxy_version.VERSION):
        return
    stream = next(
        (
            x
            for x in reversed(nextlayer.context.layers)
            if getattr(x, "child_layer", None) is nextlayer
        ),
        None,
    )
    if stream is None:
        return
    t.watched = True
    t.up += len(nextlayer.data_client())
    t.down += len(nextlayer.data_server())
    inner = stream._handle_event
    client = t.client
    data_received = events.DataReceived
    closed = events.ConnectionClosed

    def handle_event(event: events.Event) -> layer.CommandGenerator[None]:
        kind = type(event)
        if kind is data_received:
            if event.connection is client:  # type: ignore[attr-defined]
                t.up += len(event.data)  # type: ignore[attr-defined]
            else:
                t.down += len(event.data)  # type: ignore[attr-defined]
        elif kind is closed and t.closed_by is None:
            t.closed_by = "client" if event.connection is client else "server"  # type: ignore[attr-defined]
        return inner(event)

    stream._handle_event = handle_event  # type: ignore[method-assign]


def end_tunnel(client: connection.Client) -> Tunnel | None:
    """The client's tunnel, ended now (its bytes counted once); forgotten after the last
    watcher's call."""
    t = TUNNELS.get(client.id)
    if t is None:
        return None
    if t.end is None:
        t.end = time.time()
        STORE.tunnel_bytes[0] += t.up
        STORE.tunnel_bytes[1] += t.down
    t.watchers -= 1
    if t.watchers <= 0:
        del TUNNELS[client.id]
    return t


class Metrics:
    def response(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is not None:
            _record(flow, resp.status_code, resp.timestamp_end or time.time())

    def error(self, flow: http.HTTPFlow) -> None:
        # A response may already be (partly) on the wire, e.g. a client that left mid-stream;
        # or the proxy answered the failure itself (502, 504, a malformed body's 400).
        status = sent_status(flow)
        end = flow.error.timestamp if flow.error is not None else time.time()
        _record(flow, "error" if status is None else status, end)

    def http_connected(self, flow: http.HTTPFlow) -> None:
        self.http_connect_error(flow)
        watch_tunnel(flow)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is not None:
            _record(flow, resp.status_code, time.time())

    def client_connected(self, client: connection.Client) -> None:
        STORE.open_clients.add(client.id)

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        watch_layer(nextlayer)

    def client_disconnected(self, client: connection.Client) -> None:
        # A set of ids, not a counter: a reload or a late load never goes negative.
        STORE.open_clients.discard(client.id)
        end_tunnel(client)


addons = [Metrics()]
