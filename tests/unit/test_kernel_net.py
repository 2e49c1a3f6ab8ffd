"""kernel.net: address parsing, the prefix index, the X-Forwarded-For walk, and client_ip(flow)
through the process's trusted proxies, as tables."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow

from addons.kernel import net


@pytest.fixture(autouse=True)
def no_trusted_proxies() -> Iterator[None]:
    """`net.TRUSTED` is the process's: start and leave every test with none."""
    net.TRUSTED.update(())
    yield
    net.TRUSTED.update(())


# --- parsing ---------------------------------------------------------------------------------

TRUSTED = net.parse_networks(["10.0.0.0/8", "2001:db8::/32", "::ffff:192.168.1.0/120"])
NONE = net.NO_NETWORKS


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1.2.3.4", "1.2.3.4"),
        (" 1.2.3.4 ", "1.2.3.4"),
        ("1.2.3.4:8080", "1.2.3.4"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("::ffff:1.2.3.4", "1.2.3.4"),
        ("[::ffff:1.2.3.4]:9", "1.2.3.4"),
        ("unknown", None),
        ("", None),
        ("1.2.3.4.5", None),
        ("[2001:db8::1", None),
        ("_hidden", None),
    ],
)
def test_parse_ip(value: str, expected: str | None) -> None:
    ip = net.parse_ip(value)
    assert (str(ip) if ip is not None else None) == expected


@pytest.mark.parametrize(
    ("peer", "xff", "real_ip", "trusted", "expected"),
    [
        # no trusted proxies: the socket peer, whatever the headers say
        ("203.0.113.5", "1.1.1.1", "2.2.2.2", NONE, ("203.0.113.5", False)),
        ("::ffff:203.0.113.5", None, None, NONE, ("203.0.113.5", False)),
        ("2001:db8::7", None, None, NONE, ("2001:db8::7", False)),
        # untrusted peer: headers ignored
        ("203.0.113.5", "1.1.1.1", None, TRUSTED, ("203.0.113.5", False)),
        # trusted peer: right-most untrusted hop
        ("10.0.0.1", "198.51.100.7", None, TRUSTED, ("198.51.100.7", True)),
        ("10.0.0.1", "6.6.6.6, 198.51.100.7, 10.2.2.2", None, TRUSTED, ("198.51.100.7", True)),
        ("10.0.0.1", "6.6.6.6,198.51.100.7", None, TRUSTED, ("198.51.100.7", True)),
        # every hop trusted: the left-most
        ("10.0.0.1", "10.9.9.9, 10.2.2.2", None, TRUSTED, ("10.9.9.9", True)),
        # garbage stops the walk at the last believable address
        ("10.0.0.1", "1.1.1.1, junk, 10.2.2.2", None, TRUSTED, ("10.2.2.2", True)),
        ("10.0.0.1", "junk", None, TRUSTED, ("10.0.0.1", True)),
        # IPv6 and mapped forms
        ("2001:db8::1", "[2001:db9::5]:1234", None, TRUSTED, ("2001:db9::5", True)),
        ("::ffff:10.0.0.1", "::ffff:198.51.100.7", None, TRUSTED, ("198.51.100.7", True)),
        ("::ffff:192.168.1.9", "198.51.100.7", None, TRUSTED, ("198.51.100.7", True)),
        ("192.168.1.9", "198.51.100.7", None, TRUSTED, ("198.51.100.7", True)),
        # X-Real-IP from a trusted peer when there is no X-Forwarded-For
        ("10.0.0.1", None, "198.51.100.9", TRUSTED, ("198.51.100.9", True)),
        ("10.0.0.1", None, "nonsense", TRUSTED, ("10.0.0.1", True)),
        ("10.0.0.1", None, None, TRUSTED, ("10.0.0.1", True)),
        ("203.0.113.5", None, "198.51.100.9", TRUSTED, ("203.0.113.5", False)),
    ],
)
def test_forwarded_client(peer, xff, real_ip, trusted, expected) -> None:
    assert net.forwarded_client(peer, xff, real_ip, trusted) == expected
    cache: dict = {}
    assert net.forwarded_client(peer, xff, real_ip, trusted, cache) == expected
    assert net.forwarded_client(peer, xff, real_ip, trusted, cache) == expected


