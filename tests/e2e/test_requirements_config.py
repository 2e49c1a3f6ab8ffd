"""The product requirements' full config example and environment variables through a real
mitmdump with the bundle; mistyped or out-of-choice `--set` options stop startup in one line."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.conftest import MANAGEMENT, ROOT, Backend, start_proxy

EXAMPLE = ROOT / "tests" / "fixtures" / "prd" / "full.yaml"


def test_the_full_example_runs_with_the_environment_variables(
    proxy_factory, tmp_path: Path, backend: Backend
) -> None:
    env = {
        # The command line's --listen-host/-p win over server.host/port; the management port
        # is moved off the example's fixed 9090, and health checks of its example.com
        # backends are turned off (tests only reach 127.0.0.1), which the egress policy lets
        # through.
        "METRICS_PORT": "0",
        "WAYPOST_HEALTH_CHECKS__ENABLED": "false",
        "WAYPOST_SECURITY__EGRESS__ALLOWED_NETWORKS": "127.0.0.1/32",
        "PROXY_PORT": "tcp://10.96.0.12:8080",  # a Kubernetes service link: ignored
        "LOG_LEVEL": "INFO",
        "CACHE_ENABLED": "false",
        "RATE_LIMIT_ENABLED": "false",
        "CLI_MAX_CONCURRENT": "2",
        "BACKEND_TIMEOUT": "5s",
        "DEFAULT_BACKEND": backend.url,
    }
    p = proxy_factory(options={"waypost_profile": str(EXAMPLE)}, env=env)
    p.wait_for(MANAGEMENT)
    p.wait_for(r"PROXY_PORT=tcp://10\.96\.0\.12:8080 looks like a Kubernetes service link")
    with httpx.Client(proxy=p.url, timeout=10, trust_env=False) as c:
        for _ in range(2):
            r = c.get(f"{backend.url}/echo/a.js")
            assert r.status_code == 200
            assert "Cache-Status" not in r.headers  # CACHE_ENABLED=false
    assert backend.hits["/echo/a.js"] == 2


@pytest.mark.parametrize(
    ("option", "line"),
    [
        (
            "filter_blokced=evil.example",
            "--set filter_blokced: not an option of any loaded addon (did you mean filter_blocked?)",
        ),
        ("ratelimit_mode=shadwo", "ratelimit_mode: 'shadwo' is not one of 'enforce', 'shadow'"),
        ("cache_mode=bogus", "cache_mode: 'bogus' is not one of 'rfc', 'default_ttl'"),
    ],
)
def test_a_mistyped_option_stops_startup(tmp_path: Path, option: str, line: str) -> None:
    p = start_proxy(tmp_path, extra_args=("--set", option), env={"METRICS_PORT": "0"}, wait=False)
    try:
        assert p.proc.wait(30) != 0
        p.wait_for(re.escape(line), timeout=5)
    finally:
        p.stop()
