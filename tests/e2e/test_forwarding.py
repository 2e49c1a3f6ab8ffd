"""Forwarding headers through a real mitmdump: what the origin sees and what the client gets back."""

from __future__ import annotations

import base64
import hashlib
import socket
import threading
import uuid

import httpx
import pytest

from tests.conftest import json_body, raw_request, read_head, status_of

SCRIPTS = ("addons/forwarding.py", "addons/accesslog.py")


def headers_of(echo: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in echo["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


def get(port: int, url: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"GET {url} HTTP/1.1", f"Host: {url.split('/')[2]}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return raw_request(port, ("\r\n".join(lines) + "\r\n\r\n").encode())


def response_headers(resp: bytes) -> dict[str, str]:
    head = resp.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
    return {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head)}


def test_origin_sees_forwarding_headers_and_no_hop_by_hop(proxy_factory, backend) -> None:
    p = proxy_factory(scripts=SCRIPTS, options={"flow_detail": 0})
    resp = get(
        p.port,
        f"{backend.url}/echo",
        [
            ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
            ("Proxy-Connection", "keep-alive"),
            ("Connection", "keep-alive, X-Hop-Secret"),
            ("X-Hop-Secret", "do-not-forward"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "gzip"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Real-IP", "6.6.6.6"),
            ("Via", "1.0 client-side"),
            ("X-Request-ID", "client-req-42"),
        ],
    )
    assert status_of(resp) == 200
    seen = headers_of(json_body(resp))
    assert seen["x-forwarded-for"] == ["127.0.0.1"]  # the untrusted client's value replaced
    assert seen["x-real-ip"] == ["127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == [f"127.0.0.1:{backend.port}"]
    assert seen["via"] == ["1.0 client-side, 1.1 waypost"]
    assert seen["x-request-id"] == ["client-req-42"]
    for hop in ("proxy-authorization", "proxy-connection", "x-hop-secret", "keep-alive", "te"):
        assert hop not in seen, hop
    assert seen.get("connection", ["keep-alive"]) == ["keep-alive"]

    got = response_headers(resp)
    assert got["x-request-id"] == "client-req-42"
    assert got["x-proxy-id"] == "waypost"
    assert got["via"].endswith("1.1 waypost")


@pytest.mark.parametrize("incoming", ["bad id with spaces", "x" * 129, "semi;colon"])
def test_invalid_request_id_is_replaced(proxy_factory, backend, incoming: str) -> None:
    p = proxy_factory(scripts=SCRIPTS, options={"flow_detail": 0})
    with httpx.Client(proxy=p.url, timeout=10, trust_env=False) as c:
        r = c.get(f"{backend.url}/echo", headers={"X-Request-ID": incoming})
    rid = r.headers["x-request-id"]
    assert rid != incoming
    uuid.UUID(rid)
    assert headers_of(r.json())["x-request-id"] == [rid]


def test_trusted_proxy_chain(proxy_factory, backend) -> None:
    p = proxy_factory(
        scripts=SCRIPTS,
        options={
            "flow_detail": 0,
            "forwarding_trusted_proxies": ["127.0.0.0/8", "10.0.0.0/8"],
            "forwarding_proxy_id": "edge-7",
        },
    )
    with httpx.Client(proxy=p.url, timeout=10, trust_env=False) as c:
        r = c.get(
            f"{backend.url}/echo",
            headers={
                "X-Forwarded-For": "203.0.113.9, 10.1.2.3",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "public.example",
            },
        )
    seen = headers_of(r.json())
    assert seen["x-forwarded-for"] == ["203.0.113.9, 10.1.2.3, 127.0.0.1"]
    assert seen["x-real-ip"] == ["203.0.113.9"]
    assert seen["x-forwarded-proto"] == ["https"]
    assert seen["x-forwarded-host"] == ["public.example"]
    assert seen["via"] == ["1.1 edge-7"]
    assert r.headers["x-proxy-id"] == "edge-7"
    p.wait_for(r'"message":"request".*"client_ip":"203\.0\.113\.9"')


def test_invalid_trusted_proxies_refuses_to_start(proxy_factory) -> None:
    p = proxy_factory(
        scripts=SCRIPTS, options={"forwarding_trusted_proxies": "10.0.0.0/99"}, wait=False
    )
    assert p.proc.wait(20) != 0
    p.wait_for("forwarding_trusted_proxies", timeout=5)


# --- websocket handshake ----------------------------------------------------------------------


class OneShotWebsocketOrigin:
    """Accepts one connection, answers the websocket handshake, sends one text frame."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.port = self.sock.getsockname()[1]
        self.request = b""
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            got = read_head(conn)
            if got is None:
                return
            self.request = got[0] + b"\r\n\r\n" + got[1]
            key = next(
                line.split(b":", 1)[1].strip()
                for line in self.request.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            accept = base64.b64encode(
                hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
            )
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            conn.sendall(b"\x81\x02hi")  # unmasked text frame from the server
            try:
                conn.recv(1024)  # until the client goes away
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def test_websocket_handshake_keeps_upgrade(proxy_factory) -> None:
    origin = OneShotWebsocketOrigin()
    try:
        p = proxy_factory(scripts=SCRIPTS, options={"flow_detail": 0})
        key = base64.b64encode(b"0123456789abcdef").decode()
        req = (
            f"GET http://127.0.0.1:{origin.port}/ws HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{origin.port}\r\n"
            "Connection: Upgrade\r\nUpgrade: websocket\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Proxy-Authorization: Basic eDp5\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
            s.sendall(req)
            got = b""
            while not (b"\r\n\r\n" in got and got.endswith(b"hi")):
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        assert got.startswith(b"HTTP/1.1 101"), got[:200]
        assert got.endswith(b"\x81\x02hi")
        seen = origin.request.lower()
        assert b"\r\nupgrade: websocket\r\n" in seen
        assert b"\r\nconnection: upgrade\r\n" in seen
        assert b"proxy-authorization" not in seen
        assert b"\r\nvia: 1.1 waypost\r\n" in seen
    finally:
        origin.close()