def test_parse_cidrs() -> None:
    assert net.parse_cidrs(["10.0.0.1", "10.1.2.3/8"]) == (
        ipaddress.ip_network("10.0.0.1/32"),
        ipaddress.ip_network("10.0.0.0/8"),
    )
    assert net.parse_cidrs(["::ffff:10.0.0.0/104"]) == (ipaddress.ip_network("10.0.0.0/8"),)
    with pytest.raises(ValueError, match="not-an-ip"):
        net.parse_cidrs(["not-an-ip"])


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("::ffff:a00:1", "::ffff:a00:1"),  # the hex form stays as the socket wrote it
        ("10.0.0.1", "10.0.0.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("", ""),
    ],
)
def test_normalize_peer(peer: str, expected: str) -> None:
    assert net.normalize_peer(peer) == expected


def test_parse_networks_names_the_bad_entry() -> None:
    with pytest.raises(ValueError, match="'10.0.0.0/33'"):
        net.parse_networks(["127.0.0.0/8", "10.0.0.0/33"])
    with pytest.raises(ValueError, match="'intranet'"):
        net.parse_networks(["intranet"])


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "banana", "10.0.0.0/8,11.0.0.0/8"])
def test_networks_option_names_the_option(bad: str) -> None:
    with pytest.raises(exceptions.OptionsError, match=r"^some_option: '.*' is not a CIDR"):
        net.networks_option("some_option", [bad])


# --- the prefix index ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("networks", "address", "entry"),
    [
        (["10.0.0.0/8"], "10.1.2.3", "10.0.0.0/8"),
        (["10.0.0.0/8", "10.6.0.0/16"], "10.6.6.6", "10.6.0.0/16"),  # most specific
        (["10.6.6.6"], "10.6.6.6", "10.6.6.6/32"),
        (["::ffff:10.6.0.0/112"], "10.6.6.6", "10.6.0.0/16"),  # a mapped network is IPv4
        (["2001:db8::/32"], "2001:db8::1", "2001:db8::/32"),
        (["10.0.0.0/8"], "2001:db8::1", None),  # other family
        (["0.0.0.0/0"], "203.0.113.1", "0.0.0.0/0"),
        (["::/0"], "203.0.113.1", None),
        ([], "10.0.0.1", None),
    ],
)
def test_lookup(networks: list[str], address: str, entry: str | None) -> None:
    assert net.lookup(net.parse_networks(networks), ipaddress.ip_address(address)) == entry


def test_lookup_cost_does_not_grow_with_entries() -> None:
    many = net.index(ipaddress.ip_network(f"10.{i >> 8}.{i & 255}.0/24") for i in range(60_000))
    assert len(many.v4) == 1  # one prefix length: one dict lookup per query
    assert net.lookup(many, ipaddress.ip_address("10.200.7.9")) == "10.200.7.0/24"
    assert net.lookup(many, ipaddress.ip_address("11.0.0.1")) is None


# --- client_ip(flow) and the process's trusted proxies ---------------------------------------


class Reader:
    """Stands in for an addon loaded alone that decides on the client address."""

    def load(self, loader: object) -> None:
        net.load(loader)

    def configure(self, updated: set[str]) -> None:
        net.configure(updated)


def flow(peer: str | None, *headers: tuple[str, str]) -> tflow.HTTPFlow:
    f = tflow.tflow()
    f.client_conn.peername = (peer, 40000) if peer is not None else None
    for name, value in headers:
        f.request.headers.add(name, value)
    return f


LB = ["10.0.0.0/8", "2001:db8::/32"]


