"""Guards below the addon hooks: narrow patches of mitmproxy's HTTP/1 server-side reader.

Not an addon. `addons/hygiene.py` calls `install()` once and `configure()` whenever its
limits change. Everything here runs before a flow exists, so no hook could do it:

1. Unbounded request head (`Http1Server.read_headers` has `pass  # FIXME: protect against
   header size DoS`): after each read, a still-incomplete head (or data a client pipelines
   while its previous request waits for the response) longer than `max_head` bytes is
   answered 431 HEADERS_TOO_LARGE and the connection is closed.
2. No header timeout: a fresh connection must send a complete request head within
   `header_timeout` seconds, and on a kept-alive connection the head must be complete within
   `header_timeout` of its first byte; otherwise 408 REQUEST_TIMEOUT and close. Uses the layer
   timer (`commands.RequestWakeup` -> `events.Wakeup`, routed back by `HttpLayer.command_sources`);
   at most one timer per connection is outstanding. `Http1Server._handle_event` consumes every
   Wakeup itself, so `read_body`/`wait` (which raise on unexpected events) never see one.
   In regular and upstream mode no HTTP layer exists before the first byte (NextLayer waits
   for data to pick one), so `HttpProxy`/`HttpUpstreamProxy` also start a timer at connection
   start: a client that has not sent enough for NextLayer to choose a layer by then gets 408.
3. Trailers: `read_body` raises NotImplementedError on a chunked message with trailer fields
   and the client hangs. `make_body_reader` now returns a ChunkedReader that drops received
   trailer fields (allowed by RFC 9112 §7.1.2), for requests and responses alike. It also
   bounds a chunk-size line or trailer section that never ends (`max_head` bytes, then the
   usual HTTP/1 protocol error) and counts decoded body bytes.
4. Leading empty lines: h11's `maybe_extract_lines` consumes one leading CRLF and returns `[]`,
   so a request preceded by an empty line waited forever for more data. `read_headers` now
   retries after an ignored empty line (RFC 9112 §2.2), up to 16 per read, then 400.
5. Chunked request bodies over `max_body` are refused even when streamed
   (`stream_large_bodies`), where mitmproxy's own `body_size_limit` only sees buffered bodies:
   the reader stops at the limit, the client gets 413 PAYLOAD_TOO_LARGE if no byte of the
   response was sent yet (the connection is closed in any case) and the stream gets a request
   protocol error, which closes the upstream connection.
6. `_http1.make_error_response` (mitmproxy's HTML error page, used for unparseable request
   heads and client-side protocol errors) answers JSON for 400, 408, 413, 414 and 431, so the
   client sees Waypost's error shape; other statuses keep mitmproxy's page.

Error bodies here use `errors.body()` with a fresh uuid (there is no flow), with
`Content-Type: application/json` and `Connection: close`.

Patched only on mitmproxy 11.0.x and 12.x, whose code was read; on any other version
`install()` logs a WARNING that the wire guards are not active and leaves mitmproxy alone.
`install()` is idempotent per process (the state lives on mitmproxy's `_http1` module, so a
script reload, even one that re-imports this module, never wraps twice).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
from h11._readers import ChunkedReader
from mitmproxy import http
from mitmproxy import version as mitmproxy_version
from mitmproxy.connection import ConnectionState
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import RequestProtocolError

from addons import errors

try:  # mitmproxy 12: protocol errors carry an ErrorCode; 11: an HTTP status.
    from mitmproxy.proxy.layers.http._events import ErrorCode

    _TOO_LARGE: Any = ErrorCode.REQUEST_TOO_LARGE
except ImportError:
    _TOO_LARGE = 413

log = logging.getLogger("waypost.wire")

MAX_EMPTY_LINES = 16

CODES: dict[int, str] = {
    400: "BAD_REQUEST",
    408: "REQUEST_TIMEOUT",
    413: "PAYLOAD_TOO_LARGE",
    414: "URI_TOO_LONG",
    431: "HEADERS_TOO_LARGE",
}


@dataclass
class WireLimits:
    """What the patches enforce; one instance per process, updated by `configure()`."""

    max_head: int | None = None
    header_timeout: float = 0.0
    max_body: int | None = None


def supported(version: str) -> bool:
    """True for the mitmproxy lines whose HTTP/1 reader these patches were written against."""
    parts = version.split(".")
    return parts[0] == "12" or parts[:2] == ["11", "0"]


def error_bytes(status: int, message: str) -> bytes:
    """A complete HTTP/1 JSON error response for `status`, closing the connection."""
    rid = errors.new_request_id()
    resp = http.Response.make(
        status,
        errors.body(CODES.get(status, "BAD_REQUEST"), message, rid),
        {"Content-Type": "application/json", "Connection": "close", "X-Request-ID": rid},
    )
    resp.reason = HTTPStatus(status).phrase
    return http1.assemble_response(resp)


def _peer(conn: Any) -> str:
    peer = getattr(conn, "peername", None)
    return f"{peer[0]}:{peer[1]}" if peer else "?"


class LimitedChunkedReader(ChunkedReader):
    """h11's ChunkedReader that drops trailers, bounds line buffering and enforces a body limit."""

    def __init__(self, max_line: int | None) -> None:
        super().__init__()
        self.max_line = max_line
        self.limit: int | None = None
        self.total = 0
        self.over = False
        self.malformed: str | None = None

    def __call__(self, buf: Any) -> h11.Data | h11.EndOfMessage | None:
        if self.over:
            return None
        try:
            ev = super().__call__(buf)
            if ev is None and self.max_line is not None and len(buf) > self.max_line:
                raise h11.LocalProtocolError("chunk size line or trailer section too long")
        except h11.ProtocolError as e:
            # read_body closes the connection without an answer; the server side answers 400.
            self.malformed = str(e)
            raise
        if ev is None:
            return None
        if isinstance(ev, h11.Data):
            self.total += len(ev.data)
            if self.limit is not None and self.total > self.limit:
                self.over = True
                return None
            return ev
        if ev.headers:
            # RFC 9112 §7.1.2: a recipient may discard received trailer fields.
            return h11.EndOfMessage()
        return ev


