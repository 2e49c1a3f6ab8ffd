"""Test-only stand-in for the management addon: exposes `listen_addrs` like the real one.

`--set fake_management_listen=127.0.0.1:9090` (repeatable) sets the addresses it claims to
listen on; it opens no socket itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from mitmproxy import ctx


class Management:
    def __init__(self) -> None:
        self.listen_addrs: list[tuple[str, int]] = []

    def load(self, loader: object) -> None:
        loader.add_option(  # type: ignore[attr-defined]
            "fake_management_listen", Sequence[str], [], "host:port pairs (test only)."
        )

    def configure(self, updated: set[str]) -> None:
        if "fake_management_listen" in updated:
            addrs = []
            for spec in ctx.options.fake_management_listen:
                host, _, port = spec.rpartition(":")
                addrs.append((host.strip("[]"), int(port)))
            self.listen_addrs = addrs


addons = [Management()]
