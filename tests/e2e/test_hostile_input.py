"""Hostile request input through the bundle in forward and reverse mode, over raw sockets.

Each malformed input gets its JSON error at once and the connection is closed (none is left
hanging until a timeout), and the origin never sees a byte of it. The origin here is a raw
socket server that records everything it receives.
"""

from __future__ import annotations

import os
import random
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MANAGEMENT, ROOT, Proxy, json_body, raw_request, start_proxy, status_of

PROFILE = """\
server: {host: 127.0.0.1, port: 8080, shutdown_timeout: 1s}
logging: {level: info, format: json, output: stdout}
metrics: {enabled: true, host: 127.0.0.1, port: 0}
security:
  egress:
    allowed_networks: [127.0.0.1/32]
limits: {header_timeout: 10s, max_url_length: 2048, max_body_size: 64KB}
"""
MAX_URL = 2048
MAX_BODY = 64 * 1024
PATH = "/hostile"


class Recorder:
    """An origin that answers 200 to whatever it reads and keeps every byte it received."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        data = b""
        with conn:
            try:
                while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                if b"chunked" in head.lower():
                    # The body's end, not the head's: a head can end in "0\r\n\r\n" too (an
                    # X-Request-ID ending in 0), and answering then would close on an unread
                    # body, which resets the connection under the proxy.
                    while not body.endswith(b"0\r\n\r\n") and (chunk := conn.recv(65536)):
                        body += chunk
                    data = head + b"\r\n\r\n" + body
                if data:
                    self.received.append(data)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            except OSError:
                pass

    def seen(self, marker: bytes) -> bool:
        return any(marker in r for r in self.received)


@pytest.fixture(scope="module")
def origin() -> Iterator[Recorder]:
    r = Recorder()
    yield r
    r.sock.close()


def _start(tmp: Path, origin: Recorder, mode: str, **options: object) -> Proxy:
    profile = tmp / "profile.yaml"
    profile.write_text(PROFILE)
    opts: dict[str, object] = {"waypost_profile": str(profile), **options}
    if mode == "reverse":
        opts["mode"] = f"reverse:http://127.0.0.1:{origin.port}"
    p = start_proxy(tmp, options=opts)
    p.mgmt_port = int(p.wait_for(MANAGEMENT).group(1))  # type: ignore[attr-defined]
    return p


@pytest.fixture(scope="module", params=["forward", "reverse"])
def bundle(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, origin: Recorder
) -> Iterator[tuple[str, Proxy]]:
    p = _start(tmp_path_factory.mktemp(request.param), origin, request.param)
    yield request.param, p
    p.stop()


def _target(mode: str, origin: Recorder, path: str = PATH) -> str:
    return f"http://127.0.0.1:{origin.port}{path}" if mode == "forward" else path


def _complete(resp: bytes) -> bool:
    head, sep, body = resp.partition(b"\r\n\r\n")
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return bool(sep and m) and len(body) >= int(m.group(1))  # type: ignore[union-attr]


def _exchange(port: int, data: bytes, timeout: float = 3.0) -> tuple[bytes, float]:
    """Send `data` (while reading, so a large one cannot block), read until the proxy closes;
    returns the answer and the seconds from the last byte sent to the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.setblocking(False)
        resp, sent, done_at = b"", 0, time.monotonic()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            want_write = [s] if sent < len(data) else []
            readable, writable, _ = select.select([s], want_write, [], 0.05)
            if writable:
                try:
                    sent += s.send(data[sent : sent + 65536])
                except OSError:
                    sent = len(data)  # the proxy answered and closed: nothing more to send
                done_at = time.monotonic()
            if readable:
                try:
                    chunk = s.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    return resp, time.monotonic() - done_at
                resp += chunk
                if _complete(resp):
                    sent = len(data)  # a client stops sending once it has the answer
        raise AssertionError(f"connection still open after {timeout}s; got {resp[:200]!r}")


def _refused(port: int, data: bytes, status: int, code: str) -> dict:
    resp, closed_after = _exchange(port, data)
    assert status_of(resp) == status, resp[:300]
    head = resp.partition(b"\r\n\r\n")[0].lower()
    assert b"content-type: application/json" in head
    assert b"connection: close" in head
    err = json_body(resp)["error"]
    assert err["code"] == code and err["request_id"] and err["timestamp"]
    assert closed_after < 1.0, f"closed {closed_after:.2f}s after the request"
    return err


