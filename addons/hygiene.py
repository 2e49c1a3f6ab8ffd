"""Strict request hygiene and size/time limits: refuse what a backend could read differently.

mitmproxy forwards several request shapes verbatim that let a request hide from the proxy or
desynchronise a backend (obs-folded and bare-CR header values, NUL bytes, `GET *`, `HTTP/2.0`
on an HTTP/1 connection, missing or duplicate Host, `Upgrade: h2c`). This addon refuses or
normalises them before any other addon decides, and installs the guards below the hooks
(`addons/kernel/wire.py`: head size cap, header timeout, trailers, leading empty lines, streamed
chunked body limit).

Checks, in order (all answer 400 BAD_REQUEST unless noted, with `Connection: close`):
  request line  method is a token (no NUL/CTL) of at most 32 bytes; method in
                limits_blocked_methods -> 405; target longer than limits_max_url_length ->
                414, counting the whole target as sent (an absolute-form URL with its scheme
                and authority: `kernel.wire.sent_authority`); target has no CTL/space/NUL;
                `*` only with OPTIONS; HTTP/1 connections speak HTTP/1.0 or HTTP/1.1 only.
  header fields more than limits_max_headers_count -> 431; names are tokens; values hold no
                CR, LF (obs-fold), NUL or other CTL except HTAB; name+value+4 bytes summed over
                all fields above limits_max_header_size -> 431; Content-Length digits only,
                several must agree, above limits_max_body_size -> 413; Transfer-Encoding only
                on HTTP/1.1, never with Content-Length, chunked exactly once and last.
  Host (HTTP/1) exactly one on HTTP/1.1 (at most one on 1.0), a valid authority, as the client
                sent it (on a reverse listener too: `kernel.wire.sent_hosts`); in regular/
                upstream mode a Host differing from an absolute-form URL is rewritten to the
                URL's authority (RFC 9112 §3.2.2).
  origin-form   on a forward listener (regular/upstream mode), `GET /path` outside a CONNECT
                tunnel is refused (rule origin_form) unless limits_origin_form is `relay`
                or it is for the proxy itself: a path of its endpoints (/health/*, /admin/*,
                the metrics path, /cli/execute) whatever the Host, any path with a Host
                naming the proxy (`kernel.endpoints.meant_for_proxy`).
  h2c           the `h2c` token is stripped from Upgrade (the header removed when empty), and
                HTTP2-Settings removed, `upgrade`/`http2-settings` dropped from Connection.

Hooks: configure (options, wire limits, core body_size_limit), requestheaders and http_connect
(the checks), http_connected / client_disconnected (remember tunnels, whose inner requests
legitimately carry a Host different from the CONNECT target).

Options: limits_max_url_length, limits_max_header_size, limits_max_headers_count,
limits_max_body_size, limits_header_timeout, limits_blocked_methods, limits_origin_form.

Records `decision="blocked"`, `blocked_by="hygiene"`, `rule` (and `hygiene` for rewrites) in
`record(flow)` and logs each decision at WARNING on `waypost.hygiene`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import NamedTuple

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.proxy import mode_specs

from addons import errors
from addons.kernel import net, units, wire
from addons.kernel.endpoints import meant_for_proxy
from addons.kernel.options import Option, choice, declare, duration
from addons.kernel.record import record

log = logging.getLogger("waypost.hygiene")

# RFC 9110 §5.6.2 token, §5.5 field-value (VCHAR, obs-text, SP, HTAB), RFC 3986 authority.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKEN_LIST = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?::[!#$%&'*+\-.^_`|~0-9A-Za-z]+)*")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")
_DIGITS = re.compile(rb"[0-9]+")
_HOST = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|\[v[0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+\]"
    rb"|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(?::[0-9]{0,5})?"
)
_HOST_PARTS = re.compile(rb"(\[[^\]]*\]|[^:]*)(?::([0-9]*))?")
_HTTP1 = frozenset((b"HTTP/1.0", b"HTTP/1.1"))
_INTERESTING = frozenset(
    (b"host", b"content-length", b"transfer-encoding", b"upgrade", b"http2-settings")
)
HEAD_SLACK = 1024  # request line and terminators on top of URL and header limits
ORIGIN_FORMS = ("refuse", "relay")


class Limits(NamedTuple):
    max_url_length: int = 8192
    max_header_size: int = 16384
    max_headers_count: int = 100
    max_body_size: int = 10 * 1024 * 1024
    blocked_methods: frozenset[bytes] = frozenset((b"TRACE", b"TRACK"))


class Refusal(NamedTuple):
    code: str  # a key of errors.STATUS
    rule: str
    message: str


ORIGIN_FORM = Refusal(
    "BAD_REQUEST",
    "origin_form",
    "This is a forward proxy: the request line must name the URL (GET http://host/path), "
    "not only a path (origin-form), unless it is for the proxy's own endpoints.",
)


class Fields(NamedTuple):
    """What the single pass over the header fields found."""

    hosts: list[bytes]
    h2c: bool


def _bad(rule: str, message: str) -> Refusal:
    return Refusal("BAD_REQUEST", rule, message)


def check_request_line(
    method: bytes, target: bytes, version: bytes, limits: Limits, *, http1: bool
) -> Refusal | None:
    """Refuse a malformed or unwanted request line (method, target, version).

    `target` is the whole request target as sent: for an absolute-form request the scheme,
    authority, path and query."""
    if len(method) > wire.MAX_METHOD:
        # nginx and Squid answer an unparsable method 400 too: 501 would call it merely unknown.
        return _bad(
            "method_too_long", f"The request method is longer than {wire.MAX_METHOD} bytes."
        )
    if not _TOKEN.fullmatch(method):
        return _bad("invalid_method", "The request method is not a valid token.")
    if method.upper() in limits.blocked_methods:
        return Refusal(
            "METHOD_NOT_ALLOWED", "blocked_method", f"The method {method.decode()} is not allowed."
        )
    if len(target) > limits.max_url_length:
        return Refusal(
            "URI_TOO_LONG",
            "max_url_length",
            f"The request target exceeds {limits.max_url_length} bytes.",
        )
    if _BAD_TARGET.search(target):
        return _bad("invalid_target", "The request target contains control characters.")
    if target == b"*" and method != b"OPTIONS":
        return _bad("asterisk_form", "The asterisk-form target is only valid with OPTIONS.")
    if http1 and version not in _HTTP1:
        return _bad("http_version", "Only HTTP/1.0 and HTTP/1.1 are accepted on this connection.")
    return None


def check_fields(
    fields: Sequence[tuple[bytes, bytes]], version: bytes, limits: Limits
) -> Refusal | Fields:
    """One pass over the raw header fields: syntax, sizes, framing, and the Host/h2c facts."""
    count = len(fields)
    if count > limits.max_headers_count:
        return Refusal(
            "HEADERS_TOO_LARGE",
            "max_headers_count",
            f"The request has more than {limits.max_headers_count} header fields.",
        )
    if not count:
        return Fields([], False)
    # Checking the joined names and values costs two regex calls instead of two per field;
    # ":" is no token character and HTAB is a valid value byte, so the joins add no matches.
    values = [v for _, v in fields]
    names_blob = b":".join([n for n, _ in fields])
    values_blob = b"\t".join(values)
    if not _TOKEN_LIST.fullmatch(names_blob) or _BAD_VALUE.search(values_blob):
        return _field_syntax(fields)
    # name + ": " + value + CRLF per field
    size = len(names_blob) + len(values_blob) + 2 * count + 2
    hosts: list[bytes] = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    h2c = False
    for lname, value in zip(names_blob.lower().split(b":"), values, strict=True):
        if lname in _INTERESTING:
            if lname == b"host":
                hosts.append(value)
            elif lname == b"content-length":
                lengths.append(value)
            elif lname == b"transfer-encoding":
                codings += [c.strip().lower() for c in value.split(b",")]
            elif lname == b"upgrade":
                h2c = h2c or any(t.strip().lower() == b"h2c" for t in value.split(b","))
    if size > limits.max_header_size:
        return Refusal(
            "HEADERS_TOO_LARGE",
            "max_header_size",
            f"The request header fields exceed {limits.max_header_size} bytes.",
        )
    if codings:
        if lengths:
            return _bad("te_and_cl", "Transfer-Encoding and Content-Length are both present.")
        if version != b"HTTP/1.1":
            return _bad("te_http10", "Transfer-Encoding is only valid on HTTP/1.1.")
        if codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
            return _bad("te_not_chunked", "Transfer-Encoding must end with chunked, applied once.")
    elif lengths:
        if not all(_DIGITS.fullmatch(v) for v in lengths):
            return _bad("invalid_content_length", "Content-Length is not a number.")
        if len({int(v) for v in lengths}) > 1:
            return _bad("multiple_content_length", "Content-Length values differ.")
        if int(lengths[0]) > limits.max_body_size:
            return Refusal(
                "PAYLOAD_TOO_LARGE",
                "max_body_size",
                f"The request body exceeds the limit of {limits.max_body_size} bytes.",
            )
    return Fields(hosts, h2c)


def _field_syntax(fields: Sequence[tuple[bytes, bytes]]) -> Refusal:
    """The slow path once the joined check failed: name the first offending field's problem."""
    for name, value in fields:
        if not _TOKEN.fullmatch(name):
            return _bad("invalid_header_name", "A header field name is not a valid token.")
        if _BAD_VALUE.search(value):
            if b"\n" in value:
                return _bad("obs_fold", "Obsolete line folding in header values is not accepted.")
            if b"\r" in value:
                return _bad("bare_cr", "A header value contains a bare CR.")
            if b"\x00" in value:
                return _bad("nul", "A header value contains a NUL byte.")
            return _bad("header_ctl", "A header value contains control characters.")
    return _bad("invalid_header", "A header field is malformed.")


