"""The option map: a profile becomes the flat options of the addons and of core mitmproxy.

`to_options(profile)` is all an addon ever sees of a profile, so an addon loaded alone with
`--set` and the same addon driven by a profile behave identically. `OPTIONS` is where the two
vocabularies meet (option -> key path, conversion); it also points option errors at their line.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from addons.kernel.units import format_duration
from addons.schema.models import CliArgumentRule, Profile
from addons.schema.security import FilterFile


def _same(value: Any) -> Any:
    return value


def _filter_files(files: list[FilterFile]) -> str:
    if not files:
        return ""
    return json.dumps([f.model_dump(exclude_none=True) for f in files])


def _int(value: float) -> int:
    return int(round(value))


def _json_list(models: list[BaseModel]) -> str:
    return json.dumps([m.model_dump(mode="json", exclude_none=True) for m in models])


def _rules_json(rules: dict[str, CliArgumentRule]) -> str:
    return json.dumps({k: v.model_dump() for k, v in rules.items()}) if rules else ""


# Every flat option a profile sets: option -> (profile key path, conversion to the option's
# type). tests/unit/test_options_agree.py checks it against the addons and the docs.
OPTIONS: dict[str, tuple[tuple[str, ...], Any]] = {
    "listen_host": (("server", "host"), _same),
    "listen_port": (("server", "port"), _same),
    "server_shutdown_timeout": (("server", "shutdown_timeout"), format_duration),
    "server_workers": (("server", "workers"), str),
    "upstream_connect_timeout": (("server", "timeouts", "connect"), format_duration),
    "upstream_read_timeout": (("server", "timeouts", "read"), format_duration),
    "server_write_timeout": (("server", "timeouts", "write"), format_duration),
    "server_idle_timeout": (("server", "timeouts", "idle"), format_duration),
    "server_max_connections": (("limits", "max_concurrent_connections"), _same),
    "server_max_accepts_per_event": (("limits", "max_accepts_per_event"), _same),
    "tls_listener_cert": (("server", "tls", "cert"), lambda v: v or ""),
    "tls_listener_key": (("server", "tls", "key"), lambda v: v or ""),
    "tls_listener_chain": (("server", "tls", "chain"), lambda v: v or ""),
    "tls_version_client_min": (("server", "tls", "min_version"), lambda v: v.replace(".", "_")),
    "server_event_loop": (("server", "event_loop"), _same),
    "server_gc_freeze": (("server", "gc_freeze"), _same),
    "server_gc_threshold": (("server", "gc_threshold"), lambda v: ",".join(map(str, v))),
    "server_memory_trim_interval": (("server", "memory_trim_interval"), format_duration),
    "log_level": (("logging", "level"), _same),
    "log_format": (("logging", "format"), _same),
    "log_output": (("logging", "output"), _same),
    "log_file": (("logging", "file"), lambda v: v or ""),
    "log_file_max_size": (("logging", "rotation", "max_size"), str),
    "log_file_max_age": (("logging", "rotation", "max_age"), _same),
    "log_file_max_backups": (("logging", "rotation", "max_backups"), _same),
    "metrics_enabled": (("metrics", "enabled"), _same),
    "metrics_host": (("metrics", "host"), _same),
    "metrics_port": (("metrics", "port"), _same),
    "metrics_path": (("metrics", "path"), _same),
    "metrics_proxy_port_health": (("metrics", "proxy_port", "health"), _same),
    "metrics_proxy_port_metrics": (("metrics", "proxy_port", "metrics"), _same),
    "metrics_proxy_port_admin": (("metrics", "proxy_port", "admin"), _same),
    "metrics_worker_label": (("metrics", "worker_label"), _same),
    "tracing_enabled": (("tracing", "enabled"), _same),
    "tracing_endpoint": (("tracing", "endpoint"), _same),
    "tracing_protocol": (("tracing", "protocol"), _same),
    "tracing_sample_ratio": (("tracing", "sample_ratio"), lambda v: f"{v:g}"),
    "tracing_service_name": (("tracing", "service_name"), _same),
    "limits_max_url_length": (("limits", "max_url_length"), _same),
    "limits_max_header_size": (("limits", "max_header_size"), _same),
    "limits_max_headers_count": (("limits", "max_headers_count"), _same),
    "limits_max_body_size": (("limits", "max_body_size"), str),
    "limits_header_timeout": (("limits", "header_timeout"), format_duration),
    "limits_blocked_methods": (("limits", "blocked_methods"), list),
    "limits_origin_form": (("limits", "origin_form"), _same),
    "forwarding_trusted_proxies": (("security", "trusted_proxies"), list),
    "forwarding_x_forwarded": (("headers", "x_forwarded"), _same),
    "forwarding_via": (("headers", "via"), _same),
    "forwarding_request_id": (("headers", "request_id"), _same),
    "forwarding_proxy_id": (("headers", "proxy_id"), _same),
    "egress_connect_ports": (("security", "egress", "connect_ports"), list),
    "egress_block_private": (("security", "egress", "block_private"), _same),
    "egress_allowed_networks": (("security", "egress", "allowed_networks"), list),
    "tls_intercept_hosts": (("security", "tls_interception", "hosts"), list),
    "filter_mode": (("security", "filtering", "mode"), _same),
    "filter_list_mode": (("security", "filtering", "list_mode"), _same),
    "filter_blocked": (("security", "filtering", "domains", "blocked"), list),
    "filter_allowed": (("security", "filtering", "domains", "allowed"), list),
    "filter_files": (("security", "filtering", "domains", "files"), _filter_files),
    "filter_ip_literals": (("security", "filtering", "ip_literals"), _same),
    "filter_check_sni": (("security", "filtering", "check_sni"), _same),
    "filter_reload_interval": (("security", "filtering", "reload_interval"), format_duration),
    "filter_response_body": (("security", "filtering", "response", "body"), _same),
    "content_filter_mode": (("security", "content_filtering", "mode"), _same),
    "content_filter_blocked_types": (("security", "content_filtering", "blocked_types"), list),
    "content_filter_check_request": (("security", "content_filtering", "check_request"), _same),
    "admin_token": (("admin", "token"), _same),
    "state_backend": (("state", "backend"), _same),
    "state_redis_url": (("state", "redis_url"), _same),
    "state_key_prefix": (("state", "key_prefix"), _same),
    "state_timeout": (("state", "timeout"), format_duration),
    "cli_enabled": (("cli", "enabled"), _same),
    "cli_token": (("cli", "token"), _same),
    "cli_allowed_commands": (("cli", "allowed_commands"), list),
    "cli_argument_rules": (("cli", "argument_rules"), _rules_json),
    "cli_env_allowlist": (("cli", "env_allowlist"), list),
    "cli_max_concurrent": (("cli", "max_concurrent"), _same),
    "cli_process_timeout": (("cli", "process_timeout"), format_duration),
    "cli_grace_period": (("cli", "grace_period"), format_duration),
    "cli_max_memory_per_process": (("cli", "max_memory_per_process"), str),
    "cli_max_cpu_time": (("cli", "max_cpu_time"), format_duration),
    "cli_max_file_size": (("cli", "max_file_size"), str),
    "cli_max_processes": (("cli", "max_processes"), _same),
    "cli_max_output_bytes": (("cli", "max_output_bytes"), str),
    "cli_working_directory": (("cli", "working_directory"), _same),
    "cli_confine_paths": (("cli", "confine_paths"), _same),
    "cli_run_as_user": (("cli", "run_as_user"), _same),
    "cli_heartbeat_interval": (("cli", "heartbeat_interval"), format_duration),
    "compress_enabled": (("compression", "enabled"), _same),
    "compress_algorithms": (("compression", "algorithms"), list),
    "compress_gzip_level": (("compression", "levels", "gzip"), _same),
    "compress_br_level": (("compression", "levels", "br"), _same),
    "compress_zstd_level": (("compression", "levels", "zstd"), _same),
    "compress_min_size": (("compression", "min_size"), str),
    "compress_content_types": (("compression", "content_types"), list),
    "compress_offload_threshold": (("compression", "offload_threshold"), str),
    "compress_memo_size": (("compression", "memo_size"), str),
    "cache_enabled": (("cache", "enabled"), _same),
    "cache_max_memory": (("cache", "max_memory"), str),
    "cache_max_entries": (("cache", "max_entries"), _same),
    "cache_max_object_size": (("cache", "max_object_size"), str),
    "cache_default_ttl": (("cache", "default_ttl"), format_duration),
    "cache_mode": (("cache", "mode"), _same),
    "cache_patterns": (("cache", "patterns"), list),
    "cache_coalesce_timeout": (("cache", "coalesce_timeout"), format_duration),
    "cache_max_waiters": (("cache", "max_waiters"), _same),
    "cache_surrogate": (("cache", "surrogate"), _same),
    "cache_surrogate_name": (("cache", "surrogate_name"), _same),
    "cache_stale_on_error": (("cache", "stale_on_error"), _same),
    "acl_allowed_ips": (("security", "acl", "allowed_ips"), list),
    "acl_denied_ips": (("security", "acl", "denied_ips"), list),
    "acl_mode": (("security", "acl", "mode"), _same),
    "ratelimit_requests_per_second": (
        ("security", "rate_limiting", "requests_per_second"),
        lambda v: f"{v:g}",
    ),
    "ratelimit_burst": (("security", "rate_limiting", "burst"), _same),
    "ratelimit_mode": (("security", "rate_limiting", "mode"), _same),
    "ratelimit_exempt": (("security", "rate_limiting", "exempt"), list),
    "ratelimit_max_connections_per_ip": (
        ("security", "rate_limiting", "max_connections_per_ip"),
        _same,
    ),
    "ratelimit_max_clients": (("security", "rate_limiting", "max_clients"), _same),
    "ratelimit_ban_after": (("security", "rate_limiting", "ban", "after"), _same),
    "ratelimit_ban_within": (("security", "rate_limiting", "ban", "within"), format_duration),
    "ratelimit_ban_duration": (("security", "rate_limiting", "ban", "duration"), format_duration),
    "ratelimit_ban_status": (("security", "rate_limiting", "ban", "status"), str),
    "ratelimit_rules": (
        ("security", "rate_limiting", "rules"),
        lambda rules: json.dumps([r.model_dump(exclude_none=True) for r in rules]) if rules else "",
    ),
    "secheaders_enabled": (("security", "headers", "enabled"), _same),
    "secheaders_hsts": (("security", "headers", "hsts"), _same),
    "secheaders_content_type_options": (("security", "headers", "content_type_options"), _same),
    "secheaders_frame_options": (("security", "headers", "frame_options"), _same),
    "secheaders_content_security_policy": (
        ("security", "headers", "content_security_policy"),
        _same,
    ),
    "secheaders_override": (("security", "headers", "override"), _same),
    "routing_rules": (("routing", "rules"), _json_list),
    "routing_default_backend": (("routing", "default_backend"), lambda v: v or ""),
    "router_retries_max_attempts": (("routing", "retries", "max_attempts"), _same),
    "router_retries_backoff": (("routing", "retries", "backoff"), format_duration),
    "router_retries_max_backoff": (("routing", "retries", "max_backoff"), format_duration),
    "router_retries_budget_percent": (("routing", "retries", "budget_percent"), _int),
    "router_retries_budget_min": (("routing", "retries", "budget_min"), _same),
    "router_health_checks_enabled": (("health_checks", "enabled"), _same),
    "router_health_checks_interval": (("health_checks", "interval"), format_duration),
    "router_health_checks_timeout": (("health_checks", "timeout"), format_duration),
    "router_health_checks_path": (("health_checks", "path"), _same),
    "router_health_checks_unhealthy_threshold": (
        ("health_checks", "unhealthy_threshold"),
        _same,
    ),
    "router_health_checks_healthy_threshold": (("health_checks", "healthy_threshold"), _same),
    "router_circuit_breaker_enabled": (("circuit_breaker", "enabled"), _same),
    "router_circuit_breaker_failure_threshold": (
        ("circuit_breaker", "failure_threshold"),
        _same,
    ),
    "router_circuit_breaker_timeout": (("circuit_breaker", "timeout"), format_duration),
    "router_circuit_breaker_success_threshold": (
        ("circuit_breaker", "success_threshold"),
        _same,
    ),
}

# The product requirements' `enabled: false` switches: the section's values stay in the profile, and the
# options that would apply them get their off value instead.
SWITCHES: dict[tuple[str, ...], dict[str, Any]] = {
    ("server", "tls", "enabled"): {
        "tls_listener_cert": "",
        "tls_listener_key": "",
        "tls_listener_chain": "",
    },
    ("security", "acl", "enabled"): {"acl_allowed_ips": [], "acl_denied_ips": []},
    ("security", "rate_limiting", "enabled"): {
        "ratelimit_requests_per_second": "0",
        "ratelimit_rules": "",
        "ratelimit_max_connections_per_ip": 0,
    },
}

# Core mitmproxy options the bundle sets unless the profile's `mitmproxy:` section or the
# command line says otherwise: bodies over 1 MiB are streamed, never held whole in memory; the
# flow dumper stays quiet because the access log says the same thing as JSON; and the mitm.it
# onboarding app (a CA download page for interception debugging) is not served to clients.
CORE_DEFAULTS: dict[str, Any] = {"stream_large_bodies": "1m", "flow_detail": 0, "onboarding": False}


def to_options(profile: Profile) -> dict[str, Any]:
    """The flat options (addons' and core mitmproxy's) that a profile asks for."""
    out: dict[str, Any] = {}
    for option, (path, convert) in OPTIONS.items():
        value: Any = profile
        for key in path:
            value = getattr(value, key)
        out[option] = convert(value)
    for path, off in SWITCHES.items():
        switch: Any = profile
        for key in path:
            switch = getattr(switch, key)
        if switch is False:
            out |= off
    return out | CORE_DEFAULTS | listener_options(profile) | profile.mitmproxy


def listener_options(profile: Profile) -> dict[str, Any]:
    """Core options for `routing.listeners`: mitmproxy modes, lazy connects, the client's Host.

    A reverse listener's target is only where mitmproxy points the flow before the router
    rewrites it (routing.default_backend, else the first rule's first backend). Lazy
    connects are what per-request backend choice needs (an eager reverse listener connects to
    that target when the client connects), and the client's Host header is kept so host rules
    can match it (the router rewrites Host per rule).
    """
    routing = profile.routing
    if not routing.listeners:
        return {}
    first = routing.rules[0].forward if routing.rules else None
    target = routing.default_backend or (
        first.target or first.backends[0].url if first is not None else None
    )
    modes = []
    for lst in routing.listeners:
        port = lst.port if lst.port is not None or not lst.host else profile.server.port
        at = ""
        if port is not None:
            at = f"@{lst.host}:{port}" if lst.host else f"@{port}"
        if lst.mode == "forward":
            modes.append(f"regular{at}")
        elif target is not None:  # always, see Routing._consistent
            modes.append(f"reverse:{target}{at}")
    return {"mode": modes, "connection_strategy": "lazy", "keep_host_header": True}
