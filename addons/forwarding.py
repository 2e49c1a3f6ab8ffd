"""Forwarding headers: who the client is, which proxy passed the message, and its request id.

Request side (`requestheaders`, never for CONNECT):
- removes hop-by-hop fields before the origin (RFC 9110 §7.6.1): `Proxy-Authorization`,
  `Proxy-Connection`, `Keep-Alive`, `TE` (except `trailers`) and every field named in
  `Connection`; a websocket/upgrade handshake keeps `Upgrade` and `Connection: upgrade`, and
  the `close`/`keep-alive` options stay because mitmproxy reads them for the client connection;
- sets `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host`, `X-Real-IP`, trusting the
  incoming values only when the direct peer is in `forwarding_trusted_proxies`;
- appends `Via` (RFC 9110 §7.6.3) and sets `X-Request-ID` (`errors.request_id`).
The derived client IP is recorded as `record(flow)["client_ip"]` for logs and metrics.

Response side (`responseheaders`, and `response` for answers the proxy made itself): appends
`Via` to relayed responses, echoes `X-Request-ID`, sends `X-Proxy-ID`.

Options: forwarding_trusted_proxies, forwarding_x_forwarded, forwarding_via,
forwarding_request_id, forwarding_proxy_id.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

from mitmproxy import ctx, exceptions, http

from addons import errors
from addons.kernel.record import record

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# RFC 9110 §5.6.2 token: Via's pseudonym and our X-Proxy-ID must be one.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DEFAULT_PROXY_ID = "waypost"
_CACHE_MAX = 4096
# Set once a response got its headers, so `response` does not repeat `responseheaders`.
_RESPONSE_DONE = "waypost.forwarding.response"

# Always hop-by-hop, whether or not `Connection` names them (RFC 9110 §7.6.1; Proxy-Connection
# is the legacy pre-RFC form that browsers still send).
_ALWAYS_HOP = frozenset({b"proxy-authorization", b"proxy-connection", b"keep-alive"})
# Fields this addon writes itself; incoming copies are pulled out and rewritten.
_X_FORWARDED = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip"}
)
_VIA = frozenset({b"via"})
_REQUEST_ID = frozenset({b"x-request-id"})
_PROXY_ID = frozenset({b"x-proxy-id"})
# `Connection` options mitmproxy itself reads on the same Request object to decide whether to
# keep the client connection open (`http1.connection_close`), so they stay.
_KEPT_OPTIONS = frozenset({b"close", b"keep-alive"})
# Naming these in `Connection` would change the message's framing or target, not a hop's
# options: a client must not be able to strip them (request smuggling through our own hand).
_PROTECTED = frozenset({b"connection", b"host", b"content-length", b"transfer-encoding"})


# --- pure decisions ----------------------------------------------------------------------------


def parse_trusted(entries: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs (or single addresses) to networks; raises ValueError naming the bad entry."""
    nets = []
    for entry in entries:
        try:
            net = ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError as e:
            raise ValueError(f"{entry!r} is not an IP address or CIDR ({e})") from None
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


