"""The request side: is the request eligible, what is stored for it, and what goes upstream.

- Eligible: GET and HEAD (HEAD is answered from a stored GET) when `cache_enabled`, and: the
  router's `record(flow)["route_cache"]` is True, or it is None (no routing opinion)
  and `cache_patterns` is empty or one glob matches the URL, its host or its path. False
  means bypass, as does an Upgrade request.
- A fresh entry answers (HIT); a stale one answers when the request and stale-while-revalidate
  allow it (STALE, revalidated in the background); otherwise the request goes upstream,
  conditional on the entry's validators (EXPIRED), or waits for a fetch in progress.
- Ranges: with nothing usable stored a Range request goes to the origin unstored (BYPASS).
- Surrogate (`cache_surrogate`): for reverse-proxied and routed requests
  `Surrogate-Capability` goes upstream (RFC 9213, Edge Architecture 1.0).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ReverseMode

from addons import errors
from addons.caching import rfc9111 as rfc
from addons.caching.answer import Answers, cache_status
from addons.caching.key import cache_key, pattern_matches, request_url, scan_request, vary_values
from addons.caching.revalidate import Flight, Flights, Revalidator
from addons.caching.state import STATE_KEY, FlowState, Shared
from addons.caching.store import Entry
from addons.kernel.record import Record, record

_EMPTY = rfc.Directives()

Waiting = Coroutine[Any, Any, None]


class Lookup:
    """Finds the flow's entry and answers from it, or prepares the request for the origin."""

    def __init__(
        self, shared: Shared, answers: Answers, flights: Flights, revalidator: Revalidator
    ) -> None:
        self.shared = shared
        self.answers = answers
        self.flights = flights
        self.revalidator = revalidator

    def request(self, flow: http.HTTPFlow, meta: dict[str, Any]) -> Waiting | None:
        """Look a GET or HEAD up; a coroutine to await when it waits for a fetch."""
        data = flow.request.data
        # One pass over the raw fields instead of a multidict lookup per field: the hit path
        # is what a cache is for, and each lookup costs a scan.
        found = scan_request(data.headers.fields)
        host = found.get(b"host")
        url = request_url(
            data.scheme,
            host[0] if host else (data.authority or data.host.encode()),
            data.port,
            data.path,
        )
        route = meta.get("route_cache")
        patterns = self.shared.patterns
        if (
            route is False
            or (route is None and patterns is not None and not pattern_matches(patterns, url))
            or b"upgrade" in found
        ):
            state = FlowState("", url, _EMPTY)
            state.result = "BYPASS"
            state.surrogate = self.surrogate(flow, meta)
            flow.metadata[STATE_KEY] = state
            return None
        state = _flow_state(url, found, data.headers.fields)
        flow.metadata[STATE_KEY] = state
        return self.lookup(flow, state, coalesce=True)

    def lookup(self, flow: http.HTTPFlow, state: FlowState, coalesce: bool) -> Waiting | None:
        store = self.shared.store
        info = store.index.get(state.primary)
        entry: Entry | None = None
        if info is not None:
            vary = state.vary = info[0]
            state.key = cache_key("GET", state.url, vary_values(state.fields, vary))
            entry = store.get(state.key)
        flight_key = state.key or state.primary
        if entry is not None:
            age = entry.age(time.time())
            decision = rfc.reuse(
                age,
                entry.lifetime,
                state.req_cc,
                entry.no_cache,
                entry.must_revalidate,
                entry.swr,
                entry.stale,
            )
            if decision.action == "fresh":
                self.answers.serve(flow, state, entry, "HIT", age)
                return None
            if decision.action == "stale":
                if decision.swr and flight_key not in self.flights.inflight:
                    if not self.revalidator.start(flight_key, entry):
                        return self._upstream(flow, state, entry, flight_key, coalesce)
                self.answers.serve(flow, state, entry, "STALE", age)
                return None
        return self._upstream(flow, state, entry, flight_key, coalesce)

    def explain(self, flow: http.HTTPFlow) -> dict[str, Any]:
        """The cache's part of POST /admin/explain, from the same checks as `request`; the
        route's cache setting is the router's answer, so only patterns are judged here."""
        data = flow.request.data
        found = scan_request(data.headers.fields)
        host = found.get(b"host")
        authority = host[0] if host else (data.authority or data.host.encode())
        url = request_url(data.scheme, authority, data.port, data.path)
        why = None
        if not self.shared.enabled:
            why = "cache_enabled is off"
        elif data.method not in (b"GET", b"HEAD"):
            why = f"{data.method.decode()} is never looked up"
        elif self.shared.patterns is not None and not pattern_matches(self.shared.patterns, url):
            why = "cache_patterns do not match (a routing rule's cache setting wins)"
        elif b"upgrade" in found:
            why = "an Upgrade request"
        if why is not None:
            return {"addon": "cache", "decision": "bypass", "reason": why, "url": url}
        stored = self.shared.store.index.get(f"GET\n{url}") is not None
        store = "if the response is cacheable (RFC 9111)"
        return {"addon": "cache", "decision": "lookup", "url": url, "entry": stored, "store": store}

    def surrogate(self, flow: http.HTTPFlow, meta: Record) -> bool:
        """Whether this cache stands in for the origin: reverse mode or a routed request."""
        return self.shared.surrogate and (
            isinstance(flow.client_conn.proxy_mode, ReverseMode) or "route" in meta
        )

    def _upstream(
        self,
        flow: http.HTTPFlow,
        state: FlowState,
        entry: Entry | None,
        flight_key: str,
        coalesce: bool,
    ) -> Waiting | None:
        """Nothing stored answers: 504 for only-if-cached, else wait for the fetch in
        progress or go to the origin (leading a fetch)."""
        if "only-if-cached" in state.req_cc:
            # RFC 9111 §5.2.1.7: nothing stored can answer: 504 without asking the origin
            state.served = True
            flow.response = errors.make(
                "BACKEND_TIMEOUT",
                "only-if-cached: no stored response can answer.",
                flow,
                headers={"X-Cache-Status": "MISS", "Cache-Status": cache_status("MISS")},
            )
            self.answers.record(flow, "MISS")
            return None
        if state.range is not None:
            # The origin answers the range. Partial responses are not stored: a later full GET
            # stores the whole body, which ranges are then cut from.
            state.result = "BYPASS"
            state.surrogate = self.surrogate(flow, record(flow))
            return None
        flights = self.flights
        flight = flights.current(flight_key, self.shared.coalesce_timeout)
        uncacheable = state.primary in flights.uncacheable
        if (
            coalesce
            and flight is not None
            and flight.waiters < self.shared.max_waiters
            and not uncacheable
        ):
            flight.waiters += 1  # counted now: the coroutine starts only when awaited
            return self._wait(flow, state, flight)
        if flight is None and not uncacheable and flow.request.method == "GET":
            flights.inflight[flight_key] = Flight()
            state.leader = flight_key
        self._to_origin(flow, state, entry)
        return None

    def _to_origin(self, flow: http.HTTPFlow, state: FlowState, entry: Entry | None) -> None:
        state.entry = entry
        state.result = "EXPIRED" if entry is not None else "MISS"
        if entry is not None and (entry.etag or entry.last_modified is not None):
            _make_conditional(flow, state, entry)
        if self.surrogate(flow, record(flow)):
            state.surrogate = True
            headers = flow.request.headers
            ours = f'{self.shared.settings.device}="Surrogate/1.0"'
            theirs = headers.get("surrogate-capability")
            headers["Surrogate-Capability"] = f"{theirs}, {ours}" if theirs else ours

    async def _wait(self, flow: http.HTTPFlow, state: FlowState, flight: Flight) -> None:
        try:
            await asyncio.wait_for(flight.done.wait(), self.shared.coalesce_timeout)
        except TimeoutError:
            pass
        finally:
            flight.waiters -= 1
        if flow.response or flow.error or not flow.live:
            return
        await_again = self.lookup(flow, state, coalesce=False)
        if await_again is not None:  # never: coalesce=False does not wait
            await await_again


