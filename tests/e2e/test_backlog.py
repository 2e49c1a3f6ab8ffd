"""The listen queue of a real mitmdump's proxy port, read back from the kernel with `ss`."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import read_head, wait_until


def listen_queue(port: int) -> int:
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    m = re.search(r"LISTEN\s+\d+\s+(\d+)", out)
    assert m, out
    return int(m.group(1))


def somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


@pytest.mark.parametrize(
    "backlog, expected",
    # 0 keeps mitmproxy's own queue: asyncio's default of 100.
    [(None, lambda: min(4096, somaxconn())), (512, lambda: 512), (0, lambda: 100)],
)
def test_listen_backlog(proxy_factory, backlog, expected) -> None:
    options = {} if backlog is None else {"listen_backlog": backlog}
    p = proxy_factory(scripts=("addons/backlog.py",), options=options)
    p.wait_for("proxy listening")
    # the listener logs before the addon re-listens it (on mitmproxy 12, once it is up)
    wait_until(lambda: listen_queue(p.port) == expected(), timeout=5)


def test_bundle_listeners_get_the_deep_queue(proxy_factory, tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text("metrics: {port: 0}\n")
    p = proxy_factory(options={"waypost_profile": str(profile)})
    p.wait_for("management listening")
    wait_until(lambda: listen_queue(p.port) == min(4096, somaxconn()), timeout=5)


def test_negative_backlog_refused(proxy_factory) -> None:
    p = proxy_factory(scripts=("addons/backlog.py",), options={"listen_backlog": -1}, wait=False)
    assert p.proc.wait(60) == 1
    p.stop()
    assert "listen_backlog: must be 0 or more" in "\n".join(p.lines)


def test_a_burst_of_connections_is_served_whole_one_accept_per_loop_turn(
    proxy_factory, backend
) -> None:
    """The tightest cap (1): 60 connections opened at once are all accepted and served."""
    p = proxy_factory(scripts=("addons/backlog.py",), options={"server_max_accepts_per_event": "1"})
    socks = [socket.create_connection(("127.0.0.1", p.port)) for _ in range(60)]
    try:
        for sock in socks:
            sock.sendall(
                f"GET {backend.url}/status/204 HTTP/1.1\r\nHost: {backend.host}\r\n\r\n".encode()
            )
        for sock in socks:
            sock.settimeout(10)
            got = read_head(sock)
            assert got is not None and got[0].startswith(b"HTTP/1.1 204"), got
    finally:
        for sock in socks:
            sock.close()
