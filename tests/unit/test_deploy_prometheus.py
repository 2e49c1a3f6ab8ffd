"""deploy/prometheus checked by promtool: the scrape config, the rules, and the rules' unit tests
(series that make each alert fire and stay quiet). .ci/run installs promtool (Debian's
`prometheus` package): without it these tests fail in CI and skip elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = sorted((PROMETHEUS / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
OPERATIONS = ROOT / "docs" / "operations.md"
# Availability, errors, latency, backends, breakers, cache, rate limits, CLI, config, memory.
ALERTS = {
    "ProxyDown",
    "HighErrorRate",
    "HighLatency",
    "BackendDown",
    "AllBackendsDown",
    "CircuitOpen",
    "LowCacheHitRatio",
    "RateLimitSpike",
    "CliSaturated",
    "ConfigReloadFailed",
    "HighMemoryUsage",
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus); CI runs these")
    return path


def run(*args: str) -> None:
    proc = subprocess.run(
        [promtool(), *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"


def alert_rules() -> list[dict]:
    return [
        rule
        for path in RULES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def test_scrape_config_and_its_rule_files_are_valid() -> None:
    run("check", "config", str(PROMETHEUS / "prometheus.yml"))


def test_rules_are_valid() -> None:
    assert RULES
    run("check", "rules", *map(str, RULES))


def test_rule_unit_tests_pass() -> None:
    assert RULE_TESTS
    run("test", "rules", *map(str, RULE_TESTS))


def test_every_alert_is_complete_tested_and_has_a_runbook_entry() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} == ALERTS
    tested = {
        case["alertname"]
        for path in RULE_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    headings = {
        line.removeprefix("### ").strip()
        for line in OPERATIONS.read_text().splitlines()
        if line.startswith("### ")
    }
    for rule in rules:
        name = rule["alert"]
        assert rule.get("for"), name
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert {"summary", "description", "runbook"} <= rule["annotations"].keys(), name
        assert rule["annotations"]["runbook"] == f"docs/operations.md#{name.lower()}"
        assert name in headings, f"docs/operations.md has no '### {name}'"
        assert name in tested, f"no promtool test makes {name} fire"
