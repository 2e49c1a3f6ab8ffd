"""The cache through a real mitmdump: RFC 9111 cases against a scripted origin, the product's
cache test through the bundle, the purge API and the cache metrics.

The tables run against one `mitmdump -s addons/cache.py --mode reverse:<origin>` (the addon
alone, defaults only); each case uses its own path, so cases do not see each other's entries.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import MANAGEMENT, REVERSE, Backend, Proxy, start_proxy, wait_until
from tests.e2e.cache_helpers import FlakyOrigin, Origin, http_date, start_origin
from tests.e2e.router_helpers import NamedBackend, write_profile

Get = Callable[..., httpx.Response]


def reverse_to(url: str) -> tuple[str, ...]:
    return ("--mode", f"reverse:{url}")


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    yield from start_origin()


@pytest.fixture(scope="module")
def reverse(origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    p = start_proxy(
        tmp_path_factory.mktemp("cache"),
        scripts=("addons/cache.py",),
        extra_args=reverse_to(origin.url),
    )
    yield p
    p.stop()


@pytest.fixture
def get(reverse: Proxy) -> Iterator[Get]:
    with httpx.Client(base_url=reverse.url, timeout=10, trust_env=False) as c:

        def do(
            path: str, headers: dict[str, str] | None = None, method: str = "GET"
        ) -> httpx.Response:
            return c.request(method, path, headers=headers or {})

        yield do


def status(r: httpx.Response) -> str:
    return r.headers.get("x-cache-status", "")


# --- the RFC 9111 table: (id, origin headers, request sequence expectations) ------------------
# Each case: the origin's answer for the path, then requests as (request headers, expected
# X-Cache-Status, expected origin hits after it).

LONG_AGO = "Sun, 06 Nov 1994 08:49:37 GMT"
CASES: list[tuple[str, int, dict[str, str], list[tuple[dict[str, str], str, int]]]] = [
    # §4.2.1 explicit freshness
    ("max-age", 200, {"Cache-Control": "max-age=60"}, [({}, "MISS", 1), ({}, "HIT", 1)]),
    (
        "s-maxage-first",
        200,
        {"Cache-Control": "max-age=0, s-maxage=60"},
        [({}, "MISS", 1), ({}, "HIT", 1)],
    ),
    (
        "s-maxage-zero",
        200,
        {"Cache-Control": "max-age=60, s-maxage=0"},
        [({}, "MISS", 1), ({}, "MISS", 2)],
    ),
    ("expires", 200, {"Expires": "@+60", "Date": "@0"}, [({}, "MISS", 1), ({}, "HIT", 1)]),
    ("expires-invalid", 200, {"Expires": "0"}, [({}, "MISS", 1), ({}, "MISS", 2)]),
    # strict HTTP-date: a form email.utils accepts is invalid, so the response is stale
    (
        "expires-not-http-date",
        200,
        {"Expires": "Sun, 06 Nov 2094 08:49:37 +0000"},
        [({}, "MISS", 1), ({}, "MISS", 2)],
    ),
    ("max-age-quoted", 200, {"Cache-Control": 'max-age="60"'}, [({}, "MISS", 1), ({}, "HIT", 1)]),
    (
        "cc-duplicate-lines",
        200,
        [("Cache-Control", "max-age=60"), ("Cache-Control", "max-age=0")],
        [({}, "MISS", 1), ({}, "HIT", 1)],
    ),  # type: ignore[list-item]
    (
        "cc-unknown-directive",
        200,
        {"Cache-Control": 'foo="a, b", max-age=60, bar'},
        [({}, "MISS", 1), ({}, "HIT", 1)],
    ),
    # §4.2.2 heuristic freshness: Last-Modified, heuristically cacheable statuses only
    ("heuristic-200", 200, {"Last-Modified": LONG_AGO}, [({}, "MISS", 1), ({}, "HIT", 1)]),
    ("heuristic-404", 404, {"Last-Modified": LONG_AGO}, [({}, "MISS", 1), ({}, "HIT", 1)]),
    (
        "heuristic-not-302",
        302,
        {"Last-Modified": LONG_AGO, "Location": "/x"},
        [({}, "MISS", 1), ({}, "MISS", 2)],
    ),
    ("heuristic-not-500", 500, {"Last-Modified": LONG_AGO}, [({}, "MISS", 1), ({}, "MISS", 2)]),
    ("no-freshness", 200, {}, [({}, "MISS", 1), ({}, "MISS", 2)]),
    (
        "explicit-any-status",
        500,
        {"Cache-Control": "max-age=60"},
        [({}, "MISS", 1), ({}, "HIT", 1)],
    ),
    (
        "explicit-302",
        302,
        {"Cache-Control": "max-age=60", "Location": "/x"},
        [({}, "MISS", 1), ({}, "HIT", 1)],
    ),
    # §4.2.3 Age received counts against freshness
    (
        "age-received",
        200,
        {"Cache-Control": "max-age=60", "Age": "100"},
        [({}, "MISS", 1), ({}, "MISS", 2)],
    ),
    # §5.2.2 response directives
    (
        "no-store",
        200,
        {"Cache-Control": "max-age=60, no-store"},
        [({}, "MISS", 1), ({}, "MISS", 2)],
    ),
    ("private", 200, {"Cache-Control": "max-age=60, private"}, [({}, "MISS", 1), ({}, "MISS", 2)]),
    (
        "private-qualified",
        200,
        {"Cache-Control": 'max-age=60, private="x-user"', "X-User": "a"},
        [({}, "MISS", 1), ({}, "HIT", 1)],
    ),
    (
        "no-cache",
        200,
        {"Cache-Control": "max-age=60, no-cache", "ETag": '"v1"'},
        [({}, "MISS", 1), ({}, "REVALIDATED", 2)],
    ),
    (
        "must-understand",
        200,
        {"Cache-Control": "max-age=60, no-store, must-understand"},
        [({}, "MISS", 1), ({}, "HIT", 1)],
    ),
    (
        "set-cookie",
        200,
        {"Cache-Control": "max-age=60", "Set-Cookie": "s=1"},
        [({}, "MISS", 1), ({}, "MISS", 2)],
    ),
    (
        "vary-star",
        200,
        {"Cache-Control": "max-age=60", "Vary": "*"},
        [({}, "MISS", 1), ({}, "MISS", 2)],
    ),
    # stale on arrival (Age > max-age), with a validator: revalidated, or served stale when allowed
    (
        "must-revalidate",
        200,
        {"Cache-Control": "max-age=10, must-revalidate", "Age": "20", "ETag": '"v1"'},
        [({}, "MISS", 1), ({"Cache-Control": "max-stale=1000"}, "REVALIDATED", 2)],
    ),
    (
        "proxy-revalidate",
        200,
        {"Cache-Control": "max-age=10, proxy-revalidate", "Age": "20", "ETag": '"v1"'},
        [({}, "MISS", 1), ({"Cache-Control": "max-stale=1000"}, "REVALIDATED", 2)],
    ),
    (
        "max-stale",
        200,
        {"Cache-Control": "max-age=10", "Age": "20", "ETag": '"v1"'},
        [({}, "MISS", 1), ({"Cache-Control": "max-stale=1000"}, "STALE", 1)],
    ),
    (
        "last-modified-validator",
        200,
        {"Cache-Control": "max-age=10", "Age": "20", "Last-Modified": LONG_AGO},
        [({}, "MISS", 1), ({}, "REVALIDATED", 2)],
    ),
    # §5.2.1 request directives; unknown ones are ignored
    (
        "req-no-cache",
        200,
        {"Cache-Control": "max-age=60", "ETag": '"v1"'},
        [({}, "MISS", 1), ({"Cache-Control": "no-cache"}, "REVALIDATED", 2), ({}, "HIT", 2)],
    ),
    (
        "req-max-age",
        200,
        {"Cache-Control": "max-age=60", "Age": "5", "ETag": '"v1"'},
        [({}, "MISS", 1), ({"Cache-Control": "max-age=1"}, "REVALIDATED", 2)],
    ),
    (
        "req-min-fresh",
        200,
        {"Cache-Control": "max-age=60", "ETag": '"v1"'},
        [({}, "MISS", 1), ({"Cache-Control": "min-fresh=120"}, "REVALIDATED", 2)],
    ),
    (
        "req-unknown",
        200,
        {"Cache-Control": "max-age=60"},
        [({}, "MISS", 1), ({"Cache-Control": 'foo, bar="x,y"'}, "HIT", 1)],
    ),
    (
        "req-no-store",
        200,
        {"Cache-Control": "max-age=60"},
        [({"Cache-Control": "no-store"}, "MISS", 1), ({}, "MISS", 2)],
    ),
    # §3.5 Authorization
    (
        "authorization",
        200,
        {"Cache-Control": "max-age=60"},
        [({"Authorization": "Bearer a"}, "MISS", 1), ({"Authorization": "Bearer a"}, "MISS", 2)],
    ),
    (
        "authorization-public",
        200,
        {"Cache-Control": "max-age=60, public"},
        [({"Authorization": "Bearer a"}, "MISS", 1), ({"Authorization": "Bearer b"}, "HIT", 1)],
    ),
    # §4.1 Vary
    (
        "vary",
        200,
        {"Cache-Control": "max-age=60", "Vary": "Accept-Language"},
        [
            ({"Accept-Language": "en"}, "MISS", 1),
            ({"Accept-Language": "de"}, "MISS", 2),
            ({"Accept-Language": "en"}, "HIT", 2),
            ({"Accept-Language": "de"}, "HIT", 2),
        ],
    ),
    # §4.3.2 client conditionals answered from the cache
    (
        "client-inm",
        200,
        {"Cache-Control": "max-age=60", "ETag": '"v1"'},
        [({}, "MISS", 1), ({"If-None-Match": '"v1"'}, "HIT", 1)],
    ),
    (
        "client-ims",
        200,
        {"Cache-Control": "max-age=60", "Last-Modified": LONG_AGO},
        [({}, "MISS", 1), ({"If-Modified-Since": LONG_AGO}, "HIT", 1)],
    ),
    # RFC 9110 §14: a Range miss goes to the origin unstored; a stored full body answers ranges
    (
        "range",
        200,
        {"Cache-Control": "max-age=60"},
        [({"Range": "bytes=0-1"}, "BYPASS", 1), ({}, "MISS", 2)],
    ),
    # only-if-cached with nothing stored: 504 without asking the origin
    (
        "only-if-cached",
        200,
        {"Cache-Control": "max-age=60"},
        [({"Cache-Control": "only-if-cached"}, "MISS", 0)],
    ),
    (
        "only-if-cached-stale",
        200,
        {"Cache-Control": "max-age=10", "Age": "20", "ETag": '"v"'},
        [({}, "MISS", 1), ({"Cache-Control": "only-if-cached"}, "MISS", 1)],
    ),
    (
        "only-if-cached-fresh",
        200,
        {"Cache-Control": "max-age=60"},
        [({}, "MISS", 1), ({"Cache-Control": "only-if-cached"}, "HIT", 1)],
    ),
    # a reverse proxy is the origin's surrogate: the targeted fields replace Cache-Control
    # and Expires (RFC 9213 §2.2; Edge Architecture 1.0 Surrogate-Control)
    (
        "surrogate-max-age",
        200,
        {"Surrogate-Control": "max-age=60"},
        [({}, "MISS", 1), ({}, "HIT", 1)],
    ),
    (
        "surrogate-targeted-at-us",
        200,
        {"Cache-Control": "no-store", "Surrogate-Control": "max-age=60;waypost"},
        [({}, "MISS", 1), ({}, "HIT", 1)],
    ),
    (
        "surrogate-targeted-elsewhere",
        200,
        {"Surrogate-Control": "max-age=60;other-cdn"},
        [({}, "MISS", 1), ({}, "MISS", 2)],
    ),
    (
        "surrogate-no-store",
        200,
        {"Cache-Control": "max-age=60", "Expires": "@+60", "Surrogate-Control": "no-store"},
        [({}, "MISS", 1), ({}, "MISS", 2)],
    ),
    (
        "surrogate-short-over-long-cc",
        200,
        {"Cache-Control": "max-age=600", "Surrogate-Control": "max-age=0"},
        [({}, "MISS", 1), ({}, "MISS", 2)],
    ),
    (
        "cdn-cache-control",
        200,
        {"Cache-Control": "no-store", "CDN-Cache-Control": "max-age=60"},
        [({}, "MISS", 1), ({}, "HIT", 1)],
    ),
]


def _headers(spec: dict[str, str] | list[tuple[str, str]]) -> list[tuple[str, str]]:
    items = list(spec.items()) if isinstance(spec, dict) else list(spec)
    out = []
    for k, v in items:
        if v.startswith("@"):  # "@+60": an HTTP-date 60 s from now
            v = http_date(float(v[1:]))
        out.append((k, v))
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rfc9111(case: tuple, origin: Origin, get: Get) -> None:
    name, code, headers, steps = case
    path = f"/rfc/{name}"
    fixed = _headers(headers)

    def answer(request):  # a 304 for a matching If-None-Match / If-Modified-Since
        etag = dict((k.lower(), v) for k, v in fixed).get("etag")
        lm = dict((k.lower(), v) for k, v in fixed).get("last-modified")
        inm = request.headers.get("If-None-Match")
        if (etag and inm == etag) or (
            lm and not inm and request.headers.get("If-Modified-Since") == lm
        ):
            return 304, [(k, v) for k, v in fixed if k.lower() != "age"], b""
        return code, fixed, f"body of {name}".encode()

    origin.set(path, answer)
    for i, (req_headers, expected, hits) in enumerate(steps):
        r = get(path, req_headers)
        assert status(r) == expected, f"step {i}: {r.status_code} {dict(r.headers)}"
        assert origin.hits.get(path, 0) == hits, f"step {i}"
        if expected in ("HIT", "REVALIDATED", "STALE"):
            assert "age" in r.headers
            if "If-None-Match" in req_headers or "If-Modified-Since" in req_headers:
                assert r.status_code == 304 and r.content == b""
            else:
                assert r.content == f"body of {name}".encode()
    if name in ("only-if-cached", "only-if-cached-stale"):
        assert r.status_code == 504  # §5.2.1.7
    if name == "private-qualified":
        assert "x-user" not in r.headers  # §5.2.2.7: the named field is not stored
    if name in ("no-cache", "must-revalidate", "req-no-cache"):
        assert (
            origin.requests[path][-1 if name != "req-no-cache" else 1].get("if-none-match")
            == '"v1"'
        )
    if name == "last-modified-validator":
        assert origin.requests[path][1].get("if-modified-since") == LONG_AGO
    if name.startswith("surrogate"):
        assert origin.requests[path][0]["surrogate-capability"] == 'waypost="Surrogate/1.0"'
        assert "surrogate-control" not in r.headers  # it was for us, not for the client


def _node_etags(request):
    # Origins behind a load balancer: another node's ETag on the 304, same body.
    h = {"Cache-Control": "max-age=10", "Age": "20", "ETag": '"node-a"'}
    if request.headers.get("If-None-Match") == '"node-a"':
        return 304, {**h, "ETag": '"node-b"'}, b""
    return 200, h, b"body"


def _new_version_on_304(request):
    h = [("Cache-Control", "max-age=10"), ("Age", "20"), ("ETag", '"e"')]
    if request.headers.get("If-None-Match") == '"e"':
        return 304, h + [("X-Version", "2"), ("Content-Length", "999")], b""
    return 200, h + [("X-Version", "1")], b"twelve bytes"


# A stored response answering the next request: (the origin's answer, the next request's
# fields and method, what answers it: X-Cache-Status, status, body, origin hits after it,
# fields it has, fields it has not). "@-100" is an HTTP-date 100 s ago.
AGAIN = [
    pytest.param(
        (200, {"Cache-Control": "max-age=600", "Date": "@-100"}, b"d"),
        {"If-Modified-Since": "@0"},
        "GET",
        ("HIT", 304, b"", 1),
        {},
        (),
        id="ims-against-date",  # RFC 9111 §4.3.2: Date stands in for Last-Modified
    ),
    pytest.param(
        (200, {"Cache-Control": "max-age=600", "Date": "@-100"}, b"d"),
        {"If-Modified-Since": "@-3600"},
        "GET",
        ("HIT", 200, b"d", 1),
        {},
        (),
        id="ims-modified-since-then",
    ),
    pytest.param(
        _node_etags,
        {},
        "GET",
        ("REVALIDATED", 200, b"body", 2),
        {"etag": '"node-a"'},  # a 304 does not relabel the stored body
        (),
        id="304-with-another-etag-freshens",
    ),
    pytest.param(
        _new_version_on_304,
        {},
        "GET",
        ("REVALIDATED", 200, b"twelve bytes", 2),
        {"x-version": "2", "content-length": "12"},  # §3.2, §4.3.4: all but Content-Length
        (),
        id="304-updates-stored-fields",
    ),
    pytest.param(
        (
            200,
            [
                ("Cache-Control", "max-age=60"),
                ("Connection", "X-Secret"),
                ("X-Secret", "1"),
                ("X-Kept", "1"),
            ],
            b"h",
        ),
        {},
        "GET",
        ("HIT", 200, b"h", 1),
        {"x-kept": "1"},
        ("x-secret",),  # hop-by-hop and Connection-listed fields are not stored
        id="hop-by-hop-not-stored",
    ),
    pytest.param(
        (200, {"Cache-Control": "max-age=60"}, b"0123456789"),
        {},
        "HEAD",
        ("HIT", 200, b"", 1),
        {"content-length": "10"},
        (),
        id="head-from-stored-get",
    ),
]


@pytest.mark.parametrize("answer,fields,method,expected,present,absent", AGAIN)
def test_a_stored_response_answers_again(
    request: pytest.FixtureRequest,
    origin: Origin,
    get: Get,
    answer: Callable | tuple,
    fields: dict[str, str],
    method: str,
    expected: tuple[str, int, bytes, int],
    present: dict[str, str],
    absent: tuple[str, ...],
) -> None:
    path = f"/again/{request.node.callspec.id}"
    if isinstance(answer, tuple):
        code, headers, body = answer
        answer = (code, _headers(headers), body)
    origin.set(path, answer)
    get(path)
    r = get(path, dict(_headers(fields)), method)
    assert (status(r), r.status_code, r.content, origin.hits[path]) == expected
    for name, value in present.items():
        assert r.headers[name] == value, name
    for name in absent:
        assert name not in r.headers, name


def test_age_is_generated_on_hits(origin: Origin, get: Get) -> None:
    origin.set("/age", (200, {"Cache-Control": "max-age=600", "Age": "30"}, b"a"))
    get("/age")
    r = get("/age")
    assert status(r) == "HIT" and int(r.headers["age"]) >= 30  # §4.2.3, §5.1
    assert r.headers["cache-status"] == f"waypost; hit; ttl={600 - int(r.headers['age'])}"


def test_ranges_are_cut_from_a_stored_complete_response(origin: Origin, get: Get) -> None:
    origin.set("/range", (200, {"Cache-Control": "max-age=60", "ETag": '"r"'}, b"0123456789A"))
    r = get("/range", {"Range": "bytes=0-1"})  # nothing stored: the origin answers the range
    assert status(r) == "BYPASS" and origin.hits["/range"] == 1
    get("/range")
    for spec, code, text, content_range in [
        ("bytes=0-1", 206, b"01", "bytes 0-1/11"),
        ("bytes=1-", 206, b"123456789A", "bytes 1-10/11"),
        ("bytes=-1", 206, b"A", "bytes 10-10/11"),
        ("bytes=0-1,5-6", 200, b"0123456789A", None),  # several ranges: the whole body
        ("bytes=99-", 416, b"", "bytes */11"),
    ]:
        r = get("/range", {"Range": spec})
        assert (status(r), r.status_code, r.content) == ("HIT", code, text), spec
        assert r.headers.get("content-range") == content_range, spec
    r = get("/range", {"Range": "bytes=0-1", "If-Range": '"old"'})  # RFC 9110 §13.1.5
    assert (r.status_code, r.content) == (200, b"0123456789A")
    r = get("/range", {"Range": "bytes=0-1", "If-Range": '"r"'})
    assert (r.status_code, r.content) == (206, b"01")
    assert origin.hits["/range"] == 2


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_unsafe_methods_pass_through_and_invalidate(origin: Origin, get: Get, method: str) -> None:
    path = f"/inv-{method.lower()}"
    other, cl = f"{path}/other", f"{path}/cl"
    origin.set(other, (200, {"Cache-Control": "max-age=60"}, b"o"))
    origin.set(cl, (200, {"Cache-Control": "max-age=60"}, b"l"))
    origin.set(
        path,
        lambda r: (
            (201, {"Location": other, "Content-Location": cl, "Cache-Control": "max-age=60"}, b"c")
            if r.method == method
            else (200, {"Cache-Control": "max-age=60"}, b"i")
        ),
    )
    for p in (path, other, cl):
        get(p)
    before = origin.hits[path]
    r = get(path, method=method)
    assert status(r) == "" and origin.hits[path] == before + 1  # never cached
    assert status(get(path)) == "MISS"  # §4.4 target invalidated
    assert status(get(other)) == "MISS"  # and the Location target
    assert status(get(cl)) == "MISS"  # and the Content-Location target
    assert status(get(path)) == "HIT"


def test_stale_while_revalidate_answers_at_once_and_revalidates_in_background(
    origin: Origin, get: Get
) -> None:
    def answer(request):
        h = {"Cache-Control": "max-age=1, stale-while-revalidate=60", "ETag": '"s"'}
        if request.headers.get("If-None-Match") == '"s"':
            return 304, h | {"Cache-Control": "max-age=600"}, b""
        return 200, h, b"swr"

    origin.set("/swr", answer, delay=0.0)
    get("/swr")
    time.sleep(1.1)  # the entry must age past max-age=1; nothing to poll for
    origin.delay["/swr"] = 1.0  # a slow origin: the stale answer must not wait for it
    t0 = time.monotonic()
    r = get("/swr")
    assert status(r) == "STALE" and r.content == b"swr" and time.monotonic() - t0 < 0.8
    wait_until(lambda: origin.hits["/swr"] == 2)
    assert origin.requests["/swr"][-1].get("if-none-match") == '"s"'
    wait_until(lambda: status(get("/swr")) == "HIT")


def test_stale_if_error_serves_the_stored_response(origin: Origin, get: Get) -> None:
    state = {"down": False}

    def answer(request):
        if state["down"]:
            return 503, {}, b"down"
        return (
            200,
            {"Cache-Control": "max-age=10, stale-if-error=600", "Age": "20", "ETag": '"x"'},
            b"ok",
        )

    origin.set("/sie", answer)
    get("/sie")
    state["down"] = True
    r = get("/sie")
    assert r.status_code == 200 and r.content == b"ok" and status(r) == "STALE"
    assert "fwd-status=503" in r.headers["cache-status"]


# --- stale answers when the origin is down (no response at all) ------------------------------


@pytest.fixture(scope="module")
def failover(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """The cache with upstream.py (JSON errors, a read timeout) as a forward proxy: each test
    dials origins of its own."""
    p = start_proxy(
        tmp_path_factory.mktemp("failover"),
        scripts=("addons/cache.py", "addons/upstream.py"),
        options={"upstream_read_timeout": "500ms"},
    )
    yield p
    p.stop()


@pytest.mark.parametrize(
    "failure,detail",
    [
        ("refused", "connection_refused"),  # the origin's port is closed
        ("close", "closed"),  # closes the connection before any response byte
        ("truncate", "closed"),  # closes it in the middle of the body
        ("hang", "read_timeout"),  # never answers: upstream_read_timeout
    ],
)
def test_stale_if_error_answers_when_the_origin_fails_without_a_response(
    failover: Proxy, failure: str, detail: str
) -> None:
    origin = FlakyOrigin({"Cache-Control": "max-age=1, stale-if-error=60", "Age": "5"})
    url = f"http://127.0.0.1:{origin.port}/down"
    try:
        with httpx.Client(proxy=failover.url, timeout=10, trust_env=False) as c:
            assert status(c.get(url)) == "MISS"
            if failure == "refused":
                origin.close()
            else:
                origin.mode = failure
            r = c.get(url)
    finally:
        origin.close()
    assert r.status_code == 200 and r.content == b"stored body" and status(r) == "STALE"
    assert re.fullmatch(
        rf"waypost; fwd=stale; ttl=-\d+; detail={detail}", r.headers["cache-status"]
    )
    # mitmproxy's error answer closed the client connection; so does this one.
    assert r.headers["connection"] == "close"
    failover.wait_for(rf"upstream '127\.0\.0\.1:{origin.port}' failed: {detail} -> 200 STALE")


@pytest.mark.parametrize(
    "cache_control,age",
    [
        ("max-age=1, stale-if-error=60, must-revalidate", "5"),
        ("max-age=1, stale-if-error=60, proxy-revalidate", "5"),
        ("max-age=1, s-maxage=1, stale-if-error=60", "5"),  # s-maxage implies proxy-revalidate
        ("max-age=1, stale-if-error=3", "10"),  # 9 s stale: past the stale-if-error window
        ("max-age=1", "5"),  # no stale-if-error, cache_stale_on_error off
    ],
)
def test_without_permission_to_serve_stale_the_client_gets_the_502(
    failover: Proxy, cache_control: str, age: str
) -> None:
    # The ETag keeps the entry stored (for a revalidation) long after its windows.
    origin = FlakyOrigin({"Cache-Control": cache_control, "Age": age, "ETag": '"v1"'})
    url = f"http://127.0.0.1:{origin.port}/strict"
    try:
        with httpx.Client(proxy=failover.url, timeout=10, trust_env=False) as c:
            assert status(c.get(url)) == "MISS"
            origin.close()
            r = c.get(url)
    finally:
        origin.close()
    assert r.status_code == 502 and r.json()["error"]["code"] == "BACKEND_UNREACHABLE"
    assert "x-cache-status" not in r.headers


def test_alone_in_reverse_mode_with_stale_on_error(proxy_factory) -> None:
    backend = NamedBackend("o")
    try:
        # mitmproxy's default connection_strategy (eager) connects when the client does, and
        # drops the client when that fails, before any HTTP: lazy lets the request through.
        p = proxy_factory(
            scripts=("addons/cache.py",),
            options={"connection_strategy": "lazy", "cache_stale_on_error": True},
            extra_args=reverse_to(backend.url),
        )
        with httpx.Client(base_url=p.url, timeout=10, trust_env=False) as c:
            for path, cc in (
                ("/sie", "max-age=1, stale-if-error=60"),
                ("/plain", "max-age=1"),  # no validator: kept for cache_stale_on_error
                ("/must", "max-age=1, must-revalidate"),
            ):
                backend.headers = {"Cache-Control": cc, "Age": "5"}
                assert status(c.get(path)) == "MISS"
            backend.stop()
            for path in ("/sie", "/plain"):
                r = c.get(path)
                assert r.status_code == 200 and status(r) == "STALE"
                assert r.json()["path"] == path
                assert r.headers["cache-status"].endswith("detail=connection_refused")
            r = c.get("/must")
            assert r.status_code == 502 and "x-cache-status" not in r.headers
            backend.start()  # same port: the next request reaches it again
            r = c.get("/plain")
            assert r.status_code == 200 and status(r) == "EXPIRED"
    finally:
        backend.close()


def test_router_retries_come_before_a_stale_answer(proxy_factory, tmp_path: Path) -> None:
    a, b = NamedBackend("a"), NamedBackend("b")
    try:
        for backend in (a, b):
            backend.headers = {"Cache-Control": "max-age=1, stale-if-error=60", "Age": "5"}
        routing = {
            "listeners": [{"mode": "reverse", "host": "127.0.0.1", "port": 0}],
            "rules": [
                {
                    "name": "pool",
                    "forward": {
                        "backends": [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}]
                    },
                }
            ],
            "retries": {"max_attempts": 2, "backoff": "10ms"},
        }
        profile = write_profile(tmp_path, {"routing": routing, "health_checks": {"enabled": False}})
        p = proxy_factory(options={"waypost_profile": str(profile)}, wait=False)
        url = f"http://127.0.0.1:{p.wait_for(REVERSE, timeout=40).group(2)}/r"
        with httpx.Client(timeout=10, trust_env=False) as c:
            assert status(c.get(url)) == "MISS"
            a.stop()
            b.stop()
            r = c.get(url)
            assert r.status_code == 200 and status(r) == "STALE"
            b.start()
            answers = [c.get(url) for _ in range(2)]  # round robin: one of them tries a first
        assert [(status(r), r.json()["backend"]) for r in answers] == [("EXPIRED", "b")] * 2
        wait_until(lambda: len([j for j in p.json_lines() if j.get("message") == "request"]) >= 4)
        lines = [j for j in p.json_lines() if j.get("message") == "request"]
        stale = lines[1]
        assert stale["cache"] == "STALE" and stale["status"] == 200 and stale["retries"] == 1
        assert stale["backend_error"] == "connection_refused" and "error" not in stale
        assert any(j.get("retries") == 1 and j["cache"] == "EXPIRED" for j in lines[2:])
    finally:
        a.close()
        b.close()


def test_concurrent_misses_make_one_origin_fetch(origin: Origin, reverse: Proxy) -> None:
    origin.set("/coalesce", (200, {"Cache-Control": "max-age=60"}, b"c"), delay=0.5)
    results: list[str] = []

    def one() -> None:
        with httpx.Client(base_url=reverse.url, timeout=10, trust_env=False) as c:
            results.append(c.get("/coalesce").headers.get("x-cache-status", ""))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert origin.hits["/coalesce"] == 1
    assert sorted(results) == ["HIT"] * 5 + ["MISS"]


# --- the bundle: purge API, metrics, access log -------------------------------------

PROFILE = """\
server: {host: 127.0.0.1, port: 8080, timeouts: {connect: 2s, read: 3s}}
logging: {level: info, format: json, output: stdout}
metrics: {enabled: true, host: 127.0.0.1, port: 0}
security:
  egress: {block_private: true, allowed_networks: [127.0.0.1/32]}
