"""Graceful shutdown: on SIGTERM/SIGINT stop accepting, let in-flight requests finish, exit 0.

On the first SIGTERM or SIGINT the listeners close at once (`server=False`: mitmproxy's
`Servers.update` stops every server instance, which only closes the listening sockets;
established connections keep running, checked on 11.0.2 and 12.3.1). In-flight requests get up
to `server_shutdown_timeout` to finish, then `ctx.master.shutdown()`; mitmdump exits 0. A
second signal shuts down at once.

In flight means an HTTP request between `requestheaders` and `response`/`error`, or a CONNECT
between `http_connect` and `http_connected`/`http_connect_error`. An established tunnel
(TLS passthrough, raw TCP, a websocket after its 101) does not hold the drain: its traffic is
invisible to us, most tunnels are idle keep-alive connections, and waiting for them would turn
every shutdown into the full timeout. They are closed when the process exits; clients
reconnect to another instance. Responses sent while draining carry `Connection: close`, so
keep-alive clients move away instead of sending more requests here.

mitmdump installs its own SIGINT/SIGTERM handlers (`tools/main.py`, `loop.add_signal_handler`,
which replaces any earlier one); `running` replaces them with ours, `done` puts
`master.shutdown` back.

Hooks: `running`, `done`, `requestheaders`, `http_connect` (count), `response`, `error`,
`http_connected`, `http_connect_error` (uncount), `responseheaders` (Connection: close).

Options:
- `server_shutdown_timeout` (str, "30s"): the longest wait for in-flight requests.
- `server_workers` (str, "1"): worker processes per instance, or `auto`; acted on by the
  supervisor (`python -m addons.supervisor`), which starts the workers and drains them all on
  SIGTERM. A worker only checks it, and warns when it asks for more than one process but this
  process was not started by the supervisor.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from mitmproxy import ctx, exceptions, http

from addons.kernel import instance, units
from addons.kernel.options import Option, declare, duration, spawn

log = logging.getLogger("waypost.drain")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# After the last response hook, mitmproxy still has to write the response; it is in the client
# socket's buffer within a few loop iterations. Poll for that this long at most.
_FLUSH_WAIT = 1.0


OPTIONS: tuple[Option, ...] = (
    Option(
        "server_shutdown_timeout",
        str,
        "30s",
        "On SIGTERM or SIGINT the proxy stops accepting connections at once and waits this "
        "long at most for the requests in flight to finish before it exits, e.g. 30s. "
        "Established tunnels do not hold the shutdown. A second signal exits at once.",
    ),
    Option(
        "server_workers",
        str,
        "1",
        "Worker processes of this instance (a number, or auto: one per usable core), started "
        "by python -m addons.supervisor, which reads this option; in a worker it only reports.",
    ),
)


class Drain:
    def __init__(self) -> None:
        self.timeout = 30.0
        self.inflight: set[str] = set()
        self.draining = False
        self._idle = asyncio.Event()

    def load(self, loader: Any) -> None:
        declare(loader, OPTIONS)

    def configure(self, updated: set[str]) -> None:
        if "server_shutdown_timeout" in updated:
            self.timeout = duration("server_shutdown_timeout", ctx.options.server_shutdown_timeout)
        if "server_workers" in updated:
            try:
                workers = units.parse_workers(ctx.options.server_workers)
            except ValueError as e:
                raise exceptions.OptionsError(f"server_workers: {e}") from None
            if workers != 1 and not instance.identity().supervised:
                log.warning(
                    "server_workers=%s, but this mitmdump was not started by the supervisor: "
                    "it runs as one process (start with scripts/run or python -m "
                    "addons.supervisor)",
                    workers,
                )

    def running(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            try:
                loop.add_signal_handler(sig, self.on_signal, sig)
            except (NotImplementedError, RuntimeError):  # Windows' proactor loop
                return

    def done(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        for sig in _SIGNALS:
            try:
                loop.add_signal_handler(sig, ctx.master.shutdown)
            except (NotImplementedError, RuntimeError):
                return

    def on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self.draining:
            log.info(
                "%s during drain: shutting down now (%d requests left)", name, len(self.inflight)
            )
            ctx.master.shutdown()
            return
        self.draining = True
        log.info(
            "%s: draining, no new connections; waiting up to %s for %d requests in flight",
            name,
            units.format_duration(self.timeout),
            len(self.inflight),
        )
        try:
            ctx.options.update(server=False)
        except Exception:  # an addon refusing the option change must not stop the drain
            log.warning("could not close the listeners; draining anyway", exc_info=True)
        spawn(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        if self.inflight:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), self.timeout)
            except TimeoutError:
                pass
        if not self.inflight:
            await self._flush(min(deadline, loop.time() + _FLUSH_WAIT))
        log.info("drain finished: %d requests left unfinished; shutting down", len(self.inflight))
        ctx.master.shutdown()

    @staticmethod
    async def _flush(until: float) -> None:
        """Wait until the last responses have left mitmproxy's client write buffers."""
        loop = asyncio.get_running_loop()
        proxyserver = ctx.master.addons.get("proxyserver")
        while loop.time() < until:
            pending = False
            for handler in list(getattr(proxyserver, "connections", {}).values()):
                io = handler.transports.get(handler.client)
                transport = getattr(getattr(io, "writer", None), "transport", None)
                if transport is not None and transport.get_write_buffer_size():
                    pending = True
                    break
            if not pending:
                return
            await asyncio.sleep(0.01)

    # counting

    def _start(self, flow: http.HTTPFlow) -> None:
        if flow.live and not flow.error:
            self.inflight.add(flow.id)

    def _end(self, flow: http.HTTPFlow) -> None:
        self.inflight.discard(flow.id)
        if self.draining and not self.inflight:
            self._idle.set()

    requestheaders = _start
    http_connect = _start
    response = _end
    error = _end
    http_connected = _end
    http_connect_error = _end

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # HTTP/1 only: connection-specific headers are illegal in HTTP/2 and 3; 101 is an upgrade.
        if (
            self.draining
            and flow.response
            and flow.response.status_code != 101
            and flow.request.http_version.startswith("HTTP/1")
        ):
            flow.response.headers["Connection"] = "close"


addons = [Drain()]
