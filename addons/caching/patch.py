"""A stale answer instead of mitmproxy's error: the `waypost_origin_unavailable` hook.

mitmproxy answers an origin failure below the hooks (the `error` hook, then its own 502/504);
no hook lets an addon answer instead. The patch (version-guarded for mitmproxy 11.0.2 and
12.3.1, a WARNING and no patch on any other version; undone in the addon's `done`) wraps
`HttpStream.handle_protocol_error` at the bottom of Waypost's chain of patches to it, so the
router's retries (addons/router.py) come first: for a flow with a stored entry, a complete
request and nothing sent to the client yet, it fires `waypost_origin_unavailable`; when the
cache answers there, the stored response goes out as a response set in the `request` hook
would (`responseheaders`, `response`) and the error hook never fires.

This module is imported once per process, so the hook class is defined (and registered with
mitmproxy's hook names) once however often `addons/cache.py` is reloaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from mitmproxy import flow as mflow
from mitmproxy import http, version
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers import http as http_layer

from addons.caching.state import state_of

log = logging.getLogger("waypost.cache")

CHECKED_VERSIONS = frozenset({"11.0.2", "12.3.1"})


@dataclass
class OriginUnavailableHook(commands.StartHook):
    """The origin failed before any response reached the client and no retry is left;
    the flow has a stored entry the cache may answer with instead of the error."""

    name = "waypost_origin_unavailable"
    flow: http.HTTPFlow


_ORIGINAL = "__waypost_cache_original__"
# How Waypost's patches of HttpStream.handle_protocol_error (router.py's, this one) point to
# the function they wrap.
_LINKS = ("__waypost_original__", _ORIGINAL)


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
    yield from getattr(_handle_protocol_error, _ORIGINAL)(self, event)


def _link(fn: Any) -> str | None:
    return next((a for a in _LINKS if hasattr(fn, a)), None)


def install_patch() -> bool:
    """Wrap HttpStream.handle_protocol_error below Waypost's other patches of it, so the
    router's retries come first and a stale answer is the last resort, in whatever order the
    addons load; idempotent. False if the mitmproxy version is unchecked."""
    if version.VERSION not in CHECKED_VERSIONS:
        log.warning(
            "mitmproxy %s is not a version Waypost checked (%s): stale-if-error does not "
            "cover unreachable origins",
            version.VERSION,
            ", ".join(sorted(CHECKED_VERSIONS)),
        )
        return False
    uninstall_patch()
    holder: Any = http_layer.HttpStream
    attr = "handle_protocol_error"
    fn = getattr(holder, attr)
    while (link := _link(fn)) is not None:
        holder, attr, fn = fn, link, getattr(fn, link)
    setattr(_handle_protocol_error, _ORIGINAL, fn)
    setattr(holder, attr, _handle_protocol_error)
    return True


def uninstall_patch() -> None:
    """Take this patch out of the chain, wherever it sits."""
    holder: Any = http_layer.HttpStream
    attr = "handle_protocol_error"
    fn = getattr(holder, attr)
    while (link := _link(fn)) is not None:
        if link == _ORIGINAL:
            fn = getattr(fn, link)
            setattr(holder, attr, fn)
        else:
            holder, attr, fn = fn, link, getattr(fn, link)
