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
3. Chunked bodies: `make_body_reader` returns Waypost's own strict reader
   (`LimitedChunkedReader`), for requests and responses alike, on every h11 version: h11 < 0.16
   takes any two bytes after a chunk's data as its CRLF (CVE-2025-43859, which mitmproxy 11's
   pin brings on a plain `pip install`), and every h11 waits forever on a bare-LF chunk line
   or a chunk size beyond 64 bits. Those are refused at once (a request gets 400 and the
   connection is closed). Trailer fields are dropped (RFC 9112 §7.1.2; h11's reader made
   `read_body` raise NotImplementedError and the client hang); a chunk-size line or trailer
   section that never ends is bounded (`max_head` bytes); decoded body bytes are counted.
4. Leading empty lines: h11's `maybe_extract_lines` consumes one leading CRLF and returns `[]`,
   so a request preceded by an empty line waited forever for more data. `read_headers` now
   retries after an ignored empty line (RFC 9112 §2.2), up to 16 per read, then 400.
5. Chunked request bodies over `max_body` are refused even when streamed
   (`stream_large_bodies`), where mitmproxy's own `body_size_limit` only sees buffered bodies:
   the reader stops at the limit, the client gets 413 PAYLOAD_TOO_LARGE if no byte of the
   response was sent yet (and a lingering close; a plain close if the response had started)
   and the stream gets a request protocol error, which closes the upstream connection.
