"""Egress policy: port specs, address classification, management guard, and the addon hooks."""

from __future__ import annotations

import ipaddress
import json

import pytest
from mitmproxy import connection, exceptions, http
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons, tflow

from addons import egress
from addons.egress import (
    Egress,
    check,
    classify,
    hits_management,
    in_networks,
    parse_port_spec,
    port_allowed,
)
from addons.kernel import net


def ip(text: str) -> egress.IPAddress:
    return ipaddress.ip_address(text)


# --- ports -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("443", (443, 443)),
        (" 8443 ", (8443, 8443)),
        ("8000-8999", (8000, 8999)),
        ("1-65535", (1, 65535)),
        ("80-80", (80, 80)),
    ],
)
def test_parse_port_spec(spec: str, expected: tuple[int, int]) -> None:
    assert parse_port_spec(spec) == expected


@pytest.mark.parametrize(
    "spec", ["", "0", "65536", "-1", "https", "9000-8000", "80-", "1-2-3", "80,443", "0x50"]
)
def test_parse_port_spec_rejects(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_port_spec(spec)


@pytest.mark.parametrize(
    "port, allowed", [(443, True), (8000, True), (8500, True), (8999, True), (80, False)]
)
def test_port_allowed(port: int, allowed: bool) -> None:
    assert port_allowed(((443, 443), (8000, 8999)), port) is allowed


# --- classification --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address, label",
    [
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("10.0.0.1", "private"),
        ("10.255.255.255", "private"),
        ("100.64.0.1", "cgnat"),
        ("100.127.255.254", "cgnat"),
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("169.254.169.254", "link_local"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.0.0.8", "reserved"),
        ("192.0.2.1", "documentation"),
        ("192.168.1.1", "private"),
        ("198.18.0.1", "benchmarking"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("::", "unspecified"),
        ("::1", "loopback"),
        ("fc00::1", "unique_local"),
        ("fd12:3456::1", "unique_local"),
        ("fe80::1", "link_local"),
        ("fe80::1%eth0", "link_local"),
        ("fec0::1", "site_local"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "documentation"),
        ("::7f00:1", "reserved"),  # IPv4-compatible (deprecated)
        ("100::1", "reserved"),  # discard-only
        ("64:ff9b:1::1", "reserved"),  # NAT64 local-use
        ("::ffff:127.0.0.1", "loopback (127.0.0.1 embedded in IPv6)"),
        ("::ffff:169.254.169.254", "link_local (169.254.169.254 embedded in IPv6)"),
        ("::ffff:10.1.2.3", "private (10.1.2.3 embedded in IPv6)"),
        ("64:ff9b::a9fe:a9fe", "link_local (169.254.169.254 embedded in IPv6)"),
        ("64:ff9b::7f00:1", "loopback (127.0.0.1 embedded in IPv6)"),
        ("2002:7f00:1::1", "loopback (127.0.0.1 embedded in IPv6)"),  # 6to4
        ("2002:c0a8:101::1", "private (192.168.1.1 embedded in IPv6)"),
    ],
)
def test_classify_blocked(address: str, label: str) -> None:
    assert classify(ip(address)) == label


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "100.63.255.255",
        "100.128.0.0",
        "172.15.255.255",
        "172.32.0.0",
        "169.253.255.255",
        "223.255.255.255",
        "2606:4700:4700::1111",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
    ],
)
def test_classify_public(address: str) -> None:
    assert classify(ip(address)) is None


@pytest.mark.parametrize(
    "networks, address, inside",
    [
        (["127.0.0.0/8"], "127.0.0.1", True),
        (["127.0.0.0/8"], "::ffff:127.0.0.1", True),  # the mapped form reaches the same host
        (["127.0.0.0/8"], "::1", False),
        (["10.1.0.0/16"], "10.1.200.3", True),
        (["10.1.0.0/16"], "10.2.0.1", False),
        (["10.1.2.3"], "10.1.2.3", True),
        (["fd00::/8"], "fd00::5", True),
        (["fd00::/8"], "fc00::5", False),
        ([], "127.0.0.1", False),
    ],
)
def test_in_networks(networks: list[str], address: str, inside: bool) -> None:
    assert in_networks(net.parse_networks(networks), ip(address)) is inside


