"""What the router shows operators: `GET /admin/backends`, the readiness check's backends."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from addons import errors
from addons.routing.balance import Backend


def backend_states(backends: Iterable[Backend], breaker_enabled: bool) -> list[dict[str, Any]]:
    now, wall = time.monotonic(), time.time()
    return [
        {
            "name": b.name,
            "url": b.url,
            "status": "healthy" if b.health.healthy else "unhealthy",
            "circuit": b.breaker.state,
            "available": b.health.healthy
            and now >= b.unavailable_until
            and (not breaker_enabled or b.breaker.peek(now)),
            "active_requests": b.active,
            "requests": b.requests,
            "consecutive_failures": b.breaker.failures,
            "retry_after_seconds": round(max(0.0, b.unavailable_until - now), 3),
            "circuit_opened": (
                _iso(wall - (now - b.breaker.opened_at)) if b.breaker.state != "closed" else None
            ),
            "last_failures": [{"at": _iso(f.at), "reason": f.reason} for f in reversed(b.failures)],
        }
        for b in backends
    ]


def readiness(states: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]], bool]:
    """PRD §7.2.1's `"backends": [{"url", "status"}, ...]`, plus each one's name and circuit;
    ready while any backend is available (or none is configured)."""
    ok = not states or any(s["available"] for s in states)
    shown = [
        {"name": s["name"], "url": s["url"], "status": s["status"], "circuit": s["circuit"]}
        for s in states
    ]
    return "backends", shown, ok


async def backends_page(request: Any, states: Callable[[], list[dict[str, Any]]]) -> Any:
    from aiohttp import web

    if request.method not in ("GET", "HEAD"):
        return web.json_response(
            json.loads(errors.body("METHOD_NOT_ALLOWED", "Use GET.", errors.new_request_id())),
            status=405,
            headers={"Allow": "GET, HEAD"},
        )
    return web.json_response(
        {"timestamp": errors.timestamp(), "backends": states()},
        headers={"Cache-Control": "no-store"},
    )


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
