"""Purge and statistics: the cache's management routes (admin bearer token, checked by the
management app, which finds them through the addon's duck-typed `management_routes`).

- `DELETE /admin/cache` with `pattern=<glob over URL or host>` and/or
  `tag=<Surrogate-Key / Cache-Tag>`, `soft=true` to mark stale instead of dropping
  -> `{"invalidated": n, "remaining": m}` (this process's counts). With state_backend redis
  the purge is also published on `cache.purge` and every other process applies it on receipt;
  the answer adds `"published": true`, or `false` with a `warning` (and a WARNING logged) when
  Redis could not take it: the purge then applied to this process only.
- `GET /admin/cache/stats` -> sizes, limits, hit and miss rates, evictions, counts by result.
- the readiness check: `"cache": "ok"` (PRD §7.2.1), `"disabled"` when cache_enabled is off
  (still ready: a proxy without a cache serves).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from addons import errors
from addons.caching.answer import RESULTS, SERVED_FROM_CACHE
from addons.caching.key import compile_globs
from addons.caching.state import Shared
from addons.state import STATE

log = logging.getLogger("waypost.cache")

CHANNEL = "cache.purge"
NOT_PUBLISHED = "Redis is unavailable: purged on this process only."

Handler = Callable[[web.Request], Awaitable[web.Response]]


class Admin:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    def purge(self, pattern: str | None = None, tag: str | None = None, soft: bool = False) -> int:
        """Drop (or with soft, mark stale) the entries whose URL or host match the glob and/or
        that carry the tag. Returns how many."""
        rx = compile_globs([pattern]) if pattern else None
        store = self.shared.store
        n = 0
        for entry in list(store.entries()):
            if rx is not None and not (
                rx.match(entry.url) or rx.match(urlsplit(entry.url).hostname or "")
            ):
                continue
            if tag is not None and tag not in entry.tags:
                continue
            if soft:
                entry.stale = True
            else:
                store.drop(entry.key)
            n += 1
        return n

    async def publish(self, pattern: str | None, tag: str | None, soft: bool) -> bool:
        """Send a purge to every other process; False (and a WARNING) when Redis is down."""
        message = {"pattern": pattern, "tag": tag, "soft": soft}
        published = await STATE.publish(CHANNEL, message)
        if not published:
            log.warning(
                "cache purge (pattern=%r, tag=%r) applied to this process only: Redis is "
                "unavailable, the other processes keep their entries",
                pattern,
                tag,
            )
        return published

    def received(self, message: dict[str, Any]) -> None:
        """A purge published by another process: apply it here."""
        pattern, tag = message.get("pattern"), message.get("tag")
        if not isinstance(pattern, str | None) or not isinstance(tag, str | None):
            log.warning("cache: ignored a malformed purge message %r", message)
            return
        soft = message.get("soft") is True
        n = self.purge(pattern, tag, soft)
        log.info(
            "cache purge from another process",
            extra={"waypost": {"pattern": pattern, "tag": tag, "soft": soft, "invalidated": n}},
        )

    def stats(self) -> dict[str, Any]:
        shared = self.shared
        counts = shared.counts
        lookups = sum(counts.get(r, 0) for r in RESULTS if r != "BYPASS")
        hits = sum(counts.get(r, 0) for r in SERVED_FROM_CACHE)
        misses = counts.get("MISS", 0) + counts.get("EXPIRED", 0)
        store = shared.store
        return {
            "enabled": shared.enabled,
            "size": store.currsize,
            "max_memory": store.maxsize,
            "entries": len(store),
            "max_entries": store.max_entries,
            "hit_rate": round(hits / lookups, 4) if lookups else 0.0,
            "miss_rate": round(misses / lookups, 4) if lookups else 0.0,
            "evictions": shared.evictions(),
            "results": {r: counts.get(r, 0) for r in RESULTS},
        }

    def readiness(self) -> tuple[str, str, bool]:
        # The store is in-process memory: enabled means it works.
        return "cache", "ok" if self.shared.enabled else "disabled", True

    def routes(self) -> dict[str, Handler]:
        return {"/admin/cache": self._purge, "/admin/cache/stats": self._stats}

    async def _purge(self, request: web.Request) -> web.Response:
        if request.method != "DELETE":
            return errors.web_error(
                "METHOD_NOT_ALLOWED", "Use DELETE.", headers={"Allow": "DELETE"}
            )
        pattern = request.query.get("pattern") or None
        tag = request.query.get("tag") or None
        if pattern is None and tag is None:
            return errors.web_error(
                "BAD_REQUEST", "Give pattern=<glob over URL or host> or tag=<tag>."
            )
        soft = request.query.get("soft", "").lower() in ("1", "true", "yes")
        n = self.purge(pattern, tag, soft)
        log.info(
            "cache purge",
            extra={"waypost": {"pattern": pattern, "tag": tag, "soft": soft, "invalidated": n}},
        )
        body: dict[str, Any] = {"invalidated": n, "remaining": len(self.shared.store)}
        if STATE.shared:
            body["published"] = await self.publish(pattern, tag, soft)
            if not body["published"]:
                body["warning"] = NOT_PUBLISHED
        return web.json_response(body)

    async def _stats(self, request: web.Request) -> web.Response:
        if request.method not in ("GET", "HEAD"):
            return errors.web_error(
                "METHOD_NOT_ALLOWED", "Use GET.", headers={"Allow": "GET, HEAD"}
            )
        return web.json_response(self.stats())
