"""Rate limits across workers and instances: the Lua bucket against a real redis-server, bans
(memory and Redis), /admin/bans, and each worker's share of a limit in memory mode."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from mitmproxy.test import taddons, tflow

from addons import metrics, ratelimit, schema, state
from addons.ratelimiting import bans
from tests.redis_helpers import RedisServer

SECOND_US = 1_000_000


def flow(ip: str = "192.0.2.1") -> Any:
    f = tflow.tflow()
    f.client_conn.peername = (ip, 40000)
    return f


def count(**labels: str) -> float:
    return metrics.REGISTRY.get_sample_value("policy_decisions_total", labels) or 0.0


# --- the Lua script -------------------------------------------------------------------------


class Script:
    """BUCKET_SCRIPT on its own client, with the keys the addon uses for one client."""

    def __init__(self, server: RedisServer) -> None:
        self.client = aioredis.Redis.from_url(server.url)
        self.script = self.client.register_script(bans.BUCKET_SCRIPT)
        self.keys = ["t:rl:default:192.0.2.1", "t:ban:192.0.2.1", "t:rlv:192.0.2.1", "t:bans"]

    async def __call__(
        self, interval: float, burst: int, after: int = 0, within: int = 60_000, ban: int = 5_000
    ) -> list[int]:
        return [
            int(x)
            for x in await self.script(
                self.keys, [interval, burst, after, within, ban, "192.0.2.1"]
            )
        ]


async def test_script_takes_burst_tokens_then_refuses(redis_server: RedisServer) -> None:
    s = Script(redis_server)
    try:
        answers = [await s(SECOND_US, 3) for _ in range(4)]
        assert [a[0] for a in answers] == [1, 1, 1, 0]
        _, retry_us, remaining, reset_us = answers[3]
        # three tokens at one per second: the next one in about a second, full in about three
        assert 0.9 * SECOND_US < retry_us <= SECOND_US and remaining == 0
        assert 2.9 * SECOND_US < reset_us <= 3 * SECOND_US
    finally:
        await s.client.aclose()


async def test_script_refills_on_redis_clock_and_keys_expire(redis_server: RedisServer) -> None:
    s = Script(redis_server)
    try:
        assert (await s(SECOND_US / 20, 1))[0] == 1
        assert (await s(SECOND_US / 20, 1))[0] == 0
        # the bucket is Redis's TIME plus one interval, and lives only while it refills
        seconds, micros = await s.client.time()
        full_at = float(await s.client.get(s.keys[0]))
        assert 0 < full_at - (seconds * SECOND_US + micros) <= SECOND_US / 20
        assert 0 < await s.client.pttl(s.keys[0]) <= 50
        await asyncio.sleep(0.08)
        assert await s.client.exists(s.keys[0]) == 0
        assert (await s(SECOND_US / 20, 1))[0] == 1
    finally:
        await s.client.aclose()


async def test_script_bans_after_n_violations_with_a_ttl(redis_server: RedisServer) -> None:
    s = Script(redis_server)
    try:
        assert (await s(SECOND_US, 1, after=3))[0] == 1
        assert [(await s(SECOND_US, 1, after=3))[0] for _ in range(2)] == [0, 0]
        assert await s.client.pttl(s.keys[2]) > 59_000  # the violations' window
        kind, ms, violations, _ = await s(SECOND_US, 1, after=3, ban=5_000)
        assert (kind, ms, violations) == (3, 5_000, 3)
        assert 4_900 < await s.client.pttl(s.keys[1]) <= 5_000
        assert await s.client.exists(s.keys[2]) == 0  # counting starts again after the ban
        # the index that /admin/bans reads: the client, scored by the ban's end (ms), and
        # gone with the last ban
        seconds, micros = await s.client.time()
        end = await s.client.zscore(s.keys[3], "192.0.2.1")
        assert 4_900 < end - (seconds * 1000 + micros // 1000) <= 5_000
        assert 4_900 < await s.client.pttl(s.keys[3]) <= 5_000
        kind, left, _, _ = await s(SECOND_US, 1, after=3)
        assert kind == 2 and 4_900 < left <= 5_000
        # interval 0 (an unlimited request) still finds the ban
        assert (await s(0, 0, after=3))[0] == 2
        await s.client.delete(s.keys[1])
        assert (await s(0, 0, after=3))[0] == 1
    finally:
        await s.client.aclose()


async def test_script_survives_a_flushed_script_cache(redis_server: RedisServer) -> None:
    s = Script(redis_server)
    try:
        assert (await s(SECOND_US, 5))[0] == 1
        await s.client.script_flush()  # EVALSHA answers NOSCRIPT: redis-py loads it again
        assert (await s(SECOND_US, 5))[0] == 1
    finally:
        await s.client.aclose()


# --- the addon with Redis -------------------------------------------------------------------


async def redis_addon(tctx: Any, r: ratelimit.RateLimit, server: RedisServer, **opts: Any) -> None:
    tctx.configure(
        r, state_backend="redis", state_redis_url=server.url, state_key_prefix="u", **opts
    )


async def take(r: ratelimit.RateLimit, ip: str = "192.0.2.1") -> Any:
    f = flow(ip)
    pending = r.requestheaders(f)
    assert pending is not None  # shared: the decision is awaited
    await pending
    return f.response


async def test_shared_bucket_and_ban_through_the_addon(redis_server: RedisServer) -> None:
    r = ratelimit.RateLimit()
    with taddons.context(r) as tctx:
        await redis_addon(
            tctx,
            r,
            redis_server,
            ratelimit_requests_per_second="1",
            ratelimit_burst=2,
            ratelimit_ban_after=2,
            ratelimit_ban_duration="30s",
            ratelimit_ban_status="403",
        )
        try:
            before = count(policy="ratelimit", decision="ban", rule="ban")
            answers = [await take(r) for _ in range(5)]
            assert [a is None for a in answers[:2]] == [True, True]
            assert answers[2].status_code == 429
            assert json.loads(answers[3].content)["error"]["code"] == "TEMPORARILY_BANNED"
            assert answers[3].status_code == 403 and answers[3].headers["Retry-After"] == "30"
            assert answers[4].status_code == 403
            assert count(policy="ratelimit", decision="ban", rule="ban") == before + 1
            assert await take(r, "192.0.2.9") is None  # another client
            listed = json.loads((await r._admin_bans(Request("GET", "/admin/bans"))).body)
            assert [b["ip"] for b in listed["bans"]] == ["192.0.2.1"]
            assert listed["bans"][0]["violations"] == 2
            assert 28 <= listed["bans"][0]["seconds_left"] <= 30
            lift = await r._admin_lift(Request("DELETE", "/admin/bans/192.0.2.1"))
            assert lift.status == 200
            again = await r._admin_lift(Request("DELETE", "/admin/bans/192.0.2.1"))
            assert again.status == 404
        finally:
            memory_again()


async def test_redis_down_decides_on_the_local_bucket(redis_server: RedisServer) -> None:
    r = ratelimit.RateLimit()
    with taddons.context(r) as tctx:
        await redis_addon(
            tctx, r, redis_server, ratelimit_requests_per_second="1", ratelimit_burst=2
        )
        try:
            redis_server.stop()
            before = state.STATE.fallbacks.get("ratelimit", 0)
            start = time.monotonic()
            answers = [await take(r) for _ in range(3)]
            assert time.monotonic() - start < 0.5
            assert [a is None for a in answers] == [True, True, False]
            assert state.STATE.fallbacks["ratelimit"] == before + 3
        finally:
            memory_again()


def memory_again() -> None:
    """Back to the default backend: STATE is the process's, shared with the other tests."""
    state.STATE.configure("memory", "redis://127.0.0.1:6379/0", "waypost", 0.05)


