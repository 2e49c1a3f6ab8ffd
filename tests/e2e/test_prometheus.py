"""The dashboard and the Prometheus rules name only metrics a live bundle exports.

A bundle with a reverse route to a local backend and a forward listener serves traffic (a cache
hit, a 500, a request refused by the domain filter, requests refused by a rate-limit rule); its
management port is scraped, and every metric name used by a panel or a template variable of
deploy/grafana/waypost.json and by a rule of deploy/prometheus/rules/ must be in the scrape (a
family declared without samples yet counts) or be a recording rule's output.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import MANAGEMENT, REVERSE, ROOT, Backend

DASHBOARD = ROOT / "deploy" / "grafana" / "waypost.json"
RULES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
# Series Prometheus makes itself for every target, not exported by Waypost.
SYNTHETIC = {"up"}

TOKEN = re.compile(
    r"""(?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    |(?P<matchers>\{(?:"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|[^}"'])*\})
    |(?P<range>\[[^\]]*\])
    |(?P<duration>(?:\d+(?:ms|[smhdwy]))+\b)
    |(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    |(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    |(?P<other>\S)""",
    re.X,
)
# Keywords followed by a parenthesised list of label names, not of expressions.
LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}
# Aggregations may put `by (...)` between their name and their parenthesis.
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                "bottomk", "topk", "quantile", "limitk", "limit_ratio"}  # fmt: skip
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.*?)\s*(?:,\s*\w+\s*)?\)\s*$", re.S)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions,
    aggregations, keywords, label names or inside label matchers, ranges and strings."""
    tokens = [(m.lastgroup, m.group()) for m in TOKEN.finditer(expr)]
    names: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "ident" and text.lower() in LABEL_LISTS:
            if following == "(":
                i = next(j for j in range(i + 1, len(tokens)) if tokens[j][1] == ")")
        elif kind == "ident" and following != "(" and text.lower() not in KEYWORDS | AGGREGATIONS:
            names.add(text)
        i += 1
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (job, le) (rate(a_bucket{x="y}"}[5m])) / on (job) group_left(le) b', {"a_bucket", "b"}),
        ("histogram_quantile(0.95, job:c:rate5m) > 1e3 and d offset 5m", {"job:c:rate5m", "d"}),
        ('topk(10, sum without (rule) (rate(e_total{p=~"a|b"}[$__rate_interval])))', {"e_total"}),
        ("time() - f{instance=~\"$instance\"} > bool 0 or g unless h", {"f", "g", "h"}),
    ],
)  # fmt: skip
def test_metric_names_of_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", target["expr"]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = LABEL_VALUES.match(query)
            assert m, f"variable {var['name']}: only label_values(...) queries are checked"
            yield f"variable {var['name']!r}", m.group(1)


def rules() -> Iterator[dict]:
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            yield from group["rules"]


def rule_exprs() -> Iterator[tuple[str, str]]:
    for rule in rules():
        yield f"rule {rule.get('record') or rule.get('alert')!r}", rule["expr"]


def exported_names(text: str) -> set[str]:
    """Sample names of a text exposition, and the names of families declared without samples."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "summary":
                names |= {f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def test_dashboard_is_a_grafana_model_without_plugins() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 39 and dash["uid"] == "waypost"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["multi"] and variables["instance"]["includeAll"]
    rows = {p["title"] for p in dash["panels"] if p["type"] == "row"}
    assert rows == {"Overview", "Traffic", "Latency", "Errors", "Cache", "Policies",
                    "Backends and breakers", "CLI", "Process"}  # fmt: skip
    core = {"row", "timeseries", "stat", "state-timeline"}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert panel["type"] in core, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert 'instance=~"$instance"' in target["expr"], panel["title"]
    assert "__requires" not in dash and "__inputs" not in dash


def test_every_metric_of_the_dashboard_and_the_rules_is_exported(
    proxy_factory, tmp_path: Path, backend: Backend
) -> None:
    profile = tmp_path / "profile.yaml"
    profile.write_text(
        yaml.safe_dump(
            {
                "metrics": {"enabled": True, "host": "127.0.0.1", "port": 0, "path": "/metrics"},
                "security": {
                    "egress": {"allowed_networks": ["127.0.0.1/32"]},
                    "filtering": {"domains": {"blocked": ["blocked.example"]}},
                    "rate_limiting": {
                        "rules": [
                            {"id": "slow", "path": "/echo/limited", "requests_per_second": 1,
                             "burst": 1},
                        ]
                    },
                },
                "cache": {"mode": "default_ttl", "default_ttl": "60s"},
                "routing": {
                    "listeners": [
                        {"mode": "forward"},
                        {"mode": "reverse", "host": "127.0.0.2", "port": 0},
                    ],
                    "rules": [{"name": "app", "forward": {"backends": [
                        {"url": backend.url, "name": "app"}]}}],
                },
                "health_checks": {"enabled": False},
            }
        )
    )  # fmt: skip
    p = proxy_factory(options={"waypost_profile": str(profile)}, wait=False)
    reverse = f"http://127.0.0.2:{int(p.wait_for(REVERSE, timeout=40).group(2))}"
    mgmt = f"http://127.0.0.1:{int(p.wait_for(MANAGEMENT, timeout=40).group(1))}"
    with httpx.Client(timeout=10, trust_env=False) as c:
        # mitmproxy 12 binds the command line's listener before the profile's: ask where the
        # forward listener ended up.
        deadline = time.monotonic() + 10
        while True:
            addrs = c.get(mgmt + "/health/readiness").json()["checks"]["listeners"]["addresses"]
            forward = [a for a in addrs if a.startswith("127.0.0.1:")]
            if len(addrs) == 2 and forward:
                break
            assert time.monotonic() < deadline, addrs
            time.sleep(0.05)
        assert c.get(reverse + "/echo/cached").status_code == 200
        second = c.get(reverse + "/echo/cached")
        assert second.status_code == 200 and "hit" in second.headers["cache-status"]
        assert c.get(reverse + "/status/500").status_code == 500
        limited = [c.get(reverse + "/echo/limited").status_code for _ in range(3)]
        assert 429 in limited
    with httpx.Client(proxy=f"http://{forward[0]}", timeout=10, trust_env=False) as fwd:
        assert fwd.get(backend.url + "/echo/forward").status_code == 200
        assert fwd.get("http://blocked.example/").status_code == 403
    text = httpx.get(mgmt + "/metrics", timeout=10, trust_env=False).text
    assert 'cache_requests_total{result="HIT"} 1.0' in text
    assert 'policy_decisions_total{decision="block",policy="filter"' in text
    assert 'policy_decisions_total{decision="limit",policy="ratelimit",rule="slow"}' in text
    assert 'backend_healthy{backend="app"} 1.0' in text

    exported = exported_names(text)
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    missing = [
        f"{where}: {name}"
        for where, expr in (*dashboard_exprs(), *rule_exprs())
        for name in sorted(metric_names(expr))
        if name not in exported | recorded | SYNTHETIC
    ]
    assert missing == [], "\n".join(missing)
