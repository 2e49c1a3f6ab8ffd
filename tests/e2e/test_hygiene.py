"""Hygiene and wire guards against a real mitmdump, with raw sockets for every malformed case."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator

import pytest

from tests.conftest import (
    Backend,
    Proxy,
    json_body,
    raw_request,
    read_to_close,
    start_proxy,
    status_of,
)

OPTIONS = {
    "limits_header_timeout": "1s",
    "limits_max_body_size": "64KB",
    "limits_max_url_length": 2048,
    "limits_max_header_size": 4096,
    "limits_max_headers_count": 30,
}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    p = start_proxy(
        tmp_path_factory.mktemp("hygiene"), scripts=("addons/hygiene.py",), options=OPTIONS
    )
    yield p
    p.stop()


@pytest.fixture(scope="module")
def streaming_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    p = start_proxy(
        tmp_path_factory.mktemp("hygiene-stream"),
        scripts=("addons/hygiene.py",),
        options={**OPTIONS, "stream_large_bodies": "1k"},
    )
    yield p
    p.stop()


def _hp(backend: Backend) -> str:
    return f"127.0.0.1:{backend.port}"


def _get(
    backend: Backend, extra: str = "", *, version: str = "HTTP/1.1", path: str = "/echo"
) -> bytes:
    return (
        f"GET http://{_hp(backend)}{path} {version}\r\nHost: {_hp(backend)}\r\n{extra}\r\n".encode()
    )


def _assert_error(resp: bytes, status: int, code: str) -> None:
    assert status_of(resp) == status, resp[:300]
    head = resp.partition(b"\r\n\r\n")[0].lower()
    assert b"content-type: application/json" in head
    err = json_body(resp)["error"]
    assert err["code"] == code
    assert err["message"] and err["request_id"] and err["timestamp"]


def _assert_serving(proxy: Proxy, backend: Backend) -> None:
    resp = raw_request(proxy.port, _get(backend))
    assert status_of(resp) == 200, resp[:300]


def _echo(resp: bytes) -> dict:
    assert status_of(resp) == 200, resp[:300]
    return json.loads(resp.partition(b"\r\n\r\n")[2])


def _headers(echo: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in echo["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


def _bad_cases(b: Backend) -> list[tuple[str, bytes, int, str]]:
    hp = _hp(b)
    url = f"http://{hp}/echo"
    return [
        ("obs-fold", _get(b, "X-A: a\r\n b\r\n"), 400, "BAD_REQUEST"),
        (
            "obs-fold hiding TE",
            _get(b, "X-A: a\r\n Transfer-Encoding: chunked\r\n"),
            400,
            "BAD_REQUEST",
        ),
        ("bare CR in value", _get(b, "X-A: a\rTransfer-Encoding: chunked\r\n"), 400, "BAD_REQUEST"),
        ("NUL in value", _get(b, "X-A: a\x00b\r\n"), 400, "BAD_REQUEST"),
        (
            "NUL in method",
            f"GE\x00T {url} HTTP/1.1\r\nHost: {hp}\r\n\r\n".encode(),
            400,
            "BAD_REQUEST",
        ),
        ("NUL in path", _get(b, path="/echo\x00x"), 400, "BAD_REQUEST"),
        ("GET *", f"GET * HTTP/1.1\r\nHost: {hp}\r\n\r\n".encode(), 400, "BAD_REQUEST"),
        ("HTTP/2.0 on HTTP/1", _get(b, version="HTTP/2.0"), 400, "BAD_REQUEST"),
        ("HTTP/1.2", _get(b, version="HTTP/1.2"), 400, "BAD_REQUEST"),
        ("missing Host", f"GET {url} HTTP/1.1\r\n\r\n".encode(), 400, "BAD_REQUEST"),
        ("missing Host origin-form", b"GET /echo HTTP/1.1\r\n\r\n", 400, "BAD_REQUEST"),
        ("duplicate Host", _get(b, f"Host: {hp}\r\n"), 400, "BAD_REQUEST"),
        ("invalid Host", f'GET {url} HTTP/1.1\r\nHost: a"b\r\n\r\n'.encode(), 400, "BAD_REQUEST"),
        (
            "invalid method token",
            f"GE(T {url} HTTP/1.1\r\nHost: {hp}\r\n\r\n".encode(),
            400,
            "BAD_REQUEST",
        ),
        ("invalid header name", _get(b, "X(A): b\r\n"), 400, "BAD_REQUEST"),
        ("space before colon", _get(b, "Transfer-Encoding : chunked\r\n"), 400, "BAD_REQUEST"),
        (
            "CL and TE",
            _get(b, "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n"),
            400,
            "BAD_REQUEST",
        ),
        (
            "TE not chunked last",
            _get(b, "Transfer-Encoding: chunked, gzip\r\n"),
            400,
            "BAD_REQUEST",
        ),
        ("differing CL", _get(b, "Content-Length: 1\r\nContent-Length: 2\r\n"), 400, "BAD_REQUEST"),
        (
            "CR in request line",
            f"GET {url}\rX HTTP/1.1\r\nHost: {hp}\r\n\r\n".encode(),
            400,
            "BAD_REQUEST",
        ),
        (
            "TRACE",
            f"TRACE {url} HTTP/1.1\r\nHost: {hp}\r\n\r\n".encode(),
            405,
            "METHOD_NOT_ALLOWED",
        ),
        (
            "TRACK",
            f"TRACK {url} HTTP/1.1\r\nHost: {hp}\r\n\r\n".encode(),
            405,
            "METHOD_NOT_ALLOWED",
        ),
        ("URL too long", _get(b, path="/echo?" + "a" * 3000), 414, "URI_TOO_LONG"),
        (
            "too many headers",
            _get(b, "".join(f"X-{i}: v\r\n" for i in range(40))),
            431,
            "HEADERS_TOO_LARGE",
        ),
        ("headers too large", _get(b, "X-Big: " + "v" * 5000 + "\r\n"), 431, "HEADERS_TOO_LARGE"),
        (
            "CL over limit",
            f"POST {url} HTTP/1.1\r\nHost: {hp}\r\nContent-Length: 100000\r\n\r\n".encode(),
            413,
            "PAYLOAD_TOO_LARGE",
        ),
    ]


def test_malformed_requests_refused_and_proxy_keeps_serving(proxy: Proxy, backend: Backend) -> None:
    hits = backend.hits.get("/echo", 0)
    for name, data, status, code in _bad_cases(backend):
        resp = raw_request(proxy.port, data, timeout=5)
        try:
            _assert_error(resp, status, code)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
    assert backend.hits.get("/echo", 0) == hits, "a malformed request reached the backend"
    _assert_serving(proxy, backend)
    assert any("rule=obs_fold" in line for line in proxy.lines)


def test_host_rewritten_to_absolute_url_authority(proxy: Proxy, backend: Backend) -> None:
    data = f"GET http://{_hp(backend)}/echo HTTP/1.1\r\nHost: evil.example\r\n\r\n".encode()
    assert _headers(_echo(raw_request(proxy.port, data)))["host"] == [_hp(backend)]


def test_http10_without_host_is_legal(proxy: Proxy, backend: Backend) -> None:
    data = f"GET http://{_hp(backend)}/echo HTTP/1.0\r\n\r\n".encode()
    assert status_of(raw_request(proxy.port, data)) == 200


@pytest.mark.parametrize(
    ("upgrade", "connection", "want_upgrade", "want_connection"),
    [
        ("H2C", "Upgrade, HTTP2-Settings", None, None),
        ("foo, h2c", "keep-alive, Upgrade, HTTP2-Settings", ["foo"], ["keep-alive, Upgrade"]),
    ],
)
def test_h2c_offer_stripped(
    proxy: Proxy,
    backend: Backend,
    upgrade: str,
    connection: str,
    want_upgrade: list[str] | None,
    want_connection: list[str] | None,
) -> None:
    extra = (
        f"Upgrade: {upgrade}\r\nConnection: {connection}\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
    )
    headers = _headers(_echo(raw_request(proxy.port, _get(backend, extra))))
    assert headers.get("upgrade") == want_upgrade
    assert "http2-settings" not in headers
    if want_connection is None:
        assert all("upgrade" not in v.lower() for v in headers.get("connection", []))
    else:
        assert headers["connection"] == want_connection


def test_never_ending_header_block_gets_431(proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nX-A: ")
        sent, resp = 0, b""
        while sent < 2 * 1024 * 1024:
            try:
                s.sendall(b"a" * 65536)
            except OSError:
                break
            sent += 65536
            if select.select([s], [], [], 0)[0]:
                break
        try:
            while chunk := s.recv(65536):
                resp += chunk
        except OSError:
            pass
    _assert_error(resp, 431, "HEADERS_TOO_LARGE")


def test_leading_empty_line_is_ignored(proxy: Proxy, backend: Backend) -> None:
    assert status_of(raw_request(proxy.port, b"\r\n" + _get(backend))) == 200


def test_chunked_trailers_do_not_hang(proxy: Proxy, backend: Backend) -> None:
    data = (
        f"POST http://{_hp(backend)}/echo HTTP/1.1\r\nHost: {_hp(backend)}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n"
    ).encode()
    assert _echo(raw_request(proxy.port, data, timeout=5))["body_length"] == 5


def _chunked_upload(port: int, backend: Backend, total: int) -> bytes:
    """Send a chunked body of `total` bytes in 8 KiB chunks; return the proxy's answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(
            f"POST http://{_hp(backend)}/echo HTTP/1.1\r\nHost: {_hp(backend)}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        sent = 0
        try:
            while sent < total:
                n = min(8192, total - sent)
                s.sendall(b"%x\r\n%s\r\n" % (n, b"x" * n))
                sent += n
            if sent <= 64 * 1024:
                s.sendall(b"0\r\n\r\n")
        except OSError:
            pass
        resp = b""
        try:
            while chunk := s.recv(65536):
                resp += chunk
                if b"\r\n\r\n" in resp and status_of(resp) == 200 and resp.endswith(b"}"):
                    break
        except OSError:
            pass
        return resp


