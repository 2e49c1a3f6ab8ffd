"""Origins and helpers for the filter e2e tests."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from tests.conftest import ThreadedServer, status_of

T = TypeVar("T")


class TypeOrigin(ThreadedServer):
    """A keep-alive HTTP/1.1 origin answering `/ct/<type>/<subtype>?n=N&chunked=1` with that
    Content-Type and N body bytes of `o`; records how many body bytes it sent."""

    def __init__(self) -> None:
        self.sent = 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        buf = b""
        with conn:
            try:
                while True:
                    while b"\r\n\r\n" not in buf:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buf += data
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    method, target = head.split(b" ", 2)[:2]
                    self._answer(conn, method.decode(), target.decode())
            except OSError:
                return

    def _answer(self, conn: socket.socket, method: str, target: str) -> None:
        url = urlsplit(target)
        ctype = unquote(url.path.removeprefix("/ct/"))
        query = parse_qs(url.query)
        n = int(query.get("n", ["10"])[0])
        chunked = query.get("chunked", ["0"])[0] == "1"
        head = f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\n"
        body = b"o" * n if method != "HEAD" else b""
        if chunked:
            conn.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
            step = 64 * 1024
            for i in range(0, len(body), step):
                chunk = body[i : i + step]
                conn.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.sent += len(chunk)
            conn.sendall(b"0\r\n\r\n")
        else:
            conn.sendall(f"{head}Content-Length: {n}\r\n\r\n".encode() + body)
            self.sent += len(body)


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response (Content-Length framed) from a keep-alive socket: (head, body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, buf
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        data = sock.recv(65536)
        assert data, body
        body += data
    assert len(body) == length, (head, body[:200])
    return head, body


def connect_tunnel(proxy_port: int, target: str) -> socket.socket:
    """A socket with an established CONNECT tunnel to `target` (host:port)."""
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        data = s.recv(1)
        assert data, head
        head += data
    assert status_of(head) == 200, head
    return s


def tls_through(sock: socket.socket, sni: str, cafile: str) -> bytes:
    """TLS handshake with `sni` inside an open tunnel, one GET, the answer (raises on refusal)."""
    client = ssl.create_default_context(cafile=cafile)
    client.check_hostname = False
    with client.wrap_socket(sock, server_hostname=sni) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        return tls.recv(65536)


def poll(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)
