"""Egress policy: which destinations the proxy may connect to.

A forward proxy that connects wherever a client asks is an SSRF machine: loopback services,
the cloud metadata endpoint (169.254.169.254), the internal network, our own management port.
This addon refuses those, deciding on the IP address that is actually dialled, not the name.

Hooks:
- `http_connect`: CONNECT port allow-list, then the destination check; 403 ACCESS_DENIED before
  mitmproxy opens any upstream connection.
- `requestheaders`: the destination check for plain-HTTP (and intercepted) requests; 403.
- `server_connect`: the last line of defence for every upstream connection. Resolves the name
  (cached), checks every address, and pins the connection to the checked IP so DNS rebinding
  between check and connect cannot work. A refused connection is killed: a request's gets
  502 JSON from the error path; a reverse listener's eager connect (no request yet) closes the
  client, as a backend refusing the connect does (`connection_strategy: lazy`, which profiles
  set, gets the 403 from `requestheaders` instead).
- Backends the operator configured in the router addon (`routing.rules`, `default_backend`)
  are exempt from `block_private` when dialled for a reverse listener or for a request the
  router routed (the router's `egress_exempt`); a forward client's own target never is.
- `server_connected` / `server_connect_error`: put the hostname back as `server.address` once the
  socket is open, so TLS SNI and certificate checks use the name and mitmproxy's per-client
  connection reuse (which matches on `address`) keeps working.
- `http_connect_error`: a CONNECT killed in `server_connect` answers 403 JSON instead of 502.

Flows the proxy reroutes to itself (the CLI addon sends `POST /cli/execute` on the proxy port to
its own loopback listener, marking the flow `record(flow)["local"] = "cli"`) pass, but only
to exactly that listener: `requestheaders` skips them and remembers (client, address), which
`server_connect` then lets through. Every other flow still finds the management port and the CLI
listener unreachable.

Options: `egress_connect_ports`, `egress_block_private`, `egress_allowed_networks`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from cachetools import TTLCache
from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.mode_specs import ReverseMode

from addons import errors
from addons.kernel import net
from addons.kernel.options import Option, declare
from addons.kernel.record import record

log = logging.getLogger("waypost.egress")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
PortRange = tuple[int, int]

DNS_CACHE_SECONDS = 30.0
DNS_FAILURE_CACHE_SECONDS = 5.0
DNS_TIMEOUT_SECONDS = 10.0
DNS_CACHE_SIZE = 4096
LITERAL_CACHE_SIZE = 4096

# The marker in `server.error` that tells `http_connect_error` the kill was ours.
KILL_PREFIX = "Waypost egress policy refused the connection"

_WILDCARD_BINDS = frozenset({"", "*", "0.0.0.0", "::"})


# --- address classification ------------------------------------------------------------------


def _table(entries: Iterable[tuple[str, str]]) -> tuple[tuple[int, int, str], ...]:
    out = []
    for cidr, label in entries:
        net = ipaddress.ip_network(cidr)
        out.append((int(net.network_address), int(net.broadcast_address), label))
    return tuple(out)


# IANA special-purpose registries (RFC 6890 and successors). Explicit tables rather than
# ipaddress' is_private/is_global, whose definitions changed between Python patch releases.
_V4_BLOCKED = _table(
    [
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "cgnat"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link_local"),  # includes the cloud metadata address
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "reserved"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # includes 255.255.255.255
    ]
)
_V6_BLOCKED = _table(
    [
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("2001:2::/48", "benchmarking"),
        ("2001:10::/28", "reserved"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("fc00::/7", "unique_local"),
        ("fe80::/10", "link_local"),
        ("fec0::/10", "site_local"),
        ("ff00::/8", "multicast"),
    ]
)
_V6_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
_V6_GLOBAL_FIRST = int(_V6_GLOBAL_UNICAST.network_address)
_V6_GLOBAL_LAST = int(_V6_GLOBAL_UNICAST.broadcast_address)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_FIRST = int(_NAT64.network_address)
_NAT64_LAST = int(_NAT64.broadcast_address)


def _lookup(table: tuple[tuple[int, int, str], ...], value: int) -> str | None:
    for first, last, label in table:
        if first <= value <= last:
            return label
    return None


def embedded_v4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address really reaches: v4-mapped, NAT64 (64:ff9b::/96), 6to4."""
    if ip.version == 4:
        return None
    assert isinstance(ip, ipaddress.IPv6Address)
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    value = int(ip)
    if _NAT64_FIRST <= value <= _NAT64_LAST:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    return ip.sixtofour