def _chunked(target: str, body: bytes, marker: str) -> bytes:
    return (
        f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Marker: {marker}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode() + body


def _noise() -> bytes:
    data = random.Random(15).randbytes(4096)
    assert data[0] != 0x16  # not the start of a TLS handshake, which regular mode would try
    return data


CASES = {
    "chunk size over 64 bits": lambda t: _chunked(
        t, b"1" + b"0" * 16 + b"\r\nhello\r\n0\r\n\r\n", "a"
    ),
    "chunk size of 17 f": lambda t: _chunked(t, b"f" * 17 + b"\r\nhello\r\n0\r\n\r\n", "b"),
    "bare LF chunk lines": lambda t: _chunked(t, b"5\nhello\n0\n\n", "c"),
    "two bytes as CRLF (CVE-2025-43859)": lambda t: _chunked(t, b"5\r\nhelloXX0\r\n\r\n", "d"),
    "4 KiB of random bytes": lambda t: _noise(),
    "8 KiB method": lambda t: f"{'A' * 8192} {t} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode(),
    "8 KiB method, head incomplete": lambda t: b"A" * 8192,
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_input_answered_400_and_closed(
    bundle: tuple[str, Proxy], origin: Recorder, case: str
) -> None:
    mode, p = bundle
    data = CASES[case](_target(mode, origin))
    _refused(p.port, data, 400, "BAD_REQUEST")
    assert not origin.seen(b"X-Marker") and not origin.seen(b"AAAAAAAA")


@pytest.mark.parametrize(
    "host",
    [b"", b"Host: a.example\r\nHost: b.example\r\n", b"Host: exa mple\r\n"],
    ids=["missing", "duplicate", "invalid"],
)
def test_bad_host_refused_in_both_modes(
    bundle: tuple[str, Proxy], origin: Recorder, host: bytes
) -> None:
    """On a reverse listener too, although mitmproxy replaces Host before any hook."""
    mode, p = bundle
    data = b"GET %s HTTP/1.1\r\n%sX-Marker: host\r\n\r\n" % (_target(mode, origin).encode(), host)
    _refused(p.port, data, 400, "BAD_REQUEST")
    assert not origin.seen(b"X-Marker: host")


@pytest.mark.parametrize("line", ["GET {} HTTP/1.1 ", "GET  {}  HTTP/1.1", "GET\t{} HTTP/1.1"])
@pytest.mark.parametrize("split", [False, True], ids=["one read", "line first"])
def test_request_line_whitespace_refused_however_split(
    bundle: tuple[str, Proxy], origin: Recorder, line: str, split: bool
) -> None:
    """400 whether the whole head arrives in one read or the request line first."""
    mode, p = bundle
    first = (line.format(_target(mode, origin)) + "\r\n").encode()
    rest = f"Host: 127.0.0.1:{origin.port}\r\nX-Marker: spaces\r\n\r\n".encode()
    if not split:
        _refused(p.port, first + rest, 400, "BAD_REQUEST")
    else:
        with socket.create_connection(("127.0.0.1", p.port), timeout=3) as s:
            s.sendall(first)
            time.sleep(0.2)
            try:
                s.sendall(rest)
            except OSError:
                pass  # refused on the request line already
            resp = b""
            while chunk := s.recv(65536):
                resp += chunk
        assert status_of(resp) == 400 and json_body(resp)["error"]["code"] == "BAD_REQUEST"
    assert not origin.seen(b"X-Marker: spaces")


def test_chunked_body_over_limit_closed_while_client_sends(
    bundle: tuple[str, Proxy], origin: Recorder
) -> None:
    """A client that goes on sending after its 413 (the soak's flood) sees the answer and the
    end of the stream at once; the connection is fully closed within the linger (2 s)."""
    mode, p = bundle
    head = _chunked(_target(mode, origin), b"", "over")
    chunk = b"%x\r\n%s\r\n" % (16384, b"x" * 16384)
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
            s.setblocking(False)
            data, sent, resp, eof_at = head + chunk * (4 * MAX_BODY // 16384), 0, b"", None
            start = time.monotonic()
            while time.monotonic() - start < 5:
                readable, writable, _ = select.select([s], [s], [], 0.05)
                if writable:
                    try:  # keep sending past the limit, and past the answer
                        sent += s.send(data[sent % len(data) : sent % len(data) + 65536])
                    except OSError:
                        break  # fully closed: a reset
                if readable and eof_at is None:
                    try:
                        got = s.recv(65536)
                    except OSError:
                        break
                    resp += got
                    if not got:
                        eof_at = time.monotonic() - start
            closed_at = time.monotonic() - start
        assert status_of(resp) == 413 and json_body(resp)["error"]["code"] == "PAYLOAD_TOO_LARGE"
        assert eof_at is not None and eof_at < 1.0, (eof_at, resp[:200])
        assert closed_at < 4.0, closed_at
    assert not origin.seen(b"X-Marker: over")


def test_one_mib_url_is_414_not_431(bundle: tuple[str, Proxy], origin: Recorder) -> None:
    mode, p = bundle
    target = _target(mode, origin, PATH + "?" + "a" * (1 << 20))
    _refused(p.port, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 414, "URI_TOO_LONG")


def test_url_limit_counts_the_whole_target(bundle: tuple[str, Proxy], origin: Recorder) -> None:
    mode, p = bundle
    base = _target(mode, origin, PATH + "?q=")
    fits = base + "a" * (MAX_URL - len(base))
    resp = raw_request(
        p.port, f"GET {fits} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode()
    )
    assert status_of(resp) == 200, resp[:300]
    over = fits + "a"
    _refused(
        p.port,
        f"GET {over} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode(),
        414,
        "URI_TOO_LONG",
    )
    assert not origin.seen(over.encode())


def test_origin_form_on_the_forward_listener(bundle: tuple[str, Proxy], origin: Recorder) -> None:
    mode, p = bundle
    path = PATH + "/origin-form"
    data = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode()
    if mode == "reverse":  # origin-form is what a reverse proxy receives
        resp = raw_request(p.port, data)
        assert status_of(resp) == 200
        return
    err = _refused(p.port, data, 400, "BAD_REQUEST")
    assert "origin-form" in err["message"]
    assert not origin.seen(path.encode())
    # The proxy's own endpoints on its port stay reachable in origin-form.
    own = f"GET /health/liveness HTTP/1.1\r\nHost: 127.0.0.1:{p.port}\r\n\r\n".encode()
    resp = raw_request(p.port, own)
    assert status_of(resp) == 200 and json_body(resp)["status"] == "ok"
    # Under a name that is not the proxy's (a Kubernetes Service's): the path says it is ours.
    svc = b"GET /health/liveness HTTP/1.1\r\nHost: waypost.proxy.svc:8080\r\n\r\n"
    resp = raw_request(p.port, svc)
    assert status_of(resp) == 200 and json_body(resp)["status"] == "ok"
    other = b"GET /healthz HTTP/1.1\r\nHost: waypost.proxy.svc:8080\r\n\r\n"
    assert "origin-form" in _refused(p.port, other, 400, "BAD_REQUEST")["message"]


def test_origin_form_relayed_when_configured(tmp_path: Path, origin: Recorder) -> None:
    p = _start(tmp_path, origin, "forward", limits_origin_form="relay")
    try:
        path = PATH + "/relayed"
        data = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode()
        resp = raw_request(p.port, data)
        assert status_of(resp) == 200
        assert origin.seen(path.encode())
    finally:
        p.stop()


@pytest.fixture(scope="module")
def old_h11(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """h11 0.14 (what `pip install .` brings with mitmproxy 11) in a directory of its own."""
    target = tmp_path_factory.mktemp("h11-0.14")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--target",
            str(target),
            "h11==0.14.0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode:
        pytest.skip(f"cannot install h11 0.14: {done.stderr.strip()[-300:]}")
    return target


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_cve_2025_43859_refused_on_h11_0_14(
    tmp_path: Path, origin: Recorder, old_h11: Path, mode: str
) -> None:
    pythonpath = os.pathsep.join([str(old_h11), str(ROOT)])
    profile = tmp_path / "profile.yaml"
    profile.write_text(PROFILE)
    opts: dict[str, object] = {"waypost_profile": str(profile)}
    if mode == "reverse":
        opts["mode"] = f"reverse:http://127.0.0.1:{origin.port}"
    p = start_proxy(tmp_path, options=opts, env={"PYTHONPATH": pythonpath})
    try:
        p.wait_for(r"h11 0\.14\.0: its chunked reader")  # the old h11 is the one loaded
        target = _target(mode, origin)
        for marker, body in [
            ("cve1", b"5\r\nhelloXX0\r\n\r\n"),
            ("cve2", b"5\r\nhello\n0\r\n\r\n"),
            ("cve3", b"3\r\nabc\r\n5\r\nhello\r\r0\r\n\r\n"),
        ]:
            _refused(p.port, _chunked(target, body, marker), 400, "BAD_REQUEST")
            assert not origin.seen(marker.encode())
        ok = _chunked(target, b"5\r\nhello\r\n0\r\n\r\n", "fine")
        resp = raw_request(p.port, ok)
        assert status_of(resp) == 200
    finally:
        p.stop()
