"""The cache's metric families, made at scrape time from the live addon's plain counters.

`cache_requests_total{result}`, `cache_bytes`, `cache_entries`, `cache_evictions_total`, on
`addons.metrics.REGISTRY`. `COLLECTOR` is registered once per process: this module is
imported once however often `addons/cache.py` is reloaded, and the live addon points its
`source` at its own state.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from addons.caching.answer import RESULTS
from addons.caching.state import Shared
from addons.metrics import REGISTRY


class Collector:
    def __init__(self) -> None:
        self.source: Shared | None = None

    def collect(self) -> Iterator[Metric]:
        shared = self.source
        requests = CounterMetricFamily(
            "cache_requests_total", "Cache lookups by result.", labels=["result"]
        )
        counts = shared.counts if shared else {}
        for result in RESULTS:
            requests.add_metric([result], counts.get(result, 0))
        yield requests
        store = shared.store if shared else None
        yield GaugeMetricFamily(
            "cache_bytes", "Bytes held by the cache.", store.currsize if store else 0
        )
        yield GaugeMetricFamily("cache_entries", "Stored responses.", len(store) if store else 0)
        yield CounterMetricFamily(
            "cache_evictions_total",
            "Entries evicted to stay within max_memory / max_entries.",
            shared.evictions() if shared else 0,
        )


COLLECTOR = Collector()
REGISTRY.register(COLLECTOR)
