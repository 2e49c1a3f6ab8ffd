"""RFC 9111 decisions: one table row per rule (section in the id)."""

from __future__ import annotations

import calendar

import pytest

from addons.caching import rfc9111 as rfc

T = float(calendar.timegm((1994, 11, 6, 8, 49, 37, 0, 0, 0)))
CC = rfc.parse_cache_control


@pytest.mark.parametrize(
    "value,expected",
    [
        ("Sun, 06 Nov 1994 08:49:37 GMT", T),  # IMF-fixdate
        ("Sunday, 06-Nov-94 08:49:37 GMT", T),  # RFC 850
        ("Sun Nov  6 08:49:37 1994", T),  # asctime
        ("  Sun, 06 Nov 1994 08:49:37 GMT ", T),  # OWS around the value
        ("Sun, 06 Nov 1994 08:49:37 UTC", None),  # only GMT
        ("Sun, 6 Nov 1994 08:49:37 GMT", None),  # day is 2DIGIT
        ("sun, 06 nov 1994 08:49:37 gmt", None),  # case-sensitive names
        ("Sun, 06 Nov 1994 08:49:37 +0000", None),  # email.utils would accept this
        ("Sun, 06 Nov 1994 08:49 GMT", None),
        ("Sun, 31 Nov 1994 08:49:37 GMT", None),  # impossible date
        ("Sun, 06 Nov 1994 24:00:00 GMT", None),  # impossible time
        ("1994-11-06T08:49:37Z", None),
        ("0", None),
        ("", None),
        ("Sun Nov 6 08:49:37 1994", None),  # asctime pads the day with a space
        ("Thursday, 01-Jan-70 00:00:00 GMT", 0.0),
        ("Monday, 01-Jan-35 00:00:00 GMT", float(calendar.timegm((2035, 1, 1, 0, 0, 0)))),
    ],
)
def test_http_date(value: str, expected: float | None) -> None:
    assert rfc.parse_http_date(value) == expected


@pytest.mark.parametrize(
    "lines,expected",
    [
        (["max-age=60"], {"max-age": "60"}),
        (["Max-Age=60, PUBLIC"], {"max-age": "60", "public": None}),  # case-insensitive
        (["max-age=60", "max-age=10"], {"max-age": "60"}),  # duplicates: first wins
        (["max-age=60, max-age=10"], {"max-age": "60"}),
        (['max-age="60"'], {"max-age": "60"}),  # quoted delta-seconds
        (['private="set-cookie, x-a", max-age=5'], {"private": "set-cookie, x-a", "max-age": "5"}),
        (['no-cache="a,b"'], {"no-cache": "a,b"}),  # comma inside quotes
        (["foo=bar, max-age=5"], {"foo": "bar", "max-age": "5"}),  # unknown directive
        (['foo="a, \\"b\\"", max-age=5'], {"foo": 'a, "b"', "max-age": "5"}),  # escaped quote
        (["max-age=5 , , no-store"], {"max-age": "5", "no-store": None}),  # empty members
        (["@@@, max-age=5"], {"max-age": "5"}),  # garbage skipped
        ([""], {}),
    ],
)
def test_cache_control(lines: list[str], expected: dict[str, str | None]) -> None:
    assert dict(CC(lines)) == expected


@pytest.mark.parametrize(
    "value,expected",
    [
        ("60", 60),
        ("0", 0),
        ("-1", 0),
        ("1.5", 0),
        ("abc", 0),
        (None, 0),
        ("99999999999", 2147483648),
    ],
)
def test_delta_seconds(value: str | None, expected: int) -> None:
    assert rfc.delta_seconds(value) == expected  # §1.2.2


@pytest.mark.parametrize(
    "values,expected",
    [([], 0), (["10"], 10), (["10, 20"], 10), (["-5"], 0), (["abc"], 0), (["10", "20"], 10)],
)
def test_age_field(values: list[str], expected: int) -> None:
    assert rfc.parse_age(values) == expected  # §5.1