def check_host(hosts: Sequence[bytes], version: bytes) -> Refusal | None:
    """RFC 9112 §3.2: one valid Host on HTTP/1.1, at most one on HTTP/1.0."""
    if len(hosts) > 1:
        return _bad("duplicate_host", "The request has more than one Host header.")
    if not hosts:
        if version == b"HTTP/1.0":
            return None
        return _bad("missing_host", "HTTP/1.1 requests need a Host header.")
    if not _HOST.fullmatch(hosts[0]):
        return _bad("invalid_host", "The Host header is not a valid authority.")
    return None


def _host_bytes(host: str) -> bytes:
    b = host.encode("idna") if not host.isascii() else host.encode()
    return b"[" + b + b"]" if b":" in b else b


def authority_matches(host_value: bytes, host: str, port: int, default_port: int) -> bool:
    """Does a Host value name the same host and port as the request URL?"""
    m = _HOST_PARTS.fullmatch(host_value)
    if not m:
        return False
    h = m.group(1).lower()
    if h.startswith(b"["):
        h = h[1:-1]
    p = int(m.group(2)) if m.group(2) else default_port
    want = _host_bytes(host).lower().strip(b"[]")
    return h == want and p == port


def url_authority(host: str, port: int, default_port: int) -> str:
    h = _host_bytes(host).decode()
    return h if port == default_port else f"{h}:{port}"


