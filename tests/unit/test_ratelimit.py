"""Rate limiting: the bucket maths as a table, the bounded table, rules, headers, the addon."""

from __future__ import annotations

import json
import logging
import sys
import time
import tracemalloc

import pytest
from mitmproxy import exceptions
from mitmproxy.addons import script
from mitmproxy.test import taddons, tflow

from addons import metrics, policy, ratelimit
from addons.kernel import admission
from addons.kernel.record import record
from addons.ratelimiting import bucket
from addons.ratelimiting.bucket import Take, take

# (full_at, now, rate, burst) -> (allowed, full_at after, remaining, retry_after, reset)
TAKE_CASES = [
    # a fresh bucket (full_at in the past) holds `burst` tokens
    ((0.0, 100.0, 10.0, 5), Take(True, 100.1, 4, 0.0, 0.1)),
    ((100.0, 100.0, 10.0, 5), Take(True, 100.1, 4, 0.0, 0.1)),
    # the fifth token of five at the same instant is still there, the sixth is not
    ((100.4, 100.0, 10.0, 5), Take(True, 100.5, 0, 0.0, 0.5)),
    ((100.5, 100.0, 10.0, 5), Take(False, 100.5, 0, 0.1, 0.5)),
    # refilled by elapsed time: 0.25 s at 10/s is 2.5 tokens back
    ((100.5, 100.25, 10.0, 5), Take(True, 100.6, 1, 0.0, 0.35)),
    # slow rate: one per 2 s, burst 1; the next token is 2 s away
    ((0.0, 10.0, 0.5, 1), Take(True, 12.0, 0, 0.0, 2.0)),
    ((12.0, 10.0, 0.5, 1), Take(False, 12.0, 0, 2.0, 2.0)),
    ((12.0, 11.5, 0.5, 1), Take(False, 12.0, 0, 0.5, 0.5)),
    ((12.0, 12.0, 0.5, 1), Take(True, 14.0, 0, 0.0, 2.0)),
    # a long idle bucket does not store more than `burst`
    ((0.0, 1e6, 100.0, 3), Take(True, 1e6 + 0.01, 2, 0.0, 0.01)),
]


@pytest.mark.parametrize("args, expected", TAKE_CASES)
def test_take(args: tuple[float, float, float, int], expected: Take) -> None:
    got = take(*args)
    assert got.allowed == expected.allowed
    assert got.full_at == pytest.approx(expected.full_at)
    assert got.remaining == expected.remaining
    assert got.retry_after == pytest.approx(expected.retry_after)
    assert got.reset == pytest.approx(expected.reset)


@pytest.mark.parametrize("rate, burst", [(10.0, 20), (3.0, 7), (0.1, 1), (1000.0, 2000)])
def test_exactly_burst_at_once_then_rate(rate: float, burst: int) -> None:
    full_at, now = 0.0, 1000.0
    allowed = 0
    for _ in range(burst + 5):
        r = take(full_at, now, rate, burst)
        full_at = r.full_at
        allowed += r.allowed
    assert allowed == burst
    # then one more token each 1/rate seconds
    r = take(full_at, now + 1.0 / rate, rate, burst)
    assert r.allowed
    assert not take(r.full_at, now + 1.0 / rate, rate, burst).allowed


@pytest.mark.parametrize(
    "seconds, expected", [(0.0001, 1), (0.1, 1), (1.0, 1), (1.0000001, 2), (2.5, 3), (59.99, 60)]
)
def test_retry_after_is_whole_seconds_rounded_up(seconds: float, expected: int) -> None:
    assert bucket.retry_after(seconds) == expected


def test_headers_structured_fields() -> None:
    limit = bucket.Limit("api", 2.0, 5, "enforce")
    h = bucket.headers(limit, Take(False, 102.5, 0, 0.5, 2.5))
    assert h == {
        "Retry-After": "1",
        "RateLimit-Policy": '"api";q=5;w=3',
        "RateLimit": '"api";r=0;t=3',
    }


RULES = json.dumps(
    [
        {"id": "search", "host": "api.example.com", "path": "/search", "requests_per_second": 1},
        {"id": "api", "host": "api.example.com", "requests_per_second": 5, "burst": 10},
        {"id": "cdn", "host": "*.cdn.example", "requests_per_second": 0},
        {"id": "login", "path": "/login", "requests_per_second": 0.2, "mode": "shadow"},
    ]
)


