"""HTTP/2 clients get Waypost's JSON error answers, with the status HTTP/1 clients get.

A TLS reverse listener (h2 by ALPN) in front of a plain-HTTP origin, driven by httpx with h2.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_tlslistener import ca, server_files, start_listener  # noqa: F401

SCRIPTS = ("addons/tlslistener.py", "addons/upstream.py")


def _get(port: int, files: dict[str, Path], path: str) -> httpx.Response:
    with httpx.Client(verify=str(files["ca"]), http2=True, timeout=10, trust_env=False) as c:
        r = c.get(f"https://localhost:{port}{path}")
    assert r.http_version == "HTTP/2"
    return r


def _assert_json_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == r.headers["x-request-id"]


@pytest.fixture
def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_backend_is_json_502(proxy_factory, server_files, dead_port) -> None:  # noqa: F811
    _, port = start_listener(
        proxy_factory, server_files, f"http://127.0.0.1:{dead_port}", scripts=SCRIPTS
    )
    _assert_json_error(_get(port, server_files, "/x"), 502, "BACKEND_UNREACHABLE")


def test_read_timeout_is_json_504(proxy_factory, server_files, backend) -> None:  # noqa: F811
    p, port = start_listener(
        proxy_factory,
        server_files,
        backend.url,
        scripts=SCRIPTS,
        upstream_read_timeout="1s",
    )
    t0 = time.monotonic()
    r = _get(port, server_files, "/slow/3000")
    elapsed = time.monotonic() - t0
    _assert_json_error(r, 504, "BACKEND_TIMEOUT")
    assert elapsed < 2.5, elapsed
    p.wait_for(r"failed: read_timeout")
    # The proxy keeps serving HTTP/2 clients.
    assert _get(port, server_files, "/echo").status_code == 200