@pytest.mark.parametrize(
    ("trusted", "peer", "headers", "expected"),
    [
        ([], "203.0.113.5", [("X-Forwarded-For", "1.1.1.1")], "203.0.113.5"),
        ([], "::ffff:203.0.113.5", [], "203.0.113.5"),
        ([], None, [], ""),
        (LB, "198.51.100.1", [("X-Forwarded-For", "1.1.1.1")], "198.51.100.1"),  # untrusted peer
        (LB, "10.0.0.1", [("X-Forwarded-For", "198.51.100.7")], "198.51.100.7"),
        (LB, "::ffff:10.0.0.1", [("X-Forwarded-For", "198.51.100.7")], "198.51.100.7"),
        # a chain of trusted proxies: the right-most hop that is not one of them
        (LB, "10.0.0.1", [("X-Forwarded-For", "6.6.6.6, 198.51.100.7, 10.2.2.2")], "198.51.100.7"),
        (LB, "10.0.0.1", [("X-Forwarded-For", "10.9.9.9, 10.2.2.2")], "10.9.9.9"),
        (LB, "2001:db8::1", [("X-Forwarded-For", "[2001:db9::5]:1234")], "2001:db9::5"),
        # one header per proxy: the fields are one list, in order
        (
            LB,
            "10.0.0.1",
            [("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "198.51.100.8, 10.3.3.3")],
            "198.51.100.8",
        ),
        (LB, "10.0.0.1", [("X-Forwarded-For", "1.1.1.1, junk, 10.2.2.2")], "10.2.2.2"),
        (LB, "10.0.0.1", [("X-Real-IP", "198.51.100.9")], "198.51.100.9"),
        (LB, "10.0.0.1", [("x-real-ip", "198.51.100.9"), ("X-Real-IP", "6.6.6.6")], "198.51.100.9"),
        (LB, "10.0.0.1", [], "10.0.0.1"),
    ],
)
def test_client_ip(trusted: list[str], peer: str | None, headers: list, expected: str) -> None:
    r = Reader()
    with taddons.context(r) as tctx:
        tctx.configure(r, forwarding_trusted_proxies=trusted)
        f = flow(peer, *headers)
        assert net.client_ip(f) == expected
        assert f.metadata["waypost"]["client_ip"] == expected


def test_client_ip_is_derived_once_per_flow() -> None:
    r = Reader()
    with taddons.context(r) as tctx:
        tctx.configure(r, forwarding_trusted_proxies=LB)
        f = flow("10.0.0.1", ("X-Forwarded-For", "198.51.100.7"))
        assert net.client_ip(f) == "198.51.100.7"
        # A later rewrite of the headers (forwarding appends its own hop) changes nothing.
        f.request.headers["X-Forwarded-For"] = "203.0.113.1"
        assert net.client_ip(f) == "198.51.100.7"


def test_a_lone_addon_declares_the_option_and_refuses_a_bad_value() -> None:
    r = Reader()
    with taddons.context(r) as tctx:
        assert tctx.options.forwarding_trusted_proxies == []
        with pytest.raises(exceptions.OptionsError, match="forwarding_trusted_proxies: 'lb.local'"):
            tctx.configure(r, forwarding_trusted_proxies=["lb.local"])
        assert not net.TRUSTED.active


class OtherReader(Reader):
    pass


def test_parsed_once_per_change_and_shared_by_every_addon() -> None:
    a, b = Reader(), OtherReader()
    with taddons.context(a, b) as tctx:
        tctx.configure(a, forwarding_trusted_proxies=LB)
        parsed = net.TRUSTED.networks
        tctx.configure(b, forwarding_trusted_proxies=LB)  # the same value again
        tctx.options.update(ssl_insecure=True)  # another option
        assert net.TRUSTED.networks is parsed
        tctx.configure(a, forwarding_trusted_proxies=["10.0.0.0/8"])
        assert net.TRUSTED.networks is not parsed


def test_a_new_master_starts_from_its_own_value() -> None:
    r = Reader()
    with taddons.context(r) as tctx:
        tctx.configure(r, forwarding_trusted_proxies=LB)
        assert net.TRUSTED.active
    with taddons.context(Reader()):
        assert not net.TRUSTED.active


@pytest.mark.parametrize(
    ("peer", "ip", "trusted"),
    [
        ("10.0.0.1", "10.0.0.1", True),
        ("::ffff:10.0.0.1", "10.0.0.1", True),
        ("2001:db8::9", "2001:db8::9", True),
        ("203.0.113.5", "203.0.113.5", False),
        (None, "", False),
    ],
)
def test_peer_ip_and_trusted_peer(peer: str | None, ip: str, trusted: bool) -> None:
    r = Reader()
    with taddons.context(r) as tctx:
        tctx.configure(r, forwarding_trusted_proxies=LB)
        client = tflow.tclient_conn()
        client.peername = (peer, 1) if peer is not None else None
        assert net.peer_ip(client) == ip
        assert net.trusted_peer(client) is trusted
