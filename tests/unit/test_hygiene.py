from __future__ import annotations

from collections.abc import Iterator

import pytest
from mitmproxy import exceptions
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import mode_specs
from mitmproxy.test import taddons, tflow

from addons import hygiene
from addons.hygiene import Fields, Hygiene, Limits, Refusal
from addons.kernel import endpoints, wire

L = Limits(max_url_length=100, max_header_size=300, max_headers_count=5, max_body_size=1000)


@pytest.fixture(autouse=True)
def _reset_wire() -> Iterator[None]:
    yield
    wire.configure(max_head=None, header_timeout=0, max_body=None)


def _rule(r: Refusal | Fields | None) -> str | None:
    return r.rule if isinstance(r, Refusal) else None


@pytest.mark.parametrize(
    ("method", "target", "version", "http1", "rule"),
    [
        (b"GET", b"/", b"HTTP/1.1", True, None),
        (b"GET", b"/", b"HTTP/1.0", True, None),
        (b"OPTIONS", b"*", b"HTTP/1.1", True, None),
        (b"GET", b"/", b"HTTP/2.0", False, None),
        (b"G\x00ET", b"/", b"HTTP/1.1", True, "invalid_method"),
        (b"GE(T", b"/", b"HTTP/1.1", True, "invalid_method"),
        (b"", b"/", b"HTTP/1.1", True, "invalid_method"),
        (b"A" * 32, b"/", b"HTTP/1.1", True, None),
        (b"A" * 33, b"/", b"HTTP/1.1", True, "method_too_long"),
        (b"A" * 8192, b"/", b"HTTP/1.1", True, "method_too_long"),
        (b"TRACE", b"/", b"HTTP/1.1", True, "blocked_method"),
        (b"track", b"/", b"HTTP/1.1", True, "blocked_method"),
        (b"GET", b"/" + b"a" * 100, b"HTTP/1.1", True, "max_url_length"),
        (b"GET", b"/" + b"a" * 99, b"HTTP/1.1", True, None),
        (b"GET", b"/a\x00b", b"HTTP/1.1", True, "invalid_target"),
        (b"GET", b"/a\rb", b"HTTP/1.1", True, "invalid_target"),
        (b"GET", b"/a\nb", b"HTTP/1.1", True, "invalid_target"),
        (b"GET", b"/a b", b"HTTP/1.1", True, "invalid_target"),
        (b"GET", b"/\x7f", b"HTTP/1.1", True, "invalid_target"),
        (b"GET", b"/caf\xc3\xa9", b"HTTP/1.1", True, None),
        (b"GET", b"*", b"HTTP/1.1", True, "asterisk_form"),
        (b"GET", b"/", b"HTTP/2.0", True, "http_version"),
        (b"GET", b"/", b"HTTP/1.2", True, "http_version"),
        (b"GET", b"/", b"HTTP/0.9", True, "http_version"),
    ],
)
def test_check_request_line(
    method: bytes, target: bytes, version: bytes, http1: bool, rule: str | None
) -> None:
    assert _rule(hygiene.check_request_line(method, target, version, L, http1=http1)) == rule


H = (b"Host", b"example.com")


