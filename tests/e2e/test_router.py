"""The router through a real mitmdump (the bundle) with 2-3 local backends."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MANAGEMENT, REVERSE, Proxy, ThreadedServer, read_head
from tests.e2e.router_helpers import NamedBackend, write_profile

TIMEOUT = httpx.Timeout(10.0)


@pytest.fixture
def backends() -> Iterator[list[NamedBackend]]:
    started = [NamedBackend(name) for name in ("a", "b", "c")]
    yield started
    for b in started:
        b.close()


@pytest.fixture
def reverse(proxy_factory, tmp_path: Path) -> Callable[..., tuple[Proxy, str, str]]:
    """Start the bundle with one reverse listener and the given routing; returns the proxy,
    the reverse listener's URL and the management URL."""

    def start(routing: dict[str, Any], **sections: Any) -> tuple[Proxy, str, str]:
        routing = {"listeners": [{"mode": "reverse", "host": "127.0.0.1", "port": 0}], **routing}
        sections.setdefault("health_checks", {"enabled": False})
        path = write_profile(tmp_path, {"routing": routing, **sections})
        p = proxy_factory(options={"waypost_profile": str(path)}, wait=False)
        m = p.wait_for(REVERSE, timeout=40)
        mport = int(p.wait_for(MANAGEMENT, timeout=40).group(1))
        return p, f"http://127.0.0.1:{m.group(2)}", f"http://127.0.0.1:{mport}"

    return start


def _get(client: httpx.Client, url: str, **kw: Any) -> httpx.Response:
    return client.get(url, timeout=TIMEOUT, **kw)


def _names(client: httpx.Client, url: str, n: int) -> list[str]:
    out = []
    for _ in range(n):
        r = _get(client, url)
        assert r.status_code == 200, r.text
        out.append(r.json()["backend"])
    return out


def _pool(bs: list[NamedBackend], weights: list[int] | None = None) -> list[dict[str, Any]]:
    weights = weights or [1] * len(bs)
    return [{"url": b.url, "name": b.name, "weight": w} for b, w in zip(bs, weights, strict=True)]


def test_round_robin_spreads_requests_evenly(reverse, backends) -> None:
    p, url, _ = reverse({"rules": [{"name": "all", "forward": {"backends": _pool(backends)}}]})
    with httpx.Client() as c:
        names = _names(c, url + "/x", 30)
    assert Counter(names) == {"a": 10, "b": 10, "c": 10}
    line = next(j for j in p.json_lines() if j.get("message") == "request")
    assert line["backend"] in ("a", "b", "c") and line["route"] == "all"


def test_weighted_round_robin_spreads_by_weight(reverse, backends) -> None:
    rule = {
        "name": "w",
        "forward": {"backends": _pool(backends, [3, 1, 1]), "strategy": "weighted_round_robin"},
    }
    _, url, _ = reverse({"rules": [rule]})
    with httpx.Client() as c:
        names = _names(c, url + "/x", 50)
    assert Counter(names) == {"a": 30, "b": 10, "c": 10}


def test_host_path_header_rules_strip_prefix_and_host(reverse, backends) -> None:
    a, b, c = backends
    rules = [
        {"name": "hdr", "match": {"headers": [{"name": "X-Canary", "regex": "^(1|yes)$"}]},
         "forward": {"target": c.url, "preserve_host": True}},
        {"name": "api", "match": {"host": "*.example.com", "path": "/api"},
         "forward": {"target": b.url, "strip_prefix": "/api"}},
        {"name": "static", "match": {"path": "/static/*", "method": "GET"},
         "forward": {"target": a.url}},
    ]  # fmt: skip
    _, url, _ = reverse({"rules": rules, "default_backend": a.url})
    with httpx.Client() as cl:
        r = _get(cl, url + "/api/users?id=1", headers={"Host": "shop.example.com"})
        assert r.json() == {"backend": "b", "path": "/users?id=1", "host": f"127.0.0.1:{b.port}"}
        r = _get(cl, url + "/api/users", headers={"Host": "example.com"})  # apex: no match
        assert r.json()["backend"] == "a" and r.json()["path"] == "/api/users"
        r = _get(cl, url + "/x", headers={"Host": "shop.example.com", "X-Canary": "yes"})
        assert r.json()["backend"] == "c" and r.json()["host"] == "shop.example.com"
        r = _get(cl, url + "/x", headers={"X-Canary": "no"})
        assert r.json()["backend"] == "a"
        r = _get(cl, url + "/static/app.css")
        assert r.json() == {
            "backend": "a",
            "path": "/static/app.css",
            "host": f"127.0.0.1:{a.port}",
        }


