"""The cache addon through taddons/tflow: keys, eligibility, storage limits, purge, metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from mitmproxy import exceptions, http
from mitmproxy import flow as mflow
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.test import taddons, tflow, tutils
from prometheus_client import generate_latest

from addons import errors
from addons.caching import patch
from addons.caching.addon import Cache
from addons.caching.answer import cache_status
from addons.caching.key import cache_key, compile_globs, normalise_url, pattern_matches
from addons.caching.store import Entry, Settings, Store
from addons.kernel.patching import CHAIN
from addons.kernel.record import record
from addons.metrics import REGISTRY
from addons.routing import retry as router


@pytest.mark.parametrize(
    "args,expected",
    [
        (("http", "Example.COM", 80, "/a"), "http://example.com/a"),  # case, default port
        (("https", "example.com", 443, "/a"), "https://example.com/a"),
        (("http", "example.com", 8080, "/a"), "http://example.com:8080/a"),
        (("http", "example.com", 80, "/a?b=2&a=1"), "http://example.com/a?a=1&b=2"),  # sorted
        (("http", "example.com", 80, "/a?b=2&&a=1&"), "http://example.com/a?a=1&b=2"),
        (("http", "example.com", 80, "/%7euser/%2f%41"), "http://example.com/~user/%2FA"),
        (("http", "example.com", 80, "/a?"), "http://example.com/a"),
        (("http", "::1", 80, "/"), "http://[::1]/"),
        (("http", "example.com.", 80, "/"), "http://example.com/"),
    ],
)
def test_normalise_url(args: tuple, expected: str) -> None:
    assert normalise_url(*args) == expected


def test_cache_key_is_sha256_over_method_url_and_vary() -> None:
    k1 = cache_key("GET", "http://a/x", [])
    assert len(k1) == 64
    assert k1 != cache_key("HEAD", "http://a/x", [])
    assert cache_key("GET", "http://a/x", [("accept-language", "en")]) != cache_key(
        "GET", "http://a/x", [("accept-language", "de")]
    )


@pytest.mark.parametrize(
    "patterns,url,expected",
    [
        ([], "http://a.example/x", True),
        (["*.css"], "http://a.example/s/site.css", True),
        (["*.css"], "http://a.example/s/site.js", False),
        (["/static/*"], "http://a.example/static/x.png", True),
        (["/static/*"], "http://a.example/api/x", False),
        (["*.example.com"], "http://img.example.com/x", True),
        (["http://a.example/api/*"], "http://a.example/api/v1", True),
    ],
)
def test_patterns(patterns: list[str], url: str, expected: bool) -> None:
    assert pattern_matches(compile_globs(patterns), url) is expected


@pytest.mark.parametrize(
    "args,expected",
    [
        (("HIT", 30), "waypost; hit; ttl=30"),
        (("MISS", None, 200), "waypost; fwd=uri-miss; fwd-status=200"),
        (("BYPASS", None, 200), "waypost; fwd=bypass; fwd-status=200"),
        (("REVALIDATED", 60, 304), "waypost; fwd=stale; fwd-status=304; ttl=60"),
        (("STALE", -5, 503), "waypost; fwd=stale; fwd-status=503; ttl=-5"),
        (("STALE", -5), "waypost; hit; ttl=-5"),
        (
            ("STALE", -5, None, "connection_refused"),
            "waypost; fwd=stale; ttl=-5; detail=connection_refused",
        ),
    ],
)
def test_cache_status(args: tuple, expected: str) -> None:
    assert cache_status(*args) == expected  # RFC 9211


# --- the addon -------------------------------------------------------------------------------


def _flow(
    path: str = "/a", method: str = "GET", headers: dict[str, str] | None = None
) -> http.HTTPFlow:
    f = tflow.tflow(
        req=tutils.treq(method=method.encode(), host="origin.example", port=80, path=path.encode())
    )
    for k, v in (headers or {}).items():
        f.request.headers[k] = v
    f.request.timestamp_start = time.time()
    return f


def _respond(
    c: Cache,
    f: http.HTTPFlow,
    status: int = 200,
    headers: dict[str, str] | None = None,
    body: bytes = b"hello",
) -> None:
    f.response = http.Response.make(status, body, headers or {})
    f.response.timestamp_start = time.time()
    c.response(f)


def _fetch(
    c: Cache,
    path: str = "/a",
    resp_headers: dict[str, str] | None = None,
    req_headers: dict[str, str] | None = None,
    method: str = "GET",
    status: int = 200,
    body: bytes = b"hello",
) -> http.HTTPFlow:
    """One request through the addon; the origin answers only when the cache did not."""
    f = _flow(path, method, req_headers)
    waiting = c.request(f)
    assert waiting is None
    if f.response is None:
        _respond(
            c,
            f,
            status,
            resp_headers if resp_headers is not None else {"Cache-Control": "max-age=60"},
            body,
        )
    else:
        c.response(f)
    return f


def test_miss_then_hit_then_head() -> None:
    c = Cache()
    with taddons.context(c):
        f1 = _fetch(c)
        assert f1.response.headers["X-Cache-Status"] == "MISS"
        assert record(f1)["cache"] == "MISS"
        f2 = _fetch(c)
        assert f2.response.headers["X-Cache-Status"] == "HIT"
        assert f2.response.content == b"hello"
        assert f2.response.headers["Age"] == "0"
        assert record(f2)["cache_hit"] is True
        f3 = _fetch(c, method="HEAD")
        assert f3.response.headers["X-Cache-Status"] == "HIT"
        assert f3.response.raw_content == b""
        assert f3.response.headers["Content-Length"] == "5"


def test_route_cache_and_patterns_decide_eligibility() -> None:
    c = Cache()
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_patterns=["/static/*"])
        assert _fetch(c, "/api").response.headers["X-Cache-Status"] == "BYPASS"
        assert _fetch(c, "/api").response.headers["X-Cache-Status"] == "BYPASS"
        _fetch(c, "/static/x")
        assert _fetch(c, "/static/x").response.headers["X-Cache-Status"] == "HIT"
        # the router's per-route setting wins over the patterns, both ways
        for route, path, expected in ((True, "/api/r", "HIT"), (False, "/static/y", "BYPASS")):
            for _ in range(2):
                f = _flow(path)
                record(f)["route_cache"] = route
                c.request(f)
                if f.response is None:
                    _respond(c, f, headers={"Cache-Control": "max-age=60"})
                else:
                    c.response(f)
            assert f.response.headers["X-Cache-Status"] == expected


def test_never_stores_streamed_or_large_or_cookie_responses() -> None:
    c = Cache()
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_max_object_size="10")
        _fetch(c, "/big", body=b"x" * 11)
        assert _fetch(c, "/big").response.headers["X-Cache-Status"] == "MISS"
        _fetch(c, "/cookie", {"Cache-Control": "max-age=60", "Set-Cookie": "a=b"})
        assert _fetch(c, "/cookie").response.headers["X-Cache-Status"] == "MISS"
        f = _flow("/stream")
        c.request(f)
        f.response = http.Response.make(200, b"", {"Cache-Control": "max-age=60"})
        f.response.stream = True
        c.response(f)
        assert _fetch(c, "/stream").response.headers["X-Cache-Status"] == "MISS"


def test_memory_stays_within_max_memory_under_a_flood_of_unique_urls() -> None:
    c = Cache()
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_max_memory="256KB", cache_max_object_size="8KB")
        for i in range(3000):
            _fetch(c, f"/flood/{i}", body=b"x" * 1024)
            assert c.shared.store.currsize <= 256 * 1024
        assert c.shared.store.evictions > 2000
        assert len(c.shared.store) < 256
        # the newest are still there, the oldest are gone
        assert _fetch(c, "/flood/2999").response.headers["X-Cache-Status"] == "HIT"
        assert _fetch(c, "/flood/0").response.headers["X-Cache-Status"] == "MISS"


def test_max_entries() -> None:
    c = Cache()
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_max_entries=10)
        for i in range(50):
            _fetch(c, f"/n/{i}")
        assert len(c.shared.store) == 10


def test_a_new_budget_keeps_the_most_recently_used_entries() -> None:
    c = Cache()
    with taddons.context(c) as tctx:
        for i in range(10):
            _fetch(c, f"/keep/{i}")
        _fetch(c, "/keep/0")  # now the most recently used
        tctx.configure(c, cache_max_entries=3)
        assert len(c.shared.store) == 3
        for path in ("/keep/0", "/keep/9", "/keep/8"):
            assert _fetch(c, path).response.headers["X-Cache-Status"] == "HIT", path
        assert _fetch(c, "/keep/1").response.headers["X-Cache-Status"] == "MISS"


def test_vary_selects_variants() -> None:
    c = Cache()
    with taddons.context(c):
        h = {"Cache-Control": "max-age=60", "Vary": "Accept-Language"}
        _fetch(c, "/v", h, {"Accept-Language": "en"}, body=b"en")
        _fetch(c, "/v", h, {"Accept-Language": "de"}, body=b"de")
        en = _fetch(c, "/v", h, {"Accept-Language": "en"})
        de = _fetch(c, "/v", h, {"Accept-Language": "de"})
        assert (en.response.content, de.response.content) == (b"en", b"de")
        assert (
            en.response.headers["X-Cache-Status"] == de.response.headers["X-Cache-Status"] == "HIT"
        )
        fr = _fetch(c, "/v", h, {"Accept-Language": "fr"})
        assert fr.response.headers["X-Cache-Status"] == "MISS"


def test_unsafe_methods_invalidate_target_and_location() -> None:
    c = Cache()
    with taddons.context(c):
        for p in ("/item", "/list", "/elsewhere"):
            _fetch(c, p)
        f = _flow("/item", "POST")
        c.request(f)
        _respond(
            c, f, 201, {"Location": "/list", "Content-Location": "http://other.example/elsewhere"}
        )
        assert _fetch(c, "/item").response.headers["X-Cache-Status"] == "MISS"
        assert _fetch(c, "/list").response.headers["X-Cache-Status"] == "MISS"
        # another origin's URL is not touched (§4.4)
        assert _fetch(c, "/elsewhere").response.headers["X-Cache-Status"] == "HIT"
        # an error answer does not invalidate
        f = _flow("/item", "DELETE")
        c.request(f)
        _respond(c, f, 500)
        assert _fetch(c, "/item").response.headers["X-Cache-Status"] == "HIT"


def test_purge_by_pattern_tag_and_soft() -> None:
    c = Cache()
    with taddons.context(c):
        _fetch(c, "/p/1", {"Cache-Control": "max-age=60", "Surrogate-Key": "red blue"})
        _fetch(c, "/p/2", {"Cache-Control": "max-age=60", "Cache-Tag": "blue,green", "ETag": '"e"'})
        _fetch(c, "/q/1")
        assert c.admin.purge(tag="red") == 1
        assert c.admin.purge(pattern="http://origin.example/q/*") == 1
        assert c.admin.purge(tag="blue", soft=True) == 1
        f = _flow("/p/2")
        c.request(f)
        assert f.response is None  # soft-purged: revalidated with the origin
        assert f.request.headers["If-None-Match"] == '"e"'
        _respond(c, f, 304, {"Cache-Control": "max-age=60", "ETag": '"e"'}, b"")
        assert f.response.headers["X-Cache-Status"] == "REVALIDATED"
        assert f.response.content == b"hello"
        assert c.admin.purge(pattern="origin.example") == 1  # a glob over the host
        assert len(c.shared.store) == 0


async def test_concurrent_misses_are_coalesced() -> None:
    c = Cache()
    with taddons.context(c):
        leader = _flow("/slow")
        assert c.request(leader) is None and leader.response is None
        followers = [_flow("/slow") for _ in range(3)]
        waits = [c.request(f) for f in followers]
        assert all(w is not None for w in waits)
        tasks = [asyncio.ensure_future(w) for w in waits]
        await asyncio.sleep(0)
        _respond(c, leader, headers={"Cache-Control": "max-age=60"})
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert [f.response.headers["X-Cache-Status"] for f in followers] == ["HIT"] * 3


async def test_waiters_are_bounded_in_time_and_number() -> None:
    c = Cache()
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_coalesce_timeout="100ms", cache_max_waiters=1)
        leader = _flow("/hang")
        c.request(leader)
        w1 = c.request(_flow("/hang"))
        assert w1 is not None
        second = _flow("/hang")
        assert c.request(second) is None and second.response is None  # over the bound: upstream
        t0 = time.monotonic()
        await asyncio.wait_for(w1, 5)
        assert 0.05 < time.monotonic() - t0 < 2


def test_uncacheable_answers_are_not_coalesced_again() -> None:
    c = Cache()
    with taddons.context(c):
        _fetch(c, "/private", {"Cache-Control": "private"})
        f1, f2 = _flow("/private"), _flow("/private")
        assert c.request(f1) is None and c.request(f2) is None  # both go upstream


def test_configure_errors() -> None:
    c = Cache()
    with taddons.context(c) as tctx:
        with pytest.raises(exceptions.OptionsError, match="cache_max_memory"):
            tctx.configure(c, cache_max_memory="lots")
        with pytest.raises(exceptions.OptionsError, match="larger than cache_max_memory"):
            tctx.configure(c, cache_max_memory="1KB", cache_max_object_size="1MB")
        with pytest.raises(exceptions.OptionsError, match="cache_default_ttl"):
            tctx.configure(c, cache_default_ttl="soon")
        with pytest.raises(exceptions.OptionsError, match="cache_max_entries"):
            tctx.configure(c, cache_max_entries=0)


def test_same_values_keep_the_store() -> None:
    c = Cache()
    with taddons.context(c) as tctx:
        _fetch(c)
        tctx.configure(c, cache_max_memory="256MB", cache_max_entries=10000)
        assert len(c.shared.store) == 1
        tctx.configure(c, cache_max_memory="128MB")
        assert len(c.shared.store) == 1  # a new budget keeps what fits


def test_metrics_and_stats() -> None:
    c = Cache()
    with taddons.context(c):
        _fetch(c, "/m")
        _fetch(c, "/m")
        text = generate_latest(REGISTRY).decode()
        assert 'cache_requests_total{result="HIT"} 1.0' in text
        assert 'cache_requests_total{result="MISS"} 1.0' in text
        assert "cache_entries 1.0" in text
        assert "cache_evictions_total 0.0" in text
        stats = c.admin.stats()
        assert stats["entries"] == 1 and stats["hit_rate"] == 0.5 and stats["miss_rate"] == 0.5


def test_disabled_and_other_methods_pass_through() -> None:
    c = Cache()
    with taddons.context(c) as tctx:
        f = _flow("/x", "POST")
        assert c.request(f) is None and f.response is None
        tctx.configure(c, cache_enabled=False)
        _fetch(c, "/d")
        f = _fetch(c, "/d")
        assert "X-Cache-Status" not in f.response.headers


def test_head_revalidation_304_is_answered_from_the_entry() -> None:
    c = Cache()
    with taddons.context(c):
        _fetch(c, "/hr", {"Cache-Control": "max-age=10", "Age": "20", "ETag": '"h"'}, body=b"12345")
        f = _flow("/hr", "HEAD")
        c.request(f)
        assert f.request.headers["If-None-Match"] == '"h"'
        _respond(c, f, 304, {"Cache-Control": "max-age=60", "ETag": '"h"'}, b"")
        assert f.response.status_code == 200 and f.response.raw_content == b""
        assert f.response.headers["X-Cache-Status"] == "REVALIDATED"
        assert f.response.headers["Content-Length"] == "5"
        assert _fetch(c, "/hr").response.headers["X-Cache-Status"] == "HIT"


def test_proxy_made_errors_are_never_stored() -> None:
    c = Cache()
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_mode="default_ttl")
        f = _flow("/err")
        c.request(f)
        f.response = errors.make("NOT_FOUND", "nope", f, status=404)
        c.response(f)
        assert _fetch(c, "/err", {}).response.headers["X-Cache-Status"] == "MISS"
        assert _fetch(c, "/err", {}).response.headers["X-Cache-Status"] == "HIT"  # the origin's


async def test_a_fetch_that_never_reports_back_stops_blocking() -> None:
    c = Cache()
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_coalesce_timeout="50ms")
        c.request(_flow("/lost"))  # the leader's flow never gets a response or error
        await asyncio.wait_for(c.request(_flow("/lost")), 5)  # waits once, bounded
        await asyncio.sleep(0.06)
        f = _flow("/lost")
        assert c.request(f) is None  # no more waiting: this one leads a new fetch
        _respond(c, f, headers={"Cache-Control": "max-age=60"})
        assert _fetch(c, "/lost").response.headers["X-Cache-Status"] == "HIT"


@pytest.mark.parametrize("etag_304", ['W/"e"', '"e"', '"other"'])
def test_304_freshens_the_stored_response_and_keeps_its_etag(etag_304: str) -> None:
    c = Cache()
    with taddons.context(c):
        _fetch(c, "/sel", {"Cache-Control": "max-age=10", "Age": "20", "ETag": '"e"'})
        f = _flow("/sel")
        c.request(f)
        _respond(c, f, 304, {"Cache-Control": "max-age=60", "ETag": etag_304}, b"")
        # The origin answered our If-None-Match: the stored body is current; its ETag stays.
        assert f.response.headers["X-Cache-Status"] == "REVALIDATED"
        assert f.response.status_code == 200 and f.response.headers["ETag"] == '"e"'
        assert _fetch(c, "/sel").response.headers["X-Cache-Status"] == "HIT"


def test_script_loads_twice_without_registering_metrics_twice() -> None:
    with taddons.context() as tctx:
        script = str(Path(__file__).resolve().parents[2] / "addons" / "cache.py")
        a = tctx.script(script)
        b = tctx.script(script)
        assert a is not b
    assert generate_latest(REGISTRY).decode().count("# TYPE cache_entries gauge") == 1


def test_background_revalidation_results() -> None:
    c = Cache()
    with taddons.context(c):
        h = {"Cache-Control": "max-age=1, stale-while-revalidate=60", "ETag": '"b"'}
        _fetch(c, "/bg", h)
        entry = next(iter(c.shared.store.entries()))
        now = time.time()
        fresh = [("Cache-Control", "max-age=600"), ("ETag", '"b"')]
        c.revalidator.apply(entry, 304, "Not Modified", fresh, b"", now, now)
        assert entry.lifetime == 600 and c.shared.store.get(entry.key) is entry
        c.revalidator.apply(entry, 503, "Unavailable", [], b"", now, now)
        assert c.shared.store.get(entry.key) is entry  # an error keeps the stale entry
        c.revalidator.apply(entry, 200, "OK", [("Cache-Control", "max-age=60")], b"new", now, now)
        new = c.shared.store.get(entry.key)
        assert new is not entry and new.body == b"new"
        c.admin.purge(pattern="*")
        c.revalidator.apply(new, 304, "Not Modified", fresh, b"", now, now)
        assert len(c.shared.store) == 0  # purged while revalidating: not put back


def test_vary_absent_field_matches_only_absent() -> None:
    c = Cache()
    with taddons.context(c):
        h = {"Cache-Control": "max-age=60", "Vary": "X-Mode"}
        _fetch(c, "/va", h, {}, body=b"absent")
        assert _fetch(c, "/va", h, {"X-Mode": ""}).response.headers["X-Cache-Status"] == "MISS"
        assert _fetch(c, "/va", h, {}).response.content == b"absent"
        assert _fetch(c, "/va", h, {}).response.headers["X-Cache-Status"] == "HIT"


def test_the_url_index_follows_every_way_an_entry_leaves() -> None:
    store = Store(10_000_000, 2)
    now = time.time()

    def put(url: str, lifetime: float) -> None:
        fields = [("Cache-Control", f"max-age={lifetime:g}")]
        entry = Entry(f"k{url}", url, url, 200, "OK", fields, b"b", now, now, Settings(), None)
        entry.expires_at = now + lifetime
        store.put(entry, ())

    put("/a", 0.05)
    put("/b", 60)
    put("/c", 60)  # over max_entries: /a is evicted
    assert set(store.index) == {"/b", "/c"} and store.evictions == 1
    store.drop("k/b")
    assert set(store.index) == {"/c"}
    put("/d", 0.05)
    time.sleep(0.1)
    store.expire()  # expiry, not only eviction, takes it out of the index
    assert set(store.index) == {"/c"} and len(store) == 1


# --- the origin down: stale answers instead of mitmproxy's error ----------------------------


def _fail(c: Cache, path: str, message: str = "[Errno 111] Connect call failed") -> http.HTTPFlow:
    """A request that goes upstream, whose origin then fails without a response."""
    f = _flow(path)
    assert c.request(f) is None and f.response is None
    f.error = mflow.Error(message)
    c.waypost_origin_unavailable(f)
    return f


STALE_5S = {"Cache-Control": "max-age=1, stale-if-error=60", "Age": "5"}


def test_origin_down_is_answered_stale_within_stale_if_error() -> None:
    c = Cache()
    with taddons.context(c):
        _fetch(c, "/down", STALE_5S, body=b"stored")
        f = _fail(c, "/down")
        resp = f.response
        assert resp is not None and resp.content == b"stored"
        assert resp.headers["X-Cache-Status"] == "STALE"
        assert (
            resp.headers["Cache-Status"] == "waypost; fwd=stale; ttl=-4; detail=connection_refused"
        )
        assert resp.headers["Connection"] == "close"
        meta = record(f)
        assert meta["backend_error"] == "connection_refused" and meta["cache_hit"] is True
        assert not c.flights.inflight  # the leader's flight ends here: no error hook will come
        f2 = _flow("/down", headers={"Cache-Control": "stale-if-error=0"})
        f2.request.http_version = "HTTP/2.0"
        c.request(f2)
        f2.error = mflow.Error("server closed connection")
        record(f2)["timed_out"] = "read_timeout"
        c.waypost_origin_unavailable(f2)
        assert f2.response.headers["Cache-Status"].endswith("detail=read_timeout")
        assert "Connection" not in f2.response.headers  # not a field HTTP/2 has
        # the egress addon resolves names itself and kills the connection when it cannot
        dns = (
            "Connection killed: Cannot resolve origin.example: [Errno -2] Name or service not known"
        )
        assert _fail(c, "/down", dns).response.headers["Cache-Status"].endswith("dns_failure")


@pytest.mark.parametrize(
    "headers,message",
    [
        ({**STALE_5S, "Cache-Control": "max-age=1, stale-if-error=60, must-revalidate"}, None),
        ({**STALE_5S, "Cache-Control": "max-age=1, stale-if-error=60, proxy-revalidate"}, None),
        ({"Cache-Control": "max-age=1, stale-if-error=3", "Age": "10", "ETag": '"e"'}, None),
        ({"Cache-Control": "max-age=1", "Age": "5", "ETag": '"e"'}, None),
        # refused by a policy in server_connect, not down
        (STALE_5S, "Connection killed: Waypost egress policy refused the connection (private)"),
        (STALE_5S, "Connection killed."),  # flow.kill()
    ],
)
def test_origin_down_gets_the_error_without_permission(
    headers: dict[str, str], message: str | None
) -> None:
    c = Cache()
    with taddons.context(c):
        _fetch(c, "/strict", headers)
        assert len(c.shared.store) == 1
        f = _fail(c, "/strict", *([message] if message else []))
        assert f.response is None and "backend_error" not in record(f)


def test_a_range_request_is_not_answered_stale() -> None:
    c = Cache()
    with taddons.context(c):
        _fetch(c, "/rng", STALE_5S)
        f = _flow("/rng", headers={"Range": "bytes=0-1"})
        assert c.request(f) is None and f.response is None  # to the origin, unstored
        f.error = mflow.Error("[Errno 111] Connect call failed")
        c.waypost_origin_unavailable(f)
        assert f.response is None


def test_a_purged_entry_is_not_answered_stale() -> None:
    c = Cache()
    with taddons.context(c):
        _fetch(c, "/gone", STALE_5S)
        f = _flow("/gone")
        c.request(f)
        c.admin.purge(pattern="*")
        f.error = mflow.Error("[Errno 111] Connect call failed")
        c.waypost_origin_unavailable(f)
        assert f.response is None
        _fetch(c, "/gone5", STALE_5S)
        f = _flow("/gone5")
        c.request(f)
        c.admin.purge(pattern="*/gone5")
        _respond(c, f, 503)  # the origin's 5xx: the same rule
        assert f.response.status_code == 503


def test_stale_on_error_answers_without_stale_if_error() -> None:
    c = Cache()
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_stale_on_error=True)
        _fetch(c, "/any", {"Cache-Control": "max-age=1", "Age": "5"}, body=b"kept")
        _fetch(c, "/nc", {"Cache-Control": "no-cache", "ETag": '"n"'})
        _fetch(c, "/must", {"Cache-Control": "max-age=1, must-revalidate", "Age": "5"})
        assert len(c.shared.store) == 3  # kept past their freshness, validator or not
        assert _fail(c, "/any").response.content == b"kept"
        assert _fail(c, "/nc").response is None
        assert _fail(c, "/must").response is None
        f = _flow("/any")
        c.request(f)
        _respond(c, f, 503, {})
        assert f.response.status_code == 503  # an origin's 5xx needs stale-if-error


def _stream(f: http.HTTPFlow, server_state: str = "wait_for_response_headers") -> object:
    class Stream:
        flow = f
        sent: list[http.Response] = []

        def state_done(self) -> None: ...
        def state_wait_for_response_headers(self) -> None: ...
        def state_consume_response_body(self) -> None: ...
        def state_stream_response_body(self) -> None: ...

        def check_killed(self, emit_error_hook: bool):  # type: ignore[no-untyped-def]
            return False
            yield

        def send_response(self):  # type: ignore[no-untyped-def]
            self.sent.append(self.flow.response)
            yield "sent"

    s = Stream()
    s.client_state = s.state_done  # type: ignore[attr-defined]
    s.server_state = getattr(s, f"state_{server_state}")  # type: ignore[attr-defined]
    return s


def _original(self: object, event: object):  # type: ignore[no-untyped-def]
    yield "mitmproxy's error"


@pytest.mark.parametrize(
    "path,server_state,answered",
    [
        ("/p", "wait_for_response_headers", True),
        ("/p", "consume_response_body", True),  # nothing sent to the client yet
        ("/p", "stream_response_body", False),  # its headers are out: too late
        ("/nothing-stored", "wait_for_response_headers", False),
    ],
)
def test_patch_asks_the_cache_before_mitmproxys_error(
    monkeypatch: pytest.MonkeyPatch, path: str, server_state: str, answered: bool
) -> None:
    c = Cache()
    with taddons.context(c):  # load installs the patch
        monkeypatch.setattr(patch._handle_protocol_error, CHAIN, _original)
        _fetch(c, "/p", STALE_5S)
        f = _flow(path)
        c.request(f)
        stream = _stream(f, server_state)
        gen = patch._handle_protocol_error(stream, router._connect_error(1, "refused"))
        commands = []
        command = next(gen)
        while True:
            commands.append(type(command).__name__ if not isinstance(command, str) else command)
            if isinstance(command, patch.OriginUnavailableHook):
                assert f.error is not None and f.error.msg == "refused"
                c.waypost_origin_unavailable(command.flow)
            try:
                command = gen.send(None)
            except StopIteration:
                break
    if answered:
        assert commands == ["OriginUnavailableHook", "HttpResponseHeadersHook", "sent"]
        assert f.error is None and stream.sent == [f.response]  # type: ignore[attr-defined]
    else:
        assert commands == ["mitmproxy's error"]


def test_patch_sits_below_the_routers_in_either_load_order() -> None:
    stream = http_layer.HttpStream
    mitmproxys = _mitmproxys(stream.handle_protocol_error)
    try:
        for first, second in ((patch, router), (router, patch)):
            patch.uninstall()
            router.uninstall()
            assert first.install() and second.install()
            # the router retries first; the stale answer comes last, above mitmproxy itself
            assert stream.handle_protocol_error is router._handle_protocol_error
            below = getattr(router._handle_protocol_error, CHAIN)
            assert below is patch._handle_protocol_error
            assert getattr(below, CHAIN) is mitmproxys
            patch.install()  # idempotent, also under the router's patch
            assert getattr(router._handle_protocol_error, CHAIN) is below
            patch.uninstall()
            assert getattr(router._handle_protocol_error, CHAIN) is mitmproxys
            router.uninstall()
            assert stream.handle_protocol_error is mitmproxys
    finally:
        patch.uninstall()
        router.uninstall()
        stream.handle_protocol_error = mitmproxys  # type: ignore[method-assign]


def _mitmproxys(fn: object) -> object:
    while hasattr(fn, CHAIN):
        fn = getattr(fn, CHAIN)
    return fn


def test_a_stale_answer_to_an_origin_5xx_records_the_backend_error() -> None:
    c = Cache()
    with taddons.context(c):
        _fetch(c, "/sie5xx", STALE_5S, body=b"kept")
        f = _flow("/sie5xx")
        c.request(f)
        _respond(c, f, 502, {})
        assert f.response.status_code == 200 and f.response.content == b"kept"
        assert record(f)["backend_error"] == "status 502"  # for the router's breaker


def test_a_purge_from_another_process_applies_here() -> None:
    c = Cache()
    with taddons.context(c):
        for path in ("/c/1", "/c/2", "/d/1"):
            _fetch(c, path)
        c.admin.received({"pattern": "http://origin.example/c/*", "tag": None, "soft": False})
        assert len(c.shared.store) == 1
        c.admin.received({"pattern": ["not", "a", "glob"]})  # malformed: ignored
        assert len(c.shared.store) == 1
        c.admin.received({"pattern": None, "tag": None})  # the command without a pattern
        assert len(c.shared.store) == 0


def test_a_purge_that_redis_could_not_take_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    c = Cache()
    with caplog.at_level(logging.WARNING, logger="waypost.cache"):
        # The memory backend has no Redis at all: the same answer as Redis being down.
        assert asyncio.run(c.admin.publish("*", None, False)) is False
    assert "applied to this process only" in caplog.records[-1].getMessage()


def test_purge_command_by_pattern_or_all() -> None:
    c = Cache()
    with taddons.context(c) as tctx:
        for path in ("/c/1", "/c/2", "/d/1"):
            _fetch(c, path)
        out = tctx.master.commands.call("waypost.purge", "http://origin.example/c/*")
        assert out == "2 cache entries purged, 1 remain"
        assert tctx.master.commands.execute("waypost.purge") == "1 cache entries purged, 0 remain"
