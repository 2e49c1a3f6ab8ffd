"""Backlog: a deeper listen queue for the proxy's TCP listeners.

mitmproxy opens its listeners with asyncio's default backlog of 100. When many clients connect
at once (1,000 measured, docs/performance.md) the kernel drops thousands of SYNs and the
clients wait out seconds of retransmission; a backlog of 4,096 removed the drops. Calling
listen() again on a listening socket only changes its queue length (Linux), so this wraps
mitmproxy's `ServerInstance.start` and re-listens every TCP socket it opened, including
listeners restarted later by a mode or listen-address change. The kernel caps the value at
net.core.somaxconn.

Patched through `addons/kernel/patching.py`, so only on the mitmproxy versions it checked;
elsewhere a WARNING says the backlog stays mitmproxy's.

Hooks: load, configure, running. Options: listen_backlog.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from mitmproxy import ctx
from mitmproxy.proxy import mode_servers

from addons.kernel import patching
from addons.kernel.options import Option, at_least, declare

log = logging.getLogger("waypost.backlog")


def relisten(servers: list[Any], backlog: int) -> int:
    """listen(backlog) on every TCP socket of these asyncio servers; returns how many."""
    count = 0
    for server in servers:
        for sock in getattr(server, "sockets", ()):
            if sock.type != socket.SOCK_STREAM:
                continue
            # asyncio hands out TransportSocket wrappers without listen(); a duplicate of the
            # descriptor reaches the same kernel socket.
            dup = socket.fromfd(sock.fileno(), sock.family, sock.type)
            try:
                dup.listen(backlog)
            finally:
                dup.close()
            count += 1
    return count


async def _start(self: Any) -> None:
    await _start.__waypost_wrapped__(self)  # type: ignore[attr-defined]
    if _start.backlog > 0:  # type: ignore[attr-defined]
        relisten(getattr(self, "_servers", []), _start.backlog)  # type: ignore[attr-defined]


_start.backlog = 0  # type: ignore[attr-defined]
START = patching.Patch(
    key="backlog.start",
    target=mode_servers.ServerInstance,
    name="start",
    replacement=_start,
    missing="no hook runs when a listener is opened (nor an option for asyncio's backlog)",
)


OPTIONS: tuple[Option, ...] = (
    Option(
        "listen_backlog",
        int,
        4096,
        "Length of the kernel's queue of not-yet-accepted connections for the proxy's "
        "listeners (mitmproxy's own is 100, which drops connections when many clients "
        "connect at once); capped by net.core.somaxconn. 0 leaves mitmproxy's.",
    ),
)


class Backlog:
    def load(self, loader: Any) -> None:
        declare(loader, OPTIONS)

    def configure(self, updated: set[str]) -> None:
        if "listen_backlog" not in updated:
            return
        backlog = at_least("listen_backlog", ctx.options.listen_backlog, 0)
        if not patching.install(START, unchecked="listen_backlog is not applied"):
            return
        _start.backlog = backlog  # type: ignore[attr-defined]
        self._relisten_running()

    def running(self) -> None:
        # On mitmproxy 12 the listeners start binding before `-s` scripts load, so they miss
        # the wrapper, and may still be starting now: Servers.changed fires once they are up
        # (and after every later change of listeners). The signal holds a weak reference.
        ps = ctx.master.addons.get("proxyserver")
        if ps is not None:
            ps.servers.changed.connect(self._relisten_running)
        self._relisten_running()

    def _relisten_running(self) -> None:
        backlog = ctx.options.listen_backlog
        ps = ctx.master.addons.get("proxyserver")
        if ps is not None and backlog > 0 and patching.installed(START.key):
            for instance in ps.servers:
                relisten(getattr(instance, "_servers", []), backlog)


addons = [Backlog()]