6. Incomplete heads that can never become a request are refused at once instead of waiting
   for the header timeout (`check_head`): control bytes (4 KiB of noise), a malformed request
   line, a method over 32 bytes are 400; a request line too long for `max_url` bytes of target
   is 414 (before the head cap's 431, which would otherwise answer a 1 MiB URL). A complete
   request line is held to the same single-space shape (`check_line_words`): mitmproxy splits
   it on any run of whitespace, so `GET / HTTP/1.1 ` was accepted in one read and refused in two.
7. What mitmproxy rewrites before any hook: it drops an absolute-form request's authority and
   fills an origin-form one's destination from Host, and on a reverse listener replaces Host
   with the backend's (unless keep_host_header). The reader notes what a forward-mode request
   outside a CONNECT tunnel named (`sent_authority`), so hygiene can count the whole target
   against `max_url_length` and refuse origin-form requests on a forward listener (and the
   proxy's endpoints know one is theirs whatever its Host), and a reverse-mode request's Host
   fields (`sent_hosts`), so hygiene refuses a missing, duplicate or invalid one there too.

The refusals are written by mitmproxy's own `_http1.make_error_response`, which
`addons/errors.py` makes Waypost's JSON error (`install_error_page`; hygiene installs both),
with `Connection: close`. The head refusals (1, 2, 4, 6) and the body-limit refusal (5) close
lingeringly: a half-close at once (the client sees the end of the answer), what the client
still sends discarded, a full close `LINGER` seconds later. Each refusal is logged with
`rule=` and the peer's IP (`kernel.net.peer_ip`, the address every other log line names the
client by).

Patched through `addons/kernel/patching.py`, so only on the mitmproxy versions it lists; on any
other `install()` logs a WARNING that the wire guards are not active and leaves mitmproxy
alone. This module is imported once per process: the limits live here, and `install()` is
idempotent.
"""

from __future__ import annotations

import logging
import random
import re
import time
import weakref
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, NoReturn

import h11
from h11._receivebuffer import ReceiveBuffer
from mitmproxy import http
from mitmproxy import version as mitmproxy_version
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events, layer, mode_specs
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import HttpLayer, HTTPMode, _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import RequestHeaders, RequestProtocolError

from addons.kernel import patching
from addons.kernel.net import peer_ip

try:  # mitmproxy 12: protocol errors carry an ErrorCode; 11: an HTTP status.
    from mitmproxy.proxy.layers.http._events import ErrorCode

    _TOO_LARGE: Any = ErrorCode.REQUEST_TOO_LARGE
except ImportError:
    _TOO_LARGE = 413

log = logging.getLogger("waypost.wire")

MAX_EMPTY_LINES = 16
LINGER = 2.0  # seconds a refused client may go on sending before its connection is closed
SPREAD = 0.05  # of a timer's length, at most SPREAD_MAX seconds: see _spread
SPREAD_MAX = 0.25


@dataclass
class WireLimits:
    """What the patches enforce; one instance per process, updated by `configure()`."""

    max_head: int | None = None
    max_url: int | None = None
    header_timeout: float = 0.0
    max_body: int | None = None


_limits = WireLimits()  # one per process: this module is imported once
_sent_authority: weakref.WeakKeyDictionary[http.Request, bytes] = weakref.WeakKeyDictionary()
_sent_hosts: weakref.WeakKeyDictionary[http.Request, list[bytes]] = weakref.WeakKeyDictionary()
_FORWARD = (mode_specs.RegularMode, mode_specs.UpstreamMode)


# RFC 9112 §7.1: chunk-size [ chunk-ext ] CRLF; an extension holds no CTL except HTAB.
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]+)[ \t]*(?:;[^\x00-\x08\x0a-\x1f\x7f]*)?\r\n")
_MAX_CHUNK = (1 << 63) - 1  # what a signed 64-bit length holds: backends overflow beyond
# Methods are short tokens (the longest registered, UPDATEREDIRECTREF, has 17 bytes).
MAX_METHOD = 32
_LINE_SLACK = MAX_METHOD + len("  HTTP/1.1\r")  # a request line around its target
# Bytes no request head may hold (CR, LF and HTAB aside): an incomplete head with one is noise.
_HEAD_CTL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# The shape of a request line (RFC 9112 §3); the parser and hygiene check it strictly later.
_REQUEST_LINE = re.compile(
    rb"[!#$%%&'*+\-.^_`|~0-9A-Za-z]{1,%d} [^ ]+ HTTP/[0-9.]+\r?" % MAX_METHOD
)
# Three words separated by single spaces, as in `_REQUEST_LINE`: mitmproxy splits a complete
# request line on any run of whitespace (bytes.split) and would accept `GET  /  HTTP/1.1 `.
_LINE_WORDS = re.compile(rb"[^\s]+ [^\s]+ [^\s]+\r?")


class LimitedChunkedReader:
    """A strict chunked body reader on h11's ReceiveBuffer, the same on every h11 version.

    h11 before 0.16 accepts any two bytes after a chunk's data as its CRLF (CVE-2025-43859),
    and every h11 waits forever for a CRLF that a bare-LF client never sends, or for the data
    of a chunk size beyond 64 bits. This reader refuses all three at once (h11.LocalProtocolError),
    drops trailer fields (RFC 9112 §7.1.2), bounds a chunk-size line or trailer section to
    `max_line` bytes and counts decoded body bytes against `limit`.
    """

    def __init__(self, max_line: int | None) -> None:
        self.max_line = max_line
        self.limit: int | None = None
        self.total = 0
        self.over = False
        self.malformed: str | None = None
        self._in_chunk = 0
        self._footer = b""  # what must follow the chunk's data: the rest of its CRLF
        self._trailer: int | None = None  # bytes of trailer section read, once in it

    def __call__(self, buf: ReceiveBuffer) -> h11.Data | h11.EndOfMessage | None:
        if self.over:
            return None
        try:
            ev = self._read(buf)
        except h11.ProtocolError as e:
            # read_body closes the connection without an answer; the server side answers 400.
            self.malformed = str(e)
            raise
        if isinstance(ev, h11.Data):
            self.total += len(ev.data)
            if self.limit is not None and self.total > self.limit:
                self.over = True
                return None
        return ev

    def read_eof(self) -> NoReturn:
        raise h11.RemoteProtocolError(
            "peer closed connection without sending complete message body (incomplete chunked read)"
        )

    def _read(self, buf: ReceiveBuffer) -> h11.Data | h11.EndOfMessage | None:
        if self._footer:
            got = buf.maybe_extract_at_most(len(self._footer))
            if got is None:
                return None
            if got != self._footer[: len(got)]:
                raise h11.LocalProtocolError(f"chunk data not followed by CRLF: {bytes(got)!r}")
            self._footer = self._footer[len(got) :]
            if self._footer:
                return None
        while self._trailer is not None:
            line = self._line(buf)
            if line is None:
                return None
            if line == b"\r\n":
                return h11.EndOfMessage()
            self._trailer += len(line)
            if b"\r" in line[:-2] or b"\n" in line[:-2] or self._too_long(self._trailer):
                raise h11.LocalProtocolError("malformed or oversized trailer section")
        if not self._in_chunk:
            line = self._line(buf)
            if line is None:
                return None
            m = _CHUNK_LINE.fullmatch(line)
            if not m:
                raise h11.LocalProtocolError(f"illegal chunk header: {bytes(line[:64])!r}")
            size = int(m.group(1), 16)
            if size > _MAX_CHUNK:
                raise h11.LocalProtocolError("chunk size overflows 64 bits")
            if not size:
                self._trailer = 0
                return self._read(buf)
            self._in_chunk = size
        data = buf.maybe_extract_at_most(self._in_chunk)
        if data is None:
            return None
        self._in_chunk -= len(data)
        if not self._in_chunk:
            self._footer = b"\r\n"
        return h11.Data(data=data)

    def _line(self, buf: ReceiveBuffer) -> bytearray | None:
        """The next CRLF-terminated line; a bare LF or an overlong line is refused now."""
        line = buf.maybe_extract_next_line()
        if line is None:
            pending = bytes(buf)  # no CRLF in it, so at most max_line bytes (checked below)
            if b"\n" in pending:
                raise h11.LocalProtocolError("chunk line ends with a bare LF, not CRLF")
            if self._too_long(len(pending)):
                raise h11.LocalProtocolError("chunk size line or trailer section too long")
        elif self._too_long(len(line)):
            raise h11.LocalProtocolError("chunk size line or trailer section too long")
        return line

    def _too_long(self, n: int) -> bool:
        return self.max_line is not None and n > self.max_line


def check_head(pending: bytes, max_url: int | None) -> tuple[int, str] | None:
    """Status and reason to refuse an incomplete request head now, or None while it may still
    become a request: noise (control bytes, a malformed request line, an overlong method) is
    400, a request line too long for `max_url` bytes of target is 414 (before the head cap's
    431, which would otherwise answer a long URL)."""
    if _HEAD_CTL.search(pending):
        return 400, "The request head contains control characters."
    line, lf, _ = pending.lstrip(b"\r\n").partition(b"\n")
    if len(line) > MAX_METHOD and b" " not in line[: MAX_METHOD + 1]:
        return 400, f"The request method is longer than {MAX_METHOD} bytes."
    if max_url is not None and len(line) > max_url + _LINE_SLACK:
        return 414, f"The request target exceeds {max_url} bytes."
    if lf and not _REQUEST_LINE.fullmatch(line):
        return 400, "The request line is malformed."
    return None


def check_line_words(pending: bytes) -> str | None:
    """Why a complete request line (the first line of `pending`) must be refused with 400
    before mitmproxy parses it leniently, or None: `check_head` refuses the same line while
    the head is incomplete, so the answer does not depend on how the bytes were split."""
    line, lf, _ = pending.lstrip(b"\r\n").partition(b"\n")
    if lf and not _LINE_WORDS.fullmatch(line):
        return "The request line is malformed."
    return None


def h11_vulnerable(version: str) -> bool:
    """h11 before 0.16.0 is affected by CVE-2025-43859."""
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) < (0, 16)


def install() -> bool:
    """Apply the patches once per process; returns whether the wire guards are active."""
    if installed():
        return True
    if not patching.install(
        *PATCHES,
        unchecked="the wire guards are not active (header size/timeout limits, trailer and "
        "empty-line fixes, strict chunked framing are off)",
    ):
        if h11_vulnerable(h11.__version__):
            log.error(
                "h11 %s accepts any two bytes as a chunk's line ending (CVE-2025-43859, request "
                "smuggling) and the wire guards that replace its chunked reader are off: "
                "install h11>=0.16",
                h11.__version__,
            )
        return False
    if h11_vulnerable(h11.__version__):
        log.info(
            "h11 %s: its chunked reader (CVE-2025-43859) is not used, the wire guards read "
            "chunked bodies strictly",
            h11.__version__,
        )
    log.info("wire guards active on mitmproxy %s", mitmproxy_version.VERSION)
    return True


def installed() -> bool:
    return patching.installed(PATCHES[0].key)


def configure(
    *,
    max_head: int | None,
    header_timeout: float,
    max_body: int | None,
    max_url: int | None = None,
) -> None:
    """Set the limits the patches enforce (no effect on mitmproxy when they are not installed)."""
    _limits.max_head = max_head
    _limits.max_url = max_url
    _limits.header_timeout = header_timeout
    _limits.max_body = max_body


def limits() -> WireLimits | None:
    return _limits if installed() else None


# --- the patches ---------------------------------------------------------------------------

Gen = Generator[commands.Command, Any, None]


def _make_body_reader(expected_size: int | None) -> Any:
    if expected_size is None:
        return LimitedChunkedReader(_limits.max_head)
    return _make_body_reader.__waypost_wrapped__(expected_size)  # type: ignore[attr-defined]


def _get_reader(self: Any) -> Any:
    return self.__dict__["body_reader"]


def _set_reader(self: Any, reader: Any) -> None:
    if isinstance(reader, LimitedChunkedReader):
        reader.limit = _limits.max_body
    self.__dict__["body_reader"] = reader


def _spread(seconds: float) -> commands.RequestWakeup:
    """A timer of `seconds` plus up to 5% (at most 250 ms). Connections that a storm opened in
    the same instant would otherwise time out in the same loop turn, all their 408s and closes
    run one after the other there, and every other connection's next step waits behind them
    (p99 of unrelated requests went from 7 to 100+ ms when 200 slowloris connections expired)."""
    return commands.RequestWakeup(seconds + random.uniform(0, min(SPREAD_MAX, seconds * SPREAD)))


def _refuse(self: Any, status: int, message: str) -> Gen:
    self.state = self.done
    self._wp_deadline = None
    if not self.conn.state & ConnectionState.CAN_WRITE:
        yield commands.CloseConnection(self.conn)
        return
    yield commands.SendData(self.conn, _http1.make_error_response(status, message))
    # A lingering close (as nginx does): half-close now and close fully after LINGER seconds.
    # The client reads the answer before a reset can discard it, and mitmproxy 12 leaves the
    # socket open when a full close is ordered while the client is still sending (seen with
    # a 1 MiB request line).
    yield commands.CloseTcpConnection(self.conn, half_close=True)
    self._wp_linger = True
    yield _spread(LINGER)


def _server_read_headers(self: Any, event: events.Event) -> Gen:
    read_headers = _server_read_headers.__waypost_wrapped__  # type: ignore[attr-defined]
    if not isinstance(event, events.DataReceived):
        yield from read_headers(self, event)
        return
    if self.buf and (reason := check_line_words(bytes(self.buf))):
        log.warning("rule=malformed_head peer=%s: %s", peer_ip(self.conn), reason)
        yield from _refuse(self, 400, reason)
        return
    for _ in range(MAX_EMPTY_LINES + 1):
        before = len(self.buf)
        yield from _note_request(self, read_headers(self, event))
        if self.state != self.read_headers or not self.buf or len(self.buf) >= before:
            return
        # h11 consumed one leading empty line and stopped (RFC 9112 §2.2: ignore it).
        event = events.DataReceived(self.conn, b"")
    log.warning(
        "rule=empty_lines peer=%s: too many empty lines before a request", peer_ip(self.conn)
    )
    yield from _refuse(self, 400, "Too many empty lines before the request line.")


def _note_request(self: Any, cmds: Gen) -> Gen:
    """Remember what mitmproxy rewrites before any hook runs: the authority a forward-mode
    request outside a CONNECT tunnel named on its request line (dropped; an origin-form
    request's destination is filled from Host) and a reverse-mode request's Host fields
    (replaced by the backend's)."""
    for cmd in cmds:  # read_headers' commands take no reply, so nothing is sent back
        if isinstance(cmd, ReceiveHttp) and isinstance(cmd.event, RequestHeaders):
            request = cmd.event.request
            mode = self.context.client.proxy_mode
            if isinstance(mode, _FORWARD):
                if not _in_tunnel(self):
                    _sent_authority[request] = request.data.authority
            elif isinstance(mode, mode_specs.ReverseMode):
                fields = request.data.headers.fields
                _sent_hosts[request] = [v for n, v in fields if n.lower() == b"host"]
        yield cmd


def _in_tunnel(server: Any) -> bool:
    """Whether an Http1Server reads requests inside a CONNECT tunnel: its HttpLayer, the
    nearest below it in its context, is then transparent (outside one, regular or upstream)."""
    for below in reversed(server.context.layers):
        if isinstance(below, HttpLayer):
            return below.mode is HTTPMode.transparent
    return False


def sent_authority(request: http.Request) -> bytes | None:
    """The authority a forward-mode HTTP/1 request outside a CONNECT tunnel named on its
    request line: b"" for the origin-form `GET /path` or asterisk-form `OPTIONS *` (only Host
    says where it goes), None when not known (inside a tunnel, another mode, HTTP/2, or the
    guards are not installed)."""
    return _sent_authority.get(request)


def sent_hosts(request: http.Request) -> list[bytes] | None:
    """The Host field values a reverse-mode HTTP/1 request was sent with (mitmproxy replaces
    them with the backend's authority unless keep_host_header), None when not known (another
    mode, HTTP/2, or the guards are not installed)."""
    return _sent_hosts.get(request)


def _server_handle_event(self: Any, event: events.Event) -> Gen:
    lim = _limits
    if isinstance(event, events.Wakeup):
        yield from _on_wakeup(self, lim)
        return
    if self._wp_linger and isinstance(event, events.DataReceived):
        return  # refused: what the client still sends is discarded, not buffered
    yield from _server_handle_event.__waypost_wrapped__(self, event)  # type: ignore[attr-defined]
    state = self.state
    if state == self.read_headers:
        if isinstance(event, events.DataReceived) and event.data and self.buf:
            # Without this, noise waits for the head timeout or the size cap with no answer.
            refused = check_head(bytes(self.buf), lim.max_url)
            if refused is not None:
                status, reason = refused
                rule = "max_url_length" if status == 414 else "malformed_head"
                log.warning("rule=%s peer=%s: %s", rule, peer_ip(self.conn), reason)
                yield from _refuse(self, status, reason)
                return
        if lim.max_head is not None and len(self.buf) > lim.max_head:
            log.warning(
                "rule=max_header_size peer=%s: request head over %d bytes",
                peer_ip(self.conn),
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
                yield _spread(lim.header_timeout)
        return
    self._wp_deadline = None
    if state == self.wait:
        if lim.max_head is not None and len(self.buf) > lim.max_head:
            log.warning("rule=max_pipelined peer=%s: pipelined data over limit", peer_ip(self.conn))
            if self.response is None:
                yield from _refuse(self, 431, f"Pipelined data exceeds {lim.max_head} bytes.")
            else:
                yield commands.CloseConnection(self.conn)
                self.state = self.done
    elif state == self.read_body:
        reader = self.__dict__.get("body_reader")
        if isinstance(reader, LimitedChunkedReader) and reader.malformed is not None:
            log.warning("rule=chunked_framing peer=%s: %s", peer_ip(self.conn), reader.malformed)
            if self.response is None:
                # read_body has yielded CloseConnection already; the client's writer is still
                # open until the connection task unwinds, so these bytes go out first.
                message = f"Malformed chunked request body: {reader.malformed}"
                yield commands.SendData(self.conn, _http1.make_error_response(400, message))
            self.state = self.done
        elif isinstance(reader, LimitedChunkedReader) and reader.over:
            log.warning(
                "rule=max_body_size peer=%s: chunked request body over %s bytes",
                peer_ip(self.conn),
                reader.limit,
            )
            message = f"The request body exceeds the limit of {reader.limit} bytes."
            if self.response is None:
                # Lingering, as the head refusals: mitmproxy 12 left a socket ordered closed
                # open for seconds while the client was still sending its body.
                yield from _refuse(self, 413, message)
            else:
                yield commands.CloseConnection(self.conn)
                self.state = self.done
            yield ReceiveHttp(RequestProtocolError(self.stream_id, message, _TOO_LARGE))


def _on_wakeup(self: Any, lim: WireLimits) -> Gen:
    if self._wp_linger:
        self._wp_linger = False
        if self.conn.state is not ConnectionState.CLOSED:
            yield commands.CloseConnection(self.conn)
        return
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
        peer_ip(self.conn),
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
    timeout = _limits.header_timeout
    if timeout <= 0:
        self._handle_event = child.handle_event
        yield from child.handle_event(event)
        return
    timer = _spread(timeout)

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
        "rule=header_timeout peer=%s: no request within %gs of connecting", peer_ip(client), timeout
    )
    yield commands.SendData(
        client, _http1.make_error_response(408, f"No request was received within {timeout:g}s.")
    )
    yield commands.CloseConnection(client)


def _http_proxy_start(self: Any, event: events.Event) -> Gen:
    return _proxy_mode_start(self, event)


def _upstream_proxy_start(self: Any, event: events.Event) -> Gen:
    return _proxy_mode_start(self, event)


_HEAD = "no hook runs before a request head is complete"
PATCHES = (
    patching.Patch(
        "wire.handle_event",
        _http1.Http1Server,
        "_handle_event",
        _server_handle_event,
        f"{_HEAD}: head size cap, header timeout, pipelined data, chunked body limit",
    ),
    patching.Patch(
        "wire.read_headers",
        _http1.Http1Server,
        "read_headers",
        _server_read_headers,
        f"{_HEAD}: a request after empty lines waits forever (h11 eats one per read)",
    ),
    patching.Patch(
        "wire.body_reader",
        _http1.Http1Server,
        "body_reader",
        property(_get_reader, _set_reader),
        "no hook sees a chunked body as it is read: its limit is set on the reader",
    ),
    patching.Patch("wire.deadline", _http1.Http1Server, "_wp_deadline", None, "header timer state"),
    patching.Patch("wire.timer", _http1.Http1Server, "_wp_timer", False, "header timer state"),
    patching.Patch("wire.linger", _http1.Http1Server, "_wp_linger", False, "lingering close"),
    patching.Patch(
        "wire.http_proxy_start",
        modes.HttpProxy,
        "_handle_event",
        _http_proxy_start,
        f"{_HEAD}, nor before the first byte of a regular-mode connection",
    ),
    patching.Patch(
        "wire.upstream_proxy_start",
        modes.HttpUpstreamProxy,
        "_handle_event",
        _upstream_proxy_start,
        f"{_HEAD}, nor before the first byte of an upstream-mode connection",
    ),
    patching.Patch(
        "wire.make_body_reader",
        _http1,
        "make_body_reader",
        _make_body_reader,
        "no hook sees chunk framing: trailers raise NotImplementedError, lines are unbounded",
    ),
)
