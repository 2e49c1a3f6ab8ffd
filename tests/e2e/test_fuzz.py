"""Property-based fuzzing of the request parser, end-to-end level: a real bundle in forward and
reverse mode, generated inputs over raw sockets, and an origin that parses what reaches it
strictly (RFC 9112, no leniency) and records every violation.

The inputs are tests/unit/test_wire_fuzz.py's request heads (each with its verdict: "ok",
"bad", "any"), POSTs with its chunked bodies, and raw noise. For each: a well-formed request
is answered 200 by the origin; a malformed one gets a 4xx or a close within the header timeout
(plus the refusal's linger) and the origin never sees it; nothing gets a 5xx or hangs; the
origin never receives bytes that are not a well-formed request; and a well-formed request
right after is served. Fewer examples than the unit level (each costs a few round trips) and
derandomized, so CI is reproducible; ~10 s per mode.
"""

from __future__ import annotations

import itertools
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import MANAGEMENT, Proxy, start_proxy
from tests.unit.test_wire_fuzz import LIMITS, chunked, heads

HEADER_TIMEOUT = 2.0
LINGER = 2.0  # kernel/wire.py closes a refused connection fully this long after the answer
PROFILE = """\
server: {{host: 127.0.0.1, port: 8080, shutdown_timeout: 1s}}
logging: {{level: info, format: json, output: stdout}}
metrics: {{enabled: true, host: 127.0.0.1, port: 0}}
security:
  egress:
    allowed_networks: [127.0.0.1/32]
limits: {{header_timeout: {timeout}s, max_url_length: {url}, max_header_size: {header},
         max_headers_count: {count}, max_body_size: 1000}}
"""
E2E = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(_TOKEN + rb" [\x21-\x7e]+ HTTP/1\.[01]")
_FIELD = re.compile(
    b"(" + _TOKEN + rb"):[ \t]*((?:[^\x00-\x08\x0a-\x1f\x7f]*[^\x00-\x20\x7f])?)[ \t]*"
)
_CHUNK = re.compile(rb"([0-9A-Fa-f]{1,15})(?:[ \t]*;[^\x00-\x08\x0a-\x1f\x7f]*)?")


class Violation(Exception):
    """What the origin received is not a well-formed request."""


