"""TLS listener: reverse-proxy listeners terminate TLS with the operator's certificate.

mitmproxy already terminates TLS on a reverse listener whenever a client's first bytes are a
ClientHello (`reverse:http://...` and `reverse:https://...` alike), but with a certificate it
mints from its own CA. With a certificate and key configured here, every reverse listener
serves that certificate instead, and forward-proxy interception keeps mitmproxy's CA. The
mechanism is mitmproxy's own extension point: an addon's `tls_start_client` that provides the
OpenSSL connection, which mitmproxy's TlsConfig then leaves alone (same in 11 and 12). The
`certs` option (`*=fullchain+key.pem`) was the alternative: it wants key and chain in one
file and would hand the certificate to intercepted forward-proxy hosts as well.

ALPN: HTTP/2 (`h2`) when the client offers it and mitmproxy's `http2` option is on, else
HTTP/1.1 (server preference, as nginx does; mitmproxy's own callback follows the client's
order, which gives HTTP/1.1 to clients such as httpx that list it first). Backends: mitmproxy
offers the client's ALPN list upstream on TLS connections, so a backend that speaks h2 gets
h2; a plaintext `http://` backend gets HTTP/1.1, and then mitmproxy opens one upstream
connection per request of an h2 client (`_http1.py`: no upstream HTTP/1 reuse for h2).

The certificate files are checked when set (readable, PEM, the key belongs to the leaf
certificate) and watched: a renewed certificate is loaded within `RELOAD_INTERVAL` seconds
without a restart (new handshakes get it; a renewal that does not validate is logged and the
old certificate stays).

Hooks: configure (load and check), running (file watcher), done, tls_start_client,
quic_start_client (HTTP/3 on `reverse:https://` listeners gets the same certificate).
Options: tls_listener_cert, tls_listener_key, tls_listener_chain.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from mitmproxy import ctx, exceptions, tls
from mitmproxy.proxy import mode_specs
from mitmproxy.proxy.layers import quic
from OpenSSL import SSL, crypto

from addons.kernel.options import Option, declare, spawn
from addons.kernel.tls import Keypair, KeypairError, load_keypair, validity_problem

log = logging.getLogger("waypost.tlslistener")

RELOAD_INTERVAL = 10.0
SETTLE = 1.0  # after a change, wait this long: a renewal writes cert and key one by one
_OPTIONS = ("tls_listener_cert", "tls_listener_key", "tls_listener_chain")

# Mozilla's "intermediate" configuration (TLS 1.2 suites; TLS 1.3 suites are OpenSSL's own).
CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)
H2 = b"h2"
HTTP1 = (b"http/1.1", b"http/1.0")


def select_alpn(offers: Sequence[bytes], http2: bool) -> bytes | None:
    """The protocol to answer a client's ALPN offer with, or None (no overlap).

    Server preference, as nginx and Go do: h2 whenever offered (and enabled), whatever the
    client's order (httpx lists http/1.1 first), then HTTP/1.1, then HTTP/1.0.
    """
    for proto in ((H2,) if http2 else ()) + HTTP1:
        if proto in offers:
            return proto
    return None


def _alpn_callback(conn: SSL.Connection, offers: list[bytes]) -> Any:
    chosen = select_alpn(offers, bool(conn.get_app_data()))
    return SSL.NO_OVERLAPPING_PROTOCOLS if chosen is None else chosen


def _ossl_cert(cert: x509.Certificate) -> Any:
    return crypto.X509.from_cryptography(cert)


# mitmproxy's `tls_version_client_min` names; anything lower than TLS 1.2 keeps the 1.2 floor.
MIN_VERSIONS = {"TLS1_3": SSL.TLS1_3_VERSION}


def make_context(pair: Keypair, min_version: str = "TLS1_2") -> SSL.Context:
    """One server context per certificate: shared by all handshakes, so sessions resume."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(MIN_VERSIONS.get(min_version, SSL.TLS1_2_VERSION))
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    context.set_cipher_list(CIPHERS.encode())
    context.use_certificate(_ossl_cert(pair.cert))
    context.use_privatekey(crypto.PKey.from_cryptography_key(pair.key))
    for cert in pair.chain:
        context.add_extra_chain_cert(_ossl_cert(cert))
    context.check_privatekey()
    context.set_session_id(b"waypost-tls-listener")
    context.set_alpn_select_callback(_alpn_callback)
    return context


def _min_version() -> str:
    # mitmproxy's tlsconfig addon declares it; a test context without that addon has none.
    return getattr(ctx.options, "tls_version_client_min", "TLS1_2")


def _mtimes(files: tuple[str, ...]) -> tuple[float | None, ...]:
    out: list[float | None] = []
    for f in files:
        try:
            out.append(os.stat(f).st_mtime)
        except OSError:
            out.append(None)
    return tuple(out)


