"""The CLI's metrics: `cli_processes`, `cli_processes_max` (gauges) and
`cli_executions_total{command,outcome}`.

`STATS` is registered once, when this package module is first imported: reloading the
`-s addons/cli.py` script re-executes only the thin entry, never this module.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from addons.metrics import REGISTRY


class Stats:
    """Plain counters, turned into Prometheus families when scraped (like metrics.Store)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.limit = 0  # cli_max_concurrent, set by the addon's configure
        self.executions: dict[tuple[str, str], int] = {}

    def count(self, command: str, outcome: str) -> None:
        key = (command, outcome)
        self.executions[key] = self.executions.get(key, 0) + 1

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("cli_processes", "CLI processes running now.", self.in_flight)
        yield GaugeMetricFamily(
            "cli_processes_max",
            "CLI processes allowed at once (cli_max_concurrent); beyond it: 429 RATE_LIMITED.",
            self.limit,
        )
        family = CounterMetricFamily(
            "cli_executions_total",
            "CLI requests by allow-listed command (_none: not in the list) and outcome.",
            labels=["command", "outcome"],
        )
        for (command, outcome), n in self.executions.items():
            family.add_metric([command, outcome], n)
        yield family


STATS = Stats()
REGISTRY.register(STATS)
