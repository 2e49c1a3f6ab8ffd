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
    proxy_active_connections                  open client connections
    policy_decisions_total{policy,decision,rule}
                                              policy decisions: counted by `addons/policy.py`
                                              when made, or from a flow's recorded decision
    waypost_build_info{version,mitmproxy,python}
                                              always 1: the running versions

Hooks: response, error, http_connected, http_connect_error, client_connected,
client_disconnected. Options: none. Add it last in the chain so it sees every decision.
Flows answered locally (`record(flow)["local"]`, e.g. health probes on the proxy port) are
not counted.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator

from mitmproxy import connection, http
from prometheus_client import CollectorRegistry, GCCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from addons import errors
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

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is not None:
            _record(flow, resp.status_code, time.time())

    def client_connected(self, client: connection.Client) -> None:
        STORE.open_clients.add(client.id)

    def client_disconnected(self, client: connection.Client) -> None:
        # A set of ids, not a counter: a reload or a late load never goes negative.
        STORE.open_clients.discard(client.id)


addons = [Metrics()]
