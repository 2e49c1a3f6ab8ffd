"""Hostile clients through a real bundle: one client's malformed requests never take a backend
away from the others, and what a client received is what the access log and metrics say."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    MANAGEMENT,
    REVERSE,
    Proxy,
    raw_request,
    status_of,
    wait_until,
)
from tests.e2e.router_helpers import NamedBackend, write_profile

TIMEOUT = httpx.Timeout(10.0)
AUTH = {"Authorization": "Bearer secret"}
# Small enough that an oversized chunked body is cheap to send.
MAX_BODY = 1024


@pytest.fixture
def backends() -> Iterator[list[NamedBackend]]:
    started = [NamedBackend(name) for name in ("a", "b", "c")]
    yield started
    for b in started:
        b.close()


def _pool(bs: list[NamedBackend]) -> list[dict[str, Any]]:
    return [{"url": b.url, "name": b.name} for b in bs]


def _start(
    proxy_factory, tmp_path: Path, routing: dict[str, Any], **sections: Any
) -> tuple[Proxy, str]:
    """The bundle (by default with the default circuit breaker and health checks); returns the
    proxy and the management URL."""
    path = write_profile(tmp_path, {"routing": routing, **sections})
    options = {"waypost_profile": str(path), "limits_max_body_size": str(MAX_BODY)}
    p = proxy_factory(options=options, wait=False)
    mport = int(p.wait_for(MANAGEMENT, timeout=40).group(1))
    return p, f"http://127.0.0.1:{mport}"


def _malformed(host: str, target: str, i: int) -> tuple[bytes, int | None]:
    """The i-th request of the flood and the status it must get (None: no answer needed)."""
    head = f"POST {target} HTTP/1.1\r\nHost: {host}\r\nX-Request-ID: flood-{i}\r\n"
    kind = i % 5
    if kind == 0:  # a chunk size with a sign (h11 0.14 took it)
        return (head + "Transfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n").encode(), 400
    if kind == 1:  # a chunk without its CRLF
        return (head + "Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n").encode(), 400
    if kind == 2:  # a chunked body over the limit
        big = f"{MAX_BODY * 2:x}\r\n" + "x" * (MAX_BODY * 2) + "\r\n0\r\n\r\n"
        return (head + "Transfer-Encoding: chunked\r\n\r\n" + big).encode(), 413
    if kind == 3:  # a declared body over the limit
        return (head + f"Content-Length: {MAX_BODY * 4}\r\n\r\n").encode(), 413
    return b"GARBAGE \x00\xff nonsense\r\n\r\n", 400  # not a request line


def _truncated(port: int, host: str, target: str) -> None:
    """A body shorter than its Content-Length, then the client's half of the connection ends."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        head = f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 100\r\n\r\n"
        s.sendall(head.encode() + b"short")
        s.shutdown(socket.SHUT_WR)
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass


def _flood_while_serving(
    port: int, host: str, target: str, good: Callable[[], httpx.Response]
) -> tuple[list[tuple[int, bytes, int | None]], list[int]]:
    """Send ~20 malformed requests (and truncated bodies) from one client while another sends
    well-formed ones; returns the flood's (i, answer, expected status) and the good statuses."""
    done = threading.Event()
    statuses: list[int] = []

    def serve() -> None:
        while not done.is_set():
            statuses.append(good().status_code)

    t = threading.Thread(target=serve)
    t.start()
    flood = []
    try:
        for i in range(20):
            data, want = _malformed(host, target, i)
            flood.append((i, raw_request(port, data), want))
            if i % 4 == 0:
                _truncated(port, host, target)
        for _ in range(20):  # and more good requests after the flood
            statuses.append(good().status_code)
    finally:
        done.set()
        t.join(30)
    return flood, statuses


def _check_answers(p: Proxy, flood: list[tuple[int, bytes, int | None]]) -> None:
    got = [(i, status_of(answer) if answer else None) for i, answer, _ in flood]
    assert got == [(i, want) for i, _, want in flood], [a[:200] for _, a, _ in flood]
    for i, answer, _ in flood:
        if i % 5 == 4:
            continue  # garbage: no request head, no id
        rid = re.search(rb"(?im)^x-request-id: *(\S+)", answer)
        assert rid and rid.group(1) == f"flood-{i}".encode(), (i, answer[:300])
    lines = {j.get("request_id"): j for j in p.json_lines() if j.get("message") == "request"}
    for i, _, want in flood:
        if i % 5 in (0, 1, 2):  # these reached the hooks: their line says what was sent
            line = wait_until(lambda i=i: lines.get(f"flood-{i}") or _line(p, f"flood-{i}"))
            assert line["status"] == want, line


def _line(p: Proxy, rid: str) -> dict | None:
    return next(
        (j for j in p.json_lines() if j.get("message") == "request" and j.get("request_id") == rid),
        None,
    )


