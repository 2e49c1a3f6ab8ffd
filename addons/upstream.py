"""Upstream failures as JSON errors: connect and read timeouts, 502/504 instead of HTML pages.

mitmproxy answers a failed upstream connection, a dead backend, an oversized body or a
malformed request with its own `text/html` page. This addon turns every such answer into the
Waypost JSON error (`addons/errors.py`) and adds the two timeouts mitmproxy lacks:

- connect refused, unreachable, DNS failure, backend closed or sent garbage -> 502
  `BACKEND_UNREACHABLE`; our connect/read timeouts (and an OS connect timeout) -> 504
  `BACKEND_TIMEOUT`; `body_size_limit` on the request -> 413 `PAYLOAD_TOO_LARGE`; a malformed
  request -> 400 `BAD_REQUEST`; the self-connect guard ("Request destination unknown": the
  request is addressed to the proxy itself and no local endpoint answered) -> 502
  `BACKEND_UNREACHABLE`, the status mitmproxy always sent, so clients and probes see no change
  of status, only of body. Any other status -> the code with that status, else
  `INTERNAL_ERROR` with the status kept.
- A CONNECT whose upstream connect fails or times out gets the same JSON 502/504.

Each failure is recorded in `record(flow)` (`error_code`, `backend_error`: a short
reason such as `connection_refused`, `dns_failure`, `connect_timeout`, `read_timeout`,
`closed`, `invalid_response`, `self_connect`) and logged once at WARNING with host:port.

Hooks: `server_connect`/`server_connected`/`server_connect_error` (connect timer), `running`
(read-timeout sweep), `request` (starts the read timeout), `response`/`error` (end it; `error`
records and logs the failure), `http_connect_error` (CONNECT failures).

Options:
- `upstream_connect_timeout` (str, "10s"): TCP connect (DNS included) to the origin.
- `upstream_read_timeout` (str, "60s"): wait for response headers after the request, and for
  each next byte of the response body. A routing rule's `timeout` (`record(flow)
  ["read_timeout"]`, set by the router) overrides it per request (checked at the sweep's
  granularity: read_timeout/10, 50 ms to 1 s).

How the timeouts work, without patching:
- Connect: `ConnectionHandler.open_connection` runs the `server_connect` hook inside the very
  task that then awaits `asyncio.open_connection`. We remember that task and, on expiry,
  cancel it with our message; mitmproxy's own `except (OSError, CancelledError)` turns that
  into the connection error (`str(CancelledError(msg)) == msg`), fires `server_connect_error`
  and answers the flow. We cancel only inside the connect window: after
  `Server.timestamp_start` is set (mitmproxy holds a per-address semaphore before that) and
  before `timestamp_tcp_setup` is.
- Read: when the request is complete (`request` hook) the flow joins a table that a task
  sweeps every read_timeout/10 (50 ms to 1 s); on expiry we close the flow's server
  connection through the client's `ConnectionHandler` (`Proxyserver.connections[client.id]`,
  `close_connection`, exactly what the layer's own `CloseConnection` command does). mitmproxy
  then raises its own "server closed connection" error, which the rewrite below answers
  with 504 because the flow's metadata says it timed out. While a response body is being
  received, "no byte for this long" uses the client connection's activity clock
  (`timeout_watchdog.last_activity`): on an HTTP/2 client connection with several streams
  another stream's traffic can delay the timeout, never cause one. With an HTTP/2 upstream
  (only over intercepted TLS) closing the connection ends every stream on it.

The patches (through `addons/kernel/patching.py`: only on the mitmproxy versions it checked,
a WARNING and no patch on any other; undone in `done`):
- `proxy/layers/http/_http1.py`: `Http1Server.send` for `ResponseProtocolError` builds the JSON
  body (`errors.error_page` with the flow) instead of HTML, and errors.py's error page replaces
  the module function `make_error_response` (also used by `read_headers` for unparsable
  requests). The flow comes from our `error` hook, which mitmproxy runs
  before it sends the error (`HttpStream.handle_protocol_error`, `check_body_size`); the
  flow is matched to the HTTP/1 connection by `flow.request is server.request`.
  11.0.2 carries an int status in `event.code` (444 = no response); 12.3.1 an `ErrorCode`
  with `.http_status_code()` (None = no response).
- `proxy/layers/http/_http2.py`: `Http2Server._handle_event` for `ResponseProtocolError` sends
  the same JSON answer (`errors.error_response` with the flow, so a read timeout is 504) as
  HTTP/2 frames where mitmproxy inlines its HTML page; the same conditions as its own branch
  (11.0.2 and 12.3.1): stream open, no headers sent yet, a status to send. Every other case
  (a stream reset) stays mitmproxy's. The flow is the one our `error` hook saw last on that
  client connection (the layer is paused during the hook, so no other stream's error comes
  between) if its error is the message being sent.
Not rewritten: HTTP/3 client connections (h3 reverse listeners) still get mitmproxy's HTML
error page (`_http3.py` inlines it) with mitmproxy's status.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any

from mitmproxy import connection, ctx, http
from mitmproxy import flow as mflow
from mitmproxy.proxy import commands, server_hooks
from mitmproxy.proxy.layers.http import ResponseProtocolError, _http1, _http2

from addons import errors
from addons.errors import CONNECT_TIMEOUT_MARK, Failure, classify
from addons.kernel import patching, units
from addons.kernel.options import Option, declare, duration, spawn
from addons.kernel.record import record

log = logging.getLogger("waypost.upstream")

# Flows whose error our `error` hook saw, by client connection id, for the HTTP/1 error writer.
_ERRORED: weakref.WeakValueDictionary[str, http.HTTPFlow] = weakref.WeakValueDictionary()


def read_deadline(
    timeout: float,
    request_end: float,
    tcp_setup: float | None,
    headers_received: bool,
    last_activity: float,
) -> float | None:
    """When a flow's read timeout expires (epoch seconds); None while it is still connecting.

    Before the response headers: `timeout` after the request was complete and the connection
    up. During the body: `timeout` after the connection's last activity.
    """
    if headers_received:
        return last_activity + timeout
    if tcp_setup is None:
        return None
    return max(request_end, tcp_setup) + timeout


def event_status(code: Any) -> int | None:
    """The status mitmproxy would answer for a protocol error's `code`; None = no response."""
    if isinstance(code, int):  # mitmproxy 11: the status itself, 444 = send nothing
        return None if code == 444 else code
    return code.http_status_code()  # mitmproxy 12: ErrorCode


