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
1,000 clients connecting at once waited seconds (p99 8 s), so while connections wait each turn
may also take a few more per millisecond of the turn (`_allowance`: few for a young burst, more
for a queue that persists). It covers every listener of the process (the management app's
too); uvloop accepts in C and is not capped.

**Admission at accept**: a connection to a proxy listener is offered to the gates of
`kernel/admission.py` (RateLimit's per-IP connection cap) as asyncio accepts it, before
mitmproxy builds anything for it; one a gate refuses is closed there. Connections over the
per-IP cap cost the loop about 0.4 ms each when the hook refused them; the measurement is in
that module.

Patched through `addons/kernel/patching.py`, so only on the mitmproxy versions it checked;
elsewhere a WARNING says the backlog stays mitmproxy's.

Hooks: load, configure, running, done. Options: listen_backlog, server_max_accepts_per_event.
"""

from __future__ import annotations

import asyncio.selector_events
import logging
import select
import socket
import time
import weakref
from typing import Any

from mitmproxy import ctx
from mitmproxy.proxy import mode_servers

from addons.kernel import admission, patching
from addons.kernel.net import normalize_peer
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
    fd = sock.fileno()
    if cap:
        # The batch is the listen backlog: `backlog`, after sslcontext and server (positional
        # from asyncio's _start_serving, 3.11 and 3.12).
        backlog = args[2] if len(args) >= 3 else kw.get("backlog", 100)
        batch = min(backlog, _allowance(fd, cap, time.monotonic()))
        if len(args) >= 3:
            args = (*args[:2], batch, *args[3:])
        else:
            kw["backlog"] = batch
    wrapped = _accept_connection.__waypost_wrapped__  # type: ignore[attr-defined]
    wrapped(self, protocol_factory, sock, *args, **kw)
    if cap and fd >= 0:
        _note_queue(fd, time.monotonic())


_accept_connection.cap = 0  # type: ignore[attr-defined]
# Listening fd -> (since when connections have waited, its last accept turn), while some do.
_waiting: dict[int, tuple[float, float]] = {}
ACCEPTS_PER_MS = 0.25  # while a burst is young
SUSTAINED_PER_MS = 1.0  # once connections have waited BURST_SECONDS
BURST_SECONDS = 0.5


def _allowance(fd: int, cap: int, now: float) -> int:
    """`cap`, plus some per millisecond since this listener's last accept turn if that turn
    left connections waiting: the callback then runs again in the next loop turn, so that gap
    is the turn's length, and long turns (hundreds of busy connections) take more. The rate
    grows with how long connections have waited. A burst (a wave of 220 slowloris and garbage
    connections) is let in at 0.25 a millisecond, between the steps of the running requests:
    at 1 a millisecond p99 of a 500 req/s load read 144-212 ms through six such waves, at 0.25
    30-75 ms (median 40; the allowance before this one, from any gap under 0.5 s: 34-55). A
    queue that persists is sustained demand, which waiting does not shrink: after half a
    second it is taken at 1 a millisecond. 1,000 clients connecting to a saturated proxy at
    once: p99 2.1 s (1.7 s at 1 a millisecond throughout, medians of three; 3.2 s at 0.25
    throughout; a quarter-second ramp let the waves through at 75-80 ms). A turn after the
    queue was emptied takes `cap`: the time since measured other work, not a turn."""
    waiting = _waiting.get(fd)
    if waiting is None:
        return cap
    since, last = waiting
    rate = ACCEPTS_PER_MS if now - since < BURST_SECONDS else SUSTAINED_PER_MS
    return cap + int((now - last) * 1000 * rate)


def _note_queue(fd: int, now: float) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if poller.poll(0):
        waiting = _waiting.get(fd)
        _waiting[fd] = (waiting[0] if waiting else now, now)
    else:
        _waiting.pop(fd, None)


ACCEPT = patching.Patch(
    key="backlog.accept",
    target=asyncio.selector_events.BaseSelectorEventLoop,
    name="_accept_connection",
    replacement=_accept_connection,
    missing="no option of mitmproxy or asyncio.start_server bounds the accept batch apart "
    "from the listen backlog",
)


# --- admission: the gates asked as a proxy listener's connection is accepted ---------------

_proxy_servers: weakref.WeakSet[Any] = weakref.WeakSet()  # the proxy listeners' asyncio servers


async def _accept_connection2(
    self: Any, protocol_factory: Any, conn: socket.socket, extra: dict[str, Any], *args: Any,
    **kw: Any,
) -> None:  # fmt: skip
    if admission.gated():
        # `server` follows sslcontext (positional from _accept_connection, 3.11 and 3.12).
        server = args[1] if len(args) >= 2 else kw.get("server")
        peer = extra.get("peername")
        if server in _proxy_servers and peer and admission.refuses(normalize_peer(peer[0])):
            conn.close()
            return
    wrapped = _accept_connection2.__waypost_wrapped__  # type: ignore[attr-defined]
    await wrapped(self, protocol_factory, conn, extra, *args, **kw)


ADMIT = patching.Patch(
    key="backlog.admit",
    target=asyncio.selector_events.BaseSelectorEventLoop,
    name="_accept_connection2",
    replacement=_accept_connection2,
    missing="client_connected runs only after mitmproxy has set the connection up",
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
            _waiting.clear()  # noted under the previous cap (or none, with 0)
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
        patching.uninstall(ACCEPT.key, ADMIT.key, by="backlog")

    def running(self) -> None:
        patching.install(ADMIT, unchecked="connections are refused only by the hooks", by="backlog")
        # On mitmproxy 12 the listeners start binding before `-s` scripts load, so they miss
        # the wrapper, and may still be starting now: Servers.changed fires once they are up
        # (and after every later change of listeners). The signal holds a weak reference.
        ps = ctx.master.addons.get("proxyserver")
        if ps is not None:
            ps.servers.changed.connect(self._listeners_changed)
        self._listeners_changed()

    def _listeners_changed(self) -> None:
        ps = ctx.master.addons.get("proxyserver")
        if ps is None:
            return
        _proxy_servers.clear()
        for instance in ps.servers:
            tcp = (s for s in getattr(instance, "_servers", []) if isinstance(s, asyncio.Server))
            _proxy_servers.update(tcp)
        self._relisten_running()

    def _relisten_running(self) -> None:
        backlog = ctx.options.listen_backlog
        ps = ctx.master.addons.get("proxyserver")
        if ps is not None and backlog > 0 and patching.installed(START.key):
            for instance in ps.servers:
                relisten(getattr(instance, "_servers", []), backlog)


addons = [Backlog()]
