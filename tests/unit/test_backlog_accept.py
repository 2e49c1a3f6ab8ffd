"""backlog: the accept batch cap, on a real listening socket and asyncio's accept callback."""

from __future__ import annotations

import asyncio
import socket

from mitmproxy.test import taddons

from addons import backlog
from addons.kernel import patching


def _pending(listener: socket.socket, n: int) -> list[socket.socket]:
    """`n` connections the kernel has completed and queued on `listener`, none accepted yet."""
    port = listener.getsockname()[1]
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]


async def _one_accept_turn(listener: socket.socket) -> int:
    """How many connections one call of the loop's accept callback takes (backlog 100)."""
    loop = asyncio.get_running_loop()
    made: list[asyncio.Transport] = []

    class Proto(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.append(transport)  # type: ignore[arg-type]

    loop._accept_connection(Proto, listener, None, None, 100)  # type: ignore[attr-defined]
    for _ in range(20):  # the transports are made by tasks the callback started
        await asyncio.sleep(0)
    for t in made:
        t.close()
    return len(made)


async def test_one_loop_turn_accepts_its_allowance_and_the_rest_stay_queued(monkeypatch) -> None:
    addon = backlog.Backlog()
    with socket.create_server(("127.0.0.1", 0), backlog=64) as listener:
        listener.setblocking(False)
        clients = _pending(listener, 30)
        try:
            with taddons.context(addon) as tctx:
                tctx.configure(addon, server_max_accepts_per_event=4)
                assert patching.installed(backlog.ACCEPT.key)
                monkeypatch.setattr(backlog, "ACCEPTS_PER_MS", 0)  # the cap alone
                assert await _one_accept_turn(listener) == 4
                assert await _one_accept_turn(listener) == 4
                # After a quiet spell (longer than any turn) the cap alone again.
                monkeypatch.setattr(backlog, "ACCEPTS_PER_MS", 1)
                monkeypatch.setattr(backlog, "TURN_AT_MOST", 0.003)
                await asyncio.sleep(0.02)
                assert await _one_accept_turn(listener) == 4
                # A long turn since the last accept: one more per millisecond.
                monkeypatch.setattr(backlog, "TURN_AT_MOST", 0.5)
                await asyncio.sleep(0.006)
                fourth = await _one_accept_turn(listener)
                assert fourth >= 4 + 6  # at most the 18 still queued
                tctx.configure(addon, server_max_accepts_per_event=0)  # asyncio's own batch
                assert await _one_accept_turn(listener) == 30 - 12 - fourth
                addon.done()
            assert not patching.installed(backlog.ACCEPT.key)
        finally:
            for c in clients:
                c.close()