def _check_backends(mgmt: str) -> None:
    with httpx.Client(timeout=TIMEOUT) as c:
        ready = c.get(mgmt + "/health/readiness")
        assert ready.status_code == 200, ready.text
        state = c.get(mgmt + "/admin/backends", headers=AUTH).json()["backends"]
        assert {s["name"]: (s["circuit"], s["status"]) for s in state} == {
            n: ("closed", "healthy") for n in "abc"
        }, state
        assert all(not s["last_failures"] for s in state), state


def test_reverse_malformed_flood_trips_no_breaker(proxy_factory, tmp_path, backends) -> None:
    routing = {
        "listeners": [{"mode": "reverse", "host": "127.0.0.1", "port": 0}],
        "rules": [{"name": "all", "forward": {"backends": _pool(backends)}}],
    }
    p, mgmt = _start(proxy_factory, tmp_path, routing)
    rport = int(p.wait_for(REVERSE, timeout=40).group(2))
    url = f"http://127.0.0.1:{rport}"
    with httpx.Client(timeout=TIMEOUT) as good:
        flood, statuses = _flood_while_serving(
            rport, f"127.0.0.1:{rport}", "/upload", lambda: good.post(url + "/x", content=b"ok")
        )
    assert statuses and set(statuses) == {200}, statuses
    _check_answers(p, flood)
    _check_backends(mgmt)


def test_forward_malformed_flood_trips_no_breaker(proxy_factory, tmp_path, backends) -> None:
    rules = [{"name": "app", "match": {"host": "app.internal"},
              "forward": {"backends": _pool(backends)}}]  # fmt: skip
    p, mgmt = _start(proxy_factory, tmp_path, {"rules": rules})
    p.port = int(p.wait_for(r"proxy listening at \*?\[?[0-9a-f.:]+?\]?:(\d+)").group(1))
    with httpx.Client(proxy=p.url, timeout=TIMEOUT) as good:
        flood, statuses = _flood_while_serving(
            p.port,
            "app.internal",
            "http://app.internal/upload",
            lambda: good.post("http://app.internal/x", content=b"ok"),
        )
    assert statuses and set(statuses) == {200}, statuses
    _check_answers(p, flood)
    _check_backends(mgmt)


def test_what_the_client_received_is_logged_and_counted(proxy_factory, tmp_path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    routing = {
        "listeners": [{"mode": "reverse", "host": "127.0.0.1", "port": 0}],
        "rules": [{"name": "dead", "forward": {"backends": [
            {"url": f"http://127.0.0.1:{dead}", "name": "dead"}]}}],
        "retries": {"max_attempts": 1},
    }  # fmt: skip
    breaker = {"failure_threshold": 1, "timeout": "30s"}
    p, mgmt = _start(proxy_factory, tmp_path, routing, circuit_breaker=breaker)
    rport = int(p.wait_for(REVERSE, timeout=40).group(2))
    answer = raw_request(
        rport,
        f"GET /x HTTP/1.1\r\nHost: 127.0.0.1:{rport}\r\nX-Request-ID: dead-1\r\n\r\n".encode(),
    )
    assert status_of(answer) == 502, answer
    assert re.search(rb"(?im)^x-request-id: dead-1\r$", answer), answer
    line = wait_until(lambda: _line(p, "dead-1"))
    assert line["status"] == 502 and line["backend"] == "dead", line
    # The circuit is open now: a POST gets its 503 CIRCUIT_OPEN when routed, at its head, but
    # its malformed body is answered 400, and the 400 is what is logged and counted.
    head = f"POST /x HTTP/1.1\r\nHost: 127.0.0.1:{rport}\r\nX-Request-ID: bad-1\r\n"
    answer = raw_request(rport, (head + "Transfer-Encoding: chunked\r\n\r\n+5\r\n").encode())
    assert status_of(answer) == 400, answer
    assert re.search(rb"(?im)^x-request-id: bad-1\r$", answer), answer
    line = wait_until(lambda: _line(p, "bad-1"))
    assert line["status"] == 400 and line["bytes_sent"] == 0, line
    # without an id of its own, the page carries the one its line was written with
    anonymous = f"POST /x HTTP/1.1\r\nHost: 127.0.0.1:{rport}\r\nTransfer-Encoding: chunked\r\n"
    answer = raw_request(rport, (anonymous + "\r\n5\r\nhelloXX").encode())
    assert status_of(answer) == 400, answer
    rid = re.search(rb"(?im)^x-request-id: *(\S+)\r$", answer).group(1).decode()  # type: ignore[union-attr]
    line = wait_until(lambda: _line(p, rid))
    assert line["status"] == 400, line
    answer = raw_request(rport, head.encode() + b"\r\n")
    assert status_of(answer) == 503 and b"CIRCUIT_OPEN" in answer, answer
    metrics = httpx.get(mgmt + "/metrics", timeout=TIMEOUT).text
    assert 'http_requests_total{backend="dead",method="GET",status="502"} 1.0' in metrics
    assert 'http_requests_total{backend="",method="POST",status="400"} 2.0' in metrics
    assert 'http_requests_total{backend="",method="POST",status="503"} 1.0' in metrics
    assert 'status="error"' not in metrics
