"""The CLI's own loopback listener, where proxy-port requests for /cli/execute are rerouted.

mitmproxy cannot stream a body an addon makes, so such a flow goes on, with request and
response streaming on, to this aiohttp server on 127.0.0.1 (ephemeral port). Its handlers are
cancelled when the connection drops, so a disconnect kills the process at once.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web

from addons.kernel.endpoints import bind
from addons.kernel.options import spawn


class Listener:
    """An aiohttp server on an already bound socket, started as a task."""

    def __init__(self, sock: socket.socket, app: web.Application) -> None:
        self.sock = sock
        self.addr: tuple[str, int] = sock.getsockname()[:2]
        self.runner = web.AppRunner(
            app, access_log=None, handle_signals=False, handler_cancellation=True
        )
        self.server: asyncio.Server | None = None
        self.stopped = False
        self.task = spawn(self._serve())

    async def _serve(self) -> None:
        await self.runner.setup()
        if self.stopped:
            return
        self.server = await asyncio.get_running_loop().create_server(
            self.runner.server,  # type: ignore[arg-type]
            sock=self.sock,
        )
        if self.stopped:
            self.server.close()

    def stop(self) -> None:
        """Release the port now (sync); the connection cleanup runs as a task."""
        self.stopped = True
        if self.server is not None:
            self.server.close()
        else:
            self.task.cancel()
            self.sock.close()
        spawn(self.runner.cleanup())


def serve_loopback(
    path: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> Listener:
    """`handler` at `path` on 127.0.0.1, on a port the kernel picks (bound before returning)."""
    app = web.Application()
    app.router.add_route("*", path, handler)
    return Listener(bind("127.0.0.1", 0), app)
