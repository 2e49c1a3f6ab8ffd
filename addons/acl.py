"""IP access control lists: which clients may use the proxy at all, decided on their address.

The decision is made once per client connection, in `client_connected`, on the socket peer's
address (IPv4-mapped IPv6 such as `::ffff:10.0.0.1` counts as `10.0.0.1`, for addresses and
for the configured CIDRs alike):

- `acl_denied_ips` wins: a client in any of these networks is refused.
- `acl_allowed_ips`, when not empty, is an allowlist: a client in none of them is refused.

How a refused client is answered: its first request or CONNECT gets 403 ACCESS_DENIED (JSON,
with the request id and `Connection: close`) and the connection closes after it. That gives
the client and the operator something to read (and one audit event with a request id) at the
cost of parsing one request head, which the hygiene limits bound. Listeners that do not speak
HTTP (reverse `tcp`/`tls`/`udp`/`dns` modes, SOCKS, transparent, WireGuard) have nothing to
answer, so there the connection is closed at once.

Behind trusted proxies (`forwarding_trusted_proxies`, the profile's `security.trusted_proxies`)
one connection carries many clients: for a trusted peer the ACL is decided per request on the
client address derived from X-Forwarded-For / X-Real-IP (`kernel.net.client_ip`, the one the
forwarding headers and every log use), and a refusal answers that request only. From any other
peer those headers are ignored. The option is declared by `addons/kernel/net.py`, so it works
with this addon loaded alone.

`acl_mode` `shadow` lets refused clients through; every request they make is logged as
`would_block` and counted (`addons/policy.py`). Rule ids: `deny:<cidr>` (the matching entry
of acl_denied_ips) and `allowlist` (in none of acl_allowed_ips).

mitmproxy's `block_global` (on by default: clients with public addresses are refused before any
addon sees them) stays the coarse default while no allowlist is configured. A non-empty
`acl_allowed_ips` takes over: the addon turns `block_global` off, unless it was set
explicitly (to a non-default value) on the command line or in the profile's `mitmproxy:`
section, and turns it back on when the allowlist is emptied again.

A refused CONNECT (this addon's, any other policy's, mitmproxy's own 502) would not appear in
mitmweb: mitmproxy's flow view lists flows from `requestheaders`, which a CONNECT never reaches.
`http_connect_error` (called only for a non-2xx CONNECT answer) adds it to the view, and to
`save_stream_file` when set, with the mark and comment its refusal gave it.

Hooks: client_connected, client_disconnected, http_connect, requestheaders, http_connect_error.
Options: acl_allowed_ips, acl_denied_ips, acl_mode; forwarding_trusted_proxies (kernel/net.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from mitmproxy import connection, ctx, http
from mitmproxy.proxy import mode_specs

from addons import errors, policy
from addons.kernel import net
from addons.kernel.options import Option, declare

log = logging.getLogger("waypost.acl")

# Answers cached per client address (peer or X-Forwarded-For derived); cleared when full.
_CACHE_MAX = 4096
_HTTP_REVERSE_SCHEMES = frozenset({"http", "https", "http3"})


def verdict(ip: net.IPAddress | None, allowed: net.Networks, denied: net.Networks) -> str | None:
    """The rule refusing this client, or None if it may connect. Unparseable: refused when an
    allowlist exists (it cannot be shown to be in it), else allowed."""
    if ip is None:
        return "allowlist" if allowed else None
    if denied:
        hit = net.lookup(denied, ip)
        if hit is not None:
            return f"deny:{hit}"
    if allowed and net.lookup(allowed, ip) is None:
        return "allowlist"
    return None


def speaks_http(mode: mode_specs.ProxyMode) -> bool:
    """Can a refusal be answered with an HTTP response on a connection to this listener?"""
    if isinstance(mode, mode_specs.RegularMode | mode_specs.UpstreamMode):
        return True
    return isinstance(mode, mode_specs.ReverseMode) and mode.scheme in _HTTP_REVERSE_SCHEMES


OPTIONS: tuple[Option, ...] = (
    Option(
        "acl_allowed_ips",
        Sequence[str],
        [],
        "Client networks (CIDRs such as 10.0.0.0/8 or 2001:db8::/32) allowed to use the proxy; empty allows every client not in acl_denied_ips. A non-empty list also turns mitmproxy's block_global off unless that was set explicitly.",
    ),
    Option(
        "acl_denied_ips",
        Sequence[str],
        [],
        "Client networks (CIDRs) refused even when acl_allowed_ips contains them: the first request or CONNECT gets 403 ACCESS_DENIED and the connection closes (non-HTTP listeners: closed at once).",
    ),
    Option(
        "acl_mode",
        str,
        "enforce",
        "enforce: refuse clients outside the ACL. shadow: let them through, logging every request as would_block and counting it in policy_decisions_total.",
        policy.MODES,
    ),
)


class Acl:
    def __init__(self) -> None:
        self.allowed = net.NO_NETWORKS
        self.denied = net.NO_NETWORKS
        self.mode = "enforce"
        self._cache: dict[str, str | None] = {}
        # client.id -> the refusing rule, for connections whose requests must be refused (or,
        # in shadow mode, reported); client ids of trusted proxies, decided per request.
        self.refused: dict[str, str] = {}
        self.proxied: set[str] = set()
        self._block_global_set: bool | None = None

    def load(self, loader: object) -> None:
        net.load(loader)
        declare(loader, OPTIONS)

    def configure(self, updated: set[str]) -> None:
        net.configure(updated)
        opts = ctx.options
        for name, attr in (("acl_allowed_ips", "allowed"), ("acl_denied_ips", "denied")):
            if name in updated:
                setattr(self, attr, net.networks_option(name, getattr(opts, name)))
                self._cache = {}
        if "acl_mode" in updated:
            self.mode = opts.acl_mode
        if "acl_allowed_ips" in updated and "block_global" in opts:
            self._hand_over_block_global(bool(self.allowed))

    def _hand_over_block_global(self, acl_has_allowlist: bool) -> None:
        opts = ctx.options
        ours = self._block_global_set
        explicit = opts.has_changed("block_global") and opts.block_global != ours
        if explicit:
            return
        want = not acl_has_allowlist
        if opts.block_global != want and (ours is not None or not want):
            self._block_global_set = want
            opts.update(block_global=want)
            log.info(
                "block_global set to %s: acl_allowed_ips %s",
                want,
                "decides" if not want else "is empty",
            )

    def _rule_for(self, text: str) -> str | None:
        cache = self._cache
        if text in cache:
            return cache[text]
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        rule = cache[text] = verdict(
            net.parse_ip(text) if text else None, self.allowed, self.denied
        )
        return rule

    # --- connection: decide once ---

    def client_connected(self, client: connection.Client) -> None:
        if client.error or not (self.allowed or self.denied):
            return
        if net.trusted_peer(client):
            self.proxied.add(client.id)
            return
        peer = net.peer_ip(client)
        rule = self._rule_for(peer)
        if rule is None:
            return
        if not speaks_http(client.proxy_mode):
            # No request will come to answer or to report on: decide now.
            if policy.decide("acl", rule, peer, self.mode, decision="deny"):
                client.error = "Connection refused by the Waypost IP ACL."
            return
        self.refused[client.id] = rule

    def client_disconnected(self, client: connection.Client) -> None:
        self.refused.pop(client.id, None)
        self.proxied.discard(client.id)

    # --- requests: answer what the connection decided ---

    @errors.fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._check(flow)

    @errors.fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._check(flow)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        view = ctx.master.addons.get("view")
        if view is not None and flow not in view:
            view.add([flow])
        save = ctx.master.addons.get("save")
        if save is not None and save.stream:
            save.save_flow(flow)

    def _check(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        cid = flow.client_conn.id
        rule = self.refused.get(cid)
        if rule is not None:
            peer = net.peer_ip(flow.client_conn)
            if policy.decide("acl", rule, peer, self.mode, flow, decision="deny"):
                flow.response = errors.make(
                    "ACCESS_DENIED",
                    "Your address is not allowed to use this proxy.",
                    flow,
                    {"Connection": "close"},
                )
        elif cid in self.proxied:
            ip = net.client_ip(flow)
            rule = self._rule_for(ip)
            if rule is not None and policy.decide(
                "acl", rule, ip, self.mode, flow, decision="deny"
            ):
                flow.response = errors.make(
                    "ACCESS_DENIED", "Your address is not allowed to use this proxy.", flow
                )

    def explain(self, flow: http.HTTPFlow) -> dict[str, Any]:
        """POST /admin/explain: the ACL's verdict on the flow's client, read-only."""
        ip = net.client_ip(flow)
        rule = verdict(net.parse_ip(ip) if ip else None, self.allowed, self.denied)
        return policy.explained("acl", rule, self.mode, "deny", client_ip=ip)


addons = [Acl()]
