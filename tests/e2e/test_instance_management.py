"""One management port for an instance of two real workers (issue 12).

The test stands in for the supervisor: it binds each worker's management socket on loopback,
starts two mitmdump workers (`python -m addons.supervisor.worker`, the bundle, cache and admin
API on) with the contract's environment and that socket inherited, and serves the instance app
(`make_app`) in a thread of its own. The workers listen on different proxy ports (no
SO_REUSEPORT needed here).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from addons.supervisor.instance import Settings, WorkerView, make_app
from tests.conftest import (
    _LISTENING,
    ROOT,
    Backend,
    Proxy,
    json_body,
    raw_request,
    serve_app,
    status_of,
    wait_until,
)
from tests.e2e.cli_helpers import TOKEN, Stream, wait_gone

PROFILE = """\
server: {host: 127.0.0.1, port: 8080, timeouts: {connect: 2s, read: 3s}}
logging: {level: info, format: json, output: stdout}
metrics: {enabled: true, host: 127.0.0.1, port: 0}
security:
  egress: {block_private: true, allowed_networks: [127.0.0.1/32]}
admin: {token: s3cret}
cache: {mode: default_ttl, default_ttl: 60s, max_memory: 8MB}
""" + (f"cli: {{enabled: true, token: {TOKEN}, allowed_commands: [/bin/cat]}}\n")
AUTH = {"Authorization": "Bearer s3cret"}
GET_200 = frozenset({("method", "GET"), ("status", "200"), ("backend", "")})


class Worker(Proxy):
    """A worker as the supervisor starts it: its management socket passed with pass_fds."""

    def __init__(self, args: list[str], env: dict[str, str], sock: socket.socket) -> None:
        self.args = args
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
            text=True,
            errors="replace",
            pass_fds=(sock.fileno(),),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.host = "127.0.0.1"
        self.port = int(self.wait_for(_LISTENING, timeout=30).group(2))


class Instance:
    def __init__(self, port: int, workers: list[Worker], views: list[WorkerView]) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.workers = workers
        self.views = views


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    tmp = tmp_path_factory.mktemp("instance")
    profile = tmp / "profile.yaml"
    profile.write_text(PROFILE)
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    views = [
        WorkerView(i, None, f"http://127.0.0.1:{s.getsockname()[1]}") for i, s in enumerate(socks)
    ]
    workers: list[Worker] = []
    with serve_app(make_app(lambda: list(views), Settings())) as port:
        try:
            for i, sock in enumerate(socks):
                confdir = tmp / f"confdir{i}"
                confdir.mkdir()
                env = {k: v for k, v in os.environ.items() if not k.startswith("WAYPOST_")}
                env |= {
                    "PYTHONUNBUFFERED": "1",
                    "WAYPOST_WORKER": str(i),
                    "WAYPOST_WORKERS": "2",
                    "WAYPOST_MANAGEMENT_FD": str(sock.fileno()),
                    "WAYPOST_INSTANCE_MANAGEMENT": f"http://127.0.0.1:{port}",
                }
                args = [sys.executable, "-m", "addons.supervisor.worker"]
                args += ["--listen-host", "127.0.0.1", "-p", "0", "--set", f"confdir={confdir}"]
                args += ["-s", str(ROOT / "addons/bundle.py")]
                args += ["--set", f"waypost_profile={profile}"]
                workers.append(Worker(args, env, sock))
                views[i] = WorkerView(i, workers[-1].proc.pid, views[i].management)
                # The worker holds it now: once the worker dies, its port refuses at once.
                sock.close()
            yield Instance(port, workers, views)
        finally:
            for w in workers:
                w.stop()
            for s in socks:
                s.close()


def client(base_url: str = "") -> httpx.Client:
    return httpx.Client(base_url=base_url, trust_env=False, timeout=10)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def requests_total(text: str) -> float:
    return samples(text).get(("http_requests_total", GET_200), 0.0)


def test_startup_and_readiness_speak_for_every_worker(instance: Instance) -> None:
    with client(instance.url) as c:
        r = c.get("/health/startup")
        assert r.status_code == 200, r.text
        assert r.json()["checks"]["workers"]["started"] == [0, 1]
        r = c.get("/health/readiness")
        assert r.status_code == 200, r.text
        listed = r.json()["checks"]["workers"]["workers"]
        assert [(w["worker"], w["ok"], w["status"]) for w in listed] == [
            (0, True, "ready"),
            (1, True, "ready"),
        ]
        assert listed[1]["checks"]["listeners"]["addresses"] == [
            f"127.0.0.1:{instance.workers[1].port}"
        ]
        assert c.get("/health/liveness").json()["status"] == "ok"


def test_metrics_are_the_sum_of_the_workers(instance: Instance, backend: Backend) -> None:
    w0, w1 = instance.workers
    with client(instance.url) as m:
        before = requests_total(m.get("/metrics").text)
        for w, n in ((w0, 3), (w1, 2)):
            with httpx.Client(proxy=w.url, trust_env=False, timeout=10) as c:
                for i in range(n):
                    assert c.get(f"{backend.url}/echo/sum/{w.port}/{i}").status_code == 200
        r = m.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    got = samples(r.text)
    assert got[("http_requests_total", GET_200)] == before + 5
    own = []
    for v in instance.views:
        with client() as c:
            own.append(requests_total(c.get(f"{v.management}/metrics").text))
    assert got[("http_requests_total", GET_200)] == sum(own) and all(own)
    assert got[("waypost_workers", frozenset())] == 2
    assert got[("waypost_workers_up", frozenset())] == 2
    build = [v for (name, _), v in got.items() if name == "waypost_build_info"]
    assert build == [1.0]
    promtool = shutil.which("promtool")
    if promtool is not None:  # tests/unit/test_instance_app.py requires it in CI
        proc = subprocess.run(
            [promtool, "check", "metrics"], input=r.text, capture_output=True, text=True,
            timeout=30, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_purge_purges_every_worker(instance: Instance, backend: Backend) -> None:
    for w in instance.workers:
        with httpx.Client(proxy=w.url, trust_env=False, timeout=10) as c:
            url = f"{backend.url}/echo/purge/{w.port}"
            assert c.get(url).headers["x-cache-status"] == "MISS"
            assert c.get(url).headers["x-cache-status"] == "HIT"
    with client(instance.url) as m:
        params = {"pattern": "*/echo/purge/*"}
        r = m.delete("/admin/cache", params=params)
        assert r.status_code == 401 and r.json()["error"]["code"] == "UNAUTHORIZED"
        assert r.headers["www-authenticate"] == "Bearer"
        r = m.delete("/admin/cache", params=params, headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["invalidated"] == 2
        assert [(w["worker"], w["status"], w["body"]["invalidated"]) for w in body["workers"]] == [
            (0, 200, 1),
            (1, 200, 1),
        ]
    for w in instance.workers:
        with httpx.Client(proxy=w.url, trust_env=False, timeout=10) as c:
            url = f"{backend.url}/echo/purge/{w.port}"
            assert c.get(url).headers["x-cache-status"] == "MISS"


def test_the_proxy_port_relays_metrics_and_admin_to_the_instance(
    instance: Instance, backend: Backend
) -> None:
    w0, w1 = instance.workers
    host = f"Host: 127.0.0.1:{w1.port}\r\n"
    resp = raw_request(w1.port, f"GET /metrics HTTP/1.1\r\n{host}\r\n".encode())
    assert status_of(resp) == 200
    relayed = samples(resp.partition(b"\r\n\r\n")[2].decode())
    assert relayed[("waypost_workers", frozenset())] == 2
    with client() as c:
        own = requests_total(c.get(f"{instance.views[1].management}/metrics").text)
    assert relayed[("http_requests_total", GET_200)] > own  # worker 0's requests are in it
    for w in instance.workers:
        with httpx.Client(proxy=w.url, trust_env=False, timeout=10) as c:
            c.get(f"{backend.url}/echo/relay/{w.port}")
    resp = raw_request(
        w0.port,
        f"DELETE /admin/cache?pattern=*/echo/relay/* HTTP/1.1\r\nHost: 127.0.0.1:{w0.port}\r\n"
        "Authorization: Bearer s3cret\r\nContent-Length: 0\r\n\r\n".encode(),
    )
    assert status_of(resp) == 200, resp
    body = json_body(resp)
    assert body["invalidated"] == 2 and len(body["workers"]) == 2
    # Health on the proxy port stays the answering worker's own.
    head = f"GET /health/readiness HTTP/1.1\r\nHost: 127.0.0.1:{w0.port}\r\n\r\n"
    resp = raw_request(w0.port, head.encode())
    assert status_of(resp) == 200
    assert json_body(resp)["checks"]["listeners"]["addresses"] == [f"127.0.0.1:{w0.port}"]


def test_the_cli_streams_through_the_instance_port(instance: Instance) -> None:
    """POST /cli/execute goes to one worker, its stdin and output streamed both ways."""
    pids = []
    for _ in instance.workers:  # one run per worker, in turn
        s = Stream(instance.port, body=None)
        try:
            s.send(b'{"command": "cat", "stdin_stream": true}\n')
            assert s.read_head()[0] == 200
            assert s.headers["transfer-encoding"] == "chunked"
            start = s.next_event()
            assert start is not None and start[1]["type"] == "start"
            pids.append(start[1]["pid"])
            # Its output arrives while the request body is still open.
            s.send(b'{"stdin": "first line\\n"}\n')
            while (ev := s.next_event()) is not None and ev[1]["type"] == "heartbeat":
                pass
            assert ev is not None and ev[1]["data"] == "first line\n", ev
            s.end()
            rest = []
            while (ev := s.next_event()) is not None:
                rest.append(ev[1])
            assert rest[-1]["type"] == "exit" and rest[-1]["code"] == 0
        finally:
            s.close()
    # A client that leaves ends its run in the worker.
    s = Stream(instance.port, body=None)
    s.send(b'{"command": "cat", "stdin_stream": true}\n')
    start = s.next_event()
    assert start is not None and start[1]["type"] == "start"
    pids.append(start[1]["pid"])
    s.close()
    assert wait_gone(start[1]["pid"], 5)

    def ran() -> list[list[int]]:
        return [
            [j["pid"] for j in w.json_lines() if j.get("message") == "cli execution"]
            for w in instance.workers
        ]

    wait_until(lambda: sum(map(len, ran())) == len(pids))
    assert all(ran()) and sorted(sum(ran(), [])) == sorted(pids)  # both workers ran some


def test_a_killed_worker_leaves_the_instance_ready(instance: Instance) -> None:
    """Last in this module: worker 1 is gone afterwards."""
    w1 = instance.workers[1]
    with client(instance.url) as m:
        before = requests_total(m.get("/metrics").text)
    w1.proc.send_signal(signal.SIGKILL)
    w1.proc.wait(10)
    with client(instance.url) as m:
        # Before the supervisor notices (pid still set): it does not answer.
        r = m.get("/health/readiness")
        assert r.status_code == 200, r.text
        listed = r.json()["checks"]["workers"]["workers"]
        assert listed[0]["ok"] is True
        assert listed[1]["ok"] is False and listed[1]["status"] == "down"
        assert listed[1]["error"].startswith("no answer")
        # The supervisor restarting it.
        instance.views[1] = WorkerView(1, None, instance.views[1].management, restarts=1)
        r = m.get("/health/readiness")
        assert r.status_code == 200
        entry = r.json()["checks"]["workers"]["workers"][1]
        assert entry == {"worker": 1, "pid": None, "ok": False, "status": "down",
                         "error": "restarting"}  # fmt: skip
        got = samples(m.get("/metrics").text)
        assert got[("waypost_workers_up", frozenset())] == 1
        # Its requests stay counted: the instance's counters never go backwards.
        assert got[("http_requests_total", GET_200)] == before
        assert got[("waypost_worker_restarts_total", frozenset({("worker", "1")}))] == 1
        assert m.get("/health/startup").status_code == 200  # it had started once
        r = m.delete("/admin/cache", params={"pattern": "*"}, headers=AUTH)
        assert r.status_code == 207
        assert [(w["worker"], w["status"]) for w in r.json()["workers"]] == [(0, 200), (1, None)]