@pytest.mark.parametrize(
    ("fields", "version", "rule"),
    [
        ([H], b"HTTP/1.1", None),
        ([H, (b"X-A", b"a\tb")], b"HTTP/1.1", None),
        ([H, (b"X-A", b"caf\xc3\xa9")], b"HTTP/1.1", None),
        ([H] * 6, b"HTTP/1.1", "max_headers_count"),
        ([H, (b"X", b"v" * 300)], b"HTTP/1.1", "max_header_size"),
        ([H, (b"X A", b"v")], b"HTTP/1.1", "invalid_header_name"),
        ([H, (b"X\x00", b"v")], b"HTTP/1.1", "invalid_header_name"),
        ([H, (b"", b"v")], b"HTTP/1.1", "invalid_header_name"),
        ([H, (b"X", b"a\r\n b")], b"HTTP/1.1", "obs_fold"),
        ([H, (b"X", b"a\r\n Transfer-Encoding: chunked")], b"HTTP/1.1", "obs_fold"),
        ([H, (b"X", b"a\rb")], b"HTTP/1.1", "bare_cr"),
        ([H, (b"X", b"a\x00b")], b"HTTP/1.1", "nul"),
        ([H, (b"X", b"a\x01b")], b"HTTP/1.1", "header_ctl"),
        ([H, (b"X", b"a\x7fb")], b"HTTP/1.1", "header_ctl"),
        ([H, (b"Content-Length", b"10")], b"HTTP/1.1", None),
        ([H, (b"Content-Length", b"10"), (b"content-length", b"10")], b"HTTP/1.1", None),
        (
            [H, (b"Content-Length", b"10"), (b"Content-Length", b"11")],
            b"HTTP/1.1",
            "multiple_content_length",
        ),
        ([H, (b"Content-Length", b"1,1")], b"HTTP/1.1", "invalid_content_length"),
        ([H, (b"Content-Length", b"-1")], b"HTTP/1.1", "invalid_content_length"),
        ([H, (b"Content-Length", b"1001")], b"HTTP/1.1", "max_body_size"),
        ([H, (b"Content-Length", b"1000")], b"HTTP/1.1", None),
        ([H, (b"Transfer-Encoding", b"chunked")], b"HTTP/1.1", None),
        ([H, (b"Transfer-Encoding", b"gzip, Chunked")], b"HTTP/1.1", None),
        (
            [H, (b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"3")],
            b"HTTP/1.1",
            "te_and_cl",
        ),
        ([H, (b"Transfer-Encoding", b"chunked")], b"HTTP/1.0", "te_http10"),
        ([H, (b"Transfer-Encoding", b"chunked, gzip")], b"HTTP/1.1", "te_not_chunked"),
        ([H, (b"Transfer-Encoding", b"chunked, chunked")], b"HTTP/1.1", "te_not_chunked"),
        ([H, (b"Transfer-Encoding", b"gzip")], b"HTTP/1.1", "te_not_chunked"),
        (
            [H, (b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")],
            b"HTTP/1.1",
            "te_not_chunked",
        ),
    ],
)
def test_check_fields(fields: list[tuple[bytes, bytes]], version: bytes, rule: str | None) -> None:
    assert _rule(hygiene.check_fields(fields, version, L)) == rule


@pytest.mark.parametrize(
    ("fields", "hosts", "h2c"),
    [
        ([H], [b"example.com"], False),
        ([H, (b"upgrade", b"H2C")], [b"example.com"], True),
        ([H, (b"Upgrade", b"foo, h2c")], [b"example.com"], True),
        ([H, (b"Upgrade", b"websocket")], [b"example.com"], False),
        ([H, (b"HOST", b"b")], [b"example.com", b"b"], False),
    ],
)
def test_check_fields_facts(
    fields: list[tuple[bytes, bytes]], hosts: list[bytes], h2c: bool
) -> None:
    assert hygiene.check_fields(fields, b"HTTP/1.1", L) == Fields(hosts, h2c)


@pytest.mark.parametrize(
    ("hosts", "version", "rule"),
    [
        ([b"example.com"], b"HTTP/1.1", None),
        ([b"example.com:8080"], b"HTTP/1.1", None),
        ([b"[::1]:8080"], b"HTTP/1.1", None),
        ([b"127.0.0.1"], b"HTTP/1.1", None),
        ([], b"HTTP/1.1", "missing_host"),
        ([], b"HTTP/1.0", None),
        ([b"a", b"a"], b"HTTP/1.1", "duplicate_host"),
        ([b"a", b"b"], b"HTTP/1.0", "duplicate_host"),
        ([b""], b"HTTP/1.1", "invalid_host"),
        ([b"a b"], b"HTTP/1.1", "invalid_host"),
        ([b"a/b"], b"HTTP/1.1", "invalid_host"),
        ([b"a@b"], b"HTTP/1.1", "invalid_host"),
        ([b"a:123456"], b"HTTP/1.1", "invalid_host"),
    ],
)
def test_check_host(hosts: list[bytes], version: bytes, rule: str | None) -> None:
    assert _rule(hygiene.check_host(hosts, version)) == rule


@pytest.mark.parametrize(
    ("value", "host", "port", "default", "match"),
    [
        (b"example.com", "example.com", 80, 80, True),
        (b"EXAMPLE.com:80", "example.com", 80, 80, True),
        (b"example.com:", "example.com", 80, 80, True),
        (b"example.com:8080", "example.com", 8080, 80, True),
        (b"example.com", "example.com", 8080, 80, False),
        (b"evil.example", "example.com", 80, 80, False),
        (b"[::1]:8080", "::1", 8080, 80, True),
        (b"xn--caf-dma.example", "café.example", 443, 443, True),
    ],
)
def test_authority_matches(value: bytes, host: str, port: int, default: int, match: bool) -> None:
    assert hygiene.authority_matches(value, host, port, default) is match


@pytest.mark.parametrize(
    ("host", "port", "default", "want"),
    [
        ("example.com", 80, 80, "example.com"),
        ("example.com", 8080, 80, "example.com:8080"),
        ("::1", 8080, 80, "[::1]:8080"),
        ("café.example", 443, 443, "xn--caf-dma.example"),
    ],
)
def test_url_authority(host: str, port: int, default: int, want: str) -> None:
    assert hygiene.url_authority(host, port, default) == want


@pytest.mark.parametrize(
    ("fields", "want"),
    [
        (
            [
                H,
                (b"Upgrade", b"h2c"),
                (b"Connection", b"Upgrade, HTTP2-Settings"),
                (b"HTTP2-Settings", b"x"),
            ],
            [H],
        ),
        (
            [H, (b"Upgrade", b"foo, H2C"), (b"Connection", b"keep-alive, upgrade, http2-settings")],
            [H, (b"Upgrade", b"foo"), (b"Connection", b"keep-alive, upgrade")],
        ),
        (
            [H, (b"upgrade", b"h2c"), (b"Connection", b"keep-alive, Upgrade")],
            [H, (b"Connection", b"keep-alive")],
        ),
    ],
)
def test_strip_h2c(fields: list[tuple[bytes, bytes]], want: list[tuple[bytes, bytes]]) -> None:
    assert hygiene.strip_h2c(fields) == tuple(want)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((8192, 16384, 100, "10MB", ["TRACE"]), None),
        ((0, 16384, 100, "10MB", []), "limits_max_url_length"),
        ((8192, -1, 100, "10MB", []), "limits_max_header_size"),
        ((8192, 16384, 0, "10MB", []), "limits_max_headers_count"),
        ((8192, 16384, 100, "ten", []), "limits_max_body_size"),
        ((8192, 16384, 100, "10MB", ["TR ACE"]), "limits_blocked_methods"),
    ],
)
def test_parse_limits(args: tuple, error: str | None) -> None:
    if error is None:
        lim = hygiene.parse_limits(*args)
        assert lim.max_body_size == 10 * 1024 * 1024
        assert lim.blocked_methods == frozenset({b"TRACE"})
    else:
        with pytest.raises(ValueError, match=error):
            hygiene.parse_limits(*args)