def test_no_matching_rule_and_no_default_is_404(reverse, backends) -> None:
    rules = [{"name": "api", "match": {"path": "/api"}, "forward": {"target": backends[0].url}}]
    _, url, _ = reverse({"rules": rules})
    with httpx.Client() as c:
        r = _get(c, url + "/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"


def test_breaker_opens_half_opens_and_closes(reverse, backends) -> None:
    a, b, _ = backends
    p, url, mgmt = reverse(
        {"rules": [{"name": "ab", "forward": {"backends": _pool([a, b])}}],
         "retries": {"max_attempts": 1}},
        circuit_breaker={"failure_threshold": 2, "timeout": "1s", "success_threshold": 2},
    )  # fmt: skip
    auth = {"Authorization": "Bearer secret"}
    a.stop()
    with httpx.Client() as c:
        codes = [_get(c, url + "/x").status_code for _ in range(6)]
        # round robin sends a's turns to the dead backend until its breaker opens (2 failures)
        assert codes.count(502) == 2, codes
        p.wait_for(r"circuit closed -> open for backend a")
        assert _names(c, url + "/x", 4) == ["b"] * 4
        state = _get(c, mgmt + "/admin/backends", headers=auth).json()["backends"]
        assert {s["name"]: s["circuit"] for s in state} == {"a": "open", "b": "closed"}
        assert state[0]["last_failures"][0]["reason"] == "connection_refused"
        assert _get(c, mgmt + "/admin/backends").status_code == 401
        metrics = _get(c, mgmt + "/metrics").text
        assert 'backend_circuit_state{backend="a"} 1.0' in metrics
        assert 'http_requests_total{backend="b",method="GET",status="200"}' in metrics
        a.start()
        time.sleep(1.1)  # the breaker's timeout: nothing to poll before it has passed
        names = _names(c, url + "/x", 8)
        assert "a" in names
        p.wait_for(r"circuit open -> half_open for backend a")
        p.wait_for(r"circuit half_open -> closed for backend a")
        names = _names(c, url + "/x", 6)
        assert Counter(names) == {"a": 3, "b": 3}
        ready = _get(c, mgmt + "/health/readiness").json()
        shown = {b["name"]: b for b in ready["checks"]["backends"]}
        assert shown["a"]["circuit"] == "closed"


def test_all_backends_down_is_503_circuit_open_at_once(reverse, backends) -> None:
    a, b, _ = backends
    _, url, mgmt = reverse(
        {"rules": [{"name": "ab", "forward": {"backends": _pool([a, b])}}]},
        circuit_breaker={"failure_threshold": 1, "timeout": "30s"},
    )
    a.stop()
    b.stop()
    with httpx.Client() as c:
        first = _get(c, url + "/x")
        assert first.status_code == 502  # a failed, its retry on b failed: both circuits open
        start = time.monotonic()
        r = _get(c, url + "/x")
        assert r.status_code == 503 and r.json()["error"]["code"] == "CIRCUIT_OPEN"
        assert time.monotonic() - start < 1.0
        ready = _get(c, mgmt + "/health/readiness")
        assert ready.status_code == 503
        assert ready.json()["status"] == "not_ready"
        assert {b["circuit"] for b in ready.json()["checks"]["backends"]} == {"open"}


def test_killed_backend_under_load_idempotent_gets_see_no_failure(reverse, backends) -> None:
    """A backend dies while keep-alive clients keep sending GETs: connect failures and
    connections closed before any response byte are retried on the others, so no GET fails,
    and the breaker takes the dead one out."""
    a, b, c = backends
    p, url, mgmt = reverse(
        {"rules": [{"name": "abc", "forward": {"backends": _pool(backends)}}],
         "retries": {"max_attempts": 3, "backoff": "10ms"}},
        circuit_breaker={"failure_threshold": 3, "timeout": "30s"},
    )  # fmt: skip
    results: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client() as cl:  # keep-alive: upstream connections are reused
            i = 0
            while not stop.is_set() and i < 400:
                i += 1
                r = _get(cl, url + f"/load/{i}")
                name = r.json().get("backend", "") if r.status_code == 200 else ""
                results.append((time.monotonic(), r.status_code, name))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.8)  # load runs for a fixed time around the kill: nothing to poll
    b.stop()
    killed = time.monotonic()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(15)
    statuses = Counter(status for _, status, _ in results)
    assert statuses.keys() == {200}, statuses
    after = Counter(name for at, _, name in results if at > killed + 0.2)
    assert after["b"] == 0 and after["a"] > 5 and after["c"] > 5, after
    p.wait_for(r"circuit closed -> open for backend b")
    p.wait_for(r"retrying on [ac] after b failed")
    with httpx.Client() as cl:
        metrics = _get(cl, mgmt + "/metrics").text
    assert 'backend_retries_total{backend="b"}' in metrics
    assert 'backend_errors_total{backend="b",reason=' in metrics


