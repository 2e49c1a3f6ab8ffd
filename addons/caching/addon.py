"""The Cache addon: mitmproxy's hooks, each guarding and then handing over to one part.

load        declares the options (`options`, `addons/state.py`'s), installs the patch (`patch`)
configure   parses the options into the shared state (`options`); subscribes to purges
running     points the metrics collector at this instance (`collector`); subscribes to the
            purges of the other processes (state_backend redis: `admin`)
done        undoes the patch, cancels its background revalidations (`revalidate`)
request     looks GET/HEAD up and answers hits (`lookup`, `answer`)
response    stores, freshens or invalidates, labels the answer (`storing`, `answer`)
error       wakes the requests waiting for this flow's fetch (`revalidate`)
waypost_origin_unavailable   answers stale when the origin is down (`answer`)
management_routes            purge and stats (`admin`)
readiness_check              "cache": "ok" or "disabled" (`admin`)

Command: waypost.purge [PATTERN] (mitmweb's command bar, mitmproxy's `:` prompt): drops the
entries whose URL or host match the glob, all of them without one (`admin`); with
state_backend redis, also in every other process (published in the background: a failure is
logged as a WARNING).
"""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import command, ctx, http

from addons import errors, state
from addons.caching import options, patch
from addons.caching import rfc9111 as rfc
from addons.caching.admin import CHANNEL, NOT_PUBLISHED, Admin, Handler
from addons.caching.answer import Answers
from addons.caching.collector import COLLECTOR
from addons.caching.lookup import Lookup, Waiting
from addons.caching.revalidate import Flights, Revalidator
from addons.caching.state import Shared, state_of
from addons.caching.storing import Storing
from addons.kernel import spans
from addons.kernel.options import declare, spawn
from addons.kernel.record import record

log = logging.getLogger("waypost.cache")


class Cache:
    def __init__(self) -> None:
        self.shared = Shared()
        self.answers = Answers(self.shared)
        self.flights = Flights()
        self.revalidator = Revalidator(self.shared, self.flights)
        self.lookup = Lookup(self.shared, self.answers, self.flights, self.revalidator)
        self.storing = Storing(self.shared, self.answers, self.flights)
        self.admin = Admin(self.shared)
        COLLECTOR.source = self.shared

    def load(self, loader: Any) -> None:
        declare(loader, options.OPTIONS)
        state.load(loader)
        patch.install()

    def configure(self, updated: set[str]) -> None:
        options.apply(self.shared, ctx.options, updated)
        COLLECTOR.source = self.shared
        state.configure(updated)
        if any(k.startswith("state_") for k in updated):
            state.STATE.subscribe(CHANNEL, self.admin.received)

    def running(self) -> None:
        COLLECTOR.source = self.shared
        state.STATE.subscribe(CHANNEL, self.admin.received)

    def done(self) -> None:
        patch.uninstall()
        self.revalidator.close()
        state.STATE.unsubscribe(CHANNEL, self.admin.received)
        state.done()

    def request(self, flow: http.HTTPFlow) -> Waiting | None:
        if (
            flow.response
            or flow.error
            or not flow.live
            or flow.websocket
            or not self.shared.enabled
        ):
            return None
        method = flow.request.data.method
        if method != b"GET" and method != b"HEAD":
            return None
        meta = record(flow)
        if "local" in meta:
            return None
        with spans.child(flow, "cache.lookup"):
            return self.lookup.request(flow, meta)

    def response(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None:
            return
        state = state_of(flow)
        if state is None:
            method = flow.request.method
            if (
                self.shared.enabled
                and method not in rfc.SAFE_METHODS
                and 200 <= resp.status_code < 400
            ):
                self.storing.invalidate_unsafe(flow)
            return
        if state.served:
            return
        try:
            self.storing.settle(flow, state, resp)
        finally:
            self.flights.release(state)

    def error(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if state is not None:
            self.flights.release(state)

    def waypost_origin_unavailable(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if state is None or state.served or flow.error is None or not self.shared.enabled:
            return
        meta = record(flow)
        reason = meta.get("timed_out") or errors.reason_of(flow.error.msg)
        if reason in ("client_disconnected", "connection_killed"):
            # Nobody to answer, or a policy (egress) refused the connection: not the origin
            # being down. Egress's DNS failures are dns_failure, so they are answered.
            return
        disconnected = self.shared.settings.stale_on_error
        if not self.answers.serve_stale(flow, state, error=reason, disconnected=disconnected):
            return
        # The error hook will not fire: what the router (breaker accounting), the access log
        # and a flight's waiters would have learnt from it.
        meta["backend_error"] = reason
        self.flights.release(state)
        _close_and_log(flow, reason)

    def management_routes(self) -> dict[str, Handler]:
        return self.admin.routes()

    def readiness_check(self) -> tuple[str, str, bool]:
        return self.admin.readiness()

    def explain(self, flow: http.HTTPFlow) -> dict[str, Any]:
        """POST /admin/explain: would the request be looked up (and its response stored if
        cacheable), and is there an entry for its URL now; the store is only read."""
        return self.lookup.explain(flow)

    @command.command("waypost.purge")
    def purge_command(self, pattern: str = "") -> str:
        """Drop the cached entries whose URL or host match the glob; without one, all."""
        n = self.admin.purge(pattern or None)
        log.info("cache purge", extra={"waypost": {"pattern": pattern, "invalidated": n}})
        done = f"{n} cache entries purged, {len(self.shared.store)} remain"
        if not state.STATE.shared:
            return done
        # A command cannot wait for Redis: say what is known of it now; the publish itself
        # logs a WARNING if Redis turns out to be down.
        up = state.STATE.client is not None and state.STATE.up
        spawn(self.admin.publish(pattern or None, None, False))
        return f"{done}; {'sent to the other processes' if up else NOT_PUBLISHED}"


def _close_and_log(flow: http.HTTPFlow, reason: str) -> None:
    resp = flow.response
    assert resp is not None and flow.error is not None
    if flow.request.http_version.startswith("HTTP/1"):
        # mitmproxy keeps a failed connect in the client connection's list and answers
        # later requests on that connection with the same error without dialling again;
        # its own error answer closed the connection, so does this one.
        resp.headers["Connection"] = "close"
    log.warning(
        "upstream %s failed: %s -> %d STALE from the cache (%r) request_id=%s",
        repr(f"{flow.request.host}:{flow.request.port}"),
        reason,
        resp.status_code,
        flow.error.msg,
        errors.request_id(flow),
    )
