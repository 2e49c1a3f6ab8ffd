from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import h11
import pytest
from h11._receivebuffer import ReceiveBuffer
from mitmproxy import version
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events, mode_specs
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import (
    RequestData,
    RequestEndOfMessage,
    RequestHeaders,
    RequestProtocolError,
)
from mitmproxy.test import taddons, tflow

from addons import errors
from addons.kernel import patching, wire

pytestmark = pytest.mark.skipif(
    not patching.checked(version.VERSION), reason="wire guards only patch checked versions"
)


@pytest.fixture(autouse=True)
def _error_page() -> Iterator[None]:
    # The refusals are mitmproxy's error page, which errors.py makes JSON (hygiene installs it).
    errors.install_error_page("test_wire")
    yield
    errors.uninstall_error_page("test_wire")


def test_install_is_idempotent() -> None:
    assert wire.install()
    handle = _http1.Http1Server._handle_event
    reader = _http1.make_body_reader
    assert wire.install()
    assert _http1.Http1Server._handle_event is handle
    assert _http1.make_body_reader is reader


@pytest.fixture
def server() -> Iterator[tuple[Any, Any]]:
    wire.install()
    wire.configure(max_head=200, header_timeout=1.0, max_body=10)
    with taddons.context(Proxyserver()) as tctx:
        client = tflow.tclient_conn()
        client.state = ConnectionState.OPEN
        s = _http1.Http1Server(Context(client, tctx.options))
        yield s, client
    wire.configure(max_head=None, header_timeout=0, max_body=None)


def _run(s: Any, event: events.Event) -> list[Any]:
    return list(s.handle_event(event))


def _sent(cmds: list[Any]) -> bytes:
    return b"".join(c.data for c in cmds if isinstance(c, commands.SendData))


