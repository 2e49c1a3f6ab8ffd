"""Content-type filter through a real mitmdump: refused before any origin body byte reaches
the client, for whole, streamed and empty bodies; request types; shadow mode; the bundle."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Backend, read_head, status_of, wait_until
from tests.e2e.filter_helpers import TypeOrigin, read_response

SCRIPTS = ("addons/contentfilter.py",)
BLOCKED = ["application/x-msdownload", "video/*", "/application/(x-)?zip/"]


@pytest.fixture
def origin() -> Iterator[TypeOrigin]:
    o = TypeOrigin()
    yield o
    o.close()


def request(sock: socket.socket, port: int, path: str, method: str = "GET") -> tuple[bytes, bytes]:
    target = f"127.0.0.1:{port}"
    sock.sendall(f"{method} http://{target}{path} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    return read_response(sock)


def assert_refused(head: bytes, body: bytes, rule: str) -> None:
    assert status_of(head) == 403, head
    assert b"o" * 8 not in body  # no origin byte
    err = json.loads(body)["error"]
    assert (err["code"], err["rule"]) == ("CONTENT_TYPE_BLOCKED", rule)


@pytest.mark.parametrize(
    "path, rule",
    [
        ("/ct/video/mp4?n=5000", "video/*"),
        ("/ct/Application/X-MSDownload;%20name=a.exe?n=100", "application/x-msdownload"),
        ("/ct/application/zip?n=3000000&chunked=1", "/application/(x-)?zip/"),  # streamed, 3 MB
        ("/ct/application/x-zip?n=2000000", "/application/(x-)?zip/"),  # over stream_large_bodies
        ("/ct/video/webm?n=0", "video/*"),  # no body at all
    ],
)
def test_blocked_response_types_are_refused_and_the_connection_stays_usable(
    proxy_factory, origin: TypeOrigin, path: str, rule: str
):
    p = proxy_factory(
        scripts=SCRIPTS,
        options={"content_filter_blocked_types": BLOCKED, "stream_large_bodies": "1m"},
    )
    with socket.create_connection(("127.0.0.1", p.port), timeout=20) as s:
        head, body = request(s, origin.port, path)
        assert_refused(head, body, rule)
        # The same client connection (and the origin's) goes on with the next request.
        head, body = request(s, origin.port, "/ct/text/html?n=10")
        assert status_of(head) == 200
        assert body == b"o" * 10
    p.wait_for(r"content_filter block rule=")


def test_head_of_a_blocked_type(proxy_factory, origin: TypeOrigin):
    p = proxy_factory(scripts=SCRIPTS, options={"content_filter_blocked_types": BLOCKED})
    with socket.create_connection(("127.0.0.1", p.port), timeout=20) as s:
        target = f"127.0.0.1:{origin.port}"
        s.sendall(f"HEAD http://{target}/ct/video/mp4 HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head, _ = read_head(s)
        assert status_of(head) == 403
        head, body = request(s, origin.port, "/ct/text/plain?n=3")
        assert status_of(head) == 200 and body == b"ooo"


def test_allowed_types_and_shadow_mode_pass(proxy_factory, origin: TypeOrigin):
    p = proxy_factory(
        scripts=SCRIPTS,
        options={"content_filter_blocked_types": BLOCKED, "content_filter_mode": "shadow"},
    )
    url = f"http://127.0.0.1:{origin.port}/ct/video/mp4?n=1000"
    r = httpx.get(url, proxy=p.url, timeout=10, trust_env=False)
    assert r.status_code == 200
    assert r.content == b"o" * 1000
    p.wait_for(r"content_filter would_block rule=video/\*")


def test_request_content_type(proxy_factory, backend: Backend):
    p = proxy_factory(
        scripts=SCRIPTS,
        options={
            "content_filter_blocked_types": "application/x-msdownload",
            "content_filter_check_request": True,
        },
    )
    before = backend.hits.get("/echo/upload", 0)
    r = httpx.post(
        f"{backend.url}/echo/upload",
        content=b"MZ" * 100,
        headers={"Content-Type": "application/x-msdownload"},
        proxy=p.url,
        timeout=10,
        trust_env=False,
    )
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "CONTENT_TYPE_BLOCKED"
    assert backend.hits.get("/echo/upload", 0) == before
    ok = httpx.post(f"{backend.url}/echo/upload", content=b"{}", proxy=p.url, timeout=10)
    assert ok.status_code == 200


def test_bad_regex_stops_mitmdump(proxy_factory):
    p = proxy_factory(scripts=SCRIPTS, options={"content_filter_blocked_types": "/([/"}, wait=False)
    p.wait_for(r"content_filter_blocked_types: '/\(\[/' is not a valid regular expression")
    assert p.proc.wait(15) != 0


def test_bundle_profile(proxy_factory, origin: TypeOrigin, tmp_path: Path):
    profile = tmp_path / "p.yaml"
    profile.write_text(
        "metrics: {enabled: true, host: 127.0.0.1, port: 0}\n"
        "security:\n"
        "  egress: {allowed_networks: [127.0.0.1/32]}\n"
        "  content_filtering: {blocked_types: [video/*]}\n"
    )
    p = proxy_factory(options={"waypost_profile": str(profile)})
    with httpx.Client(proxy=p.url, timeout=10, trust_env=False) as c:
        r = c.get(f"http://127.0.0.1:{origin.port}/ct/video/mp4?n=100")
        assert r.status_code == 403
        assert r.json()["error"]["rule"] == "video/*"
        assert c.get(f"http://127.0.0.1:{origin.port}/ct/text/html?n=1").status_code == 200

    def blocked_line() -> bool:  # the access line is written after the response went out
        lines = [j for j in p.json_lines() if j.get("message") == "request"]
        return any(
            j.get("error_code") == "CONTENT_TYPE_BLOCKED" and j["status"] == 403 for j in lines
        )

    wait_until(blocked_line)
