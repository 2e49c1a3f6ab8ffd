"""IP ACL: the CIDR index and verdicts as tables, the addon through taddons/tflow."""

from __future__ import annotations

import json
import logging

import pytest
from mitmproxy import exceptions
from mitmproxy.addons import block, view
from mitmproxy.proxy import mode_specs
from mitmproxy.test import taddons, tflow

from addons import acl, forwarding, metrics
from addons.kernel import net
from addons.kernel.record import record


def nets(*cidrs: str) -> net.Networks:
    return net.parse_networks(list(cidrs))


@pytest.mark.parametrize(
    "ip, allowed, denied, expected",
    [
        ("10.1.2.3", [], [], None),
        ("10.1.2.3", ["10.0.0.0/8"], [], None),
        ("11.1.2.3", ["10.0.0.0/8"], [], "allowlist"),
        ("10.6.6.6", ["10.0.0.0/8"], ["10.6.0.0/16"], "deny:10.6.0.0/16"),
        ("10.6.6.6", [], ["10.6.0.0/16", "10.6.6.0/24"], "deny:10.6.6.0/24"),  # most specific
        ("10.6.6.6", [], ["10.6.6.6"], "deny:10.6.6.6/32"),
        ("::ffff:10.6.6.6", [], ["10.6.0.0/16"], "deny:10.6.0.0/16"),  # mapped address
        ("10.6.6.6", [], ["::ffff:10.6.0.0/112"], "deny:10.6.0.0/16"),  # mapped network
        ("2001:db8::1", ["2001:db8::/32"], [], None),
        ("2001:db9::1", ["2001:db8::/32"], [], "allowlist"),
        ("2001:db8::1", ["10.0.0.0/8"], [], "allowlist"),  # other family: not allowed
        ("2001:db8::1", [], ["0.0.0.0/0"], None),
        ("1.2.3.4", ["0.0.0.0/0"], ["1.2.3.4/32"], "deny:1.2.3.4/32"),
        ("not-an-ip", [], ["10.0.0.0/8"], None),
        ("not-an-ip", ["10.0.0.0/8"], [], "allowlist"),
    ],
)
def test_verdict(ip: str, allowed: list[str], denied: list[str], expected: str | None) -> None:
    assert acl.verdict(net.parse_ip(ip), nets(*allowed), nets(*denied)) == expected


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "banana", "10.0.0.0/8,11.0.0.0/8"])
def test_bad_network_is_an_option_error(bad: str) -> None:
    a = acl.Acl()
    with taddons.context(a) as tctx:
        with pytest.raises(exceptions.OptionsError, match="acl_denied_ips"):
            tctx.configure(a, acl_denied_ips=[bad])


def client(ip: str, spec: str = "regular") -> object:
    c = tflow.tclient_conn()
    c.peername = (ip, 40000)
    c.proxy_mode = mode_specs.ProxyMode.parse(spec)
    return c


def flow_from(c: object, method: bytes = b"GET") -> tflow.HTTPFlow:
    f = tflow.tflow()
    f.client_conn = c
    if method == b"CONNECT":
        f.request.method = "CONNECT"
    return f


def count(**labels: str) -> float:
    return metrics.REGISTRY.get_sample_value("policy_decisions_total", labels) or 0.0


def test_denied_client_gets_403_on_first_request_and_close() -> None:
    a = acl.Acl()
    with taddons.context(a) as tctx:
        tctx.configure(a, acl_denied_ips=["192.0.2.0/24"])
        ok, bad = client("198.51.100.1"), client("::ffff:192.0.2.7")
        a.client_connected(ok)
        a.client_connected(bad)
        assert not bad.error  # an HTTP listener: answered, not cut
        f = flow_from(ok)
        a.requestheaders(f)
        assert f.response is None
        before = count(policy="acl", decision="deny", rule="deny:192.0.2.0/24")
        f = flow_from(bad)
        a.requestheaders(f)
        assert f.response.status_code == 403
        assert json.loads(f.response.content)["error"]["code"] == "ACCESS_DENIED"
        assert f.response.headers["connection"] == "close"
        assert record(f)["rule"] == "deny:192.0.2.0/24"
        assert count(policy="acl", decision="deny", rule="deny:192.0.2.0/24") == before + 1
        c = flow_from(bad, b"CONNECT")
        a.http_connect(c)
        assert c.response.status_code == 403
        a.client_disconnected(bad)
        assert not a.refused


