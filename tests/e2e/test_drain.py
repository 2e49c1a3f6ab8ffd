"""Graceful shutdown of a real mitmdump: SIGTERM drains in-flight requests, then exits 0."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import raw_request, status_of

SCRIPTS = ("addons/upstream.py", "addons/drain.py")


def _get(port: int, url: str, timeout: float = 15) -> bytes:
    return raw_request(port, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), timeout=timeout)


def _wait_exit(p, timeout: float) -> int:
    try:
        return p.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"mitmdump still running after {timeout}s:\n" + "\n".join(p.lines[-30:]))


def test_sigterm_drains_in_flight_request(proxy_factory, backend) -> None:
    p = proxy_factory(scripts=SCRIPTS)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(_get, p.port, f"{backend.url}/slow/2000")
        p.wait_for(r"server connect 127\.0\.0\.1")  # the request is in flight upstream
        time.sleep(0.3)  # let the request be well under way, as in a real rolling restart
        t0 = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        p.wait_for(r"SIGTERM: draining.*1 requests in flight")
        p.wait_for(r"stopped\.")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", p.port), timeout=2).close()
        resp = slow.result(10)
    assert status_of(resp) == 200
    assert resp.endswith(b"slow\n")
    assert b"connection: close" in resp.lower()
    assert _wait_exit(p, 10) == 0
    assert time.monotonic() - t0 < 5
    p.wait_for(r"drain finished: 0 requests left")


def test_shutdown_timeout_cuts_the_wait(proxy_factory, backend) -> None:
    p = proxy_factory(scripts=SCRIPTS, options={"server_shutdown_timeout": "1s"})
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(_get, p.port, f"{backend.url}/slow/8000")
        p.wait_for(r"server connect 127\.0\.0\.1")
        t0 = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        assert _wait_exit(p, 7) == 0
        elapsed = time.monotonic() - t0
        slow.result(12)
    # The cut (1 s) is far from the request's 8 s; the margin absorbs a loaded machine.
    assert 0.9 < elapsed < 4.5, elapsed
    p.wait_for(r"drain finished: 1 requests left")


def test_idle_proxy_exits_at_once(proxy_factory) -> None:
    p = proxy_factory(scripts=SCRIPTS)
    t0 = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    assert _wait_exit(p, 5) == 0
    assert time.monotonic() - t0 < 2


def test_second_signal_exits_immediately(proxy_factory, backend) -> None:
    p = proxy_factory(scripts=SCRIPTS)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(_get, p.port, f"{backend.url}/slow/5000")
        p.wait_for(r"server connect 127\.0\.0\.1")
        t0 = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        p.wait_for(r"SIGTERM: draining")
        p.proc.send_signal(signal.SIGINT)
        assert _wait_exit(p, 5) == 0
        assert time.monotonic() - t0 < 2
        slow.result(10)
    p.wait_for(r"SIGINT during drain: shutting down now")
