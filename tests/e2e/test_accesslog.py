"""JSON logs and access lines through a real mitmdump with forwarding + accesslog loaded."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from pathlib import Path

import httpx
import trustme

from tests.conftest import connect_tunnel, raw_request, status_of

SCRIPTS = ("addons/forwarding.py", "addons/accesslog.py")
FIELDS = (
    "timestamp",
    "level",
    "logger",
    "message",
    "request_id",
    "client_ip",
    "method",
    "url",
    "status",
    "duration_ms",
    "bytes_sent",
    "bytes_received",
    "cache_hit",
    "backend",
)


def wait_lines(get, count: int, timeout: float = 10) -> list[dict]:
    """Poll `get()` until it returns at least `count` items; then give stragglers a moment."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = get()
        if len(found) >= count:
            time.sleep(0.3)  # a duplicate line would show up now, not later
            return get()
        time.sleep(0.05)
    raise TimeoutError(f"expected {count} lines, have {get()}")


def access(p, message: str = "request") -> list[dict]:
    return [
        j for j in p.json_lines() if j.get("logger") == "waypost.access" and j["message"] == message
    ]


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_json_access_line_per_request(proxy_factory, backend) -> None:
    p = proxy_factory(scripts=SCRIPTS, options={"flow_detail": 0})
    dead = unused_port()
    with httpx.Client(proxy=p.url, timeout=10, trust_env=False) as c:
        ok = c.post(f"{backend.url}/echo?token=s3cret&page=2", content=b"x" * 10)
        missing = c.get(f"{backend.url}/status/404", headers={"X-Request-ID": "abc-1"})
        failed = c.get(f"http://127.0.0.1:{dead}/nothing?api_key=k")
    assert (ok.status_code, missing.status_code, failed.status_code) == (200, 404, 502)

    lines = wait_lines(lambda: access(p), 3)
    assert len(lines) == 3
    for line in lines:
        assert set(FIELDS) <= set(line), line
        assert line["level"] == "INFO" and line["client_ip"] == "127.0.0.1"
        assert line["timestamp"].endswith("Z") and len(line["timestamp"]) == 24
        assert line["cache_hit"] is False
    first, second, third = lines
    assert first["method"] == "POST" and first["status"] == 200
    assert first["url"] == f"{backend.url}/echo?token=REDACTED&page=2"
    assert first["bytes_received"] == 10 and first["bytes_sent"] == len(ok.content)
    assert first["backend"] == f"127.0.0.1:{backend.port}"
    assert first["request_id"] == ok.headers["x-request-id"]
    assert first["duration_ms"] >= 0
    assert second["status"] == 404 and second["request_id"] == "abc-1"
    assert third["status"] is None and "error" in third
    assert third["url"] == f"http://127.0.0.1:{dead}/nothing?api_key=REDACTED"
    assert "s3cret" not in "\n".join(p.lines)

    # every line after the scripts loaded is JSON, mitmproxy's own included
    listening = next(i for i, line in enumerate(p.lines) if "proxy listening at" in line)
    assert json.loads(p.lines[listening])["logger"] == "mitmproxy.proxy.mode_servers"
    for line in p.lines[listening:]:
        assert line.startswith("{") and json.loads(line), line
    # mitmproxy's per-connection chatter is off in JSON mode at info
    assert not any("client connect" in line for line in p.lines)


