"""One instance as N workers: `python -m addons.supervisor` with real worker processes.

Every process here is started by the test and ended by its PID (the supervisor; a worker only
by the SIGKILL the test is about). The proxy port is a fixed free port: with port 0 every
worker would listen on a port of its own.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, Backend, Proxy, raw_request, status_of, wait_until

PROFILE = """\
server: {{workers: {workers}, shutdown_timeout: 5s}}
logging: {{level: info, format: json}}
metrics: {{enabled: false}}
security:
  egress: {{allowed_networks: [127.0.0.1/32]}}
  filtering: {{domains: {{blocked: [{blocked}]}}}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_profile(path: Path, workers: int | str = 2, blocked: str = "") -> Path:
    path.write_text(PROFILE.format(workers=workers, blocked=blocked))
    return path


def start(tmp_path: Path, profile: Path, *, wait: int = 2, port: int = 0) -> Proxy:
    """The supervisor on 127.0.0.1:`port` (a free one if 0); waits until `wait` workers listen."""
    port = port or free_port()
    confdir = tmp_path / "confdir"
    confdir.mkdir(exist_ok=True)
    args = [sys.executable, "-m", "addons.supervisor", "-s", str(ROOT / "addons/bundle.py")]
    args += ["--listen-host", "127.0.0.1", "-p", str(port), "--set", f"confdir={confdir}"]
    args += ["--set", f"waypost_profile={profile}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAYPOST_")}
    env["PYTHONUNBUFFERED"] = "1"
    p = Proxy(args, env, ROOT)
    p.port = port
    try:
        wait_until(lambda: len(listening_workers(p)) >= wait, timeout=30)
    except AssertionError:
        p.stop()
        raise AssertionError("workers did not listen:\n" + "\n".join(p.lines[-40:])) from None
    return p


@pytest.fixture
def instances(tmp_path: Path) -> Iterator:
    started: list[Proxy] = []

    def factory(profile: Path, **kwargs: object) -> Proxy:
        p = start(tmp_path, profile, **kwargs)  # type: ignore[arg-type]
        started.append(p)
        return p

    yield factory
    for p in started:
        p.stop(20)


def workers(p: Proxy) -> dict[int, int]:
    """worker index -> pid, from the supervisor's children and their environment."""
    out = {}
    try:
        children = Path(f"/proc/{p.proc.pid}/task/{p.proc.pid}/children").read_text().split()
    except OSError:
        return {}
    for pid in map(int, children):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for var in environ:
            if var.startswith(b"WAYPOST_WORKER="):
                out[int(var.split(b"=", 1)[1])] = pid
    return out


def listening_workers(p: Proxy) -> Counter[int]:
    """How many times each worker logged that its proxy listener is up (restarts log again)."""
    return Counter(
        j["worker"]
        for j in p.json_lines()
        if f"listening at 127.0.0.1:{p.port}" in j.get("message", "") and "worker" in j
    )


def get(port: int, url: str, timeout: float = 10) -> int:
    req = f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    return status_of(raw_request(port, req, timeout=timeout))


def served_by(p: Proxy, start: int = 0) -> Counter[int]:
    lines = [j for j in p.json_lines()[start:] if j.get("message") == "request"]
    return Counter(j["worker"] for j in lines)


def test_two_workers_share_the_listener(instances, tmp_path: Path, backend: Backend) -> None:
    p = instances(write_profile(tmp_path / "p.yaml"))
    statuses = Counter(get(p.port, f"{backend.url}/echo/{i}") for i in range(200))
    assert statuses == {200: 200}
    share = wait_until(lambda: sum((c := served_by(p)).values()) == 200 and c)
    # SO_REUSEPORT hashes each new connection's addresses to a listener: a fair coin per
    # connection, so each worker's share of 200 is 100 +- 7 (one sigma); 60 is 5.6 sigma away.
    assert set(share) == {0, 1}
    assert min(share.values()) >= 60, share


