"""Connection limits: how long a connection may idle or stall, and how many may be open.

- **Idle** (`server_idle_timeout`, the profile's `server.timeouts.idle`): a client connection,
  tunnels included, with no byte in either direction for this long is closed. mitmproxy has
  this watchdog already, fixed at 10 minutes (mitmproxy 12: `tcp_timeout`); a patch of
  `ConnectionHandler.__init__` sets the new connection's watchdog to ours before its task
  starts (mitmproxy 12 starts it eagerly, so no hook is early enough).
- **Write** (`server_write_timeout`, `server.timeouts.write`): a peer, client or backend, that
  accepts nothing of what the proxy has to send for this long is cut off, like nginx's
  `send_timeout`. mitmproxy waits for every full write buffer to drain before it reads on
  (`ConnectionHandler.drain_writers`), with no bound: a client that stops reading holds its
  response's buffers and its connection for ever. The patch bounds each wait; a buffer that
  does not drain in time cancels that connection's handler, as mitmproxy does on a send error.
  The wait is only timed when something is buffered, so the common case costs one call.
- **Closed backend connections are let go.** mitmproxy's HTTP layer keeps every backend
  connection a client connection ever used (`HttpLayer.connections`) until the client
  disconnects, closed ones too, and scans them all for each request: a load balancer's
  keep-alive connection grows by one connection's layers (~3 KB) each time a backend closes
  its side or a connect fails (in the one-hour soak, +1,900 of them, +7 MB). A patch of
  `HttpLayer._handle_event` drops a backend connection once it can carry nothing again: its
  `ConnectionClosed` has arrived and it is fully closed, or its connect failed, and no request
  still being handled addresses it. A failed connect is then not answered again from memory:
  the next request on that client connection dials anew, as nginx and Envoy do.
- **Open connections** (`server_max_connections`, `server.limits.max_concurrent_connections`):
  past the cap a new client connection is closed in `client_connected`, before a byte is read
  (as the per-IP cap of `ratelimit` does), counted in
  `waypost_connections_refused_total{reason="max_connections"}` and logged at most once every
  10 seconds. With N workers each enforces its share, the cap divided by N rounded up (the
  kernel spreads connections evenly over the workers).

Hooks: load (the patch above), configure, client_connected, client_disconnected, done.
Options: server_idle_timeout, server_write_timeout, server_max_connections.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

from mitmproxy import connection, ctx
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import events, server
from mitmproxy.proxy.layers.http import HttpLayer
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from addons import metrics
from addons.kernel import patching
from addons.kernel.instance import identity
from addons.kernel.options import Option, at_least, declare, duration, once

log = logging.getLogger("waypost.connections")

REFUSAL_LOG_INTERVAL = 10.0

OPTIONS: tuple[Option, ...] = (
    Option(
        "server_idle_timeout",
        str,
        "120s",
        "Close a client connection (a CONNECT tunnel too) with no byte in either direction "
        "for this long. 0 keeps mitmproxy's own (10 minutes).",
    ),
    Option(
        "server_write_timeout",
        str,
        "30s",
        "Cut off a client or backend that accepts nothing of what the proxy has to send for "
        "this long (nginx's send_timeout). 0: wait for ever.",
    ),
    Option(
        "server_max_connections",
        int,
        0,
        "Most client connections open at once (with N workers, each takes its share); a new "
        "one past it is closed before a byte is read. 0: no cap.",
    ),
)


# --- the write timeout: a bound on mitmproxy's wait for full write buffers --------------------


async def _drain_writers(self: Any) -> None:
    timeout = _drain_writers.timeout  # type: ignore[attr-defined]
    if not timeout:
        return await _drain_writers.__waypost_wrapped__(self)  # type: ignore[attr-defined]
    async with self._drain_lock:
        for transport in list(self.transports.values()):
            writer = transport.writer
            if writer is None:
                continue
            try:
                if not _buffered(writer):
                    await writer.drain()
                    continue
                async with asyncio.timeout(timeout):
                    await writer.drain()
            except TimeoutError:
                if transport.handler is not None:
                    transport.handler.cancel(f"Write timeout: nothing sent for {timeout:g}s")
            except OSError as e:
                if transport.handler is not None:
                    transport.handler.cancel(f"Error sending data: {e}")
    return None


_drain_writers.timeout = 0.0  # type: ignore[attr-defined]


def _buffered(writer: Any) -> bool:
    """Whether anything waits in the writer's buffer (a drain may then have to wait)."""
    transport = getattr(writer, "transport", None)
    size = getattr(transport, "get_write_buffer_size", None)
    return size is None or size() > 0


# --- the idle timeout: the watchdog mitmproxy makes for every connection -------------------------


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    _init.__waypost_wrapped__(self, *args, **kwargs)  # type: ignore[attr-defined]
    if _init.idle and self.client.transport_protocol == "tcp":  # type: ignore[attr-defined]
        self.timeout_watchdog.timeout = _init.idle  # type: ignore[attr-defined]


_init.idle = 0.0  # type: ignore[attr-defined]
IDLE = patching.Patch(
    key="connections.idle",
    target=server.ConnectionHandler,
    name="__init__",
    replacement=_init,
    missing="no hook runs before a connection's inactivity watchdog starts",
)