@pytest.mark.parametrize(
    "host, path, expected",
    [
        ("api.example.com", "/search?q=1", "search"),
        ("api.example.com", "/other", "api"),
        ("api.example.com", None, "api"),  # CONNECT: path rules never match
        ("img.cdn.example", "/a.png", "cdn"),
        ("cdn.example", "/a.png", None),  # *. is subdomains only
        ("www.example.com", "/login", "login"),
        ("www.example.com", "/", None),
    ],
)
def test_rule_match(host: str, path: str | None, expected: str | None) -> None:
    rules = bucket.parse_rules(RULES, "enforce")
    found = bucket.match(rules, host, path)
    assert (found.id if found else None) == expected


def test_rule_defaults() -> None:
    rules = {r.id: r for r in bucket.parse_rules(RULES, "enforce")}
    assert rules["search"].burst == 1 and rules["search"].mode == "enforce"
    assert rules["login"].mode == "shadow" and rules["login"].burst == 1
    assert rules["api"].burst == 10


@pytest.mark.parametrize(
    "text, problem",
    [
        ("[{", "not valid JSON"),
        ('[{"id": "x", "requests_per_second": 1}]', "host or a path"),
        ('[{"id": "bad id", "host": "a", "requests_per_second": 1}]', "id"),
        ('[{"id": "x", "path": "nope", "requests_per_second": 1}]', "path prefix"),
        ('[{"id": "x", "host": "a", "requests_per_second": -1}]', "requests_per_second"),
        ('[{"id": "x", "host": "a", "requests_per_second": 1, "colour": 1}]', "colour"),
        (
            '[{"id": "x", "host": "a", "requests_per_second": 1},'
            ' {"id": "x", "host": "b", "requests_per_second": 1}]',
            "used twice",
        ),
    ],
)
def test_bad_rules(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        bucket.parse_rules(text, "enforce")


# --- the bounded table ---------------------------------------------------------------------


def test_table_drops_full_buckets_and_sweeps_idle_ones() -> None:
    b = bucket.Buckets(10)
    assert b.take("a", 100.0, 1.0, 2) is None  # allowed
    assert len(b) == 1
    # full again after 1 s: the next take finds it full and the entry is dropped or renewed
    b.take("b", 100.0, 1.0, 2)
    assert b.sweep(100.5) == 0  # still refilling
    assert b.sweep(101.01) == 2
    assert len(b) == 0


@pytest.mark.parametrize("rate, burst", [(10.0, 20), (3.0, 7), (0.5, 1), (1000.0, 3)])
def test_table_agrees_with_take(rate: float, burst: int) -> None:
    """Buckets.take inlines the allowed case of take(): both must decide alike."""
    import random

    rng = random.Random(rate * burst)
    b = bucket.Buckets(10)
    full_at, now = 0.0, 50.0
    for _ in range(2000):
        now += rng.random() * 2.0 / rate / burst
        expected = take(full_at, now, rate, burst)
        got = b.take("k", now, rate, burst)
        assert (got is None) == expected.allowed
        if got is not None:
            assert got == expected
        full_at = expected.full_at
        assert b.table.get("k", now) == pytest.approx(max(full_at, now))


def test_table_is_lru_bounded() -> None:
    b = bucket.Buckets(3)
    for key in "abc":
        b.take(key, 0.0, 1.0, 5)
    b.take("a", 0.0, 1.0, 5)  # a is now the most recently used
    b.take("d", 0.0, 1.0, 5)
    assert list(b.table) == ["c", "a", "d"]
    assert "b" not in b.table and b.evicted == 1


def footprint(b: bucket.Buckets) -> int:
    return sys.getsizeof(b.table) + sum(sys.getsizeof(k) + 24 for k in b.table)


def test_memory_stays_bounded_with_a_million_distinct_clients() -> None:
    maxsize = 50_000
    b = bucket.Buckets(maxsize)
    take_ = b.take
    now = time.monotonic()
    start = time.perf_counter()
    for i in range(1_000_000):
        take_(f"{i >> 24 & 255}.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", now, 1.0, 10)
        if i == maxsize - 1:
            full = footprint(b)
    elapsed = time.perf_counter() - start
    assert len(b) == maxsize
    assert b.evicted == 1_000_000 - maxsize
    # What the table holds after a million clients is what it held after `maxsize` of them.
    assert footprint(b) < 1.5 * full
    for i in range(200_000):
        take_(f"2001:db8::{i:x}", now, 1.0, 10)
    assert len(b) == maxsize
    assert footprint(b) < 1.5 * full
    # And the whole table: well under 300 bytes per client, key included.
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        fresh = bucket.Buckets(maxsize)
        for i in range(maxsize):
            fresh.take(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", now, 1.0, 10)
        per_entry = (tracemalloc.get_traced_memory()[0] - base) / maxsize
    finally:
        tracemalloc.stop()
    assert per_entry < 300, per_entry
    print(f"1M distinct clients: {elapsed:.1f} s, {per_entry:.0f} bytes per bucket")


# --- the addon -----------------------------------------------------------------------------


def count(**labels: str) -> float:
    return metrics.REGISTRY.get_sample_value("policy_decisions_total", labels) or 0.0


def flow(ip: str = "192.0.2.1", method: str = "GET", host: str = "example.com", path: str = "/"):
    f = tflow.tflow()
    f.client_conn.peername = (ip, 40000)
    f.request.host = host
    f.request.path = path
    if method == "CONNECT":
        f.request.method = "CONNECT"
    return f


def test_limit_answers_429_with_headers() -> None:
    r = ratelimit.RateLimit()
    with taddons.context(r) as tctx:
        tctx.configure(r, ratelimit_requests_per_second="1", ratelimit_burst=3)
        before = count(policy="ratelimit", decision="limit", rule="default")
        answers = []
        for _ in range(5):
            f = flow()
            r.requestheaders(f)
            answers.append(f.response)
        assert [a is None for a in answers] == [True, True, True, False, False]
        resp = answers[3]
        assert resp.status_code == 429 and resp.reason == "Too Many Requests"
        assert json.loads(resp.content)["error"]["code"] == "RATE_LIMITED"
        assert resp.headers["Retry-After"] == "1"
        assert resp.headers["RateLimit-Policy"] == '"default";q=3;w=3'
        assert resp.headers["RateLimit"] in ('"default";r=0;t=3', '"default";r=0;t=2')
        assert count(policy="ratelimit", decision="limit", rule="default") == before + 2
        # another client has its own bucket; a CONNECT takes from the same one
        f = flow("192.0.2.2", "CONNECT", path="")
        r.http_connect(f)
        assert f.response is None


def test_connect_is_limited() -> None:
    r = ratelimit.RateLimit()
    with taddons.context(r) as tctx:
        tctx.configure(r, ratelimit_requests_per_second="0.5")
        f = flow(method="CONNECT")
        r.http_connect(f)
        assert f.response is None
        f = flow(method="CONNECT")
        r.http_connect(f)
        assert f.response.status_code == 429
        assert f.response.headers["Retry-After"] == "2"


def test_exempt_rules_and_shadow(caplog: pytest.LogCaptureFixture) -> None:
    r = ratelimit.RateLimit()
    with taddons.context(r) as tctx:
        tctx.configure(
            r,
            ratelimit_requests_per_second="1",
            ratelimit_exempt=["10.0.0.0/8"],
            ratelimit_rules=RULES,
        )
        for _ in range(5):
            f = flow("10.1.2.3")
            r.requestheaders(f)
            assert f.response is None  # exempt client
            f = flow(host="img.cdn.example")
            r.requestheaders(f)
            assert f.response is None  # rate 0 rule: unlimited
        f = flow("192.0.2.9", host="api.example.com", path="/search")
        r.requestheaders(f)
        assert f.response is None
        f = flow("192.0.2.9", host="api.example.com", path="/search")
        r.requestheaders(f)
        assert f.response.headers["RateLimit-Policy"] == '"search";q=1;w=1'
        # the rule's bucket is its own: the default bucket of the client is untouched
        f = flow("192.0.2.9")
        r.requestheaders(f)
        assert f.response is None
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="waypost.audit"):
            for _ in range(3):
                f = flow("192.0.2.10", path="/login")
                r.requestheaders(f)
                assert f.response is None  # shadow rule
        assert record(f)["shadow"] == ["ratelimit:login"]
        assert [rec.waypost["decision"] for rec in caplog.records] == ["would_block"] * 2


def test_policy_wide_shadow() -> None:
    r = ratelimit.RateLimit()
    with taddons.context(r) as tctx:
        tctx.configure(r, ratelimit_requests_per_second="1", ratelimit_mode="shadow")
        for _ in range(3):
            f = flow()
            r.requestheaders(f)
            assert f.response is None


def test_behind_trusted_proxy_the_forwarded_client_is_limited() -> None:
    from addons import forwarding

    r = ratelimit.RateLimit()
    fwd = forwarding.Forwarding()
    with taddons.context(r, fwd) as tctx:
        tctx.configure(fwd, forwarding_trusted_proxies=["10.0.0.0/8"])
        tctx.configure(r, ratelimit_requests_per_second="1")
        for client, refused in (("203.0.113.1", False), ("203.0.113.2", False)):
            f = flow("10.0.0.1")
            f.request.headers["X-Forwarded-For"] = client
            r.requestheaders(f)
            assert (f.response is not None) == refused
        f = flow("10.0.0.1")
        f.request.headers["X-Forwarded-For"] = "203.0.113.1"
        r.requestheaders(f)
        assert f.response.status_code == 429


def test_connection_cap() -> None:
    r = ratelimit.RateLimit()
    with taddons.context(r) as tctx:
        tctx.configure(r, ratelimit_max_connections_per_ip=2, ratelimit_exempt=["10.0.0.0/8"])
        clients = [tflow.tclient_conn() for _ in range(4)]
        for c in clients:
            c.peername = ("::ffff:192.0.2.1", 1)
            r.client_connected(c)
        assert [bool(c.error) for c in clients] == [False, False, True, True]
        for c in clients:
            r.client_disconnected(c)
        assert r.connections == {} and r.counted == {}
        c = tflow.tclient_conn()
        c.peername = ("192.0.2.1", 1)
        r.client_connected(c)
        assert not c.error
        for _ in range(5):
            c = tflow.tclient_conn()
            c.peername = ("10.0.0.1", 1)
            r.client_connected(c)
            assert not c.error


def test_connection_cap_is_an_admission_gate() -> None:
    r = ratelimit.RateLimit()
    with taddons.context(r) as tctx:
        assert not admission.gated()
        tctx.configure(r, ratelimit_max_connections_per_ip=1, ratelimit_exempt=["10.0.0.0/8"])
        assert admission.gated()
        assert not admission.refuses("192.0.2.1")  # nothing counted yet
        c = tflow.tclient_conn()
        c.peername = ("192.0.2.1", 1)
        r.client_connected(c)
        before = len(policy.RECENT)
        assert admission.refuses("192.0.2.1")  # at the cap: refused and recorded
        assert policy.RECENT[-1]["rule"] == "max_connections_per_ip"
        assert len(policy.RECENT) == before + 1
        assert not admission.refuses("192.0.2.2")
        r.connections["10.0.0.1"] = 5
        assert not admission.refuses("10.0.0.1")  # exempt
        # Shadow: the gate lets it through, for client_connected to record it once.
        tctx.configure(r, ratelimit_mode="shadow")
        assert not admission.refuses("192.0.2.1")
        assert len(policy.RECENT) == before + 1
        tctx.configure(r, ratelimit_mode="enforce", ratelimit_max_connections_per_ip=0)
        assert not admission.gated()
        tctx.configure(r, ratelimit_max_connections_per_ip=1)
        r.done()
        assert not admission.gated()


@pytest.mark.parametrize(
    "options, problem",
    [
        ({"ratelimit_requests_per_second": "fast"}, "ratelimit_requests_per_second"),
        ({"ratelimit_requests_per_second": "-1"}, "ratelimit_requests_per_second"),
        ({"ratelimit_requests_per_second": "nan"}, "ratelimit_requests_per_second"),
        ({"ratelimit_burst": -1}, "ratelimit_burst"),
        ({"ratelimit_rules": "[1]"}, "ratelimit_rules"),
        ({"ratelimit_exempt": ["nope"]}, "ratelimit_exempt"),
        ({"ratelimit_max_clients": 0}, "ratelimit_max_clients"),
        ({"ratelimit_max_connections_per_ip": -1}, "ratelimit_max_connections_per_ip"),
    ],
)
def test_option_errors(options: dict, problem: str) -> None:
    r = ratelimit.RateLimit()
    with taddons.context(r) as tctx:
        with pytest.raises(exceptions.OptionsError, match=problem):
            tctx.configure(r, **options)


def test_buckets_gauge() -> None:
    r = ratelimit.RateLimit()
    with taddons.context(r) as tctx:
        tctx.configure(r, ratelimit_requests_per_second="1")
        f = flow("198.51.100.77")
        r.requestheaders(f)
        assert metrics.REGISTRY.get_sample_value("ratelimit_buckets") == 1


def test_script_reload_keeps_one_collector() -> None:
    """`-s addons/ratelimit.py` re-executes the module on every reload: still one collector, and
    it reports on the reloaded addon."""
    with taddons.context():
        sc = script.Script(ratelimit.__file__, False)
        first = sc.ns
        sc.loadscript()
        second = sc.ns
        assert first is not None and second is not None and first is not second
        assert first.COLLECTOR is second.COLLECTOR is ratelimit.COLLECTOR
        assert ratelimit.COLLECTOR.addon is second.addons[0]
    families = [m.name for m in metrics.REGISTRY.collect()]
    assert families.count("ratelimit_buckets") == 1