def test_reverse_listeners_are_shared_too(instances, tmp_path: Path, backend: Backend) -> None:
    port = free_port()
    profile = write_profile(tmp_path / "p.yaml")
    profile.write_text(
        profile.read_text()
        + f"routing:\n  default_backend: {backend.url}\n"
        + f"  listeners: [{{mode: reverse, host: 127.0.0.1, port: {port}}}]\n"
    )
    p = instances(profile, port=port)
    reverse = f"listening at 127.0.0.1:{port}"
    wait_until(
        lambda: (
            {
                j["worker"]
                for j in p.json_lines()
                if "reverse proxy" in j.get("message", "").lower() and reverse in j["message"]
            }
            == {0, 1}
        ),
        timeout=30,
    )
    mark = len(p.json_lines())
    assert Counter(get(port, "/echo/reverse") for _ in range(100)) == {200: 100}
    share = wait_until(lambda: sum((c := served_by(p, mark)).values()) == 100 and c)
    assert min(share[0], share[1]) >= 25, share


def test_sigkill_under_load_restarts_the_worker(
    instances, tmp_path: Path, backend: Backend
) -> None:
    p = instances(write_profile(tmp_path / "p.yaml"))
    before = workers(p)
    assert set(before) == {0, 1}
    results: list[int | str] = []
    killed_at = threading.Event()

    def load() -> None:
        for i in range(300):
            req = f"GET {backend.url}/echo/{i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            try:
                # The connection the dying worker held ends with a reset or a bare close.
                answer = raw_request(p.port, req.encode(), timeout=5)
                results.append(status_of(answer) if answer else "closed without an answer")
            except OSError as e:
                results.append(type(e).__name__)
            if i == 100:
                killed_at.set()

    t = threading.Thread(target=load)
    t.start()
    assert killed_at.wait(60)
    listened = listening_workers(p)[1]
    os.kill(before[1], signal.SIGKILL)
    t0 = time.monotonic()
    back = wait_until(lambda: (w := workers(p)).get(1) not in (None, before[1]) and w, 5, 0.02)
    elapsed = time.monotonic() - t0
    t.join(120)
    assert back[0] == before[0]
    assert elapsed < 1.0, elapsed
    # The client is sequential and opens a new connection per request, so worker 1 held one
    # connection at most when it died: at most that one request fails, plus one whose SYN the
    # kernel queued on the dying listener in the instant before it closed.
    failed = [r for r in results if r != 200]
    assert len(results) == 300
    assert len(failed) <= 2, failed
    restarted = p.wait_for(rf"worker 1 \(pid {before[1]}\) exited with signal SIGKILL")
    assert str(back[1]) in restarted.string
    wait_until(lambda: listening_workers(p)[1] > listened, timeout=30)
    mark = len(p.json_lines())
    assert Counter(get(p.port, f"{backend.url}/echo") for _ in range(60)) == {200: 60}
    assert served_by(p, mark)[1] > 0  # the new worker 1 serves


def test_sighup_reloads_every_worker(instances, tmp_path: Path, backend: Backend) -> None:
    profile = write_profile(tmp_path / "p.yaml")
    p = instances(profile)
    assert get(p.port, "http://blocked.example/") != 403
    # Same mtime: the workers' file watchers see no change, only the SIGHUP makes them reload.
    stat = profile.stat()
    write_profile(profile, blocked="blocked.example")
    os.utime(profile, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    p.proc.send_signal(signal.SIGHUP)
    reloaded = wait_until(
        lambda: (
            {j["worker"] for j in p.json_lines() if "reloaded" in j.get("message", "")} >= {0, 1}
        )
    )
    assert reloaded
    mark = len(p.json_lines())
    statuses = Counter(get(p.port, "http://blocked.example/") for _ in range(40))
    assert statuses == {403: 40}
    assert set(served_by(p, mark)) == {0, 1}  # both workers answered with the new profile


def test_sigterm_drains_every_worker_and_exits_0(
    instances, tmp_path: Path, backend: Backend
) -> None:
    p = instances(write_profile(tmp_path / "p.yaml"))
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(get(p.port, f"{backend.url}/slow/1501")))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    wait_until(lambda: backend.hits.get("/slow/1501", 0) >= 6 or None, timeout=10)
    hits = backend.hits.get("/slow/1501", 0)
    t0 = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(15) == 0
    for t in threads:
        t.join(10)
    assert results == [200] * 6, (results, hits)
    assert time.monotonic() - t0 < 5
    drained = {j["worker"] for j in p.json_lines() if "drain finished" in j.get("message", "")}
    assert drained == {0, 1}
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", p.port), timeout=2).close()