# --- the patch ------------------------------------------------------------------------------


def _send(self: _http1.Http1Server, event: Any) -> Any:
    if isinstance(event, ResponseProtocolError):
        return _send_error(self, event)
    return _send.__waypost_wrapped__(self, event)  # type: ignore[attr-defined]


def _send_error(self: _http1.Http1Server, event: ResponseProtocolError) -> Any:
    # Same as Http1Server.send's ResponseProtocolError branch in 11.0.2 and 12.3.1, JSON body.
    if not (self.conn.state & connection.ConnectionState.CAN_WRITE):
        return
    status = event_status(event.code)
    if not self.response and status is not None:
        flow = _ERRORED.pop(self.conn.id, None)
        if flow is not None and flow.request is not self.request:
            flow = None
        yield commands.SendData(self.conn, errors.error_page(status, event.message, flow))
    yield commands.CloseConnection(self.conn)


SEND = patching.Patch(
    key="upstream.send",
    target=_http1.Http1Server,
    name="send",
    replacement=_send,
    missing="the error hook cannot change the error page mitmproxy then writes for a failed "
    "upstream (`ResponseProtocolError`): it is not the flow's response",
)


def _h2_handle_event(self: _http2.Http2Server, event: Any) -> Any:
    if isinstance(event, ResponseProtocolError) and _h2_send_error(self, event):
        yield commands.SendData(self.conn, self.h2_conn.data_to_send())
        return
    yield from _h2_handle_event.__waypost_wrapped__(self, event)  # type: ignore[attr-defined]


# Connection-specific fields HTTP/2 forbids (RFC 9113 8.2.2); make() adds none of them today.
_H2_FORBIDDEN = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding"})


