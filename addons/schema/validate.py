"""validate-config, like `nginx -t`: load a profile, then apply it to the bundle's addons and
mitmproxy's own exactly as startup does, in a master that never listens; print every problem or
a summary.

    scripts/validate-config PROFILE.yaml     # python -m addons.schema PROFILE.yaml

Exit 0: valid (mitmdump starts with it); 1: invalid (mitmdump refuses it, with the same lines);
2: usage. The profile and every relative path in it resolve from the current directory, as for
a mitmdump started there; environment overrides (PROXY_PORT, WAYPOST_*...) apply as at startup.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import os
import sys
import tempfile
from pathlib import Path

from addons.kernel.units import format_duration
from addons.schema.loading import Loaded, ProfileError, load
from addons.schema.models import Profile
from addons.schema.options import listener_options
from addons.schema.security import Acl, RateLimiting

BUNDLE = Path(__file__).resolve().parents[1] / "bundle.py"


def main(argv: list[str]) -> int:
    """`scripts/validate-config PROFILE`: print every problem and exit 1, or a summary and 0."""
    parser = argparse.ArgumentParser(
        prog="scripts/validate-config",
        description="Check a Waypost profile with the checks startup runs: the schema, then "
        "every addon's and mitmproxy's own option checks. Nothing listens, nothing is written.",
        epilog="Exit status: 0 valid, 1 invalid (one line per problem: file:line: key: "
        "message), 2 usage. Relative paths resolve from the current directory.",
    )
    parser.add_argument("profile", metavar="PROFILE", help="the YAML profile to check")
    args = parser.parse_args(argv)
    try:
        loaded = load(args.profile, os.environ)
    except ProfileError as e:
        print(e, file=sys.stderr)
        return 1
    problems = startup_problems(loaded)
    if problems:
        print(ProfileError(loaded.source, problems), file=sys.stderr)
        return 1
    print(summary(loaded))
    return 0


def startup_problems(loaded: Loaded) -> list[str]:
    """What mitmdump would refuse when starting with this profile (which passed the schema):
    one line per problem, `file:line: key.path: message`."""
    return asyncio.run(_apply_to_bundle(loaded))


async def _apply_to_bundle(loaded: Loaded) -> list[str]:
    # mitmproxy is only imported once the schema passed.
    from mitmproxy import exceptions, hooks, master, options
    from mitmproxy.addons import default_addons
    from mitmproxy.addons.script import load_script

    errors = _Errors()
    root = logging.getLogger()
    root.addHandler(errors)
    # Only ERRORs (problems) are logged: the addons' INFO and WARNING lines would otherwise
    # reach the log file the profile names.
    disabled = root.manager.disable
    logging.disable(logging.WARNING)
    log = loaded.profile.logging
    log_file = Path(log.file) if log.output == "file" and log.file else None
    created = log_file is not None and not log_file.exists()
    # The confdir is where mitmproxy writes its CA on first configure.
    with (
        tempfile.TemporaryDirectory(prefix="waypost-validate-") as confdir,
        contextlib.redirect_stdout(io.StringIO()),  # the addons' own log handlers
    ):
        opts = options.Options(confdir=confdir)
        before = list(root.handlers)
        m = master.Master(opts)
        m.addons.add(*default_addons())
        opts.set(f"waypost_profile={loaded.source}", defer=True)
        # As mitmdump's script loader does: a fresh module, registered, then configured with
        # every option (the first addon, config, applies the profile to all the others).
        bundle = load_script(str(BUNDLE))
        problems: list[str] = []
        try:
            if bundle is None:
                problems.append(f"{BUNDLE}: cannot be loaded")
            else:
                m.addons.add(bundle)
                m.addons.invoke_addon_sync(bundle, hooks.ConfigureHook(set(opts.keys())))
        except exceptions.OptionsError as e:
            problems += str(e).splitlines()
        finally:
            await m.done()
            # The master's handler (mitmproxy's log events) outlives `done` and would hand
            # later records to this closed loop: take off whatever it added, ours too.
            for handler in [h for h in root.handlers if h not in before]:
                root.removeHandler(handler)
            root.removeHandler(errors)
            logging.disable(disabled)
    if created and log_file is not None:
        log_file.unlink(missing_ok=True)  # opened by the access log's configure
    # An ERROR an addon logged rather than raised names no option: it is the file's.
    return [f"{loaded.source}: {line}" for line in errors.lines] + problems


class _Errors(logging.Handler):
    """The ERROR records logged while the profile is applied: each one stops mitmdump's
    startup (mitmproxy's errorcheck), so each is a problem."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


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