def strip_h2c(fields: Sequence[tuple[bytes, bytes]]) -> tuple[tuple[bytes, bytes], ...]:
    """Remove the h2c upgrade offer: the token, HTTP2-Settings, and their Connection options."""
    out: list[tuple[bytes, bytes]] = []
    upgrade_left = False
    for name, value in fields:
        lname = name.lower()
        if lname == b"http2-settings":
            continue
        if lname == b"upgrade":
            tokens = [t.strip() for t in value.split(b",")]
            kept = [t for t in tokens if t and t.lower() != b"h2c"]
            if kept:
                upgrade_left = True
                out.append((name, b", ".join(kept)))
            continue
        out.append((name, value))
    result: list[tuple[bytes, bytes]] = []
    drop = {b"http2-settings"} if upgrade_left else {b"http2-settings", b"upgrade"}
    for name, value in out:
        if name.lower() == b"connection":
            kept = [
                t.strip() for t in value.split(b",") if t.strip() and t.strip().lower() not in drop
            ]
            if not kept:
                continue
            value = b", ".join(kept)
        result.append((name, value))
    return tuple(result)


def parse_limits(
    max_url_length: int,
    max_header_size: int,
    max_headers_count: int,
    max_body_size: str,
    blocked_methods: Sequence[str],
) -> Limits:
    """Limits from the option values; ValueError names the option and the fix."""
    for name, v in (
        ("limits_max_url_length", max_url_length),
        ("limits_max_header_size", max_header_size),
        ("limits_max_headers_count", max_headers_count),
    ):
        if v <= 0:
            raise ValueError(f"{name}: must be a positive number, got {v}")
    try:
        body = units.parse_size(max_body_size)
    except ValueError as e:
        raise ValueError(f"limits_max_body_size: {e}") from None
    methods = set()
    for m in blocked_methods:
        if not _TOKEN.fullmatch(m.encode()):
            raise ValueError(
                f"limits_blocked_methods: {m!r} is not an HTTP method token (e.g. TRACE)"
            )
        methods.add(m.upper().encode())
    return Limits(max_url_length, max_header_size, max_headers_count, body, frozenset(methods))