DRAIN = patching.Patch(
    key="connections.drain_writers",
    target=server.ConnectionHandler,
    name="drain_writers",
    replacement=_drain_writers,
    missing="no hook or option bounds how long mitmproxy waits for a peer to accept data",
)


# --- closed backend connections: let go by the client connection's HTTP layer -------------


def _handle_event(self: Any, event: events.Event) -> Any:
    # Most events change nothing here: hand back mitmproxy's own generator, no extra frame.
    wrapped = _handle_event.__waypost_wrapped__  # type: ignore[attr-defined]
    if not self._wp_done and not isinstance(
        event, events.ConnectionClosed | events.OpenConnectionCompleted
    ):
        return wrapped(self, event)
    return _forgetting(self, event, wrapped)


def _forgetting(self: Any, event: events.Event, wrapped: Any) -> Any:
    yield from wrapped(self, event)
    if isinstance(event, events.ConnectionClosed):
        # The connection's handler sends nothing after its ConnectionClosed; once the layers
        # have closed their side too, nothing can travel on it again.
        conn = event.connection
        if conn is not self.context.client and conn.state is ConnectionState.CLOSED:
            self._wp_done = (*self._wp_done, conn)
    elif isinstance(event, events.OpenConnectionCompleted) and event.reply:
        self._wp_done = (*self._wp_done, event.command.connection)
    if self._wp_done:
        _forget(self)


def _forget(self: Any) -> None:
    # A stream may still send to its connection (a hook it awaits finishes later): mitmproxy
    # looks the connection up then, so it stays until that stream is dropped.
    addressed = {stream.context.server for stream in self.streams.values()}
    kept = []
    for conn in self._wp_done:
        if conn in addressed or conn in self.waiting_for_establishment:
            kept.append(conn)
        else:
            self.connections.pop(conn, None)
    self._wp_done = tuple(kept)


FORGET = (
    patching.Patch(
        key="connections.forget",
        target=HttpLayer,
        name="_handle_event",
        replacement=_handle_event,
        missing="nothing removes a closed backend connection from a client connection's HTTP "
        "layer before the client disconnects",
    ),
    patching.Patch(
        key="connections.forget_state",
        target=HttpLayer,
        name="_wp_done",
        replacement=(),
        missing="backend connections that can carry nothing again, not yet let go",
    ),
)


# --- metrics ---------------------------------------------------------------------------------


class _Collector:
    def __init__(self) -> None:
        self.addon: Connections | None = None

    def collect(self) -> Iterator[Metric]:
        addon = self.addon
        refused = CounterMetricFamily(
            "waypost_connections_refused",
            "Client connections closed before a byte was read, by reason.",
            labels=["reason"],
        )
        refused.add_metric(["max_connections"], addon.refused if addon else 0)
        yield refused
        yield GaugeMetricFamily(
            "waypost_connections_limit",
            "This process's cap on open client connections (0: none).",
            addon.limit if addon else 0,
        )


def _collector() -> _Collector:
    collector = _Collector()
    metrics.REGISTRY.register(collector)
    return collector


COLLECTOR = once("connections.collector", _collector)


# --- the addon -------------------------------------------------------------------------------


class Connections:
    def __init__(self) -> None:
        self.limit = 0
        self.open: set[str] = set()
        self.refused = 0
        self._last_refusal_log = 0.0

    def load(self, loader: Any) -> None:
        declare(loader, OPTIONS)
        patching.install(
            *FORGET,
            unchecked="closed backend connections stay in memory until their client disconnects",
            by="connections",
        )

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if "server_idle_timeout" in updated:
            idle = duration("server_idle_timeout", opts.server_idle_timeout)
            if idle and patching.install(
                IDLE, unchecked="server_idle_timeout is not applied", by="connections"
            ):
                _init.idle = idle  # type: ignore[attr-defined]
            elif not idle:
                _init.idle = 0.0  # type: ignore[attr-defined]
        if "server_write_timeout" in updated:
            write = duration("server_write_timeout", opts.server_write_timeout)
            if write and patching.install(
                DRAIN, unchecked="server_write_timeout is not applied", by="connections"
            ):
                _drain_writers.timeout = write  # type: ignore[attr-defined]
            elif not write:
                _drain_writers.timeout = 0.0  # type: ignore[attr-defined]
        if "server_max_connections" in updated:
            cap = at_least("server_max_connections", opts.server_max_connections, 0)
            self.limit = math.ceil(cap / identity().workers) if cap else 0
        COLLECTOR.addon = self

    def done(self) -> None:
        patching.uninstall(DRAIN.key, IDLE.key, *(p.key for p in FORGET), by="connections")

    def client_connected(self, client: connection.Client) -> None:
        if self.limit and not client.error:
            if len(self.open) >= self.limit:
                client.error = "Connection refused: the proxy has too many open connections."
                self._refused()
                return
            self.open.add(client.id)

    def client_disconnected(self, client: connection.Client) -> None:
        self.open.discard(client.id)

    def _refused(self) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= REFUSAL_LOG_INTERVAL:
            self._last_refusal_log = now
            log.warning(
                "connection refused: %d client connections open, the cap (server_max_connections"
                ", this process's share) is %d; %d refused so far",
                len(self.open),
                self.limit,
                self.refused,
            )


addons = [Connections()]
