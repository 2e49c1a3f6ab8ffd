"""Every environment variable of the product requirements, each by its effect on the flat options; the systematic
`WAYPOST_<SECTION>__<KEY>` names; choices in any case; Kubernetes service links ignored."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from addons import schema


def options(environ: dict[str, str]) -> dict[str, Any]:
    return schema.to_options(schema.load(None, environ).profile)


@pytest.mark.parametrize(
    ("var", "value", "option", "expected"),
    [
        ("PROXY_HOST", "0.0.0.0", "listen_host", "0.0.0.0"),
        ("PROXY_PORT", "3128", "listen_port", 3128),
        ("LOG_LEVEL", "debug", "log_level", "debug"),
        ("LOG_FORMAT", "text", "log_format", "text"),
        ("CACHE_ENABLED", "false", "cache_enabled", False),
        ("CACHE_MAX_MEMORY", "64MB", "cache_max_memory", str(64 << 20)),
        ("CACHE_DEFAULT_TTL", "300", "cache_default_ttl", "300s"),
        ("RATE_LIMIT_RPS", "100", "ratelimit_requests_per_second", "100"),
        ("CLI_ENABLED", "true", "cli_enabled", True),
        ("CLI_MAX_CONCURRENT", "3", "cli_max_concurrent", 3),
        ("CLI_TIMEOUT", "60s", "cli_process_timeout", "60s"),
        (
            "DEFAULT_BACKEND",
            "http://localhost:8000",
            "routing_default_backend",
            "http://localhost:8000",
        ),
        ("BACKEND_TIMEOUT", "30s", "upstream_read_timeout", "30s"),
    ],
)
def test_requirements_variable(var: str, value: str, option: str, expected: Any) -> None:
    assert options({var: value})[option] == expected


def test_rate_limit_enabled_false_turns_the_limit_off() -> None:
    env = {"RATE_LIMIT_RPS": "100", "RATE_LIMIT_ENABLED": "false"}
    assert options(env)["ratelimit_requests_per_second"] == "0"
    assert (
        options({"RATE_LIMIT_RPS": "100", "RATE_LIMIT_ENABLED": "true"})[
            "ratelimit_requests_per_second"
        ]
        == "100"
    )


def test_proxy_tls_enabled(tmp_path: Path) -> None:
    assert options({"PROXY_TLS_ENABLED": "false"})["tls_listener_cert"] == ""
    with pytest.raises(schema.ProfileError) as e:
        schema.load(None, {"PROXY_TLS_ENABLED": "true"})
    assert e.value.problems == [
        "environment variable PROXY_TLS_ENABLED: server.tls: enabled: true needs cert and key "
        "(PEM files)"
    ]


@pytest.mark.parametrize(
    ("value", "level"),
    [("warn", "warning"), ("WARN", "warning"), ("INFO", "info"), ("Error", "error")],
)
def test_log_level_in_any_case_and_warn(value: str, level: str) -> None:
    assert options({"LOG_LEVEL": value})["log_level"] == level


def test_choices_in_any_case() -> None:
    assert options({"LOG_FORMAT": "JSON"})["log_format"] == "json"
    assert options({"WAYPOST_CACHE__MODE": "DEFAULT_TTL"})["cache_mode"] == "default_ttl"
    assert (
        options({"WAYPOST_SECURITY__HEADERS__FRAME_OPTIONS": "sameorigin"})[
            "secheaders_frame_options"
        ]
        == "SAMEORIGIN"
    )


def test_kubernetes_service_link_in_a_port_is_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="waypost.config"):
        opts = options({"PROXY_PORT": "tcp://10.96.0.12:8080"})
    assert opts["listen_port"] == 8080
    assert "PROXY_PORT=tcp://10.96.0.12:8080 looks like a Kubernetes service link" in caplog.text


def test_systematic_names_reach_every_key() -> None:
    assert schema.SYSTEMATIC["WAYPOST_CACHE__MAX_MEMORY"] == ("cache", "max_memory")
    assert len(schema.SYSTEMATIC) == len(set(schema.SYSTEMATIC.values()))
    opts = options(
        {
            "WAYPOST_CACHE__MAX_MEMORY": "32MB",
            "WAYPOST_SECURITY__RATE_LIMITING__BURST": "7",
            "WAYPOST_SECURITY__FILTERING__DOMAINS__BLOCKED": "a.example, *.b.example",
            "WAYPOST_SECURITY__RATE_LIMITING__RULES": '[{"id": "api", "path": "/api", '
            '"requests_per_second": 2}]',
        }
    )
    assert opts["cache_max_memory"] == str(32 << 20)
    assert opts["ratelimit_burst"] == 7
    assert opts["filter_blocked"] == ["a.example", "*.b.example"]
    assert '"id": "api"' in opts["ratelimit_rules"]


def test_the_systematic_name_wins_over_the_requirements_name() -> None:
    env = {"CACHE_MAX_MEMORY": "64MB", "WAYPOST_CACHE__MAX_MEMORY": "32MB"}
    loaded = schema.load(None, env)
    assert loaded.profile.cache.max_memory == 32 << 20
    assert loaded.where(("cache", "max_memory")) == "environment variable WAYPOST_CACHE__MAX_MEMORY"


def test_errors_name_the_variable() -> None:
    with pytest.raises(schema.ProfileError) as e:
        schema.load(
            None,
            {
                "WAYPOST_CACHE__MAX_MEMROY": "1MB",
                "WAYPOST_SERVER__PORT": "http",
                "WAYPOST_SECURITY__RATE_LIMITING__RULES": "[oops",
            },
        )
    assert e.value.problems[0] == (
        "environment variable WAYPOST_CACHE__MAX_MEMROY: not a profile key "
        "(did you mean WAYPOST_CACHE__MAX_MEMORY?)"
    )
    assert e.value.problems[1].startswith(
        "environment variable WAYPOST_SECURITY__RATE_LIMITING__RULES: "
        "security.rate_limiting.rules: not valid JSON"
    )
    assert e.value.problems[2].startswith("environment variable WAYPOST_SERVER__PORT: server.port:")
