"""Answers made from stored entries, and the cache's status fields on every cacheable answer.

- Headers: `X-Cache-Status` (HIT, MISS, STALE, REVALIDATED, BYPASS, EXPIRED), RFC 9211
  `Cache-Status` (`waypost; hit; ttl=...` / `waypost; fwd=...`), and `Age` on stored answers.
  `record(flow)["cache"]` records the same word and `["cache_hit"]` whether the body
  came from the cache (access log, metrics).
- A client's own conditions that hold get a 304; one byte range is cut from a usable stored
  200 (206, or 416); HEAD is answered from a stored GET.
- stale-if-error (RFC 5861 §4): after an origin failure, the entry found at lookup answers
  if its windows allow; never for must-revalidate, proxy-revalidate or s-maxage responses,
  nor with entries purged since the lookup.
- The body goes out exactly as stored (as the origin sent it): `addons/compress.py`, after
  this addon in `response`, compresses hits and misses alike.
"""

from __future__ import annotations

import time

from mitmproxy import http

from addons.caching import rfc9111 as rfc
from addons.caching.state import FlowState, Shared, state_of
from addons.caching.store import Entry
from addons.kernel.record import record

RESULTS = ("HIT", "MISS", "STALE", "REVALIDATED", "BYPASS", "EXPIRED")
SERVED_FROM_CACHE = frozenset({"HIT", "STALE", "REVALIDATED"})
CACHE_NAME = "waypost"

Fields = tuple[tuple[bytes, bytes], ...]


def cache_status(
    result: str, ttl: float | None = None, fwd_status: int | None = None, error: str | None = None
) -> str:
    """The RFC 9211 Cache-Status member for one answer; `error` is why the origin gave no
    response (a token such as connection_refused), sent as `detail` (§2.8): `fwd-status` is
    for a status the origin sent, and absent it would mean the status of this answer."""
    parts = [CACHE_NAME]
    if result in ("HIT", "STALE") and fwd_status is None and error is None:
        parts.append("hit")
    elif result == "BYPASS":
        parts.append("fwd=bypass")
    elif result == "MISS":
        parts.append("fwd=uri-miss")
    elif result in ("REVALIDATED", "EXPIRED", "STALE"):
        parts.append("fwd=stale")
    if fwd_status is not None:
        parts.append(f"fwd-status={fwd_status}")
    if ttl is not None:
        parts.append(f"ttl={int(ttl)}")
    if error is not None:
        parts.append(f"detail={error}")
    return "; ".join(parts)


def partial(state: FlowState, entry: Entry) -> tuple[int, bytes, Fields, bytes]:
    """A range of the stored body (RFC 9110 §14, §15.3.7); the whole body when the Range
    is ignorable or If-Range does not hold."""
    body, length = entry.body, len(entry.body)
    selected: tuple[int, int] | bool | None = None
    assert state.range is not None
    if state.if_range is None or rfc.if_range_holds(
        state.if_range, entry.etag, entry.last_modified_value
    ):
        selected = rfc.byte_range(state.range, length)
    if selected is None:
        fields = entry.raw + ((b"Content-Length", str(length).encode()),)
        return entry.status, entry.reason.encode("latin-1"), fields, body
    if selected is False:
        fields = (
            (b"Content-Range", f"bytes */{length}".encode()),
            (b"Content-Length", b"0"),
        )
        return 416, b"Range Not Satisfiable", fields, b""
    assert isinstance(selected, tuple)
    first, last = selected
    fields = entry.raw + (
        (b"Content-Range", f"bytes {first}-{last}/{length}".encode()),
        (b"Content-Length", str(last - first + 1).encode()),
    )
    return 206, b"Partial Content", fields, body[first : last + 1]


class Answers:
    """Sets `flow.response` from an entry, marks the origin's answers, counts each result."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    def serve(
        self,
        flow: http.HTTPFlow,
        state: FlowState,
        entry: Entry,
        result: str,
        age: float,
        fwd_status: int | None = None,
        error: str | None = None,
    ) -> None:
        """Answer the flow from `entry` (a 304 when the client's own conditions hold)."""
        state.served = True
        state.result = result
        req = flow.request
        inm, ims = state.client_inm, state.client_ims
        whole_age = int(age)
        ttl = entry.lifetime - whole_age
        extra = (
            (b"Age", str(whole_age).encode()),
            (b"X-Cache-Status", result.encode()),
            (b"Cache-Status", cache_status(result, ttl, fwd_status, error).encode()),
        )
        if (inm is not None or ims is not None) and rfc.not_modified(
            inm, ims, entry.etag, entry.modified
        ):
            fields = tuple(
                (n.encode("latin-1"), v.encode("latin-1"))
                for n, v in rfc.fields_of_304(entry.fields)
            )
            status, reason, body = 304, b"Not Modified", b""
        elif state.range is not None and entry.status == 200 and req.method == "GET":
            status, reason, fields, body = partial(state, entry)
        else:
            fields = entry.raw + ((b"Content-Length", str(len(entry.body)).encode()),)
            status, reason = entry.status, entry.reason.encode("latin-1")
            body = b"" if req.method == "HEAD" else entry.body
        now = time.time()
        flow.response = http.Response(
            b"HTTP/1.1", status, reason, http.Headers(fields + extra), body, None, now, now
        )
        self.record(flow, result)

    def serve_stale(
        self,
        flow: http.HTTPFlow,
        state: FlowState,
        fwd_status: int | None = None,
        error: str | None = None,
        disconnected: bool = False,
    ) -> bool:
        """After an origin failure, answer with the entry found at lookup if RFC 5861 §4 (or,
        `disconnected`, RFC 9111 §4.2.4) allows it; False if not."""
        entry = state.entry
        if entry is None or self.shared.store.get(entry.key) is not entry:
            return False  # purged since the lookup: never to be served again
        age = entry.age(time.time())
        if not rfc.stale_if_error(
            age, entry.lifetime, entry.cc, state.req_cc, entry.must_revalidate, disconnected
        ):
            return False
        self.serve(flow, state, entry, "STALE", age, fwd_status, error)
        return True

    def mark(self, flow: http.HTTPFlow, resp: http.Response, result: str) -> None:
        """Label an answer that did not come from the cache."""
        headers = resp.headers
        state = state_of(flow)
        drop = (
            (b"x-cache-status", b"surrogate-control")
            if state is not None and state.surrogate
            else (b"x-cache-status",)
        )
        headers.fields = tuple(f for f in headers.fields if f[0].lower() not in drop) + (
            (b"X-Cache-Status", result.encode()),
            (b"Cache-Status", cache_status(result, fwd_status=resp.status_code).encode()),
        )
        self.record(flow, result)

    def record(self, flow: http.HTTPFlow, result: str) -> None:
        counts = self.shared.counts
        counts[result] = counts.get(result, 0) + 1
        meta = record(flow)
        meta["cache"] = result
        meta["cache_hit"] = result in SERVED_FROM_CACHE