def test_post_is_never_retried(reverse, backends) -> None:
    a, b, _ = backends
    _, url, _ = reverse(
        {"rules": [{"name": "ab", "forward": {"backends": _pool([a, b])}}]},
        circuit_breaker={"enabled": False},
    )
    a.stop()
    with httpx.Client() as c:
        codes = [c.post(url + "/x", content=b"x", timeout=TIMEOUT).status_code for _ in range(4)]
        gets = [_get(c, url + "/x").status_code for _ in range(4)]
    assert codes.count(502) == 2 and codes.count(200) == 2
    assert gets == [200] * 4  # GETs fail over to b


def test_active_health_checks_take_a_backend_out_and_back(reverse, backends) -> None:
    a, b, _ = backends
    p, url, mgmt = reverse(
        {"rules": [{"name": "ab", "forward": {"backends": _pool([a, b])}}]},
        health_checks={"enabled": True, "interval": "100ms", "timeout": "1s",
                       "unhealthy_threshold": 2, "healthy_threshold": 2},
    )  # fmt: skip
    a.healthy = False
    p.wait_for(r"backend a is unhealthy")
    with httpx.Client() as c:
        assert _names(c, url + "/x", 4) == ["b"] * 4
        ready = _get(c, mgmt + "/health/readiness").json()
        shown = {b["name"]: b for b in ready["checks"]["backends"]}
        assert ready["status"] == "ready" and shown["a"]["status"] == "unhealthy"
        a.healthy = True
        p.wait_for(r"backend a is healthy")
        assert Counter(_names(c, url + "/x", 4)) == {"a": 2, "b": 2}


def test_retry_after_on_503_takes_the_backend_out(reverse, backends) -> None:
    a, b, _ = backends
    a.status, a.headers = 503, {"Retry-After": "30"}
    _, url, _ = reverse(
        {"rules": [{"name": "ab", "forward": {"backends": _pool([a, b])}}]},
        circuit_breaker={"enabled": False},
    )
    with httpx.Client() as c:
        codes = [_get(c, url + "/x").status_code for _ in range(6)]
    assert codes[0] == 503 and codes[1:] == [200] * 5


