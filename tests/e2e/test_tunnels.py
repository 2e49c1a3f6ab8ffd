"""CONNECT tunnels that carry something other than TLS are relayed byte for byte (raw TCP)."""

from __future__ import annotations

import socket

import pytest

from tests.conftest import ThreadedServer, connect_tunnel, open_tunnel


class EchoServer(ThreadedServer):
    """Echoes every byte back; with a `banner`, sends it first (a server-speaks-first protocol
    such as SMTP or SSH)."""

    def __init__(self, banner: bytes = b"") -> None:
        self.banner = banner
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                if self.banner:
                    conn.sendall(self.banner)
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                return


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture
def echo():
    servers: list[EchoServer] = []

    def make(banner: bytes = b"") -> EchoServer:
        servers.append(EchoServer(banner))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _options(port: int) -> dict[str, object]:
    return {"egress_allowed_networks": "127.0.0.0/8", "egress_connect_ports": str(port)}


@pytest.mark.parametrize(
    "first",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"\x00\x01binary\xff\xfe",
        b"EHLO client.example\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
)
def test_client_first_non_tls_bytes_are_relayed(proxy_factory, echo, first):
    server = echo()
    p = proxy_factory(options=_options(server.port))
    with connect_tunnel(p.port, f"127.0.0.1:{server.port}") as s:
        s.sendall(first)
        assert _recv_exactly(s, len(first)) == first
        s.sendall(b"more bytes\n")
        assert _recv_exactly(s, 11) == b"more bytes\n"


def test_lazy_connect_relays_once_the_client_speaks(proxy_factory, echo):
    # With connection_strategy lazy (set with routing.listeners) the tunnel dials on the
    # client's first bytes; SSH clients send their banner at once, so SSH works there too.
    server = echo(b"SSH-2.0-server\r\n")
    p = proxy_factory(options={**_options(server.port), "connection_strategy": "lazy"})
    with connect_tunnel(p.port, f"127.0.0.1:{server.port}") as s:
        s.sendall(b"SSH-2.0-client\r\n")
        assert _recv_exactly(s, 32) == b"SSH-2.0-server\r\nSSH-2.0-client\r\n"


def test_server_first_banner_arrives(proxy_factory, echo):
    server = echo(b"220 smtp.example ESMTP ready\r\n")
    # rawtcp off: the relay is Waypost's decision, not mitmproxy's guess at raw TCP.
    p = proxy_factory(options={**_options(server.port), "rawtcp": False})
    s, early = open_tunnel(p.port, f"127.0.0.1:{server.port}")
    with s:  # the banner follows the 200 at once: one read may return both
        assert early + _recv_exactly(s, 30 - len(early)) == b"220 smtp.example ESMTP ready\r\n"
        s.sendall(b"EHLO me\r\n")
        assert _recv_exactly(s, 9) == b"EHLO me\r\n"


def test_intercepted_host_keeps_mitmproxy_parsing(proxy_factory, echo):
    # An intercepted host's tunnel is parsed by mitmproxy, so the HTTP policies see what is in
    # it: an SMTP line there is not HTTP and is refused, not relayed.
    server = echo()
    p = proxy_factory(options={**_options(server.port), "tls_intercept_hosts": "127.0.0.1"})
    with connect_tunnel(p.port, f"127.0.0.1:{server.port}") as s:
        s.sendall(b"EHLO client.example\r\n")
        assert _recv_exactly(s, 12).startswith(b"HTTP/1.1 400")
