"""The management app and the metrics addon in a real mitmdump."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MANAGEMENT, ROOT, Backend, Proxy, json_body, raw_request, status_of

SCRIPTS = ("addons/metrics.py", "addons/management.py")


def start(proxy_factory: Callable[..., Proxy], **options: object) -> tuple[Proxy, int]:
    p = proxy_factory(scripts=SCRIPTS, options={"metrics_port": 0, **options})
    return p, int(p.wait_for(MANAGEMENT).group(1))


def direct() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=5)


def samples(mport: int) -> dict[tuple[str, frozenset], float]:
    with direct() as c:
        r = c.get(f"http://127.0.0.1:{mport}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(mport: int, name: str, **labels: str) -> float:
    return samples(mport).get((name, frozenset(labels.items())), 0.0)


def poll(fn: Callable[[], object], want: object, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while (got := fn()) != want:
        assert time.monotonic() < deadline, f"still {got!r}, wanted {want!r}"
        time.sleep(0.05)


def test_health_endpoints(proxy_factory: Callable[..., Proxy]) -> None:
    p, mport = start(proxy_factory)
    with direct() as c:
        for path, status in [
            ("liveness", "ok"),
            ("readiness", "ready"),
            ("startup", "started"),
        ]:
            r = c.get(f"http://127.0.0.1:{mport}/health/{path}")
            assert r.status_code == 200, r.text
            assert r.headers["content-type"].startswith("application/json")
            body = r.json()
            assert body["status"] == status and body["timestamp"].endswith("Z")
        checks = c.get(f"http://127.0.0.1:{mport}/health/readiness").json()["checks"]
        assert checks["listeners"]["addresses"] == [f"127.0.0.1:{p.port}"]
        assert "config" not in checks  # no config addon loaded
        r = c.get(f"http://127.0.0.1:{mport}/nothing")
        assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"


def test_request_metrics_count_exactly(
    proxy_factory: Callable[..., Proxy], backend: Backend
) -> None:
    p, mport = start(proxy_factory)
    with httpx.Client(proxy=p.url, trust_env=False, timeout=5) as c:
        assert c.get(f"{backend.url}/echo").status_code == 200
        assert c.post(f"{backend.url}/echo", content=b"x" * 10).status_code == 200
        assert c.get(f"{backend.url}/status/404").status_code == 404
    m = samples(mport)

    def count(method: str, status: str) -> float:
        labels = {("backend", ""), ("method", method), ("status", status)}
        return m[("http_requests_total", frozenset(labels))]

    assert count("GET", "200") == count("POST", "200") == count("GET", "404") == 1
    assert sum(v for (n, _), v in m.items() if n == "http_requests_total") == 3
    assert m[("http_request_duration_seconds_count", frozenset())] == 3
    assert m[("http_request_bytes_total", frozenset({("direction", "in")}))] == 10
    assert m[("http_request_bytes_total", frozenset({("direction", "out")}))] > 10


def test_active_connections_gauge_moves(proxy_factory: Callable[..., Proxy]) -> None:
    p, mport = start(proxy_factory)
    assert sample(mport, "proxy_active_connections") == 0
    with socket.create_connection(("127.0.0.1", p.port), timeout=5):
        poll(lambda: sample(mport, "proxy_active_connections"), 1)
        with socket.create_connection(("127.0.0.1", p.port), timeout=5):
            poll(lambda: sample(mport, "proxy_active_connections"), 2)
    poll(lambda: sample(mport, "proxy_active_connections"), 0)


def test_health_on_the_proxy_port(proxy_factory: Callable[..., Proxy], backend: Backend) -> None:
    p, mport = start(proxy_factory)
    for path, status in [("liveness", "ok"), ("readiness", "ready"), ("startup", "started")]:
        resp = raw_request(
            p.port, f"GET /health/{path} HTTP/1.1\r\nHost: 127.0.0.1:{p.port}\r\n\r\n".encode()
        )
        assert status_of(resp) == 200, resp
        assert json_body(resp)["status"] == status
        assert b"application/json" in resp.partition(b"\r\n\r\n")[0].lower()
    # Answered by the proxy, not proxied: not counted as traffic.
    assert sample(mport, "http_requests_total", backend="", method="GET", status="200") == 0
    # /metrics and /admin/* are served there too (the admin API is off without a token).
    resp = raw_request(
        p.port, f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{p.port}\r\n\r\n".encode()
    )
    assert status_of(resp) == 200 and b"http_requests_total" in resp
    resp = raw_request(
        p.port,
        f"POST /admin/reload HTTP/1.1\r\nHost: 127.0.0.1:{p.port}\r\nContent-Length: 0\r\n\r\n".encode(),
    )
    assert status_of(resp) == 404 and json_body(resp)["error"]["code"] == "NOT_FOUND"
    # Absolute-form to an origin's /health, /admin or /metrics path goes to the origin
    # (aiohttp's plain 404).
    for path in ("/health/liveness", "/admin/reload", "/metrics"):
        method = "POST" if path.startswith("/admin") else "GET"
        resp = raw_request(
            p.port,
            f"{method} {backend.url}{path} HTTP/1.1\r\nHost: 127.0.0.1:{backend.port}\r\n"
            "Content-Length: 0\r\n\r\n".encode(),
        )
        assert status_of(resp) == 404 and resp.endswith(b"404: Not Found"), path


PROFILE = """\
server: {host: 127.0.0.1, port: 8080}
metrics: {enabled: true, host: 127.0.0.1, port: 0, path: /metrics%s}
admin: {token: s3cret}
security: {egress: {block_private: false}}
"""


def bundle(proxy_factory: Callable[..., Proxy], tmp_path: Path, extra: str = "") -> tuple:
    path = tmp_path / "profile.yaml"
    path.write_text(PROFILE % extra)
    p = proxy_factory(options={"waypost_profile": str(path)})
    return p, int(p.wait_for(MANAGEMENT).group(1))


def test_admin_metrics_and_head_on_the_proxy_port(
    proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    """PRD §11.3's commands, against the proxy port of the whole bundle."""
    p, mport = bundle(proxy_factory, tmp_path)
    proxy, mgmt = f"http://127.0.0.1:{p.port}", f"http://127.0.0.1:{mport}"
    auth = {"Authorization": "Bearer s3cret"}
    with direct() as c:
        r = c.post(f"{proxy}/admin/reload")  # curl -X POST http://localhost:8080/admin/reload
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "UNAUTHORIZED"
        r = c.post(f"{proxy}/admin/reload", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 403
        r = c.post(f"{proxy}/admin/reload", headers=auth)
        assert r.status_code == 200 and r.json()["reloaded"] is True, r.text
        r = c.get(f"{proxy}/admin/cache/stats", headers=auth)
        assert r.status_code == 200 and {"size", "entries", "hit_rate"} <= set(r.json())
        assert c.get(f"{proxy}/admin/cache/stats").status_code == 401
        r = c.get(f"{proxy}/admin/backends", headers=auth)
        assert r.status_code == 200 and r.json()["backends"] == []
        r = c.get(f"{proxy}/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert "# TYPE http_requests_total counter" in r.text
        for base in (proxy, mgmt):
            r = c.head(f"{base}/health/liveness")
            assert r.status_code == 200 and r.content == b"", base
            assert int(r.headers["content-length"]) > 0
            assert r.headers["content-type"].startswith("application/json")
            for path in ("/health/readiness", "/health/startup", "/metrics",
                         "/admin/cache/stats", "/admin/backends"):  # fmt: skip
                got = c.get(base + path, headers=auth)
                r = c.head(base + path, headers=auth)
                assert (r.status_code, r.content) == (got.status_code, b""), (base, path)
                assert r.headers["content-type"] == got.headers["content-type"], (base, path)
            assert c.head(f"{base}/admin/cache/stats").status_code == 401
            ready = c.get(f"{base}/health/readiness").json()
            assert ready["status"] == "ready"
            assert ready["checks"]["cache"] == "ok" and ready["checks"]["backends"] == []
            assert ready["checks"]["config"]["ok"] is True
            assert c.get(f"{base}/health/liveness").json()["status"] == "ok"
    assert "admin /admin/reload refused: wrong bearer token from 127.0.0.1" in "\n".join(p.lines)
    # None of it was proxied traffic.
    assert not [k for k in samples(mport) if k[0] == "http_requests_total"]


def test_proxy_port_endpoints_switched_off(
    proxy_factory: Callable[..., Proxy], tmp_path: Path, backend: Backend
) -> None:
    off = ", proxy_port: {health: false, metrics: false, admin: false}"
    p, mport = bundle(proxy_factory, tmp_path, off)
    proxy, mgmt = f"http://127.0.0.1:{p.port}", f"http://127.0.0.1:{mport}"
    auth = {"Authorization": "Bearer s3cret"}
    with direct() as c:
        for method, path in [("GET", "/health/liveness"), ("GET", "/metrics"),
                             ("POST", "/admin/reload"), ("GET", "/admin/cache/stats")]:  # fmt: skip
            r = c.request(method, proxy + path, headers=auth)
            assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND", path
            assert c.request(method, mgmt + path, headers=auth).status_code == 200, path
    # A forward-proxy request for another host's /admin/reload is still proxied.
    with httpx.Client(proxy=p.url, trust_env=False, timeout=5) as c:
        r = c.post(f"{backend.url}/admin/reload", headers=auth)
        assert r.status_code == 404 and r.text == "404: Not Found"


@pytest.mark.parametrize("token", ["", "s3cret"])
def test_admin_reload_auth(proxy_factory: Callable[..., Proxy], token: str) -> None:
    _, mport = start(proxy_factory, admin_token=token)
    url = f"http://127.0.0.1:{mport}/admin/reload"
    with direct() as c:
        if not token:  # admin API off
            r = c.post(url, headers={"Authorization": "Bearer anything"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"
            return
        r = c.post(url)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "UNAUTHORIZED"
        assert c.post(url, headers={"Authorization": "Basic czNjcmV0"}).status_code == 401
        r = c.post(url, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "ACCESS_DENIED"
        r = c.post(url, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 404  # right token, but no config addon to reload
        assert "config" in r.json()["error"]["message"]


def test_metrics_disabled_opens_no_listener(proxy_factory: Callable[..., Proxy]) -> None:
    p = proxy_factory(scripts=SCRIPTS, options={"metrics_enabled": False})
    resp = raw_request(
        p.port, f"GET /health/liveness HTTP/1.1\r\nHost: 127.0.0.1:{p.port}\r\n\r\n".encode()
    )
    assert status_of(resp) == 200  # the proxy port still answers probes
    assert not any("management listening" in line for line in p.lines)


def test_port_in_use_exits_1(proxy_factory: Callable[..., Proxy]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        p = proxy_factory(scripts=SCRIPTS, options={"metrics_port": port}, wait=False)
        assert p.proc.wait(20) == 1
        p.stop()
    out = "\n".join(p.lines)
    assert f"cannot listen on 127.0.0.1:{port}" in out
    assert "already in use" in out and "metrics_port" in out


def test_script_reload_rebinds_the_same_port(
    proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    """A hot reload runs the sync done/running pair: the port is released and bound again."""
    script = tmp_path / "management.py"
    shutil.copy(ROOT / "addons" / "management.py", script)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = proxy_factory(scripts=("addons/metrics.py", str(script)), options={"metrics_port": port})
    p.wait_for(rf"management listening at http://127\.0\.0\.1:{port}\b")
    seen = len(p.lines)
    script.write_text(script.read_text() + "\n# touched\n")
    p.wait_for(rf"management listening at http://127\.0\.0\.1:{port}\b", start=seen)
    with direct() as c:
        poll(lambda: c.get(f"http://127.0.0.1:{port}/health/liveness").status_code, 200)
    assert not any("ERROR" in line or "Traceback" in line for line in p.lines)


@pytest.mark.parametrize("ready", [True, False])
def test_addons_extend_the_app(proxy_factory: Callable[..., Proxy], ready: bool) -> None:
    p = proxy_factory(
        scripts=(*SCRIPTS, "tests/e2e/fake_extension.py"),
        options={"metrics_port": 0, "admin_token": "s3cret", "fake_extension_ready": ready},
    )
    mport = int(p.wait_for(MANAGEMENT).group(1))
    base = f"http://127.0.0.1:{mport}"
    with direct() as c:
        r = c.get(f"{base}/health/readiness")
        assert r.status_code == (200 if ready else 503)
        assert r.json()["status"] == ("ready" if ready else "not_ready")
        assert r.json()["checks"]["fake"] == {"ok": ready}
        assert c.get(f"{base}/fake/public").json() == {"public": True}
        assert c.delete(f"{base}/admin/fake").status_code == 401  # the admin check runs first
        r = c.delete(f"{base}/admin/fake", headers={"Authorization": "Bearer s3cret"})
        assert r.json() == {"admin": True, "method": "DELETE"}
        assert c.get(f"{base}/nothing/here").status_code == 404
