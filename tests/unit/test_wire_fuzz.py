"""Property-based fuzzing of the request parser, fast level: kernel/wire.py's patched HTTP/1
reader (`Http1Server` driven with events, as mitmproxy drives it) followed by hygiene's checks,
and the strict chunked reader on its own, on generated request heads and chunked bodies.

Each generated input carries its own verdict, built with it from what each part is: "ok" (a
well-formed request within the limits: must be accepted), "bad" (malformed or over a limit:
must be refused with a 4xx) or "any" (either, e.g. a target mitmproxy may read as a URL).
Whatever the verdict, no exception escapes and a refusal is a 4xx followed by a close. The
end-to-end level (a real bundle, a recording backend) is tests/e2e/test_fuzz.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import h11
import pytest
from h11._receivebuffer import ReceiveBuffer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import version
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events, mode_specs
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import RequestHeaders
from mitmproxy.test import taddons, tflow

from addons import errors, hygiene
from addons.kernel import patching, wire

pytestmark = pytest.mark.skipif(
    not patching.checked(version.VERSION), reason="wire guards only patch checked versions"
)

LIMITS = hygiene.Limits(max_url_length=1024, max_header_size=2048, max_headers_count=20)
MAX_HEAD = LIMITS.max_url_length + LIMITS.max_header_size + hygiene.HEAD_SLACK
# No example database (no files in the checkout): a failure prints its example to reproduce.
FUZZ = settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
CTL = [bytes([b]) for b in [*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F] if b != 0x0D]

Part = tuple[bytes, str]  # the bytes and their verdict: "ok", "bad" or "any"


def verdict(*parts: str) -> str:
    return "bad" if "bad" in parts else "any" if "any" in parts else "ok"


# --- request heads -------------------------------------------------------------------------

# Each part: a strategy for its well-formed forms and one for any form (broken ones included).
METHODS_OK = st.one_of(
    st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD"]),
    st.text(TOKEN, min_size=1, max_size=32).map(str.encode).filter(lambda m: m != b"CONNECT"),
).map(lambda m: (m, "ok"))
METHODS = st.one_of(
    st.integers(33, 9000).map(lambda n: (b"M" * n, "bad")),  # a long method
    st.binary(min_size=1, max_size=12).map(
        lambda m: (m, "ok" if hygiene._TOKEN.fullmatch(m) and m != b"CONNECT" else "bad")
    ),
)
_PATH = "abcdefghijklmnopqrstuvwxyz0123456789-._~/?=&%+"
TARGETS_OK = st.text(_PATH, max_size=60).map(lambda p: (b"/" + p.encode(), "ok"))
TARGETS = st.one_of(
    st.integers(900, 1200).map(  # around max_url_length
        lambda n: (b"/" + b"u" * (n - 1), "ok" if n <= LIMITS.max_url_length else "bad")
    ),
    st.integers(1 << 14, 1 << 20).map(lambda n: (b"/" + b"u" * n, "bad")),  # huge
    st.binary(min_size=1, max_size=40).map(
        lambda t: (t, "bad" if not _vchars(t) else "any")  # mitmproxy may read it as a URL
    ),
)
VERSIONS_OK = st.just((b"HTTP/1.1", "ok"))
VERSIONS = st.one_of(
    st.sampled_from([(b"HTTP/2.0", "bad"), (b"HTTP/1.2", "bad")]),
    # mitmproxy splits a request line on any run of whitespace; the wire guards do not.
    st.just((b"HTTP/1.1 ", "bad")),
    st.binary(max_size=10).map(lambda v: (v, "ok" if v == b"HTTP/1.1" else "bad")),
)
eols = st.sampled_from([b"\r\n", b"\n"])  # RFC 9112 §2.2: a recipient may take a bare LF


def _vchars(b: bytes) -> bool:
    return bool(b) and all(0x21 <= c <= 0x7E for c in b)


def _name(n: bytes) -> Part:
    if n.lower() in hygiene._INTERESTING:
        return n, "any"  # a framing or Host field: FRAMINGS and HOSTS cover those
    if hygiene._TOKEN.fullmatch(n):
        return n, "ok"
    # A colon or a line break inside makes a different (maybe valid) field or ends the head.
    return n, "any" if any(c in n for c in b":\r\n") else "bad"


NAMES_OK = st.text(TOKEN, min_size=1, max_size=20).map(lambda n: _name(n.encode()))
NAMES = st.binary(min_size=0, max_size=12).map(_name)
_TEXT = 'abcdefghijklmnopqrstuvwxyz ABC0123456789,;=/"()\t'
VALUES_OK = st.text(_TEXT, max_size=40).map(lambda v: (v.strip().encode(), "ok"))
VALUES = st.one_of(
    st.tuples(st.text(_TEXT, max_size=10), st.sampled_from(CTL)).map(  # NUL or a control byte
        lambda t: (b"v" + t[1] + t[0].encode(), "bad")
    ),
    st.text(_TEXT, max_size=10).map(lambda v: (b"a\r\n " + v.encode(), "bad")),  # obs-fold
    st.text(_TEXT, max_size=10).map(lambda v: (b"a\rb" + v.encode(), "bad")),  # a bare CR
    st.integers(LIMITS.max_header_size, 20000).map(lambda n: (b"x" * n, "bad")),  # huge
)
FIELDS_OK = st.lists(st.tuples(NAMES_OK, VALUES_OK, eols), max_size=8)
FIELDS = st.lists(
    st.tuples(st.one_of(NAMES_OK, NAMES), st.one_of(VALUES_OK, VALUES), eols),
    min_size=1,
    max_size=8,
).filter(lambda fs: any(n[1] != "ok" or v[1] != "ok" for n, v, _ in fs))
FRAMINGS_OK: list[tuple[bytes, bytes, str]] = [  # header lines, body, verdict
    (b"", b"", "ok"),
    (b"Content-Length: 0\r\n", b"", "ok"),
    (b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n", "ok"),
]
FRAMINGS: list[tuple[bytes, bytes, str]] = [
    (b"Content-Length: 1x\r\n", b"", "bad"),
    (b"Content-Length: -1\r\n", b"", "bad"),
    (b"Content-Length: 0\r\nContent-Length: 1\r\n", b"", "bad"),
    (b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n", b"0\r\n\r\n", "bad"),
    (b"Transfer-Encoding: gzip\r\n", b"", "bad"),
    (b"Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n", "bad"),
]
HOST_OK = (b"Host: example.com\r\n", "ok")
HOSTS: list[tuple[bytes, str]] = [
    (b"", "bad"),  # HTTP/1.1 without Host
    (b"Host: a.example\r\nHost: b.example\r\n", "bad"),
    (b"Host: exa mple\r\n", "bad"),
]


PARTS = ("method", "target", "version", "host", "framing", "fields")


@st.composite
def heads(draw: st.DrawFn) -> tuple[bytes, str]:
    """A complete request head (and the empty body its framing needs) with its verdict: most
    are well-formed, the others have one or two parts drawn from their broken forms."""
    broken = draw(
        st.one_of(st.just(set()), st.sets(st.sampled_from(PARTS), min_size=1, max_size=2))
    )

    def part(name: str, ok: st.SearchStrategy[Any], anything: st.SearchStrategy[Any]) -> Any:
        return draw(anything if name in broken else ok)

    method, mv = part("method", METHODS_OK, METHODS)
    target, tv = part("target", TARGETS_OK, TARGETS)
    if target == b"*" or method in (b"OPTIONS", b"CONNECT"):
        tv = verdict(tv, "any")
    ver, vv = part("version", VERSIONS_OK, VERSIONS)
    host, hv = part("host", st.just(HOST_OK), st.sampled_from(HOSTS))
    framing, body, fv = part("framing", st.sampled_from(FRAMINGS_OK), st.sampled_from(FRAMINGS))
    lines, parts = [], [mv, tv, vv, fv]
    size = 0
    for (name, nv), (value, valv), eol in part("fields", FIELDS_OK, FIELDS):
        lines.append(name + b": " + value + eol)
        parts += [nv, valv]
        size += len(name) + len(value) + 4
    if size > LIMITS.max_header_size:
        parts.append("bad")
    head = method + b" " + target + b" " + ver + draw(eols) + host + framing + b"".join(lines)
    return head + draw(eols) + body, verdict(hv, *parts)


# --- driving the patched reader ------------------------------------------------------------


@pytest.fixture(scope="module")
def options() -> Iterator[Any]:
    errors.install_error_page("test_wire_fuzz")
    wire.install()
    wire.configure(
        max_head=MAX_HEAD, header_timeout=10.0, max_body=1000, max_url=LIMITS.max_url_length
    )
    with taddons.context(Proxyserver()) as tctx:
        yield tctx.options
    wire.configure(max_head=None, header_timeout=0, max_body=None)
    errors.uninstall_error_page("test_wire_fuzz")


def serve(options: Any, pieces: list[bytes]) -> tuple[int | None, RequestHeaders | None]:
    """Feed `pieces` to a fresh reverse-mode Http1Server: (the status it answered, or None;
    the request head it accepted, or None). A refusal must close the connection."""
    client = tflow.tclient_conn()
    client.state = ConnectionState.OPEN
    client.proxy_mode = mode_specs.ProxyMode.parse("reverse:http://127.0.0.1:1")
    s = _http1.Http1Server(Context(client, options))
    cmds = list(s.handle_event(events.Start()))
    for piece in pieces:
        cmds += s.handle_event(events.DataReceived(client, piece))
        sent = b"".join(c.data for c in cmds if isinstance(c, commands.SendData))
        if sent:
            head, _, body = sent.partition(b"\r\n\r\n")
            assert json.loads(body)["error"]["code"], sent
            assert any(isinstance(c, commands.CloseConnection) for c in cmds), cmds
            return int(head.split()[1]), None
    got = [c.event for c in cmds if isinstance(c, ReceiveHttp)]
    return None, next((e for e in got if isinstance(e, RequestHeaders)), None)


def hygiene_status(ev: RequestHeaders) -> int | None:
    """What hygiene's checks answer the accepted head (its requestheaders, reverse mode: the
    Host fields as the wire guards noted them, before mitmproxy replaces them)."""
    req = ev.request.data
    found = hygiene.check_request_line(
        req.method, req.path, req.http_version, LIMITS, http1=True
    ) or hygiene.check_fields(req.headers.fields, req.http_version, LIMITS)
    if not isinstance(found, hygiene.Refusal):
        hosts = wire.sent_hosts(ev.request)
        assert hosts is not None, "the wire guards did not note the Host fields"
        found = hygiene.check_host(hosts, req.http_version)
    return errors.STATUS[found.code] if found else None


def _split(data: bytes, at: int) -> list[bytes]:
    at %= len(data) + 1
    return [p for p in (data[:at], data[at:]) if p]


@FUZZ
@given(head=heads(), at=st.integers(0, 1 << 20))
def test_request_heads(options: Any, head: tuple[bytes, str], at: int) -> None:
    data, want = head
    status, accepted = serve(options, _split(data, at))
    if accepted is not None:
        status = hygiene_status(accepted)
    else:
        assert status is not None, f"a complete head got no answer: {data[:300]!r}"
    assert status is None or 400 <= status < 500, (status, data[:300])
    if want == "ok":
        assert status is None, (status, data[:300])
    elif want == "bad":
        assert status is not None, f"malformed head accepted: {data[:300]!r}"


@FUZZ
@given(data=st.binary(min_size=1, max_size=6000), at=st.integers(0, 1 << 13))
def test_noise(options: Any, data: bytes, at: int) -> None:
    """Arbitrary bytes: a 4xx and a close, a head accepted (and then checked), or a wait for
    more; never an exception."""
    status, accepted = serve(options, _split(data, at))
    if accepted is not None:
        status = hygiene_status(accepted)
    assert status is None or 400 <= status < 500, (status, data[:300])


@FUZZ
@given(pending=st.binary(max_size=3000), max_url=st.one_of(st.none(), st.integers(1, 2048)))
def test_check_head(pending: bytes, max_url: int | None) -> None:
    got = wire.check_head(pending, max_url)
    if got is not None:
        status, reason = got
        assert status in (400, 414) and reason


# --- chunked bodies ------------------------------------------------------------------------

_EXT = st.sampled_from([b"", b";a", b";a=b", b' ;name="quoted value"', b";x=1;y"])
_BAD_SIZES = [b"+5", b"-5", b"0x5", b" 5", b"", b"g", b"1" + b"0" * 16, b"f" * 17, b"8" + b"0" * 15]


@st.composite
def chunked(draw: st.DrawFn) -> tuple[bytes, bytes, str]:
    """A chunked body, the data it decodes to and its verdict: each chunk's size (hex, any
    case, leading zeros), extension and line endings, the last chunk and trailer fields, each
    possibly broken in one of the ways requests are smuggled with."""
    out, data, parts = b"", b"", []
    for payload in draw(st.lists(st.binary(min_size=1, max_size=40), max_size=4)):
        size = draw(st.sampled_from([b"%x", b"%X", b"000%x"])) % len(payload)
        bad_size = draw(st.sampled_from([None] * 6 + _BAD_SIZES))
        if bad_size is not None:
            size = bad_size
        ext = draw(st.one_of(_EXT.map(lambda e: (e, "ok")), st.sampled_from(CTL).map(
            lambda c: (b";e" + c, "bad")
        )))  # fmt: skip
        line_end = draw(st.sampled_from([b"\r\n"] * 4 + [b"\n", b"\r"]))
        data_end = draw(st.sampled_from([b"\r\n"] * 4 + [b"\n", b"XX", b"\r", b""]))
        out += size + ext[0] + line_end + payload + data_end
        data += payload
        parts += [
            "ok" if bad_size is None else "bad",
            ext[1],
            "ok" if line_end == b"\r\n" else "bad",
            "ok" if data_end == b"\r\n" else "bad",
        ]
    trailers = draw(st.sampled_from([(b"", "ok"), (b"X-T: 1\r\n", "ok"), (b"X-T: 1\n", "bad")]))
    last_end = draw(st.sampled_from([b"\r\n"] * 4 + [b"\n"]))
    out += b"0" + last_end + trailers[0] + b"\r\n"
    parts += ["ok" if last_end == b"\r\n" else "bad", trailers[1]]
    return out, data, verdict(*parts)


def read_chunked(pieces: list[bytes]) -> tuple[str, bytes, bytes]:
    """Feed `pieces` to the strict reader: ("ok", data, what is left after the body),
    ("refused", ...) or ("incomplete", ...) once the peer closed without a complete body.
    Any exception but h11's protocol errors escapes (and fails the test)."""
    r = wire.LimitedChunkedReader(MAX_HEAD)
    buf = ReceiveBuffer()
    data = b""
    try:
        for i, piece in enumerate(pieces):
            buf += piece
            while (ev := r(buf)) is not None:
                if isinstance(ev, h11.EndOfMessage):
                    return "ok", data, bytes(buf) + b"".join(pieces[i + 1 :])
                data += ev.data
        r.read_eof()
    except h11.LocalProtocolError:
        assert r.malformed
        return "refused", data, b""
    except h11.RemoteProtocolError:
        return "incomplete", data, b""
    raise AssertionError("read_eof returned")


@FUZZ
@given(
    body=chunked(), cuts=st.lists(st.integers(0, 1 << 10), max_size=4), after=st.binary(max_size=8)
)
def test_chunked_bodies(body: tuple[bytes, bytes, str], cuts: list[int], after: bytes) -> None:
    raw, data, want = body
    stream = raw + after  # what a client pipelines after the body is not read as body
    bounds = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    pieces = [stream[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    got, decoded, rest = read_chunked(pieces)
    if want == "ok":
        assert (got, decoded, rest) == ("ok", data, after), raw
    else:
        assert got != "ok", f"malformed chunked body accepted: {raw!r}"
