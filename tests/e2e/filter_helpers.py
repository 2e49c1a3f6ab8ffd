"""Origins and helpers for the filter e2e tests."""

from __future__ import annotations

import socket
import ssl
from urllib.parse import parse_qs, unquote, urlsplit

from tests.conftest import ThreadedServer, read_head


class TypeOrigin(ThreadedServer):
    """A keep-alive HTTP/1.1 origin answering `/ct/<type>/<subtype>?n=N&chunked=1` with that
    Content-Type and N body bytes of `o`; records how many body bytes it sent."""

    def __init__(self) -> None:
        self.sent = 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            try:
                while (got := read_head(conn, buf)) is not None:
                    head, buf = got
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
    got = read_head(sock)
    assert got is not None
    head, body = got
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


def tls_through(sock: socket.socket, sni: str, cafile: str) -> bytes:
    """TLS handshake with `sni` inside an open tunnel, one GET, the answer (raises on refusal)."""
    client = ssl.create_default_context(cafile=cafile)
    client.check_hostname = False
    with client.wrap_socket(sock, server_hostname=sni) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        return tls.recv(65536)
