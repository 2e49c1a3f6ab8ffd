"""Rate limits and bans shared by real mitmdump processes through a real redis-server.

The processes load the rate limiter and the management app only (what is measured here is the
limiter and Redis, not the rest of the bundle). Workers are stood in for by setting
WAYPOST_WORKERS / WAYPOST_WORKER in a process's environment, as the supervisor does.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from addons.ratelimiting import bans
from tests.conftest import _LISTENING, MANAGEMENT, Backend, Proxy, start_proxy, wait_until
from tests.redis_helpers import RedisServer

SCRIPTS = ("addons/ratelimit.py", "addons/management.py")
TOKEN = "t0ken"


class Instance:
    """One mitmdump: its proxy port, management port, and a keep-alive client through it."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.port = int(proxy.wait_for(_LISTENING, timeout=60).group(2))
        self.management = int(proxy.wait_for(MANAGEMENT, timeout=60).group(1))
        self.client = httpx.Client(proxy=f"http://127.0.0.1:{self.port}", timeout=5)

    def get(self, backend: Backend) -> httpx.Response:
        return self.client.get(f"{backend.url}/echo")

    def admin(self, method: str, path: str) -> httpx.Response:
        url = f"http://127.0.0.1:{self.management}{path}"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        return httpx.request(method, url, headers=headers, timeout=5)

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.management}/metrics", timeout=5).text

    def close(self) -> None:
        self.client.close()
        self.proxy.stop()


def start(
    tmp_path: Path, n: int, options: dict[str, object], env: Callable[[int], dict[str, str]]
) -> list[Instance]:
    """N mitmdumps started at once (each in its own confdir), then waited for."""
    procs = []
    opts = {"metrics_port": 0, "admin_token": TOKEN, **options}
    for i in range(n):
        d = tmp_path / f"i{i}"
        d.mkdir()
        procs.append(start_proxy(d, scripts=SCRIPTS, options=opts, env=env(i), wait=False))
    instances = []
    try:
        for p in procs:
            instances.append(Instance(p))
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return instances


@pytest.fixture
def instances() -> list[list[Instance]]:
    started: list[list[Instance]] = []
    yield started
    for group in started:
        for i in group:
            i.close()


def shared(server: RedisServer, **options: object) -> dict[str, object]:
    return {
        "state_backend": "redis",
        "state_redis_url": server.url,
        "state_timeout": "200ms",  # a loaded test machine; production's default is 50ms
        **options,
    }


def no_env(_: int) -> dict[str, str]:
    return {}


def worker_env(i: int) -> dict[str, str]:
    return {"WAYPOST_WORKERS": "2", "WAYPOST_WORKER": str(i)}


def commands(server: RedisServer) -> Counter[str]:
    """Calls of each command since the server started (INFO commandstats), but INFO itself."""
    info = server.command("INFO", "commandstats").decode()
    return Counter(
        {c: int(n) for c, n in re.findall(r"cmdstat_(\w+):calls=(\d+)", info) if c != "info"}
    )


def metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


# --- (a) two workers of one instance --------------------------------------------------------


def test_two_workers_share_one_bucket_with_redis(
    tmp_path: Path, backend: Backend, redis_server: RedisServer, instances: list
) -> None:
    w = start(
        tmp_path,
        2,
        shared(redis_server, ratelimit_requests_per_second="0.5", ratelimit_burst=4),
        worker_env,
    )
    instances.append(w)
    # Loaded ahead, as a long-running deployment has it: no NOSCRIPT miss in the count below.
    with redis.Redis.from_url(redis_server.url) as r:
        r.script_load(bans.BUCKET_SCRIPT)
    before = commands(redis_server)
    # a client alternating between the workers gets the instance's burst, not twice it
    statuses = [w[i % 2].get(backend).status_code for i in range(8)]
    assert statuses.count(200) == 4 and statuses.count(429) == 4
    # One round trip per request: one EVALSHA each. commandstats also counts the commands the
    # script runs inside Redis (PTTL, TIME, GET, SET: not round trips), and each process's
    # new connection says HELLO and PING once.
    sent = commands(redis_server) - before
    inside = {"pttl", "time", "get", "set"}
    assert {c: n for c, n in sent.items() if c not in inside} == {
        "evalsha": 8,
        "hello": 2,
        "ping": 2,
    }
    # a client on one keep-alive connection (one worker) gets the same bucket, now empty
    assert w[0].get(backend).status_code == 429


