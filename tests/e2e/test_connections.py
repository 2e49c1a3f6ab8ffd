"""Connection limits through a real mitmdump: idle and write timeouts, the open-connection cap."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx

from tests.conftest import MANAGEMENT, Backend, read_head, wait_until

CONNECTIONS = "addons/connections.py"


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
