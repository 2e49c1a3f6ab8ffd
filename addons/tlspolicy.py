"""TLS policy: pass HTTPS tunnels through untouched unless the host is opted into interception.

Passed-through tunnels are relayed byte for byte: the client sees the origin's own certificate
and the proxy sees only the CONNECT. Intercepted hosts get mitmproxy's certificate (clients must
trust its CA) and the HTTP-level addons see their requests.

Hooks:
- `http_connect`: remembers the CONNECT flow of the tunnel, so the decision can be recorded on it
  (`flow.metadata["waypost"]["tls"] = "passthrough" | "intercept" | "tcp"`).
- `next_layer`: a tunnel whose client speaks first with bytes that cannot start a TLS record
  (SSH, SMTP, anything) is relayed as raw TCP, byte for byte, unless its CONNECT host is
  intercepted (then mitmproxy decides, and HTTP inside is policed); so is a tunnel whose server
  speaks first (an SMTP or SSH banner, read by the eager connect) while the client is silent.
- `tls_clienthello`: matches the SNI (falling back to the CONNECT host) against the patterns and
  sets `ignore_connection` for every host that is not intercepted. Not on reverse listeners,
  which terminate TLS themselves.

Options: `tls_intercept_hosts`.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence

from mitmproxy import ctx, exceptions, http, tls
from mitmproxy.proxy import layer, mode_specs
from mitmproxy.proxy.layers import HttpLayer, TCPLayer

from addons.kernel import hosts
from addons.kernel.options import Option, declare
from addons.kernel.record import record

log = logging.getLogger("waypost.tlspolicy")


OPTIONS: tuple[Option, ...] = (
    Option(
        "tls_intercept_hosts",
        Sequence[str],
        [],
        "Hosts whose HTTPS is intercepted (decrypted with the mitmproxy CA, which clients "
        "must trust) so the HTTP-level policies apply to it: exact names (api.example.com), "
        "*.corp.example for every subdomain of corp.example (not corp.example itself; list "
        "it too if wanted), or * for everything. Matched against the TLS SNI, else the "
        "CONNECT host. All other TLS is passed through untouched: the client sees the "
        "origin's own certificate and only the CONNECT is visible to the proxy.",
    ),
)


class TlsPolicy:
    def __init__(self) -> None:
        self.patterns: hosts.HostIndex[str] = hosts.HostIndex()
        # server connection id -> the CONNECT flow that opened the tunnel
        self._connects: weakref.WeakValueDictionary[str, http.HTTPFlow] = (
            weakref.WeakValueDictionary()
        )

    def load(self, loader: object) -> None:
        declare(loader, OPTIONS)

    def configure(self, updated: set[str]) -> None:
        if "tls_intercept_hosts" in updated:
            try:
                self.patterns = hosts.build_index(
                    hosts.parse_patterns(ctx.options.tls_intercept_hosts, star=True)
                )
            except ValueError as e:
                raise exceptions.OptionsError(f"tls_intercept_hosts: {e}") from None

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        self._connects[flow.server_conn.id] = flow

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if nextlayer.layer is not None:
            return
        context = nextlayer.context
        # Only the bytes straight inside a CONNECT tunnel: the HTTP layer beneath, a target, and
        # no TLS terminated yet (decrypted bytes of an intercepted tunnel are mitmproxy's).
        if (
            context.server.address is None
            or context.client.transport_protocol != "tcp"
            or context.client.tls
            or isinstance(context.client.proxy_mode, mode_specs.ReverseMode)
            or not any(isinstance(lay, HttpLayer) for lay in context.layers)
        ):
            return
        data = nextlayer.data_client()
        server_first = not data and nextlayer.data_server()  # a banner: TLS clients speak first
        if could_start_tls(data) and not server_first:
            return  # tls_clienthello decides, or next_layer is asked again with more bytes
        host = context.server.address[0]
        if self.patterns.match(hosts.host_key(host)) is not None:
            return  # intercepted: mitmproxy parses what is inside, and the HTTP policies apply
        # As Squid relays a CONNECT: the tunnel is opaque. The CONNECT itself was policed (the
        # port allow-list, the domain filter on its authority); mitmproxy would otherwise parse
        # anything with a space in its first line as HTTP and answer it 400.
        nextlayer.layer = TCPLayer(context)
        flow = self._connects.pop(context.server.id, None)
        if flow is not None:
            record(flow)["tls"] = "tcp"

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if data.ignore_connection:
            return
        if isinstance(data.context.client.proxy_mode, mode_specs.ReverseMode):
            # A reverse listener is the TLS endpoint itself (addons/tlslistener.py): passing
            # its TLS through would hand the raw handshake to the backend.
            return
        flow = self._connects.pop(data.context.server.id, None)
        host = data.client_hello.sni
        if not host:
            if flow is not None:
                host = flow.request.host
            elif data.context.server.address:
                host = data.context.server.address[0]
            else:
                host = ""
        # `*.x` covers subdomains of x at any depth but not x itself, as in TLS certificates
        # (RFC 6125) except for the depth: list `x` as well to include it.
        intercept = self.patterns.match(hosts.host_key(host)) is not None
        if not intercept:
            data.ignore_connection = True
        decision = "intercept" if intercept else "passthrough"
        if flow is not None:
            record(flow)["tls"] = decision
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("tls %s for %r", decision, host)


def could_start_tls(data: bytes) -> bool:
    """True when `data` is, or may still become, the start of a TLS record (a ClientHello)."""
    prefix = data[:3]
    return (
        (len(prefix) < 1 or prefix[0] == 0x16)
        and (len(prefix) < 2 or prefix[1] == 0x03)
        and (len(prefix) < 3 or prefix[2] <= 0x03)
    )


addons = [TlsPolicy()]