def parse_hop(value: str) -> IPAddress | None:
    """One X-Forwarded-For / X-Real-IP entry as an address, or None if it is not one.

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


def is_trusted(ip: IPAddress, trusted: Sequence[Network]) -> bool:
    return any(ip in net for net in trusted)


Classified = tuple[str | None, bool]  # (canonical address or None, in a trusted network)


def classify(value: str, trusted: Sequence[Network]) -> Classified:
    ip = parse_hop(value)
    return (None, False) if ip is None else (str(ip), is_trusted(ip, trusted))


def cached_classify(
    value: str, trusted: Sequence[Network], cache: dict[str, Classified] | None
) -> Classified:
    """`classify` memoised in `cache` (bounded: cleared when full)."""
    if cache is None:
        return classify(value, trusted)
    found = cache.get(value)
    if found is None:
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        found = cache[value] = classify(value, trusted)
    return found


def client_ip(
    peer: str,
    xff: str | None,
    real_ip: str | None,
    trusted: Sequence[Network],
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

    def lookup(value: str) -> Classified:
        return cached_classify(value, trusted, cache)

    peer_ip, peer_trusted = lookup(peer)
    if peer_ip is None or not peer_trusted:
        return peer, False
    if xff:
        current = peer_ip
        for hop in reversed(xff.split(",")):
            ip, hop_trusted = lookup(hop.strip())
            if ip is None:
                break
            current = ip
            if not hop_trusted:
                break
        return current, True
    if real_ip and (ip := lookup(real_ip.strip())[0]) is not None:
        return ip, True
    return peer, True


def flow_client_ip(
    flow: http.HTTPFlow, trusted: Sequence[Network], cache: dict[str, Classified] | None = None
) -> str:
    """The flow's client IP as Forwarding derives it, for policies that decide before Forwarding
    runs (ACL, rate limiting): the peer, or through trusted proxies the X-Forwarded-For /
    X-Real-IP client. Recorded as `record(flow)["client_ip"]` (read by the access log)."""
    meta = record(flow)
    ip = meta.get("client_ip")
    if ip is None:
        peer = flow.client_conn.peername[0] if flow.client_conn.peername else ""
        if trusted:
            xff: list[bytes] = []
            real: bytes | None = None
            for name, value in flow.request.data.headers.fields:  # one pass, no Headers lookups
                lname = name.lower()
                if lname == b"x-forwarded-for":
                    xff.append(value)
                elif lname == b"x-real-ip" and real is None:
                    real = value
            ip = client_ip(
                peer,
                b", ".join(xff).decode("latin-1") if xff else None,
                real.decode("latin-1") if real is not None else None,
                trusted,
                cache,
            )[0]
        else:
            ip = normalize_peer(peer)
        meta["client_ip"] = ip
    return ip


def via_value(http_version: str, proxy_id: str) -> str:
    """`Via` received-protocol and pseudonym: HTTP/1.1 -> `1.1 id`, HTTP/2.0 -> `2 id`."""
    version = http_version.partition("/")[2] or http_version
    if version in ("2.0", "3.0"):
        version = version[0]
    return f"{version} {proxy_id}"


Fields = tuple[tuple[bytes, bytes], ...]


def split_fields(
    fields: Fields, pull: frozenset[bytes] = frozenset()
) -> tuple[list[tuple[bytes, bytes]], dict[bytes, list[bytes]]]:
    """The request's fields without hop-by-hop ones (RFC 9110 §7.6.1), and the pulled-out values.

    Removes Proxy-Authorization, Proxy-Connection, Keep-Alive, TE (unless it offers trailers)
    and every field named in Connection, keeping what an upgrade handshake needs. Fields whose
    lower-cased name is in `pull` are removed too and returned by name, for the caller to
    rewrite. One pass instead of a Headers call per field: each of those scans every field.
    """
    options: list[bytes] = []
    upgrade = False
    for name, value in fields:
        lname = name.lower()
        if lname == b"connection":
            options.extend(t.strip().lower() for t in value.split(b","))
        elif lname == b"upgrade":
            upgrade = True
    drop = _ALWAYS_HOP
    kept_options: list[bytes] = []
    if options:
        listed = set()
        for option in options:
            if option in _KEPT_OPTIONS or (option == b"upgrade" and upgrade) or option == b"te":
                if option not in kept_options:
                    kept_options.append(option)
            elif option and option not in _PROTECTED:
                listed.add(option)
        drop = drop | listed
    kept: list[tuple[bytes, bytes]] = []
    pulled: dict[bytes, list[bytes]] = {}
    connection_at = -1
    te_kept = False
    for name, value in fields:
        lname = name.lower()
        if lname in drop:
            continue
        if lname in pull:
            pulled.setdefault(lname, []).append(value)
        elif lname == b"connection":
            if connection_at == -1:
                connection_at = len(kept)
                kept.append((name, b""))
        elif lname == b"te":
            # RFC 9110 §10.1.4: of TE, only `trailers` is meant for the next hop's peer.
            if not te_kept and any(
                t.strip().partition(b";")[0].lower() == b"trailers" for t in value.split(b",")
            ):
                te_kept = True
                kept.append((name, b"trailers"))
        else:
            kept.append((name, value))
    if connection_at != -1:
        if not te_kept and b"te" in kept_options:
            kept_options.remove(b"te")
        if kept_options:
            kept[connection_at] = (kept[connection_at][0], b", ".join(kept_options))
        else:
            del kept[connection_at]
    return kept, pulled


# --- addon ---------------------------------------------------------------------------------------


class Forwarding:
    def __init__(self) -> None:
        self.trusted: tuple[Network, ...] = ()
        self.hop_cache: dict[str, Classified] = {}
        self.proxy_id: str = _DEFAULT_PROXY_ID
        self.proxy_id_header: str = _DEFAULT_PROXY_ID
        self.x_forwarded = True
        self.via = True
        self.request_id = True
        self.via_values: dict[bytes, bytes] = {}
        self.pull: frozenset[bytes] = _X_FORWARDED | _VIA | _REQUEST_ID
        self.pull_response: frozenset[bytes] = _REQUEST_ID | _PROXY_ID

    def load(self, loader) -> None:
        loader.add_option(
            "forwarding_trusted_proxies",
            Sequence[str],
            [],
            "Proxies (IP addresses or CIDRs, e.g. 10.0.0.0/8) whose incoming X-Forwarded-For and "
            "X-Real-IP are believed. From any other peer these headers are replaced, and the "
            "client IP is the socket peer. Behind trusted proxies the client IP is the right-most "
            "X-Forwarded-For entry that is not itself a trusted proxy.",
        )
        loader.add_option(
            "forwarding_x_forwarded",
            bool,
            True,
            "Send X-Forwarded-For (the client IP appended; an incoming value kept only from a "
            "trusted proxy), X-Forwarded-Proto, X-Forwarded-Host and X-Real-IP (the client IP "
            "derived through trusted proxies) to the origin.",
        )
        loader.add_option(
            "forwarding_via",
            bool,
            True,
            "Append `Via: <version> <forwarding_proxy_id>` (RFC 9110 7.6.3) to requests sent to "
            "the origin and to the responses relayed back, with the protocol version of each "
            "message as received.",
        )
        loader.add_option(
            "forwarding_request_id",
            bool,
            True,
            "Send X-Request-ID to the origin and echo it on the response: a valid incoming one "
            "(up to 128 of A-Z a-z 0-9 . _ : -) is kept, otherwise a new UUID is made. The same "
            "id appears in the access log and in error bodies.",
        )
        loader.add_option(
            "forwarding_proxy_id",
            str,
            _DEFAULT_PROXY_ID,
            "The proxy's pseudonym (an HTTP token), used in Via and sent as X-Proxy-ID on "
            "responses. Empty disables X-Proxy-ID; Via then uses `waypost`.",
        )

    def configure(self, updated: set[str]) -> None:
        if "forwarding_trusted_proxies" in updated:
            try:
                self.trusted = parse_trusted(ctx.options.forwarding_trusted_proxies)
                self.hop_cache = {}
            except ValueError as e:
                raise exceptions.OptionsError(
                    f"forwarding_trusted_proxies: {e} (use addresses or CIDRs like 10.0.0.0/8)"
                ) from None
        if "forwarding_proxy_id" in updated:
            pid = ctx.options.forwarding_proxy_id
            if pid and not _TOKEN.fullmatch(pid):
                raise exceptions.OptionsError(
                    f"forwarding_proxy_id: {pid!r} is not an HTTP token "
                    "(use letters, digits and -._~!#$&'*+^`|, no spaces)"
                )
            self.proxy_id = pid or _DEFAULT_PROXY_ID
            self.proxy_id_header = pid
            self.via_values = {}
        # ctx.options lookups cost about a microsecond each; read them here, not per request.
        self.x_forwarded = ctx.options.forwarding_x_forwarded
        self.via = ctx.options.forwarding_via
        self.request_id = ctx.options.forwarding_request_id
        pull = set()
        if self.x_forwarded:
            pull |= _X_FORWARDED
        if self.via:
            pull |= _VIA
        if self.request_id:
            pull |= _REQUEST_ID
        self.pull = frozenset(pull)
        self.pull_response = frozenset(
            (_REQUEST_ID if self.request_id else set())
            | (_PROXY_ID if self.proxy_id_header else set())
        )

    def _via(self, http_version: bytes) -> bytes:
        value = self.via_values.get(http_version)
        if value is None:
            version = http_version.decode("ascii", "replace")
            value = self.via_values[http_version] = via_value(version, self.proxy_id).encode()
        return value

    def _client_ip(
        self, flow: http.HTTPFlow, fields: Iterable[tuple[bytes, bytes]], pulled: dict
    ) -> tuple[str, bool]:
        peer = flow.client_conn.peername[0] if flow.client_conn.peername else ""
        if not self.trusted:
            return normalize_peer(peer), False
        xff = pulled.get(b"x-forwarded-for") or _get(fields, b"x-forwarded-for")
        real = pulled.get(b"x-real-ip") or _get(fields, b"x-real-ip")
        return client_ip(
            peer,
            b", ".join(xff).decode("latin-1") if xff else None,
            real[0].decode("latin-1") if real else None,
            self.trusted,
            self.hop_cache,
        )

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.error or not flow.live or flow.websocket:
            return
        req = flow.request
        data = req.data
        if data.method == b"CONNECT":
            return
        if flow.response:
            # Answered by an earlier addon: nothing goes upstream, but its log line still
            # wants the client behind our trusted proxies.
            if self.trusted:
                ip = self._client_ip(flow, data.headers.fields, {})[0]
                record(flow)["client_ip"] = ip
            return
        if self.request_id:
            rid = errors.request_id(flow)  # reads an incoming X-Request-ID, so before the rewrite
        fields, pulled = split_fields(data.headers.fields, self.pull)
        hop = normalize_peer(flow.client_conn.peername[0] if flow.client_conn.peername else "")
        ip, from_trusted = self._client_ip(flow, fields, pulled)
        record(flow)["client_ip"] = ip
        if self.x_forwarded:
            incoming = pulled.get(b"x-forwarded-for") if from_trusted else None
            ours = hop.encode()
            fields.append((b"X-Forwarded-For", b", ".join([*incoming, ours]) if incoming else ours))
            proto = pulled.get(b"x-forwarded-proto") if from_trusted else None
            if not proto:
                # The scheme the client spoke, not the request's: in reverse mode mitmproxy has
                # already rewritten that to the backend's before this hook.
                proto = [b"https" if flow.client_conn.tls else b"http"]
            fields.append((b"X-Forwarded-Proto", proto[-1]))
            fwd_host = pulled.get(b"x-forwarded-host") if from_trusted else None
            if not fwd_host:
                # HTTP/2 has :authority instead of a Host field
                fwd_host = _get(fields, b"host") or [req.pretty_host.encode("utf-8", "replace")]
            fields.append((b"X-Forwarded-Host", fwd_host[-1]))
            fields.append((b"X-Real-IP", ip.encode()))
        if self.via:
            via = self._via(data.http_version)
            before = pulled.get(b"via")
            fields.append((b"Via", b", ".join([*before, via]) if before else via))
        if self.request_id:
            fields.append((b"X-Request-ID", rid.encode()))
        data.headers.fields = tuple(fields)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.error or not flow.live or flow.response is None:
            return
        if flow.request.data.method == b"CONNECT":
            return
        flow.metadata[_RESPONSE_DONE] = True
        # A response from the cache (set in `request`, so this hook runs for it too) carries
        # the Via it was first relayed with: appending ours again would record a second hop.
        via = self.via and not record(flow).get("cache_hit")
        self._response_headers(flow.response, flow, via)

    def response(self, flow: http.HTTPFlow) -> None:
        # Answers that never saw `responseheaders` (mitmproxy's own errors) get the ids but no
        # Via: Via records the hops a relayed message passed, and this one passed none.
        if flow.metadata.get(_RESPONSE_DONE) or flow.response is None or flow.websocket:
            return
        if flow.request.data.method == b"CONNECT":
            return
        self._response_headers(flow.response, flow, False)

    def _response_headers(self, resp: http.Response, flow: http.HTTPFlow, via: bool) -> None:
        pull = self.pull_response
        if not via and not pull:
            return
        if via:
            pull = pull | _VIA
        before: list[bytes] = []
        fields = []
        for field in resp.headers.fields:
            lname = field[0].lower()
            if lname in pull:
                if lname == b"via" and via:
                    before.append(field[1])
                continue
            fields.append(field)
        if via:
            value = self._via(resp.data.http_version)
            fields.append((b"Via", b", ".join([*before, value]) if before else value))
        if self.request_id:
            fields.append((b"X-Request-ID", errors.request_id(flow).encode()))
        if self.proxy_id_header:
            fields.append((b"X-Proxy-ID", self.proxy_id_header.encode()))
        resp.headers.fields = tuple(fields)


def _get(fields: Iterable[tuple[bytes, bytes]], lname: bytes) -> list[bytes]:
    return [v for k, v in fields if k.lower() == lname]


addons = [Forwarding()]