# --- the addon ------------------------------------------------------------------------------


def test_configure_sets_body_size_limit_and_wire_limits() -> None:
    h = Hygiene()
    with taddons.context(Proxyserver(), h) as tctx:
        tctx.configure(h, limits_max_body_size="1KB", limits_header_timeout="2s")
        assert tctx.options.body_size_limit == "1024"
        assert h.header_timeout == 2.0
        if h.wire_active:
            lim = wire.limits()
            assert lim is not None
            assert lim.max_body == 1024
            assert lim.header_timeout == 2.0
            assert lim.max_head == 8192 + 16384 + hygiene.HEAD_SLACK
        tctx.configure(h, limits_max_body_size="2KB")
        assert tctx.options.body_size_limit == "2048"


def test_configure_keeps_user_body_size_limit() -> None:
    h = Hygiene()
    with taddons.context(Proxyserver(), h) as tctx:
        tctx.configure(h, body_size_limit="5m")
        tctx.configure(h, limits_max_body_size="1KB")
        assert tctx.options.body_size_limit == "5m"


@pytest.mark.parametrize(
    "option",
    [
        {"limits_max_body_size": "lots"},
        {"limits_header_timeout": "soon"},
        {"limits_max_url_length": 0},
        {"limits_blocked_methods": ["BAD METHOD"]},
        {"limits_origin_form": "maybe"},
    ],
)
def test_configure_rejects(option: dict) -> None:
    h = Hygiene()
    with taddons.context(h) as tctx:
        with pytest.raises(exceptions.OptionsError, match=next(iter(option))):
            tctx.configure(h, **option)