def classify(ip: IPAddress) -> str | None:
    """Why `ip` is not a public unicast destination ("loopback", "private", ...), or None."""
    value = int(ip)
    if ip.version == 4:
        return _lookup(_V4_BLOCKED, value)
    v4 = embedded_v4(ip)
    if v4 is not None:
        label = _lookup(_V4_BLOCKED, int(v4))
        return f"{label} ({v4} embedded in IPv6)" if label else None
    label = _lookup(_V6_BLOCKED, value)
    if label:
        return label
    if not _V6_GLOBAL_FIRST <= value <= _V6_GLOBAL_LAST:
        return "reserved"  # outside 2000::/3: IPv4-compatible, discard-only, NAT64 local-use...
    return None


def in_networks(nets: net.Networks, ip: IPAddress) -> bool:
    """Whether `ip`, or the IPv4 address it embeds, lies in one of `nets`."""
    if not nets:
        return False
    if net.lookup(nets, ip) is not None:
        return True
    v4 = embedded_v4(ip)
    return v4 is not None and net.lookup(nets, v4) is not None


# --- ports ------------------------------------------------------------------------------------


def parse_port_spec(spec: str) -> PortRange:
    """`443` or `8000-8999` as an inclusive range; ValueError says what is wrong."""
    text = spec.strip()
    lo_text, sep, hi_text = text.partition("-")
    try:
        lo = int(lo_text)
        hi = int(hi_text) if sep else lo
    except ValueError:
        raise ValueError(f"{spec!r} is not a port or a port range such as 8000-8999") from None
    if not (1 <= lo <= 65535 and 1 <= hi <= 65535):
        raise ValueError(f"{spec!r}: ports must be between 1 and 65535")
    if lo > hi:
        raise ValueError(f"{spec!r}: the range start is greater than its end")
    return lo, hi


def port_allowed(ranges: Sequence[PortRange], port: int) -> bool:
    return any(lo <= port <= hi for lo, hi in ranges)


# --- the decision ----------------------------------------------------------------------------


# What the operator can change, named in the refusal's body (never the resolved address, which
# stays in the log: the client should not learn how names resolve inside the network).
HINTS = {
    "block_private": "private, loopback and link-local destinations are refused; the proxy's "
    "operator can allow a network with security.egress.allowed_networks "
    "(egress_allowed_networks), e.g. 127.0.0.1/32 for a local origin",
    "connect_ports": "CONNECT is allowed to the ports in security.egress.connect_ports "
    "(egress_connect_ports) only",
    "management_port": "the proxy's management app is never reachable through the proxy",
}


class Verdict(NamedTuple):
    rule: str  # "block_private" | "management_port"
    reason: str  # for logs and `server.error`; never sent to the client
    ip: str


def parse_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def hits_management(
    ip: IPAddress,
    port: int,
    listen_addrs: Iterable[tuple[str, int]],
    is_local: Callable[[IPAddress], bool],
) -> bool:
    """Whether connecting to ip:port could reach a socket the management app listens on."""
    target = embedded_v4(ip) or ip
    for listen_host, listen_port, *_ in listen_addrs:
        if listen_port != port:
            continue
        if listen_host in _WILDCARD_BINDS:
            if is_local(target):
                return True
            continue
        if target.is_unspecified:  # connect(0.0.0.0) reaches a local listener on Linux
            return True
        if listen_host == "localhost":
            if target.is_loopback:
                return True
            continue
        bound = parse_ip(listen_host.partition("%")[0])
        if bound is not None and (embedded_v4(bound) or bound) == target:
            return True
    return False


def check(
    ips: Sequence[IPAddress],
    port: int,
    *,
    block_private: bool,
    allowed: net.Networks,
    listen_addrs: Sequence[tuple[str, int]],
    is_local: Callable[[IPAddress], bool],
) -> Verdict | None:
    """The first reason to refuse any of `ips` on `port`, or None when all are acceptable."""
    for ip in ips:
        if listen_addrs and hits_management(ip, port, listen_addrs, is_local):
            return Verdict("management_port", f"{ip} port {port} is the management app", str(ip))
        if block_private:
            label = classify(ip)
            if label is not None and not in_networks(allowed, ip):
                return Verdict("block_private", f"{ip} is {label}", str(ip))
    return None


