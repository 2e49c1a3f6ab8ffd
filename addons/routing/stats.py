"""The router's metrics: plain numbers per backend, turned into Prometheus families at scrape.

`STORE` is the process's one collector, registered when this module is first imported (once
per process, however often `-s addons/router.py` is reloaded); `STORE.router` is the Router
whose backends the gauges show.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from addons import metrics
from addons.routing import balance

if TYPE_CHECKING:
    from addons.routing.router import Router

LATENCY_BUCKETS = metrics.BUCKETS


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
        yield from self._backend_gauges()
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

    def _backend_gauges(self) -> Iterator[Any]:
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


STORE = RouterStore()
metrics.REGISTRY.register(STORE)
