"""Stored responses and the store that holds them in memory.

- `Entry`: one stored response with everything the hit path needs already computed.
- `Store`: a cachetools `TLRUCache` (LRU order, a per-entry expiry, a byte budget through
  `getsizeof`), plus an entry-count limit and an index of each URL's Vary field names and
  variants, so a lookup costs one index read and one hash. An entry is dropped when it can
  no longer be used: after its freshness lifetime plus what stale-while-revalidate /
  stale-if-error allow, or one hour more when it has a validator (so it can be revalidated
  with a 304) or `cache_stale_on_error` is on (so it can answer while the origin is down).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import NamedTuple

from cachetools import Cache as BaseCache
from cachetools import TLRUCache

from addons.caching import rfc9111 as rfc
from addons.caching.key import getter

# How long past its usable life an entry with a validator is kept for a 304 revalidation
# (and, with cache_stale_on_error, any entry, to answer while the origin is down).
KEEP_VALIDATABLE = 3600.0
# Per-entry bookkeeping beyond body and fields (object, key, URL), for the byte budget.
ENTRY_OVERHEAD = 512
_NO_TAGS: frozenset[str] = frozenset()


class Settings:
    """The options an entry's freshness is computed with."""

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
        get = getter(fields)
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

    def freshen(
        self,
        fields_304: Sequence[tuple[str, str]],
        request_time: float,
        response_time: float,
        settings: Settings,
        age_value: int,
    ) -> None:
        """Update the entry with a 304's fields (RFC 9111 §4.3.4): current again."""
        merged = rfc.merge_304(self.fields, fields_304)
        self.set_fields(merged, request_time, response_time, settings, age_value)
        self.stale = False

    def age(self, now: float) -> float:
        return self.initial_age + (now - self.response_time)


def _date(values: list[str]) -> float | None:
    return rfc.parse_http_date(values[0]) if len(values) == 1 else None


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

    def reinsert(self, entry: Entry) -> None:
        """Put a changed entry back, so the budget and the expiry heap see its new size and
        expiry."""
        vary = self.index.get(entry.primary)
        self.drop(entry.key)
        if entry.size <= self.maxsize:
            self.put(entry, vary[0] if vary else ())

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

    def resized(self, max_memory: int, max_entries: int) -> Store:
        """A new store with this budget, holding this one's entries (emptied), carried over
        least recently used first (popitem's order) so a smaller budget evicts those."""
        new = Store(max_memory, max_entries)
        vary_of = {primary: info[0] for primary, info in self.index.items()}
        while self:
            _key, entry = self.popitem()
            new.put(entry, vary_of.get(entry.primary, ()))
        return new
