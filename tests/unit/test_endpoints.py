"""The kernel's endpoint helpers: whether a request is addressed to the proxy, own paths,
bearer tokens."""

from __future__ import annotations

from typing import Any

import pytest
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons, tflow

from addons.kernel import endpoints, wire

LISTEN = [("127.0.0.1", 8080)]


@pytest.mark.parametrize(
    "host,port,sockname,addrs,local",
    [
        ("127.0.0.1", 8080, ("127.0.0.1", 8080), LISTEN, True),
        ("localhost", 8080, ("127.0.0.1", 8080), LISTEN, True),
        ("LOCALHOST", 8080, ("127.0.0.1", 8080), LISTEN, True),
        ("10.1.2.3", 8080, ("10.1.2.3", 8080), [("", 8080)], True),  # pod IP, wildcard listen
        ("10.1.2.3", 8080, ("::ffff:10.1.2.3", 8080, 0, 0), [("::", 8080)], True),
        ("[::1]", 8080, ("::1", 8080, 0, 0), [("::", 8080)], True),
        ("127.0.0.1", 8080, None, LISTEN, True),
        ("example.com", 80, ("127.0.0.1", 8080), LISTEN, False),  # absolute-form to an origin
        ("127.0.0.1", 9999, ("127.0.0.1", 8080), LISTEN, False),  # another local service
        ("10.9.9.9", 8080, ("10.1.2.3", 8080), [("", 8080)], False),
        ("127.0.0.1", 8080, ("", 0), [], False),
    ],
)
def test_addressed_to_proxy(host: str, port: int, sockname: Any, addrs: list, local: bool) -> None:
    assert endpoints.addressed_to_proxy(host, port, sockname, addrs) is local


@pytest.mark.parametrize(
    "header,status",
    [
        (None, 401),
        ("", 401),
        ("Bearer", 401),
        ("Bearer ", 401),
        ("Basic c2VjcmV0", 401),
        ("Bearer secret", 200),
        ("bearer  secret ", 200),
        ("Bearer secreT", 403),
        ("Bearer secret2", 403),
        ("Bearer s\udcffcret", 403),
    ],
)
def test_bearer_status(header: str | None, status: int) -> None:
    assert endpoints.bearer_status(header, "secret") == status


def test_own_paths_are_registered_and_withdrawn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(endpoints, "_own_paths", {})
    endpoints.serve_paths("management", ("/health/", "/admin/"))
    endpoints.serve_paths("cli", ("/cli/execute",))
    assert endpoints.own_path("/admin/config") and endpoints.own_path("/cli/execute")
    assert not endpoints.own_path("/") and not endpoints.own_path("/healthz")
    endpoints.serve_paths("cli", ())
    assert not endpoints.own_path("/cli/execute") and endpoints.own_path("/health/liveness")


@pytest.mark.parametrize(
    "sent,origin_form,path,host,meant",
    [
        (b"", "refuse", "/health/readiness", "waypost.proxy.svc", True),  # a Service name
        (b"", "refuse", "/other", "waypost.proxy.svc", False),
        (b"", "relay", "/health/readiness", "waypost.proxy.svc", False),  # relayed by Host
        (None, "refuse", "/health/readiness", "waypost.proxy.svc", False),  # in a tunnel
        (b"waypost.proxy.svc:8080", "refuse", "/health/readiness", "waypost.proxy.svc", False),
        (b"", "refuse", "/other", "127.0.0.1", True),  # Host names the proxy
    ],
)
def test_meant_for_proxy(
    monkeypatch: pytest.MonkeyPatch,
    sent: bytes | None,
    origin_form: str,
    path: str,
    host: str,
    meant: bool,
) -> None:
    monkeypatch.setattr(endpoints, "_own_paths", {"management": ("/health/",)})
    monkeypatch.setattr(wire, "sent_authority", lambda request: sent)
    with taddons.context(Proxyserver()) as tctx:
        tctx.options.add_option("limits_origin_form", str, origin_form, "hygiene's")
        f = tflow.tflow()
        f.request.host, f.request.port, f.request.path = host, 8080, path
        f.client_conn.sockname = ("127.0.0.1", 8080)
        assert endpoints.meant_for_proxy(f) is meant
