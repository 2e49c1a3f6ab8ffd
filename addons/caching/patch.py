"""A stale answer instead of mitmproxy's error: the `waypost_origin_unavailable` hook.

mitmproxy answers an origin failure below the hooks (the `error` hook, then its own 502/504);
no hook lets an addon answer instead. The patch (through `kernel.patching`: only on the
checked mitmproxy versions, a WARNING and no patch on any other; undone in the addon's `done`)
wraps `HttpStream.handle_protocol_error` below the router's retry patch (`order`), so the
router's retries come first: for a flow with a stored entry, a complete
request and nothing sent to the client yet, it fires `waypost_origin_unavailable`; when the
cache answers there, the stored response goes out as a response set in the `request` hook
would (`responseheaders`, `response`) and the error hook never fires.

This module is imported once per process, so the hook class is defined (and registered with
mitmproxy's hook names) once however often `addons/cache.py` is reloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mitmproxy import flow as mflow
from mitmproxy import http
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers import http as http_layer

from addons.caching.state import state_of
from addons.kernel import patching


@dataclass
class OriginUnavailableHook(commands.StartHook):
    """The origin failed before any response reached the client and no retry is left;
    the flow has a stored entry the cache may answer with instead of the error."""

    name = "waypost_origin_unavailable"
    flow: http.HTTPFlow


def _handle_protocol_error(self: Any, event: Any) -> Any:
    # Where mitmproxy 11.0.2 / 12.3.1 fire the error hook and then send their own answer. One
    # can still be sent instead for a response error (connect failure, origin closed or timed
    # out) after a complete request, while nothing went to the client (a streamed response
    # has sent its headers).
    flow: http.HTTPFlow = self.flow
    state = state_of(flow)
    if (
        state is not None
        and state.entry is not None
        and not state.served
        and isinstance(event, http_layer.ResponseProtocolError)
        and self.client_state == self.state_done
        and self.server_state
        in (self.state_wait_for_response_headers, self.state_consume_response_body)
    ):
        flow.error = mflow.Error(event.message)
        yield OriginUnavailableHook(flow)
        if state.served:
            flow.error = None
            # What state_consume_request_body does with a response set in the request hook.
            yield http_layer.HttpResponseHeadersHook(flow)
            if (yield from self.check_killed(True)):
                return
            yield from self.send_response()
            return
    yield from _handle_protocol_error.__waypost_wrapped__(self, event)  # type: ignore[attr-defined]


STALE_IF_ERROR = patching.Patch(
    key="caching.stale_if_error",
    target=http_layer.HttpStream,
    name="handle_protocol_error",
    replacement=_handle_protocol_error,
    missing="the error hook cannot answer instead of mitmproxy's error once the origin failed",
    order=1,  # below the router's retries (order 0): a retry first, a stale answer last
)


def install() -> bool:
    """Install the patch (again, in place, on a reload); False on an unchecked mitmproxy."""
    return patching.install(
        STALE_IF_ERROR, unchecked="stale-if-error does not cover unreachable origins", by="cache"
    )


def uninstall() -> None:
    patching.uninstall(STALE_IF_ERROR.key, by="cache")
