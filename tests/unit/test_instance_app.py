"""The instance app (addons/supervisor/instance.py): real expositions combined, admin answers
merged, and the app itself over fake worker management apps on loopback."""

from __future__ import annotations

import re
import subprocess
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, GCCollector, ProcessCollector, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from addons import metrics
from addons.supervisor.instance import (
    Answer,
    Carry,
    Settings,
    WorkerView,
    combine,
    exposition,
    instance_families,
    make_app,
    merge_admin,
    parse,
)
from tests.unit.test_deploy_prometheus import promtool

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def worker_text(requests: int, slow: int, connections: int, backend: str = "") -> str:
    """A worker's exposition as addons/metrics.py writes it, with these values."""
    store = metrics.Store()
    store.requests[("GET", 200, backend)] = requests
    store.buckets[0] = requests - slow
    store.buckets[-1] = slow
    store.duration_sum = 0.0005 * (requests - slow) + 100.0 * slow
    store.bytes = [10 * requests, 100 * requests]
    store.open_clients = {f"c{i}" for i in range(connections)}
    registry = CollectorRegistry()
    registry.register(store)
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    return generate_latest(registry).decode()


def samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def combined(texts: Sequence[str], worker_label: bool = False) -> str:
    families = combine([(i, parse(t)) for i, t in enumerate(texts)], worker_label)
    return exposition(families).decode()


def promtool_accepts(text: str) -> None:
    proc = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


GET_200 = frozenset({("method", "GET"), ("status", "200"), ("backend", "")})


def test_workers_are_summed_into_the_instance() -> None:
    a, b = worker_text(5, 1, 2), worker_text(7, 2, 3)
    got = samples(combined([a, b]))
    assert got[("http_requests_total", GET_200)] == 12
    assert got[("http_request_duration_seconds_count", frozenset())] == 12
    assert got[("http_request_duration_seconds_bucket", frozenset({("le", "0.001")}))] == 9
    assert got[("http_request_duration_seconds_bucket", frozenset({("le", "+Inf")}))] == 12
    assert got[("http_request_duration_seconds_sum", frozenset())] == pytest.approx(300.0045)
    assert got[("http_request_bytes_total", frozenset({("direction", "in")}))] == 120
    assert got[("proxy_active_connections", frozenset())] == 5
    build = [v for (n, _), v in got.items() if n == "waypost_build_info"]
    assert build == [1.0]
    wa, wb = samples(a), samples(b)
    start = ("process_start_time_seconds", frozenset())
    assert got[start] == min(wa[start], wb[start])
    rss = ("process_resident_memory_bytes", frozenset())
    assert got[rss] == wa[rss] + wb[rss]
    max_fds = ("process_max_fds", frozenset())
    assert got[max_fds] == wa[max_fds]


def test_states_are_not_summed() -> None:
    def text(circuit: int, healthy: int, reloaded: int, at: float) -> str:
        return (
            "# TYPE backend_circuit_state gauge\n"
            f'backend_circuit_state{{backend="a"}} {circuit}\n'
            "# TYPE backend_healthy gauge\n"
            f'backend_healthy{{backend="a"}} {healthy}\n'
            "# TYPE config_last_reload_successful gauge\n"
            f"config_last_reload_successful {reloaded}\n"
            "# TYPE config_last_reload_success_timestamp_seconds gauge\n"
            f"config_last_reload_success_timestamp_seconds {at}\n"
        )

    got = samples(combined([text(0, 1, 1, 100.0), text(1, 0, 0, 50.0)]))
    a = frozenset({("backend", "a")})
    assert got[("backend_circuit_state", a)] == 1
    assert got[("backend_healthy", a)] == 0
    assert got[("config_last_reload_successful", frozenset())] == 0
    assert got[("config_last_reload_success_timestamp_seconds", frozenset())] == 100.0


def test_worker_label_keeps_series_apart() -> None:
    got = samples(combined([worker_text(5, 1, 2), worker_text(7, 2, 3)], worker_label=True))
    assert got[("http_requests_total", GET_200 | {("worker", "0")})] == 5
    assert got[("http_requests_total", GET_200 | {("worker", "1")})] == 7
    assert got[("proxy_active_connections", frozenset({("worker", "1")}))] == 3
    assert ("http_requests_total", GET_200) not in got


