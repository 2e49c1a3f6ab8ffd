"""An RFC 9111 shared HTTP cache in memory: hits answered in `request`, stores in `response`.

The code is the package `addons/caching/` (its `__init__` lists the modules); this entry lets
`mitmdump -s addons/cache.py` load the cache alone. Key: SHA-256 over method,
normalised URL and the Vary fields' request values. Eligible: GET and HEAD, by the router's
per-route setting, else `cache_patterns`. Headers: `X-Cache-Status` (HIT, MISS, STALE,
REVALIDATED, BYPASS, EXPIRED), RFC 9211 `Cache-Status`, `Age`.

Hooks:
    load, configure, running, done   options, the origin-failure patch, background tasks
    request                          lookup: a usable entry answers here; coalesced misses
    response                         store, freshen with a 304, invalidate on unsafe methods
    error                            wake requests waiting for the failed fetch
    waypost_origin_unavailable       a stale answer when the origin fails (stale-if-error)
Management: `DELETE /admin/cache` (pattern, tag, soft; with state_backend redis published to
every other process, which applies it), `GET /admin/cache/stats`.
Metrics: cache_requests_total{result}, cache_bytes, cache_entries, cache_evictions_total.

Options:
    cache_enabled            answer cacheable GET/HEAD requests from memory
    cache_max_memory         byte budget (LRU eviction beyond it)
    cache_max_entries        most responses kept
    cache_max_object_size    largest body stored
    cache_default_ttl        upper bound of heuristic freshness (and default_ttl mode's lifetime)
    cache_mode               rfc, or default_ttl for responses without freshness
    cache_patterns           globs over URL, host or path that may be cached
    cache_coalesce_timeout   how long concurrent misses wait for the first one's answer
    cache_max_waiters        most requests waiting for one fetch
    cache_surrogate          act as the origin's surrogate for reverse and routed requests
    cache_surrogate_name     the device token for Surrogate-Control targeting
    cache_stale_on_error     answer stale when the origin is down, without stale-if-error
    state_*                  shared state (`addons/state.py`): where purges are published
"""

from __future__ import annotations

from addons.caching.addon import Cache

addons = [Cache()]