OPTIONS: tuple[Option, ...] = (
    Option(
        "limits_max_url_length",
        int,
        8192,
        "Longest request target in bytes, counted as sent on the request line: path and "
        "query (origin-form), the whole URL with scheme and authority (absolute-form, a "
        "forward proxy request), the CONNECT authority; a longer one is answered 414 "
        "URI_TOO_LONG.",
    ),
    Option(
        "limits_max_header_size",
        int,
        16384,
        "Largest total size of the request header fields in bytes (name, value and 4 bytes "
        "of separators per field); larger is answered 431 HEADERS_TOO_LARGE. A request head "
        "still incomplete after limits_max_url_length + limits_max_header_size + 1024 bytes "
        "is answered 431 and the connection closed.",
    ),
    Option(
        "limits_max_headers_count",
        int,
        100,
        "Most header fields a request may carry; more is answered 431 HEADERS_TOO_LARGE.",
    ),
    Option(
        "limits_max_body_size",
        str,
        "10MB",
        "Largest request body (e.g. 10MB, 512KB; 1KB = 1024 bytes). A larger Content-Length "
        "is answered 413 PAYLOAD_TOO_LARGE before any upstream connection; a chunked body "
        "is cut off at the limit with 413 (or the connection closed if the response "
        "already started), streamed or not. Also sets mitmproxy's body_size_limit unless "
        "that option was set explicitly.",
    ),
    Option(
        "limits_header_timeout",
        str,
        "10s",
        "Time a client has to send a complete request head, counted from its first byte "
        "(on a new connection, from the connection's start); otherwise 408 "
        "REQUEST_TIMEOUT and the connection is closed. 0 disables.",
    ),
    Option(
        "limits_origin_form",
        str,
        "refuse",
        "What a forward (regular or upstream mode) listener does with an origin-form request "
        "(GET /path, a Host header naming the destination) that is not for the proxy's own "
        "endpoints nor inside a CONNECT tunnel: refuse (400 BAD_REQUEST, as Squid does) or "
        "relay it to the host named in Host (transparent setups).",
        choices=ORIGIN_FORMS,
    ),
    Option(
        "limits_blocked_methods",
        Sequence[str],
        ["TRACE", "TRACK"],
        "Request methods refused with 405 METHOD_NOT_ALLOWED (compared case-insensitively).",
    ),
)
_LIMITS = frozenset(
    {
        "limits_max_url_length",
        "limits_max_header_size",
        "limits_max_headers_count",
        "limits_max_body_size",
        "limits_blocked_methods",
    }
)
_WIRE = _LIMITS | {"limits_header_timeout"}