def test_two_workers_divide_the_bucket_in_memory(
    tmp_path: Path, backend: Backend, instances: list
) -> None:
    w = start(
        tmp_path, 2, {"ratelimit_requests_per_second": "0.5", "ratelimit_burst": 4}, worker_env
    )
    instances.append(w)
    # one keep-alive connection stays on one worker, which holds ceil(4/2) = 2 tokens
    single = [w[0].get(backend).status_code for _ in range(4)]
    assert single == [200, 200, 429, 429]
    # a client whose connections the kernel spreads gets the other worker's share too: the
    # instance holds the configured burst of 4
    assert [w[1].get(backend).status_code for _ in range(4)] == [200, 200, 429, 429]


# --- (b) ten instances, one Redis -----------------------------------------------------------


RATE = 20.0
INSTANCES = 10
WARMUP = 1.0  # the burst is spent in the first second; what follows is the rate
WINDOW = 4.0


def test_ten_instances_hold_one_rate_within_ten_percent(
    tmp_path: Path, backend: Backend, redis_server: RedisServer, instances: list
) -> None:
    group = start(
        tmp_path,
        INSTANCES,
        shared(redis_server, ratelimit_requests_per_second=f"{RATE:g}", ratelimit_burst=5),
        no_env,
    )
    instances.append(group)
    # One client (127.0.0.1) at 3x its limit, its requests spread over all ten instances: a
    # thread per instance paced at 3 * RATE / 10 per second, for WARMUP + WINDOW seconds.
    # The rate is the 200s answered inside the window, over the window.
    start_at = time.monotonic() + 0.2
    allowed: list[float] = []
    refused: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(inst: Instance, offset: float) -> None:
        interval = INSTANCES / (3 * RATE)
        t = start_at + offset
        while t < start_at + WARMUP + WINDOW:
            time.sleep(max(0.0, t - time.monotonic()))
            try:
                status = inst.get(backend).status_code
            except httpx.HTTPError as e:
                with lock:
                    failures.append(repr(e))
            else:
                with lock:
                    (allowed if status == 200 else refused).append(time.monotonic())
                    if status not in (200, 429):
                        failures.append(str(status))
            t += interval

    threads = [
        threading.Thread(target=client, args=(inst, i * (1 / (3 * RATE))))
        for i, inst in enumerate(group)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not failures
    window = [t for t in allowed if start_at + WARMUP <= t < start_at + WARMUP + WINDOW]
    offered = len(allowed) + len(refused)
    rate = len(window) / WINDOW
    print(f"10 instances: offered {offered / (WARMUP + WINDOW):.1f}/s, allowed {rate:.1f}/s")
    assert offered >= 2.5 * RATE * (WARMUP + WINDOW), "the load did not reach 3x the limit"
    assert abs(rate - RATE) <= 0.1 * RATE, f"{rate:.1f}/s allowed, configured {RATE:g}/s"
    calls = sum(metric(i.metrics(), "waypost_state_call_seconds_count") for i in group)
    print(f"state calls {calls:.0f}; " + histogram_quantiles(group))


def histogram_quantiles(group: list[Instance]) -> str:
    """p50 and p99 of waypost_state_call_seconds summed over the instances (bucket bounds)."""
    counts: dict[float, float] = {}
    for inst in group:
        for le, v in re.findall(
            r'^waypost_state_call_seconds_bucket{le="([^"]+)"} (\S+)$', inst.metrics(), re.M
        ):
            bound = float("inf") if le == "+Inf" else float(le)
            counts[bound] = counts.get(bound, 0) + float(v)
    total = counts.get(float("inf"), 0)
    out = []
    for q in (0.5, 0.99):
        bound = next((b for b in sorted(counts) if counts[b] >= q * total), float("inf"))
        out.append(f"p{round(q * 100)} <= {bound * 1000:g} ms")
    shares = ", ".join(f"<={b * 1000:g} ms: {counts[b] / total:.0%}" for b in sorted(counts))
    return ", ".join(out) + f" ({shares})"


# --- (c) bans ---------------------------------------------------------------------------------


def test_a_ban_through_one_instance_holds_on_another_and_lifts_everywhere(
    tmp_path: Path, backend: Backend, redis_server: RedisServer, instances: list
) -> None:
    a, b = start(
        tmp_path,
        2,
        shared(
            redis_server,
            ratelimit_requests_per_second="5",
            ratelimit_burst=1,
            ratelimit_ban_after=2,
            ratelimit_ban_duration="1m",
        ),
        no_env,
    )
    instances.append([a, b])
    answers = [a.get(backend) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 429, 429]
    assert answers[2].json()["error"]["code"] == "TEMPORARILY_BANNED"
    assert 55 <= int(answers[2].headers["Retry-After"]) <= 60
    time.sleep(0.3)  # the bucket is full again: only the ban refuses now
    on_b = b.get(backend)
    assert on_b.status_code == 429 and on_b.json()["error"]["code"] == "TEMPORARILY_BANNED"
    listed = b.admin("GET", "/admin/bans").json()["bans"]
    assert [x["ip"] for x in listed] == ["127.0.0.1"] and listed[0]["violations"] == 2
    a.proxy.wait_for("ratelimit ban rule=ban")
    assert not any("ratelimit ban rule=ban" in line for line in b.proxy.lines)  # logged once
    assert a.admin("DELETE", "/admin/bans/127.0.0.1").status_code == 200
    assert b.get(backend).status_code == 200 and a.get(backend).status_code in (200, 429)
    assert b.admin("GET", "/admin/bans").json()["bans"] == []
    assert b.admin("DELETE", "/admin/bans/127.0.0.1").status_code == 404


# --- (d) Redis lost and back ------------------------------------------------------------------


def test_redis_killed_mid_traffic_fails_no_request_and_recovers(
    tmp_path: Path, backend: Backend, redis_server: RedisServer, instances: list
) -> None:
    pair = start(
        tmp_path,
        2,
        shared(redis_server, ratelimit_requests_per_second="10", ratelimit_burst=10),
        no_env,
    )
    instances.append(pair)
    statuses: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def traffic(inst: Instance) -> None:
        while not stop.is_set():
            start_at = time.monotonic()
            try:
                statuses.append(inst.get(backend).status_code)
            except httpx.HTTPError as e:
                failures.append(repr(e))
            if time.monotonic() - start_at > 2:
                failures.append("a request took over 2 s")
            time.sleep(0.05)

    threads = [threading.Thread(target=traffic, args=(inst,)) for inst in pair]
    for th in threads:
        th.start()

    def readiness(inst: Instance) -> tuple[int, object]:
        r = httpx.get(f"http://127.0.0.1:{inst.management}/health/readiness", timeout=5)
        return r.status_code, r.json()["checks"]["state"]

    try:
        time.sleep(1)
        assert readiness(pair[0]) == (200, "ok")
        redis_server.stop()
        time.sleep(2)
        assert readiness(pair[0]) == (200, "degraded")  # still ready: decides locally
        redis_server.start()
        wait_until(
            lambda: all(metric(i.metrics(), "waypost_state_redis_up") == 1 for i in pair), 10
        )
        time.sleep(0.5)
    finally:
        stop.set()
        for th in threads:
            th.join(10)
    assert not failures and set(statuses) <= {200, 429}, (failures, set(statuses))
    assert all(metric(i.metrics(), "waypost_state_fallbacks_total") > 0 for i in pair)
    # shared again: after a second the bucket is full (10); 20 quick requests spread over the
    # two instances get about 10, where two local buckets would give 20
    time.sleep(1.1)
    burst = [pair[i % 2].get(backend).status_code for i in range(20)]
    assert burst.count(200) <= 13, burst