def test_a_series_only_one_worker_has_is_kept_and_histograms_stay_together() -> None:
    text = combined(
        [
            worker_text(5, 1, 2),
            worker_text(3, 0, 0, backend="b1") + "# HELP h Per backend.\n# TYPE h histogram\n"
            'h_bucket{backend="x",le="1.0"} 1\nh_bucket{backend="x",le="+Inf"} 1\n'
            'h_count{backend="x"} 1\nh_sum{backend="x"} 0.5\n',
            "# HELP h Per backend.\n# TYPE h histogram\n"
            'h_bucket{backend="y",le="1.0"} 2\nh_bucket{backend="y",le="+Inf"} 2\n'
            'h_count{backend="y"} 2\nh_sum{backend="y"} 1.0\n',
        ]
    )
    got = samples(text)
    assert got[("http_requests_total", GET_200)] == 5
    b1 = frozenset({("method", "GET"), ("status", "200"), ("backend", "b1")})
    assert got[("http_requests_total", b1)] == 3
    h = [re.search(r'backend="(.)"', ln)[1] for ln in text.splitlines() if ln.startswith("h_")]
    assert h == ["x"] * 4 + ["y"] * 4


def test_counters_never_go_backwards_over_restarts_and_missed_scrapes() -> None:
    carry = Carry()

    def scrape(*read: tuple[int, int, str]) -> Samples:
        got = carry.expositions([(i, pid, parse(t)) for i, pid, t in read])
        return samples(exposition(combine(got)).decode())

    got = scrape((0, 100, worker_text(5, 1, 2)), (1, 101, worker_text(7, 2, 3)))
    assert got[("http_requests_total", GET_200)] == 12
    # Worker 1 misses a scrape: its counters count with their last values, its gauges do not.
    got = scrape((0, 100, worker_text(6, 1, 2)))
    assert got[("http_requests_total", GET_200)] == 13
    assert got[("http_request_duration_seconds_count", frozenset())] == 13
    assert got[("proxy_active_connections", frozenset())] == 2
    # Worker 1 restarted (a new pid, its counters from zero): its predecessor's stay in.
    got = scrape((0, 100, worker_text(6, 1, 2)), (1, 200, worker_text(1, 0, 1)))
    assert got[("http_requests_total", GET_200)] == 14
    assert got[("http_request_duration_seconds_bucket", frozenset({("le", "+Inf")}))] == 14
    assert got[("proxy_active_connections", frozenset())] == 3
    # And once more: the retired values add up.
    got = scrape((0, 100, worker_text(6, 1, 2)), (1, 300, worker_text(2, 0, 0)))
    assert got[("http_requests_total", GET_200)] == 6 + 7 + 1 + 2
    promtool_accepts(exposition(combine(carry.expositions([]))).decode())


def test_created_is_the_earliest() -> None:
    def text(created: float) -> str:
        return f"# TYPE x_total counter\nx_total 1\nx_created {created}\n"

    got = samples(combined([text(200.0), text(100.0)]))
    assert got[("x_total", frozenset())] == 2
    assert got[("x_created", frozenset())] == 100.0


@pytest.mark.parametrize("worker_label", [False, True])
def test_promtool_accepts_the_instance_exposition(worker_label: bool) -> None:
    views = [WorkerView(0, 10, "http://127.0.0.1:1"), WorkerView(1, None, "x", restarts=2)]
    texts = [worker_text(5, 1, 2), worker_text(7, 2, 3, backend="b")]
    families = combine([(i, parse(t)) for i, t in enumerate(texts)], worker_label)
    text = exposition(families + instance_families(views, 1)).decode()
    got = samples(text)
    assert got[("waypost_workers", frozenset())] == 2
    assert got[("waypost_workers_up", frozenset())] == 1
    assert got[("waypost_worker_restarts_total", frozenset({("worker", "1")}))] == 2
    promtool_accepts(text)


def test_parse_refuses_what_is_not_an_exposition() -> None:
    with pytest.raises(ValueError):
        parse("<html>not metrics</html>\n")


# --- admin answers ---------------------------------------------------------------------------


def test_the_same_success_merges_totals_and_lists_every_worker() -> None:
    answers = [
        Answer(0, 200, {"invalidated": 2, "remaining": 5}),
        Answer(1, 200, {"invalidated": 3, "remaining": 0}),
    ]
    status, body, headers = merge_admin("/admin/cache", answers)
    assert status == 200 and headers == {}
    assert body["invalidated"] == 5 and body["remaining"] == 5
    assert body["workers"] == [
        {"worker": 0, "status": 200, "body": {"invalidated": 2, "remaining": 5}},
        {"worker": 1, "status": 200, "body": {"invalidated": 3, "remaining": 0}},
    ]