class StrictOrigin:
    """An origin that reads requests with a strict RFC 9112 parser, answers each 200 (kept
    alive), and records the X-Fuzz id of every request and every violation it saw."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.ids: list[bytes] = []
        self.violations: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        reader = _Reader(conn)
        with conn:
            try:
                while reader.more():
                    method, fields = read_request(reader)
                    self.ids += [v for n, v in fields if n.lower() == b"x-fuzz"]
                    body = b"" if method == b"HEAD" else b"ok"
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n" + body)
            except Violation as e:
                self.violations.append(str(e))
            except OSError:
                pass


class _Reader:
    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buf = b""

    def more(self) -> bool:
        """Whether another request starts (False: the peer closed between requests)."""
        if not self.buf:
            self.buf = self.conn.recv(65536)
        return bool(self.buf)

    def until(self, sep: bytes, limit: int) -> bytes:
        while sep not in self.buf:
            if len(self.buf) > limit:
                raise Violation(f"no {sep!r} within {limit} bytes: {self.buf[:200]!r}")
            data = self.conn.recv(65536)
            if not data:
                raise Violation(f"closed inside a request: {self.buf[:200]!r}")
            self.buf += data
        out, _, self.buf = self.buf.partition(sep)
        return out

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.conn.recv(65536)
            if not data:
                raise Violation("closed inside a body")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def read_request(r: _Reader) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """One request, read strictly: method and fields; Violation on anything RFC 9112 forbids
    (bare LF or CR, obs-fold, control bytes, invalid framing, a malformed chunked body)."""
    head = r.until(b"\r\n\r\n", 1 << 20)
    if re.search(rb"\r(?!\n)|(?<!\r)\n", head):
        raise Violation(f"bare CR or LF in the head: {head[:200]!r}")
    line, *lines = head.split(b"\r\n")
    if not _REQUEST_LINE.fullmatch(line):
        raise Violation(f"request line: {line[:200]!r}")
    fields = []
    for f in lines:
        m = _FIELD.fullmatch(f)
        if not m:
            raise Violation(f"field line: {f[:200]!r}")
        fields.append((m.group(1), m.group(2)))
    lengths = {v for n, v in fields if n.lower() == b"content-length"}
    codings = [v for n, v in fields if n.lower() == b"transfer-encoding"]
    if codings:
        if lengths or codings != [b"chunked"]:
            raise Violation(f"framing: {fields!r}")
        read_chunked(r)
    elif lengths:
        if len(lengths) > 1 or not next(iter(lengths)).isdigit():
            raise Violation(f"Content-Length: {lengths!r}")
        r.exactly(int(next(iter(lengths))))
    return line.split(b" ")[0], fields


def read_chunked(r: _Reader) -> None:
    while True:
        line = r.until(b"\r\n", 4096)
        m = _CHUNK.fullmatch(line)
        if not m or b"\n" in line:
            raise Violation(f"chunk line: {line[:100]!r}")
        size = int(m.group(1), 16)
        if not size:
            break
        r.exactly(size)
        if r.exactly(2) != b"\r\n":
            raise Violation("chunk data not followed by CRLF")
    while line := r.until(b"\r\n", 4096):  # trailer fields, up to the empty line
        if not _FIELD.fullmatch(line):
            raise Violation(f"trailer line: {line[:100]!r}")


# --- the bundle ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def origin() -> Iterator[StrictOrigin]:
    o = StrictOrigin()
    yield o
    o.sock.close()


@pytest.fixture(scope="module", params=["forward", "reverse"])
def bundle(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, origin: StrictOrigin
) -> Iterator[tuple[str, Proxy]]:
    tmp: Path = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    profile = tmp / "profile.yaml"
    profile.write_text(
        PROFILE.format(
            timeout=HEADER_TIMEOUT,
            url=LIMITS.max_url_length,
            header=LIMITS.max_header_size,
            count=LIMITS.max_headers_count,
        )
    )
    opts: dict[str, object] = {"waypost_profile": str(profile)}
    if request.param == "reverse":
        opts["mode"] = f"reverse:http://127.0.0.1:{origin.port}"
    p = start_proxy(tmp, options=opts)
    p.wait_for(MANAGEMENT)
    yield request.param, p
    p.stop()


@st.composite
def inputs(draw: st.DrawFn) -> tuple[bytes, dict[str, str], bytes]:
    """(bytes to send, verdict per mode, method): a request head, a chunked POST, or noise."""
    kind = draw(st.sampled_from(["head", "head", "chunked", "noise"]))
    if kind == "noise":
        return draw(st.binary(min_size=1, max_size=2000)), {"forward": "any", "reverse": "any"}, b""
    if kind == "chunked":
        body, _, want = draw(chunked())
        head = b"POST / HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
        return head + body, {"forward": want, "reverse": want}, b"POST"
    data, want = draw(heads())
    return data, {"forward": want, "reverse": want}, data.split(b" ", 1)[0]


def _for_mode(
    data: bytes, want: str, mode: str, origin: StrictOrigin, marker: bytes
) -> tuple[bytes, str]:
    """Mark the request (a well-formed X-Fuzz field after the request line) and, in forward
    mode, give an origin-form target the origin's authority (absolute form, which counts
    against max_url_length whole) or else expect the origin-form refusal."""
    line, sep, rest = data.partition(b"\n")
    if not sep:
        return data, want
    if mode == "forward":
        parts = line.split(b" ")
        if len(parts) == 3 and parts[1].startswith(b"/"):
            parts[1] = b"http://127.0.0.1:%d" % origin.port + parts[1]
            line = b" ".join(parts)
            if len(parts[1]) > LIMITS.max_url_length:
                want = "bad"
        elif want == "ok":
            want = "any"
    return line + sep + b"X-Fuzz: " + marker + b"\r\n" + rest, want


def exchange(port: int, data: bytes, head_only: bool) -> tuple[str, float]:
    """Send `data` while reading; returns the status of a complete answer ("4xx-open" when a
    4xx is not followed by a close), "closed" when the proxy closed without one, "hung" when
    nothing of that happened within the header timeout (plus the linger and a margin), with
    the seconds until the answer or the close."""
    t0 = time.monotonic()
    deadline = t0 + HEADER_TIMEOUT + LINGER + 2
    status, took = "", 0.0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.setblocking(False)
        got, sent = b"", 0
        while time.monotonic() < deadline:
            if sent < len(data):
                try:
                    sent += s.send(data[sent : sent + 65536])
                except BlockingIOError:
                    pass
                except OSError:
                    sent = len(data)  # refused and closed while we were still sending
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                time.sleep(0.002)
                continue
            except OSError:
                chunk = b""
            if not chunk:  # closed
                if status:
                    return status, took
                status = got[9:12].decode() if got.startswith(b"HTTP/1.1 ") else "closed"
                return status, time.monotonic() - t0
            got += chunk
            if not status and _complete(got, head_only):
                status, took = got[9:12].decode(), time.monotonic() - t0
                if status[0] != "4":
                    return status, took
    return ("4xx-open" if status else "hung"), time.monotonic() - t0


def _complete(resp: bytes, head_only: bool) -> bool:
    head, sep, body = resp.partition(b"\r\n\r\n")
    if not sep:
        return False
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return head_only or (m is not None and len(body) >= int(m.group(1)))


_seq = itertools.count()  # the X-Fuzz marker of each example


@pytest.mark.timeout(120)
@E2E
@given(case=inputs())
def test_fuzz_through_the_bundle(
    bundle: tuple[str, Proxy], origin: StrictOrigin, case: tuple[bytes, dict[str, str], bytes]
) -> None:
    mode, p = bundle
    data, wants, method = case
    want = wants[mode]
    marker = b"f%d" % next(_seq)
    data, want = _for_mode(data, want, mode, origin, marker)
    status, took = exchange(p.port, data, method == b"HEAD")
    assert status not in ("hung", "4xx-open"), (status, took, data[:300])
    assert took <= HEADER_TIMEOUT + 1.5, (status, took, data[:300])
    assert status == "closed" or status[0] in "24", (status, data[:300])
    if want == "ok":
        assert status == "200", (status, data[:300])
    elif want == "bad":
        assert status != "200", (status, data[:300])
        assert marker not in origin.ids, data[:300]
    assert not origin.violations, (origin.violations, data[:300])
    # The proxy keeps serving: a well-formed request on a new connection.
    target = f"http://127.0.0.1:{origin.port}/next" if mode == "forward" else "/next"
    good = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode()
    assert exchange(p.port, good, False)[0] == "200"
