"""Backlog: the listen queue of the proxy's TCP listeners: how long, and how much is taken at once.

mitmproxy opens its listeners with asyncio's default backlog of 100. When many clients connect
at once (1,000 measured, docs/performance.md) the kernel drops thousands of SYNs and the
clients wait out seconds of retransmission; a backlog of 4,096 removed the drops. Calling
listen() again on a listening socket only changes its queue length (Linux), so this wraps
mitmproxy's `ServerInstance.start` and re-listens every TCP socket it opened, including
listeners restarted later by a mode or listen-address change. The kernel caps the value at
net.core.somaxconn.

**Accepts per loop turn** (`server_max_accepts_per_event`, `limits.max_accepts_per_event`):
asyncio accepts up to 100 pending connections each time a listener is readable (its listen
backlog, not ours), and all of their setups (mitmproxy's handler, client_connected,
next_layer) then run back to back before any other connection's next step: 200 connections
opened at once held the loop long enough to lift p99 of unrelated requests from 7 to 50-100 ms.
A patch of the selector loop's accept callback caps that batch; the listener stays readable,
so the rest are accepted in the next turns (Envoy's `max_connections_to_accept_per_socket_event`).
Measured with 200 connections at once: unrelated requests' worst latency 48-103 ms uncapped,
25-27 ms at 4, 36-44 ms at 8. A fixed cap starves a saturated proxy, whose turns are long:
1,000 clients connecting at once waited seconds (p99 8 s), so each turn may also take one more
per millisecond since the listener's last accept turn (p99 1.7 s, asyncio's own: 1.8 s). It
covers every listener of the process (the management app's too); uvloop accepts in C and is not
capped.

Patched through `addons/kernel/patching.py`, so only on the mitmproxy versions it checked;
elsewhere a WARNING says the backlog stays mitmproxy's.

Hooks: load, configure, running, done. Options: listen_backlog, server_max_accepts_per_event.
"""

from __future__ import annotations

import asyncio.selector_events
import logging
import socket
import time
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


# --- accepts per loop turn: a cap on asyncio's accept batch ---------------------------------


def _accept_connection(self: Any, protocol_factory: Any, sock: Any, *args: Any, **kw: Any) -> None:
    cap = _accept_connection.cap  # type: ignore[attr-defined]
    if cap:
        # The batch is the listen backlog: `backlog`, after sslcontext and server (positional
        # from asyncio's _start_serving, 3.11 and 3.12).
        backlog = args[2] if len(args) >= 3 else kw.get("backlog", 100)
        batch = min(backlog, _allowance(sock.fileno(), cap))
        if len(args) >= 3:
            args = (*args[:2], batch, *args[3:])
        else:
            kw["backlog"] = batch
    wrapped = _accept_connection.__waypost_wrapped__  # type: ignore[attr-defined]
    wrapped(self, protocol_factory, sock, *args, **kw)


_accept_connection.cap = 0  # type: ignore[attr-defined]
_last_accept: dict[int, float] = {}  # listening fd -> when its accept callback last ran
ACCEPTS_PER_MS = 1.0
TURN_AT_MOST = 0.5  # seconds: a longer gap since the last accept turn was an idle listener


def _allowance(fd: int, cap: int) -> int:
    """`cap`, plus one per millisecond since this listener's last accept turn. While
    connections wait, the callback runs once per loop turn, so that gap is the turn's length:
    short turns (a storm on an idle proxy) take a few connections each, long ones (hundreds of
    busy connections) take more, so that new connections still get in at 1,000 a second or
    more (with a fixed 4, 1,000 clients connecting to a saturated proxy waited seconds). The
    first turn after a quiet spell takes `cap`: its gap measured the quiet, not a turn."""
    now = time.monotonic()
    gap = now - _last_accept.get(fd, now)
    _last_accept[fd] = now
    return cap + (int(gap * 1000 * ACCEPTS_PER_MS) if gap <= TURN_AT_MOST else 0)


ACCEPT = patching.Patch(
    key="backlog.accept",
    target=asyncio.selector_events.BaseSelectorEventLoop,
    name="_accept_connection",
    replacement=_accept_connection,
    missing="no option of mitmproxy or asyncio.start_server bounds the accept batch apart "
    "from the listen backlog",
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
    Option(
        "server_max_accepts_per_event",
        int,
        4,
        "New connections accepted from a listener per turn of the event loop; the rest wait "
        "for the next turn, so a burst is set up between the steps of running requests. "
        "0: asyncio's own batch (up to 100).",
    ),
)


class Backlog:
    def load(self, loader: Any) -> None:
        declare(loader, OPTIONS)

    def configure(self, updated: set[str]) -> None:
        if "server_max_accepts_per_event" in updated:
            cap = at_least(
                "server_max_accepts_per_event", ctx.options.server_max_accepts_per_event, 0
            )
            if cap and patching.install(
                ACCEPT, unchecked="server_max_accepts_per_event is not applied", by="backlog"
            ):
                _accept_connection.cap = cap  # type: ignore[attr-defined]
            elif not cap:
                _accept_connection.cap = 0  # type: ignore[attr-defined]
        if "listen_backlog" not in updated:
            return
        backlog = at_least("listen_backlog", ctx.options.listen_backlog, 0)
        if not patching.install(START, unchecked="listen_backlog is not applied"):
            return
        _start.backlog = backlog  # type: ignore[attr-defined]
        self._relisten_running()

    def done(self) -> None:
        patching.uninstall(ACCEPT.key, by="backlog")

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
