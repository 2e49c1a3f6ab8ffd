from __future__ import annotations

import asyncio
import gzip
import inspect

import brotli
import pytest
import zstandard
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow, tutils

from addons import compress, schema
from addons.compress import (
    Compress,
    merge_vary,
    negotiate,
    no_transform,
    parse_accept_encoding,
    skip_reason,
    weaken_etag,
)
from addons.kernel.record import record

ALL = ("zstd", "br", "gzip")
TEXT = b"".join(b"<p>line %d of a page that compresses well</p>\n" % i for i in range(400))


def decode(coding: str, data: bytes) -> bytes:
    if coding == "gzip":
        return gzip.decompress(data)
    if coding == "br":
        return brotli.decompress(data)
    return zstandard.ZstdDecompressor().decompress(data)


# --- Accept-Encoding --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("gzip", {"gzip": 1.0}),
        ("gzip, deflate, br, zstd", {"gzip": 1.0, "deflate": 1.0, "br": 1.0, "zstd": 1.0}),
        ("GZIP;Q=0.5", {"gzip": 0.5}),
        ("x-gzip", {"gzip": 1.0}),
        ("br;q=0.8, *;q=0.1", {"br": 0.8, "*": 0.1}),
        ("gzip;q=1.000, br;q=0.001", {"gzip": 1.0, "br": 0.001}),
        ("gzip ; q=0 ", {"gzip": 0.0}),
        ("gzip;q=1.5, br", {"br": 1.0}),  # invalid qvalue: entry void
        ("gzip;q=0.1234", {}),
        ("gzip;q=abc", {}),
        ("gzip;level=1;q=0.3", {"gzip": 0.3}),
        ("gzip, gzip;q=0", {"gzip": 0.0}),  # listed twice: the refusal stands
        ("", {}),
        (" , ,", {}),
    ],
)
def test_parse_accept_encoding(header: str, expected: dict[str, float]) -> None:
    assert parse_accept_encoding(header) == expected


@pytest.mark.parametrize(
    ("header", "algorithms", "expected"),
    [
        (None, ALL, None),  # no header: identity
        ("", ALL, None),  # empty: only identity acceptable
        ("identity", ALL, None),
        ("gzip", ALL, "gzip"),
        ("br", ALL, "br"),
        ("zstd", ALL, "zstd"),
        ("deflate", ALL, None),  # not offered
        ("gzip, deflate, br, zstd", ALL, "zstd"),  # tie: server preference
        ("gzip, deflate, br, zstd", ("gzip", "br", "zstd"), "gzip"),
        ("gzip, deflate, br", ALL, "br"),
        ("gzip;q=1, br;q=0.5, zstd;q=0.2", ALL, "gzip"),  # client's q wins over preference
        ("gzip;q=0, br;q=0", ALL, None),
        ("gzip;q=0, *", ALL, "zstd"),
        ("*", ALL, "zstd"),
        ("*;q=0", ALL, None),
        ("*;q=0.5, zstd;q=0", ALL, "br"),
        ("br;q=0.5, identity;q=1", ALL, None),  # identity preferred
        ("br;q=0.5, identity;q=0.5", ALL, "br"),  # tie with identity: compress
        ("br, identity;q=0", ALL, "br"),
        ("identity;q=0", ALL, None),  # nothing else offered: identity anyway
        ("x-gzip", ALL, "gzip"),
        ("gzip", ("br",), None),  # gzip not enabled
        ("gzip, br", (), None),
    ],
)
def test_negotiate(header: str | None, algorithms: tuple[str, ...], expected: str | None) -> None:
    assert negotiate(header, algorithms) == expected


# --- skip rules --------------------------------------------------------------------------------

ALLOWED = compress.compile_content_types(compress.DEFAULT_CONTENT_TYPES)


def allowed(ct: bytes) -> bool:
    return ALLOWED.fullmatch(compress.media_type(ct.decode())) is not None


