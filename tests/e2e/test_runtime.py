"""The bundle through a worker (`python -m addons.supervisor.worker`) on each event loop, with
and without PYTHONOPTIMIZE=1: requests, refusals, errors, health and drain behave the same."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from addons import runtime
from tests.conftest import (
    _LISTENING,
    MANAGEMENT,
    ROOT,
    Backend,
    Proxy,
    raw_request,
    status_of,
)

PROFILE = """\
server: {host: 127.0.0.1, port: 8080, shutdown_timeout: 5s, event_loop: %s}
logging: {level: info, format: json, output: stdout}
metrics: {enabled: true, host: 127.0.0.1, port: 0}
limits: {max_url_length: 2048, max_body_size: 1MB}
security:
  egress: {block_private: true, allowed_networks: [127.0.0.1/32]}
  rate_limiting: {requests_per_second: 1000, burst: 1000}
  filtering: {domains: {blocked: ["*.blocked.example"]}}
  headers: {enabled: true}
cache: {enabled: true}
"""

# (server.event_loop, PYTHONOPTIMIZE): the Docker image's (the default loop, asserts stripped),
# and uvloop with asserts.
SETUPS = [("asyncio", "1"), ("uvloop", "")]


@pytest.fixture(params=SETUPS, ids=lambda s: f"{s[0]}-O{s[1] or 0}")
def worker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Proxy]:
    loop, optimize = request.param
    profile = tmp_path / "profile.yaml"
    profile.write_text(PROFILE % loop)
    confdir = tmp_path / "confdir"
    confdir.mkdir()
    args = [sys.executable, "-m", "addons.supervisor.worker", "--listen-host", "127.0.0.1"]
    args += ["-p", "0", "--set", f"confdir={confdir}", "-s", str(ROOT / "addons/bundle.py")]
    args += ["--set", f"waypost_profile={profile}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAYPOST_")}
    env.update(PYTHONUNBUFFERED="1", PYTHONOPTIMIZE=optimize)
    p = Proxy(args, env, ROOT)
    try:
        p.port = int(p.wait_for(_LISTENING, timeout=30).group(2))
        p.mgmt_port = int(p.wait_for(MANAGEMENT).group(1))  # type: ignore[attr-defined]
        p.setup = request.param  # type: ignore[attr-defined]
        yield p
    finally:
        p.stop()


def test_bundle_serves_through_a_worker(worker: Proxy, backend: Backend) -> None:
    loop, optimize = worker.setup  # type: ignore[attr-defined]
    line = worker.wait_for(
        r"runtime: event loop (\w+) .*gc\.freeze (\d+) objects.*PYTHONOPTIMIZE=(\d)"
    )
    assert line.group(1) == loop
    assert int(line.group(2)) > 10_000
    assert line.group(3) == (optimize or "0")
    with httpx.Client(proxy=worker.url, timeout=10, trust_env=False) as c:
        for method in ("GET", "POST", "HEAD"):
            r = c.request(method, f"{backend.url}/echo")
            assert r.status_code == 200, method
            assert r.headers["x-content-type-options"] == "nosniff"
        assert c.get(f"{backend.url}/echo").status_code == 200  # the cache on, a second GET
        refused = {
            "TRACE": c.request("TRACE", f"{backend.url}/echo"),
            "long": c.get(f"{backend.url}/echo/{'a' * 3000}"),
            "private": c.get("http://10.255.255.1:9/"),
            "blocked": c.get("http://ads.blocked.example/"),
        }
        assert {k: r.status_code for k, r in refused.items()} == {
            "TRACE": 405,
            "long": 414,
            "private": 403,
            "blocked": 403,
        }
        for r in refused.values():
            assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
    bad = raw_request(
        worker.port,
        f"GET {backend.url}/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: b\r\n folded\r\n\r\n".encode(),
    )
    assert status_of(bad) == 400 and b'"BAD_REQUEST"' in bad
    with httpx.Client(timeout=5, trust_env=False) as direct:
        ready = direct.get(f"http://127.0.0.1:{worker.mgmt_port}/health/readiness")  # type: ignore[attr-defined]
        assert ready.status_code == 200
    errors = [j for j in worker.json_lines() if j.get("level") in ("ERROR", "CRITICAL")]
    assert not errors
    assert worker.stop() == 0  # SIGTERM drains through the loop's signal handlers


def test_freed_memory_is_given_back_after_a_burst(proxy_factory, tmp_path: Path) -> None:
    """`server.memory_trim_interval`: after a burst of connections the worker calls glibc's
    malloc_trim in a thread and logs the RSS before and after."""
    if runtime.malloc_trim() is None:
        pytest.skip("this C library has no malloc_trim")
    profile = tmp_path / "trim.yaml"
    profile.write_text(
        "server: {host: 127.0.0.1, port: 8080, memory_trim_interval: 1s}\n"
        "logging: {level: debug, format: json, output: stdout}\n"
        "limits: {header_timeout: 1s}\n"
    )
    p = proxy_factory(options={"waypost_profile": str(profile)})
    socks = [socket.create_connection(("127.0.0.1", p.port)) for _ in range(200)]
    for s in socks:
        s.sendall(b"GET / HTTP/1.1\r\n")  # never finished: each gets its 408
    for s in socks:
        s.settimeout(5)
        assert s.recv(65536).startswith(b"HTTP/1.1 408")
        s.close()
    start = len(p.lines)
    trimmed = p.wait_for(r"runtime: malloc_trim: RSS ([\d.]+) -> ([\d.]+) MB", start=start)
    assert float(trimmed.group(2)) <= float(trimmed.group(1)) + 1  # never more than noise
