"""Shared state: what the workers of an instance and the instances of a deployment share.

`state_backend: memory` (the default) shares nothing: every process keeps its own rate-limit
buckets, bans, cache and breakers, as a single mitmdump always did. `state_backend: redis`
puts them in Redis (redis-py's asyncio client, one connection pool per process), so that ten
instances behind one Service limit a client, ban it, purge an entry and stop sending to a
dead backend as one.

Redis is never allowed to stall a request. Every call is bounded by `state_timeout`; a call
that fails or times out returns `UNAVAILABLE`, and its caller decides on its local state
instead (counted in `waypost_state_fallbacks_total{op}`). The first failure logs one WARNING
and marks Redis down: from then on calls return `UNAVAILABLE` at once, without waiting for a
timeout, while a background probe pings Redis every second; the first answer logs an INFO and
Redis is used again. Readiness shows `degraded` meanwhile but stays ready: a proxy that limits
per process is better than no proxy.

Pub/sub carries what must reach every process at once (a purge, a breaker opening):
`subscribe(channel, handler)` registers a handler for messages published by *other* processes
(each message names its sender); `publish(channel, payload)` sends a JSON object. The listener
resubscribes by itself after Redis comes back; what was published while it was down is lost,
which is why the users of pub/sub also keep short-lived keys where a late reader needs them.

Used by addons through module functions, like `kernel/net.py`'s option: each addon that uses
shared state calls `state.load(loader)` and `state.configure(updated)` from its own hooks, and
`state.done()` from its `done`; the one `SharedState` of the process (`STATE`) connects lazily
on first use.

Options: state_backend, state_redis_url, state_key_prefix, state_timeout.
Metrics: waypost_state_redis_up, waypost_state_calls_total{op}, waypost_state_fallbacks_total{op},
waypost_state_call_seconds (histogram of successful calls).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final, TypeVar

import redis.asyncio as aioredis
from mitmproxy import ctx, exceptions
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from redis.exceptions import RedisError

from addons import metrics
from addons.kernel.options import Option, choice, declare, duration, once, spawn

log = logging.getLogger("waypost.state")

T = TypeVar("T")


class _Unavailable:
    """What a call returns when Redis could not answer in time: decide locally."""

    def __repr__(self) -> str:
        return "UNAVAILABLE"

    def __bool__(self) -> bool:
        return False


UNAVAILABLE: Final = _Unavailable()

BACKENDS = ("memory", "redis")
PROBE_INTERVAL = 1.0
# Successful call latencies: a loopback round trip is ~0.1 ms, a cross-zone one a few ms.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

OPTIONS: tuple[Option, ...] = (
    Option(
        "state_backend",
        str,
        "memory",
        "Where shared state lives (rate-limit buckets, bans, cache purges, breaker openings): "
        "memory (each process its own) or redis (shared by every worker and instance through "
        "state_redis_url).",
        BACKENDS,
    ),
    Option(
        "state_redis_url",
        str,
        "redis://127.0.0.1:6379/0",
        "Redis URL for state_backend redis (redis://[user:password@]host:port/db, rediss:// "
        "for TLS, unix:///path.sock).",
    ),
    Option(
        "state_key_prefix",
        str,
        "waypost",
        "Prefix of every Redis key and channel, so deployments can share one Redis.",
    ),
    Option(
        "state_timeout",
        str,
        "50ms",
        "Longest a request waits for Redis; after a failure or timeout requests decide on "
        "local state at once until Redis answers again (probed every second).",
    ),
)


class SharedState:
    """The process's connection to shared state, its health, and its pub/sub listener."""

    def __init__(self) -> None:
        self.backend = "memory"
        self.url = ""
        self.prefix = "waypost"
        self.timeout = 0.05
        # Tells this process's messages apart from the other processes' on a channel.
        self.sender = f"{socket.gethostname()}:{os.getpid()}"
        self._client: aioredis.Redis | None = None
        self.up = False
        self.calls: dict[str, int] = {}
        self.fallbacks: dict[str, int] = {}
        self.latency = _Histogram()
        self.handlers: dict[str, list[Callable[[dict[str, Any]], None]]] = {}
        self._probe: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None

    # --- configuration ------------------------------------------------------------------------

    def configure(self, backend: str, url: str, prefix: str, timeout: float) -> None:
        if (backend, url, prefix, timeout) == (self.backend, self.url, self.prefix, self.timeout):
            return
        self.close()
        self.backend, self.url, self.prefix, self.timeout = backend, url, prefix, timeout

    @property
    def client(self) -> aioredis.Redis | None:
        """The Redis client (made on first use, again after `close`); None with memory."""
        if self._client is None and self.backend == "redis":
            self._client = client_for(self.url, self.timeout)
            # Optimistic: the first call finds out; nothing is probed before traffic needs it.
            self.up = True
        return self._client

    @property
    def shared(self) -> bool:
        """Whether state is shared at all (the redis backend is configured)."""
        return self.backend == "redis"

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def readiness(self) -> tuple[str, str, bool]:
        """The `state` entry of /health/readiness: never fails the probe."""
        if not self.shared:
            return ("state", "memory", True)
        return ("state", "ok" if self.up else "degraded", True)

    # --- calls --------------------------------------------------------------------------------

    async def call(self, op: str, fn: Callable[[aioredis.Redis], Awaitable[T]]) -> T | _Unavailable:
        """`fn(client)` within the timeout, or UNAVAILABLE (Redis down, slow or failing)."""
        client = self.client
        if client is None:
            return UNAVAILABLE  # memory: there is nothing to share
        if not self.up:
            self._fallback(op)
            return UNAVAILABLE
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                result = await fn(client)
        except (RedisError, OSError, TimeoutError) as e:
            self._down(op, e)
            return UNAVAILABLE
        self.calls[op] = self.calls.get(op, 0) + 1
        self.latency.observe(time.perf_counter() - start)
        return result

    def _fallback(self, op: str) -> None:
        self.fallbacks[op] = self.fallbacks.get(op, 0) + 1

    def _down(self, op: str, error: BaseException) -> None:
        self._fallback(op)
        if not self.up:
            return
        self.up = False
        log.warning(
            "state: Redis at %s did not answer %s in time (%s); deciding on local state until "
            "it answers again",
            redacted(self.url),
            op,
            type(error).__name__ if isinstance(error, TimeoutError) else error,
        )
        if self._probe is None or self._probe.done():
            self._probe = spawn(self._wait_for_redis())

    async def _wait_for_redis(self) -> None:
        while self._client is not None and not self.up:
            await asyncio.sleep(PROBE_INTERVAL)
            client = self._client
            if client is None:
                return
            try:
                async with asyncio.timeout(max(self.timeout, 0.5)):
                    await client.ping()
            except (RedisError, OSError, TimeoutError):
                continue
            self.up = True
            log.info("state: Redis at %s answers again; shared state is back", redacted(self.url))

    # --- pub/sub ------------------------------------------------------------------------------

    def subscribe(self, channel: str, handler: Callable[[dict[str, Any]], None]) -> None:
        """Call `handler(payload)` for every message another process publishes on `channel`."""
        handlers = self.handlers.setdefault(channel, [])
        if handler not in handlers:
            handlers.append(handler)
        if self.shared and (self._listener is None or self._listener.done()):
            try:
                self._listener = spawn(self._listen())
            except RuntimeError:
                pass  # no running loop yet (load time): the next subscribe or publish starts it

    def unsubscribe(self, channel: str, handler: Callable[[dict[str, Any]], None]) -> None:
        handlers = self.handlers.get(channel, [])
        if handler in handlers:
            handlers.remove(handler)

    async def publish(self, channel: str, payload: dict[str, Any]) -> bool:
        """Send `payload` to every other process; False when Redis could not take it."""
        if self.shared and self.handlers and (self._listener is None or self._listener.done()):
            self._listener = spawn(self._listen())
        message = json.dumps({"from": self.sender, "payload": payload})
        result = await self.call("publish", lambda r: r.publish(self.key(channel), message))
        return result is not UNAVAILABLE

    async def _listen(self) -> None:
        # Subscribed to every channel that has handlers now; a channel added later is picked up
        # on the next reconnect or by the one-second re-check below.
        while (client := self.client) is not None and self.handlers:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                channels = {self.key(c): c for c in self.handlers}
                await pubsub.subscribe(*channels)
                while self._client is client:
                    if set(channels.values()) != set(self.handlers):
                        break
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._deliver(channels.get(_text(message["channel"]), ""), message)
            except (RedisError, OSError) as e:
                log.debug("state: pub/sub listener lost Redis (%s); resubscribing", e)
                await asyncio.sleep(PROBE_INTERVAL)
            finally:
                await _close_quietly(pubsub)

    def _deliver(self, channel: str, message: dict[str, Any]) -> None:
        try:
            envelope = json.loads(message["data"])
            sender, payload = envelope["from"], envelope["payload"]
        except (ValueError, KeyError, TypeError):
            log.warning("state: ignored a malformed message on %s", channel)
            return
        if sender == self.sender:
            return
        for handler in list(self.handlers.get(channel, ())):
            try:
                handler(payload)
            except Exception:
                log.exception("state: handler for %s failed", channel)

    # --- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        for task in (self._probe, self._listener):
            if task is not None and not task.done():
                task.cancel()
        self._probe = self._listener = None
        client, self._client = self._client, None
        self.up = False
        if client is not None:
            try:
                spawn(client.aclose())
            except RuntimeError:
                pass  # no loop left (interpreter shutdown): the sockets close with the process


