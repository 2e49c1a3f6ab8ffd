"""TLS reverse listener: our certificate, h2 and HTTP/1.1 by ALPN on both sides, config errors.

Real mitmdump, real clients (httpx with h2, curl), and two origins: hypercorn over TLS (speaks
h2 and HTTP/1.1, says in its answer which one the request came with) and the shared aiohttp
backend (plain HTTP/1.1).
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme
from cryptography import x509

from tests.conftest import ROOT, Backend, Proxy

SCRIPTS = ("addons/tlslistener.py",)
_REVERSE = re.compile(r"reverse proxy to \S+ listening at \*?\[?([0-9a-f.:]+?)\]?:(\d+)")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The listener's certificate, key and the CA clients trust (issued for localhost)."""
    d = tmp_path_factory.mktemp("tls")
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    files = {"cert": d / "cert.pem", "key": d / "key.pem", "ca": d / "ca.pem"}
    leaf.cert_chain_pems[0].write_to_path(str(files["cert"]))
    leaf.private_key_pem.write_to_path(str(files["key"]))
    ca.cert_pem.write_to_path(str(files["ca"]))
    return files


class Hypercorn:
    """hypercorn serving tests/e2e/h2_backend.py over TLS on 127.0.0.1:0 (h2 + HTTP/1.1)."""

    def __init__(self, tmp: Path) -> None:
        backend_ca = trustme.CA()
        self.ca = tmp / "backend-ca.pem"
        backend_ca.cert_pem.write_to_path(str(self.ca))
        pem = tmp / "backend.pem"
        backend_ca.issue_cert(
            "127.0.0.1", "localhost"
        ).private_key_and_cert_chain_pem.write_to_path(str(pem))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hypercorn", "--certfile", str(pem), "--keyfile", str(pem)]
            + ["--bind", "127.0.0.1:0", "h2_backend:app"],
            cwd=ROOT / "tests" / "e2e",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self.port = 0
        found = threading.Event()

        def read() -> None:
            assert self.proc.stdout
            for line in self.proc.stdout:
                m = re.search(r"Running on https://127\.0\.0\.1:(\d+)", line)
                if m:
                    self.port = int(m.group(1))
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(30):
            self.stop()
            raise RuntimeError("hypercorn did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def h2_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hypercorn]:
    h = Hypercorn(tmp_path_factory.mktemp("hypercorn"))
    yield h
    h.stop()


def start_listener(
    proxy_factory, files: dict[str, Path], target: str, scripts=SCRIPTS, **options: object
) -> tuple[Proxy, int]:
    """mitmdump with one reverse listener to `target` on an ephemeral port."""
    opts: dict[str, object] = {
        "mode": f"reverse:{target}",
        "connection_strategy": "lazy",
        "tls_listener_cert": files["cert"],
        "tls_listener_key": files["key"],
    }
    opts.update(options)
    proxy = proxy_factory(scripts=scripts, options=opts, wait=False)
    m = proxy.wait_for(_REVERSE, timeout=30)
    return proxy, int(m.group(2))


def h2_listener(proxy_factory, files: dict[str, Path], origin: Hypercorn, **options: object) -> int:
    """The port of a listener in front of the h2 TLS origin, trusting the origin's CA."""
    _, port = start_listener(
        proxy_factory,
        files,
        f"https://127.0.0.1:{origin.port}",
        ssl_verify_upstream_trusted_ca=origin.ca,
        **options,
    )
    return port


def get(port: int, files: dict[str, Path], http2: bool, path: str = "/x") -> httpx.Response:
    # httpx offers "http/1.1, h2" with http2=True: the listener must pick h2 by itself.
    with httpx.Client(verify=str(files["ca"]), http2=http2, timeout=10, trust_env=False) as client:
        return client.get(f"https://localhost:{port}{path}")


def served_certificate(port: int) -> x509.Certificate:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der
    return x509.load_der_x509_certificate(der)


@pytest.mark.parametrize("http2", [True, False], ids=["h2", "http1.1"])
def test_h2_origin_gets_the_clients_protocol(
    proxy_factory, server_files, h2_origin: Hypercorn, http2: bool
) -> None:
    port = h2_listener(proxy_factory, server_files, h2_origin)
    r = get(port, server_files, http2)
    assert r.status_code == 200
    assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    assert r.json()["http_version"] == ("2" if http2 else "1.1")
    assert r.json()["path"] == "/x"


def test_plain_http_origin_behind_h2_client(proxy_factory, server_files, backend: Backend) -> None:
    _, port = start_listener(proxy_factory, server_files, backend.url)
    r = get(port, server_files, http2=True, path="/echo/h2")
    assert r.status_code == 200
    assert r.http_version == "HTTP/2"
    assert r.json()["version"] == "1.1"  # mitmproxy translates h2 to HTTP/1.1 for this origin
    # Plain HTTP on the same port still works: mitmproxy detects TLS by the first bytes.
    with httpx.Client(timeout=10, trust_env=False) as client:
        assert client.get(f"http://127.0.0.1:{port}/echo/plain").json()["path"] == "/echo/plain"


def test_serves_the_configured_certificate_not_mitmproxys(
    proxy_factory, server_files, backend: Backend
) -> None:
    _, port = start_listener(proxy_factory, server_files, backend.url)
    served = served_certificate(port)
    ours = x509.load_pem_x509_certificate(server_files["cert"].read_bytes())
    assert served == ours


def _handshake_version(port: int, maximum: ssl.TLSVersion) -> str | None:
    """The TLS version negotiated by a client that offers at most `maximum`; None: refused."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = maximum
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            with ctx.wrap_socket(s, server_hostname="localhost") as tls:
                return tls.version()
        except (ssl.SSLError, ConnectionResetError):
            return None


@pytest.mark.parametrize(
    ("minimum", "tls12"), [("TLS1_2", "TLSv1.2"), ("TLS1_3", None)], ids=["min1.2", "min1.3"]
)
def test_the_minimum_tls_version_applies_to_our_certificate(
    proxy_factory, server_files, backend: Backend, minimum: str, tls12: str | None
) -> None:
    _, port = start_listener(
        proxy_factory, server_files, backend.url, tls_version_client_min=minimum
    )
    assert _handshake_version(port, ssl.TLSVersion.TLSv1_2) == tls12
    assert _handshake_version(port, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"


async def _quic_peer(port: int, ca: Path) -> x509.Certificate:
    """Complete a QUIC (HTTP/3) handshake that verifies against `ca`; the served leaf."""
    import asyncio

    from aioquic.asyncio.client import connect
    from aioquic.quic.configuration import QuicConfiguration

    config = QuicConfiguration(is_client=True, alpn_protocols=["h3"], server_name="localhost")
    config.load_verify_locations(str(ca))
    async with asyncio.timeout(15):
        async with connect("127.0.0.1", port, configuration=config) as client:
            return client._quic.tls._peer_certificate


async def test_http3_gets_the_same_certificate(proxy_factory, server_files, backend) -> None:
    """`reverse:https://` also listens on UDP for HTTP/3: QUIC clients get our certificate
    (the handshake verifies against our CA only)."""
    _, port = start_listener(proxy_factory, server_files, f"https://127.0.0.1:{backend.port}")
    served = await _quic_peer(port, server_files["ca"])
    assert served == x509.load_pem_x509_certificate(server_files["cert"].read_bytes())


def test_http2_off_gives_http11(proxy_factory, server_files, h2_origin: Hypercorn) -> None:
    port = h2_listener(proxy_factory, server_files, h2_origin, http2=False)
    r = get(port, server_files, http2=True)
    assert r.http_version == "HTTP/1.1"
    assert r.json()["http_version"] == "1.1"


@pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")
@pytest.mark.parametrize(("flag", "want"), [("--http2", "2"), ("--http1.1", "1.1")])
def test_curl_negotiates(
    proxy_factory, server_files, h2_origin: Hypercorn, flag: str, want: str
) -> None:
    port = h2_listener(proxy_factory, server_files, h2_origin)
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--cacert", str(server_files["ca"]), flag]
        + ["-w", "\n%{http_version}", f"https://localhost:{port}/c"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    body, _, version = out.stdout.rpartition("\n")
    assert out.returncode == 0, out.stderr
    assert version == want
    assert f'"http_version": "{want}"' in body


def test_bundle_terminates_tls_on_reverse_listener(
    proxy_factory, server_files, h2_origin: Hypercorn, tmp_path: Path
) -> None:
    """Through the whole bundle and a profile: the TLS policy (pass tunnels through) must not
    pass the reverse listener's TLS through to the backend."""
    profile = tmp_path / "tls.yaml"
    profile.write_text(
        f"server:\n"
        f"  tls: {{cert: {server_files['cert']}, key: {server_files['key']}}}\n"
        f"metrics: {{port: 0}}\n"
        f"security:\n"
        f"  egress: {{allowed_networks: [127.0.0.1/32]}}\n"
        f"mitmproxy:\n"
        f"  mode: ['reverse:https://127.0.0.1:{h2_origin.port}']\n"
        f"  connection_strategy: lazy\n"
        f"  ssl_verify_upstream_trusted_ca: {h2_origin.ca}\n"
    )
    proxy = proxy_factory(options={"waypost_profile": profile}, wait=False)
    port = int(proxy.wait_for(_REVERSE, timeout=30).group(2))
    for http2 in (True, False):
        r = get(port, server_files, http2)
        assert r.status_code == 200
        assert r.json()["http_version"] == ("2" if http2 else "1.1")
        assert r.headers.get("x-request-id")  # the HTTP-level addons saw the request


def _exits_with(proxy: Proxy, pattern: str) -> None:
    proxy.wait_for(pattern, timeout=30)
    deadline = time.monotonic() + 30
    while proxy.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proxy.proc.returncode not in (None, 0)


def test_mismatched_key_is_refused_at_startup(
    proxy_factory, server_files, ca: trustme.CA, tmp_path: Path
) -> None:
    other = tmp_path / "other-key.pem"
    ca.issue_cert("other").private_key_pem.write_to_path(str(other))
    proxy = proxy_factory(
        scripts=SCRIPTS,
        options={"tls_listener_cert": server_files["cert"], "tls_listener_key": other},
        wait=False,
    )
    _exits_with(proxy, r"tls_listener_key: the key .* does not belong to the certificate")


def test_profile_error_names_file_and_line(proxy_factory, server_files, tmp_path: Path) -> None:
    profile = tmp_path / "bad.yaml"
    profile.write_text(
        f"metrics: {{port: 0}}\nserver:\n  tls:\n    cert: {server_files['cert']}\n"
        f"    key: {tmp_path / 'missing.pem'}\n"
    )
    proxy = proxy_factory(options={"waypost_profile": profile}, wait=False)
    _exits_with(proxy, rf"{re.escape(str(profile))}:5: server\.tls\.key: cannot read")