def _flow(**headers: str) -> tflow.HTTPFlow:
    f = tflow.tflow()
    f.request.headers.clear()
    f.request.headers["Host"] = "address:22"
    for k, v in headers.items():
        f.request.headers[k.replace("_", "-")] = v
    return f


def test_requestheaders_refuses_and_records() -> None:
    h = Hygiene()
    with taddons.context(h):
        f = _flow(X_A="a\r\n b")
        h.requestheaders(f)
        assert f.response is not None and f.response.status_code == 400
        assert f.response.headers["Connection"] == "close"
        meta = f.metadata["waypost"]
        assert (meta["decision"], meta["blocked_by"], meta["rule"]) == (
            "blocked",
            "hygiene",
            "obs_fold",
        )


def test_requestheaders_passes_clean_request() -> None:
    h = Hygiene()
    with taddons.context(h):
        f = _flow(Accept="*/*")
        h.requestheaders(f)
        assert f.response is None
        assert "decision" not in f.metadata.get("waypost", {})


def test_requestheaders_rewrites_host_and_strips_h2c() -> None:
    h = Hygiene()
    with taddons.context(h):
        f = _flow(Upgrade="h2c", Connection="Upgrade, HTTP2-Settings", HTTP2_Settings="x")
        f.request.headers["Host"] = "evil.example"
        h.requestheaders(f)
        assert f.response is None
        assert f.request.headers.fields == ((b"Host", b"address:22"),)
        assert f.metadata["waypost"]["hygiene"] == ["host_rewritten", "h2c_stripped"]


def test_requestheaders_keeps_host_in_tunnels_and_reverse_mode() -> None:
    h = Hygiene()
    with taddons.context(h):
        f = _flow()
        f.request.headers["Host"] = "other.example"
        h.http_connected(f)
        h.requestheaders(f)
        assert f.request.headers["Host"] == "other.example"
        h.client_disconnected(f.client_conn)
        f2 = _flow()
        f2.request.headers["Host"] = "other.example"
        f2.client_conn.proxy_mode = mode_specs.ProxyMode.parse("reverse:http://127.0.0.1:1")
        h.requestheaders(f2)
        assert f2.request.headers["Host"] == "other.example"


def test_http_connect_checks() -> None:
    h = Hygiene()
    with taddons.context(h):
        f = tflow.tflow()
        f.request.method = "CONNECT"
        f.request.authority = "example.com:443"
        f.request.headers["X"] = "a\x00"
        h.http_connect(f)
        assert f.response is not None and f.response.status_code == 400


def test_h2_flows_skip_http1_rules() -> None:
    h = Hygiene()
    with taddons.context(h):
        f = _flow()
        f.request.headers.clear()
        f.request.http_version = "HTTP/2.0"
        f.client_conn.alpn = b"h2"
        h.requestheaders(f)
        assert f.response is None


def test_fail_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Hygiene()

    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(hygiene, "check_request_line", boom)
    with taddons.context(h):
        f = _flow()
        h.requestheaders(f)
        assert f.response is not None and f.response.status_code == 500


