"""Addresses, CIDR lists, and the one client address every addon decides on and records.

- `parse_cidrs`, `parse_networks`, `networks_option`: a list of CIDRs (or single addresses) as
  networks or as a prefix index; `ValueError` (`OptionsError` naming the option) on a bad entry.
  IPv4-mapped IPv6 networks (`::ffff:10.0.0.0/104`) become IPv4 ones.
- `parse_ip`, `normalize_peer`: one address as written in a header or a socket peer, with
  IPv4-mapped IPv6 (`::ffff:10.0.0.1`) unwrapped to IPv4.
- `Networks`, `index`, `lookup`: the prefix index; a lookup costs one dict probe per distinct
  prefix length (at most 33 or 129), however many networks there are.
- `forwarded_client`: the pure X-Forwarded-For walk from the right, through trusted proxies.
- `load`, `configure`: declare `forwarding_trusted_proxies` (its one declaration) and parse it
  into the process's `TRUSTED`, once per change of the option.
- `peer_ip(client)`, `trusted_peer(client)`: a connection's peer, for connection-level hooks.
- `client_ip(flow)`: the client of a request, derived once per flow and recorded as
  `record(flow)["client_ip"]`.

Every addon that decides on or records the client address calls `load`/`configure`: declaring
the same option with the same signature again is a no-op in mitmproxy's loader, so the option
exists whichever of them is loaded alone (`-s addons/acl.py`), and all of them read the same
parsed list through `client_ip`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from mitmproxy import connection, ctx, exceptions, http

from addons.kernel.record import record

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Classified = tuple[str | None, bool]  # (canonical address or None, in a trusted network)

TRUSTED_PROXIES = "forwarding_trusted_proxies"
_TRUSTED_PROXIES_HELP = (
    "Proxies (IP addresses or CIDRs, e.g. 10.0.0.0/8) whose incoming X-Forwarded-For and "
    "X-Real-IP are believed. From any other peer these headers are replaced, and the "
    "client IP is the socket peer. Behind trusted proxies the client IP is the right-most "
    "X-Forwarded-For entry that is not itself a trusted proxy."
)
_CACHE_MAX = 4096


# --- parsing -----------------------------------------------------------------------------------


def parse_cidrs(entries: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs (or single addresses) to networks; raises ValueError naming the bad entry."""
    nets = []
    for entry in entries:
        try:
            net = ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError as e:
            raise ValueError(f"{entry!r} is not a CIDR or an IP address ({e})") from None
        nets.append(_unmap_network(net))
    return tuple(nets)


def _unmap_network(net: Network) -> Network:
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}")
    return net


def normalize_peer(ip: str) -> str:
    """A socket peer address as the client IP: IPv4-mapped IPv6 becomes IPv4."""
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip


def parse_ip(value: str) -> IPAddress | None:
    """One address as a peer, an X-Forwarded-For or X-Real-IP entry writes it, or None.

    Accepts `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]:80`; unmaps `::ffff:a.b.c.d`.
    """
    value = value.strip()
    if value.startswith("["):
        value = value[1 : value.find("]")] if "]" in value else ""
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


# --- the prefix index --------------------------------------------------------------------------


class Networks(NamedTuple):
    """CIDRs indexed for a lookup whose cost depends on the number of distinct prefix lengths
    (at most 33 or 129), not on the number of entries: per (version, prefix length) the set of
    network addresses as integers, and the configured text of each entry (a rule id)."""

    v4: tuple[tuple[int, dict[int, str]], ...]
    v6: tuple[tuple[int, dict[int, str]], ...]

    def __bool__(self) -> bool:
        return bool(self.v4 or self.v6)


NO_NETWORKS = Networks((), ())


def index(nets: Iterable[Network]) -> Networks:
    tables: dict[tuple[int, int], dict[int, str]] = {}
    for net in nets:
        bits = net.max_prefixlen - net.prefixlen
        key = (net.version, bits)
        tables.setdefault(key, {}).setdefault(int(net.network_address) >> bits, str(net))
    # Longest prefix first: the most specific entry names the rule.
    v4 = tuple(sorted(((b, t) for (v, b), t in tables.items() if v == 4), key=lambda x: x[0]))
    v6 = tuple(sorted(((b, t) for (v, b), t in tables.items() if v == 6), key=lambda x: x[0]))
    return Networks(v4, v6)


def parse_networks(entries: Iterable[str]) -> Networks:
    """CIDRs (or addresses) to an index; IPv4-mapped IPv6 networks become IPv4 ones.
    Raises ValueError naming the bad entry."""
    return index(parse_cidrs(entries))


def networks_option(option: str, entries: Iterable[str]) -> Networks:
    """`parse_networks` for an option's value; `OptionsError` naming the option otherwise."""
    try:
        return parse_networks(entries)
    except ValueError as e:
        raise exceptions.OptionsError(
            f"{option}: {e} (use CIDRs such as 10.0.0.0/8 or 2001:db8::/32)"
        ) from None


def lookup(nets: Networks, ip: IPAddress) -> str | None:
    """The entry (as configured) of the most specific network containing `ip`, or None."""
    value = int(ip)
    for bits, table in nets.v4 if ip.version == 4 else nets.v6:
        found = table.get(value >> bits)
        if found is not None:
            return found
    return None


