"""An RFC 9111 shared HTTP cache in memory: hits answered in `request`, stores in `response`.

Decisions (freshness, Cache-Control, HTTP-dates, storability, Vary, 304 merging) are the pure
functions of `addons/rfc9111.py`; this module is storage, eligibility and the hooks.

- Storage: a cachetools `TLRUCache` (LRU order, a per-entry expiry, a byte budget through
  `getsizeof`), plus an entry-count limit. An entry is dropped when it can no longer be
  used: after its freshness lifetime plus what stale-while-revalidate / stale-if-error allow,
  or one hour more when it has a validator (so it can be revalidated with a 304) or
  `cache_stale_on_error` is on (so it can answer while the origin is down).
- Key (PRD §4.4.1): SHA-256 over the method, the normalised URL (scheme and host lower case,
  default port dropped, percent-encoding normalised, query parameters sorted) and the
  request's values of the fields the response's `Vary` names. A URL's Vary field names are
  kept in a small index, so a lookup costs one index read and one hash.
- Eligible: GET and HEAD (HEAD is answered from a stored GET) when `cache_enabled`, and: the
  router's `errors.waypost(flow)["route_cache"]` is True, or it is None (no routing opinion) and `cache_patterns` is empty or one glob matches the URL, its host or
  its path. False means bypass. Other methods pass through; unsafe ones with a 2xx/3xx
  answer invalidate the URL and its same-origin `Location` / `Content-Location` (§4.4).
- Ranges: one byte range is cut from a usable stored 200 (206, or 416); with nothing usable
  stored a Range request goes to the origin unstored (BYPASS).
- Surrogate (`cache_surrogate`): for reverse-proxied and routed requests, CDN-Cache-Control or
  Surrogate-Control (targeted at `cache_surrogate_name`) replaces Cache-Control and Expires
  (RFC 9213 §2.2); `Surrogate-Capability` goes upstream, `Surrogate-Control` is not passed on.
- Not stored: streamed bodies (`flow.response.stream`, `stream_large_bodies`), bodies over
  `cache_max_object_size`, responses with `Set-Cookie` (a shared cache must not hand one
  client's cookie to another), and whatever RFC 9111 §3 forbids.
- Coalescing: one origin fetch per key; concurrent misses wait (at most
  `cache_coalesce_timeout`, at most `cache_max_waiters` of them), then answer from the
  cache or go upstream themselves. A key whose answer was not storable is remembered for
  a minute so its requests are not serialised behind each other.
- stale-while-revalidate: the stale entry answers at once and a background task revalidates
  it with aiohttp, connecting to the very IP address the stored response came from (so the
  Egress decision and its DNS pinning hold) with the request headers that went upstream.
  Behind an upstream proxy (no direct peer) the next request revalidates in the foreground.
- stale-if-error (RFC 5861 §4) answers for an origin 500/502/503/504 and, through the patch
  below, when the origin cannot be reached or fails before a complete response (refused,
  connect or read timeout, DNS failure, connection closed); `cache_stale_on_error` also
  answers stale then without stale-if-error (RFC 9111 §4.2.4). Never for must-revalidate,
  proxy-revalidate or s-maxage responses, nor with entries purged since the lookup.
- Headers on every cacheable answer: `X-Cache-Status` (HIT, MISS, STALE, REVALIDATED, BYPASS,
  EXPIRED), RFC 9211 `Cache-Status` (`waypost; hit; ttl=...` / `waypost; fwd=...`), and `Age`
  on stored answers. `errors.waypost(flow)["cache"]` records the same word and
  `["cache_hit"]` whether the body came from the cache (access log, metrics).
- Contract with `addons/compress.py`, which runs after this addon in `response`: the cache
  stores the body exactly as the origin sent it (identity unless the origin encoded it) and
  hands hits on as `flow.response`, so compression applies to hits and misses alike and
  the cache never holds a body the compressor made.

Management (duck-typed `management_routes`, admin bearer token): `DELETE /admin/cache` with
`pattern=<glob over URL or host>` and/or `tag=<Surrogate-Key / Cache-Tag>`, `soft=true` to
mark stale instead of dropping -> `{"invalidated": n, "remaining": m}`;
`GET /admin/cache/stats`.
Metrics (own collector on `addons.metrics.REGISTRY`): `cache_requests_total{result}`,
`cache_bytes`, `cache_entries`, `cache_evictions_total`.

The patch (version-guarded for mitmproxy 11.0.2 and 12.3.1, a WARNING and no patch on any
other version; undone in `done`): mitmproxy answers an origin failure below the hooks (the
`error` hook, then its own 502/504). `HttpStream.handle_protocol_error` is wrapped at the
bottom of Waypost's chain of patches to it, so the router's retries (addons/router.py) come
first: for a flow with a stored entry, a complete request and nothing sent to the client yet,
it fires `waypost_origin_unavailable`; when this addon answers there, the stored response
goes out as a response set in the `request` hook would (`responseheaders`, `response`) and
the error hook never fires.

Hooks: load, configure, running, done, request, response, error, waypost_origin_unavailable.
Options: cache_enabled, cache_max_memory, cache_max_entries, cache_max_object_size,
cache_default_ttl, cache_mode, cache_patterns, cache_coalesce_timeout, cache_max_waiters,
cache_surrogate, cache_surrogate_name, cache_stale_on_error.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import logging
import re
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple
from urllib.parse import urljoin, urlsplit

from aiohttp import web
from cachetools import Cache as BaseCache
from cachetools import TLRUCache, TTLCache
from mitmproxy import ctx, exceptions, http, version
from mitmproxy import flow as mflow
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.mode_specs import ReverseMode
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from addons import errors, upstream
from addons.caching import rfc9111 as rfc
from addons.kernel.units import parse_duration, parse_size

log = logging.getLogger("waypost.cache")

RESULTS = ("HIT", "MISS", "STALE", "REVALIDATED", "BYPASS", "EXPIRED")
SERVED_FROM_CACHE = frozenset({"HIT", "STALE", "REVALIDATED"})
CACHE_NAME = "waypost"
# How long past its usable life an entry with a validator is kept for a 304 revalidation
# (and, with cache_stale_on_error, any entry, to answer while the origin is down).
KEEP_VALIDATABLE = 3600.0
# Per-entry bookkeeping beyond body and fields (object, key, URL), for the byte budget.
ENTRY_OVERHEAD = 512
UNCACHEABLE_TTL = 60.0
BACKGROUND_TIMEOUT = 30.0
_STATE = "waypost_cache"
CHECKED_VERSIONS = frozenset({"11.0.2", "12.3.1"})
_EMPTY = rfc.Directives()
_NO_TAGS: frozenset[str] = frozenset()
_SURROGATE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


# --- keys and patterns (pure) ----------------------------------------------------------------

_PCT = re.compile(r"%[0-9A-Fa-f]{2}")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _pct(m: re.Match[str]) -> str:
    byte = int(m.group()[1:], 16)
    return chr(byte) if byte in _UNRESERVED else m.group().upper()


@lru_cache(maxsize=8192)
def normalise_target(target: str) -> str:
    """Path and query of a request target, normalised: percent-encoding of unreserved
    characters decoded and the rest upper-cased (RFC 3986 §6.2.2), query parameters sorted
    (PRD §4.4.1), empty parameters dropped."""
    path, sep, query = target.partition("?")
    path = _PCT.sub(_pct, path) or "/"
    if not sep:
        return path
    params = sorted(_PCT.sub(_pct, p) for p in query.split("&") if p)
    return f"{path}?{'&'.join(params)}" if params else path


def normalise_url(scheme: str, host: str, port: int, target: str) -> str:
    scheme = scheme.lower()
    host = host.lower().rstrip(".")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    default = (scheme == "http" and port == 80) or (scheme == "https" and port == 443)
    authority = host if default else f"{host}:{port}"
    return f"{scheme}://{authority}{normalise_target(target)}"


def cache_key(method: str, url: str, vary: Sequence[tuple[str, str]]) -> str:
    """SHA-256 over method, normalised URL and the Vary fields' request values."""
    h = hashlib.sha256(f"{method}\n{url}".encode("utf-8", "surrogateescape"))
    for name, value in vary:
        h.update(f"\n{name}:{value}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def compile_globs(patterns: Sequence[str]) -> re.Pattern[str] | None:
    """One regex for a list of globs (`*`, `?`, `[...]`), case-insensitive; None if empty."""
    if not patterns:
        return None
    return re.compile("|".join(fnmatch.translate(p) for p in patterns), re.IGNORECASE)


@lru_cache(maxsize=8192)
def pattern_matches(rx: re.Pattern[str] | None, url: str) -> bool:
    """Eligibility: the glob matches the whole URL, its host or its path (with query)."""
    if rx is None:
        return True
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return bool(rx.match(url) or rx.match(parts.hostname or "") or rx.match(path))


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


# --- entries and storage ---------------------------------------------------------------------


class Origin(NamedTuple):
    """Where a stored response came from, for background revalidation.

    A tuple of immutable values, so the garbage collector stops tracking it: each object a
    stored entry keeps tracked lengthens every full collection (100+ ms pauses seen at 10,000
    entries)."""

    scheme: str
    peer: tuple[str, int]
    sni: str | None
    target: str
    fields: tuple[tuple[bytes, bytes], ...]


class Entry:
    """One stored response with everything the hit path needs already computed."""

    __slots__ = (
        "key",
        "primary",
        "url",
        "status",
        "reason",
        "fields",
        "raw",
        "body",
        "cc",
        "etag",
        "last_modified",
        "last_modified_value",
        "modified",
        "response_time",
        "initial_age",
        "lifetime",
        "no_cache",
        "must_revalidate",
        "swr",
        "sie",
        "tags",
        "stale",
        "size",
        "expires_at",
        "origin",
        "surrogate",
    )

    def __init__(
        self,
        key: str,
        primary: str,
        url: str,
        status: int,
        reason: str,
        fields: Sequence[tuple[str, str]],
        body: bytes,
        request_time: float,
        response_time: float,
        settings: Settings,
        origin: Origin | None,
        age_value: int = 0,
        surrogate: bool = False,
    ) -> None:
        self.key, self.primary, self.url = key, primary, url
        self.status, self.reason, self.body = status, reason, body
        self.origin = origin
        self.surrogate = surrogate
        self.stale = False
        self.set_fields(fields, request_time, response_time, settings, age_value)

    def set_fields(
        self,
        fields: Sequence[tuple[str, str]],
        request_time: float,
        response_time: float,
        settings: Settings,
        age_value: int = 0,
    ) -> None:
        self.fields = tuple(fields)  # immutable, so not tracked by the garbage collector
        # Kept in `fields` (a 304 merge re-reads it) but never served: it was for us.
        self.raw = tuple(
            (n.encode("latin-1"), v.encode("latin-1"))
            for n, v in fields
            if not (self.surrogate and n.lower() == "surrogate-control")
        )
        get = _getter(fields)
        cc, expires = response_directives(get, settings.device if self.surrogate else None)
        self.cc = cc
        date = _date(get("date"))
        lm = get("last-modified")
        self.last_modified_value = lm[0] if lm else None
        self.last_modified = rfc.parse_http_date(lm[0]) if lm else None
        # RFC 9111 §4.3.2: If-Modified-Since is evaluated against Last-Modified, else Date,
        # else the time the response was received.
        self.modified = (
            self.last_modified
            if self.last_modified is not None
            else date
            if date is not None
            else response_time
        )
        etag = get("etag")
        self.etag = etag[0].strip() if etag else None
        self.response_time = response_time
        self.initial_age = rfc.initial_age(age_value, date, request_time, response_time)
        self.lifetime, _ = rfc.freshness_lifetime(
            cc,
            self.status,
            date,
            expires,
            self.last_modified,
            response_time,
            settings.default_ttl,
            settings.default_ttl if settings.mode == "default_ttl" else None,
        )
        self.no_cache = "no-cache" in cc and not cc.fields("no-cache")
        self.must_revalidate = (
            "must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc
        )
        self.swr = cc.seconds("stale-while-revalidate") or 0
        self.sie = cc.seconds("stale-if-error") or 0
        tag_values = get("surrogate-key") + get("cache-tag")
        self.tags = (
            frozenset(t for v in tag_values for t in re.split(r"[\s,]+", v) if t)
            if tag_values
            else _NO_TAGS
        )
        self.size = (
            len(self.body)
            + sum(len(n) + len(v) for n, v in fields)
            + len(self.url)
            + ENTRY_OVERHEAD
        )
        keep = max(self.swr, self.sie)
        if self.etag or self.last_modified is not None or settings.stale_on_error:
            keep = max(keep, KEEP_VALIDATABLE)
        self.expires_at = response_time + max(0.0, self.lifetime - self.initial_age) + keep

    def age(self, now: float) -> float:
        return self.initial_age + (now - self.response_time)


def _getter(fields: Sequence[tuple[str, str]]) -> Callable[[str], list[str]]:
    """Values by lower-cased field name, from one pass over the fields."""
    by_name: dict[str, list[str]] = {}
    for n, v in fields:
        by_name.setdefault(n.lower(), []).append(v)

    def get(name: str) -> list[str]:
        return by_name.get(name, [])

    return get


# Request fields the cache looks at, found in one pass over the raw fields.
_REQUEST_FIELDS = frozenset(
    {
        b"host",
        b"cache-control",
        b"if-none-match",
        b"if-modified-since",
        b"range",
        b"if-range",
        b"upgrade",
        b"authorization",
    }
)


def scan_request(fields: Sequence[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    found: dict[bytes, list[bytes]] = {}
    for k, v in fields:
        lk = k.lower()
        if lk in _REQUEST_FIELDS:
            found.setdefault(lk, []).append(v)
    return found


@lru_cache(maxsize=8192)
def request_url(scheme: bytes, host: bytes, port: int, target: bytes) -> str:
    """The normalised URL of a request from its raw parts (`host` from Host/:authority, a
    port in it ignored: `port` is the request's)."""
    name = host.decode("utf-8", "surrogateescape")
    if name.startswith("["):
        name = name[: name.find("]") + 1]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    return normalise_url(
        scheme.decode("ascii", "replace"),
        name,
        port,
        target.decode("utf-8", "surrogateescape"),
    )


def vary_values(
    fields: Sequence[tuple[bytes, bytes]], vary: tuple[str, ...]
) -> list[tuple[str, str]]:
    """(name, normalised request value) for each field a response varies on."""
    if not vary:
        return []
    get = _getter([(k.decode("latin-1"), v.decode("latin-1")) for k, v in fields])
    # §4.1: an absent field matches only an absent one (not an empty one); NUL cannot occur
    # in a field value, so it marks absence.
    return [
        (name, rfc.normalise_vary_value(values) if (values := get(name)) else "\x00")
        for name in vary
    ]


def _date(values: list[str]) -> float | None:
    return rfc.parse_http_date(values[0]) if len(values) == 1 else None


class Settings:
    __slots__ = ("default_ttl", "mode", "device", "stale_on_error")

    def __init__(
        self,
        default_ttl: float = 300.0,
        mode: str = "rfc",
        device: str = "waypost",
        stale_on_error: bool = False,
    ) -> None:
        self.default_ttl, self.mode, self.device = default_ttl, mode, device
        self.stale_on_error = stale_on_error


def response_directives(
    get: Callable[[str], list[str]], device: str | None
) -> tuple[rfc.Directives, list[str]]:
    """The directives and Expires values a response is cached by: for a surrogate (`device`
    set) the targeted field's when there is one (RFC 9213 §2.2), else Cache-Control's."""
    if device is not None:
        targeted = rfc.targeted_directives(get, device)
        if targeted is not None:
            return targeted, []
    return _cache_control(tuple(get("cache-control"))), get("expires")


@lru_cache(maxsize=4096)
def _cache_control(values: tuple[str, ...]) -> rfc.Directives:
    # Shared by every entry with the same Cache-Control, and never changed: one object for
    # all of them, not one more for the garbage collector to track per entry.
    return rfc.parse_cache_control(values)


class Store(TLRUCache):
    """LRU + per-entry expiry + byte budget (cachetools), plus an entry-count limit."""

    def __init__(self, max_memory: int, max_entries: int) -> None:
        super().__init__(
            maxsize=max_memory,
            ttu=lambda _k, e, _now: e.expires_at,
            timer=time.time,
            getsizeof=lambda e: e.size,
        )
        self.max_entries = max_entries
        self.evictions = 0
        # primary (method + URL) -> (Vary field names, keys of its stored variants). Exact:
        # every way an entry leaves (eviction, expiry, drop) takes it out.
        self.index: dict[str, tuple[tuple[str, ...], set[str]]] = {}

    def popitem(self) -> tuple[str, Entry]:
        key, entry = super().popitem()
        self.evictions += 1
        self._unindex(entry)
        return key, entry

    def expire(self, time: float | None = None) -> list[tuple[str, Entry]]:
        expired = super().expire(time)
        for _key, entry in expired:
            self._unindex(entry)
        return expired

    def put(self, entry: Entry, vary: tuple[str, ...]) -> None:
        info = self.index.get(entry.primary)
        if info is not None and info[0] != vary:
            # A new Vary replaces the old variants (they can no longer be selected).
            self.drop_url(entry.primary)
        # Stored before it is indexed: making room may evict an older entry under this key.
        self[entry.key] = entry
        if entry.key not in self:
            return  # expired on arrival
        info = self.index.get(entry.primary)
        if info is None:
            info = self.index[entry.primary] = (vary, set())
        info[1].add(entry.key)
        # The base class's count: TLRUCache's own len() runs an expiry pass each time.
        while BaseCache.__len__(self) > self.max_entries:
            self.popitem()

    def drop(self, key: str) -> Entry | None:
        entry = self.pop(key, None)
        if entry is not None:
            self._unindex(entry)
        return entry

    def drop_url(self, primary: str) -> int:
        info = self.index.pop(primary, None)
        if info is None:
            return 0
        return sum(self.pop(k, None) is not None for k in info[1])

    def _unindex(self, entry: Entry) -> None:
        info = self.index.get(entry.primary)
        if info is not None:
            info[1].discard(entry.key)
            if not info[1]:
                del self.index[entry.primary]

    def entries(self) -> Iterator[Entry]:
        for key in list(self):
            entry = self.get(key)
            if entry is not None:
                yield entry


class Flight:
    """One origin fetch in progress for a key, and how many requests wait for it."""

    __slots__ = ("done", "waiters", "started")

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.waiters = 0
        self.started = time.monotonic()


class State:
    """Per-flow cache bookkeeping between `request` and `response`."""

    __slots__ = (
        "primary",
        "url",
        "key",
        "vary",
        "req_cc",
        "entry",
        "result",
        "served",
        "leader",
        "client_inm",
        "client_ims",
        "request_time",
        "conditional",
        "fields",
        "authorization",
        "surrogate",
        "range",
        "if_range",
    )

    def __init__(self, primary: str, url: str, req_cc: rfc.Directives) -> None:
        self.primary, self.url, self.req_cc = primary, url, req_cc
        self.key: str | None = None
        self.vary: tuple[str, ...] | None = None
        self.entry: Entry | None = None
        self.result = "MISS"
        self.served = False
        self.leader: str | None = None
        self.client_inm: str | None = None
        self.client_ims: str | None = None
        self.request_time = 0.0
        self.conditional = False
        # The request's fields as the client sent them (a tuple: later edits by other addons
        # replace it, never change it), for the Vary values at lookup and store alike.
        self.fields: tuple[tuple[bytes, bytes], ...] = ()
        self.authorization = False
        self.surrogate = False
        self.range: str | None = None
        self.if_range: str | None = None


# --- metrics ---------------------------------------------------------------------------------


class Collector:
    """cache_* families at scrape time from the live addon's plain counters."""

    def __init__(self) -> None:
        self.source: Cache | None = None

    def collect(self) -> Iterator[Metric]:
        cache = self.source
        requests = CounterMetricFamily(
            "cache_requests_total", "Cache lookups by result.", labels=["result"]
        )
        counts = cache.counts if cache else {}
        for result in RESULTS:
            requests.add_metric([result], counts.get(result, 0))
        yield requests
        store = cache.store if cache else None
        yield GaugeMetricFamily(
            "cache_bytes", "Bytes held by the cache.", store.currsize if store else 0
        )
        yield GaugeMetricFamily("cache_entries", "Stored responses.", len(store) if store else 0)
        yield CounterMetricFamily(
            "cache_evictions_total",
            "Entries evicted to stay within max_memory / max_entries.",
            (cache.evictions_before + store.evictions) if cache and store else 0,
        )


def _define_collector() -> Collector:
    from addons.metrics import REGISTRY

    collector = Collector()
    REGISTRY.register(collector)
    return collector


def _define_hook() -> type[commands.StartHook]:
    @dataclass
    class OriginUnavailableHook(commands.StartHook):
        """The origin failed before any response reached the client and no retry is left;
        the flow has a stored entry the cache may answer with instead of the error."""

        name = "waypost_origin_unavailable"
        flow: http.HTTPFlow

    return OriginUnavailableHook


if __name__ == "addons.cache":
    COLLECTOR = _define_collector()
    OriginUnavailableHook = _define_hook()
else:
    # Loaded as a script (`-s addons/cache.py`, re-executed on reload): reuse the package
    # module's collector and hook instead of registering second ones.
    try:
        from addons.cache import COLLECTOR, OriginUnavailableHook
    except ImportError:
        COLLECTOR = _define_collector()
        OriginUnavailableHook = _define_hook()


# --- the patch: a stale answer instead of mitmproxy's error ---------------------------------

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
    state: State | None = flow.metadata.get(_STATE)
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
    """Take every copy of this patch (a script reload makes new ones) out of the chain."""
    holder: Any = http_layer.HttpStream
    attr = "handle_protocol_error"
    fn = getattr(holder, attr)
    while (link := _link(fn)) is not None:
        if link == _ORIGINAL:
            fn = getattr(fn, link)
            setattr(holder, attr, fn)
        else:
            holder, attr, fn = fn, link, getattr(fn, link)


# --- the addon -------------------------------------------------------------------------------

_tasks: set[asyncio.Task[Any]] = set()


def _spawn(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    task = asyncio.get_running_loop().create_task(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return task


class Cache:
    def __init__(self) -> None:
        self.enabled = True
        self.settings = Settings()
        self.store = Store(256 * 1024 * 1024, 10000)
        self.max_object_size = 1024 * 1024
        self.patterns: re.Pattern[str] | None = None
        self.coalesce_timeout = 5.0
        self.max_waiters = 100
        self.surrogate = True
        self.counts: dict[str, int] = {}
        self.evictions_before = 0
        self.inflight: dict[str, Flight] = {}
        self.uncacheable: TTLCache[str, bool] = TTLCache(maxsize=10000, ttl=UNCACHEABLE_TTL)
        self.session: Any = None
        COLLECTOR.source = self

    def load(self, loader: Any) -> None:
        loader.add_option(
            "cache_enabled", bool, True, "Answer cacheable GET/HEAD requests from memory."
        )
        loader.add_option(
            "cache_max_memory",
            str,
            "256MB",
            "Byte budget of the cache (bodies, headers, bookkeeping), e.g. 256MB; least "
            "recently used entries are evicted beyond it.",
        )
        loader.add_option(
            "cache_max_entries",
            int,
            10000,
            "Most responses kept (all Vary variants count).",
        )
        loader.add_option(
            "cache_max_object_size",
            str,
            "1MB",
            "Largest body stored, e.g. 1MB (bodies streamed by stream_large_bodies are never "
            "stored).",
        )
        loader.add_option(
            "cache_default_ttl",
            str,
            "300s",
            "Upper bound of heuristic freshness (10% of the time since Last-Modified); in mode "
            "default_ttl also the lifetime of heuristically cacheable responses without one.",
        )
        loader.add_option(
            "cache_mode",
            str,
            "rfc",
            "rfc: freshness only from the origin's headers and the Last-Modified heuristic; "
            "default_ttl: as rfc, and responses without any get cache_default_ttl.",
            choices=["rfc", "default_ttl"],
        )
        loader.add_option(
            "cache_patterns",
            Sequence[str],
            [],
            "Globs over URL, host or path that may be cached (e.g. *.css, /static/*); empty: "
            "any URL. A router rule's cache setting overrides them.",
        )
        loader.add_option(
            "cache_coalesce_timeout",
            str,
            "5s",
            "How long concurrent misses for one URL wait for the first one's answer before "
            "going upstream themselves.",
        )
        loader.add_option(
            "cache_max_waiters",
            int,
            100,
            "Most requests waiting for one URL's origin fetch; more go upstream at once.",
        )
        loader.add_option(
            "cache_surrogate",
            bool,
            True,
            "For reverse-proxied and routed requests, act as the origin's surrogate (CDN): "
            "CDN-Cache-Control, else Surrogate-Control (untargeted or targeted at "
            "cache_surrogate_name), replaces Cache-Control and Expires for this cache; "
            "Surrogate-Capability is sent upstream and Surrogate-Control is not passed on.",
        )
        loader.add_option(
            "cache_surrogate_name",
            str,
            "waypost",
            "This cache's device token for Surrogate-Control targeting "
            '(`max-age=60;waypost`), announced as `Surrogate-Capability: waypost="Surrogate/1.0"`.',
        )
        loader.add_option(
            "cache_stale_on_error",
            bool,
            False,
            "When the origin cannot be reached or fails before a complete response (refused, "
            "timeout, DNS failure, connection closed), answer with the stored response even "
            "without stale-if-error, as a disconnected cache may (RFC 9111 §4.2.4; nginx's "
            "proxy_cache_use_stale error timeout); stored responses are then kept an hour past "
            "their freshness. Never for must-revalidate, proxy-revalidate, s-maxage or "
            "no-cache responses, nor for an origin's 5xx answers (stale-if-error only).",
        )
        install_patch()

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if "cache_enabled" in updated:
            self.enabled = opts.cache_enabled
        if updated & {"cache_max_memory", "cache_max_entries", "cache_max_object_size"}:
            max_memory = _size("cache_max_memory", opts.cache_max_memory)
            max_object = _size("cache_max_object_size", opts.cache_max_object_size)
            if opts.cache_max_entries < 1:
                raise exceptions.OptionsError(
                    f"cache_max_entries: {opts.cache_max_entries} must be at least 1"
                )
            if max_object > max_memory:
                raise exceptions.OptionsError(
                    f"cache_max_object_size: {opts.cache_max_object_size} is larger than "
                    f"cache_max_memory ({opts.cache_max_memory})"
                )
            self.max_object_size = max_object
            store = self.store
            if store.maxsize != max_memory or store.max_entries != opts.cache_max_entries:
                self.evictions_before += store.evictions
                self.store = Store(max_memory, opts.cache_max_entries)
                # Carried over least recently used first (popitem's order), so a smaller
                # budget evicts those.
                vary_of = {primary: info[0] for primary, info in store.index.items()}
                while store:
                    _key, entry = store.popitem()
                    self.store.put(entry, vary_of.get(entry.primary, ()))
        if updated & {
            "cache_default_ttl",
            "cache_mode",
            "cache_surrogate_name",
            "cache_stale_on_error",
        }:
            ttl = _duration("cache_default_ttl", opts.cache_default_ttl)
            device = opts.cache_surrogate_name
            if not _SURROGATE_NAME.fullmatch(device):
                raise exceptions.OptionsError(
                    f"cache_surrogate_name: {device!r} is not a token (letters, digits, -_.)"
                )
            self.settings = Settings(ttl, opts.cache_mode, device, opts.cache_stale_on_error)
        if "cache_surrogate" in updated:
            self.surrogate = opts.cache_surrogate
        if "cache_patterns" in updated:
            try:
                self.patterns = compile_globs(list(opts.cache_patterns))
            except re.error as e:
                raise exceptions.OptionsError(f"cache_patterns: not a valid glob: {e}") from e
        if "cache_coalesce_timeout" in updated:
            self.coalesce_timeout = _duration("cache_coalesce_timeout", opts.cache_coalesce_timeout)
        if "cache_max_waiters" in updated:
            if opts.cache_max_waiters < 0:
                raise exceptions.OptionsError("cache_max_waiters: must be 0 or more")
            self.max_waiters = opts.cache_max_waiters
        COLLECTOR.source = self

    def running(self) -> None:
        COLLECTOR.source = self

    def done(self) -> None:
        uninstall_patch()
        for task in list(_tasks):
            task.cancel()
        if self.session is not None:
            session, self.session = self.session, None
            _spawn(session.close())

    # --- request: lookup -------------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        if flow.response or flow.error or not flow.live or flow.websocket or not self.enabled:
            return None
        data = flow.request.data
        method = data.method
        if method != b"GET" and method != b"HEAD":
            return None
        meta = errors.waypost(flow)
        if "local" in meta:
            return None
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
        if (
            route is False
            or (
                route is None
                and self.patterns is not None
                and not pattern_matches(self.patterns, url)
            )
            or b"upgrade" in found
        ):
            state = State("", url, _EMPTY)
            state.result = "BYPASS"
            state.surrogate = self._surrogate(flow, meta)
            flow.metadata[_STATE] = state
            return None
        cc = found.get(b"cache-control")
        state = State(
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
        state.fields = data.headers.fields
        state.authorization = b"authorization" in found
        flow.metadata[_STATE] = state
        return self._lookup(flow, state, coalesce=True)

    def _lookup(
        self, flow: http.HTTPFlow, state: State, coalesce: bool
    ) -> Coroutine[Any, Any, None] | None:
        store = self.store
        info = store.index.get(state.primary)
        entry: Entry | None = None
        if info is not None:
            vary = state.vary = info[0]
            state.key = cache_key("GET", state.url, vary_values(state.fields, vary))
            entry = store.get(state.key)
        flight_key = state.key or state.primary
        now = time.time()
        if entry is not None:
            age = entry.age(now)
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
                self._serve(flow, state, entry, "HIT", age)
                return None
            if decision.action == "stale":
                if decision.swr and flight_key not in self.inflight:
                    if not self._revalidate_in_background(flight_key, entry):
                        return self._go_upstream(flow, state, entry, flight_key, coalesce)
                self._serve(flow, state, entry, "STALE", age)
                return None
        return self._go_upstream(flow, state, entry, flight_key, coalesce)

    def _go_upstream(
        self,
        flow: http.HTTPFlow,
        state: State,
        entry: Entry | None,
        flight_key: str,
        coalesce: bool,
    ) -> Coroutine[Any, Any, None] | None:
        if "only-if-cached" in state.req_cc:
            # RFC 9111 §5.2.1.7: nothing stored can answer: 504 without asking the origin
            state.served = True
            flow.response = errors.make(
                "BACKEND_TIMEOUT",
                "only-if-cached: no stored response can answer.",
                flow,
                headers={"X-Cache-Status": "MISS", "Cache-Status": cache_status("MISS")},
            )
            self._record(flow, "MISS")
            return None
        if state.range is not None:
            # The origin answers the range. Partial responses are not stored: a later full GET
            # stores the whole body, which ranges are then cut from.
            state.result = "BYPASS"
            state.surrogate = self._surrogate(flow, errors.waypost(flow))
            return None
        flight = self.inflight.get(flight_key)
        if flight is not None and time.monotonic() - flight.started > self.coalesce_timeout:
            # A fetch that outlived the wait bound (its flow may never report back, e.g. an
            # intercepted or abandoned one): stop making requests wait for it.
            del self.inflight[flight_key]
            flight.done.set()
            flight = None
        if (
            coalesce
            and flight is not None
            and flight.waiters < self.max_waiters
            and state.primary not in self.uncacheable
        ):
            flight.waiters += 1  # counted now: the coroutine starts only when awaited
            return self._wait(flow, state, flight)
        if (
            flight is None
            and state.primary not in self.uncacheable
            and flow.request.method == "GET"
        ):
            self.inflight[flight_key] = Flight()
            state.leader = flight_key
        state.entry = entry
        state.result = "EXPIRED" if entry is not None else "MISS"
        if entry is not None and (entry.etag or entry.last_modified is not None):
            self._make_conditional(flow, state, entry)
        if self._surrogate(flow, errors.waypost(flow)):
            state.surrogate = True
            headers = flow.request.headers
            ours = f'{self.settings.device}="Surrogate/1.0"'
            theirs = headers.get("surrogate-capability")
            headers["Surrogate-Capability"] = f"{theirs}, {ours}" if theirs else ours
        return None

    def _surrogate(self, flow: http.HTTPFlow, meta: dict[str, Any]) -> bool:
        """Whether this cache stands in for the origin: reverse mode or a routed request."""
        return self.surrogate and (
            isinstance(flow.client_conn.proxy_mode, ReverseMode) or "route" in meta
        )

    async def _wait(self, flow: http.HTTPFlow, state: State, flight: Flight) -> None:
        try:
            await asyncio.wait_for(flight.done.wait(), self.coalesce_timeout)
        except TimeoutError:
            pass
        finally:
            flight.waiters -= 1
        if flow.response or flow.error or not flow.live:
            return
        await_again = self._lookup(flow, state, coalesce=False)
        if await_again is not None:  # never: coalesce=False does not wait
            await await_again

    def _make_conditional(self, flow: http.HTTPFlow, state: State, entry: Entry) -> None:
        headers = flow.request.headers
        state.conditional = True
        for name in ("if-none-match", "if-modified-since", "if-match", "if-unmodified-since"):
            headers.pop(name, None)
        if entry.etag:
            headers["If-None-Match"] = entry.etag
        if entry.last_modified_value:
            headers["If-Modified-Since"] = entry.last_modified_value

    def _serve(
        self,
        flow: http.HTTPFlow,
        state: State,
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
        extra = [
            (b"Age", str(whole_age).encode()),
            (b"X-Cache-Status", result.encode()),
            (b"Cache-Status", cache_status(result, ttl, fwd_status, error).encode()),
        ]
        if (inm is not None or ims is not None) and rfc.not_modified(
            inm, ims, entry.etag, entry.modified
        ):
            fields = tuple(
                (n.encode("latin-1"), v.encode("latin-1"))
                for n, v in rfc.fields_of_304(entry.fields)
            )
            status, reason, body = 304, b"Not Modified", b""
        elif state.range is not None and entry.status == 200 and req.method == "GET":
            status, reason, fields, body = self._partial(state, entry)
        else:
            fields = entry.raw + ((b"Content-Length", str(len(entry.body)).encode()),)
            status, reason = entry.status, entry.reason.encode("latin-1")
            body = b"" if req.method == "HEAD" else entry.body
        now = time.time()
        flow.response = http.Response(
            b"HTTP/1.1", status, reason, http.Headers(fields + tuple(extra)), body, None, now, now
        )
        self._record(flow, result)

    @staticmethod
    def _partial(
        state: State, entry: Entry
    ) -> tuple[int, bytes, tuple[tuple[bytes, bytes], ...], bytes]:
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

    def _record(self, flow: http.HTTPFlow, result: str) -> None:
        self.counts[result] = self.counts.get(result, 0) + 1
        meta = errors.waypost(flow)
        meta["cache"] = result
        meta["cache_hit"] = result in SERVED_FROM_CACHE

    # --- response: store, revalidate, invalidate -------------------------------------------

    def response(self, flow: http.HTTPFlow) -> None:
        state: State | None = flow.metadata.get(_STATE)
        resp = flow.response
        if resp is None:
            return
        if state is None:
            method = flow.request.method
            if self.enabled and method not in rfc.SAFE_METHODS and 200 <= resp.status_code < 400:
                self._invalidate_unsafe(flow)
            return
        if state.served:
            return
        try:
            if state.result == "BYPASS":
                self._mark(flow, resp, "BYPASS")
                return
            entry = state.entry
            if entry is not None and resp.status_code == 304 and state.conditional:
                self._revalidated(flow, state, entry, resp)
                return
            if resp.status_code in rfc.ERROR_STATUSES and self._serve_stale(
                flow, state, fwd_status=resp.status_code
            ):
                # The client sees a 200: the router's breaker and the access log still learn
                # that the origin failed.
                errors.waypost(flow)["backend_error"] = f"status {resp.status_code}"
                return
            if flow.request.data.method == b"HEAD":
                self._mark(flow, resp, state.result)  # §4.3.5 (HEAD freshening) not done
                return
            stored = self._store(flow, state, resp)
            if not stored and state.primary:
                self.uncacheable[state.primary] = True
            self._mark(flow, resp, state.result)
        finally:
            self._release(state)

    def error(self, flow: http.HTTPFlow) -> None:
        state: State | None = flow.metadata.get(_STATE)
        if state is not None:
            self._release(state)

    def waypost_origin_unavailable(self, flow: http.HTTPFlow) -> None:
        state: State | None = flow.metadata.get(_STATE)
        if state is None or state.served or flow.error is None or not self.enabled:
            return
        message = flow.error.msg
        meta = errors.waypost(flow)
        reason = meta.get("timed_out") or upstream.reason_of(message)
        if reason in ("client_disconnected", "connection_killed"):
            # Nobody to answer, or a policy (egress) refused the connection: not the origin
            # being down. Egress's DNS failures are dns_failure, so they are answered.
            return
        if not self._serve_stale(
            flow, state, error=reason, disconnected=self.settings.stale_on_error
        ):
            return
        # The error hook will not fire: what the router (breaker accounting), the access log
        # and a flight's waiters would have learnt from it.
        meta["backend_error"] = reason
        self._release(state)
        resp = flow.response
        assert resp is not None
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
            message,
            errors.request_id(flow),
        )

    def _serve_stale(
        self,
        flow: http.HTTPFlow,
        state: State,
        fwd_status: int | None = None,
        error: str | None = None,
        disconnected: bool = False,
    ) -> bool:
        """After an origin failure, answer with the entry found at lookup if RFC 5861 §4 (or,
        `disconnected`, RFC 9111 §4.2.4) allows it; False if not."""
        entry = state.entry
        if entry is None or self.store.get(entry.key) is not entry:
            return False  # purged since the lookup: never to be served again
        age = entry.age(time.time())
        if not rfc.stale_if_error(
            age, entry.lifetime, entry.cc, state.req_cc, entry.must_revalidate, disconnected
        ):
            return False
        self._serve(flow, state, entry, "STALE", age, fwd_status, error)
        return True

    def _release(self, state: State) -> None:
        if state.leader:
            flight = self.inflight.pop(state.leader, None)
            state.leader = None
            if flight is not None:
                flight.done.set()

    def _mark(self, flow: http.HTTPFlow, resp: http.Response, result: str) -> None:
        headers = resp.headers
        state: State | None = flow.metadata.get(_STATE)
        drop = (
            (b"x-cache-status", b"surrogate-control")
            if state is not None and state.surrogate
            else (b"x-cache-status",)
        )
        headers.fields = tuple(f for f in headers.fields if f[0].lower() not in drop) + (
            (b"X-Cache-Status", result.encode()),
            (b"Cache-Status", cache_status(result, fwd_status=resp.status_code).encode()),
        )
        self._record(flow, result)

    def _revalidated(
        self, flow: http.HTTPFlow, state: State, entry: Entry, resp: http.Response
    ) -> None:
        """A 304 for our conditional request: freshen the entry and answer from it."""
        # The origin evaluated our own validator and said "not modified", so the stored
        # response is current even when the 304 carries another ETag (origins behind a load
        # balancer that derive ETags from inodes do this). merge_304 keeps the stored ETag,
        # as nginx and Fastly do, rather than §4.3.4's letter (refetch) or a 502.
        fresh = [(k, v) for k, v in resp.headers.items(multi=True)]
        age_value = rfc.parse_age(resp.headers.get_all("age"))
        entry.set_fields(
            rfc.merge_304(entry.fields, fresh),
            state.request_time,
            resp.timestamp_start or time.time(),
            self.settings,
            age_value,
        )
        entry.stale = False
        self._reinsert(entry)
        now = time.time()
        self._serve(flow, state, entry, "REVALIDATED", entry.age(now), 304)

    def _reinsert(self, entry: Entry) -> None:
        # Size and expiry changed: insert again so the budget and the expiry heap see them.
        store = self.store
        vary = store.index.get(entry.primary)
        store.drop(entry.key)
        if entry.size <= store.maxsize:
            store.put(entry, vary[0] if vary else ())

    def _store(self, flow: http.HTTPFlow, state: State, resp: http.Response) -> bool:
        if resp.stream or resp.raw_content is None:
            return False
        if "error_code" in errors.waypost(flow):
            return False  # the proxy's own answer (errors.make), never the origin's
        body = resp.raw_content
        if len(body) > self.max_object_size:
            return False
        all_fields = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.headers.fields]
        get = _getter(all_fields)
        if get("set-cookie"):
            return False
        resp_cc, expires = response_directives(
            get, self.settings.device if state.surrogate else None
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
        if reason is not None:
            if state.entry is not None:
                self.store.drop(state.entry.key)
            return False
        fields = rfc.stored_fields(all_fields, resp_cc)
        vary = tuple(sorted(vary_names))
        key = cache_key("GET", state.url, vary_values(state.fields, vary))
        req = flow.request
        response_time = resp.timestamp_start or time.time()
        entry = Entry(
            key,
            state.primary,
            state.url,
            resp.status_code,
            resp.reason,
            fields,
            body,
            state.request_time or req.timestamp_start,
            response_time,
            self.settings,
            self._origin(flow),
            rfc.parse_age(get("age")),
            state.surrogate,
        )
        if entry.expires_at <= time.time():
            return False  # stale at once and nothing to revalidate with
        if entry.size > self.store.maxsize:
            return False
        if state.entry is not None and state.entry.key != key:
            self.store.drop(state.entry.key)
        self.store.put(entry, vary)
        return True

    def _origin(self, flow: http.HTTPFlow) -> Origin | None:
        server = flow.server_conn
        peer = server.peername
        if not peer or getattr(server, "via", None) is not None:
            return None
        # The request as it went upstream (after the router's rewrite); filtered when used.
        req = flow.request
        return Origin(req.scheme, peer[:2], server.sni, req.path, req.headers.fields)

    def _invalidate_unsafe(self, flow: http.HTTPFlow) -> None:
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
                targets.add(normalise_url(other.scheme, other.hostname or "", _port(other), target))
        for target in targets:
            self.store.drop_url(f"GET\n{target}")

    # --- stale-while-revalidate in the background -----------------------------------------

    def _revalidate_in_background(self, flight_key: str, entry: Entry) -> bool:
        origin = entry.origin
        if origin is None or origin.scheme not in ("http", "https"):
            return False
        self.inflight[flight_key] = flight = Flight()
        _spawn(self._background(flight_key, flight, entry, origin))
        return True

    async def _background(
        self, flight_key: str, flight: Flight, entry: Entry, origin: Origin
    ) -> None:
        import aiohttp

        try:
            if self.session is None:
                self.session = aiohttp.ClientSession(auto_decompress=False)
            skip = rfc.HOP_BY_HOP | {"if-none-match", "if-modified-since", "content-length"}
            headers = [
                (n.decode("latin-1"), v.decode("latin-1"))
                for n, v in origin.fields
                if n.decode("latin-1").lower() not in skip
            ]
            if entry.etag:
                headers.append(("If-None-Match", entry.etag))
            if entry.last_modified_value:
                headers.append(("If-Modified-Since", entry.last_modified_value))
            host, port = origin.peer
            if ":" in host:
                host = f"[{host}]"
            request_time = time.time()
            insecure = bool(getattr(ctx.options, "ssl_insecure", False))
            async with self.session.get(
                f"{origin.scheme}://{host}:{port}{origin.target}",
                headers=headers,
                skip_auto_headers=("Accept-Encoding", "User-Agent"),
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=BACKGROUND_TIMEOUT),
                server_hostname=origin.sni if origin.scheme == "https" else None,
                ssl=False if insecure else True,
            ) as r:
                chunks: list[bytes] = []
                size = 0
                async for chunk in r.content.iter_chunked(65536):
                    size += len(chunk)
                    if size > self.max_object_size:  # never hold more than one object's worth
                        self.store.drop(entry.key)
                        return
                    chunks.append(chunk)
                body = b"".join(chunks)
                response_time = time.time()
                fields = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in r.raw_headers]
                self._background_result(
                    entry, r.status, r.reason or "", fields, body, request_time, response_time
                )
        except Exception as e:  # an unreachable origin leaves the stale entry as it was
            log.debug("background revalidation of %s failed: %r", entry.url, e)
        finally:
            if self.inflight.get(flight_key) is flight:
                del self.inflight[flight_key]
            flight.done.set()

    def _background_result(
        self,
        entry: Entry,
        status: int,
        reason: str,
        fields: list[tuple[str, str]],
        body: bytes,
        request_time: float,
        response_time: float,
    ) -> None:
        if self.store.get(entry.key) is not entry:
            return  # purged or replaced while the revalidation ran
        if status == 304:
            get = _getter(fields)
            entry.set_fields(
                rfc.merge_304(entry.fields, fields),
                request_time,
                response_time,
                self.settings,
                rfc.parse_age(get("age")),
            )
            entry.stale = False
            self._reinsert(entry)
            return
        if status in rfc.ERROR_STATUSES:
            return  # keep serving stale while the windows allow
        get = _getter(fields)
        resp_cc, expires = response_directives(
            get, self.settings.device if entry.surrogate else None
        )
        vary_names = rfc.vary_names(get("vary"))
        if (
            len(body) > self.max_object_size
            or get("set-cookie")
            or tuple(sorted(vary_names)) != (self.store.index.get(entry.primary) or ((),))[0]
            or rfc.storable("GET", status, _EMPTY, resp_cc, False, bool(expires), vary_names)
        ):
            self.store.drop(entry.key)
            return
        new = Entry(
            entry.key,
            entry.primary,
            entry.url,
            status,
            reason,
            rfc.stored_fields(fields, resp_cc),
            body,
            request_time,
            response_time,
            self.settings,
            entry.origin,
            rfc.parse_age(get("age")),
            entry.surrogate,
        )
        self.store.drop(entry.key)
        if new.expires_at > time.time() and new.size <= self.store.maxsize:
            self.store.put(new, tuple(sorted(vary_names)))

    # --- management ------------------------------------------------------------------------

    def purge(self, pattern: str | None = None, tag: str | None = None, soft: bool = False) -> int:
        """Drop (or with soft, mark stale) the entries whose URL or host match the glob and/or
        that carry the tag. Returns how many."""
        rx = compile_globs([pattern]) if pattern else None
        n = 0
        for entry in list(self.store.entries()):
            if rx is not None and not (
                rx.match(entry.url) or rx.match(urlsplit(entry.url).hostname or "")
            ):
                continue
            if tag is not None and tag not in entry.tags:
                continue
            if soft:
                entry.stale = True
            else:
                self.store.drop(entry.key)
            n += 1
        return n

    def stats(self) -> dict[str, Any]:
        counts = self.counts
        lookups = sum(counts.get(r, 0) for r in RESULTS if r != "BYPASS")
        hits = sum(counts.get(r, 0) for r in SERVED_FROM_CACHE)
        misses = counts.get("MISS", 0) + counts.get("EXPIRED", 0)
        store = self.store
        return {
            "enabled": self.enabled,
            "size": store.currsize,
            "max_memory": store.maxsize,
            "entries": len(store),
            "max_entries": store.max_entries,
            "hit_rate": round(hits / lookups, 4) if lookups else 0.0,
            "miss_rate": round(misses / lookups, 4) if lookups else 0.0,
            "evictions": self.evictions_before + store.evictions,
            "results": {r: counts.get(r, 0) for r in RESULTS},
        }

    def management_routes(self) -> dict[str, Callable[[web.Request], Any]]:
        return {"/admin/cache": self._admin_purge, "/admin/cache/stats": self._admin_stats}

    async def _admin_purge(self, request: web.Request) -> web.Response:
        if request.method != "DELETE":
            return _error(405, "METHOD_NOT_ALLOWED", "Use DELETE.", {"Allow": "DELETE"})
        pattern = request.query.get("pattern") or None
        tag = request.query.get("tag") or None
        if pattern is None and tag is None:
            return _error(400, "BAD_REQUEST", "Give pattern=<glob over URL or host> or tag=<tag>.")
        soft = request.query.get("soft", "").lower() in ("1", "true", "yes")
        n = self.purge(pattern, tag, soft)
        log.info(
            "cache purge",
            extra={"waypost": {"pattern": pattern, "tag": tag, "soft": soft, "invalidated": n}},
        )
        return web.json_response({"invalidated": n, "remaining": len(self.store)})

    async def _admin_stats(self, request: web.Request) -> web.Response:
        if request.method not in ("GET", "HEAD"):
            return _error(405, "METHOD_NOT_ALLOWED", "Use GET.", {"Allow": "GET, HEAD"})
        return web.json_response(self.stats())


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    rid = errors.new_request_id()
    return web.Response(
        status=status,
        body=errors.body(code, message, rid),
        content_type="application/json",
        headers={"X-Request-ID": rid, **(headers or {})},
    )


def _port(parts: Any) -> int:
    try:
        port = parts.port
    except ValueError:
        port = None
    return port or (443 if parts.scheme == "https" else 80)


def _size(option: str, value: str) -> int:
    try:
        size = parse_size(value)
    except ValueError as e:
        raise exceptions.OptionsError(f"{option}: {value!r} is not a size (e.g. 256MB): {e}") from e
    if size <= 0:
        raise exceptions.OptionsError(f"{option}: {value!r} must be more than 0")
    return size


def _duration(option: str, value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as e:
        raise exceptions.OptionsError(
            f"{option}: {value!r} is not a duration (e.g. 30s): {e}"
        ) from e


addons = [Cache()]