class _Installed:
    """The originals and the limits, kept on mitmproxy's `_http1` module (one per process)."""

    def __init__(self) -> None:
        self.limits = WireLimits()
        server = _http1.Http1Server
        self.handle_event: Callable[..., Any] = _http1.Http1Connection._handle_event
        self.read_headers: Callable[..., Any] = server.read_headers
        self.make_body_reader: Callable[..., Any] = _http1.make_body_reader
        self.make_error_response: Callable[..., Any] = _http1.make_error_response
        self.proxy_modes = (modes.HttpProxy, modes.HttpUpstreamProxy)


def _state() -> _Installed | None:
    return getattr(_http1, "_waypost_wire", None)


def h11_vulnerable(version: str) -> bool:
    """h11 before 0.16.0 is affected by CVE-2025-43859."""
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) < (0, 16)


def install() -> bool:
    """Apply the patches once per process; returns whether the wire guards are active."""
    if _state() is not None:
        return True
    if h11_vulnerable(h11.__version__):
        log.warning(
            "h11 %s accepts any two bytes as a chunk's line ending (CVE-2025-43859, request "
            "smuggling): install h11>=0.16 (mitmproxy 11 pins an older one; scripts/setup "
            "upgrades it)",
            h11.__version__,
        )
    version = mitmproxy_version.VERSION
    server = _http1.Http1Server
    if (
        not supported(version)
        or "_handle_event" in vars(server)
        or not hasattr(h11, "LocalProtocolError")
    ):
        log.warning(
            "wire guards are not active: mitmproxy %s is not a version they were written for "
            "(11.0.x, 12.x); header size/timeout limits, trailer and empty-line fixes are off",
            version,
        )
        return False
    st = _Installed()
    _http1._waypost_wire = st  # type: ignore[attr-defined]
    server._handle_event = _server_handle_event  # type: ignore[method-assign]
    server.read_headers = _server_read_headers  # type: ignore[method-assign]
    server.body_reader = property(_get_reader, _set_reader)  # type: ignore[assignment]
    server._wp_deadline = None  # type: ignore[attr-defined]
    server._wp_timer = False  # type: ignore[attr-defined]
    for mode in st.proxy_modes:
        mode._handle_event = _proxy_mode_start  # type: ignore[method-assign]
    _http1.make_body_reader = _make_body_reader
    _http1.make_error_response = _make_error_response
    log.info("wire guards active on mitmproxy %s", version)
    return True


