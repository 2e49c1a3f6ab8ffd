"""connections: backend connections let go by a real HttpLayer, events fed by hand."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from mitmproxy import connection, options
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import HttpLayer, HTTPMode
from mitmproxy.test import tflow

from addons import connections
from addons.kernel import patching


class Child:
    """A backend connection's layers: on its close, close our side too (as Http1Client does)
    unless `half` (as a tunnel passing a half-close on does)."""

    def __init__(self, half: bool = False) -> None:
        self.half = half

    def handle_event(self, event: events.Event) -> Iterator[commands.Command]:
        if isinstance(event, events.ConnectionClosed) and not self.half:
            yield commands.CloseConnection(event.connection)


@pytest.fixture
def layer() -> Iterator[HttpLayer]:
    assert patching.install(*connections.FORGET, unchecked="", by="test")
    try:
        yield HttpLayer(Context(tflow.tclient_conn(), options.Options()), HTTPMode.regular)
    finally:
        patching.uninstall(*(p.key for p in connections.FORGET), by="test")


def _feed(layer: HttpLayer, event: events.Event) -> None:
    """What the connection handler does with the commands: a close closes."""
    for command in layer.handle_event(event):
        if isinstance(command, commands.CloseConnection):
            command.connection.state = ConnectionState.CLOSED


def _server(layer: HttpLayer, child: Child | None = None) -> connection.Server:
    server = connection.Server(address=("127.0.0.1", 8080))
    server.state = ConnectionState.OPEN
    layer.connections[server] = child or Child()  # type: ignore[assignment]
    return server


def test_a_backend_connection_closed_by_both_sides_is_let_go(layer) -> None:
    kept, closed = _server(layer), _server(layer)
    _feed(layer, events.ConnectionClosed(closed))
    assert list(layer.connections) == [kept]


def test_a_half_closed_one_stays_as_it_may_still_send(layer) -> None:
    server = _server(layer, Child(half=True))
    server.state = ConnectionState.CAN_WRITE  # the peer's FIN, as the handler marks it
    _feed(layer, events.ConnectionClosed(server))
    assert server in layer.connections


def test_one_a_stream_still_addresses_stays_until_that_stream_is_dropped(layer) -> None:
    server, other = _server(layer), _server(layer)
    layer.streams[1] = SimpleNamespace(context=SimpleNamespace(server=server))  # type: ignore[assignment]
    _feed(layer, events.ConnectionClosed(server))
    assert server in layer.connections
    del layer.streams[1]
    _feed(layer, events.DataReceived(other, b""))  # any later event
    assert list(layer.connections) == [other]


def test_a_failed_connect_is_let_go_once_its_waiters_have_their_answer(layer) -> None:
    server = _server(layer)
    server.state = ConnectionState.CLOSED
    server.error = "Connection refused"
    open_ = commands.OpenConnection(server)
    layer.command_sources[open_] = Child()  # type: ignore[assignment]
    layer.waiting_for_establishment[server].append(None)  # type: ignore[arg-type]
    _feed(layer, events.OpenConnectionCompleted(open_, "Connection refused"))
    assert server in layer.connections  # a stream still waits for the answer
    del layer.waiting_for_establishment[server]
    other = _server(layer)
    _feed(layer, events.DataReceived(other, b""))
    assert list(layer.connections) == [other]


def test_the_client_connection_is_not_touched(layer) -> None:
    client = layer.context.client
    layer.connections[client] = Child()  # type: ignore[assignment]
    client.state = ConnectionState.CLOSED
    _feed(layer, events.ConnectionClosed(client))
    assert client in layer.connections
