"""Circuit breakers shared by every process through `addons/state.py` (state_backend redis).

A backend is the same backend everywhere by its name and URL (both from the routing
configuration, the same on every instance). Every Redis call runs in the background: no request
ever waits on Redis, and while Redis is down each process's breakers are its own, as with the
memory backend.

- failures: each failure a process counts against a closed circuit is added to the fleet's count
  (`<prefix>:breaker:failures:<name>:<url>`, forgotten `timeout` after the last failure), so
  `failure_threshold` counts the failures seen by every process; a process that sees a success
  after one of its failures resets that count (a success without a failure before it costs no
  Redis call).
- opening: the process whose own count, or the fleet's, reaches the threshold (or whose
  half-open trial failed) opens its circuit, records `<prefix>:breaker:open:<name>:<url>` with a
  TTL of the open duration and publishes `breaker` {backend, url, state: open, seconds}; every
  other process opens its circuit for that long, without counting a failure, and runs its own
  half-open trial afterwards.
- closing: a successful trial closes the circuit, deletes the key and publishes `closed`; the
  others close theirs.
- late readers: every second while Redis answers, the open keys are read (one pipelined PTTL per
  backend), so a process that starts, reconnects or missed a message catches up within a second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from addons.kernel.options import spawn
from addons.routing import health
from addons.routing.balance import Backend, State
from addons.state import STATE, UNAVAILABLE

log = logging.getLogger("waypost.router")

CHANNEL = "breaker"
SYNC_INTERVAL = 1.0
# An open key with less left than this is about to expire by itself: its opener's own circuit
# goes half-open at that moment, and reopening for the rest would only log twice.
SYNC_SLACK = 0.1


class SharedBreakers:
    """The router's side of shared breakers: publishes its changes, applies the others'."""

    def __init__(self, backends: Callable[[], Mapping[str, Backend]]) -> None:
        self.backends = backends
        # Backends this process counted a failure for since its last success there.
        self._failed: set[str] = set()
        self._sync: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Subscribe and read the open keys every second (redis backend, in the event loop)."""
        if not STATE.shared:
            return
        STATE.subscribe(CHANNEL, self.received)
        if self._sync is None or self._sync.done():
            self._sync = spawn(self._sync_loop())

    def stop(self) -> None:
        STATE.unsubscribe(CHANNEL, self.received)
        if self._sync is not None:
            self._sync.cancel()
            self._sync = None

    # --- this process's outcomes ---------------------------------------------------------------

    def outcome(
        self, b: Backend, ok: bool, counted: bool, change: tuple[State, State] | None
    ) -> None:
        """After `b.breaker.record`: `counted` when the failure counted against a closed
        circuit, `change` the state change it made."""
        if not STATE.shared:
            return
        if change is not None and change[1] == "open":
            spawn(self._opened(b))
        elif change is not None and change[1] == "closed":
            self._failed.discard(b.name)
            spawn(self._closed(b))
        elif not ok and counted:
            self._failed.add(b.name)
            spawn(self._count(b))
        elif ok and b.name in self._failed:
            self._failed.discard(b.name)
            spawn(STATE.call("breaker_reset", lambda r: r.delete(_key("failures", b))))

    async def _count(self, b: Backend) -> None:
        breaker = b.breaker
        ttl = max(1, int(breaker.timeout * 1000))

        async def incr(r: Any) -> int:
            async with r.pipeline(transaction=False) as p:
                p.incr(_key("failures", b))
                p.pexpire(_key("failures", b), ttl)
                count, _ = await p.execute()
            return int(count)

        count = await STATE.call("breaker_failure", incr)
        if count is UNAVAILABLE or count < breaker.failure_threshold or breaker.state != "closed":
            return
        change = breaker.open_for(breaker.timeout, time.monotonic())
        if change is not None:
            health.log_circuit(b, change, f"{count} failures counted by every process")
            await self._opened(b)

    async def _opened(self, b: Backend) -> None:
        seconds = b.breaker.timeout
        ttl = max(1, int(seconds * 1000))

        async def record(r: Any) -> None:
            async with r.pipeline(transaction=False) as p:
                p.set(_key("open", b), "1", px=ttl)
                p.delete(_key("failures", b))
                await p.execute()

        await STATE.call("breaker_open", record)
        payload = {"backend": b.name, "url": b.url, "state": "open", "seconds": seconds}
        await STATE.publish(CHANNEL, payload)

    async def _closed(self, b: Backend) -> None:
        await STATE.call("breaker_close", lambda r: r.delete(_key("open", b)))
        await STATE.publish(CHANNEL, {"backend": b.name, "url": b.url, "state": "closed"})

    # --- the other processes' ------------------------------------------------------------------

    def received(self, payload: dict[str, Any]) -> None:
        b = self.backends().get(str(payload.get("backend")))
        if b is None or b.url != payload.get("url"):
            return  # not a backend this process routes to (another configuration)
        now = time.monotonic()
        if payload.get("state") == "open":
            seconds = float(payload.get("seconds") or b.breaker.timeout)
            change = b.breaker.open_for(seconds, now)
            why = "opened by another process"
        elif payload.get("state") == "closed":
            change = b.breaker.close(now)
            why = "another process's trial succeeded"
        else:
            return
        if change is not None:
            health.log_circuit(b, change, why)

    async def _sync_loop(self) -> None:
        while STATE.shared:
            if STATE.client is not None and STATE.up:
                await self.sync()
            await asyncio.sleep(SYNC_INTERVAL)

    async def sync(self) -> None:
        """Open the circuits that are open elsewhere (their keys), for the time they have left."""
        backends = list(self.backends().values())
        if not backends:
            return

        async def read(r: Any) -> list[int]:
            async with r.pipeline(transaction=False) as p:
                for b in backends:
                    p.pttl(_key("open", b))
                return [int(ms) for ms in await p.execute()]

        left = await STATE.call("breaker_sync", read)
        if left is UNAVAILABLE:
            return
        now = time.monotonic()
        for b, ms in zip(backends, left, strict=True):
            if ms / 1000 > SYNC_SLACK:
                change = b.breaker.open_for(ms / 1000, now)
                if change is not None:
                    health.log_circuit(b, change, "open elsewhere (read from Redis)")


def _key(kind: str, b: Backend) -> str:
    return STATE.key("breaker", kind, b.name, b.url)