def configure(*, max_head: int | None, header_timeout: float, max_body: int | None) -> None:
    """Set the limits the patches enforce (no effect when they are not installed)."""
    st = _state()
    if st is not None:
        st.limits = WireLimits(max_head, header_timeout, max_body)


def limits() -> WireLimits | None:
    st = _state()
    return st.limits if st is not None else None


# --- the patches ---------------------------------------------------------------------------

Gen = Generator[commands.Command, Any, None]


def _installed() -> _Installed:
    return _http1._waypost_wire  # type: ignore[attr-defined,no-any-return]


def _make_body_reader(expected_size: int | None) -> Any:
    st = _installed()
    if expected_size is None:
        return LimitedChunkedReader(st.limits.max_head)
    return st.make_body_reader(expected_size)


def _make_error_response(status_code: int, message: str = "") -> bytes:
    st = _installed()
    if status_code not in CODES:
        return st.make_error_response(status_code, message)
    if status_code == 413 and st.limits.max_body is not None:
        message = f"The request body exceeds the limit of {st.limits.max_body} bytes."
    return error_bytes(status_code, message)


def _get_reader(self: Any) -> Any:
    return self.__dict__["body_reader"]


def _set_reader(self: Any, reader: Any) -> None:
    if isinstance(reader, LimitedChunkedReader):
        st = _state()
        reader.limit = st.limits.max_body if st is not None else None
    self.__dict__["body_reader"] = reader


def _refuse(self: Any, status: int, message: str) -> Gen:
    if self.conn.state & ConnectionState.CAN_WRITE:
        yield commands.SendData(self.conn, error_bytes(status, message))
    yield commands.CloseConnection(self.conn)
    self.state = self.done
    self._wp_deadline = None


def _server_read_headers(self: Any, event: events.Event) -> Gen:
    st = _installed()
    if not isinstance(event, events.DataReceived):
        yield from st.read_headers(self, event)
        return
    for _ in range(MAX_EMPTY_LINES + 1):
        before = len(self.buf)
        yield from st.read_headers(self, event)
        if self.state != self.read_headers or not self.buf or len(self.buf) >= before:
            return
        # h11 consumed one leading empty line and stopped (RFC 9112 §2.2: ignore it).
        event = events.DataReceived(self.conn, b"")
    log.warning("rule=empty_lines peer=%s: too many empty lines before a request", _peer(self.conn))
    yield from _refuse(self, 400, "Too many empty lines before the request line.")


