"""Circuit breakers shared through Redis: ten real mitmdump instances (the router alone), one
real redis-server, a pool of two backends of which one dies (answers 503 to everything).

The measure is how many requests reach the dead backend before every instance stops sending to
it. With the memory backend each instance needs its own `failure_threshold` (5) failures: 50.
With Redis the failures are counted by the fleet and the opening is published: about 5.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REVERSE, Proxy, start_proxy, wait_until
from tests.e2e.router_helpers import NamedBackend
from tests.redis_helpers import RedisServer

INSTANCES = 10
THRESHOLD = 5
CHANNEL = "test:breaker"


@pytest.fixture
def pool() -> Iterator[tuple[NamedBackend, NamedBackend]]:
    dead, alive = NamedBackend("dead"), NamedBackend("alive")
    yield dead, alive
    dead.close()
    alive.close()


def subscribers(redis: RedisServer) -> int:
    reply = redis.command("PUBSUB", "NUMSUB", CHANNEL).decode()
    return int(re.findall(r":(\d+)", reply)[-1])


def start_fleet(
    tmp_path: Path,
    pool: tuple[NamedBackend, NamedBackend],
    state: dict[str, str],
    instances: int = INSTANCES,
) -> list[Proxy]:
    rules = [
        {
            "name": "pool",
            "forward": {"backends": [{"url": b.url, "name": b.name} for b in pool]},
        }
    ]
    options = {
        "routing_rules": json.dumps(rules),
        "router_health_checks_enabled": False,
        "router_circuit_breaker_failure_threshold": THRESHOLD,
        "router_circuit_breaker_timeout": "60s",
        "router_retries_max_attempts": 1,
        **state,
    }
    fleet: list[Proxy] = []
    try:
        for i in range(instances):  # started together: each loads while the others do
            workdir = tmp_path / f"i{i}"
            workdir.mkdir(parents=True)
            fleet.append(
                start_proxy(
                    workdir,
                    scripts=("addons/router.py",),
                    options=options,
                    extra_args=("--mode", f"reverse:{pool[1].url}"),
                    wait=False,
                )
            )
        for p in fleet:
            p.port = int(p.wait_for(REVERSE, timeout=60).group(2))
    except BaseException:
        for p in fleet:
            p.stop()
        raise
    return fleet


def dead_hits_until_stopped(fleet: list[Proxy], dead: NamedBackend) -> int:
    """Requests spread in turn over the instances until none has sent to the dead backend for
    ten rounds: how many reached it."""
    clients = [httpx.Client(base_url=p.url, timeout=10, trust_env=False) for p in fleet]
    try:
        quiet_rounds = 0
        for _ in range(100):
            before = dead.hits
            for c in clients:
                assert c.get("/x").status_code in (200, 503)
            quiet_rounds = quiet_rounds + 1 if dead.hits == before else 0
            if quiet_rounds == 10:
                return dead.hits
        raise AssertionError(f"the instances never stopped sending to it ({dead.hits} hits)")
    finally:
        for c in clients:
            c.close()


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_dead_backend_is_dropped_by_the_fleet(
    backend: str,
    tmp_path: Path,
    pool: tuple[NamedBackend, NamedBackend],
    redis_server: RedisServer,
) -> None:
    dead, _ = pool
    dead.status = 503
    state = {"state_backend": backend}
    if backend == "redis":
        state |= {"state_redis_url": redis_server.url, "state_key_prefix": "test"}
    fleet = start_fleet(tmp_path, pool, state)
    try:
        if backend == "redis":
            wait_until(lambda: subscribers(redis_server) == INSTANCES, timeout=30)
        start = time.monotonic()
        hits = dead_hits_until_stopped(fleet, dead)
        print(f"\n{backend}: {hits} requests reached the dead backend "
              f"({time.monotonic() - start:.1f} s of traffic)")  # fmt: skip
        if backend == "memory":
            assert hits == INSTANCES * THRESHOLD  # each instance its own five failures
        else:
            # The fleet's fifth failure opens every circuit; a request or two in flight on
            # other instances while the opening travels may still reach it.
            assert THRESHOLD <= hits <= 2 * THRESHOLD
            opened = [p for p in fleet if any("opened by another process" in x for x in p.lines)]
            assert len(opened) >= INSTANCES - 2
    finally:
        for p in fleet:
            p.stop()


def test_a_late_instance_reads_the_opening_and_redis_down_keeps_breakers_local(
    tmp_path: Path, pool: tuple[NamedBackend, NamedBackend], redis_server: RedisServer
) -> None:
    dead, _ = pool
    dead.status = 503
    state = {"state_backend": "redis", "state_redis_url": redis_server.url}
    state |= {"state_key_prefix": "test", "state_timeout": "50ms"}
    fleet = start_fleet(tmp_path / "first", pool, state, instances=2)
    try:
        wait_until(lambda: subscribers(redis_server) == 2, timeout=30)
        assert dead_hits_until_stopped(fleet, dead) <= 2 * THRESHOLD
        hits = dead.hits
        # Started after the opening was published: the open key tells it within a second.
        late = start_fleet(tmp_path / "late", pool, state, instances=1)[0]
        fleet.append(late)
        late.wait_for(r"circuit closed -> open for backend dead \(open elsewhere", timeout=10)
        with httpx.Client(base_url=late.url, timeout=10, trust_env=False) as c:
            assert all(c.get("/x").status_code == 200 for _ in range(10))
        assert dead.hits == hits

        redis_server.stop()
        slowest = 0.0
        for p in fleet:
            with httpx.Client(base_url=p.url, timeout=10, trust_env=False) as c:
                for _ in range(10):
                    start = time.monotonic()
                    assert c.get("/x").status_code == 200
                    slowest = max(slowest, time.monotonic() - start)
        assert slowest < 1.0  # nothing waits on the dead Redis
        redis_server.start()  # the same port: every instance resubscribes by itself
        wait_until(lambda: subscribers(redis_server) == 3, timeout=15)
    finally:
        for p in fleet:
            p.stop()


def test_a_successful_trial_on_one_instance_closes_the_circuit_on_the_others(
    tmp_path: Path, pool: tuple[NamedBackend, NamedBackend], redis_server: RedisServer
) -> None:
    dead, _ = pool
    dead.status = 503
    state = {"state_backend": "redis", "state_redis_url": redis_server.url}
    state |= {
        "state_key_prefix": "test",
        "router_circuit_breaker_timeout": "1s",
        "router_circuit_breaker_success_threshold": 1,
    }
    first, second = fleet = start_fleet(tmp_path, pool, state, instances=2)
    try:
        wait_until(lambda: subscribers(redis_server) == 2, timeout=30)
        dead_hits_until_stopped(fleet, dead)
        second.wait_for(r"circuit closed -> open for backend dead", timeout=5)
        dead.status = 200  # it is back
        time.sleep(1.2)  # past the open time: the first instance's next request is its trial
        with httpx.Client(base_url=first.url, timeout=10, trust_env=False) as c:
            for _ in range(2):
                assert c.get("/x").status_code == 200
        first.wait_for(r"circuit half_open -> closed for backend dead", timeout=5)
        second.wait_for(
            r"circuit open -> closed for backend dead \(another process's trial succeeded",
            timeout=5,
        )
    finally:
        for p in fleet:
            p.stop()