def _status(raw: bytes) -> tuple[int, str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower()
    return int(head.split()[1]), json.loads(body)["error"]["code"]


def _closes(cmds: list[Any]) -> bool:
    return any(isinstance(c, commands.CloseConnection) for c in cmds)


def _received(cmds: list[Any]) -> list[Any]:
    return [c.event for c in cmds if isinstance(c, ReceiveHttp)]


def test_leading_empty_lines_ignored(server: tuple[Any, Any]) -> None:
    s, client = server
    _run(s, events.Start())
    got = _received(
        _run(s, events.DataReceived(client, b"\r\n\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"))
    )
    assert isinstance(got[0], RequestHeaders)
    assert isinstance(got[1], RequestEndOfMessage)


def test_too_many_empty_lines(server: tuple[Any, Any]) -> None:
    s, client = server
    _run(s, events.Start())
    cmds = _run(s, events.DataReceived(client, b"\r\n" * 40 + b"GET / HTTP/1.1\r\n"))
    assert _status(_sent(cmds)) == (400, "BAD_REQUEST")
    assert _closes(cmds)


def test_head_cap(server: tuple[Any, Any]) -> None:
    s, client = server
    _run(s, events.Start())
    assert not _sent(_run(s, events.DataReceived(client, b"GET / HTTP/1.1\r\nX: " + b"a" * 150)))
    cmds = _run(s, events.DataReceived(client, b"a" * 100))
    assert _status(_sent(cmds)) == (431, "HEADERS_TOO_LARGE")
    assert _closes(cmds)


def test_header_timeout_fresh_connection(
    server: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    s, client = server
    now = [100.0]
    monkeypatch.setattr(wire.time, "monotonic", lambda: now[0])
    cmds = _run(s, events.Start())
    (timer,) = [c for c in cmds if isinstance(c, commands.RequestWakeup)]
    assert 1.0 <= timer.delay <= 1.05  # spread by up to 5%
    now[0] = 101.0
    cmds = _run(s, events.Wakeup(timer))
    assert _status(_sent(cmds)) == (408, "REQUEST_TIMEOUT")
    assert _closes(cmds)


def test_header_timeout_rearms_until_deadline(
    server: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    s, client = server
    now = [100.0]
    monkeypatch.setattr(wire.time, "monotonic", lambda: now[0])
    _run(s, events.Start())
    s._wp_deadline = 100.6  # as if the head's first byte came later than the connection
    now[0] = 100.2
    cmds = _run(s, events.Wakeup(commands.RequestWakeup(1.0)))
    assert [c.delay for c in cmds if isinstance(c, commands.RequestWakeup)] == [pytest.approx(0.4)]
    assert not _sent(cmds)


def test_wakeup_ignored_outside_read_headers(server: tuple[Any, Any]) -> None:
    s, client = server
    cmds = _run(s, events.Start())
    (timer,) = [c for c in cmds if isinstance(c, commands.RequestWakeup)]
    _run(
        s, events.DataReceived(client, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab")
    )
    assert s.state == s.read_body
    assert _run(s, events.Wakeup(timer)) == []  # read_body would raise on it


def test_no_timer_while_idle_keepalive(server: tuple[Any, Any]) -> None:
    s, client = server
    s._wp_timer = True  # a timer is outstanding from the connection's start
    _run(s, events.Start())
    s._wp_deadline = None
    s.state = s.read_headers
    assert _run(s, events.DataReceived(client, b"")) == []
    assert s._wp_deadline is None


def test_chunked_trailers_dropped(server: tuple[Any, Any]) -> None:
    s, client = server
    wire.configure(max_head=200, header_timeout=0, max_body=None)
    _run(s, events.Start())
    data = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"
    got = _received(_run(s, events.DataReceived(client, data)))
    assert [type(e) for e in got] == [RequestHeaders, RequestData, RequestEndOfMessage]


def test_chunked_body_over_limit(server: tuple[Any, Any]) -> None:
    s, client = server
    _run(s, events.Start())
    data = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n8\r\naaaaaaaa\r\n8\r\nbbbbbbbb\r\n"
    cmds = _run(s, events.DataReceived(client, data))
    got = _received(cmds)
    assert [type(e) for e in got] == [RequestHeaders, RequestData, RequestProtocolError]
    assert got[1].data == b"aaaaaaaa"
    assert _status(_sent(cmds)) == (413, "PAYLOAD_TOO_LARGE")
    assert _closes(cmds)


def test_chunked_body_over_limit_is_a_lingering_close(server: tuple[Any, Any]) -> None:
    """As the head refusals: mitmproxy 12 left the socket open while the client sent on."""
    s, client = server
    _run(s, events.Start())
    data = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nf\r\n" + b"a" * 15
    cmds = _run(s, events.DataReceived(client, data))
    (close,) = [c for c in cmds if isinstance(c, commands.CloseConnection)]
    assert isinstance(close, commands.CloseTcpConnection) and close.half_close
    (timer,) = [c for c in cmds if isinstance(c, commands.RequestWakeup)][-1:]
    assert wire.LINGER <= timer.delay <= wire.LINGER + wire.SPREAD_MAX
    assert _run(s, events.DataReceived(client, b"b" * 5000)) == []  # read and dropped
    assert len(s.buf) == 0
    (full,) = _run(s, events.Wakeup(timer))
    assert type(full) is commands.CloseConnection


@pytest.mark.parametrize(
    ("data", "events_"),
    [
        (b"3\r\nabc\r\n0\r\n\r\n", ["data", "end"]),
        (b"3\r\nabc\r\n0\r\nX-A: 1\r\nX-B: 2\r\n\r\n", ["data", "end"]),
        (b"3\r\nabc\r\n", ["data"]),
    ],
)
def test_limited_chunked_reader(data: bytes, events_: list[str]) -> None:
    r = wire.LimitedChunkedReader(100)
    buf = ReceiveBuffer()
    buf += data
    got = []
    while (ev := r(buf)) is not None:
        got.append("data" if isinstance(ev, h11.Data) else "end")
        if isinstance(ev, h11.EndOfMessage):
            assert ev.headers == h11.EndOfMessage().headers
            break
    assert got == events_


def test_limited_chunked_reader_bounds_lines() -> None:
    r = wire.LimitedChunkedReader(50)
    buf = ReceiveBuffer()
    buf += b"1" * 60
    with pytest.raises(h11.LocalProtocolError):
        r(buf)


def test_limited_chunked_reader_limit() -> None:
    r = wire.LimitedChunkedReader(None)
    r.limit = 4
    buf = ReceiveBuffer()
    buf += b"3\r\nabc\r\n3\r\ndef\r\n"
    assert isinstance(r(buf), h11.Data)
    assert r(buf) is None and r.over and r.total == 6


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "BAD_REQUEST"),
        (408, "REQUEST_TIMEOUT"),
        (413, "PAYLOAD_TOO_LARGE"),
        (414, "URI_TOO_LONG"),
        (431, "HEADERS_TOO_LARGE"),
    ],
)
def test_error_page(status: int, code: str) -> None:
    raw = _http1.make_error_response(status, "nope")
    assert _status(raw) == (status, code)
    assert b"connection: close" in raw.lower()


def test_first_data_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    wire.install()
    wire.configure(max_head=200, header_timeout=1.0, max_body=None)
    try:
        with taddons.context(Proxyserver()) as tctx:
            client = tflow.tclient_conn()
            client.state = ConnectionState.OPEN
            p = modes.HttpProxy(Context(client, tctx.options))
            cmds = _run(p, events.Start())
            (timer,) = [c for c in cmds if isinstance(c, commands.RequestWakeup)]
            cmds = _run(p, events.Wakeup(timer))
            assert _status(_sent(cmds)) == (408, "REQUEST_TIMEOUT")
            assert _closes(cmds)
    finally:
        wire.configure(max_head=None, header_timeout=0, max_body=None)


@pytest.mark.parametrize(
    "version, vulnerable",
    [
        ("0.14.0", True),
        ("0.15.0", True),
        ("0.16.0", False),
        ("0.17.1", False),
        ("1.0", False),
        ("odd", False),
    ],
)
def test_h11_cve_2025_43859_check(version: str, vulnerable: bool) -> None:
    assert wire.h11_vulnerable(version) is vulnerable


def test_installed_h11_is_fixed() -> None:
    assert not wire.h11_vulnerable(h11.__version__)


def _read_all(data: bytes, *, step: int | None = None) -> list[bytes | str]:
    """Feed `data` to a reader (at once, or `step` bytes per read); its data and end, in order."""
    r = wire.LimitedChunkedReader(100)
    buf = ReceiveBuffer()
    got: list[bytes | str] = []
    for i in range(0, len(data), step or len(data)):
        buf += data[i : i + (step or len(data))]
        while (ev := r(buf)) is not None:
            if isinstance(ev, h11.EndOfMessage):
                got.append("end")
                return got
            got.append(bytes(ev.data))
    return got


@pytest.mark.parametrize("step", [None, 1])
def test_chunked_reader_valid_framing(step: int | None) -> None:
    data = b"5;ext=1\r\nhello\r\n7fffffffffffffff\r\n"
    assert b"".join(b for b in _read_all(data, step=step) if isinstance(b, bytes)) == b"hello"
    data = b"3\r\nabc\r\n0002 \r\nde\r\n0\r\nX-T: 1\r\n\r\n"
    assert b"".join(b for b in _read_all(data, step=step) if b != "end") == b"abcde"
    assert _read_all(data, step=step)[-1] == "end"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        # CVE-2025-43859: h11 < 0.16 took any two bytes after the chunk data as its CRLF.
        (b"5\r\nhelloXX0\r\n\r\n", "not followed by CRLF"),
        (b"5\r\nhello\n0\r\n\r\n", "not followed by CRLF"),
        (b"5\r\nhello\r0\r\n\r\n", "not followed by CRLF"),
        # Waited forever for a CRLF, or for 2^68 bytes of data.
        (b"5\nhello\n0\n\n", "bare LF"),
        (b"3\r\nabc\r\n0\nX: 1\n\n", "bare LF"),
        (b"3\r\nabc\r\n0\r\nX: 1\n\r\n", "trailer|bare LF"),
        (b"fffffffffffffffff\r\nhello\r\n", "overflows 64 bits"),
        (b"10000000000000000\r\nhello\r\n", "overflows 64 bits"),
        (b"8000000000000000\r\nhello\r\n", "overflows 64 bits"),
        (b"+5\r\nhello\r\n0\r\n\r\n", "illegal chunk header"),
        (b"0x5\r\nhello\r\n0\r\n\r\n", "illegal chunk header"),
        (b"5 5\r\nhello\r\n0\r\n\r\n", "illegal chunk header"),
        (b"5;a\x00\r\nhello\r\n0\r\n\r\n", "illegal chunk header"),
        (b"\r\n", "illegal chunk header"),
    ],
)
@pytest.mark.parametrize("step", [None, 1])
def test_chunked_reader_refuses_bad_framing(data: bytes, reason: str, step: int | None) -> None:
    with pytest.raises(h11.LocalProtocolError, match=reason):
        _read_all(data, step=step)