admin: {token: s3cret}
cache: {mode: default_ttl, default_ttl: 60s, max_memory: 8MB}
"""


@pytest.fixture
def bundle(proxy_factory, tmp_path: Path) -> Proxy:
    path = tmp_path / "profile.yaml"
    path.write_text(PROFILE)
    p = proxy_factory(options={"waypost_profile": str(path)})
    p.mgmt_port = int(p.wait_for(MANAGEMENT).group(1))  # type: ignore[attr-defined]
    return p


def test_prd_9_2_second_request_is_a_hit(bundle: Proxy, backend: Backend) -> None:
    url = f"{backend.url}/bytes/100?prd=9.2"
    with httpx.Client(proxy=bundle.url, timeout=10, trust_env=False) as c:
        r1 = c.get(url)
        hits = backend.hits["/bytes/100"]
        r2 = c.get(url)
    assert r1.headers["x-cache-status"] == "MISS"
    assert r2.headers["x-cache-status"] == "HIT" and r2.content == b"x" * 100
    assert backend.hits["/bytes/100"] == hits  # backend count unchanged
    assert r2.headers.get_list("via") == r1.headers.get_list("via") == ["1.1 waypost"]
    wait_until(lambda: len([j for j in bundle.json_lines() if j.get("message") == "request"]) >= 2)
    lines = [j for j in bundle.json_lines() if j.get("message") == "request"]
    assert [j["cache_hit"] for j in lines[-2:]] == [False, True]
    assert lines[-1]["cache"] == "HIT"


def test_purge_api_and_stats(bundle: Proxy, backend: Backend) -> None:
    admin = f"http://127.0.0.1:{bundle.mgmt_port}"  # type: ignore[attr-defined]
    auth = {"Authorization": "Bearer s3cret"}
    with httpx.Client(proxy=bundle.url, timeout=10, trust_env=False) as c:
        for i in range(3):
            c.get(f"{backend.url}/echo/purge/{i}")
        c.get(f"{backend.url}/bytes/7")
        assert c.get(f"{backend.url}/echo/purge/0").headers["x-cache-status"] == "HIT"
    with httpx.Client(base_url=admin, timeout=10, trust_env=False) as m:
        assert m.delete("/admin/cache", params={"pattern": "*"}).status_code == 401
        assert m.delete("/admin/cache", headers=auth).status_code == 400
        r = m.delete("/admin/cache", params={"pattern": "*/echo/purge/*"}, headers=auth)
        assert r.status_code == 200 and r.json() == {"invalidated": 3, "remaining": 1}
        r = m.delete("/admin/cache", params={"pattern": "127.0.0.1", "soft": "true"}, headers=auth)
        assert r.json() == {"invalidated": 1, "remaining": 1}
        stats = m.get("/admin/cache/stats", headers=auth).json()
        assert stats["entries"] == 1 and stats["size"] > 0 and 0 < stats["hit_rate"] < 1
        assert {"miss_rate", "evictions", "max_memory"} <= set(stats)
        metrics = m.get("/metrics").text
    assert re.search(r'cache_requests_total\{result="HIT"\} 1\.0', metrics)
    assert re.search(r"^cache_entries 1\.0$", metrics, re.M)
    assert "cache_evictions_total" in metrics and "cache_bytes" in metrics
    with httpx.Client(proxy=bundle.url, timeout=10, trust_env=False) as c:
        # the soft-purged entry has no validator: the next request refetches it
        assert c.get(f"{backend.url}/echo/purge/0").headers["x-cache-status"] == "MISS"


@pytest.fixture
def admin_reverse(proxy_factory, origin: Origin) -> Callable[..., tuple[Proxy, str]]:
    """Start the cache and the management app in reverse mode to the origin, with admin token
    `t` and the given options: the proxy and the management app's URL."""

    def start(**options: object) -> tuple[Proxy, str]:
        p = proxy_factory(
            scripts=("addons/cache.py", "addons/management.py"),
            options={"metrics_port": 0, "admin_token": "t", **options},
            extra_args=reverse_to(origin.url),
        )
        return p, f"http://127.0.0.1:{p.wait_for(MANAGEMENT).group(1)}"

    return start


