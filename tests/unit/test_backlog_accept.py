"""backlog: the accept batch cap, on a real listening socket and asyncio's accept callback."""

from __future__ import annotations

import asyncio
import socket

from mitmproxy.test import taddons

from addons import backlog
from addons.kernel import admission, patching


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
                monkeypatch.setattr(backlog, "SUSTAINED_PER_MS", 0)
                assert await _one_accept_turn(listener) == 4
                assert await _one_accept_turn(listener) == 4
                # Connections left waiting: one more per millisecond since that turn.
                monkeypatch.setattr(backlog, "ACCEPTS_PER_MS", 1)
                await asyncio.sleep(0.006)
                third = await _one_accept_turn(listener)
                assert third >= 4 + 6  # at most the 22 still queued
                # Waiting longer than a burst: the sustained rate.
                monkeypatch.setattr(backlog, "ACCEPTS_PER_MS", 0)
                monkeypatch.setattr(backlog, "SUSTAINED_PER_MS", 1)
                monkeypatch.setattr(backlog, "BURST_SECONDS", 0.001)
                await asyncio.sleep(0.006)
                fourth = await _one_accept_turn(listener)
                assert fourth >= min(4 + 6, 22 - third)
                rest = 22 - third - fourth
                if rest:
                    tctx.configure(addon, server_max_accepts_per_event=0)  # asyncio's own batch
                    assert await _one_accept_turn(listener) == rest
                    tctx.configure(addon, server_max_accepts_per_event=4)
                # The queue emptied: connections arriving later get the cap alone, however long
                # since the last accept turn (that time measured other work, not a turn).
                await asyncio.sleep(0.02)
                clients += _pending(listener, 10)
                assert await _one_accept_turn(listener) == 4
                addon.done()
            assert not patching.installed(backlog.ACCEPT.key)
        finally:
            for c in clients:
                c.close()


async def _closed_by_peer(port: int) -> bool:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.read(1), 0.5) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    finally:
        writer.close()


async def test_admission_gates_close_a_proxy_listeners_connection_at_accept() -> None:
    addon = backlog.Backlog()
    loop = asyncio.get_running_loop()
    made: list[asyncio.BaseTransport] = []
    asked: list[str] = []

    class Proto(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.append(transport)

    with taddons.context(addon):
        addon.running()
        assert patching.installed(backlog.ADMIT.key)
        proxy = await loop.create_server(Proto, "127.0.0.1", 0)
        other = await loop.create_server(Proto, "127.0.0.1", 0)  # e.g. the management port
        backlog._proxy_servers.add(proxy)
        try:
            assert not await _closed_by_peer(proxy.sockets[0].getsockname()[1])  # no gate
            assert len(made) == 1
            admission.register("test", lambda ip: asked.append(ip) or ip == "127.0.0.1")
            assert await _closed_by_peer(proxy.sockets[0].getsockname()[1])
            assert asked == ["127.0.0.1"] and len(made) == 1  # never set up
            assert not await _closed_by_peer(other.sockets[0].getsockname()[1])
            assert asked == ["127.0.0.1"] and len(made) == 2  # not a proxy listener: not asked
        finally:
            admission.unregister("test")
            for t in made:
                t.close()
            for server in (proxy, other):
                server.close()
                await server.wait_closed()
            addon.done()
    assert not patching.installed(backlog.ADMIT.key)