@pytest.mark.parametrize("which", ["proxy", "streaming_proxy"])
def test_chunked_body_limit(which: str, request: pytest.FixtureRequest, backend: Backend) -> None:
    p: Proxy = request.getfixturevalue(which)
    assert _echo(_chunked_upload(p.port, backend, 20_000))["body_length"] == 20_000
    _assert_error(_chunked_upload(p.port, backend, 72 * 1024), 413, "PAYLOAD_TOO_LARGE")
    _assert_serving(p, backend)


def test_streamed_content_length_over_limit(streaming_proxy: Proxy, backend: Backend) -> None:
    data = (
        f"POST http://{_hp(backend)}/echo HTTP/1.1\r\nHost: {_hp(backend)}\r\n"
        "Content-Length: 100000\r\n\r\n"
    ).encode()
    _assert_error(raw_request(streaming_proxy.port, data), 413, "PAYLOAD_TOO_LARGE")


def test_silent_connection_closed_after_timeout(proxy: Proxy) -> None:
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        resp = read_to_close(s)
    assert time.monotonic() - start < 4
    _assert_error(resp, 408, "REQUEST_TIMEOUT")


def test_keepalive_head_deadline_counts_from_first_byte(proxy: Proxy, backend: Backend) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(_get(backend))
        resp = b""
        while not (b"\r\n\r\n" in resp and resp.endswith(b"}")):
            chunk = s.recv(65536)
            assert chunk, resp
            resp += chunk
        assert status_of(resp) == 200
        time.sleep(1.3)  # idle between requests is not the head timeout
        s.sendall(b"GET ")
        start = time.monotonic()
        resp = read_to_close(s)
    assert time.monotonic() - start < 3
    _assert_error(resp, 408, "REQUEST_TIMEOUT")