def test_fields_every_worker_answered_alike_are_lifted() -> None:
    answers = [
        Answer(0, 200, {"reloaded": True, "message": "same"}),
        Answer(1, 200, {"reloaded": True, "message": "other"}),
    ]
    status, body, _ = merge_admin("/admin/reload", answers)
    assert status == 200
    assert body["reloaded"] is True and "message" not in body
    assert [w["body"]["message"] for w in body["workers"]] == ["same", "other"]


def test_the_same_refusal_is_passed_on() -> None:
    refusal = {"error": {"code": "UNAUTHORIZED", "message": "Missing or malformed bearer token."}}
    answers = [
        Answer(i, 401, refusal, {"WWW-Authenticate": "Bearer", "Server": "x"}) for i in (0, 1)
    ]
    assert merge_admin("/admin/reload", answers) == (401, refusal, {"WWW-Authenticate": "Bearer"})


def test_the_bans_every_worker_holds_are_one_list() -> None:
    shared = {"ip": "10.0.0.1", "until": 9.0}
    answers = [
        Answer(0, 200, {"bans": [shared, {"ip": "10.0.0.2", "until": 5.0}], "shared": False}),
        Answer(1, 200, {"bans": [shared], "shared": False}),
    ]
    status, body, _ = merge_admin("/admin/bans", answers)
    assert status == 200 and body["shared"] is False
    assert body["bans"] == [shared, {"ip": "10.0.0.2", "until": 5.0}]


def test_a_delete_found_on_some_workers_only_succeeded() -> None:
    missing = {"error": {"code": "NOT_FOUND", "message": "not banned"}}
    answers = [Answer(0, 404, missing), Answer(1, 200, {"lifted": "10.0.0.1"})]
    status, body, _ = merge_admin("/admin/bans/10.0.0.1", answers, "DELETE")
    assert status == 200 and body["lifted"] == "10.0.0.1"
    # Not for other methods, nor when nobody found it.
    assert merge_admin("/admin/bans/10.0.0.1", answers, "GET")[0] == 207
    both = [Answer(0, 404, missing), Answer(1, 404, missing)]
    assert merge_admin("/admin/bans/10.0.0.1", both, "DELETE")[0] == 404


def test_disagreement_and_silence_are_207() -> None:
    answers = [Answer(0, 200, {"invalidated": 1}), Answer(1, None, error="restarting")]
    status, body, _ = merge_admin("/admin/cache", answers)
    assert status == 207
    assert body == {
        "workers": [
            {"worker": 0, "status": 200, "body": {"invalidated": 1}},
            {"worker": 1, "status": None, "error": "restarting"},
        ]
    }
    status, _, _ = merge_admin("/admin/cache", [Answer(0, 200, {}), Answer(1, 500, {})])
    assert status == 207


def test_no_worker_answering_is_502() -> None:
    status, body, _ = merge_admin("/admin/reload", [Answer(0, None, error="restarting")])
    assert status == 502 and body["error"]["code"] == "BACKEND_UNREACHABLE"
    assert body["error"]["workers"] == [{"worker": 0, "status": None, "error": "restarting"}]
    assert merge_admin("/admin/reload", [])[0] == 502


# --- the app over fake workers -----------------------------------------------------------------