# --- management port and the full check ----------------------------------------------------


def _local(address: egress.IPAddress) -> bool:
    return address.is_loopback or address == ip("192.0.2.10")


@pytest.mark.parametrize(
    "listen, address, port, hit",
    [
        ([("127.0.0.1", 9090)], "127.0.0.1", 9090, True),
        ([("127.0.0.1", 9090)], "127.0.0.1", 9091, False),
        ([("127.0.0.1", 9090)], "::ffff:127.0.0.1", 9090, True),
        ([("127.0.0.1", 9090)], "0.0.0.0", 9090, True),
        ([("127.0.0.1", 9090)], "::", 9090, True),
        ([("127.0.0.1", 9090)], "127.0.0.2", 9090, False),
        ([("::1", 9090)], "::1", 9090, True),
        ([("localhost", 9090)], "127.0.0.5", 9090, True),
        ([("0.0.0.0", 9090)], "127.0.0.5", 9090, True),
        ([("0.0.0.0", 9090)], "192.0.2.10", 9090, True),  # a local interface address
        ([("0.0.0.0", 9090)], "192.0.2.11", 9090, False),  # someone else's 9090
        ([("::", 9090)], "::ffff:192.0.2.10", 9090, True),
        ([("10.0.0.1", 9090), ("127.0.0.1", 9191)], "127.0.0.1", 9191, True),
        ([], "127.0.0.1", 9090, False),
    ],
)
def test_hits_management(listen: list[tuple[str, int]], address: str, port: int, hit: bool) -> None:
    assert hits_management(ip(address), port, listen, _local) is hit


def test_check_order_and_exemptions() -> None:
    allowed = net.parse_networks(["127.0.0.0/8"])
    kw = {"block_private": True, "allowed": allowed, "listen_addrs": [("127.0.0.1", 9090)]}
    assert check([ip("127.0.0.1")], 80, is_local=_local, **kw) is None
    v = check([ip("127.0.0.1")], 9090, is_local=_local, **kw)
    assert v is not None and v.rule == "management_port"
    # one bad address among good ones refuses the whole name
    v = check([ip("8.8.8.8"), ip("10.0.0.1")], 80, is_local=_local, **kw)
    assert v is not None and (v.rule, v.ip) == ("block_private", "10.0.0.1")
    assert (
        check(
            [ip("10.0.0.1")], 80, is_local=_local, block_private=False, allowed=(), listen_addrs=()
        )
        is None
    )


# --- the addon -------------------------------------------------------------------------------


def test_configure_validates() -> None:
    addon = Egress()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, egress_connect_ports=["443", "8000-8999"])
        assert addon.connect_ports == ((443, 443), (8000, 8999))
        with pytest.raises(exceptions.OptionsError, match="egress_connect_ports: '99999'"):
            tctx.configure(addon, egress_connect_ports=["99999"])
        with pytest.raises(exceptions.OptionsError, match="egress_allowed_networks: 'nope'"):
            tctx.configure(addon, egress_allowed_networks=["nope"])


def _connect_flow(host: str, port: int) -> tflow.HTTPFlow:
    f = tflow.tflow()
    f.request.method = "CONNECT"
    f.request.host = host
    f.request.port = port
    return f


async def test_http_connect_port_rule() -> None:
    addon = Egress()
    with taddons.context(addon):
        f = _connect_flow("93.184.215.14", 22)
        await addon.http_connect(f)
        assert f.response is not None and f.response.status_code == 403
        assert json.loads(f.response.content)["error"]["code"] == "ACCESS_DENIED"
        assert f.metadata["waypost"]["decision"] == "blocked"
        assert f.metadata["waypost"]["rule"] == "connect_ports"

        f = _connect_flow("93.184.215.14", 443)
        await addon.http_connect(f)
        assert f.response is None


