"""The cache's flat options: declared in `load`, parsed into the shared state in `configure`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from mitmproxy import exceptions

from addons.caching.key import compile_globs
from addons.caching.state import Shared
from addons.caching.store import Settings
from addons.kernel.options import Option, at_least, duration, size

_SURROGATE_NAME = re.compile(r"[A-Za-z0-9_.-]+")

OPTIONS: tuple[Option, ...] = (
    Option("cache_enabled", bool, True, "Answer cacheable GET/HEAD requests from memory.", None),
    Option(
        "cache_max_memory",
        str,
        "256MB",
        "Byte budget of the cache (bodies, headers, bookkeeping), e.g. 256MB; least "
        "recently used entries are evicted beyond it.",
        None,
    ),
    Option("cache_max_entries", int, 10000, "Most responses kept (all Vary variants count).", None),
    Option(
        "cache_max_object_size",
        str,
        "1MB",
        "Largest body stored, e.g. 1MB (bodies streamed by stream_large_bodies are never stored).",
        None,
    ),
    Option(
        "cache_default_ttl",
        str,
        "300s",
        "Upper bound of heuristic freshness (10% of the time since Last-Modified); in mode "
        "default_ttl also the lifetime of heuristically cacheable responses without one.",
        None,
    ),
    Option(
        "cache_mode",
        str,
        "rfc",
        "rfc: freshness only from the origin's headers and the Last-Modified heuristic; "
        "default_ttl: as rfc, and responses without any get cache_default_ttl.",
        ["rfc", "default_ttl"],
    ),
    Option(
        "cache_patterns",
        Sequence[str],
        [],
        "Globs over URL, host or path that may be cached (e.g. *.css, /static/*); empty: "
        "any URL. A router rule's cache setting overrides them.",
        None,
    ),
    Option(
        "cache_coalesce_timeout",
        str,
        "5s",
        "How long concurrent misses for one URL wait for the first one's answer before "
        "going upstream themselves.",
        None,
    ),
    Option(
        "cache_max_waiters",
        int,
        100,
        "Most requests waiting for one URL's origin fetch; more go upstream at once.",
        None,
    ),
    Option(
        "cache_surrogate",
        bool,
        True,
        "For reverse-proxied and routed requests, act as the origin's surrogate (CDN): "
        "CDN-Cache-Control, else Surrogate-Control (untargeted or targeted at "
        "cache_surrogate_name), replaces Cache-Control and Expires for this cache; "
        "Surrogate-Capability is sent upstream and Surrogate-Control is not passed on.",
        None,
    ),
    Option(
        "cache_surrogate_name",
        str,
        "waypost",
        "This cache's device token for Surrogate-Control targeting "
        '(`max-age=60;waypost`), announced as `Surrogate-Capability: waypost="Surrogate/1.0"`.',
        None,
    ),
    Option(
        "cache_stale_on_error",
        bool,
        False,
        "When the origin cannot be reached or fails before a complete response (refused, "
        "timeout, DNS failure, connection closed), answer with the stored response even "
        "without stale-if-error, as a disconnected cache may (RFC 9111 §4.2.4; nginx's "
        "proxy_cache_use_stale error timeout); stored responses are then kept an hour past "
        "their freshness. Never for must-revalidate, proxy-revalidate, s-maxage or "
        "no-cache responses, nor for an origin's 5xx answers (stale-if-error only).",
        None,
    ),
)

_BUDGET = {"cache_max_memory", "cache_max_entries", "cache_max_object_size"}
_SETTINGS = {"cache_default_ttl", "cache_mode", "cache_surrogate_name", "cache_stale_on_error"}


def apply(shared: Shared, opts: Any, updated: set[str]) -> None:
    """Parse the updated options into `shared`; `OptionsError` naming the option if one is
    invalid."""
    if "cache_enabled" in updated:
        shared.enabled = opts.cache_enabled
    if updated & _BUDGET:
        _budget(shared, opts)
    if updated & _SETTINGS:
        ttl = duration("cache_default_ttl", opts.cache_default_ttl)
        device = opts.cache_surrogate_name
        if not _SURROGATE_NAME.fullmatch(device):
            raise exceptions.OptionsError(
                f"cache_surrogate_name: {device!r} is not a token (letters, digits, -_.)"
            )
        shared.settings = Settings(ttl, opts.cache_mode, device, opts.cache_stale_on_error)
    if "cache_surrogate" in updated:
        shared.surrogate = opts.cache_surrogate
    if "cache_patterns" in updated:
        try:
            shared.patterns = compile_globs(list(opts.cache_patterns))
        except re.error as e:
            raise exceptions.OptionsError(f"cache_patterns: not a valid glob: {e}") from e
    if "cache_coalesce_timeout" in updated:
        shared.coalesce_timeout = duration("cache_coalesce_timeout", opts.cache_coalesce_timeout)
    if "cache_max_waiters" in updated:
        shared.max_waiters = at_least("cache_max_waiters", opts.cache_max_waiters, 0)


def _budget(shared: Shared, opts: Any) -> None:
    max_memory = size("cache_max_memory", opts.cache_max_memory, minimum=1)
    max_object = size("cache_max_object_size", opts.cache_max_object_size, minimum=1)
    max_entries = at_least("cache_max_entries", opts.cache_max_entries, 1)
    if max_object > max_memory:
        raise exceptions.OptionsError(
            f"cache_max_object_size: {opts.cache_max_object_size} is larger than "
            f"cache_max_memory ({opts.cache_max_memory})"
        )
    shared.max_object_size = max_object
    store = shared.store
    if store.maxsize != max_memory or store.max_entries != max_entries:
        shared.evictions_before += store.evictions
        shared.store = store.resized(max_memory, max_entries)