def H(**fields: str) -> http.Headers:
    return http.Headers(**{k.replace("_", "-"): v for k, v in fields.items()})


BODY = b"x" * 2000


# fmt: off
@pytest.mark.parametrize(
    ("method", "status", "req", "resp", "body", "streamed", "expected"),
    [
        ("GET", 200, H(), H(content_type="text/html"), BODY, False, None),
        ("GET", 404, H(), H(content_type="application/json"), BODY, False, None),
        ("POST", 201, H(), H(content_type="text/plain; charset=utf-8"), BODY, False, None),
        ("GET", 200, H(), H(content_type="text/html"), None, False, "streamed"),
        ("GET", 200, H(), H(content_type="text/html"), BODY, True, "streamed"),
        ("HEAD", 200, H(), H(content_type="text/html"), b"", False, "head"),
        ("GET", 204, H(), H(content_type="text/html"), BODY, False, "status"),
        ("GET", 304, H(), H(content_type="text/html"), BODY, False, "status"),
        ("GET", 206, H(range="bytes=0-9"), H(content_type="text/html"), BODY, False, "status"),
        ("GET", 101, H(), H(content_type="text/html"), BODY, False, "status"),
        ("GET", 200, H(), H(content_type="text/html"), b"x" * 1023, False, "small"),
        ("GET", 200, H(), H(content_type="text/html", content_encoding="gzip"), BODY, False, "encoded"),
        ("GET", 200, H(), H(content_type="text/html", content_encoding="br"), BODY, False, "encoded"),
        ("GET", 200, H(), H(content_type="text/html", content_encoding="identity"), BODY, False, None),
        ("GET", 200, H(), H(content_type="image/png"), BODY, False, "type"),
        ("GET", 200, H(), H(content_type="application/octet-stream"), BODY, False, "type"),
        ("GET", 200, H(), H(content_type="text/event-stream"), BODY, False, "type"),
        ("GET", 200, H(), H(), BODY, False, "type"),
        ("GET", 200, H(), H(content_type="application/vnd.api+json"), BODY, False, None),
        ("GET", 200, H(), H(content_type="TEXT/HTML; charset=UTF-8"), BODY, False, None),
        ("GET", 200, H(), H(content_type="text/html", content_range="bytes 0-1999/5000"), BODY, False, "range"),
        ("GET", 200, H(), H(content_type="text/html", cache_control="public, no-transform"), BODY, False, "no-transform"),
        ("GET", 200, H(), H(content_type="text/html", cache_control="No-Transform"), BODY, False, "no-transform"),
        ("GET", 200, H(cache_control="no-transform"), H(content_type="text/html"), BODY, False, "no-transform"),
        ("GET", 200, H(), H(content_type="text/html", cache_control="no-transformer"), BODY, False, None),
        ("GET", 200, H(), H(content_type="text/html", content_digest="sha-256=:x:"), BODY, False, "digest"),
        ("GET", 200, H(), H(content_type="text/html", content_md5="x"), BODY, False, "digest"),
    ],
)
# fmt: on
def test_skip_reason(
    method: str,
    status: int,
    req: http.Headers,
    resp: http.Headers,
    body: bytes | None,
    streamed: bool,
    expected: str | None,
) -> None:
    assert skip_reason(method, status, req, resp, body, streamed, 1024, allowed) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, False),
        ("", False),
        ("no-transform", True),
        ("max-age=60,no-transform", True),
        ('private="x", no-transform', True),
        ("no-transformation", False),
        ("x-no-transform", False),
    ],
)
def test_no_transform(value: str | None, expected: bool) -> None:
    assert no_transform(value) == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], "Accept-Encoding"),
        (["Origin"], "Origin, Accept-Encoding"),
        (["Origin, Cookie", "User-Agent"], "Origin, Cookie, User-Agent, Accept-Encoding"),
        (["accept-encoding"], None),
        (["Origin, Accept-Encoding"], None),
        (["*"], None),
    ],
)
def test_merge_vary(values: list[str], expected: str | None) -> None:
    assert merge_vary(values) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [('"abc"', 'W/"abc"'), ('W/"abc"', 'W/"abc"'), ("abc", "abc"), (' "a" ', 'W/"a"')],
)
def test_weaken_etag(value: str, expected: str) -> None:
    assert weaken_etag(value) == expected


