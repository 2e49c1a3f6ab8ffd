"""Retries on another backend: the router's patches of mitmproxy's `HttpStream`.

mitmproxy has no hook between a failed upstream connect (or a connection that failed before any
response byte) and its 502, so an addon cannot point the flow elsewhere and try again. Two
patches (through `addons/kernel/patching.py`, so only on the mitmproxy versions it checked; on
any other there are no retries, a WARNING says so), both only for flows the router routed
(`BACKEND` in `flow.metadata`), both firing `waypost_upstream_failed` (`UpstreamFailedHook`, a
blocking hook: mitmproxy awaits it) and going on only when the router set `RETRY`:

- `HttpStream.make_server_connection` asks for a connection once and answers 502 on failure;
  the patched copy asks again.
- `HttpStream.handle_protocol_error`, for a response error while waiting for the response
  headers of a fully read, buffered request (the backend closed or reset the connection before
  any response byte): instead of the error, connect again and send the request again, as
  `state_consume_request_body` does (the same code in 11.0.2 and 12.3.1).

The cache's stale-if-error patch of `handle_protocol_error` runs after this one (a higher
`order`), so a retry comes before a stale answer whatever order the addons load in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mitmproxy import http
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers import http as http_layer

from addons.kernel import patching

# Per-flow bookkeeping shared with the router (flow.metadata keys, beside the waypost record).
BACKEND = "waypost_router_backend"
UPSTREAM_ERROR = "waypost_router_upstream_error"
RETRY = "waypost_router_retry"


@dataclass
class UpstreamFailedHook(commands.StartHook):
    """A routed request's connect to its backend failed; the router may pick another."""

    name = "waypost_upstream_failed"
    flow: http.HTTPFlow


def _make_server_connection(self: Any) -> Any:
    # mitmproxy 11.0.2 / 12.3.1 HttpStream.make_server_connection, plus the retry loop.
    while True:
        conn, err = yield http_layer.GetHttpConnection(
            (self.flow.request.host, self.flow.request.port),
            self.flow.request.scheme == "https",
            self.flow.server_conn.via,
            self.flow.server_conn.transport_protocol,
        )
        if not err:
            self.context.server = self.flow.server_conn = conn
            return True
        if BACKEND in self.flow.metadata:
            self.flow.metadata[UPSTREAM_ERROR] = err
            yield UpstreamFailedHook(self.flow)
            if self.flow.metadata.pop(RETRY, False):
                continue
        # What runs below the router's own handler (the cache's, mitmproxy's): the router has
        # seen this failure already.
        below = _handle_protocol_error.__waypost_wrapped__  # type: ignore[attr-defined]
        yield from below(self, _connect_error(self.stream_id, err))
        return False


def _handle_protocol_error(self: Any, event: Any) -> Any:
    flow = self.flow
    if (
        isinstance(event, http_layer.ResponseProtocolError)
        and BACKEND in flow.metadata
        and flow.response is None
        and flow.error is None
        and flow.live
        and not flow.request.stream
        and self.client_state == self.state_done
        and self.server_state == self.state_wait_for_response_headers
    ):
        flow.metadata[UPSTREAM_ERROR] = event.message
        yield UpstreamFailedHook(flow)
        if flow.metadata.pop(RETRY, False):
            yield from _resend(self)
            return
    yield from _handle_protocol_error.__waypost_wrapped__(self, event)  # type: ignore[attr-defined]


def _resend(self: Any) -> Any:
    # The sending half of HttpStream.state_consume_request_body (11.0.2 and 12.3.1).
    ok = yield from self.make_server_connection()
    if not ok:
        return
    request = self.flow.request
    content = request.raw_content
    done_after_headers = not (content or request.trailers)
    server = self.context.server
    yield http_layer.SendHttp(
        http_layer.RequestHeaders(self.stream_id, request, done_after_headers), server
    )
    if content:
        yield http_layer.SendHttp(http_layer.RequestData(self.stream_id, content), server)
    if request.trailers:
        yield http_layer.SendHttp(
            http_layer.RequestTrailers(self.stream_id, request.trailers), server
        )
    yield http_layer.SendHttp(http_layer.RequestEndOfMessage(self.stream_id), server)


def _connect_error(stream_id: int, err: str) -> Any:
    try:
        from mitmproxy.proxy.layers.http._events import ErrorCode  # type: ignore[attr-defined]
    except ImportError:  # mitmproxy 11: no error codes
        return http_layer.ResponseProtocolError(stream_id, err)
    return http_layer.ResponseProtocolError(stream_id, err, ErrorCode.CONNECT_FAILED)


PATCHES = (
    patching.Patch(
        key="routing.retry.make_server_connection",
        target=http_layer.HttpStream,
        name="make_server_connection",
        replacement=_make_server_connection,
        missing="no hook runs after a failed upstream connect, before mitmproxy answers 502",
    ),
    patching.Patch(
        key="routing.retry.handle_protocol_error",
        target=http_layer.HttpStream,
        name="handle_protocol_error",
        replacement=_handle_protocol_error,
        missing="the error hook cannot resend a request whose connection failed before any "
        "response byte",
    ),
)


def install() -> bool:
    return patching.install(*PATCHES, unchecked="no retries on another backend")


def uninstall() -> None:
    patching.uninstall(*(p.key for p in PATCHES))
