"""TLS passthrough by default, interception opt-in, through a real mitmdump and curl."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from tests.conftest import ThreadedServer, connect_tunnel, read_head

SCRIPTS = ("addons/egress.py", "addons/tlspolicy.py")


class TlsOrigin(ThreadedServer):
    """An HTTPS origin on 127.0.0.1 with a trustme certificate for localhost and 127.0.0.1."""

    def __init__(self, ca: trustme.CA, names: tuple[str, ...] = ("localhost", "127.0.0.1")) -> None:
        cert = ca.issue_cert(*names)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self.ctx)
        self.snis: list[str | None] = []
        self.ctx.sni_callback = lambda _sock, name, _ctx: self.snis.append(name)
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                if read_head(tls) is None:
                    return
                tls.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\norigin\n"
                )
        except (OSError, ssl.SSLError):
            return


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def origin(ca: trustme.CA) -> Iterator[TlsOrigin]:
    o = TlsOrigin(ca)
    yield o
    o.close()


def _options(origin: TlsOrigin, **extra: object) -> dict[str, object]:
    return {
        "egress_allowed_networks": "127.0.0.0/8",
        "egress_connect_ports": str(origin.port),
        **extra,
    }


def _issuer_through_tunnel(proxy_port: int, host: str, port: int) -> x509.Name:
    """Open a CONNECT tunnel with a raw socket, handshake TLS inside it, return the cert issuer."""
    with connect_tunnel(proxy_port, f"{host}:{port}") as s:
        client = ssl.create_default_context()
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE  # we only want to see which certificate is presented
        with client.wrap_socket(s, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der
    return x509.load_der_x509_certificate(der).issuer


def _curl(p, ca_file: Path, port: int) -> subprocess.CompletedProcess[str]:
    """curl https://localhost:<port>/ through the proxy, trusting `ca_file`."""
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--noproxy",
            "",
            "--proxy",
            p.url,
            "--cacert",
            str(ca_file),
            f"https://localhost:{port}/",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )


def _ca_subject(ca: trustme.CA) -> x509.Name:
    return x509.load_pem_x509_certificate(ca.cert_pem.bytes()).subject


def test_passthrough_by_default_client_sees_origin_certificate(
    proxy_factory, origin, ca, tmp_path: Path
):
    p = proxy_factory(scripts=SCRIPTS, options=_options(origin))
    assert _issuer_through_tunnel(p.port, "localhost", origin.port) == _ca_subject(ca)

    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    out = _curl(p, ca_file, origin.port)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "origin\n"


def test_intercepted_host_sees_mitmproxy_certificate(proxy_factory, origin, ca):
    p = proxy_factory(
        scripts=SCRIPTS,
        options=_options(origin, tls_intercept_hosts="localhost", ssl_insecure=True),
    )
    issuer = _issuer_through_tunnel(p.port, "localhost", origin.port)
    assert issuer != _ca_subject(ca)
    orgs = issuer.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)
    assert [a.value for a in orgs] == ["mitmproxy"]


def test_a_tunnels_requests_are_the_origins_whatever_their_path(proxy_factory, origin):
    """Origin-form is what a tunnel carries: /health/liveness inside one goes to the origin,
    although the bundle answers that path itself outside tunnels under any Host."""
    options = _options(origin, tls_intercept_hosts="localhost", ssl_insecure=True)
    p = proxy_factory(options={**options, "metrics_port": 0})
    with connect_tunnel(p.port, f"localhost:{origin.port}") as s:
        client = ssl.create_default_context()
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        with client.wrap_socket(s, server_hostname="localhost") as tls:
            head = f"GET /health/liveness HTTP/1.1\r\nHost: localhost:{origin.port}\r\n"
            tls.sendall(head.encode() + b"Connection: close\r\n\r\n")
            got = b""
            while chunk := tls.recv(4096):
                got += chunk
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"origin\n"), got


def test_intercepted_upstream_is_verified_against_the_hostname_not_the_pinned_ip(
    proxy_factory, ca, tmp_path: Path
):
    # egress pins the connection to 127.0.0.1; the upstream TLS must still send SNI "localhost"
    # and verify the certificate for that name (this one has no IP address in it).
    origin = TlsOrigin(ca, names=("localhost",))
    try:
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        p = proxy_factory(
            scripts=SCRIPTS,
            options=_options(
                origin, tls_intercept_hosts="localhost", ssl_verify_upstream_trusted_ca=ca_file
            ),
        )
        out = _curl(p, tmp_path / "confdir" / "mitmproxy-ca-cert.pem", origin.port)
        assert out.returncode == 0, out.stderr + "\n".join(p.lines[-20:])
        assert out.stdout == "origin\n"
        assert origin.snis == ["localhost"]
    finally:
        origin.close()


def test_wildcard_does_not_cover_the_bare_name(proxy_factory, origin, ca):
    p = proxy_factory(
        scripts=SCRIPTS,
        options=_options(origin, tls_intercept_hosts="*.localhost", ssl_insecure=True),
    )
    assert _issuer_through_tunnel(p.port, "localhost", origin.port) == _ca_subject(ca)


def test_invalid_pattern_stops_mitmdump(proxy_factory):
    p = proxy_factory(
        scripts=("addons/tlspolicy.py",), options={"tls_intercept_hosts": "a*.example"}, wait=False
    )
    p.wait_for(r"tls_intercept_hosts: 'a\*.example' is not a host pattern")
    assert p.proc.wait(15) != 0
