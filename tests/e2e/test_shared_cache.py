"""Cache purges shared through Redis: three real mitmdump instances, one real redis-server.

Each instance caches the same URL; a purge through one instance's admin API clears it on all of
them. With Redis down the purge still applies where it was asked, says it was not published and
logs a WARNING; once Redis is back, the subscriptions come back by themselves.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import MANAGEMENT, Proxy, start_proxy, wait_until
from tests.e2e.cache_helpers import Origin, start_origin
from tests.redis_helpers import RedisServer

AUTH = {"Authorization": "Bearer t"}
CHANNEL = "test:cache.purge"


@pytest.fixture
def origin() -> Iterator[Origin]:
    yield from start_origin()


def subscribers(redis: RedisServer) -> int:
    reply = redis.command("PUBSUB", "NUMSUB", CHANNEL).decode()
    return int(re.findall(r":(\d+)", reply)[-1])


@pytest.fixture
def instances(
    tmp_path: Path, origin: Origin, redis_server: RedisServer
) -> Iterator[list[tuple[Proxy, str]]]:
    """Three cache instances in reverse mode to the origin, sharing `redis_server`: each with
    its management app's URL; returned once all three listen on the purge channel."""
    started: list[Proxy] = []
    try:
        for i in range(3):
            workdir = tmp_path / f"i{i}"
            workdir.mkdir()
            started.append(
                start_proxy(
                    workdir,
                    scripts=("addons/cache.py", "addons/management.py"),
                    options={
                        "metrics_port": 0,
                        "admin_token": "t",
                        "state_backend": "redis",
                        "state_redis_url": redis_server.url,
                        "state_key_prefix": "test",
                    },
                    extra_args=("--mode", f"reverse:{origin.url}"),
                )
            )
        out = [(p, f"http://127.0.0.1:{p.wait_for(MANAGEMENT).group(1)}") for p in started]
        wait_until(lambda: subscribers(redis_server) == 3)
        yield out
    finally:
        for p in started:
            p.stop()


def status(p: Proxy, path: str) -> str:
    with httpx.Client(base_url=p.url, timeout=10, trust_env=False) as c:
        return c.get(path).headers["x-cache-status"]


def purge(admin: str, pattern: str) -> dict:
    with httpx.Client(base_url=admin, timeout=10, trust_env=False) as m:
        r = m.delete("/admin/cache", params={"pattern": pattern}, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def cache_everywhere(instances: list[tuple[Proxy, str]], path: str) -> None:
    for p, _ in instances:
        assert status(p, path) == "MISS"
        assert status(p, path) == "HIT"


def test_a_purge_through_one_instance_clears_the_entry_on_all(
    instances: list[tuple[Proxy, str]], origin: Origin
) -> None:
    origin.set("/shared/*", (200, {"Cache-Control": "max-age=600"}, b"shared"))
    cache_everywhere(instances, "/shared/a")
    cache_everywhere(instances, "/shared/b")
    body = purge(instances[0][1], "*/shared/a")
    assert body == {"invalidated": 1, "remaining": 1, "published": True}
    # The others apply it on receipt: within moments, never on the next request's path.
    for p, _ in instances[1:]:
        p.wait_for(r"cache purge from another process", timeout=5)
    assert [status(p, "/shared/a") for p, _ in instances] == ["MISS"] * 3
    assert [status(p, "/shared/b") for p, _ in instances] == ["HIT"] * 3  # not purged
    assert origin.hits["/shared/a"] == 6


def test_with_redis_down_a_purge_is_local_and_says_so_then_sharing_comes_back(
    instances: list[tuple[Proxy, str]], origin: Origin, redis_server: RedisServer
) -> None:
    origin.set("/down/*", (200, {"Cache-Control": "max-age=600"}, b"down"))
    cache_everywhere(instances, "/down/a")
    redis_server.stop()
    first, admin = instances[0]
    start = time.monotonic()
    body = purge(admin, "*/down/a")
    assert time.monotonic() - start < 2  # bounded by state_timeout, not a hang
    assert body["invalidated"] == 1 and body["published"] is False
    assert "this process only" in body["warning"]
    first.wait_for(r"applied to this process only: Redis is unavailable", timeout=5)
    assert [status(p, "/down/a") for p, _ in instances] == ["MISS", "HIT", "HIT"]

    redis_server.start()  # the same port: every instance resubscribes by itself
    wait_until(lambda: subscribers(redis_server) == 3, timeout=15)
    # The first call after the outage may still find Redis marked down: the probe pings
    # every second, so publish until it is taken.
    deadline = time.monotonic() + 10
    while not (body := purge(admin, "*/down/a"))["published"]:
        assert time.monotonic() < deadline, body
        time.sleep(0.2)
    for p, _ in instances[1:]:
        p.wait_for(r"cache purge from another process", timeout=5)
    assert [status(p, "/down/a") for p, _ in instances] == ["MISS"] * 3
