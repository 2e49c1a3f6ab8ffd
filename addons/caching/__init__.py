"""The RFC 9111 shared HTTP cache; `addons/cache.py` is the entry mitmdump loads.

rfc9111     pure RFC 9111 decisions: freshness, Cache-Control, HTTP-dates, storability, Vary,
            304 merging, ranges, targeted fields
key         URL normalisation, the cache key, eligibility globs, the request fields looked at
store       stored entries and the TLRU store with its URL index
state       what the parts share: parsed options, the store, counts; the per-flow record
answer      answers from stored entries (hits, 304s, ranges, stale) and the status fields
lookup      the request side: eligibility, lookup, waits, conditional requests upstream
storing     the response side: storing, 304 freshening, invalidation by unsafe methods
revalidate  one origin fetch per key, stale-while-revalidate in the background
admin       purge (published to the other processes through Redis) and stats
collector   the cache_* metric families
patch       the waypost_origin_unavailable hook and the mitmproxy patch that fires it
options     the cache_* options: declared and parsed
addon       the Cache addon: its hooks hand over to the parts above
"""
