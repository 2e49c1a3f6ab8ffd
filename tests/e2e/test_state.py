"""addons/state.py against a real redis-server: calls, the outage fallback, recovery, pub/sub."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from addons import state
from tests.redis_helpers import RedisServer


def shared(server: RedisServer, sender: str = "a", timeout: float = 0.05) -> state.SharedState:
    s = state.SharedState()
    s.sender = sender
    s.configure("redis", server.url, "test", timeout)
    return s


async def test_memory_backend_shares_nothing_and_counts_nothing() -> None:
    s = state.SharedState()
    assert await s.call("incr", lambda r: r.incr("x")) is state.UNAVAILABLE
    assert s.fallbacks == {} and s.readiness() == ("state", "memory", True)


async def test_a_call_answers_through_redis(redis_server: RedisServer) -> None:
    s = shared(redis_server)
    try:
        assert await s.call("incr", lambda r: r.incr(s.key("n"))) == 1
        assert await s.call("incr", lambda r: r.incr(s.key("n"))) == 2
        assert s.calls == {"incr": 2} and s.readiness() == ("state", "ok", True)
        assert redis_server.command("GET", "test:n").startswith(b"$1\r\n2")
    finally:
        s.close()


async def test_an_outage_falls_back_at_once_and_recovers_by_itself(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    s = shared(redis_server)
    try:
        assert await s.call("incr", lambda r: r.incr("k")) == 1
        redis_server.stop()
        with caplog.at_level(logging.INFO, logger="waypost.state"):
            tried = []

            def incr(r: Any) -> Any:
                tried.append(1)
                return r.incr("k")

            start = time.monotonic()
            assert await s.call("incr", incr) is state.UNAVAILABLE
            first = time.monotonic() - start
            for _ in range(100):
                assert await s.call("incr", incr) is state.UNAVAILABLE
            # The first call is bounded by the timeout (plus a connect refused: immediate); the
            # others do not even try while Redis is down.
            assert first < 0.5 and len(tried) == 1
            assert s.fallbacks == {"incr": 101}
            assert s.readiness() == ("state", "degraded", True)
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1 and "local state" in warnings[0].getMessage()

            redis_server.start()
            deadline = time.monotonic() + 5
            while not s.up and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert s.up, "shared state did not come back after Redis restarted"
            assert await s.call("incr", lambda r: r.incr("k")) == 1  # a fresh server
            assert any("answers again" in r.getMessage() for r in caplog.records)
    finally:
        s.close()


async def test_a_slow_redis_is_a_timeout_not_a_wait(redis_server: RedisServer) -> None:
    s = shared(redis_server, timeout=0.05)
    try:
        start = time.monotonic()
        # DEBUG SLEEP blocks the server for 0.5 s: the call gives up after the 50 ms timeout.
        result = await s.call("sleep", lambda r: r.execute_command("DEBUG", "SLEEP", "0.5"))
        assert result is state.UNAVAILABLE and time.monotonic() - start < 0.3
        assert s.readiness() == ("state", "degraded", True)
        deadline = time.monotonic() + 5
        while not s.up and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert s.up and await s.call("ping", lambda r: r.ping()) is True
    finally:
        s.close()


async def test_pubsub_reaches_the_other_processes_not_the_sender(
    redis_server: RedisServer,
) -> None:
    a, b = shared(redis_server, "a"), shared(redis_server, "b")
    got_a: list[dict] = []
    got_b: list[dict] = []
    try:
        a.subscribe("purge", got_a.append)
        b.subscribe("purge", got_b.append)
        # The listeners subscribe in the background: publish until b has seen one message.
        deadline = time.monotonic() + 5
        while not got_b and time.monotonic() < deadline:
            assert await a.publish("purge", {"url": "http://x/"})
            await asyncio.sleep(0.05)
        assert got_b and got_b[0] == {"url": "http://x/"}
        assert got_a == []
    finally:
        a.close()
        b.close()


def test_the_password_is_never_logged() -> None:
    assert state.redacted("redis://u:secret@h:6379/0") == "redis://u:***@h:6379/0"
    assert state.redacted("redis://h:6379/0") == "redis://h:6379/0"