@pytest.mark.parametrize(
    ("etag", "inm", "expected"),
    [
        ('"v1"', 'W/"v1"', 'W/"v1"'),  # client holds the compressed variant
        ('"v1"', '"x", W/"v1"', 'W/"v1"'),
        ('"v1"', '"v1"', None),  # the identity variant: the strong tag stays
        ('"v1"', 'W/"v2"', None),
        ('W/"v1"', 'W/"v1"', None),  # already weak from the origin
        (None, 'W/"v1"', None),
        ('"v1"', None, None),
        ('"v1"', "*", None),
    ],
)
def test_etag_for_304(etag: str | None, inm: str | None, expected: str | None) -> None:
    assert compress.etag_for_304(etag, inm) == expected


def test_addon_304_for_the_compressed_variant() -> None:
    addon = Compress()
    with taddons.context(addon):
        f = flow(body=b"", accept="gzip", etag='"v1"')
        f.request.headers["If-None-Match"] = 'W/"v1"'
        f.response.status_code = 304  # type: ignore[union-attr]
        run(addon, f)
        assert f.response.headers["etag"] == 'W/"v1"'  # type: ignore[union-attr]
        assert f.response.headers["vary"] == "Accept-Encoding"  # type: ignore[union-attr]
        f = flow(body=b"", accept="gzip", etag='"v1"')
        f.request.headers["If-None-Match"] = '"v1"'
        f.response.status_code = 304  # type: ignore[union-attr]
        run(addon, f)
        assert f.response.headers["etag"] == '"v1"'  # type: ignore[union-attr]
        assert "vary" not in f.response.headers  # type: ignore[union-attr]


@pytest.mark.parametrize("pattern", ["text", "text/", "/html", "text/html x", ""])
def test_bad_content_type_patterns(pattern: str) -> None:
    with pytest.raises(ValueError, match="media type pattern"):
        compress.compile_content_types([pattern])


@pytest.mark.parametrize(("alg", "level"), [("gzip", 1), ("gzip", 9), ("br", 0), ("br", 11), ("zstd", 1), ("zstd", 19)])
def test_compress_round_trips(alg: str, level: int) -> None:
    assert decode(alg, compress.compress(alg, level, TEXT)) == TEXT


def test_gzip_is_deterministic() -> None:
    # mtime 0: the same body gives the same bytes (memo and caches downstream rely on it)
    assert compress.compress("gzip", 6, TEXT) == compress.compress("gzip", 6, TEXT)


# --- the addon ---------------------------------------------------------------------------------


def flow(
    body: bytes = TEXT,
    accept: str | None = "gzip, deflate, br, zstd",
    method: str = "GET",
    **resp_headers: str,
) -> http.HTTPFlow:
    headers = {"content-type": "text/html; charset=utf-8", **resp_headers}
    req = tutils.treq(method=method.encode())
    if accept is not None:
        req.headers["Accept-Encoding"] = accept
    resp = http.Response.make(200, body, {k.replace("_", "-"): v for k, v in headers.items()})
    f = tflow.tflow(req=req, resp=resp)
    f.live = True
    return f


def run(addon: Compress, f: http.HTTPFlow) -> None:
    ret = addon.response(f)
    if inspect.isawaitable(ret):
        asyncio.run(ret)