def test_purge_by_tag(origin: Origin, admin_reverse: Callable[..., tuple[Proxy, str]]) -> None:
    p, admin = admin_reverse()
    origin.set("/tag/a", (200, {"Cache-Control": "max-age=60", "Surrogate-Key": "red blue"}, b"a"))
    origin.set("/tag/b", (200, {"Cache-Control": "max-age=60", "Cache-Tag": "blue"}, b"b"))
    with httpx.Client(base_url=p.url, timeout=10, trust_env=False) as c:
        c.get("/tag/a")
        c.get("/tag/b")
        with httpx.Client(base_url=admin, timeout=10, trust_env=False) as m:
            r = m.delete(
                "/admin/cache", params={"tag": "red"}, headers={"Authorization": "Bearer t"}
            )
        assert r.json() == {"invalidated": 1, "remaining": 1}
        assert c.get("/tag/a").headers["x-cache-status"] == "MISS"
        assert c.get("/tag/b").headers["x-cache-status"] == "HIT"


def test_memory_stays_within_max_memory_under_a_flood(
    origin: Origin, admin_reverse: Callable[..., tuple[Proxy, str]]
) -> None:
    p, admin = admin_reverse(cache_max_memory="64KB", cache_max_object_size="8KB")
    origin.set("/flood/*", (200, {"Cache-Control": "max-age=600"}, b"f" * 2048))
    auth = {"Authorization": "Bearer t"}
    with (
        httpx.Client(base_url=p.url, timeout=10, trust_env=False) as c,
        httpx.Client(base_url=admin, timeout=10, trust_env=False) as m,
    ):
        for i in range(200):
            assert c.get(f"/flood/{i}").headers["x-cache-status"] == "MISS"
            if i % 50 == 49:
                stats = m.get("/admin/cache/stats", headers=auth).json()
                assert stats["size"] <= 64 * 1024 == stats["max_memory"]
        stats = m.get("/admin/cache/stats", headers=auth).json()
        assert stats["evictions"] > 150 and 0 < stats["entries"] < 32
        assert c.get("/flood/199").headers["x-cache-status"] == "HIT"
