"""Egress policy through a real mitmdump: CONNECT ports, private targets, the management port."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import ThreadedServer, json_body, raw_request, read_head, status_of

EGRESS = "addons/egress.py"
FAKE_MANAGEMENT = "tests/e2e/fake_management.py"


class CountingOrigin(ThreadedServer):
    """A keep-alive HTTP/1.1 origin on 127.0.0.1 that counts the TCP connections it accepts."""

    def handle(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            try:
                while (got := read_head(conn, buf)) is not None:
                    _, buf = got
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            except OSError:
                return


@pytest.fixture
def origin() -> Iterator[CountingOrigin]:
    o = CountingOrigin()
    yield o
    o.close()


def _connect(port: int, target: str) -> bytes:
    return raw_request(port, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())


def _assert_denied(resp: bytes) -> None:
    assert status_of(resp) == 403, resp[:300]
    assert json_body(resp)["error"]["code"] == "ACCESS_DENIED"


def test_connect_to_disallowed_port_is_refused_before_any_upstream_connection(
    proxy_factory, origin
):
    # Loopback is allowed, so only the port rule can refuse.
    p = proxy_factory(scripts=(EGRESS,), options={"egress_allowed_networks": "127.0.0.0/8"})
    resp = _connect(p.port, f"127.0.0.1:{origin.port}")
    _assert_denied(resp)
    error = json_body(resp)["error"]
    assert error["rule"] == "connect_ports" and "egress_connect_ports" in error["hint"]
    p.wait_for(r"egress blocked rule=connect_ports")
    assert origin.accepts == 0


def test_connect_to_allowed_port_is_tunnelled(proxy_factory, origin):
    p = proxy_factory(
        scripts=(EGRESS,),
        options={
            "egress_allowed_networks": "127.0.0.0/8",
            "egress_connect_ports": ["443", f"{origin.port}-{origin.port}"],
        },
    )
    resp = _connect(p.port, f"127.0.0.1:{origin.port}")
    assert status_of(resp) == 200
    assert origin.accepts == 1


def test_connect_to_loopback_is_refused_by_default(proxy_factory, origin):
    p = proxy_factory(scripts=(EGRESS,), options={"egress_connect_ports": str(origin.port)})
    _assert_denied(_connect(p.port, f"127.0.0.1:{origin.port}"))
    _assert_denied(_connect(p.port, f"localhost:{origin.port}"))
    assert origin.accepts == 0


def test_plain_http_to_loopback_is_refused_by_default(proxy_factory, backend):
    p = proxy_factory(scripts=(EGRESS,))
    before = backend.hits.get("/echo/egress-default", 0)
    r = httpx.get(f"{backend.url}/echo/egress-default", proxy=p.url, timeout=10)
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "ACCESS_DENIED"
    assert r.headers["content-type"] == "application/json"
    # the body names the rule and how an operator allows the destination, never the address
    error = r.json()["error"]
    assert error["rule"] == "block_private" and "egress_allowed_networks" in error["hint"]
    assert "127.0.0.1 is loopback" not in r.text
    assert backend.hits.get("/echo/egress-default", 0) == before
    line = p.wait_for(r"egress blocked rule=block_private").string
    assert "127.0.0.1 is loopback" in line


def test_plain_http_to_loopback_with_allowed_networks(proxy_factory, backend):
    p = proxy_factory(scripts=(EGRESS,), options={"egress_allowed_networks": "127.0.0.0/8"})
    r = httpx.get(f"{backend.url}/echo", proxy=p.url, timeout=10)
    assert r.status_code == 200
    assert r.json()["path"] == "/echo"


def test_hostname_resolving_to_loopback_is_refused(proxy_factory, backend):
    p = proxy_factory(scripts=(EGRESS,))
    for host in ("localhost", "LOCALHOST.", "127.1"):
        r = httpx.get(f"http://{host}:{backend.port}/echo", proxy=p.url, timeout=10)
        assert r.status_code == 403, host
        assert r.json()["error"]["code"] == "ACCESS_DENIED"
    # httpx drops the brackets of IPv6 literals in proxy requests, so these go raw.
    for host in ("[::ffff:127.0.0.1]", "[::1]", "[64:ff9b::7f00:1]"):
        target = f"{host}:{backend.port}"
        _assert_denied(
            raw_request(
                p.port, f"GET http://{target}/echo HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
            )
        )


def test_metadata_address_is_refused_without_connecting(proxy_factory):
    p = proxy_factory(scripts=(EGRESS,))
    resp = raw_request(
        p.port, b"GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    _assert_denied(resp)


@pytest.mark.parametrize("bind", ["127.0.0.1", "0.0.0.0", "::"])
def test_management_port_is_refused_even_when_loopback_is_allowed(proxy_factory, backend, bind):
    p = proxy_factory(
        scripts=(FAKE_MANAGEMENT, EGRESS),
        options={
            "egress_allowed_networks": ["127.0.0.0/8", "::1/128"],
            "egress_connect_ports": str(backend.port),
            "fake_management_listen": f"{bind}:{backend.port}",
        },
    )
    for host in ("127.0.0.1", "localhost"):
        r = httpx.get(f"http://{host}:{backend.port}/echo", proxy=p.url, timeout=10)
        assert r.status_code == 403, host
    _assert_denied(_connect(p.port, f"127.0.0.1:{backend.port}"))
    p.wait_for(r"egress blocked rule=management_port")


def test_other_local_ports_stay_reachable_next_to_the_management_port(proxy_factory, backend):
    p = proxy_factory(
        scripts=(FAKE_MANAGEMENT, EGRESS),
        options={
            "egress_allowed_networks": "127.0.0.0/8",
            "fake_management_listen": "0.0.0.0:1",
        },
    )
    r = httpx.get(f"{backend.url}/echo", proxy=p.url, timeout=10)
    assert r.status_code == 200


def test_pinned_connection_is_reused_across_requests(proxy_factory, origin):
    # server_connect pins the dialled IP; the hostname is restored afterwards so mitmproxy's
    # per-client connection reuse (which matches on the address) keeps working.
    p = proxy_factory(scripts=(EGRESS,), options={"egress_allowed_networks": "127.0.0.0/8"})
    with httpx.Client(proxy=p.url, timeout=10) as client:
        for _ in range(3):
            r = client.get(f"http://localhost:{origin.port}/")
            assert r.status_code == 200
            assert r.text == "ok"
    assert origin.accepts == 1


def test_invalid_options_stop_mitmdump(proxy_factory):
    p = proxy_factory(
        scripts=(EGRESS,), options={"egress_allowed_networks": "10.0.0.0/33"}, wait=False
    )
    p.wait_for(r"egress_allowed_networks: '10.0.0.0/33' is not a CIDR")
    assert p.proc.wait(15) != 0


def test_rebinding_after_the_early_check_is_killed_at_connect(proxy_factory):
    # example.invalid never resolves, so the early checks let it pass; fake_rebind then points
    # it at 10.9.9.9 before mitmproxy connects. server_connect must refuse to dial it.
    p = proxy_factory(
        scripts=(EGRESS, "tests/e2e/fake_rebind.py"), options={"egress_connect_ports": "443"}
    )
    # CONNECT: the kill is turned into the same 403 JSON as an early refusal.
    resp = _connect(p.port, "example.invalid:443")
    _assert_denied(resp)
    # Plain HTTP: mitmproxy answers 502 with the kill reason (no hook can set a response there).
    resp = raw_request(
        p.port, b"GET http://other.invalid:81/x HTTP/1.1\r\nHost: other.invalid:81\r\n\r\n"
    )
    assert status_of(resp) == 502
    assert b"Waypost egress policy refused the connection (block_private)" in resp
    assert b"10.9.9.9" not in resp
    p.wait_for(r"egress killed connection rule=block_private .* reason=10\.9\.9\.9 is private")


@pytest.mark.parametrize("strategy", ["eager", "lazy"])
def test_refused_reverse_target_answers_or_closes_at_once(proxy_factory, origin, strategy):
    """A reverse listener whose target egress refuses (a misconfiguration) never leaves the
    client hanging: an eager connect (no request yet) closes it as a refused connect does (it
    stayed open on mitmproxy 11), a lazy one answers 403 JSON."""
    p = proxy_factory(
        scripts=(EGRESS,),
        options={
            "mode": f"reverse:http://127.0.0.1:{origin.port}",
            "connection_strategy": strategy,
        },
    )
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", p.port), timeout=3) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            resp = b""
            try:
                while chunk := s.recv(65536):  # a hang raises TimeoutError
                    resp += chunk
            except ConnectionResetError:
                pass  # eager: the close met the request on its way in
        if strategy == "eager":
            assert resp == b""
        else:
            _assert_denied(resp)
    assert origin.accepts == 0
    p.wait_for(r"egress (killed connection|blocked) rule=block_private")
