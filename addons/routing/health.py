"""Active health checks (one aiohttp session per run) and the router's state-change log lines."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from addons.kernel import options
from addons.routing import balance
from addons.routing.balance import Backend

log = logging.getLogger("waypost.router")


class HealthChecks:
    """GET `path` on every backend each `interval`; restarted whenever the settings change."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    def start(
        self, backends: Sequence[Backend], path: str, interval: float, timeout: float
    ) -> None:
        self.stop()
        if not backends:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # configure outside the loop (unit tests)
            return
        self._task = options.spawn(self._loop(list(backends), path, interval, timeout))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _loop(
        self, backends: list[Backend], path: str, interval: float, timeout: float
    ) -> None:
        import aiohttp

        client_timeout = aiohttp.ClientTimeout(total=timeout)
        async with aiohttp.ClientSession(timeout=client_timeout, trust_env=False) as session:
            while True:
                await asyncio.gather(
                    *(check(session, b, path) for b in backends), return_exceptions=True
                )
                await asyncio.sleep(interval)


async def check(session: Any, b: Backend, path: str) -> None:
    try:
        async with session.get(b.url + path, allow_redirects=False) as resp:
            ok = resp.status < 400
            reason = f"health check status {resp.status}"
    except TimeoutError:
        ok, reason = False, "health check timeout"
    except Exception as e:  # connection refused, reset, DNS: all mean not healthy
        ok, reason = False, f"health check failed: {type(e).__name__}"
    if not ok:
        b.failures.append(balance.Failure(time.time(), reason))
    changed = b.health.record(ok)
    if changed is not None:
        log_health(b, reason if not ok else "health check passed")


def log_circuit(b: Backend, change: tuple[str, str], why: str) -> None:
    log.warning(
        "circuit %s -> %s for backend %s (%s)",
        change[0],
        change[1],
        b.name,
        why,
        extra={"waypost": {"backend": b.name, "circuit_from": change[0], "circuit_to": change[1]}},
    )


def log_health(b: Backend, reason: str) -> None:
    state = "healthy" if b.health.healthy else "unhealthy"
    log.warning(
        "backend %s is %s (%s)",
        b.name,
        state,
        reason,
        extra={"waypost": {"backend": b.name, "health": state}},
    )
