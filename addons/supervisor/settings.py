"""What the supervisor needs to know before any worker starts, resolved as a worker would.

The worker reads its profile through the config addon (`--set waypost_profile=` >
WAYPOST_PROFILE > profiles/default.yaml), merges the environment into it and lets `--set`
win over both. `resolve` does the same with the same schema, so a profile with an error stops
the instance here, with validate-config's message, before any worker starts.

    resolve(["-s", "addons/bundle.py", "--set", "server_workers=4"], os.environ, cores=8)
        -> Settings(workers=4, metrics_enabled=True, ...)        # or raises SettingsError
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from addons import schema
from addons.kernel.units import parse_duration, parse_workers

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


class SettingsError(ValueError):
    """A profile or `--set` value the instance cannot start with; the message is for operators."""


@dataclass(frozen=True)
class Settings:
    workers: int  # `auto` already resolved to the usable cores
    metrics_enabled: bool
    metrics_host: str
    metrics_port: int
    metrics_path: str
    metrics_worker_label: bool
    shutdown_timeout: float  # seconds
    # Every flat option as the workers start with it (profile, environment, then --set), for
    # the instance app (admin_token, metrics_proxy_port_*, ...).
    options: Mapping[str, Any]


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers narrow)."""
    return len(os.sched_getaffinity(0))


def set_options(argv: Sequence[str]) -> dict[str, str]:
    """The `--set name=value` (and `--set=name=value`) pairs of a mitmdump command line; the
    last one wins, and a bare `--set name` is mitmproxy's "true" for a boolean."""
    out: dict[str, str] = {}
    args = iter(argv)
    for arg in args:
        if arg == "--set":
            spec = next(args, "")
        elif arg.startswith("--set="):
            spec = arg.removeprefix("--set=")
        else:
            continue
        name, sep, value = spec.partition("=")
        if name:
            out[name] = value if sep else "true"
    return out


def resolve(argv: Sequence[str], environ: Mapping[str, str], cores: int) -> Settings:
    """The instance's settings from the workers' command line, the environment and profile."""
    given = set_options(argv)
    try:
        loaded = schema.load(schema.choose(given.get("waypost_profile", ""), environ), environ)
    except schema.ProfileError as e:
        raise SettingsError(str(e)) from None
    options = schema.to_options(loaded.profile) | given
    workers = _convert("server_workers", options["server_workers"], parse_workers)
    return Settings(
        workers=cores if workers == "auto" else workers,
        metrics_enabled=_convert("metrics_enabled", options["metrics_enabled"], _flag),
        metrics_host=str(options["metrics_host"]),
        metrics_port=_convert("metrics_port", options["metrics_port"], _port),
        metrics_path=str(options["metrics_path"]),
        metrics_worker_label=_convert(
            "metrics_worker_label", options["metrics_worker_label"], _flag
        ),
        shutdown_timeout=_convert(
            "server_shutdown_timeout", options["server_shutdown_timeout"], parse_duration
        ),
        options=options,
    )


def _convert(name: str, value: Any, parse: Any) -> Any:
    try:
        return parse(value)
    except ValueError as e:
        raise SettingsError(f"{name}: {e}") from None


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text not in _TRUE + _FALSE:
        raise ValueError(f"expected true or false, got {value!r}")
    return text in _TRUE


def _port(value: Any) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError(f"{port} is not a TCP port (0-65535)")
    return port