@pytest.mark.parametrize("alg", ALL)
def test_addon_compresses_and_fixes_headers(alg: str) -> None:
    addon = Compress()
    with taddons.context(addon):
        f = flow(accept=alg, etag='"v1"', vary="Origin", accept_ranges="bytes")
        run(addon, f)
        r = f.response
        assert r is not None
        assert r.headers["content-encoding"] == alg
        assert int(r.headers["content-length"]) == len(r.raw_content) < len(TEXT)
        assert decode(alg, r.raw_content) == TEXT
        assert r.headers["etag"] == 'W/"v1"'
        assert r.headers.get_all("vary") == ["Origin, Accept-Encoding"]
        assert "accept-ranges" not in r.headers
        assert record(f)["compression"] == alg


def test_addon_not_accepted_only_adds_vary() -> None:
    addon = Compress()
    with taddons.context(addon):
        f = flow(accept=None, etag='"v1"')
        run(addon, f)
        r = f.response
        assert r is not None and r.raw_content == TEXT
        assert "content-encoding" not in r.headers
        assert r.headers["etag"] == '"v1"'
        assert r.headers["vary"] == "Accept-Encoding"
        assert "compression" not in record(f)


def test_addon_skipped_response_untouched() -> None:
    addon = Compress()
    with taddons.context(addon):
        f = flow(content_type="image/png")
        before = f.response.headers.fields  # type: ignore[union-attr]
        run(addon, f)
        assert f.response.raw_content == TEXT  # type: ignore[union-attr]
        assert f.response.headers.fields == before  # type: ignore[union-attr]


def test_addon_chunked_response_gets_no_content_length() -> None:
    addon = Compress()
    with taddons.context(addon):
        f = flow(accept="gzip")
        r = f.response
        assert r is not None
        del r.headers["content-length"]
        r.headers["Transfer-Encoding"] = "chunked"
        run(addon, f)
        assert "content-length" not in r.headers
        assert r.headers["transfer-encoding"] == "chunked"
        assert gzip.decompress(r.raw_content) == TEXT


def test_addon_existing_vary_star_kept() -> None:
    addon = Compress()
    with taddons.context(addon):
        f = flow(accept="br", vary="*")
        run(addon, f)
        assert f.response.headers.get_all("vary") == ["*"]  # type: ignore[union-attr]


def test_addon_streamed_and_disabled() -> None:
    addon = Compress()
    with taddons.context(addon) as tctx:
        f = flow()
        f.response.stream = True  # type: ignore[union-attr]
        run(addon, f)
        assert f.response.raw_content == TEXT  # type: ignore[union-attr]
        tctx.configure(addon, compress_enabled=False)
        f = flow()
        run(addon, f)
        assert f.response.raw_content == TEXT  # type: ignore[union-attr]
        assert "vary" not in f.response.headers  # type: ignore[union-attr]


def test_addon_offloads_large_bodies_to_a_thread() -> None:
    addon = Compress()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, compress_offload_threshold="4KB", compress_memo_size="0")
        small = flow(body=TEXT[:3000], accept="zstd")
        assert addon.response(small) is None  # done inline
        assert small.response.headers["content-encoding"] == "zstd"  # type: ignore[union-attr]
        big = flow(accept="zstd")
        ret = addon.response(big)
        assert inspect.isawaitable(ret)
        assert "content-encoding" not in big.response.headers  # type: ignore[union-attr]
        asyncio.run(ret)
        assert decode("zstd", big.response.raw_content) == TEXT  # type: ignore[union-attr]


def test_addon_memo_serves_repeated_bodies() -> None:
    addon = Compress()
    with taddons.context(addon):
        hits = compress.STORE.memo["hit"]
        first = flow(accept="br")
        run(addon, first)
        second = flow(accept="br")
        second.response.raw_content = TEXT  # type: ignore[union-attr]  # the same object, as a cache hands out
        run(addon, second)
        assert compress.STORE.memo["hit"] == hits + 1
        assert second.response.raw_content == first.response.raw_content  # type: ignore[union-attr]
        assert decode("br", second.response.raw_content) == TEXT  # type: ignore[union-attr]
        other = flow(accept="gzip")  # another coding: its own entry
        run(addon, other)
        assert compress.STORE.memo["hit"] == hits + 1


