"""Security response headers: HSTS, X-Content-Type-Options, X-Frame-Options, CSP.

With `secheaders_enabled`, every response the proxy relays (`responseheaders`, so streamed
bodies get them too) and every answer it makes itself (`response`: errors, cache hits) gets:

- `Strict-Transport-Security: <secheaders_hsts>`, only when the client's request came over
  HTTPS: the client's own connection was TLS (reverse `https` listeners, intercepted hosts),
  or a trusted proxy (`forwarding_trusted_proxies`) says `X-Forwarded-Proto: https`. Browsers
  ignore HSTS over plain HTTP (RFC 6797 §8.1), and sending it there would only mislead;
- `X-Content-Type-Options: <secheaders_content_type_options>` (nosniff);
- `X-Frame-Options: <secheaders_frame_options>` (DENY or SAMEORIGIN);
- `Content-Security-Policy: <secheaders_content_security_policy>`.

An empty value turns that header off. A backend's own value is kept unless
`secheaders_override` is on. CONNECT answers get none (nothing a browser renders).

Hooks: responseheaders, response. Options: secheaders_enabled, secheaders_hsts,
secheaders_content_type_options, secheaders_frame_options, secheaders_content_security_policy,
secheaders_override; forwarding_trusted_proxies (declared by `addons/kernel/net.py`).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from mitmproxy import ctx, exceptions, http

from addons.kernel import net
from addons.kernel.options import Option, declare

# Set once a response got its headers, so `response` does not repeat `responseheaders`.
_DONE = "waypost.secheaders.done"
_HSTS = re.compile(r"(?i)\s*max-age=\d+\s*(;|$)")
_CTL = re.compile(r"[\x00-\x1f\x7f]")
_FRAME_OPTIONS = ("DENY", "SAMEORIGIN", "")


class Header(NamedTuple):
    lname: bytes
    name: bytes
    value: bytes


def _header(name: str, value: str) -> Header:
    return Header(name.lower().encode(), name.encode(), value.encode())


def parse_headers(
    hsts: str, content_type_options: str, frame_options: str, csp: str
) -> tuple[Header | None, tuple[Header, ...]]:
    """The HSTS header (or None) and the others to add, from the option values; ValueError
    names the option and the fix."""
    for option, value in (
        ("secheaders_hsts", hsts),
        ("secheaders_content_security_policy", csp),
    ):
        if _CTL.search(value) or not value.isascii():
            raise ValueError(f"{option}: {value!r} has control or non-ASCII characters")
    hsts, csp = hsts.strip(), csp.strip()
    if hsts and not _HSTS.match(hsts):
        raise ValueError(
            f"secheaders_hsts: {hsts!r} must start with max-age=<seconds> (RFC 6797 6.1), "
            "e.g. 'max-age=31536000; includeSubDomains'"
        )
    if content_type_options not in ("nosniff", ""):
        raise ValueError(
            f"secheaders_content_type_options: {content_type_options!r} is not nosniff or empty"
        )
    if frame_options.upper() not in _FRAME_OPTIONS:
        raise ValueError(
            f"secheaders_frame_options: {frame_options!r} is not DENY, SAMEORIGIN or empty"
        )

    others = tuple(
        _header(name, value)
        for name, value in (
            ("X-Content-Type-Options", content_type_options),
            ("X-Frame-Options", frame_options.upper()),
            ("Content-Security-Policy", csp),
        )
        if value
    )
    return (_header("Strict-Transport-Security", hsts) if hsts else None), others


def apply(
    fields: tuple[tuple[bytes, bytes], ...], add: tuple[Header, ...], override: bool
) -> tuple[tuple[bytes, bytes], ...] | None:
    """The response's fields with `add` set (kept when present unless `override`), or None
    when nothing changes."""
    present = {name.lower() for name, _ in fields}
    if override:
        if not present.intersection(h.lname for h in add):
            return fields + tuple((h.name, h.value) for h in add)
        ours = {h.lname for h in add}
        kept = tuple(f for f in fields if f[0].lower() not in ours)
        return kept + tuple((h.name, h.value) for h in add)
    missing = tuple((h.name, h.value) for h in add if h.lname not in present)
    return fields + missing if missing else None


OPTIONS: tuple[Option, ...] = (
    Option(
        "secheaders_enabled",
        bool,
        False,
        "Add the security headers below to responses (relayed and the proxy's own).",
    ),
    Option(
        "secheaders_hsts",
        str,
        "max-age=31536000; includeSubDomains",
        "Strict-Transport-Security value, sent only on responses to requests that reached the proxy over HTTPS (or through a trusted proxy saying X-Forwarded-Proto: https); empty: off.",
    ),
    Option(
        "secheaders_content_type_options",
        str,
        "nosniff",
        "X-Content-Type-Options value: nosniff, or empty for off.",
    ),
    Option(
        "secheaders_frame_options",
        str,
        "DENY",
        "X-Frame-Options value: DENY, SAMEORIGIN, or empty for off.",
    ),
    Option(
        "secheaders_content_security_policy",
        str,
        "",
        "Content-Security-Policy value, e.g. default-src 'self'; empty: off.",
    ),
    Option(
        "secheaders_override",
        bool,
        False,
        "Replace a backend's own value of these headers; off: a backend's value is kept.",
    ),
)


class SecHeaders:
    def __init__(self) -> None:
        self.enabled = False
        self.hsts: Header | None = None
        self.others: tuple[Header, ...] = ()
        self.override = False

    def load(self, loader: object) -> None:
        net.load(loader)
        declare(loader, OPTIONS)

    def configure(self, updated: set[str]) -> None:
        net.configure(updated)
        opts = ctx.options
        if any(name.startswith("secheaders_") for name in updated):
            try:
                self.hsts, self.others = parse_headers(
                    opts.secheaders_hsts,
                    opts.secheaders_content_type_options,
                    opts.secheaders_frame_options,
                    opts.secheaders_content_security_policy,
                )
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from None
            self.enabled = opts.secheaders_enabled
            self.override = opts.secheaders_override

    def _https(self, flow: http.HTTPFlow) -> bool:
        client = flow.client_conn
        if client.tls:
            return True
        if not net.trusted_peer(client):
            return False
        protos = flow.request.headers.get_all("x-forwarded-proto")
        return bool(protos) and protos[-1].strip().lower() == "https"

    def _add(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None or flow.request.data.method == b"CONNECT":
            return
        add = self.others
        if self.hsts is not None and self._https(flow):
            add = (self.hsts, *add)
        if add:
            fields = apply(resp.headers.fields, add, self.override)
            if fields is not None:
                resp.headers.fields = fields

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if not self.enabled or flow.error or not flow.live:
            return
        flow.metadata[_DONE] = True
        self._add(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        # Answers made by an addon (errors, cache hits) skip `responseheaders`.
        if not self.enabled or flow.metadata.get(_DONE) or flow.websocket:
            return
        self._add(flow)


addons = [SecHeaders()]