def normalise_host(host: str) -> str:
    return host.lower().rstrip(".")


def is_local_address(ip: IPAddress) -> bool:
    """Whether `ip` belongs to this machine: loopback, unspecified, or bindable (an interface's)."""
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((str(ip), 0))
    except OSError:
        return False
    return True


class ResolveError(Exception):
    pass


# --- the addon -------------------------------------------------------------------------------


OPTIONS: tuple[Option, ...] = (
    Option(
        "egress_connect_ports",
        Sequence[str],
        ["443"],
        "Ports a CONNECT tunnel may reach: each entry a port (443) or an inclusive range "
        "(8000-8999). A CONNECT to any other port is answered 403 ACCESS_DENIED before any "
        "upstream connection is made. Plain-HTTP requests are not limited by this option.",
    ),
    Option(
        "egress_block_private",
        bool,
        True,
        "Refuse destinations that are not public unicast addresses: loopback, RFC 1918 "
        "private, link-local (including the 169.254.169.254 cloud metadata address), CGNAT "
        "100.64.0.0/10, IPv6 unique-local fc00::/7, unspecified, multicast, documentation and "
        "reserved ranges, and IPv4-mapped, NAT64 and 6to4 forms of those. The decision is "
        "made on every address a name resolves to, and the connection is pinned to the "
        "checked address, so DNS rebinding cannot bypass it. Refusals answer 403 "
        "ACCESS_DENIED.",
    ),
    Option(
        "egress_allowed_networks",
        Sequence[str],
        [],
        "CIDR networks (e.g. 10.20.0.0/16, fd00::/8) exempt from egress_block_private, for "
        "internal services the proxy is meant to reach. The management app's own listen "
        "address stays unreachable through the proxy whatever this option says.",
    ),
)


