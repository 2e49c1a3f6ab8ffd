"""Forwarding headers: who the client is, which proxy passed the message, and its request id.

Request side (`requestheaders`, never for CONNECT):
- removes hop-by-hop fields before the origin (RFC 9110 §7.6.1): `Proxy-Authorization`,
  `Proxy-Connection`, `Keep-Alive`, `TE` (except `trailers`) and every field named in
  `Connection`; a websocket/upgrade handshake keeps `Upgrade` and `Connection: upgrade`, and
  the `close`/`keep-alive` options stay because mitmproxy reads them for the client connection;
- sets `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host`, `X-Real-IP`, trusting the
  incoming values only when the direct peer is in `forwarding_trusted_proxies`;
- appends `Via` (RFC 9110 §7.6.3) and sets `X-Request-ID` (`errors.request_id`).
The client IP is `kernel.net.client_ip(flow)`, the one every policy decides on; it is recorded
as `record(flow)["client_ip"]` for logs and metrics.

Response side (`responseheaders`, and `response` for answers the proxy made itself): appends
`Via` to relayed responses, echoes `X-Request-ID`, sends `X-Proxy-ID`.

Options: forwarding_trusted_proxies (declared and parsed by `addons/kernel/net.py`, which every
addon reading the client address loads), forwarding_x_forwarded, forwarding_via,
forwarding_request_id, forwarding_proxy_id.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from mitmproxy import connection, ctx, exceptions, http

from addons import errors
from addons.kernel import net
from addons.kernel.options import Option, declare
from addons.kernel.record import record

# RFC 9110 §5.6.2 token: Via's pseudonym and our X-Proxy-ID must be one.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DEFAULT_PROXY_ID = "waypost"
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

OPTIONS: tuple[Option, ...] = (
    Option(
        "forwarding_x_forwarded",
        bool,
        True,
        "Send X-Forwarded-For (the client IP appended; an incoming value kept only from a "
        "trusted proxy), X-Forwarded-Proto, X-Forwarded-Host and X-Real-IP (the client IP "
        "derived through trusted proxies) to the origin.",
    ),
    Option(
        "forwarding_via",
        bool,
        True,
        "Append `Via: <version> <forwarding_proxy_id>` (RFC 9110 7.6.3) to requests sent to "
        "the origin and to the responses relayed back, with the protocol version of each "
        "message as received.",
    ),
    Option(
        "forwarding_request_id",
        bool,
        True,
        "Send X-Request-ID to the origin and echo it on the response: a valid incoming one "
        "(up to 128 of A-Z a-z 0-9 . _ : -) is kept, otherwise a new UUID is made. The same "
        "id appears in the access log and in error bodies.",
    ),
    Option(
        "forwarding_proxy_id",
        str,
        _DEFAULT_PROXY_ID,
        "The proxy's pseudonym (an HTTP token), used in Via and sent as X-Proxy-ID on "
        "responses. Empty disables X-Proxy-ID; Via then uses `waypost`.",
    ),
)


# --- pure decisions ----------------------------------------------------------------------------


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
        self.proxy_id: str = _DEFAULT_PROXY_ID
        self.proxy_id_header: str = _DEFAULT_PROXY_ID
        self.x_forwarded = True
        self.via = True
        self.request_id = True
        self.via_values: dict[bytes, bytes] = {}
        self.pull: frozenset[bytes] = _X_FORWARDED | _VIA | _REQUEST_ID
        self.pull_response: frozenset[bytes] = _REQUEST_ID | _PROXY_ID

    def load(self, loader: Any) -> None:
        net.load(loader)
        declare(loader, OPTIONS)

    def configure(self, updated: set[str]) -> None:
        net.configure(updated)
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

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.error or not flow.live or flow.websocket:
            return
        req = flow.request
        data = req.data
        if data.method == b"CONNECT":
            return
        # Derived (and recorded for the log) from the incoming headers, so before the rewrite.
        ip = net.client_ip(flow)
        if flow.response:
            return  # answered by an earlier addon: nothing goes upstream
        if self.request_id:
            rid = errors.request_id(flow)  # reads an incoming X-Request-ID, so before the rewrite
        fields, pulled = split_fields(data.headers.fields, self.pull)
        if self.x_forwarded:
            _append_x_forwarded(fields, pulled, flow.client_conn, req, ip)
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


def _append_x_forwarded(
    fields: list[tuple[bytes, bytes]],
    pulled: dict[bytes, list[bytes]],
    client: connection.Client,
    req: http.Request,
    ip: str,
) -> None:
    """X-Forwarded-For/-Proto/-Host and X-Real-IP for the request going to the origin: the
    incoming values (pulled out by `split_fields`) count only from a trusted proxy."""
    from_trusted = net.trusted_peer(client)
    incoming = pulled.get(b"x-forwarded-for") if from_trusted else None
    ours = net.peer_ip(client).encode()
    fields.append((b"X-Forwarded-For", b", ".join([*incoming, ours]) if incoming else ours))
    proto = pulled.get(b"x-forwarded-proto") if from_trusted else None
    if not proto:
        # The scheme the client spoke, not the request's: in reverse mode mitmproxy has
        # already rewritten that to the backend's before this hook.
        proto = [b"https" if client.tls else b"http"]
    fields.append((b"X-Forwarded-Proto", proto[-1]))
    fwd_host = pulled.get(b"x-forwarded-host") if from_trusted else None
    if not fwd_host:
        # HTTP/2 has :authority instead of a Host field
        fwd_host = _get(fields, b"host") or [req.pretty_host.encode("utf-8", "replace")]
    fields.append((b"X-Forwarded-Host", fwd_host[-1]))
    fields.append((b"X-Real-IP", ip.encode()))


def _get(fields: Iterable[tuple[bytes, bytes]], lname: bytes) -> list[bytes]:
    return [v for k, v in fields if k.lower() == lname]


addons = [Forwarding()]