class Request:
    """What the admin handlers read of an aiohttp request."""

    def __init__(self, method: str, path: str) -> None:
        self.method, self.path = method, path


# --- memory: bans and each worker's share ---------------------------------------------------


def test_memory_ban_then_lift() -> None:
    r = ratelimit.RateLimit()
    with taddons.context(r) as tctx:
        tctx.configure(
            r, ratelimit_requests_per_second="1", ratelimit_burst=1, ratelimit_ban_after=2
        )
        answers = []
        for _ in range(4):
            f = flow()
            assert r.requestheaders(f) is None  # memory: synchronous
            answers.append(f.response)
        assert answers[0] is None and answers[1].status_code == 429
        banned = json.loads(answers[2].content)["error"]
        assert banned["code"] == "TEMPORARILY_BANNED" and answers[2].status_code == 429
        assert answers[2].headers["Retry-After"] == "600"
        assert json.loads(answers[3].content)["error"]["code"] == "TEMPORARILY_BANNED"
        assert metrics.REGISTRY.get_sample_value("ratelimit_bans") == 1
        listed = r.bans.listing(time.monotonic(), time.time())
        assert [(b["ip"], b["violations"]) for b in listed] == [("192.0.2.1", 2)]
        assert r.bans.lift("192.0.2.1") and not r.bans.lift("192.0.2.1")


