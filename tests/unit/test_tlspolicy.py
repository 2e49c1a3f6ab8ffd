"""TLS policy: the passthrough decision (its host patterns: tests/unit/test_kernel_hosts.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from mitmproxy import connection, exceptions
from mitmproxy.proxy import mode_specs
from mitmproxy.test import taddons, tflow

from addons.tlspolicy import TlsPolicy, could_start_tls

PATTERNS = ["api.example.com", "*.corp.example", "Mixed.Case.Example."]


def test_configure_error_names_the_option() -> None:
    addon = TlsPolicy()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match="tls_intercept_hosts: 'a\\*b'"):
            tctx.configure(addon, tls_intercept_hosts=["a*b"])


def _hello(sni: str | None, server: connection.Server, mode: str = "regular") -> SimpleNamespace:
    client = SimpleNamespace(proxy_mode=mode_specs.ProxyMode.parse(mode))
    return SimpleNamespace(
        client_hello=SimpleNamespace(sni=sni),
        context=SimpleNamespace(server=server, client=client),
        ignore_connection=False,
    )


@pytest.mark.parametrize(
    "sni, connect_host, decision",
    [
        ("api.example.com", "api.example.com", "intercept"),
        ("www.example.com", "api.example.com", "passthrough"),  # the SNI wins
        (None, "api.example.com", "intercept"),  # no SNI: the CONNECT host
        (None, "www.example.com", "passthrough"),
        ("A.Corp.Example.", "10.0.0.1", "intercept"),
    ],
)
def test_clienthello_decision_recorded_on_the_connect_flow(
    sni: str | None, connect_host: str, decision: str
) -> None:
    addon = TlsPolicy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, tls_intercept_hosts=PATTERNS)
        f = tflow.tflow()
        f.request.method = "CONNECT"
        f.request.host = connect_host
        f.request.port = 443
        addon.http_connect(f)
        data = _hello(sni, f.server_conn)
        addon.tls_clienthello(data)  # type: ignore[arg-type]
        assert data.ignore_connection is (decision == "passthrough")
        assert f.metadata["waypost"]["tls"] == decision


def test_clienthello_without_connect_flow_uses_server_address() -> None:
    addon = TlsPolicy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, tls_intercept_hosts=["api.example.com"])
        data = _hello(None, connection.Server(address=("api.example.com", 443)))
        addon.tls_clienthello(data)  # type: ignore[arg-type]
        assert data.ignore_connection is False
        data = _hello(None, connection.Server(address=None))
        addon.tls_clienthello(data)  # type: ignore[arg-type]
        assert data.ignore_connection is True


def test_reverse_listener_tls_is_never_passed_through() -> None:
    """A reverse listener terminates TLS itself (tlslistener.py); passing it through would
    relay the client's handshake to the backend."""
    addon = TlsPolicy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, tls_intercept_hosts=[])
        server = connection.Server(address=("127.0.0.1", 8443))
        data = _hello("www.example.com", server, mode="reverse:https://127.0.0.1:8443")
        addon.tls_clienthello(data)  # type: ignore[arg-type]
        assert data.ignore_connection is False


@pytest.mark.parametrize(
    ("data", "maybe_tls"),
    [
        (b"", True),
        (b"\x16", True),
        (b"\x16\x03", True),
        (b"\x16\x03\x01\x02\x00", True),
        (b"\x16\x04", False),
        (b"\x16\x03\x04", False),
        (b"SSH-2.0-x\r\n", False),
        (b"EHLO x\r\n", False),
        (b"G", False),
    ],
)
def test_could_start_tls(data: bytes, maybe_tls: bool) -> None:
    assert could_start_tls(data) is maybe_tls