def client_for(url: str, timeout: float) -> aioredis.Redis:
    """A Redis client for `url` that gives up on a socket within `timeout` (ValueError: bad URL)."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=max(timeout, 0.01),
        socket_connect_timeout=max(timeout, 0.01),
        # Waypost decides what to do without Redis; redis-py's own retries would only wait.
        retry_on_timeout=False,
        retry=None,
        health_check_interval=30,
    )


def redacted(url: str) -> str:
    """The URL with any password replaced, for logs."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{host}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _close_quietly(pubsub: Any) -> None:
    try:
        await pubsub.aclose()
    except (RedisError, OSError, RuntimeError):
        pass


# --- metrics ------------------------------------------------------------------------------------


class _Histogram:
    """Successful call latencies, observed without prometheus_client's lock per call."""

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        i = 0
        while i < len(BUCKETS) and seconds > BUCKETS[i]:
            i += 1
        self.counts[i] += 1
        self.total += seconds


class _Collector:
    def collect(self) -> Iterator[Metric]:
        s = STATE
        up = GaugeMetricFamily(
            "waypost_state_redis_up",
            "1 while Redis answers (state_backend redis), 0 while requests decide locally.",
        )
        up.add_metric([], 1.0 if s.shared and s.up else 0.0)
        yield up
        calls = CounterMetricFamily(
            "waypost_state_calls", "Redis calls that answered in time, by operation.", labels=["op"]
        )
        for op, n in sorted(s.calls.items()):
            calls.add_metric([op], n)
        yield calls
        fallbacks = CounterMetricFamily(
            "waypost_state_fallbacks",
            "Decisions taken on local state because Redis was down, slow or failing, by operation.",
            labels=["op"],
        )
        for op, n in sorted(s.fallbacks.items()):
            fallbacks.add_metric([op], n)
        yield fallbacks
        h = s.latency
        cumulative, buckets = 0, []
        for bound, count in zip((*map(str, BUCKETS), "+Inf"), h.counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "waypost_state_call_seconds",
            "Latency of Redis calls that answered in time.",
            buckets=buckets,
            sum_value=h.total,
        )


def _collector() -> _Collector:
    collector = _Collector()
    metrics.REGISTRY.register(collector)
    return collector


STATE: SharedState = once("state", SharedState)
COLLECTOR = once("state.collector", _collector)


# --- what each addon using shared state calls from its hooks ------------------------------------


def load(loader: Any) -> None:
    declare(loader, OPTIONS)


def configure(updated: set[str]) -> None:
    if not updated & {o.name for o in OPTIONS}:
        return
    o = ctx.options
    backend = choice("state_backend", o.state_backend, BACKENDS)
    timeout = duration("state_timeout", o.state_timeout, 0.001)
    if backend == "redis":
        try:
            client_for(o.state_redis_url, timeout)
        except ValueError as e:
            raise exceptions.OptionsError(f"state_redis_url: {e}") from None
    STATE.configure(backend, o.state_redis_url, o.state_key_prefix, timeout)


def done() -> None:
    STATE.close()