def test_guard_skips_answered_flows() -> None:
    h = Hygiene()
    with taddons.context(h):
        f = _flow(X_A="a\x00")
        f.response = tflow.tresp()
        h.requestheaders(f)
        assert f.response.status_code == 200


def _sent(monkeypatch: pytest.MonkeyPatch, authority: bytes | None) -> None:
    """As if the wire guards had read the request line with this authority."""
    monkeypatch.setattr(wire, "sent_authority", lambda request: authority)


@pytest.mark.parametrize(
    ("authority", "status"),
    [(b"example.com:8080", 414), (None, None)],
)
def test_url_limit_counts_the_whole_absolute_target(
    monkeypatch: pytest.MonkeyPatch, authority: bytes | None, status: int | None
) -> None:
    # "http://example.com:8080" + a 41-byte path is 64 bytes; the path alone is 41.
    _sent(monkeypatch, authority)
    h = Hygiene()
    with taddons.context(h) as tctx:
        tctx.configure(h, limits_max_url_length=60)
        f = _flow()
        f.request.path = "/" + "a" * 40
        h.requestheaders(f)
        assert (f.response and f.response.status_code) == status


@pytest.mark.parametrize(
    ("sent", "rule"),
    [
        ([], "missing_host"),
        ([b"a.example", b"b.example"], "duplicate_host"),
        ([b"exa mple"], "invalid_host"),
        ([b"a.example"], None),
        (None, None),
    ],
)
def test_host_as_the_client_sent_it(
    monkeypatch: pytest.MonkeyPatch, sent: list[bytes] | None, rule: str | None
) -> None:
    """On a reverse listener mitmproxy replaced Host with the backend's (a valid one) before
    the hook; the wire guards noted the client's own fields, and those are checked."""
    monkeypatch.setattr(wire, "sent_hosts", lambda request: sent)
    h = Hygiene()
    with taddons.context(h):
        f = _flow()
        f.client_conn.proxy_mode = mode_specs.ProxyMode.parse("reverse:http://127.0.0.1:1")
        h.requestheaders(f)
        if rule is None:
            assert f.response is None
        else:
            assert f.response is not None and f.response.status_code == 400
            assert f.metadata["waypost"]["rule"] == rule


def test_origin_form_on_forward_listener(monkeypatch: pytest.MonkeyPatch) -> None:
    _sent(monkeypatch, b"")
    h = Hygiene()
    with taddons.context(h) as tctx:
        f = _flow()
        h.requestheaders(f)
        assert f.response is not None and f.response.status_code == 400
        assert f.metadata["waypost"]["rule"] == "origin_form"
        assert b"BAD_REQUEST" in f.response.content
        tctx.configure(h, limits_origin_form="relay")
        relayed = _flow()
        h.requestheaders(relayed)
        assert relayed.response is None


def test_origin_form_for_the_proxy_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    _sent(monkeypatch, b"")
    h = Hygiene()
    with taddons.context(h, Proxyserver()):
        f = _flow()
        f.request.headers["Host"] = "127.0.0.1:8080"
        f.request.host, f.request.port = "127.0.0.1", 8080
        f.client_conn.sockname = ("127.0.0.1", 8080)
        h.requestheaders(f)
        assert f.response is None


def test_origin_form_for_an_endpoint_of_the_proxy_under_any_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Kubernetes Service name in Host: the path alone says it is for the proxy."""
    _sent(monkeypatch, b"")
    monkeypatch.setattr(endpoints, "_own_paths", {"management": ("/health/",)})
    h = Hygiene()
    with taddons.context(h, Proxyserver()):
        f = _flow(Host="waypost.proxy.svc:8080")
        f.request.path = "/health/readiness"
        h.requestheaders(f)
        assert f.response is None
        other = _flow(Host="waypost.proxy.svc:8080")
        other.request.path = "/healthz"
        h.requestheaders(other)
        assert other.response is not None and other.response.status_code == 400