def _server_handle_event(self: Any, event: events.Event) -> Gen:
    st = _installed()
    if isinstance(event, events.Wakeup):
        yield from _on_wakeup(self, st.limits)
        return
    yield from st.handle_event(self, event)
    lim = st.limits
    state = self.state
    if state == self.read_headers:
        if lim.max_head is not None and len(self.buf) > lim.max_head:
            log.warning(
                "rule=max_header_size peer=%s: request head over %d bytes",
                _peer(self.conn),
                lim.max_head,
            )
            yield from _refuse(self, 431, f"The request head exceeds {lim.max_head} bytes.")
            return
        if (
            lim.header_timeout > 0
            and self._wp_deadline is None
            and not isinstance(event, events.ConnectionClosed)
            and (
                isinstance(event, events.Start)
                or self.buf
                or (isinstance(event, events.DataReceived) and event.data)
            )
        ):
            self._wp_deadline = time.monotonic() + lim.header_timeout
            if not self._wp_timer:
                self._wp_timer = True
                yield commands.RequestWakeup(lim.header_timeout)
        return
    self._wp_deadline = None
    if state == self.wait:
        if lim.max_head is not None and len(self.buf) > lim.max_head:
            log.warning("rule=max_pipelined peer=%s: pipelined data over limit", _peer(self.conn))
            if self.response is None:
                yield from _refuse(self, 431, f"Pipelined data exceeds {lim.max_head} bytes.")
            else:
                yield commands.CloseConnection(self.conn)
                self.state = self.done
    elif state == self.read_body:
        reader = self.__dict__.get("body_reader")
        if isinstance(reader, LimitedChunkedReader) and reader.malformed is not None:
            log.warning("rule=chunked_framing peer=%s: %s", _peer(self.conn), reader.malformed)
            if self.response is None:
                # read_body has yielded CloseConnection already; the client's writer is still
                # open until the connection task unwinds, so these bytes go out first.
                message = f"Malformed chunked request body: {reader.malformed}"
                yield commands.SendData(self.conn, error_bytes(400, message))
            self.state = self.done
        elif isinstance(reader, LimitedChunkedReader) and reader.over:
            log.warning(
                "rule=max_body_size peer=%s: chunked request body over %s bytes",
                _peer(self.conn),
                reader.limit,
            )
            message = f"The request body exceeds the limit of {reader.limit} bytes."
            if self.response is None and self.conn.state & ConnectionState.CAN_WRITE:
                yield commands.SendData(self.conn, error_bytes(413, message))
            yield commands.CloseConnection(self.conn)
            self.state = self.done
            yield ReceiveHttp(RequestProtocolError(self.stream_id, message, _TOO_LARGE))


def _on_wakeup(self: Any, lim: WireLimits) -> Gen:
    self._wp_timer = False
    deadline = self._wp_deadline
    if deadline is None or self.state != self.read_headers:
        return
    left = deadline - time.monotonic()
    if left > 0.005:
        self._wp_timer = True
        yield commands.RequestWakeup(left)
        return
    log.warning(
        "rule=header_timeout peer=%s: no complete request head within %gs (%d bytes received)",
        _peer(self.conn),
        lim.header_timeout,
        len(self.buf),
    )
    yield from _refuse(
        self, 408, f"The request head was not received within {lim.header_timeout:g}s."
    )


def _proxy_mode_start(self: Any, event: events.Event) -> Gen:
    """`HttpProxy`/`HttpUpstreamProxy._handle_event` plus a first-data timer."""
    if not isinstance(event, events.Start):
        raise AssertionError(f"Unexpected event: {event}")
    child = layer.NextLayer(self.context)
    timeout = _installed().limits.header_timeout
    if timeout <= 0:
        self._handle_event = child.handle_event
        yield from child.handle_event(event)
        return
    timer = commands.RequestWakeup(timeout)

    def handle(ev: events.Event) -> Gen:
        if isinstance(ev, events.Wakeup) and ev.command is timer:
            return _first_data_timeout(self, child, timeout)
        return child.handle_event(ev)

    self._handle_event = handle
    yield from child.handle_event(event)
    yield timer


def _first_data_timeout(self: Any, child: layer.NextLayer, timeout: float) -> Gen:
    client = self.context.client
    if child.layer is not None or not client.state & ConnectionState.CAN_WRITE:
        return
    log.warning(
        "rule=header_timeout peer=%s: no request within %gs of connecting", _peer(client), timeout
    )
    yield commands.SendData(
        client, error_bytes(408, f"No request was received within {timeout:g}s.")
    )
    yield commands.CloseConnection(client)