def _storable(status: int = 200, resp: str = "", req: str = "", **kw: object) -> str | None:
    args: dict[str, object] = {
        "has_authorization": False,
        "has_expires": False,
        "vary": frozenset(),
    } | kw
    method = str(args.pop("method", "GET"))
    return rfc.storable(method, status, CC([req]), CC([resp]), **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({"resp": "max-age=60"}, None),  # §3 explicit freshness
        ({"status": 500, "resp": "max-age=60"}, None),  # explicit: any final status
        ({"status": 500}, "no freshness"),  # 500 is not heuristically cacheable
        ({"status": 200}, None),  # heuristically cacheable (RFC 9110 §15.1)
        ({"status": 404}, None),
        ({"status": 302}, "no freshness"),
        ({"status": 302, "has_expires": True}, None),
        ({"status": 206, "resp": "max-age=60"}, "status"),  # no partial content stored
        ({"status": 304, "resp": "max-age=60"}, "status"),
        ({"resp": "max-age=60, no-store"}, "no-store"),  # §5.2.2.5
        ({"req": "no-store", "resp": "max-age=60"}, "request no-store"),  # §5.2.1.5
        ({"resp": "max-age=60, private"}, "private"),  # §5.2.2.7 shared cache
        ({"resp": 'max-age=60, private="x-user"'}, None),  # qualified: field dropped only
        ({"resp": "max-age=60", "has_authorization": True}, "authorization"),  # §3.5
        ({"resp": "max-age=60, public", "has_authorization": True}, None),
        ({"resp": "s-maxage=60", "has_authorization": True}, None),
        ({"resp": "max-age=60, must-revalidate", "has_authorization": True}, None),
        ({"resp": "max-age=60", "vary": frozenset({"*"})}, "vary *"),  # §4.1
        ({"resp": "no-cache"}, None),  # §5.2.2.4: stored, revalidated
        ({"status": 500, "resp": "public"}, None),
        ({"resp": "max-age=60", "method": "POST"}, "method"),
        ({"resp": "no-store, must-understand", "status": 200}, None),  # §5.2.2.3
        ({"resp": "no-store, must-understand, max-age=5", "status": 299}, "must-understand"),
        ({"status": 100, "resp": "max-age=60"}, "status"),
    ],
)
def test_storable(kwargs: dict[str, object], expected: str | None) -> None:
    assert _storable(**kwargs) == expected  # type: ignore[arg-type]


def _lifetime(resp: str = "", status: int = 200, **kw: object) -> tuple[float, bool]:
    args: dict[str, object] = {
        "date": T,
        "expires": [],
        "last_modified": None,
        "response_time": T,
        "heuristic_max": 86400.0,
        "default_ttl": None,
    } | kw
    return rfc.freshness_lifetime(CC([resp]), status, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({"resp": "max-age=60"}, (60.0, False)),  # §4.2.1
        ({"resp": "max-age=60, s-maxage=10"}, (10.0, False)),  # shared: s-maxage first
        ({"resp": "max-age=60", "expires": ["Sun, 06 Nov 1994 09:49:37 GMT"]}, (60.0, False)),
        ({"expires": ["Sun, 06 Nov 1994 09:49:37 GMT"]}, (3600.0, False)),  # Expires - Date
        ({"expires": ["Sun, 06 Nov 1994 09:49:37 GMT"], "date": None}, (3600.0, False)),
        ({"expires": ["0"]}, (0.0, False)),  # invalid Expires: stale (§5.3)
        ({"expires": ["Sun, 06 Nov 1994 07:49:37 GMT"]}, (0.0, False)),  # in the past
        ({"resp": "max-age=abc"}, (0.0, False)),  # invalid max-age: stale
        ({"last_modified": T - 1000}, (100.0, True)),  # §4.2.2: 10% since Last-Modified
        ({"last_modified": T - 10_000_000}, (86400.0, True)),  # capped
        ({"last_modified": T + 10}, (0.0, True)),  # Last-Modified in the future
        ({}, (0.0, True)),  # nothing to go on
        ({"default_ttl": 300.0}, (300.0, True)),  # Waypost's default_ttl mode
        ({"status": 500, "last_modified": T - 1000}, (0.0, True)),  # not heuristic status
        ({"status": 500, "resp": "public", "last_modified": T - 1000}, (100.0, True)),
    ],
)
def test_freshness_lifetime(kwargs: dict[str, object], expected: tuple[float, bool]) -> None:
    assert _lifetime(**kwargs) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "age_value,date,request_time,response_time,expected",
    [
        (0, T, T, T, 0.0),
        (0, T - 10, T, T, 10.0),  # apparent age from Date
        (30, T, T, T, 30.0),  # Age received counts (§4.2.3)
        (30, T, T - 2, T, 32.0),  # plus the response delay
        (0, T + 100, T, T, 0.0),  # Date in the future: apparent age 0
        (5, None, T, T, 5.0),  # no Date: the receipt time
    ],
)
def test_initial_age(
    age_value: int, date: float | None, request_time: float, response_time: float, expected: float
) -> None:
    assert rfc.initial_age(age_value, date, request_time, response_time) == expected