def test_a_bad_profile_stops_before_any_worker(tmp_path: Path) -> None:
    profile = tmp_path / "bad.yaml"
    profile.write_text("server:\n  workers: 2\n  port: 99999\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAYPOST_")}
    r = subprocess.run(
        [sys.executable, "-m", "addons.supervisor", "--set", f"waypost_profile={profile}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert f"{profile}:3: server.port: Input should be less than or equal to 65535" in r.stderr
    assert "Loading script" not in r.stdout + r.stderr


def test_workers_that_cannot_listen_stop_the_instance(tmp_path: Path) -> None:
    taken = socket.create_server(("127.0.0.1", 0))  # no SO_REUSEPORT: no worker can share it
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WAYPOST_")}
        args = [sys.executable, "-m", "addons.supervisor", "-s", "addons/bundle.py"]
        args += ["--listen-host", "127.0.0.1", "-p", str(taken.getsockname()[1])]
        args += ["--set", f"confdir={tmp_path}", "--set", "server_workers=2"]
        args += ["--set", "metrics_enabled=false"]
        r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    finally:
        taken.close()
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("waypost supervisor: worker "), r.stderr[-2000:]
    assert "stopping the instance" in last


def test_one_worker_leaves_no_supervisor(tmp_path: Path, backend: Backend) -> None:
    p = start(tmp_path, write_profile(tmp_path / "p.yaml", workers=1), wait=0)
    try:
        p.wait_for(rf"listening at 127\.0\.0\.1:{p.port}", timeout=30)
        cmdline = Path(f"/proc/{p.proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"addons.supervisor.worker" in cmdline  # the started pid became the worker
        assert workers(p) == {}  # and it has no worker children
        assert get(p.port, f"{backend.url}/echo") == 200
        line = wait_until(
            lambda: next((j for j in p.json_lines() if j.get("message") == "request"), None)
        )
        assert "worker" not in line
    finally:
        assert p.stop() == 0


def test_the_management_port_speaks_for_the_instance(
    instances, tmp_path: Path, backend: Backend
) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text(
        PROFILE.format(workers=2, blocked="")
        .replace("metrics: {enabled: false}", "metrics: {enabled: true, port: 0}")
        .replace("security:", "admin: {token: secret}\ncache: {enabled: true}\nsecurity:")
    )
    p = instances(profile)
    m = p.wait_for(r"instance management listening at http://127\.0\.0\.1:(\d+)")
    mgmt = f"http://127.0.0.1:{m.group(1)}"
    for i in range(40):  # new connections: the kernel spreads them over both workers
        assert get(p.port, f"{backend.url}/echo/{i}") == 200
    assert set(served_by(p)) == {0, 1}
    auth = {"Authorization": "Bearer secret"}
    with httpx.Client(timeout=10, trust_env=False) as c:
        text = wait_until(
            lambda: (
                (t := c.get(f"{mgmt}/metrics").text)
                and 'http_requests_total{backend="",method="GET",status="200"} 40.0' in t
                and t
            )
        )
        assert "waypost_workers 2.0" in text
        ready = c.get(f"{mgmt}/health/readiness")
        assert ready.status_code == 200
        assert len(ready.json()["checks"]["workers"]["workers"]) == 2
        purge = c.delete(f"{mgmt}/admin/cache", params={"pattern": "*"}, headers=auth)
        assert purge.status_code == 200 and len(purge.json()["workers"]) == 2
        assert c.delete(f"{mgmt}/admin/cache", params={"pattern": "*"}).status_code == 401
        # The proxy port's /metrics is the instance's too, whichever worker answers.
        via_proxy = c.get(f"http://127.0.0.1:{p.port}/metrics").text
        assert "waypost_workers 2.0" in via_proxy


def test_two_workers_share_one_bucket_through_redis(
    instances, tmp_path: Path, backend: Backend, redis_server
) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text(
        PROFILE.format(workers=2, blocked="").replace(
            "security:",
            f"state: {{backend: redis, redis_url: '{redis_server.url}'}}\n"
            "security:\n  rate_limiting: {requests_per_second: 0.1, burst: 10}",
        )
    )
    p = instances(profile)
    # New connections: the kernel spreads them over both workers, one bucket holds for both.
    statuses = Counter(get(p.port, f"{backend.url}/echo/{i}") for i in range(30))
    assert statuses == {200: 10, 429: 20}
    assert set(served_by(p)) == {0, 1}