async def test_requestheaders_blocks_private_and_uses_the_dns_cache() -> None:
    addon = Egress()
    with taddons.context(addon) as tctx:
        addon._dns["rebind.example"] = (ip("10.0.0.7"),)
        f = tflow.tflow()
        f.request.host = "Rebind.Example."
        await addon.requestheaders(f)
        assert f.response is not None and f.response.status_code == 403
        assert f.metadata["waypost"]["rule"] == "block_private"

        tctx.configure(addon, egress_allowed_networks=["10.0.0.0/8"])
        f = tflow.tflow()
        f.request.host = "rebind.example"
        await addon.requestheaders(f)
        assert f.response is None


async def test_hooks_skip_answered_flows() -> None:
    addon = Egress()
    with taddons.context(addon):
        f = tflow.tflow(resp=True)
        f.request.host = "127.0.0.1"
        await addon.requestheaders(f)
        assert f.metadata.get("waypost") is None


def _server(host: str, port: int) -> server_hooks.ServerConnectionHookData:
    return server_hooks.ServerConnectionHookData(
        server=connection.Server(address=(host, port)), client=tflow.tclient_conn()
    )


async def test_server_connect_pins_the_checked_ip_and_restores_the_name() -> None:
    addon = Egress()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, egress_allowed_networks=["127.0.0.0/8"])
        addon._dns["app.example"] = (ip("127.0.0.9"), ip("127.0.0.10"))
        data = _server("APP.example", 8080)
        await addon.server_connect(data)
        assert data.server.error is None
        assert data.server.address == ("127.0.0.9", 8080)
        data.server.state = connection.ConnectionState.OPEN
        data.server.peername = ("127.0.0.9", 8080)
        addon.server_connected(data)
        assert data.server.address == ("APP.example", 8080)
        assert addon._pinned == {}

        data = _server("app.example", 8080)
        await addon.server_connect(data)
        addon.server_connect_error(data)
        assert data.server.address == ("app.example", 8080)


async def test_server_connect_kills_a_rebound_name_and_connect_error_answers_403() -> None:
    addon = Egress()
    with taddons.context(addon):
        # The early check saw a public address; by connect time the name points inward.
        addon._dns["rebind.example"] = (ip("169.254.169.254"),)
        data = _server("rebind.example", 443)
        await addon.server_connect(data)
        assert data.server.error is not None
        assert data.server.error.startswith(egress.KILL_PREFIX)
        assert "block_private" in data.server.error
        assert data.server.address == ("rebind.example", 443)  # never pinned

        f = _connect_flow("rebind.example", 443)
        f.server_conn = data.server
        f.response = http.Response.make(502, b"Cannot connect")
        addon.http_connect_error(f)
        assert f.response.status_code == 403
        assert f.metadata["waypost"]["rule"] == "block_private"


async def test_server_connect_refuses_unresolvable_names() -> None:
    addon = Egress()
    with taddons.context(addon):
        addon._dns_failures["nx.example"] = "Name or service not known"
        data = _server("nx.example", 80)
        await addon.server_connect(data)
        assert data.server.error == "Cannot resolve nx.example: Name or service not known"


async def test_ip_literals_are_not_resolved() -> None:
    addon = Egress()
    assert await addon.resolve("10.1.2.3") == (ip("10.1.2.3"),)
    assert await addon.resolve("::1") == (ip("::1"),)
    assert len(addon._dns) == 0


async def test_localhost_resolves_to_loopback() -> None:
    addon = Egress()
    ips = await addon.resolve("localhost")
    assert ips and all(a.is_loopback for a in ips)
    assert addon._dns["localhost"] == ips


def test_is_local_address() -> None:
    assert egress.is_local_address(ip("127.0.0.1"))
    assert egress.is_local_address(ip("0.0.0.0"))
    assert not egress.is_local_address(ip("192.0.2.55"))