class Hygiene:
    def __init__(self) -> None:
        self.limits = Limits()
        self.header_timeout = 10.0
        self.origin_form = "refuse"
        self.wire_active = False
        self._body_size_limit_set: str | None = None
        self._tunnels: set[str] = set()

    def load(self, loader: object) -> None:
        declare(loader, OPTIONS)

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if updated & _LIMITS:
            try:
                self.limits = parse_limits(
                    opts.limits_max_url_length,
                    opts.limits_max_header_size,
                    opts.limits_max_headers_count,
                    opts.limits_max_body_size,
                    opts.limits_blocked_methods,
                )
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from None
        if "limits_origin_form" in updated:
            self.origin_form = choice("limits_origin_form", opts.limits_origin_form, ORIGIN_FORMS)
        if "limits_header_timeout" in updated:
            self.header_timeout = duration("limits_header_timeout", opts.limits_header_timeout)
        if "limits_max_body_size" in updated and hasattr(opts, "body_size_limit"):
            self._follow_body_size_limit()
        if updated & _WIRE:
            self._configure_wire()

    def _follow_body_size_limit(self) -> None:
        """Core body_size_limit follows limits_max_body_size until the user sets it."""
        opts = ctx.options
        wanted = str(self.limits.max_body_size)
        if (
            not opts.has_changed("body_size_limit")
            or opts.body_size_limit == self._body_size_limit_set
        ):
            self._body_size_limit_set = wanted
            if opts.body_size_limit != wanted:
                opts.update(body_size_limit=wanted)

    def _configure_wire(self) -> None:
        # The wire guards answer with mitmproxy's error page, which errors.py makes JSON.
        errors.install_error_page("hygiene")
        self.wire_active = wire.install()
        lim = self.limits
        wire.configure(
            max_head=lim.max_url_length + lim.max_header_size + HEAD_SLACK,
            header_timeout=self.header_timeout,
            max_body=lim.max_body_size,
            max_url=lim.max_url_length,
        )

    def http_connected(self, flow: http.HTTPFlow) -> None:
        self._tunnels.add(flow.client_conn.id)

    def client_disconnected(self, client: connection.Client) -> None:
        self._tunnels.discard(client.id)

    @errors.fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        req = flow.request.data
        refusal = check_request_line(
            req.method, req.authority, req.http_version, self.limits, http1=_is_http1(flow)
        ) or _refusal(check_fields(req.headers.fields, req.http_version, self.limits))
        if refusal:
            _refuse(flow, refusal)

    @errors.fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        req = flow.request.data
        version = req.http_version
        http1 = _is_http1(flow)
        # mitmproxy drops an absolute-form request's authority before this hook: the wire
        # guards noted it, so the limit counts the target as the client sent it.
        sent = wire.sent_authority(flow.request) if http1 else None
        target = req.scheme + b"://" + sent + req.path if sent else req.path
        found = check_request_line(
            req.method, target, version, self.limits, http1=http1
        ) or check_fields(req.headers.fields, version, self.limits)
        if isinstance(found, Refusal):
            _refuse(flow, found)
            return
        if not http1:
            return
        # On a reverse listener mitmproxy replaced Host with the backend's before this hook:
        # the wire guards noted the client's own fields.
        sent_hosts = wire.sent_hosts(flow.request)
        refusal = check_host(found.hosts if sent_hosts is None else sent_hosts, version)
        if refusal:
            _refuse(flow, refusal)
            return
        if sent == b"" and self.origin_form == "refuse" and not meant_for_proxy(flow):
            _refuse(flow, ORIGIN_FORM)
            return
        if found.hosts and _is_forward_proxy(flow) and flow.client_conn.id not in self._tunnels:
            request = flow.request
            default = 443 if request.scheme == "https" else 80
            host, port = request.host, request.port
            plain = host if port == default else f"{host}:{port}"
            if found.hosts[0] != plain.encode() and not authority_matches(
                found.hosts[0], host, port, default
            ):
                _rewrite_host(flow, found.hosts[0], url_authority(host, port, default))
        if found.h2c:
            _strip_h2c_offer(flow)

    def explain(self, flow: http.HTTPFlow) -> dict[str, object]:
        """POST /admin/explain: the request line and header limits, read-only."""
        req = flow.request.data
        target = req.path if req.method == b"CONNECT" else flow.request.url.encode()
        found = check_request_line(
            req.method, target or req.authority, req.http_version, self.limits, http1=True
        ) or check_fields(req.headers.fields, req.http_version, self.limits)
        if isinstance(found, Refusal):
            refusal = {"rule": found.rule, "code": found.code, "reason": found.message}
            return {"addon": "hygiene", "decision": "block", "refuses": True} | refusal
        return {"addon": "hygiene", "decision": "allow"}


def _rewrite_host(flow: http.HTTPFlow, sent: bytes, authority: str) -> None:
    """RFC 9112 §3.2.2: the absolute-form URL's authority wins over a differing Host."""
    log.warning(
        "rule=host_mismatch request_id=%s: Host %r rewritten to the URL's %r",
        errors.request_id(flow),
        sent,
        authority,
    )
    flow.request.headers["Host"] = authority
    record(flow).setdefault("hygiene", []).append("host_rewritten")


def _strip_h2c_offer(flow: http.HTTPFlow) -> None:
    headers = flow.request.data.headers
    headers.fields = strip_h2c(headers.fields)
    log.warning("rule=h2c request_id=%s: h2c upgrade offer removed", errors.request_id(flow))
    record(flow).setdefault("hygiene", []).append("h2c_stripped")


def _refusal(found: Refusal | Fields) -> Refusal | None:
    return found if isinstance(found, Refusal) else None


def _is_http1(flow: http.HTTPFlow) -> bool:
    alpn = flow.client_conn.alpn or b""
    return not (alpn == b"h2" or alpn.startswith(b"h3"))


def _is_forward_proxy(flow: http.HTTPFlow) -> bool:
    return isinstance(flow.client_conn.proxy_mode, mode_specs.RegularMode | mode_specs.UpstreamMode)


def _refuse(flow: http.HTTPFlow, refusal: Refusal) -> None:
    meta = record(flow)
    meta["decision"] = "blocked"
    meta["blocked_by"] = "hygiene"
    meta["rule"] = refusal.rule
    log.warning(
        "rule=%s status=%d request_id=%s client=%s: %s",
        refusal.rule,
        errors.STATUS[refusal.code],
        errors.request_id(flow),
        net.client_ip(flow) or "?",
        refusal.message,
    )
    # The rest of this connection cannot be trusted to be framed the way we read it.
    flow.response = errors.make(refusal.code, refusal.message, flow, {"Connection": "close"})
    # mitmproxy refuses a response on a request it was about to stream.
    flow.request.stream = False


addons = [Hygiene()]