def test_chunked_reader_is_ours_on_every_h11() -> None:
    # The strictness above must not come from h11 (0.14 lacks it): only its ReceiveBuffer and
    # event classes are used, whose code is the same in 0.14 and 0.16.
    from h11._readers import ChunkedReader

    assert not issubclass(wire.LimitedChunkedReader, ChunkedReader)
    assert _http1.make_body_reader(None).__class__ is wire.LimitedChunkedReader


@pytest.mark.parametrize(
    ("pending", "max_url", "want"),
    [
        (b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: ", None, None),
        (b"GET /aaaa", 100, None),
        (b"\r\nGET / HTTP/1.1\r\nX", None, None),
        (b"CONNECT a:443 HTTP/1.1\r\n", None, None),
        (bytes(range(256)) * 16, None, 400),
        (b"GET / HTTP/1.1\r\nX-A: \x00", None, 400),
        (b"hello world\r\n", None, 400),
        (b"GET  / HTTP/1.1\r\n", None, 400),
        (b"GET / FTP/1.0\r\n", None, 400),
        (b"A" * 33, None, 400),
        (b"A" * 32, None, None),
        (b"GET /" + b"a" * 200, 100, 414),
        (b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nX", 100, None),
    ],
)
def test_check_head(pending: bytes, max_url: int | None, want: int | None) -> None:
    got = wire.check_head(pending, max_url)
    assert (got and got[0]) == want


@pytest.mark.parametrize(
    ("pending", "refused"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", False),
        (b"\r\nGET / HTTP/1.1\nHost: a\n\n", False),
        (b"GET / HTTP/1.1", False),  # the line is not complete yet
        (b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", True),
        (b"GET  /  HTTP/1.1\r\nHost: a\r\n\r\n", True),
        (b" GET / HTTP/1.1\r\nHost: a\r\n\r\n", True),
        (b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", True),
        (b"GET / \x0bHTTP/1.1\r\nHost: a\r\n\r\n", True),
        (b"GET /\r\n\r\n", True),
    ],
)
def test_check_line_words(pending: bytes, refused: bool) -> None:
    assert bool(wire.check_line_words(pending)) is refused


@pytest.mark.parametrize("line", [b"GET / HTTP/1.1 ", b"GET  /  HTTP/1.1", b"GET\t/ HTTP/1.1"])
@pytest.mark.parametrize("split", [False, True])
def test_request_line_whitespace_refused_however_split(
    server: tuple[Any, Any], line: bytes, split: bool
) -> None:
    """The same 400 whether the head arrives in one read or the request line first."""
    s, client = server
    _run(s, events.Start())
    rest = b"Host: a\r\n\r\n"
    pieces = [line + b"\r\n", rest] if split else [line + b"\r\n" + rest]
    cmds: list[Any] = []
    for piece in pieces:
        cmds += _run(s, events.DataReceived(client, piece))
    assert _status(_sent(cmds)) == (400, "BAD_REQUEST")
    assert _closes(cmds)
    assert not any(isinstance(e, RequestHeaders) for e in _received(cmds))


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"\x16\x03\x01garbage\x00\xff" * 10, 400, "BAD_REQUEST"),
        (b"GET /" + b"a" * 400, 414, "URI_TOO_LONG"),
        (b"X" * 100, 400, "BAD_REQUEST"),
    ],
)
def test_incomplete_head_refused_at_once(
    server: tuple[Any, Any], data: bytes, status: int, code: str
) -> None:
    s, client = server
    wire.configure(max_head=200, header_timeout=1.0, max_body=10, max_url=50)
    _run(s, events.Start())
    cmds = _run(s, events.DataReceived(client, data))
    assert _status(_sent(cmds)) == (status, code)
    assert _closes(cmds)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"1ffffffffffffffff\r\nhello\r\n0\r\n\r\n", "overflows 64 bits"),
        (b"5\nhello\n0\n\n", "bare LF"),
        (b"5\r\nhelloXX0\r\n\r\n", "not followed by CRLF"),
    ],
)
def test_malformed_chunked_body_answered_400(
    server: tuple[Any, Any], data: bytes, reason: str
) -> None:
    s, client = server
    _run(s, events.Start())
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    cmds = _run(s, events.DataReceived(client, head + data))
    assert _status(_sent(cmds)) == (400, "BAD_REQUEST")
    assert reason in json.loads(_sent(cmds).partition(b"\r\n\r\n")[2])["error"]["message"]
    assert _closes(cmds)
    assert isinstance(_received(cmds)[-1], RequestProtocolError)