def _reuse(age: float, lifetime: float, req: str = "", **kw: object) -> rfc.Reuse:
    args: dict[str, object] = {
        "no_cache": False,
        "must_revalidate": False,
        "stale_while_revalidate": 0,
    } | kw
    return rfc.reuse(age, lifetime, CC([req]), **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "args,kwargs,expected",
    [
        ((10, 60), {}, rfc.Reuse("fresh")),  # §4.2
        ((60, 60), {}, rfc.Reuse("revalidate")),  # age == lifetime: stale
        ((10, 60), {"no_cache": True}, rfc.Reuse("revalidate")),  # §5.2.2.4
        ((10, 60, "no-cache"), {}, rfc.Reuse("revalidate")),  # §5.2.1.4
        ((10, 60, "max-age=5"), {}, rfc.Reuse("revalidate")),  # §5.2.1.1
        ((10, 60, "max-age=20"), {}, rfc.Reuse("fresh")),
        ((10, 60, "min-fresh=55"), {}, rfc.Reuse("revalidate")),  # §5.2.1.3
        ((10, 60, "min-fresh=5"), {}, rfc.Reuse("fresh")),
        ((70, 60, "max-stale=20"), {}, rfc.Reuse("stale")),  # §5.2.1.2
        ((90, 60, "max-stale=20"), {}, rfc.Reuse("revalidate")),
        ((9000, 60, "max-stale"), {}, rfc.Reuse("stale")),  # any staleness
        ((70, 60, "max-stale"), {"must_revalidate": True}, rfc.Reuse("revalidate")),  # §5.2.2.2
        ((70, 60), {"stale_while_revalidate": 30}, rfc.Reuse("stale", swr=True)),  # RFC 5861
        ((95, 60), {"stale_while_revalidate": 30}, rfc.Reuse("revalidate")),
        (
            (70, 60),
            {"stale_while_revalidate": 30, "must_revalidate": True},
            rfc.Reuse("revalidate"),
        ),
        ((10, 60), {"forced_stale": True}, rfc.Reuse("revalidate")),  # soft purge
        ((10, 60, "foo, bar=1"), {}, rfc.Reuse("fresh")),  # unknown request directives
    ],
)
def test_reuse(args: tuple, kwargs: dict[str, object], expected: rfc.Reuse) -> None:
    assert _reuse(*args, **kwargs) == expected