def _h2_send_error(self: _http2.Http2Server, event: ResponseProtocolError) -> bool:
    """Queue the JSON error answer on the stream, as mitmproxy's own branch would queue its
    HTML page (11.0.2 and 12.3.1); False when that branch would reset the stream instead."""
    status = event_status(event.code)
    if status is None or self.is_closed(event.stream_id):
        return False
    if not self.is_open_for_us(event.stream_id):
        return False
    if self.h2_conn.streams[event.stream_id].state_machine.headers_sent:
        return False
    flow = _ERRORED.pop(self.conn.id, None)
    # HttpStream.handle_protocol_error sets the flow's error to the message it then sends: a
    # flow left from another stream (an error hook with no page after it) does not match.
    if flow is not None and (flow.error is None or flow.error.msg != event.message):
        flow = None
    resp = errors.error_response(status, event.message, flow)
    fields = [(b":status", b"%d" % resp.status_code)]
    fields += [
        (k.lower(), v)
        for k, v in resp.headers.fields
        if k.lower().decode("latin-1") not in _H2_FORBIDDEN
    ]
    self.h2_conn.send_headers(event.stream_id, fields)
    self.h2_conn.send_data(event.stream_id, resp.content or b"", end_stream=True)
    return True


H2_SEND = patching.Patch(
    key="upstream.h2_send",
    target=_http2.Http2Server,
    name="_handle_event",
    replacement=_h2_handle_event,
    missing="the error hook cannot change the HTML error page mitmproxy's HTTP/2 server "
    "writes for a failed upstream (`ResponseProtocolError`): it is built inline, not the "
    "flow's response",
)


def install_patch() -> bool:
    """Patch mitmproxy's HTTP/1 and HTTP/2 error responses; idempotent. False if the version
    is unchecked."""
    unchecked = "its own error pages stay HTML"
    return patching.install(SEND, H2_SEND, unchecked=unchecked) and errors.install_error_page(
        "upstream"
    )


def uninstall_patch() -> None:
    patching.uninstall(SEND.key, H2_SEND.key)
    errors.uninstall_error_page("upstream")


# --- the addon ------------------------------------------------------------------------------


OPTIONS: tuple[Option, ...] = (
    Option(
        "upstream_connect_timeout",
        str,
        "10s",
        "How long the proxy waits for the TCP connection to an origin (DNS lookup included), "
        "for plain HTTP requests and CONNECT tunnels alike, e.g. 10s or 500ms. When it "
        "expires the client gets 504 BACKEND_TIMEOUT. 0 disables the timeout.",
    ),
    Option(
        "upstream_read_timeout",
        str,
        "60s",
        "How long the proxy waits, once the request is sent, for the origin's response "
        "headers, and then for each next byte of the response body, e.g. 60s. When it "
        "expires before anything was sent to the client, the client gets 504 "
        "BACKEND_TIMEOUT; during a streamed response the connection is closed. 0 disables.",
    ),
)


