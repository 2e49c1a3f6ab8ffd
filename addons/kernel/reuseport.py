"""SO_REUSEPORT on the proxy's TCP listeners, so that every worker of an instance binds them.

With N workers (`python -m addons.supervisor`), each worker opens the same host:port with
SO_REUSEPORT and the kernel spreads new connections over their listening sockets (Linux hashes
each connection to one of them): no process in front that accepts and hands over, no byte
forwarder. All sockets on a port must set the option, so a worker must set it from its very
first bind: mitmproxy 12 starts binding the command line's address before `-s` scripts load,
which is why the worker entry (`addons/supervisor/worker.py`) installs this before mitmdump
starts, rather than an addon's `load`.

mitmproxy opens every listener, the forward proxy, reverse listeners (`routing.listeners`,
the TLS listener) alike, in `AsyncioServerInstance.listen` with `asyncio.start_server(...,
host, port)` (11.0.2 and 12.3.1). The replacement makes the same call with `reuse_port=True`,
which asyncio applies to each socket it opens, both of the dual-stack pair when the host is
empty. UDP listeners (dns, quic, wireguard) and port 0 (each worker would get its own port)
keep mitmproxy's own code: a second worker then fails to bind them and says so.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mitmproxy.proxy import mode_servers

from addons.kernel import instance, patching


async def _listen(self: Any, host: str, port: int) -> list[Any]:
    if port == 0 or self.mode.transport_protocol != "tcp":
        return await _listen.__waypost_wrapped__(self, host, port)  # type: ignore[attr-defined]
    return [await asyncio.start_server(self.handle_stream, host, port, reuse_port=True)]


LISTEN = patching.Patch(
    key="reuseport.listen",
    target=mode_servers.AsyncioServerInstance,
    name="listen",
    replacement=_listen,
    missing="no hook or option sets socket options on mitmproxy's listeners before they bind",
)


def install() -> bool:
    """Patch the listeners of a supervised worker (more than one in its instance); True if so."""
    if not instance.identity().supervised:
        return False
    return patching.install(
        LISTEN, unchecked="workers cannot share the proxy port", by="supervisor.worker"
    )