def test_non_http_listener_is_closed_at_connect() -> None:
    a = acl.Acl()
    with taddons.context(a) as tctx:
        tctx.configure(a, acl_allowed_ips=["10.0.0.0/8"])
        c = client("192.0.2.7", "reverse:tcp://127.0.0.1:9")
        a.client_connected(c)
        assert c.error
        c = client("192.0.2.7", "socks5")
        a.client_connected(c)
        assert c.error
        c = client("10.0.0.7", "reverse:tcp://127.0.0.1:9")
        a.client_connected(c)
        assert not c.error
        tctx.configure(a, acl_mode="shadow")
        before = count(policy="acl", decision="would_block", rule="allowlist")
        c = client("192.0.2.7", "reverse:tcp://127.0.0.1:9")
        a.client_connected(c)
        assert not c.error
        assert count(policy="acl", decision="would_block", rule="allowlist") == before + 1


def test_shadow_lets_through_and_reports_every_request(caplog: pytest.LogCaptureFixture) -> None:
    a = acl.Acl()
    with taddons.context(a) as tctx:
        tctx.configure(a, acl_allowed_ips=["10.0.0.0/8"], acl_mode="shadow")
        c = client("192.0.2.7")
        a.client_connected(c)
        with caplog.at_level(logging.WARNING, logger="waypost.audit"):
            for _ in range(2):
                f = flow_from(c)
                a.requestheaders(f)
                assert f.response is None
                assert record(f)["shadow"] == ["acl:allowlist"]
        assert [r.waypost["decision"] for r in caplog.records] == ["would_block"] * 2
        assert caplog.records[0].waypost["client_ip"] == "192.0.2.7"


def test_trusted_proxy_decides_per_request_on_x_forwarded_for() -> None:
    a = acl.Acl()
    fwd = forwarding.Forwarding()
    with taddons.context(a, fwd) as tctx:
        tctx.configure(fwd, forwarding_trusted_proxies=["10.0.0.0/8"])
        tctx.configure(a, acl_denied_ips=["203.0.113.0/24"])
        lb = client("10.1.1.1")
        a.client_connected(lb)
        assert lb.id in a.proxied
        f = flow_from(lb)
        f.request.headers["X-Forwarded-For"] = "203.0.113.9, 10.2.2.2"
        a.requestheaders(f)
        assert f.response.status_code == 403
        assert "connection" not in f.response.headers  # the proxy's connection serves others
        assert record(f)["client_ip"] == "203.0.113.9"
        f = flow_from(lb)
        f.request.headers["X-Forwarded-For"] = "198.51.100.4"
        a.requestheaders(f)
        assert f.response is None
        # From an untrusted peer the header means nothing.
        direct = client("198.51.100.5")
        a.client_connected(direct)
        f = flow_from(direct)
        f.request.headers["X-Forwarded-For"] = "203.0.113.9"
        a.requestheaders(f)
        assert f.response is None


def test_allowlist_takes_block_global_over_unless_set_explicitly() -> None:
    a = acl.Acl()
    with taddons.context(block.Block(), a) as tctx:
        assert tctx.options.block_global is True
        tctx.configure(a, acl_allowed_ips=["0.0.0.0/0"])
        assert tctx.options.block_global is False
        tctx.configure(a, acl_allowed_ips=[])
        assert tctx.options.block_global is True
        tctx.configure(a, acl_denied_ips=["10.0.0.0/8"])  # a denylist alone keeps it
        assert tctx.options.block_global is True
    a = acl.Acl()
    with taddons.context(block.Block(), a) as tctx:
        tctx.options.update(block_global=False)  # the operator's choice
        tctx.configure(a, acl_allowed_ips=["10.0.0.0/8"])
        tctx.configure(a, acl_allowed_ips=[])
        assert tctx.options.block_global is False


def test_refused_connect_is_shown_in_the_view_with_its_mark() -> None:
    a, v = acl.Acl(), view.View()
    with taddons.context(a, v) as tctx:
        tctx.configure(a, acl_denied_ips=["192.0.2.0/24"])
        bad = client("192.0.2.7")
        a.client_connected(bad)
        c = flow_from(bad, b"CONNECT")
        a.http_connect(c)
        a.http_connect_error(c)
        a.http_connect_error(c)  # once only
        assert list(v) == [c]
        assert c.marked == ":no_entry:"
        assert c.comment == "waypost acl deny rule=deny:192.0.2.0/24"
