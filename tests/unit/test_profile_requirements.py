"""The product requirements' config examples, copied unchanged into tests/fixtures/prd/, load
and mean what the requirements say: each is checked by its effect on the flat options. The keys Waypost refuses as not
supported yet are exactly those docs/requirements-differences.md lists."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from addons import schema

EXAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "prd"


def options(name: str, environ: dict[str, str] | None = None) -> dict[str, Any]:
    return schema.to_options(schema.load(EXAMPLES / name, environ or {}).profile)


def problems(path: Path) -> list[str]:
    with pytest.raises(schema.ProfileError) as e:
        schema.load(path, {})
    return e.value.problems


def test_routing_example() -> None:
    rules = json.loads(options("routing.yaml")["routing_rules"])
    assert rules[0]["match"]["host"] == "api.example.com"
    assert "strip_prefix" not in rules[0]["forward"]  # strip_prefix: false strips nothing
    assert rules[1]["match"]["path"] == "/static/*"
    assert rules[1]["cache"] is True  # forward.cache is the rule's cache


def test_strip_prefix_true_strips_the_matched_path(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "routing:\n  rules:\n    - match: {path: /api/*}\n"
        "      forward: {target: http://10.0.0.5:8080, strip_prefix: true}\n"
    )
    rules = json.loads(schema.to_options(schema.load(path, {}).profile)["routing_rules"])
    assert rules[0]["forward"]["strip_prefix"] == "/api"
    path.write_text(
        "routing:\n  rules:\n    - match: {host: a.example}\n"
        "      forward: {target: http://10.0.0.5:8080, strip_prefix: true}\n"
    )
    assert "strips match.path, which is not set" in problems(path)[0]


def test_filtering_example() -> None:
    opts = options("filtering.yaml")  # a top-level filtering: is security.filtering
    assert (opts["filter_list_mode"], opts["filter_mode"]) == ("blocklist", "enforce")
    assert opts["filter_blocked"] == [
        "malicious-site.com",
        "*.ads.example.com",
        "tracker.badsite.net",
    ]
    assert opts["filter_response_body"] == "Domain blocked by proxy policy"


def test_filter_answer_status_other_than_403_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("filtering:\n  response:\n    status: 404\n")
    assert problems(path)[0].startswith(f"{path}:3: security.filtering.response.status:")


def test_cache_example(tmp_path: Path) -> None:
    opts = options("cache.yaml")
    assert opts["cache_max_memory"] == str(256 << 20)
    assert (opts["cache_max_entries"], opts["cache_default_ttl"]) == (10000, "300s")
    assert opts["cache_mode"] == "rfc"  # respect_cache_headers: true
    path = tmp_path / "p.yaml"
    path.write_text("cache:\n  respect_cache_headers: false\n")
    assert schema.to_options(schema.load(path, {}).profile)["cache_mode"] == "default_ttl"
    path.write_text("cache:\n  respect_cache_headers: false\n  mode: rfc\n")
    assert "respect_cache_headers: false means mode: default_ttl" in problems(path)[0]


def test_cli_example() -> None:
    opts = options("cli.yaml")
    assert (opts["cli_max_concurrent"], opts["cli_process_timeout"]) == (10, "60s")
    assert opts["cli_max_memory_per_process"] == str(128 << 20)
    assert opts["cli_allowed_commands"] == ["/usr/bin/python", "/usr/bin/node"]


def test_limits_example() -> None:
    opts = options("limits.yaml")
    assert opts["limits_max_url_length"] == 8192
    assert (opts["limits_max_header_size"], opts["limits_max_headers_count"]) == (16384, 100)
    assert opts["limits_max_body_size"] == str(10 << 20)


def test_circuit_breaker_example() -> None:
    opts = options("circuit_breaker.yaml")
    assert opts["router_circuit_breaker_failure_threshold"] == 5
    assert opts["router_circuit_breaker_timeout"] == "30s"
    assert opts["router_circuit_breaker_success_threshold"] == 2


def test_listener_example() -> None:
    opts = options("listener.yaml")
    assert (opts["listen_host"], opts["listen_port"]) == ("0.0.0.0", 8080)
    # tls.enabled: false: the example's placeholder paths are not read, no certificate is served.
    assert opts["tls_listener_cert"] == opts["tls_listener_key"] == ""
    assert opts["upstream_read_timeout"] == "30s"
    assert (opts["server_write_timeout"], opts["server_idle_timeout"]) == ("30s", "120s")
    assert opts["server_max_connections"] == 1000  # limits.max_concurrent_connections
    assert opts["limits_max_header_size"] == 16384  # max_header_bytes


def test_full_config() -> None:
    profile = schema.load(EXAMPLES / "full.yaml", {}).profile
    opts = schema.to_options(profile)
    assert (opts["listen_host"], opts["listen_port"]) == ("0.0.0.0", 8080)
    assert opts["tls_listener_cert"] == "" and opts["tls_version_client_min"] == "TLS1_2"
    assert opts["upstream_read_timeout"] == "30s"
    assert opts["limits_max_header_size"] == 16384
    assert (opts["log_level"], opts["log_format"], opts["log_output"]) == ("info", "json", "stdout")
    assert opts["log_file"] == "/var/log/proxy/proxy.log"
    assert (opts["log_file_max_size"], opts["log_file_max_age"]) == (str(100 << 20), 7)
    assert opts["log_file_max_backups"] == 3
    assert (opts["server_write_timeout"], opts["server_idle_timeout"]) == ("30s", "120s")
    assert opts["server_max_connections"] == 1000
    assert (opts["metrics_enabled"], opts["metrics_port"], opts["metrics_path"]) == (
        True,
        9090,
        "/metrics",
    )
    assert opts["routing_default_backend"] == "http://localhost:8000"
    rules = json.loads(opts["routing_rules"])
    assert rules[0]["forward"]["timeout"] == 30.0 and rules[1]["cache"] is True
    assert (opts["filter_list_mode"], opts["filter_mode"]) == ("blocklist", "enforce")
    assert opts["filter_blocked"] == ["malicious-site.com", "*.ads.example.com"]
    assert (opts["ratelimit_requests_per_second"], opts["ratelimit_burst"]) == ("100", 200)
    # acl.enabled: false: the lists stay in the profile, none applies.
    assert profile.security.acl.allowed_ips == ["192.168.1.0/24", "10.0.0.0/8"]
    assert opts["acl_allowed_ips"] == opts["acl_denied_ips"] == []
    # The requirements' header names, and a section naming headers turns them on.
    assert opts["secheaders_enabled"] is True
    assert opts["secheaders_hsts"] == "max-age=31536000; includeSubDomains"
    assert (opts["secheaders_content_type_options"], opts["secheaders_frame_options"]) == (
        "nosniff",
        "DENY",
    )
    assert (opts["cache_enabled"], opts["cache_max_memory"]) == (True, str(256 << 20))
    assert (opts["cache_default_ttl"], opts["cache_mode"]) == ("300s", "rfc")
    assert opts["cache_patterns"] == ["*.js", "*.css", "*.png", "*.jpg"]
    assert (opts["cli_enabled"], opts["cli_max_concurrent"]) == (True, 10)
    assert opts["cli_process_timeout"] == "60s"
    assert opts["cli_max_memory_per_process"] == str(128 << 20)
    assert opts["router_health_checks_timeout"] == "5s"
    assert opts["router_circuit_breaker_failure_threshold"] == 5


def test_switches_turn_their_options_off(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "security:\n"
        "  rate_limiting: {enabled: false, requests_per_second: 5, max_connections_per_ip: 3,\n"
        "                  rules: [{id: api, path: /api, requests_per_second: 1}]}\n"
        "  acl: {enabled: true, allowed_ips: [10.0.0.0/8]}\n"
    )
    opts = schema.to_options(schema.load(path, {}).profile)
    assert opts["ratelimit_requests_per_second"] == "0"
    assert (opts["ratelimit_rules"], opts["ratelimit_max_connections_per_ip"]) == ("", 0)
    assert opts["acl_allowed_ips"] == ["10.0.0.0/8"]


def test_tls_switch(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("server:\n  tls: {enabled: true}\n")
    assert "enabled: true needs cert and key" in problems(path)[0]
    path.write_text("server:\n  tls: {enabled: false, cert: /nope.pem, key: /nope.key}\n")
    assert schema.to_options(schema.load(path, {}).profile)["tls_listener_cert"] == ""
    path.write_text("server:\n  tls: {cert: /nope.pem, key: /nope.key}\n")
    assert "/nope.pem" in problems(path)[0]  # unset enabled: a cert means TLS on, so it is read


@pytest.mark.parametrize(
    ("version", "fragment"),
    [("TLS1.0", "insecure"), ("TLS1.1", "insecure"), ("SSL3", "must be TLS1.2 or TLS1.3")],
)
def test_tls_min_version(tmp_path: Path, version: str, fragment: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(f"server:\n  tls:\n    min_version: {version}\n")
    assert fragment in problems(path)[0]
    path.write_text("server:\n  tls:\n    min_version: tls1_2\n")
    assert schema.to_options(schema.load(path, {}).profile)["tls_version_client_min"] == "TLS1_2"
    path.write_text("server:\n  tls:\n    min_version: TLSv1.3\n")
    assert schema.to_options(schema.load(path, {}).profile)["tls_version_client_min"] == "TLS1_3"


def test_an_alias_and_its_key_together_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("listener: {port: 3128}\nserver: {port: 8080}\n")
    assert problems(path) == [
        f"{path}:1: listener: another name for server, which is also given: keep one"
    ]


def test_rotation_keys_inside_file_and_as_logging_rotation_are_one_key(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "logging:\n  file: {path: /tmp/w.log, max_size: 1MB}\n  rotation: {max_size: 2MB}\n"
    )
    assert "another name for logging.rotation.max_size" in problems(path)[0]
    path.write_text("logging:\n  file: {path: /tmp/w.log, max_files: 3}\n")
    assert "max_files: unknown" in problems(path)[0]
