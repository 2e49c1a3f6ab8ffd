"""One origin fetch per key (coalescing), and stale-while-revalidate in the background.

- Coalescing: concurrent misses for a key wait for the first one's fetch (at most
  `cache_coalesce_timeout`, at most `cache_max_waiters` of them), then answer from the cache
  or go upstream themselves. A key whose answer was not storable is remembered for a minute
  so its requests are not serialised behind each other.
- stale-while-revalidate: the stale entry answers at once and a background task revalidates
  it with aiohttp, connecting to the very IP address the stored response came from (so the
  egress decision and its DNS pinning hold) with the request headers that went upstream.
  Behind an upstream proxy (no direct peer) the next request revalidates in the foreground.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from cachetools import TTLCache
from mitmproxy import ctx

from addons.caching import rfc9111 as rfc
from addons.caching.key import getter
from addons.caching.state import FlowState, Shared
from addons.caching.store import Entry, Origin, response_directives
from addons.kernel import options

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("waypost.cache")

UNCACHEABLE_TTL = 60.0
BACKGROUND_TIMEOUT = 30.0
_EMPTY = rfc.Directives()


class Flight:
    """One origin fetch in progress for a key, and how many requests wait for it."""

    __slots__ = ("done", "waiters", "started")

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.waiters = 0
        self.started = time.monotonic()


class Flights:
    """The origin fetches in progress by key, and the URLs whose answers were not storable."""

    def __init__(self) -> None:
        self.inflight: dict[str, Flight] = {}
        self.uncacheable: TTLCache[str, bool] = TTLCache(maxsize=10000, ttl=UNCACHEABLE_TTL)

    def current(self, key: str, timeout: float) -> Flight | None:
        """The fetch in progress for `key`, unless it outlived the wait bound (its flow may
        never report back, e.g. an intercepted or abandoned one): then nobody waits for it."""
        flight = self.inflight.get(key)
        if flight is not None and time.monotonic() - flight.started > timeout:
            del self.inflight[key]
            flight.done.set()
            return None
        return flight

    def release(self, state: FlowState) -> None:
        """The flow that leads a fetch has its answer (or error): wake its waiters."""
        if state.leader:
            flight = self.inflight.pop(state.leader, None)
            state.leader = None
            if flight is not None:
                flight.done.set()

    def end(self, key: str, flight: Flight) -> None:
        if self.inflight.get(key) is flight:
            del self.inflight[key]
        flight.done.set()


class Revalidator:
    """Background revalidations of stale entries; `close` cancels the ones it started."""

    def __init__(self, shared: Shared, flights: Flights) -> None:
        self.shared = shared
        self.flights = flights
        self.session: aiohttp.ClientSession | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self, flight_key: str, entry: Entry) -> bool:
        """Revalidate `entry` in the background; False if it cannot be (no direct origin)."""
        origin = entry.origin
        if origin is None or origin.scheme not in ("http", "https"):
            return False
        self.flights.inflight[flight_key] = flight = Flight()
        task = options.spawn(self._run(flight_key, flight, entry, origin))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.session is not None:
            session, self.session = self.session, None
            options.spawn(session.close())

    async def _run(self, flight_key: str, flight: Flight, entry: Entry, origin: Origin) -> None:
        import aiohttp

        try:
            if self.session is None:
                self.session = aiohttp.ClientSession(auto_decompress=False)
            request_time = time.time()
            async with self.session.get(
                _url(origin),
                headers=_conditional_headers(origin, entry),
                skip_auto_headers=("Accept-Encoding", "User-Agent"),
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=BACKGROUND_TIMEOUT),
                server_hostname=origin.sni if origin.scheme == "https" else None,
                ssl=not getattr(ctx.options, "ssl_insecure", False),
            ) as r:
                body = await self._read(r, entry)
                if body is None:
                    return
                fields = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in r.raw_headers]
                self.apply(entry, r.status, r.reason or "", fields, body, request_time, time.time())
        except Exception as e:  # an unreachable origin leaves the stale entry as it was
            log.debug("background revalidation of %s failed: %r", entry.url, e)
        finally:
            self.flights.end(flight_key, flight)

    async def _read(self, r: aiohttp.ClientResponse, entry: Entry) -> bytes | None:
        """The body, or None (and the entry dropped) past one object's worth: never hold
        more than that."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in r.content.iter_chunked(65536):
            size += len(chunk)
            if size > self.shared.max_object_size:
                self.shared.store.drop(entry.key)
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    def apply(
        self,
        entry: Entry,
        status: int,
        reason: str,
        fields: list[tuple[str, str]],
        body: bytes,
        request_time: float,
        response_time: float,
    ) -> None:
        """What the origin answered to a background revalidation of `entry`."""
        shared = self.shared
        store = shared.store
        if store.get(entry.key) is not entry:
            return  # purged or replaced while the revalidation ran
        get = getter(fields)
        age_value = rfc.parse_age(get("age"))
        if status == 304:
            entry.freshen(fields, request_time, response_time, shared.settings, age_value)
            store.reinsert(entry)
            return
        if status in rfc.ERROR_STATUSES:
            return  # keep serving stale while the windows allow
        resp_cc, expires = response_directives(
            get, shared.settings.device if entry.surrogate else None
        )
        vary_names = rfc.vary_names(get("vary"))
        vary = tuple(sorted(vary_names))
        if (
            len(body) > shared.max_object_size
            or get("set-cookie")
            or vary != (store.index.get(entry.primary) or ((),))[0]
            or rfc.storable("GET", status, _EMPTY, resp_cc, False, bool(expires), vary_names)
        ):
            store.drop(entry.key)
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
            shared.settings,
            entry.origin,
            age_value,
            entry.surrogate,
        )
        store.drop(entry.key)
        if new.expires_at > time.time() and new.size <= store.maxsize:
            store.put(new, vary)


def _url(origin: Origin) -> str:
    host, port = origin.peer
    if ":" in host:
        host = f"[{host}]"
    return f"{origin.scheme}://{host}:{port}{origin.target}"


def _conditional_headers(origin: Origin, entry: Entry) -> list[tuple[str, str]]:
    """The request headers that went upstream, conditional on the stored validators."""
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
    return headers
