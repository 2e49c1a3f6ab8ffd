"""The response side: store the origin's answer, freshen an entry with a 304, invalidate.

- Not stored: streamed bodies (`flow.response.stream`, `stream_large_bodies`), bodies over
  `cache_max_object_size`, responses with `Set-Cookie` (a shared cache must not hand one
  client's cookie to another), the proxy's own answers, and whatever RFC 9111 §3 forbids.
  The body is stored exactly as the origin sent it (identity unless the origin encoded it),
  so the cache never holds a body `addons/compress.py` made.
- Surrogate (`cache_surrogate`): for reverse-proxied and routed requests, CDN-Cache-Control or
  Surrogate-Control (targeted at `cache_surrogate_name`) replaces Cache-Control and Expires
  (RFC 9213 §2.2); `Surrogate-Control` is not passed on.
- A 304 to the cache's own conditional request freshens the entry, which then answers.
- An origin 500/502/503/504 is answered stale when stale-if-error allows it.
- Unsafe methods with a 2xx/3xx answer invalidate the URL and its same-origin `Location` /
  `Content-Location` (RFC 9111 §4.4).
"""

from __future__ import annotations

import time
from urllib.parse import urljoin, urlsplit

from mitmproxy import http

from addons.caching import rfc9111 as rfc
from addons.caching.answer import Answers
from addons.caching.key import cache_key, getter, normalise_url, port_of, vary_values
from addons.caching.revalidate import Flights
from addons.caching.state import FlowState, Shared
from addons.caching.store import Entry, Origin, response_directives
from addons.kernel.record import record


class Storing:
    """What the origin's answer to a looked-up request does to the store and the answer."""

    def __init__(self, shared: Shared, answers: Answers, flights: Flights) -> None:
        self.shared = shared
        self.answers = answers
        self.flights = flights

    def settle(self, flow: http.HTTPFlow, state: FlowState, resp: http.Response) -> None:
        """The origin answered a request the cache looked up (and did not answer)."""
        answers = self.answers
        if state.result == "BYPASS":
            answers.mark(flow, resp, "BYPASS")
            return
        entry = state.entry
        if entry is not None and resp.status_code == 304 and state.conditional:
            self._revalidated(flow, state, entry, resp)
            return
        if resp.status_code in rfc.ERROR_STATUSES and answers.serve_stale(
            flow, state, fwd_status=resp.status_code
        ):
            # The client sees a 200: the router's breaker and the access log still learn
            # that the origin failed.
            record(flow)["backend_error"] = f"status {resp.status_code}"
            return
        if flow.request.data.method == b"HEAD":
            answers.mark(flow, resp, state.result)  # §4.3.5 (HEAD freshening) not done
            return
        stored = self._store(flow, state, resp)
        if not stored and state.primary:
            self.flights.uncacheable[state.primary] = True
        answers.mark(flow, resp, state.result)

    def _revalidated(
        self, flow: http.HTTPFlow, state: FlowState, entry: Entry, resp: http.Response
    ) -> None:
        """A 304 for our conditional request: freshen the entry and answer from it."""
        # The origin evaluated our own validator and said "not modified", so the stored
        # response is current even when the 304 carries another ETag (origins behind a load
        # balancer that derive ETags from inodes do this). merge_304 keeps the stored ETag,
        # as nginx and Fastly do, rather than §4.3.4's letter (refetch) or a 502.
        entry.freshen(
            list(resp.headers.items(multi=True)),
            state.request_time,
            resp.timestamp_start or time.time(),
            self.shared.settings,
            rfc.parse_age(resp.headers.get_all("age")),
        )
        self.shared.store.reinsert(entry)
        self.answers.serve(flow, state, entry, "REVALIDATED", entry.age(time.time()), 304)

    def _store(self, flow: http.HTTPFlow, state: FlowState, resp: http.Response) -> bool:
        shared = self.shared
        if resp.stream or resp.raw_content is None:
            return False
        if "error_code" in record(flow):
            return False  # the proxy's own answer (errors.make), never the origin's
        body = resp.raw_content
        if len(body) > shared.max_object_size:
            return False
        all_fields = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.headers.fields]
        get = getter(all_fields)
        if get("set-cookie"):
            return False
        resp_cc, expires = response_directives(
            get, shared.settings.device if state.surrogate else None
        )
        vary_names = rfc.vary_names(get("vary"))
        reason = rfc.storable(
            "GET",
            resp.status_code,
            state.req_cc,
            resp_cc,
            state.authorization,
            bool(expires),
            vary_names,
        )
        store = shared.store
        if reason is not None:
            if state.entry is not None:
                store.drop(state.entry.key)
            return False
        vary = tuple(sorted(vary_names))
        key = cache_key("GET", state.url, vary_values(state.fields, vary))
        entry = Entry(
            key,
            state.primary,
            state.url,
            resp.status_code,
            resp.reason,
            rfc.stored_fields(all_fields, resp_cc),
            body,
            state.request_time or flow.request.timestamp_start,
            resp.timestamp_start or time.time(),
            shared.settings,
            _origin(flow),
            rfc.parse_age(get("age")),
            state.surrogate,
        )
        if entry.expires_at <= time.time():
            return False  # stale at once and nothing to revalidate with
        if entry.size > store.maxsize:
            return False
        if state.entry is not None and state.entry.key != key:
            store.drop(state.entry.key)
        store.put(entry, vary)
        return True

    def invalidate_unsafe(self, flow: http.HTTPFlow) -> None:
        """RFC 9111 §4.4: the target URI and same-origin Location/Content-Location."""
        req = flow.request
        url = normalise_url(req.scheme, req.pretty_host, req.port, req.path)
        targets = {url}
        base = urlsplit(url)
        for name in ("location", "content-location"):
            value = flow.response.headers.get(name) if flow.response else None
            if not value:
                continue
            other = urlsplit(urljoin(url, value.strip()))
            if (other.scheme, other.netloc) == (base.scheme, base.netloc):
                target = other.path + (f"?{other.query}" if other.query else "")
                targets.add(
                    normalise_url(other.scheme, other.hostname or "", port_of(other), target)
                )
        for target in targets:
            self.shared.store.drop_url(f"GET\n{target}")


def _origin(flow: http.HTTPFlow) -> Origin | None:
    """Where to revalidate the response in the background: None behind an upstream proxy."""
    server = flow.server_conn
    peer = server.peername
    if not peer or getattr(server, "via", None) is not None:
        return None
    # The request as it went upstream (after the router's rewrite); filtered when used.
    req = flow.request
    return Origin(req.scheme, peer[:2], server.sni, req.path, req.headers.fields)