@pytest.mark.parametrize(
    ("mode", "line", "want"),
    [
        ("regular", b"GET /x HTTP/1.1", b""),
        ("regular", b"OPTIONS * HTTP/1.1", b""),
        ("regular", b"GET http://a.example:81/x HTTP/1.1", b"a.example:81"),
        ("upstream:http://127.0.0.1:1", b"GET /x HTTP/1.1", b""),
        ("reverse:http://127.0.0.1:1", b"GET /x HTTP/1.1", None),
    ],
)
def test_sent_authority(
    server: tuple[Any, Any], mode: str, line: bytes, want: bytes | None
) -> None:
    s, client = server
    client.proxy_mode = mode_specs.ProxyMode.parse(mode)
    _run(s, events.Start())
    got = _received(_run(s, events.DataReceived(client, line + b"\r\nHost: a\r\n\r\n")))
    assert wire.sent_authority(got[0].request) == want


@pytest.mark.parametrize(
    ("mode", "fields", "want"),
    [
        ("reverse:http://127.0.0.1:1", b"Host: a\r\n", [b"a"]),
        ("reverse:http://127.0.0.1:1", b"", []),
        ("reverse:http://127.0.0.1:1", b"Host: a\r\nhost: b c\r\n", [b"a", b"b c"]),
        ("regular", b"Host: a\r\n", None),
    ],
)
def test_sent_hosts(
    server: tuple[Any, Any], mode: str, fields: bytes, want: list[bytes] | None
) -> None:
    s, client = server
    client.proxy_mode = mode_specs.ProxyMode.parse(mode)
    _run(s, events.Start())
    got = _received(_run(s, events.DataReceived(client, b"GET /x HTTP/1.1\r\n" + fields + b"\r\n")))
    assert wire.sent_hosts(got[0].request) == want


def test_refusal_is_a_lingering_close(server: tuple[Any, Any]) -> None:
    s, client = server
    _run(s, events.Start())
    cmds = _run(s, events.DataReceived(client, b"\x00noise"))
    assert _status(_sent(cmds)) == (400, "BAD_REQUEST")
    (close,) = [c for c in cmds if isinstance(c, commands.CloseConnection)]
    assert isinstance(close, commands.CloseTcpConnection) and close.half_close
    (timer,) = [c for c in cmds if isinstance(c, commands.RequestWakeup)][-1:]
    assert wire.LINGER <= timer.delay <= wire.LINGER + wire.SPREAD_MAX
    assert _run(s, events.DataReceived(client, b"more")) == []  # read and dropped
    (full,) = _run(s, events.Wakeup(timer))
    assert type(full) is commands.CloseConnection
