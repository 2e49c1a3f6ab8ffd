"""validate-config: check a profile as startup would, print every problem or a summary.

python -m addons.schema PROFILE.yaml     # scripts/validate-config runs this
"""

from __future__ import annotations

import os
import sys
from typing import Any

from addons.kernel.units import format_duration
from addons.schema.loading import Loaded, ProfileError, load
from addons.schema.models import Profile
from addons.schema.options import listener_options
from addons.schema.security import Acl, RateLimiting


def main(argv: list[str]) -> int:
    """`scripts/validate-config PROFILE`: print every problem and exit 1, or a summary and 0."""
    if len(argv) != 1:
        print("usage: scripts/validate-config PROFILE.yaml", file=sys.stderr)
        return 2
    try:
        loaded = load(argv[0], os.environ)
    except ProfileError as e:
        print(e, file=sys.stderr)
        return 1
    core = _core_options()
    unknown = [k for k in loaded.profile.mitmproxy if k not in core]
    if unknown:
        problems = [
            f"{loaded.where(('mitmproxy', k))}: mitmproxy.{k}: not a mitmproxy option"
            for k in unknown
        ]
        print(ProfileError(loaded.source, problems), file=sys.stderr)
        return 1
    print(summary(loaded))
    return 0


def summary(loaded: Loaded) -> str:
    """What the profile runs, one line per part: listeners, policies, cache, routing."""
    p = loaded.profile
    rows = [
        ("proxy", _proxy_summary(p)),
        ("management", _management_summary(p)),
        ("logging", f"{p.logging.level} {p.logging.format} to {_log_target(p)}"),
        ("limits", _limits_summary(p)),
        ("egress", _egress_summary(p)),
        ("tls", _interception_summary(p)),
        ("tls listener", _listener_cert_summary(p)),
        ("compression", _compression_summary(p)),
        ("cache", _cache_summary(p)),
        ("acl", _acl_summary(p.security.acl)),
        ("rate limit", _rate_summary(p.security.rate_limiting)),
        ("sec headers", "on" if p.security.headers.enabled else "off"),
        ("routing", _routing_summary(p)),
        ("mitmproxy", ", ".join(f"{k}={v}" for k, v in p.mitmproxy.items()) or "(defaults)"),
    ]
    return f"{loaded.source}: valid\n" + "\n".join(f"  {k:<12} {v}" for k, v in rows)


def _proxy_summary(p: Profile) -> str:
    s = p.server
    workers = "" if s.workers == 1 else f", {s.workers} workers"
    return (
        f"{s.host}:{s.port} (shutdown {s.shutdown_timeout:g}s, "
        f"connect {s.timeouts.connect:g}s, read {s.timeouts.read:g}s{workers})"
    )


def _management_summary(p: Profile) -> str:
    m = p.metrics
    where = "off" if not m.enabled else f"{m.host}:{m.port}"
    return f"{where} metrics at {m.path}, admin {'on' if p.admin.token else 'off (no token)'}"


def _log_target(p: Profile) -> str:
    return p.logging.file if p.logging.output == "file" and p.logging.file else "stdout"


def _limits_summary(p: Profile) -> str:
    lim = p.limits
    return (
        f"url {lim.max_url_length} B, headers {lim.max_header_size} B / "
        f"{lim.max_headers_count}, body {lim.max_body_size} B, "
        f"header timeout {lim.header_timeout:g}s"
    )


def _egress_summary(p: Profile) -> str:
    egress = p.security.egress
    private = "blocked" if egress.block_private else "allowed"
    allowed = egress.allowed_networks
    exempt = f" except {', '.join(allowed)}" if allowed else ""
    return f"CONNECT ports {', '.join(egress.connect_ports)}; private targets {private}{exempt}"


def _interception_summary(p: Profile) -> str:
    hosts = p.security.tls_interception.hosts
    return f"intercept {', '.join(hosts)}" if hosts else "pass every tunnel through"


def _listener_cert_summary(p: Profile) -> str:
    tls = p.server.tls
    if tls.cert and tls.enabled is not False:
        return f"{tls.cert} (key {tls.key})"
    return "mitmproxy certificate"


def _compression_summary(p: Profile) -> str:
    c = p.compression
    codings = ", ".join(f"{a} {getattr(c.levels, a)}" for a in c.algorithms)
    return f"{codings if c.enabled else 'off'} (bodies of {c.min_size} B or more)"


def _cache_summary(p: Profile) -> str:
    c = p.cache
    return f"{c.max_memory} B, {c.max_entries} entries, mode {c.mode}" if c.enabled else "off"


def _routing_summary(p: Profile) -> str:
    r = p.routing
    listeners = ", ".join(listener_options(p).get("mode", [])) or "(mitmproxy default)"
    hc, cb = p.health_checks, p.circuit_breaker
    checks = f"every {format_duration(hc.interval)}" if hc.enabled else "off"
    breaker = f"after {cb.failure_threshold} failures" if cb.enabled else "off"
    return (
        f"{len(r.rules)} rules, default backend {r.default_backend or 'none'}, listeners "
        f"{listeners}; health checks {checks}, circuit breaker {breaker}"
    )


def _acl_summary(acl: Acl) -> str:
    if not acl.enabled:
        return "off (enabled: false)"
    if not acl.allowed_ips and not acl.denied_ips:
        return "off (mitmproxy's block_global decides)"
    allowed = f"allow {', '.join(acl.allowed_ips)}" if acl.allowed_ips else "allow all"
    denied = f"; deny {', '.join(acl.denied_ips)}" if acl.denied_ips else ""
    return f"{allowed}{denied} ({acl.mode})"


def _rate_summary(rl: RateLimiting) -> str:
    if not rl.enabled:
        return "off (enabled: false)"
    parts = []
    if rl.requests_per_second:
        parts.append(f"{rl.requests_per_second:g}/s burst {rl.burst or 'auto'} per client IP")
    if rl.rules:
        parts.append(f"{len(rl.rules)} rule{'s' if len(rl.rules) != 1 else ''}")
    if rl.max_connections_per_ip:
        parts.append(f"max {rl.max_connections_per_ip} connections per IP")
    return f"{', '.join(parts)} ({rl.mode})" if parts else "off"


def _core_options() -> set[str]:
    """Names of mitmproxy's own options, including those its built-in addons declare."""
    from mitmproxy.addons import default_addons
    from mitmproxy.options import Options

    opts = Options()

    class _Loader:
        def add_option(
            self, name: str, typespec: Any, default: Any, help: str, choices: Any = None
        ) -> None:
            opts.add_option(name, typespec, default, help, choices)

        def add_command(self, *args: Any, **kwargs: Any) -> None:
            pass

    for addon in default_addons():
        if hasattr(addon, "load"):
            addon.load(_Loader())
    return set(opts.keys())