OPTIONS: tuple[Option, ...] = (
    Option(
        "tls_listener_cert",
        str,
        "",
        "PEM certificate (leaf first; the chain may follow) that reverse-proxy listeners "
        "serve to TLS clients, with HTTP/2 and HTTP/1.1 by ALPN. Empty: mitmproxy's "
        "generated certificate. Needs tls_listener_key.",
    ),
    Option(
        "tls_listener_key",
        str,
        "",
        "PEM private key (unencrypted) of tls_listener_cert.",
    ),
    Option(
        "tls_listener_chain",
        str,
        "",
        "Optional PEM file of intermediate certificates sent after tls_listener_cert.",
    ),
)


class TlsListener:
    def __init__(self) -> None:
        self.pair: Keypair | None = None
        self.context: SSL.Context | None = None
        self.http2 = True
        self._mtimes: tuple[float | None, ...] = ()
        self._task: asyncio.Task[None] | None = None

    def load(self, loader: Any) -> None:
        declare(loader, OPTIONS)

    def configure(self, updated: set[str]) -> None:
        if "http2" in updated:
            self.http2 = bool(ctx.options.http2)
        if not updated & {*_OPTIONS, "tls_version_client_min"}:
            return
        cert, key, chain = (getattr(ctx.options, o) for o in _OPTIONS)
        if not cert and not key and not chain:
            self.pair, self.context, self._mtimes = None, None, ()
            return
        if not cert or not key:
            missing = "tls_listener_cert" if not cert else "tls_listener_key"
            raise exceptions.OptionsError(
                f"{missing}: a TLS listener needs both a certificate and its key"
            )
        try:
            # Small local files, read once per config change (as mitmproxy's `certs` option).
            pair = load_keypair(cert, key, chain)
            context = make_context(pair, _min_version())
        except KeypairError as e:
            raise exceptions.OptionsError(f"tls_listener_{e.which}: {e}") from None
        except SSL.Error as e:  # OpenSSL refused what cryptography accepted (rare)
            raise exceptions.OptionsError(f"tls_listener_cert: OpenSSL refused it: {e}") from None
        self._swap(pair, context)

    def _swap(self, pair: Keypair, context: SSL.Context) -> None:
        self.pair, self.context = pair, context
        self._mtimes = _mtimes(pair.files)
        problem = validity_problem(pair, datetime.datetime.now(datetime.UTC))
        log.log(
            logging.WARNING if problem else logging.INFO,
            "TLS listener certificate %s, valid until %s%s",
            pair.subject,
            pair.not_after.isoformat(),
            f" ({problem}: clients will refuse it)" if problem else "",
            extra={"waypost": {"tls_subject": pair.subject, "files": list(pair.files)}},
        )

    def running(self) -> None:
        if self._task is None:
            self._task = spawn(self._watch())

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_INTERVAL)
            pair = self.pair
            if pair is None:
                continue
            mtimes = await asyncio.to_thread(_mtimes, pair.files)
            if mtimes == self._mtimes:
                continue
            await asyncio.sleep(SETTLE)
            try:
                new = await asyncio.to_thread(load_keypair, *pair.paths)
                context = await asyncio.to_thread(make_context, new, _min_version())
            except (ValueError, SSL.Error) as e:
                self._mtimes = mtimes  # do not retry the same broken files every interval
                log.warning("TLS listener certificate not reloaded, keeping the old one: %s", e)
                continue
            if self.pair is pair:  # no option change meanwhile
                self._swap(new, context)

    def tls_start_client(self, data: tls.TlsData) -> None:
        context = self.context
        if (
            context is None
            or data.ssl_conn is not None
            or data.is_dtls
            or not isinstance(data.context.client.proxy_mode, mode_specs.ReverseMode)
        ):
            return
        conn = SSL.Connection(context)
        conn.set_app_data(self.http2)  # read by the ALPN callback
        conn.set_accept_state()
        data.ssl_conn = conn

    def quic_start_client(self, data: quic.QuicTlsData) -> None:
        """HTTP/3: a `reverse:https://` listener also listens on UDP (mitmproxy's `http3`
        option, on by default); QUIC clients get the same certificate."""
        pair = self.pair
        if (
            pair is None
            or data.settings is not None
            or not isinstance(data.context.client.proxy_mode, mode_specs.ReverseMode)
        ):
            return
        client, server = data.context.client, data.context.server
        data.settings = quic.QuicTlsSettings(
            # As mitmproxy's TlsConfig: the negotiated protocol if known, else the offers.
            alpn_protocols=[
                a.decode("ascii")
                for a in [a for a in (client.alpn, server.alpn) if a] or client.alpn_offers
            ],
            certificate=pair.cert,
            certificate_chain=list(pair.chain),
            certificate_private_key=pair.key,
        )


addons = [TlsListener()]
