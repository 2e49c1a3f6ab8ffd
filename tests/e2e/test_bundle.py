"""The whole bundle through a real mitmdump with a profile: the acceptance cases of the core."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import MANAGEMENT, Backend, json_body, raw_request, status_of, wait_until


def write_profile(tmp_path: Path, text: str, name: str = "profile.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = """\
server: {host: 127.0.0.1, port: 8080, shutdown_timeout: 5s, timeouts: {connect: 2s, read: 3s}}
logging: {level: info, format: json, output: stdout}
metrics: {enabled: true, host: 127.0.0.1, port: 0, path: /metrics}
limits: {max_url_length: 2048, max_header_size: 8192, max_headers_count: 50, max_body_size: 1MB}
security:
  trusted_proxies: []
  egress:
    connect_ports: [443]
    block_private: true
    allowed_networks: [127.0.0.1/32]
  tls_interception: {hosts: []}
"""


@pytest.fixture
def bundle(proxy_factory, tmp_path: Path):
    def start(text: str = BASE, **kwargs):
        path = write_profile(tmp_path, text)
        p = proxy_factory(
            options={"waypost_profile": str(path), **kwargs.pop("options", {})}, **kwargs
        )
        p.profile_path = path
        p.mgmt_port = int(p.wait_for(MANAGEMENT).group(1))
        return p

    return start


def client(p) -> httpx.Client:
    return httpx.Client(proxy=p.url, timeout=10, trust_env=False)


def access_lines(p, message: str = "request") -> list[dict]:
    return [j for j in p.json_lines() if j.get("message") == message and "request_id" in j]


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
def test_methods_are_forwarded(bundle, backend: Backend, method: str) -> None:
    p = bundle()
    with client(p) as c:
        r = c.request(
            method,
            f"{backend.url}/echo/m",
            content=b"x" * 100 if method in ("POST", "PUT", "PATCH") else None,
        )
    assert r.status_code == 200
    if method != "HEAD":
        assert r.json()["method"] == method


@pytest.mark.parametrize("method", ["TRACE", "TRACK"])
def test_trace_is_refused(bundle, backend: Backend, method: str) -> None:
    p = bundle()
    with client(p) as c:
        r = c.request(method, f"{backend.url}/echo")
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "METHOD_NOT_ALLOWED"


def test_forwarding_headers_and_one_json_log_line(bundle, backend: Backend) -> None:
    p = bundle()
    with client(p) as c:
        r = c.get(
            f"{backend.url}/echo?token=hunter2", headers={"Proxy-Authorization": "Basic eDp5"}
        )
    assert r.status_code == 200
    sent = {k.lower(): v for k, v in r.json()["headers"]}
    assert sent["x-forwarded-for"] == "127.0.0.1"
    assert "waypost" in sent["via"]
    assert "proxy-authorization" not in sent
    rid = r.headers["x-request-id"]
    assert sent["x-request-id"] == rid
    line = wait_until(lambda: [j for j in access_lines(p) if j["request_id"] == rid])
    assert len(line) == 1
    entry = line[0]
    assert entry["status"] == 200 and entry["method"] == "GET" and entry["client_ip"] == "127.0.0.1"
    assert "hunter2" not in json.dumps(entry)
    for field in (
        "timestamp",
        "level",
        "url",
        "duration_ms",
        "bytes_sent",
        "bytes_received",
        "backend",
    ):
        assert field in entry


def test_refusals_are_json_errors_and_the_proxy_keeps_serving(bundle, backend: Backend) -> None:
    p = bundle()
    with client(p) as c:
        long = c.get(f"{backend.url}/echo/{'a' * 3000}")
        assert long.status_code == 414 and long.json()["error"]["code"] == "URI_TOO_LONG"
        big = c.post(f"{backend.url}/echo", content=b"x" * (2 << 20))
        assert big.status_code == 413 and big.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
        private = c.get("http://10.255.255.1:9/")
        assert private.status_code == 403 and private.json()["error"]["code"] == "ACCESS_DENIED"
        ok = c.get(f"{backend.url}/echo")
        assert ok.status_code == 200
    for r in (long, big, private):
        body = r.json()["error"]
        assert body["request_id"] == r.headers["x-request-id"]
        assert body["timestamp"].endswith("Z")


def test_malformed_request_gets_400_json(bundle, backend: Backend) -> None:
    p = bundle()
    resp = raw_request(
        p.port,
        f"GET {backend.url}/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: b\r\n folded\r\n\r\n".encode(),
    )
    assert status_of(resp) == 400
    assert b'"BAD_REQUEST"' in resp


def test_backend_down_is_502_json(bundle) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = bundle()
    with client(p) as c:
        r = c.get(f"http://127.0.0.1:{port}/")
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "BACKEND_UNREACHABLE"


def test_connect_policy(bundle, backend: Backend) -> None:
    p = bundle()
    denied = raw_request(
        p.port,
        f"CONNECT 127.0.0.1:{backend.port} HTTP/1.1\r\nHost: 127.0.0.1:{backend.port}\r\n\r\n".encode(),
    )
    assert status_of(denied) == 403
    assert b"ACCESS_DENIED" in denied
    line = wait_until(lambda: access_lines(p, "connect"))
    assert line[0]["status"] == 403


def test_management_port_unreachable_through_the_proxy(bundle) -> None:
    p = bundle(BASE.replace("allowed_networks: [127.0.0.1/32]", "allowed_networks: [127.0.0.0/8]"))
    with client(p) as c:
        r = c.get(f"http://127.0.0.1:{p.mgmt_port}/metrics")
    assert r.status_code == 403


def test_health_and_metrics(bundle, backend: Backend) -> None:
    p = bundle()
    mgmt = f"http://127.0.0.1:{p.mgmt_port}"
    with httpx.Client(timeout=5, trust_env=False) as direct:
        for path in ("/health/liveness", "/health/readiness", "/health/startup"):
            r = direct.get(mgmt + path)
            assert r.status_code == 200, path
            assert r.json()["status"] in ("ok", "ready", "started")
        with client(p) as c:
            assert c.get(f"{backend.url}/status/404").status_code == 404
        text = direct.get(mgmt + "/metrics").text
        assert 'http_requests_total{backend="",method="GET",status="404"} 1.0' in text
        assert "http_request_duration_seconds_bucket" in text
        assert "proxy_active_connections" in text
        # Kubernetes probes hit the proxy port itself, origin-form.
        probe = raw_request(
            p.port, f"GET /health/liveness HTTP/1.1\r\nHost: 127.0.0.1:{p.port}\r\n\r\n".encode()
        )
        assert status_of(probe) == 200


def test_profile_reload_swaps_and_bad_edit_keeps_old(bundle, backend: Backend) -> None:
    p = bundle()
    url = f"{backend.url}/echo/{'a' * 1500}"
    with client(p) as c:
        assert c.get(url).status_code == 200
        time.sleep(1.1)  # mtime granularity: the edit must look newer than the loaded file
        p.profile_path.write_text(BASE.replace("max_url_length: 2048", "max_url_length: 1024"))
        p.wait_for("profile .* reloaded", timeout=10)
        assert c.get(url).status_code == 414
        mark = len(p.lines)
        time.sleep(1.1)
        p.profile_path.write_text(BASE.replace("max_url_length: 2048", "max_url_length: lots"))
        p.wait_for("reload refused", timeout=10, start=mark)
        assert c.get(url).status_code == 414  # still the last good config
        assert c.get(f"{backend.url}/echo").status_code == 200


def test_bad_profile_refuses_to_start(proxy_factory, tmp_path: Path) -> None:
    path = write_profile(
        tmp_path, "server: {port: 8080}\nlimits:\n  max_body_size: lots\n  bogus: 1\n"
    )
    p = proxy_factory(options={"waypost_profile": str(path)}, wait=False)
    assert p.proc.wait(60) != 0
    p.stop()
    out = "\n".join(p.lines)
    assert f"{path}:3: limits.max_body_size" in out
    assert f"{path}:4: limits.bogus: unknown key" in out


def test_sigterm_drains_in_flight_request(bundle, backend: Backend) -> None:
    import threading

    p = bundle()
    result: dict[str, int] = {}

    def slow() -> None:
        with client(p) as c:
            result["status"] = c.get(f"{backend.url}/slow/1500").status_code

    t = threading.Thread(target=slow)
    t.start()
    wait_until(lambda: backend.hits.get("/slow/1500"))
    p.proc.send_signal(15)
    t.join(10)
    assert result.get("status") == 200
    assert p.proc.wait(10) == 0


def test_malformed_chunk_ending_is_refused(bundle, backend: Backend) -> None:
    """CVE-2025-43859: h11 < 0.16 took any two bytes as a chunk's CRLF, hiding a request."""
    p = bundle()
    smuggled = f"GET {backend.url}/echo/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    body = f"5\r\nhelloXX{len(smuggled):x}\r\n{smuggled}\r\n0\r\n\r\n"
    resp = raw_request(
        p.port,
        f"POST {backend.url}/echo/chunked HTTP/1.1\r\nHost: 127.0.0.1:{backend.port}\r\n"
        f"Transfer-Encoding: chunked\r\n\r\n{body}".encode(),
    )
    assert status_of(resp) == 400
    assert json_body(resp)["error"]["code"] == "BAD_REQUEST"
    assert backend.hits.get("/echo/chunked") is None
