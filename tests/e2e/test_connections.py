"""Connection limits through a real mitmdump: idle and write timeouts, the open-connection cap,
and backend connections let go once closed."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx

from tests.conftest import (
    MANAGEMENT,
    REVERSE,
    Backend,
    ThreadedServer,
    read_head,
    wait_until,
)
from tests.e2e.router_helpers import NamedBackend, write_profile

CONNECTIONS = "addons/connections.py"
PROBE = "tests/e2e/layer_probe.py"


def _request(sock: socket.socket, backend: Backend, path: str) -> None:
    sock.sendall(f"GET {backend.url}{path} HTTP/1.1\r\nHost: {backend.host}\r\n\r\n".encode())


def _get_one(sock: socket.socket, backend: Backend) -> bytes:
    """One keep-alive request on `sock`; its head (the body is the echo's small JSON)."""
    _request(sock, backend, "/status/204")
    got = read_head(sock)
    assert got is not None and got[0].startswith(b"HTTP/1.1 204"), got
    return got[0]


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the peer closes `sock` within `seconds` (EOF or reset), reading what arrives."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
    return False


def test_an_idle_connection_is_closed_after_the_idle_timeout(proxy_factory, backend) -> None:
    p = proxy_factory(scripts=(CONNECTIONS,), options={"server_idle_timeout": "1s"})
    with socket.create_connection(("127.0.0.1", p.port)) as sock:
        _get_one(sock, backend)
        start = time.monotonic()
        assert _closed_within(sock, 5)
        assert 0.7 < time.monotonic() - start < 3


def test_without_the_idle_timeout_a_kept_alive_connection_stays_open(
    proxy_factory, backend
) -> None:
    p = proxy_factory(scripts=(CONNECTIONS,), options={"server_idle_timeout": "10s"})
    with socket.create_connection(("127.0.0.1", p.port)) as sock:
        _get_one(sock, backend)
        assert not _closed_within(sock, 2)
        _get_one(sock, backend)  # and it still serves


def _stalled_download(port: int, backend: Backend, stall: float) -> int:
    """Ask for 8 MB through the proxy, read nothing for `stall` seconds, then read to the end;
    the bytes received."""
    sock = socket.socket()
    # A small receive window, so the proxy's side fills up quickly.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    with sock:
        _request(sock, backend, f"/bytes/{8 << 20}")
        time.sleep(stall)
        sock.settimeout(5)
        received = 0
        try:
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
                if received > (8 << 20):  # head + whole body: the proxy kept waiting
                    break
        except (ConnectionResetError, TimeoutError):
            pass
        return received


def test_a_client_that_stops_reading_is_cut_off_after_the_write_timeout(
    proxy_factory, backend
) -> None:
    p = proxy_factory(
        scripts=(CONNECTIONS,),
        options={"server_write_timeout": "1s", "stream_large_bodies": "1m"},
    )
    assert _stalled_download(p.port, backend, stall=3) < (8 << 20)
    # The proxy serves the next client as ever.
    with httpx.Client(proxy=p.url, timeout=10, trust_env=False) as c:
        assert c.get(f"{backend.url}/status/204").status_code == 204


def test_a_slow_reader_within_the_write_timeout_gets_everything(proxy_factory, backend) -> None:
    p = proxy_factory(
        scripts=(CONNECTIONS,),
        options={"server_write_timeout": "10s", "stream_large_bodies": "1m"},
    )
    assert _stalled_download(p.port, backend, stall=3) > (8 << 20)


def test_connections_past_the_cap_are_closed_before_a_byte_is_read(proxy_factory, backend) -> None:
    p = proxy_factory(scripts=(CONNECTIONS,), options={"server_max_connections": "2"})
    first = socket.create_connection(("127.0.0.1", p.port))
    second = socket.create_connection(("127.0.0.1", p.port))
    try:
        _get_one(first, backend)
        _get_one(second, backend)
        with socket.create_connection(("127.0.0.1", p.port)) as third:
            assert _closed_within(third, 3)
        p.wait_for(r"connection refused: 2 client connections open, the cap .* is 2")
        second.close()

        # The slot is free once the proxy has seen the close.
        def served() -> bool:
            with socket.create_connection(("127.0.0.1", p.port)) as fourth:
                try:
                    _get_one(fourth, backend)
                    return True
                except (AssertionError, OSError):
                    return False

        assert wait_until(served, timeout=5)
        _get_one(first, backend)
    finally:
        first.close()
        second.close()


def test_the_profile_keys_reach_the_bundle(proxy_factory, tmp_path: Path, backend) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text(
        "server:\n  timeouts: {idle: 1s, write: 5s}\n  limits: {max_concurrent_connections: 50}\n"
        "metrics: {port: 0}\n"
        "security:\n  egress: {allowed_networks: [127.0.0.1/32]}\n"
    )
    p = proxy_factory(options={"waypost_profile": str(profile)})
    mport = int(p.wait_for(MANAGEMENT).group(1))
    with socket.create_connection(("127.0.0.1", p.port)) as sock:
        _get_one(sock, backend)
        assert _closed_within(sock, 5)
    text = httpx.get(f"http://127.0.0.1:{mport}/metrics", timeout=5).text
    assert "waypost_connections_limit 50.0" in text


class OneRequestOrigin(ThreadedServer):
    """Answers one request per connection, keep-alive, then drops the connection (as an
    origin restarting, or timing out idle connections, does)."""

    closed = 0

    def handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                if read_head(conn) is not None:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            except OSError:
                pass
        self.closed += 1


def _exchange(sock: socket.socket, target: str, probe: bool = False) -> dict[str, str]:
    """One keep-alive GET on `sock`: the response's fields (the body, sized, is read too)."""
    extra = "X-Probe-Layer: 1\r\n" if probe else ""
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
    got = read_head(sock)
    assert got is not None and got[0].startswith(b"HTTP/1.1 200"), got
    head, body = got
    lines = head.decode().split("\r\n")[1:]
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(body) < int(fields["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {len(body)} bytes of the body"
        body += chunk
    return fields


def _held(sock: socket.socket, target: str) -> int:
    """The backend connections the proxy's HTTP layer holds for `sock`'s client connection."""
    return int(_exchange(sock, target, probe=True)["x-backend-connections"])


def test_backend_connections_the_origin_closed_are_let_go(proxy_factory) -> None:
    """One long-lived client connection, a new backend connection for each of its requests:
    the closed ones must not pile up in the client connection's HTTP layer (mitmproxy keeps
    them all until the client disconnects)."""
    origin = OneRequestOrigin()
    url = f"http://127.0.0.1:{origin.port}/"
    p = proxy_factory(scripts=(CONNECTIONS, PROBE))
    try:
        with socket.create_connection(("127.0.0.1", p.port), timeout=5) as sock:
            for n in range(1, 61):
                _exchange(sock, url)
                # The origin's close must reach the proxy before the next request: a request
                # sent on the closing connection would meet a reset (a 502 here).
                wait_until(lambda n=n: origin.closed >= n)
                time.sleep(0.02)
            assert origin.accepts == 60
            # This request's own connection, and the one before it if its close is still on
            # its way; mitmproxy alone holds all 61.
            assert _held(sock, url) <= 2
    finally:
        origin.close()


def test_failed_connects_are_let_go_and_the_backend_is_dialled_again(
    proxy_factory, tmp_path: Path
) -> None:
    a, b = NamedBackend("a"), NamedBackend("b")
    pool = [{"url": x.url, "name": x.name} for x in (a, b)]
    profile = write_profile(
        tmp_path,
        {
            "routing": {
                "listeners": [{"mode": "reverse", "host": "127.0.0.1", "port": 0}],
                "rules": [{"name": "ab", "forward": {"backends": pool}}],
            },
            "health_checks": {"enabled": False},
            "circuit_breaker": {"failure_threshold": 100},
        },
    )
    try:
        p = proxy_factory(
            options={"waypost_profile": str(profile)},
            scripts=("addons/bundle.py", PROBE),
            wait=False,
        )
        port = int(p.wait_for(REVERSE, timeout=40).group(2))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            a.stop()
            for _ in range(20):  # a's turns fail to connect and are retried on b
                _exchange(sock, "/x")
            assert _held(sock, "/x") <= 2  # mitmproxy alone holds every failed connect too
            a.start()
            hits = a.hits
            for _ in range(4):
                assert _held(sock, "/x") <= 2
            assert a.hits - hits == 2  # dialled again on the same client connection
    finally:
        a.close()
        b.close()
