"""Upstream failures through a real mitmdump: JSON 502/504, connect and read timeouts."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.conftest import json_body, raw_request, status_of

SCRIPTS = ("addons/upstream.py",)


def _closed_port() -> int:
    """A port nothing listens on: bound, then closed."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port whose accept queue is full: a new connect gets no SYN-ACK and hangs.

    listen(0) allows one queued connection on Linux; the server never accepts, and a few raw
    connections fill the queue, so further SYNs are dropped (deterministic on loopback).
    """
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(c)
    yield port
    for c in fillers:
        c.close()
    srv.close()


def _get(port: int, target: str, extra: bytes = b"", timeout: float = 10) -> bytes:
    host = target.split("/")[2]
    return raw_request(
        port,
        f"GET {target} HTTP/1.1\r\nHost: {host}\r\n".encode() + extra + b"\r\n",
        timeout=timeout,
    )


def _assert_json_error(resp: bytes, status: int, code: str) -> dict:
    assert status_of(resp) == status, resp[:300]
    head = resp.partition(b"\r\n\r\n")[0].decode().lower()
    assert "content-type: application/json" in head
    err = json_body(resp)["error"]
    assert err["code"] == code
    rid = next(
        line.split(":", 1)[1].strip()
        for line in head.split("\r\n")
        if line.startswith("x-request-id:")
    )
    assert err["request_id"].lower() == rid
    return err


def test_refused_plain_http_is_json_502(proxy_factory) -> None:
    p = proxy_factory(scripts=SCRIPTS)
    port = _closed_port()
    resp = _get(p.port, f"http://127.0.0.1:{port}/x", b"X-Request-ID: abc-123\r\n")
    err = _assert_json_error(resp, 502, "BACKEND_UNREACHABLE")
    assert err["request_id"] == "abc-123"
    p.wait_for(rf"upstream '127.0.0.1:{port}' failed: connection_refused")


def test_refused_connect_is_json_502(proxy_factory) -> None:
    p = proxy_factory(scripts=SCRIPTS)
    port = _closed_port()
    resp = raw_request(
        p.port, f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    )
    _assert_json_error(resp, 502, "BACKEND_UNREACHABLE")
    p.wait_for(rf"upstream '127.0.0.1:{port}' failed: connection_refused")


def test_connect_timeout_is_json_504(proxy_factory, blackhole: int) -> None:
    p = proxy_factory(scripts=SCRIPTS, options={"upstream_connect_timeout": "1s"})
    t0 = time.monotonic()
    resp = _get(p.port, f"http://127.0.0.1:{blackhole}/x")
    elapsed = time.monotonic() - t0
    err = _assert_json_error(resp, 504, "BACKEND_TIMEOUT")
    assert "in time" in err["message"]
    assert 0.9 < elapsed < 3, elapsed
    p.wait_for(rf"upstream '127.0.0.1:{blackhole}' failed: connect_timeout")


def test_connect_timeout_on_connect_is_json_504(proxy_factory, blackhole: int) -> None:
    p = proxy_factory(scripts=SCRIPTS, options={"upstream_connect_timeout": "1s"})
    t0 = time.monotonic()
    resp = raw_request(
        p.port,
        f"CONNECT 127.0.0.1:{blackhole} HTTP/1.1\r\nHost: 127.0.0.1:{blackhole}\r\n\r\n".encode(),
        timeout=10,
    )
    assert time.monotonic() - t0 < 3
    _assert_json_error(resp, 504, "BACKEND_TIMEOUT")


def test_read_timeout_is_json_504_and_proxy_keeps_serving(proxy_factory, backend) -> None:
    p = proxy_factory(scripts=SCRIPTS, options={"upstream_read_timeout": "1s"})
    t0 = time.monotonic()
    resp = _get(p.port, f"{backend.url}/slow/3000")
    elapsed = time.monotonic() - t0
    _assert_json_error(resp, 504, "BACKEND_TIMEOUT")
    assert 0.9 < elapsed < 2.5, elapsed  # the timeout, not the backend's 3 s
    p.wait_for(r"failed: read_timeout")
    nxt = _get(p.port, f"{backend.url}/echo")
    assert status_of(nxt) == 200


def test_slow_body_within_timeout_passes(proxy_factory, backend) -> None:
    # Chunks every 400 ms, 2 s in total: each byte arrives within the 1 s read timeout.
    p = proxy_factory(scripts=SCRIPTS, options={"upstream_read_timeout": "1s"})
    resp = _get(p.port, f"{backend.url}/stream?n=5&ms=400")
    assert status_of(resp) == 200
    assert resp.count(b"chunk ") == 5


def test_malformed_request_is_json_400(proxy_factory) -> None:
    p = proxy_factory(scripts=SCRIPTS)
    resp = raw_request(p.port, b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: a\r\nbad header\r\n\r\n")
    assert status_of(resp) == 400
    assert json_body(resp)["error"]["code"] == "BAD_REQUEST"


def test_body_size_limit_is_json_413(proxy_factory, backend) -> None:
    p = proxy_factory(scripts=SCRIPTS, options={"body_size_limit": "1k"})
    resp = raw_request(
        p.port,
        f"POST {backend.url}/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n".encode()
        + b"x" * 5000,
    )
    _assert_json_error(resp, 413, "PAYLOAD_TOO_LARGE")


def test_self_connect_guard_is_json_502(proxy_factory) -> None:
    p = proxy_factory(scripts=SCRIPTS)
    resp = raw_request(
        p.port, f"GET /nothing HTTP/1.1\r\nHost: 127.0.0.1:{p.port}\r\n\r\n".encode()
    )
    err = _assert_json_error(resp, 502, "BACKEND_UNREACHABLE")
    assert "proxy itself" in err["message"]


def test_stalled_body_is_json_504(proxy_factory, backend) -> None:
    # Headers and the first chunk at once, then 2 s of silence: the body read times out before
    # anything was sent to the client (mitmproxy buffers the body), so the client gets a 504.
    p = proxy_factory(scripts=SCRIPTS, options={"upstream_read_timeout": "1s"})
    t0 = time.monotonic()
    resp = _get(p.port, f"{backend.url}/stream?n=3&ms=2000")
    assert time.monotonic() - t0 < 1.8
    _assert_json_error(resp, 504, "BACKEND_TIMEOUT")


def test_stalled_streamed_body_closes_the_connection(proxy_factory, backend) -> None:
    # Streamed (stream_large_bodies): headers and chunk 0 already reached the client, so no
    # error response is possible any more; the connection is closed mid-body instead.
    p = proxy_factory(
        scripts=SCRIPTS, options={"upstream_read_timeout": "1s", "stream_large_bodies": "1"}
    )
    t0 = time.monotonic()
    resp = _get(p.port, f"{backend.url}/stream?n=3&ms=2000")
    assert time.monotonic() - t0 < 1.8
    assert status_of(resp) == 200
    assert b"chunk 0" in resp and b"chunk 1" not in resp
    assert not resp.endswith(b"0\r\n\r\n")
    p.wait_for(r"failed: read_timeout")


@pytest.mark.parametrize(
    ("answer", "reason"), [(b"", "closed"), (b"NOT HTTP AT ALL\r\n\r\n", "invalid_response")]
)
def test_backend_that_closes_or_sends_garbage_is_json_502(
    proxy_factory, answer: bytes, reason: str
) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(10)
    port = srv.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            conn.recv(65536)
            conn.sendall(answer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        p = proxy_factory(scripts=SCRIPTS)
        resp = _get(p.port, f"http://127.0.0.1:{port}/x")
        _assert_json_error(resp, 502, "BACKEND_UNREACHABLE")
        p.wait_for(rf"upstream '127.0.0.1:{port}' failed: {reason}")
    finally:
        srv.close()
        t.join(5)