def test_exempt_clients_are_never_banned() -> None:
    r = ratelimit.RateLimit()
    with taddons.context(r) as tctx:
        tctx.configure(
            r,
            ratelimit_requests_per_second="1",
            ratelimit_burst=1,
            ratelimit_ban_after=1,
            ratelimit_exempt=["192.0.2.0/24"],
        )
        for _ in range(5):
            f = flow()
            r.requestheaders(f)
            assert f.response is None
        assert not r.bans.banned


def test_ban_table_and_violation_window_are_bounded() -> None:
    table = bans.Bans(3)
    for i in range(10):
        assert table.violation(f"10.0.0.{i}", 0.0, 1, 60.0, 10.0) == 1
    assert list(table.banned) == ["10.0.0.7", "10.0.0.8", "10.0.0.9"]
    # violations older than the window do not count
    assert table.violation("10.0.1.1", 0.0, 2, 1.0, 10.0) == 0
    assert table.violation("10.0.1.1", 2.0, 2, 1.0, 10.0) == 0
    assert table.violation("10.0.1.1", 2.5, 2, 1.0, 10.0) == 2
    assert table.left("10.0.1.1", 12.0) == pytest.approx(0.5)
    assert table.left("10.0.1.1", 12.5) == 0.0 and "10.0.1.1" not in table.banned


def test_ban_status_must_be_429_or_403() -> None:
    r = ratelimit.RateLimit()
    with taddons.context(r) as tctx, pytest.raises(Exception, match="ratelimit_ban_status"):
        tctx.configure(r, ratelimit_ban_status="500")


def test_each_worker_enforces_its_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WAYPOST_WORKERS", "4")
    monkeypatch.setenv("WAYPOST_WORKER", "1")
    r = ratelimit.RateLimit()
    with taddons.context(r) as tctx:
        rules = '[{"id": "api", "path": "/api", "requests_per_second": 2, "burst": 3}]'
        tctx.configure(
            r, ratelimit_requests_per_second="10", ratelimit_burst=10, ratelimit_rules=rules
        )
        assert (r.local_default.rate, r.local_default.burst) == (2.5, 3)
        assert (r.local["api"].rate, r.local["api"].burst) == (0.5, 1)
        # the configured limit is what Redis shares; the share is what this worker holds alone
        assert (r.default.rate, r.default.burst) == (10.0, 10)
        answers = []
        for _ in range(4):
            f = flow()
            r.requestheaders(f)
            answers.append(f.response is None)
        assert answers == [True, True, True, False]


def test_the_ban_profile_section_becomes_options(tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text(
        "security:\n  rate_limiting:\n    ban: {after: 5, within: 30s, duration: 15m, status: 403}\n"
    )
    opts = schema.to_options(schema.load(p, {}).profile)
    assert (opts["ratelimit_ban_after"], opts["ratelimit_ban_status"]) == (5, "403")
    r = ratelimit.RateLimit()
    with taddons.context(r) as tctx:
        tctx.configure(r, **{k: v for k, v in opts.items() if k.startswith("ratelimit_ban_")})
        assert (r.ban_after, r.ban_within, r.ban_duration, r.ban_status) == (5, 30.0, 900.0, 403)
    p.write_text("security:\n  rate_limiting:\n    ban: {status: 500}\n")
    with pytest.raises(schema.ProfileError, match="status"):
        schema.load(p, {})
