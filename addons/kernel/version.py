"""Versions of what is running: Waypost (its package metadata), mitmproxy and Python."""

from __future__ import annotations

import importlib.metadata
import platform

from mitmproxy.version import VERSION as MITMPROXY_VERSION


def waypost_version() -> str:
    """The installed distribution's version; "unknown" for a checkout that was never installed
    (`pip install -e .` gives it metadata)."""
    try:
        return importlib.metadata.version("waypost")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def versions() -> dict[str, str]:
    """{"waypost": ..., "mitmproxy": ..., "python": ...}, in that order."""
    return {
        "waypost": waypost_version(),
        "mitmproxy": MITMPROXY_VERSION,
        "python": platform.python_version(),
    }