def test_reverse_backend_on_loopback_works_while_forward_clients_cannot_reach_it(
    proxy_factory, tmp_path: Path, backends
) -> None:
    a = backends[0]
    path = write_profile(
        tmp_path,
        {
            "routing": {
                "listeners": [
                    {"mode": "forward"},
                    {"mode": "reverse", "host": "127.0.0.2", "port": 0},
                ],
                "default_backend": a.url,
            },
            "health_checks": {"enabled": False},
        },
    )
    p = proxy_factory(options={"waypost_profile": str(path)}, wait=False)
    rport = int(p.wait_for(REVERSE, timeout=40).group(2))
    mgmt = f"http://127.0.0.1:{int(p.wait_for(MANAGEMENT, timeout=40).group(1))}"
    # mitmproxy 12 binds the command line's listener first and then the profile's: ask the
    # management app where the forward listener ended up.
    deadline = time.monotonic() + 10
    while True:
        ready = httpx.get(mgmt + "/health/readiness", timeout=TIMEOUT).json()
        addrs = ready["checks"]["listeners"]["addresses"]
        forward = [a for a in addrs if a.startswith("127.0.0.1:")]
        if len(addrs) == 2 and forward:
            break
        assert time.monotonic() < deadline, addrs
        time.sleep(0.05)
    p.port = int(forward[0].rpartition(":")[2])
    with httpx.Client() as c:
        r = _get(c, f"http://127.0.0.2:{rport}/through-reverse")
        assert r.status_code == 200 and r.json()["backend"] == "a"
    with httpx.Client(proxy=p.url) as fwd:
        r = _get(fwd, a.url + "/direct")
        assert r.status_code == 403 and r.json()["error"]["code"] == "ACCESS_DENIED"
    assert a.hits == 1


def test_forward_mode_rule_routes_to_a_backend_with_its_timeout(
    proxy_factory, tmp_path: Path, backends
) -> None:
    a, b, _ = backends
    b.delay = 2.0
    rules = [
        {"name": "app", "match": {"host": "app.internal"}, "forward": {"target": a.url}},
        {"name": "slow", "match": {"host": "slow.internal"},
         "forward": {"target": b.url, "timeout": "300ms"}},
    ]  # fmt: skip
    path = write_profile(
        tmp_path, {"routing": {"rules": rules}, "health_checks": {"enabled": False}}
    )
    p = proxy_factory(options={"waypost_profile": str(path)})
    with httpx.Client(proxy=p.url) as c:
        r = _get(c, "http://app.internal/x?y=1")
        assert r.status_code == 200
        assert r.json() == {"backend": "a", "path": "/x?y=1", "host": f"127.0.0.1:{a.port}"}
        start = time.monotonic()
        r = _get(c, "http://slow.internal/x")
        assert r.status_code == 504 and r.json()["error"]["code"] == "BACKEND_TIMEOUT"
        assert time.monotonic() - start < 1.9
        # no rule matches: the client's own target, and egress still refuses loopback
        r = _get(c, a.url + "/direct")
        assert r.status_code == 403


class Closer(ThreadedServer):
    """Reads a request head, then closes the connection without a response byte."""

    def handle(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            read_head(conn)


def test_connection_closed_before_any_response_byte_is_retried_for_gets_only(
    reverse, backends
) -> None:
    closer = Closer()
    try:
        a = backends[0]
        pool = [{"url": f"http://127.0.0.1:{closer.port}", "name": "closer"}, *_pool([a])]
        p, url, _ = reverse(
            {"rules": [{"name": "r", "forward": {"backends": pool}}]},
            circuit_breaker={"enabled": False},
        )
        with httpx.Client() as c:
            codes = [_get(c, url + "/g").status_code for _ in range(4)]
            assert codes == [200] * 4
            posts = [
                c.post(url + "/p", content=b"x", timeout=TIMEOUT).status_code for _ in range(4)
            ]
            assert sorted(posts) == [200, 200, 502, 502]
        p.wait_for(r"retrying on a after closer failed \(closed\)")
        assert closer.accepts >= 4
    finally:
        closer.close()