# --- through trusted proxies -------------------------------------------------------------------


def classify(value: str, trusted: Networks) -> Classified:
    ip = parse_ip(value)
    return (None, False) if ip is None else (str(ip), lookup(trusted, ip) is not None)


def cached_classify(value: str, trusted: Networks, cache: dict[str, Classified]) -> Classified:
    """`classify` memoised in `cache` (bounded: cleared when full)."""
    found = cache.get(value)
    if found is None:
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        found = cache[value] = classify(value, trusted)
    return found


def forwarded_client(
    peer: str,
    xff: str | None,
    real_ip: str | None,
    trusted: Networks,
    cache: dict[str, Classified] | None = None,
) -> tuple[str, bool]:
    """The client IP and whether the direct peer is a trusted proxy.

    Behind trusted proxies the client is the right-most X-Forwarded-For hop that is not itself
    trusted (hops are appended left to right, so only the right end is vouched for). An entry
    that is not an address ends the walk at the last address we could believe. With no
    X-Forwarded-For, a trusted peer's X-Real-IP is believed. `cache` memoises parsing (the
    same few proxies and clients repeat; ipaddress parsing costs microseconds).
    """
    peer = normalize_peer(peer)
    if not trusted:
        return peer, False
    memo: dict[str, Classified] = {} if cache is None else cache
    peer_ip, peer_trusted = cached_classify(peer, trusted, memo)
    if peer_ip is None or not peer_trusted:
        return peer, False
    if xff:
        current = peer_ip
        for hop in reversed(xff.split(",")):
            ip, hop_trusted = cached_classify(hop.strip(), trusted, memo)
            if ip is None:
                break
            current = ip
            if not hop_trusted:
                break
        return current, True
    if real_ip and (ip := cached_classify(real_ip.strip(), trusted, memo)[0]) is not None:
        return ip, True
    return peer, True


class TrustedProxies:
    """`forwarding_trusted_proxies` as parsed, and what each address seen was found to be."""

    def __init__(self) -> None:
        self.entries: tuple[str, ...] = ()
        self.networks = NO_NETWORKS
        self.active = False
        self.seen: dict[str, Classified] = {}

    def update(self, entries: Iterable[str]) -> None:
        """Parse `entries` unless they are the ones parsed already; ValueError changes nothing."""
        entries = tuple(entries)
        if entries == self.entries:
            return
        self.networks = parse_networks(entries)
        self.entries = entries
        self.active = bool(self.networks)
        self.seen = {}

    def is_trusted(self, ip: str) -> bool:
        return self.active and cached_classify(ip, self.networks, self.seen)[1]


# One per process, like the option it is parsed from: every addon's client_ip reads it.
TRUSTED = TrustedProxies()


def load(loader: Any) -> None:
    """Declare `forwarding_trusted_proxies` and start from its current value (a new master, a
    test's context or a reloaded script, must not see the previous one's list)."""
    loader.add_option(TRUSTED_PROXIES, Sequence[str], [], _TRUSTED_PROXIES_HELP)
    try:
        TRUSTED.update(getattr(loader.master.options, TRUSTED_PROXIES))
    except ValueError:
        TRUSTED.update(())  # `configure` refuses the value with the option's name


def configure(updated: set[str]) -> None:
    if TRUSTED_PROXIES in updated:
        try:
            TRUSTED.update(getattr(ctx.options, TRUSTED_PROXIES))
        except ValueError as e:
            raise exceptions.OptionsError(
                f"{TRUSTED_PROXIES}: {e} (use addresses or CIDRs like 10.0.0.0/8)"
            ) from None


# --- connections and flows ---------------------------------------------------------------------


def peer_ip(client: connection.Client) -> str:
    """The connection's peer address (IPv4-mapped unwrapped), or "" when it has none."""
    peername = client.peername
    return normalize_peer(peername[0]) if peername else ""


def trusted_peer(client: connection.Client) -> bool:
    """Whether the connection's peer is one of `forwarding_trusted_proxies`."""
    return TRUSTED.active and TRUSTED.is_trusted(peer_ip(client))


def client_ip(flow: http.HTTPFlow) -> str:
    """The flow's client IP: the peer, or through trusted proxies the X-Forwarded-For /
    X-Real-IP client; "" when the connection has no peer. Derived once per flow and recorded
    as `record(flow)["client_ip"]` (read by the access log and the audit)."""
    meta = record(flow)
    ip = meta.get("client_ip")
    if ip is None:
        ip = meta["client_ip"] = _derive(flow)
    return ip  # type: ignore[no-any-return]


def _derive(flow: http.HTTPFlow) -> str:
    peer = peer_ip(flow.client_conn)
    trusted = TRUSTED
    if not trusted.is_trusted(peer):
        return peer
    xff: list[bytes] = []
    real: bytes | None = None
    for name, value in flow.request.data.headers.fields:  # one pass, no Headers lookups
        lname = name.lower()
        if lname == b"x-forwarded-for":
            xff.append(value)
        elif lname == b"x-real-ip" and real is None:
            real = value
    return forwarded_client(
        peer,
        b", ".join(xff).decode("latin-1") if xff else None,
        real.decode("latin-1") if real is not None else None,
        trusted.networks,
        trusted.seen,
    )[0]