def test_addon_memo_stays_within_its_budget() -> None:
    addon = Compress()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, compress_memo_size="64KB")
        for i in range(40):
            run(addon, flow(body=TEXT + b"%d" % i, accept="zstd"))
        assert addon.memo.currsize <= 64 * 1024
        assert 0 < len(addon.memo) < 40


def test_metrics_count_bytes() -> None:
    addon = Compress()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, compress_memo_size="0")
        st = compress.STORE
        before = (st.bytes_in, st.bytes_out, st.responses.get("gzip", 0))
        f = flow(accept="gzip")
        run(addon, f)
        assert st.bytes_in - before[0] == len(TEXT)
        assert st.bytes_out - before[1] == len(f.response.raw_content)  # type: ignore[union-attr]
        assert st.responses["gzip"] == before[2] + 1
        from addons.metrics import REGISTRY

        assert REGISTRY.get_sample_value(
            "compression_bytes_total", {"direction": "in"}
        ) == st.bytes_in
        assert REGISTRY.get_sample_value(
            "compression_responses_total", {"encoding": "gzip"}
        ) == st.responses["gzip"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"compress_algorithms": ["gzip", "deflate"]}, "compress_algorithms: unknown coding 'deflate'"),
        ({"compress_algorithms": ["gzip", "gzip"]}, "listed twice"),
        ({"compress_gzip_level": 0}, "compress_gzip_level: 0 is outside 1-9"),
        ({"compress_br_level": 12}, "compress_br_level"),
        ({"compress_zstd_level": 22}, "compress_zstd_level: 22 is outside 1-19"),
        ({"compress_min_size": "lots"}, "compress_min_size"),
        ({"compress_offload_threshold": "-1"}, "compress_offload_threshold"),
        ({"compress_content_types": ["text"]}, "compress_content_types"),
    ],
)
def test_option_errors(options: dict, message: str) -> None:
    addon = Compress()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match=message):
            tctx.configure(addon, **options)


def test_option_defaults_match_the_profile() -> None:
    addon = Compress()
    with taddons.context(addon) as tctx:
        defaults = {
            k: tctx.options.default(k) for k in tctx.options.keys() if k.startswith("compress_")
        }
    from_profile = {
        k: v for k, v in schema.to_options(schema.Profile()).items() if k.startswith("compress_")
    }
    assert set(defaults) == set(from_profile)
    # The one deliberate difference: loading compress.py alone opts in; the profile opts out.
    assert defaults.pop("compress_enabled") is True
    assert from_profile["compress_enabled"] is False
    for k, v in defaults.items():
        want = from_profile[k]
        if k in ("compress_min_size", "compress_offload_threshold", "compress_memo_size"):
            from addons.kernel.units import parse_size

            assert parse_size(v) == parse_size(want), k
        else:
            assert list(v) == list(want) if isinstance(v, list | tuple) else v == want, k


def test_profile_section_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "p.yaml"
    p.write_text("compression:\n  algorithms: [gzip, lz4]\n  levels: {br: 12}\n  min_size: big\n")
    with pytest.raises(schema.ProfileError) as e:
        schema.load(p, {})
    text = str(e.value)
    assert "compression.algorithms.1" in text
    assert "compression.levels.br" in text
    assert "compression.min_size" in text


def test_http2_responses_get_lowercase_field_names() -> None:
    addon = Compress()
    with taddons.context(addon):
        f = flow(accept="gzip")
        f.response.http_version = "HTTP/2.0"  # type: ignore[union-attr]
        run(addon, f)
        names = [k for k, _ in f.response.headers.fields]  # type: ignore[union-attr]
        assert b"content-encoding" in names and b"vary" in names and b"content-length" in names
        f = flow(accept=None)
        f.response.http_version = "HTTP/2.0"  # type: ignore[union-attr]
        run(addon, f)
        assert (b"vary", b"Accept-Encoding") in f.response.headers.fields  # type: ignore[union-attr]