class Upstream:
    def __init__(self) -> None:
        self.connect_timeout = 10.0
        self.read_timeout = 60.0
        self._connect_timers: dict[str, asyncio.TimerHandle] = {}
        self._reading: dict[str, http.HTTPFlow] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def load(self, loader: Any) -> None:
        declare(loader, OPTIONS)
        install_patch()

    def configure(self, updated: set[str]) -> None:
        for name in ("upstream_connect_timeout", "upstream_read_timeout"):
            if name in updated:
                value = duration(name, getattr(ctx.options, name))
                setattr(self, name.removeprefix("upstream_"), value)

    def done(self) -> None:
        uninstall_patch()
        for timer in self._connect_timers.values():
            timer.cancel()
        self._connect_timers.clear()
        self._reading.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    # connect timeout

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        server = data.server
        if server.error or self.connect_timeout <= 0 or server.transport_protocol != "tcp":
            return
        task = asyncio.current_task()
        if task is None:
            return
        loop = asyncio.get_running_loop()
        self._connect_timers[server.id] = loop.call_later(
            self.connect_timeout, self._connect_expired, server, task
        )

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        if timer := self._connect_timers.pop(data.server.id, None):
            timer.cancel()

    server_connect_error = server_connected

    def _connect_expired(self, server: connection.Server, task: asyncio.Task[Any]) -> None:
        self._connect_timers.pop(server.id, None)
        if task.done() or server.timestamp_tcp_setup is not None or server.error:
            return
        now = time.time()
        # Before timestamp_start mitmproxy still runs hooks or waits for its per-address slot:
        # cancelling there would skip its error handling, so look again later.
        left = (
            self.connect_timeout
            if server.timestamp_start is None
            else server.timestamp_start + self.connect_timeout - now
        )
        if left > 0.001:
            self._connect_timers[server.id] = asyncio.get_running_loop().call_later(
                left, self._connect_expired, server, task
            )
            return
        task.cancel(f"{CONNECT_TIMEOUT_MARK} ({units.format_duration(self.connect_timeout)})")

    # read timeout: one sweep over the waiting flows instead of a timer per request, which
    # costs ~3-5 us per request in asyncio's timer heap against ~0.2 us for two dict operations.

    def running(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._sweeper = spawn(self._sweep())

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or self.read_timeout <= 0:
            return
        self._reading[flow.id] = flow

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(max(self.read_timeout / 10, 0.05), 1.0))
            if not self._reading:
                continue
            try:
                self._check_reads(time.time())
            except Exception:
                log.warning("read timeout check failed", exc_info=True)

    def _check_reads(self, now: float) -> None:
        for flow in list(self._reading.values()):
            if flow.error or not flow.live or (flow.response and flow.response.timestamp_end):
                del self._reading[flow.id]
                continue
            handler = self._handler(flow)
            if handler is None:
                del self._reading[flow.id]
                continue
            server = flow.server_conn
            # A routing rule's `timeout` (addons/router.py) overrides the global one.
            timeout = record(flow).get("read_timeout") or self.read_timeout
            deadline = read_deadline(
                timeout,
                flow.request.timestamp_end or now,
                server.timestamp_tcp_setup,
                flow.response is not None,
                handler.timeout_watchdog.last_activity,
            )
            if deadline is None or deadline > now:
                continue
            del self._reading[flow.id]
            if server in handler.transports:
                meta = record(flow)
                meta["timed_out"] = "read_timeout"
                meta["backend_error"] = "read_timeout"
                handler.close_connection(server)

    @staticmethod
    def _handler(flow: http.HTTPFlow) -> Any:
        proxyserver = ctx.master.addons.get("proxyserver")
        connections = getattr(proxyserver, "connections", None)
        return connections.get(flow.client_conn.id) if connections is not None else None

    def response(self, flow: http.HTTPFlow) -> None:
        self._reading.pop(flow.id, None)

    def error(self, flow: http.HTTPFlow) -> None:
        self._reading.pop(flow.id, None)
        if flow.error is None or flow.error.msg == mflow.Error.KILLED_MESSAGE:
            return
        _ERRORED[flow.client_conn.id] = flow
        meta = record(flow)
        timed_out = meta.get("timed_out")
        failure = classify(None, flow.error.msg, timed_out)
        if failure.reason == "client_disconnected":
            return
        if failure.status >= 500:
            # Upstream failures come once the request is complete (the connection opens after
            # the `request` hook); before that, "peer closed" & co. are about the client.
            if not timed_out and flow.request.timestamp_end is None:
                return
            meta["backend_error"] = failure.reason
            self._log(flow, failure, flow.error.msg)
        meta.setdefault("error_code", failure.code)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        resp, server = flow.response, flow.server_conn
        meta = record(flow)
        if resp is None or resp.status_code != 502 or not server.error or "error_code" in meta:
            return
        failure = classify(502, server.error)
        meta["backend_error"] = failure.reason
        flow.response = errors.make(failure.code, failure.message, flow, status=failure.status)
        self._log(flow, failure, server.error)

    @staticmethod
    def _log(flow: http.HTTPFlow, failure: Failure, detail: str) -> None:
        log.warning(
            "upstream %s failed: %s -> %d %s (%r) request_id=%s",
            repr(f"{flow.request.host}:{flow.request.port}"),
            failure.reason,
            failure.status,
            failure.code,
            detail,
            errors.request_id(flow),
        )


addons = [Upstream()]