def fake_worker(index: int, ready: bool = True, started: bool = True) -> web.Application:
    """A worker's management app, as far as the instance app reads it."""

    async def health(request: web.Request) -> web.Response:
        ok = {"readiness": ready, "startup": started, "liveness": True}[request.match_info["n"]]
        body = {"status": "ready" if ok else "not_ready", "checks": {"listeners": {"ok": ok}}}
        return web.json_response(body, status=200 if ok else 503)

    async def scrape(request: web.Request) -> web.Response:
        return web.Response(
            text=worker_text(index + 1, 0, index), content_type="text/plain", charset="utf-8"
        )

    async def purge(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer t":
            return web.json_response({"error": {"code": "UNAUTHORIZED"}}, status=401)
        assert request.query["pattern"] == "*"
        return web.json_response({"invalidated": index + 1, "remaining": 0})

    async def execute(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/plain", "X-Worker": str(index)})
        await out.prepare(request)
        await out.write(b"worker %d got %s\n" % (index, await request.read()))
        await out.write(b"done\n")
        return out

    app = web.Application()
    app.router.add_post("/cli/execute", execute)
    app.router.add_get("/health/{n}", health)
    app.router.add_get("/metrics", scrape)
    app.router.add_delete("/admin/cache", purge)
    return app


Views = Callable[[], Sequence[WorkerView]]


@pytest.fixture
async def workers() -> AsyncIterator[list[WorkerView]]:
    servers = [TestServer(fake_worker(i, ready=i == 0)) for i in range(2)]
    for s in servers:
        await s.start_server()
    yield [
        WorkerView(i, 1000 + i, f"http://127.0.0.1:{s.port}", restarts=i)
        for i, s in enumerate(servers)
    ]
    for s in servers:
        await s.close()


async def instance(views: Views, settings: Settings | None = None) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = TestClient(TestServer(make_app(views, settings or Settings())))
    await client.start_server()
    return client


async def test_readiness_needs_one_ready_worker(workers: list[WorkerView]) -> None:
    views = list(workers)
    client = await instance(lambda: views)
    try:
        r = await client.get("/health/readiness")
        assert r.status == 200
        body = await r.json()
        assert body["status"] == "ready" and body["timestamp"].endswith("Z")
        listed = body["checks"]["workers"]["workers"]
        assert [(w["worker"], w["pid"], w["ok"], w["status"]) for w in listed] == [
            (0, 1000, True, "ready"),
            (1, 1001, False, "not_ready"),
        ]
        assert listed[0]["checks"] == {"listeners": {"ok": True}}
        # Worker 0 restarting: no ready worker left.
        views[0] = WorkerView(0, None, views[0].management)
        r = await client.get("/health/readiness")
        assert r.status == 503
        body = await r.json()
        assert body["status"] == "not_ready"
        assert body["checks"]["workers"]["workers"][0] == {
            "worker": 0, "pid": None, "ok": False, "status": "down", "error": "restarting"
        }  # fmt: skip
    finally:
        await client.close()


async def test_draining_is_not_ready(workers: list[WorkerView]) -> None:
    settings = Settings(draining=True)
    client = await instance(lambda: workers, settings)
    try:
        r = await client.get("/health/readiness")
        assert r.status == 503
        assert (await r.json())["checks"]["draining"] == {"ok": False}
        assert (await client.get("/health/liveness")).status == 200
    finally:
        await client.close()


async def test_startup_remembers_workers_that_started(workers: list[WorkerView]) -> None:
    views = list(workers)
    client = await instance(lambda: views)
    try:
        r = await client.get("/health/startup")
        assert r.status == 200
        assert (await r.json())["checks"]["workers"]["started"] == [0, 1]
        views[1] = WorkerView(1, None, views[1].management)  # restarting after it started
        assert (await client.get("/health/startup")).status == 200
    finally:
        await client.close()


async def test_metrics_sum_the_live_workers(workers: list[WorkerView]) -> None:
    views = [*workers, WorkerView(2, None, "http://127.0.0.1:1")]
    client = await instance(lambda: views)
    try:
        r = await client.get("/metrics")
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        got = samples(await r.text())
        assert got[("http_requests_total", GET_200)] == 3
        assert got[("waypost_workers", frozenset())] == 3
        assert got[("waypost_workers_up", frozenset())] == 2
        assert got[("waypost_worker_restarts_total", frozenset({("worker", "1")}))] == 1
        head = await client.head("/metrics")
        assert head.status == 200 and await head.read() == b""
        assert (await client.post("/metrics")).status == 405
        assert (await client.get("/nothing")).status == 404
    finally:
        await client.close()


async def test_admin_reaches_every_worker(workers: list[WorkerView]) -> None:
    client = await instance(lambda: workers)
    try:
        auth = {"Authorization": "Bearer t"}
        r = await client.delete("/admin/cache?pattern=*", headers=auth)
        assert r.status == 200
        body = await r.json()
        assert body["invalidated"] == 3
        assert [w["status"] for w in body["workers"]] == [200, 200]
        r = await client.delete("/admin/cache?pattern=*")
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "UNAUTHORIZED"
    finally:
        await client.close()


async def test_other_paths_go_to_one_worker_in_turn_streamed(workers: list[WorkerView]) -> None:
    views = list(workers)
    client = await instance(lambda: views)
    try:
        got = []
        for _ in range(3):
            r = await client.post("/cli/execute", data=b"uptime", headers={"X-Test": "1"})
            assert r.status == 200 and r.headers["Content-Type"] == "text/plain"
            got.append(await r.text())
        assert got == [f"worker {i} got uptime\ndone\n" for i in (0, 1, 0)]
        assert (await client.get("/nothing")).status == 404  # the worker's own answer
        views[:] = [WorkerView(v.index, None, v.management) for v in views]
        r = await client.post("/cli/execute", data=b"uptime")
        assert r.status == 502 and (await r.json())["error"]["code"] == "BACKEND_UNREACHABLE"
    finally:
        await client.close()