class Egress:
    def __init__(self) -> None:
        self.connect_ports: tuple[PortRange, ...] = ((443, 443),)
        self.block_private = True
        self.allowed = net.NO_NETWORKS
        self._dns: TTLCache[str, tuple[IPAddress, ...]] = TTLCache(
            DNS_CACHE_SIZE, DNS_CACHE_SECONDS
        )
        self._dns_failures: TTLCache[str, str] = TTLCache(DNS_CACHE_SIZE, DNS_FAILURE_CACHE_SECONDS)
        self._literals: dict[str, tuple[IPAddress]] = {}
        self._inflight: dict[str, asyncio.Future[tuple[IPAddress, ...]]] = {}
        # Whether an address is this machine's; expiring, as interfaces come and go.
        self._local_ips: TTLCache[IPAddress, bool] = TTLCache(1024, 60)
        # server.id -> the (host, port) the connection was asked for, while it is pinned to an IP
        self._pinned: dict[str, tuple[str, int]] = {}
        # server.id -> verdict, for CONNECTs killed in server_connect (read by http_connect_error)
        self._killed: TTLCache[str, Verdict] = TTLCache(1024, 60)
        # (client.id, (host, port)) a CLI-marked flow was rerouted to, for server_connect
        self._local: TTLCache[tuple[str, tuple[str, int]], bool] = TTLCache(1024, 60)

    def load(self, loader: object) -> None:
        declare(loader, OPTIONS)

    def configure(self, updated: set[str]) -> None:
        if "egress_connect_ports" in updated:
            try:
                self.connect_ports = tuple(
                    parse_port_spec(s) for s in ctx.options.egress_connect_ports
                )
            except ValueError as e:
                raise exceptions.OptionsError(
                    f"egress_connect_ports: {e} (use entries such as 443 or 8000-8999)"
                ) from None
        if "egress_block_private" in updated:
            self.block_private = ctx.options.egress_block_private
        if "egress_allowed_networks" in updated:
            self.allowed = net.networks_option(
                "egress_allowed_networks", ctx.options.egress_allowed_networks
            )

    # --- resolution ---

    async def resolve(self, host: str) -> tuple[IPAddress, ...]:
        """The addresses `host` (normalised) stands for: itself if an IP literal, else DNS."""
        literal = self._literals.get(host)
        if literal is not None:
            return literal
        cached = self._dns.get(host)
        if cached is not None:
            return cached
        ip = parse_ip(host)
        if ip is not None:
            # ipaddress parsing costs several µs; remember the literals seen (bounded).
            if len(self._literals) >= LITERAL_CACHE_SIZE:
                self._literals.clear()
            literal = self._literals[host] = (ip,)
            return literal
        failure = self._dns_failures.get(host)
        if failure is not None:
            raise ResolveError(failure)
        fut = self._inflight.get(host)
        if fut is None:
            fut = asyncio.ensure_future(self._lookup(host))
            self._inflight[host] = fut
            fut.add_done_callback(lambda _: self._inflight.pop(host, None))
        return await asyncio.shield(fut)

    async def _lookup(self, host: str) -> tuple[IPAddress, ...]:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), DNS_TIMEOUT_SECONDS
            )
            ips = tuple(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
            if not ips:
                raise OSError("no addresses")
        except (OSError, TimeoutError, UnicodeError, ValueError) as e:
            reason = str(e) or type(e).__name__
            self._dns_failures[host] = reason
            raise ResolveError(reason) from None
        self._dns[host] = ips
        return ips

    def _is_local(self, ip: IPAddress) -> bool:
        known = self._local_ips.get(ip)
        if known is None:
            known = self._local_ips[ip] = is_local_address(ip)
        return known

    def _verdict(
        self, ips: Sequence[IPAddress], port: int, operator_backend: bool = False
    ) -> Verdict | None:
        return check(
            ips,
            port,
            block_private=self.block_private and not operator_backend,
            allowed=self.allowed,
            listen_addrs=_management_addrs(),
            is_local=self._is_local,
        )

    # --- flow hooks: early 403s ---

    @errors.fail_closed
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        port = flow.request.port
        if not port_allowed(self.connect_ports, port):
            self._deny(
                flow, "connect_ports", f"port {port} is not allowed", f"CONNECT to port {port}"
            )
            return
        await self._check_flow(flow)

    @errors.fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or flow.request.method == "CONNECT":
            return
        target = (flow.request.host, flow.request.port)
        if record(flow).get("local") == "cli" and target in _cli_addrs():
            self._local[(flow.client_conn.id, target)] = True
            return
        await self._check_flow(flow)

    async def _check_flow(self, flow: http.HTTPFlow) -> None:
        host = normalise_host(flow.request.host)
        try:
            ips = await self.resolve(host)
        except ResolveError:
            return  # server_connect refuses to dial an unresolvable name; mitmproxy says 502
        # On a reverse listener the target is the operator's, not the client's: a configured
        # backend may be private. A forward client's own target is never exempt.
        exempt = isinstance(flow.client_conn.proxy_mode, ReverseMode) and _operator_backend(
            flow.client_conn, (host, flow.request.port)
        )
        verdict = self._verdict(ips, flow.request.port, exempt)
        if verdict is not None:
            self._deny(flow, verdict.rule, verdict.reason, "this destination")

    def _deny(self, flow: http.HTTPFlow, rule: str, reason: str, what: str) -> None:
        meta = record(flow)
        meta["decision"] = "blocked"
        meta["blocked_by"] = "egress"
        meta["rule"] = rule
        flow.response = errors.make(
            "ACCESS_DENIED",
            f"The proxy's egress policy does not allow {what}.",
            flow,
            details={"rule": rule, "hint": HINTS[rule]},
        )
        log.warning(
            "egress blocked rule=%s client=%s target=%r reason=%s",
            rule,
            net.client_ip(flow) or "-",
            f"{flow.request.host}:{flow.request.port}",
            reason,
        )

    # --- connection hooks: the last line of defence and the IP pin ---

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        server = data.server
        if server.error or not server.address:
            return
        try:
            await self._pin(data)
        except Exception:
            log.exception("egress check failed; refusing the connection")
            server.error = f"{KILL_PREFIX} (internal error)"
        if server.error:
            # A reverse listener's eager connect (mitmproxy's default strategy) is opened before
            # the client's connection task first runs; refused without a pause, mitmproxy 11
            # cancels that task before it starts and never closes the client's socket. One
            # pass of the event loop lets it start, so the client is closed as for a backend
            # that refuses the connect.
            await asyncio.sleep(0)

    async def _pin(self, data: server_hooks.ServerConnectionHookData) -> None:
        server = data.server
        assert server.address is not None
        host, port = server.address[0], server.address[1]
        if (data.client.id, (host, port)) in self._local and (host, port) in _cli_addrs():
            return  # the CLI reroute of this client's own marked flow
        name = normalise_host(host)
        try:
            ips = await self.resolve(name)
        except ResolveError as e:
            # Never let mitmproxy resolve the name again itself: that answer would be unchecked.
            server.error = f"Cannot resolve {name}: {e}"
            return
        verdict = self._verdict(ips, port, _operator_backend(data.client, (name, port)))
        if verdict is not None:
            self._kill(data, verdict)
            return
        ip = str(ips[0])
        if ip != host:
            self._pinned[server.id] = (host, port)
            server.address = (ip, port)

    def _kill(self, data: server_hooks.ServerConnectionHookData, verdict: Verdict) -> None:
        server = data.server
        assert server.address is not None
        # mitmproxy shows this text to the client (in its 502 page): the rule, not the IP.
        server.error = f"{KILL_PREFIX} ({verdict.rule})"
        self._killed[server.id] = verdict
        log.warning(
            "egress killed connection rule=%s client=%s target=%r reason=%s",
            verdict.rule,
            net.peer_ip(data.client) or "-",
            f"{server.address[0]}:{server.address[1]}",
            verdict.reason,
        )

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        original = self._pinned.pop(data.server.id, None)
        if original is not None:
            # Server.__setattr__ refuses to change the address of an open connection; the socket
            # is already connected to the checked IP (server.peername), so the name only serves
            # SNI, certificate checks and connection reuse from here on.
            object.__setattr__(data.server, "address", original)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        original = self._pinned.pop(data.server.id, None)
        if original is not None:
            data.server.address = original

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        verdict = self._killed.pop(flow.server_conn.id, None)
        if verdict is not None and flow.response is not None and flow.response.status_code == 502:
            self._deny(flow, verdict.rule, verdict.reason, "this destination")

    def explain(self, flow: http.HTTPFlow) -> dict[str, object]:
        """POST /admin/explain: port and destination checks, read-only and without DNS: a name
        is judged on the addresses in this process's DNS cache, else "resolved at request
        time" (explaining must not wait on, or be a way to trigger, lookups)."""
        req = flow.request
        found: dict[str, object] = {"addon": "egress", "host": req.host, "port": req.port}
        if req.method == "CONNECT" and not port_allowed(self.connect_ports, req.port):
            why = f"port {req.port} is not allowed"
            return found | {
                "decision": "block",
                "rule": "connect_ports",
                "refuses": True,
                "reason": why,
            }
        host = normalise_host(req.host)
        ip = parse_ip(host)
        ips = (ip,) if ip is not None else self._dns.get(host)
        if ips is None:
            return found | {"decision": "resolved at request time"}
        exempt = isinstance(flow.client_conn.proxy_mode, ReverseMode) and _operator_backend(
            flow.client_conn, (host, req.port)
        )
        verdict = self._verdict(ips, req.port, exempt)
        found["addresses"] = [str(a) for a in ips]
        if verdict is None:
            return found | {"decision": "allow"}
        refusal = {"rule": verdict.rule, "refuses": True, "reason": verdict.reason}
        return found | {"decision": "block"} | refusal


def _management_addrs() -> Sequence[tuple[str, int]]:
    """The management app's listen addresses and the CLI's internal one: never reachable
    through the proxy (except by the CLI's own marked flows)."""
    try:
        management = ctx.master.addons.get("management")
    except AttributeError:  # no master outside a running proxy
        return ()
    addrs = getattr(management, "listen_addrs", None) or []
    return [*addrs, *_cli_addrs()]


def _cli_addrs() -> Sequence[tuple[str, int]]:
    try:
        cli = ctx.master.addons.get("cli")
    except AttributeError:
        return ()
    return getattr(cli, "listen_addrs", None) or ()


def _operator_backend(client: connection.Client, address: tuple[str, int]) -> bool:
    """Whether the router addon (if loaded) says `address` is a backend the operator configured
    for this client's request: those are exempt from block_private (the management port
    check still applies)."""
    try:
        router = ctx.master.addons.get("router")
    except AttributeError:  # no master outside a running proxy
        return False
    exempt = getattr(router, "egress_exempt", None)
    return bool(exempt(client, address)) if exempt is not None else False


addons = [Egress()]