@pytest.mark.parametrize(
    "age,lifetime,resp,req,must,expected",
    [
        (70, 60, "stale-if-error=30", "", False, True),  # RFC 5861 §4
        (100, 60, "stale-if-error=30", "", False, False),
        (70, 60, "", "stale-if-error=30", False, True),  # request directive
        (70, 60, "", "", False, False),
        (70, 60, "stale-if-error=30", "", True, False),  # must-revalidate wins
    ],
)
def test_stale_if_error(
    age: float, lifetime: float, resp: str, req: str, must: bool, expected: bool
) -> None:
    assert rfc.stale_if_error(age, lifetime, CC([resp]), CC([req]), must) is expected


@pytest.mark.parametrize(
    "age,resp,must,expected",
    [
        (5000, "", False, True),  # RFC 9111 §4.2.4: disconnected, no directive forbids it
        (70, "stale-if-error=5", False, True),  # beyond the window, still allowed
        (70, "", True, False),  # must-revalidate / proxy-revalidate / s-maxage
        (70, "no-cache", False, False),
        (70, "no-cache, stale-if-error=30", False, True),  # as without disconnected
        (70, 'no-cache="set-cookie"', False, True),  # qualified: only drops a field
    ],
)
def test_stale_if_error_when_disconnected(
    age: float, resp: str, must: bool, expected: bool
) -> None:
    assert rfc.stale_if_error(age, 60, CC([resp]), CC([]), must, disconnected=True) is expected


@pytest.mark.parametrize(
    "inm,ims,etag,lm,expected",
    [
        ('"a"', None, '"a"', None, True),
        ('"b", "a"', None, '"a"', None, True),
        ('W/"a"', None, '"a"', None, True),  # weak comparison (RFC 9110 §13.1.2)
        ('"a"', None, 'W/"a"', None, True),
        ("*", None, '"a"', None, True),
        ('"b"', None, '"a"', None, False),
        ('"b"', "Sun, 06 Nov 1994 08:49:37 GMT", '"a"', T, False),  # INM wins over IMS
        (None, "Sun, 06 Nov 1994 08:49:37 GMT", None, T, True),  # not modified since
        (None, "Sun, 06 Nov 1994 08:49:36 GMT", None, T, False),
        (None, "garbage", None, T, False),
        (None, "Sun, 06 Nov 1994 08:49:37 GMT", None, None, False),
    ],
)
def test_not_modified(
    inm: str | None, ims: str | None, etag: str | None, lm: float | None, expected: bool
) -> None:
    assert rfc.not_modified(inm, ims, etag, lm) is expected


def test_stored_fields_drop_hop_by_hop_and_connection_listed() -> None:
    fields = [
        ("Content-Type", "text/plain"),
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("Age", "3"),
        ("Content-Length", "5"),
        ("X-User", "alice"),
        ("ETag", '"a"'),
    ]
    kept = rfc.stored_fields(fields, CC(['private="x-user"']))  # §3.1, §5.2.2.7
    assert kept == [("Content-Type", "text/plain"), ("ETag", '"a"')]


def test_merge_304_replaces_fields_but_not_those_describing_the_body() -> None:
    stored = [
        ("Content-Type", "text/plain"),
        ("Cache-Control", "max-age=1"),
        ("X-A", "old"),
        ("ETag", '"a"'),
        ("Content-Encoding", "gzip"),
    ]
    fresh = [
        ("Cache-Control", "max-age=60"),
        ("Content-Length", "0"),
        ("X-B", "new"),
        ("Connection", "close"),
        ("ETag", '"b"'),
        ("Content-Encoding", "br"),
        ("Content-MD5", "x"),
        ("Content-Range", "bytes 0-1/2"),
    ]
    merged = rfc.merge_304(stored, fresh)  # §3.2, §4.3.4
    assert merged == [
        ("Content-Type", "text/plain"),
        ("X-A", "old"),
        ("ETag", '"a"'),
        ("Content-Encoding", "gzip"),
        ("Cache-Control", "max-age=60"),
        ("X-B", "new"),
    ]