def _flow_state(
    url: str, found: dict[bytes, list[bytes]], fields: tuple[tuple[bytes, bytes], ...]
) -> FlowState:
    """The bookkeeping of an eligible request, from the fields `scan_request` found."""
    cc = found.get(b"cache-control")
    state = FlowState(
        f"GET\n{url}",
        url,
        rfc.parse_cache_control(v.decode("latin-1") for v in cc) if cc else _EMPTY,
    )
    inm = found.get(b"if-none-match")
    ims = found.get(b"if-modified-since")
    if inm:
        state.client_inm = ", ".join(v.decode("latin-1") for v in inm)
    if ims:
        state.client_ims = ims[0].decode("latin-1")
    rng = found.get(b"range")
    if rng:
        state.range = rng[0].decode("latin-1")
        if_range = found.get(b"if-range")
        if if_range:
            state.if_range = if_range[0].decode("latin-1")
    state.request_time = time.time()
    state.fields = fields
    state.authorization = b"authorization" in found
    return state


def _make_conditional(flow: http.HTTPFlow, state: FlowState, entry: Entry) -> None:
    headers = flow.request.headers
    state.conditional = True
    for name in ("if-none-match", "if-modified-since", "if-match", "if-unmodified-since"):
        headers.pop(name, None)
    if entry.etag:
        headers["If-None-Match"] = entry.etag
    if entry.last_modified_value:
        headers["If-Modified-Since"] = entry.last_modified_value