def test_slowloris_connections_are_closed(proxy: Proxy, backend: Backend) -> None:
    socks = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(20)]
    payload = b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 1000
    answers = {s: b"" for s in socks}
    open_socks = set(socks)
    start = time.monotonic()
    served = False
    try:
        i = 0
        while open_socks and time.monotonic() - start < 6:
            for s in list(open_socks):
                try:
                    s.sendall(payload[i : i + 1])
                except OSError:
                    open_socks.discard(s)
            i += 1
            if not served:
                _assert_serving(proxy, backend)
                served = True
            deadline = time.monotonic() + 0.3
            while open_socks and (left := deadline - time.monotonic()) > 0:
                ready = select.select(list(open_socks), [], [], left)[0]
                for s in ready:
                    try:
                        chunk = s.recv(65536)
                    except OSError:
                        chunk = b""
                    answers[s] += chunk
                    if not chunk:
                        open_socks.discard(s)
        elapsed = time.monotonic() - start
    finally:
        for s in socks:
            s.close()
    assert served
    assert not open_socks, f"{len(open_socks)} slowloris connections still open"
    assert elapsed < 4
    assert sum(status_of(a) == 408 for a in answers.values() if a) >= 18


def test_pipelined_flood_while_waiting_is_bounded(proxy: Proxy, backend: Backend) -> None:
    flood = b"a" * 64 * 1024
    resp = raw_request(proxy.port, _get(backend, path="/slow/1500") + flood, timeout=5)
    _assert_error(resp, 431, "HEADERS_TOO_LARGE")