@pytest.mark.parametrize(
    "values,expected",
    [
        (["en,  de"], "en,de"),
        (["en", "de"], "en,de"),  # field lines combined
        (["  gzip ,br "], "gzip,br"),
        (["a   b"], "a b"),
        ([], ""),
    ],
)
def test_vary_value_normalisation(values: list[str], expected: str) -> None:
    assert rfc.normalise_vary_value(values) == expected  # §4.1


def test_vary_names() -> None:
    assert rfc.vary_names(["Accept-Encoding, accept-language", "X-A"]) == {
        "accept-encoding",
        "accept-language",
        "x-a",
    }


@pytest.mark.parametrize(
    "values,expected",
    [
        (["max-age=60"], {"max-age": "60"}),
        (["MaX-aGe=60"], {"max-age": "60"}),
        (["max-age=60;me"], {"max-age": "60"}),
        (["max-age=60;ME"], {"max-age": "60"}),  # device tokens compare case-insensitively
        (["max-age=60;other"], None),
        (["max-age=60;other, no-store"], {"no-store": None}),
        (["max-age=9, max-age=60;me"], {"max-age": "60"}),  # targeted at us wins
        (["foobar, max-age=60"], {"foobar": None, "max-age": "60"}),
        (["max-age =60"], None),  # no whitespace around "=" in this syntax
        (["max-age= 60"], None),
        (["max-age=60+30"], {"max-age": "60", "stale-if-error": "30"}),
        (['content="ESI/1.0", no-store;me'], {"no-store": None}),
        ([""], None),
    ],
)
def test_surrogate_directives(values: list[str], expected: dict[str, str | None] | None) -> None:
    assert rfc.surrogate_directives(values, "me") == expected


@pytest.mark.parametrize(
    "fields,expected",
    [
        (
            {"cdn-cache-control": ["max-age=5"], "surrogate-control": ["max-age=9"]},
            {"max-age": "5"},
        ),
        ({"cdn-cache-control": [""], "surrogate-control": ["max-age=9"]}, {"max-age": "9"}),
        ({"surrogate-control": ["max-age=9;elsewhere"]}, None),
        ({"cache-control": ["max-age=1"]}, None),
    ],
)
def test_targeted_directives_prefer_cdn_cache_control(
    fields: dict[str, list[str]], expected: dict[str, str | None] | None
) -> None:
    assert rfc.targeted_directives(lambda n: fields.get(n, []), "me") == expected  # RFC 9213


@pytest.mark.parametrize(
    "value,expected",
    [
        ("bytes=0-1", (0, 1)),
        ("bytes=1-", (1, 10)),
        ("bytes=-1", (10, 10)),  # suffix (RFC 9110 §14.1.2)
        ("bytes=-20", (0, 10)),
        ("bytes=0-100", (0, 10)),  # last-pos past the end is cut to the end
        ("BYTES = 2-3", (2, 3)),
        ("bytes=20-", False),  # unsatisfiable: 416
        ("bytes=-0", False),
        ("bytes=5-2", None),  # invalid: ignored, whole body
        ("bytes=0-1,3-4", None),  # several ranges: whole body (§14.2 allows ignoring)
        ("items=0-1", None),
        ("bytes=", None),
    ],
)
def test_byte_range(value: str, expected: tuple[int, int] | bool | None) -> None:
    assert rfc.byte_range(value, 11) == expected


@pytest.mark.parametrize(
    "value,expected",
    [
        ('"a"', True),
        ('"b"', False),
        ('W/"a"', False),  # If-Range needs a strong match (RFC 9110 §13.1.5)
        ("Sun, 06 Nov 1994 08:49:37 GMT", True),
        ("Sun, 06 Nov 1994 08:49:38 GMT", False),
    ],
)
def test_if_range_holds(value: str, expected: bool) -> None:
    assert rfc.if_range_holds(value, '"a"', "Sun, 06 Nov 1994 08:49:37 GMT") is expected