def test_connect_lines(proxy_factory, backend) -> None:
    p = proxy_factory(scripts=SCRIPTS, options={"flow_detail": 0})
    dead = unused_port()
    ok = raw_request(
        p.port, f"CONNECT 127.0.0.1:{backend.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    refused = raw_request(p.port, f"CONNECT 127.0.0.1:{dead} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status_of(ok) == 200 and status_of(refused) == 502
    lines = wait_lines(lambda: access(p, "connect"), 2)
    assert [(x["method"], x["status"]) for x in lines] == [("CONNECT", 200), ("CONNECT", 502)]
    assert lines[0]["url"] == f"127.0.0.1:{backend.port}"
    assert lines[0]["backend"] == f"127.0.0.1:{backend.port}"
    assert all(x["request_id"] for x in lines)


def test_a_tunnel_logs_one_closing_line_with_bytes_each_way(proxy_factory) -> None:
    p = proxy_factory(scripts=SCRIPTS, options={"flow_detail": 0})
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def echo() -> None:
            conn, _ = server.accept()
            with conn:
                data = conn.recv(100)
                conn.sendall(b"pong:" + data)

        threading.Thread(target=echo, daemon=True).start()
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as c:
            c.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = c.recv(1000)
                assert chunk, head
                head += chunk
            assert status_of(head) == 200
            c.sendall(b"\x00\x01ping")  # not HTTP, not TLS: a raw TCP tunnel
            got = b""
            while len(got) < 11:
                chunk = c.recv(100)
                assert chunk, got
                got += chunk
        assert got == b"pong:\x00\x01ping"
    (line,) = wait_lines(lambda: access(p, "tunnel"), 1)
    (opened,) = access(p, "connect")
    assert line["method"] == "CONNECT" and line["status"] == 200
    assert line["url"] == f"127.0.0.1:{port}" and line["request_id"] == opened["request_id"]
    assert line["bytes_received"] == 6 and line["bytes_sent"] == 11
    assert line["outcome"] in ("client_closed", "server_closed")
    assert line["duration_ms"] >= opened["duration_ms"]
    assert opened["bytes_sent"] == 0


def test_a_tls_passthrough_tunnel_counts_its_wire_bytes(proxy_factory) -> None:
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    body = b"y" * 50_000
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def serve() -> None:
            conn, _ = server.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(100)
                tls.sendall(body)

        threading.Thread(target=serve, daemon=True).start()
        p = proxy_factory(
            scripts=("addons/tlspolicy.py", "addons/accesslog.py"), options={"flow_detail": 0}
        )
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
        with (
            connect_tunnel(p.port, f"localhost:{port}") as s,
            client_ctx.wrap_socket(s, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"ping")
            got = b""
            while len(got) < len(body):
                got += tls.recv(65536)
    (line,) = wait_lines(lambda: access(p, "tunnel"), 1)
    assert line["tls"] == "passthrough" and line["url"] == f"localhost:{port}"
    # TLS records: the handshake, certificates and record overhead come on top of the data.
    assert 4 < line["bytes_received"] < 4000
    assert len(body) < line["bytes_sent"] < len(body) + 8000


def test_text_format(proxy_factory, backend) -> None:
    p = proxy_factory(scripts=SCRIPTS, options={"flow_detail": 0, "log_format": "text"})
    with httpx.Client(proxy=p.url, timeout=10, trust_env=False) as c:
        r = c.get(f"{backend.url}/echo?password=hunter2")
    line = p.wait_for(r"request request_id=").string
    assert not line.startswith("{")
    assert f"request_id={r.headers['x-request-id']}" in line
    assert "status=200" in line and "password=REDACTED" in line and "hunter2" not in line
    assert not p.lines[-1].startswith("{")


def test_file_output(proxy_factory, backend, tmp_path: Path) -> None:
    path = tmp_path / "logs" / "waypost.log"
    path.parent.mkdir()
    p = proxy_factory(
        scripts=SCRIPTS,
        options={"flow_detail": 0, "log_output": "file", "log_file": str(path)},
    )
    with httpx.Client(proxy=p.url, timeout=10, trust_env=False) as c:
        r = c.get(f"{backend.url}/echo?sig=abc")

    def in_file() -> list[dict]:
        if not path.exists():
            return []
        return [json.loads(x) for x in path.read_text().splitlines() if x]

    (line,) = wait_lines(in_file, 1)
    assert line["message"] == "request" and line["request_id"] == r.headers["x-request-id"]
    assert line["url"].endswith("?sig=REDACTED")
    assert access(p) == []  # stdout keeps mitmproxy's lines only


def test_the_log_file_rotates_by_size_and_keeps_its_backups(
    proxy_factory, backend, tmp_path: Path
) -> None:
    path = tmp_path / "waypost.log"
    p = proxy_factory(
        scripts=SCRIPTS,
        options={
            "flow_detail": 0,
            "log_output": "file",
            "log_file": str(path),
            "log_file_max_size": "2KB",
            "log_file_max_backups": "2",
        },
    )
    with httpx.Client(proxy=p.url, timeout=10, trust_env=False) as c:
        ids = [c.get(f"{backend.url}/echo/{i}").headers["x-request-id"] for i in range(40)]

    def files() -> list[Path]:
        return sorted(tmp_path.glob("waypost*.log"))

    def last_line_written() -> bool:
        return path.exists() and ids[-1] in path.read_text()

    wait_lines(lambda: [1] if last_line_written() else [], 1)
    backups = [f for f in files() if f != path]
    assert len(backups) == 2, files()  # 40 lines of ~600 bytes made more: the oldest went
    for f in [*backups, path]:
        assert f.stat().st_size <= 2048
        assert all(json.loads(x)["message"] for x in f.read_text().splitlines())
    # Nothing lost between the newest backup and the current file.
    kept = [
        json.loads(x)["request_id"]
        for f in [*backups, path]
        for x in f.read_text().split("\n")
        if x
    ]
    assert ids[-1] in kept and len(set(kept)) == len(kept)


def test_unwritable_log_file_refuses_to_start(proxy_factory, tmp_path: Path) -> None:
    p = proxy_factory(
        scripts=SCRIPTS,
        options={"log_output": "file", "log_file": str(tmp_path / "missing" / "x.log")},
        wait=False,
    )
    assert p.proc.wait(20) != 0
    p.wait_for("log_file: cannot write", timeout=5)
