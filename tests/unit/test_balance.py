"""The router's pure parts: matching, pools, breaker, health, backoff and retry budget."""

from __future__ import annotations

from collections import Counter

import pytest
from mitmproxy.http import Headers

from addons.routing import balance
from addons.routing.balance import Backend, Breaker, Health, Pool


@pytest.mark.parametrize(
    "pattern,host,expected",
    [
        ("api.example.com", "api.example.com", True),
        ("api.example.com", "www.example.com", False),
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "badexample.com", False),
        ("*", "anything", True),
    ],
)
def test_host_matcher(pattern: str, host: str, expected: bool) -> None:
    assert balance.host_matcher(pattern)(host) is expected


@pytest.mark.parametrize(
    "pattern,path,expected",
    [
        ("/api", "/api", True),
        ("/api", "/api/users", True),
        ("/api", "/apix", False),
        ("/api/", "/api/users", True),
        ("/api/", "/api", False),
        ("/static/*", "/static/css/a.css", True),
        ("/static/*", "/static", False),
        ("/static/*", "/other/static/x", False),
        ("/*.png", "/img/a.png", True),
        ("/", "/anything", True),
    ],
)
def test_path_matcher(pattern: str, path: str, expected: bool) -> None:
    assert balance.path_matcher(pattern)(path) is expected


@pytest.mark.parametrize(
    "name,value,regex,headers,expected",
    [
        ("X-Env", None, None, [("x-env", "a")], True),
        ("X-Env", None, None, [], False),
        ("X-Env", "prod", None, [("X-ENV", "prod")], True),
        ("X-Env", "prod", None, [("X-Env", "production")], False),
        ("X-Env", None, "^(stage|dev)$", [("X-Env", "dev")], True),
        ("X-Env", None, "^(stage|dev)$", [("X-Env", "prod")], False),
        ("X-Env", None, "dev", [("X-Env", "a"), ("X-Env", "dev1")], True),
    ],
)
def test_header_matcher(
    name: str, value: str | None, regex: str | None, headers: list, expected: bool
) -> None:
    h = Headers([(k.encode(), v.encode()) for k, v in headers])
    assert balance.header_matcher(name, value, regex)(h) is expected


def test_compiled_match_needs_every_condition() -> None:
    m = balance.compile_match(
        {"host": "api.example.com", "path": "/v1", "method": ["GET"], "headers": [{"name": "X-A"}]}
    )
    h = Headers(x_a="1")
    assert m.matches("GET", "api.example.com", "/v1/x", h)
    assert not m.matches("POST", "api.example.com", "/v1/x", h)
    assert not m.matches("GET", "www.example.com", "/v1/x", h)
    assert not m.matches("GET", "api.example.com", "/v2", h)
    assert not m.matches("GET", "api.example.com", "/v1", Headers())
    assert balance.compile_match({}).matches("DELETE", "x", "/", Headers())


@pytest.mark.parametrize(
    "header,host,expected",
    [
        ("Api.Example.com:8080", "x", "api.example.com"),
        (None, "backend", "backend"),
        ("[::1]:80", "x", "[::1]"),
        ("example.com", "x", "example.com"),
    ],
)
def test_request_host(header: str | None, host: str, expected: str) -> None:
    assert balance.request_host(header, host) == expected


@pytest.mark.parametrize(
    "path,prefix,expected",
    [
        ("/api/users?x=1", "/api", "/users?x=1"),
        ("/api", "/api", "/"),
        ("/api?x=1", "/api", "/?x=1"),
        ("/apix/y", "/api", "/apix/y"),
        ("/api/users", "/api/", "/users"),
        ("/other", "/api", "/other"),
    ],
)
def test_strip_prefix(path: str, prefix: str, expected: str) -> None:
    assert balance.strip_prefix(path, prefix) == expected


# --- breaker: a table of (event, time) -> state ---------------------------------------------


@pytest.mark.parametrize(
    "steps",
    [
        # threshold 3 consecutive failures opens; a success in between resets the count
        [("fail", 0, "closed"), ("fail", 1, "closed"), ("ok", 2, "closed"),
         ("fail", 3, "closed"), ("fail", 4, "closed"), ("fail", 5, "open")],
        # open refuses until the timeout (10 s), then half-open lets one trial through
        [("fail", 0, "closed"), ("fail", 0, "closed"), ("fail", 0, "open"),
         ("allow?", 5, False), ("allow?", 10, True), ("state", 10, "half_open")],
        # half-open: success_threshold (2) successes close it
        [("fail", 0, "closed"), ("fail", 0, "closed"), ("fail", 0, "open"),
         ("allow?", 10, True), ("ok", 10, "half_open"), ("allow?", 10, True), ("ok", 11, "closed")],
        # half-open: a failure opens it again, with a fresh timeout
        [("fail", 0, "closed"), ("fail", 0, "closed"), ("fail", 0, "open"),
         ("allow?", 10, True), ("fail", 10, "open"), ("allow?", 15, False), ("allow?", 20, True)],
    ],
)  # fmt: skip
def test_breaker_state_machine(steps: list) -> None:
    b = Breaker(failure_threshold=3, timeout=10.0, success_threshold=2)
    for event, now, expected in steps:
        if event == "allow?":
            allowed = b.allow(now)
            if allowed:
                b.start_trial(now)
            assert allowed is expected, (event, now)
        elif event == "state":
            assert b.state == expected
        else:
            b.record(event == "ok", now)
            assert b.state == expected, (event, now)


def test_half_open_lets_one_trial_at_a_time() -> None:
    b = Breaker(failure_threshold=1, timeout=10.0, success_threshold=1)
    assert b.record(False, 0) == ("closed", "open")
    assert b.allow(10) and b.half_opened  # for the router to log the transition
    b.start_trial(10)
    assert not b.allow(11)  # the trial is in flight
    assert b.allow(20)  # a trial that never reported back frees its slot after the timeout
    assert b.record(True, 20) == ("half_open", "closed")
    assert b.allow(20)


def test_a_trial_without_outcome_frees_its_slot_at_once() -> None:
    b = Breaker(failure_threshold=1, timeout=10.0, success_threshold=1)
    assert not b.start_trial(0)  # closed: no trial
    b.record(False, 0)
    assert b.allow(10) and b.start_trial(10)
    assert not b.allow(11)
    b.cancel_trial()  # the client's mistake ended it: tells nothing about the backend
    assert b.allow(11) and b.state == "half_open"


def test_an_opening_elsewhere_opens_without_counting_a_failure() -> None:
    b = Breaker(failure_threshold=3, timeout=10.0, success_threshold=1)
    b.record(False, 0)
    assert b.open_for(4.0, 1) == ("closed", "open")
    assert b.failures == 0 and not b.allow(4.9)
    assert b.allow(5.0) and b.state == "half_open"  # after the time the opener had left
    assert b.open_for(10.0, 5.0) == ("half_open", "open")  # the opener's trial failed
    assert b.open_for(2.0, 6.0) is None and not b.allow(14.9)  # never shortened
    assert b.open_for(20.0, 6.0) is None and not b.allow(25.9)  # lengthened
    assert b.allow(26.0)


def test_a_closing_elsewhere_closes() -> None:
    b = Breaker(failure_threshold=1, timeout=10.0, success_threshold=2)
    assert b.close(0) is None
    b.record(False, 0)
    assert b.close(1) == ("open", "closed") and b.allow(1)
    b.record(False, 2)
    assert b.allow(12) and b.close(12) == ("half_open", "closed")


@pytest.mark.parametrize(
    "reason,complete,started,expected",
    [
        # the backend could not be reached: counts, even while a streamed upload is read
        ("connection_refused", True, False, "connection_refused"),
        ("connection_refused", False, False, "connection_refused"),
        ("connect_timeout", False, False, "connect_timeout"),
        ("dns_failure", True, False, "dns_failure"),
        ("unreachable", True, False, "unreachable"),
        ("connect_failed", True, False, "connect_failed"),
        # the backend broke the exchange after the request was sent
        ("read_timeout", True, False, "read_timeout"),
        ("closed", True, False, "closed"),
        ("closed", True, True, "closed"),
        ("invalid_response", True, False, "invalid_response"),
        ("error", True, True, "invalid_response"),  # a protocol error in its body
        # the client's side: a body that ended early ("peer closed"), malformed or too large
        ("closed", False, False, None),
        ("error", False, False, None),
        ("error", True, False, None),
        ("request_too_large", False, False, None),
        ("request_too_large", True, False, None),
        ("client_disconnected", True, False, None),
        ("client_disconnected", True, True, None),
        # policy and the proxy's own limits
        ("connection_killed", True, False, None),
        ("self_connect", True, False, None),
        ("response_too_large", True, True, None),
    ],
)
def test_backend_fault(reason: str, complete: bool, started: bool, expected: str | None) -> None:
    assert balance.backend_fault(reason, complete, started) == expected


def test_passive_successes_reset_the_failures_but_only_checks_heal() -> None:
    h = Health(unhealthy_threshold=2, healthy_threshold=1)
    h.record(False)
    h.served()
    assert h.record(False) is None and h.healthy  # not two in a row
    assert h.record(False) is False
    h.served()
    assert not h.healthy
    assert h.record(True) is True


def test_health_thresholds() -> None:
    h = Health(unhealthy_threshold=2, healthy_threshold=2)
    assert h.record(False) is None and h.healthy
    assert h.record(False) is False and not h.healthy
    assert h.record(True) is None and not h.healthy
    assert h.record(True) is True and h.healthy


# --- pools -------------------------------------------------------------------------------------


def _backends(n: int) -> list[Backend]:
    return [Backend(f"b{i}", "http", "127.0.0.1", 8000 + i) for i in range(n)]


def test_round_robin_spreads_evenly_and_skips_unavailable() -> None:
    bs = _backends(3)
    pool = Pool(bs, [1, 1, 1], "round_robin")
    picks = [pool.choose(0).name for _ in range(9)]
    assert Counter(picks) == {"b0": 3, "b1": 3, "b2": 3}
    assert picks[:3] == ["b0", "b1", "b2"]
    bs[1].health.healthy = False
    picks = [pool.choose(0).name for _ in range(6)]
    assert Counter(picks) == {"b0": 3, "b2": 3}


def test_smooth_weighted_round_robin_matches_nginx() -> None:
    bs = _backends(3)
    pool = Pool(bs, [5, 1, 1], "weighted_round_robin")
    picks = "".join("abc"[bs.index(pool.choose(0))] for _ in range(7))
    assert picks == "aabacaa"  # nginx's documented sequence for weights 5, 1, 1
    assert Counter(pool.choose(0).name for _ in range(70)) == {"b0": 50, "b1": 10, "b2": 10}


def test_least_connections_prefers_idle_backends() -> None:
    bs = _backends(3)
    pool = Pool(bs, [1, 1, 1], "least_connections")
    bs[0].active, bs[1].active, bs[2].active = 5, 0, 2
    assert pool.choose(0) is bs[1]
    bs[1].active = 9
    assert pool.choose(0) is bs[2]


def test_no_backend_available() -> None:
    bs = _backends(2)
    pool = Pool(bs, [1, 1], "round_robin")
    for b in bs:
        b.breaker = Breaker(failure_threshold=1, timeout=30)
        b.breaker.record(False, 0)
    assert pool.choose(1) is None
    assert pool.choose(1, breaker=False) is not None
    assert pool.choose(31) is not None  # half-open after the timeout
    bs[0].unavailable_until = 100
    assert pool.choose(50, exclude=[bs[1]]) is None


def test_backoff_is_exponential_with_full_jitter() -> None:
    assert balance.backoff(1, 0.1, 1.0, rand=lambda: 1.0) == pytest.approx(0.1)
    assert balance.backoff(3, 0.1, 1.0, rand=lambda: 1.0) == pytest.approx(0.4)
    assert balance.backoff(10, 0.1, 1.0, rand=lambda: 1.0) == 1.0
    assert balance.backoff(3, 0.1, 1.0, rand=lambda: 0.5) == pytest.approx(0.2)


def test_retry_budget() -> None:
    budget = balance.RetryBudget(percent=10, minimum=0)
    for _ in range(100):
        budget.request(0.0)
    assert sum(budget.try_retry(0.5) for _ in range(20)) == 10
    assert not budget.try_retry(5.0)
    for _ in range(100):
        budget.request(10.0)
    assert budget.try_retry(10.5)  # the first second's requests and retries left the window
    assert sum(budget.try_retry(10.6) for _ in range(20)) == 9
    floor = balance.RetryBudget(percent=0, minimum=1)
    assert sum(floor.try_retry(0.0) for _ in range(20)) == 10  # 1 per second over 10 s


@pytest.mark.parametrize(
    "value,expected",
    [("5", 5.0), (" 2 ", 2.0), ("100000", 300.0), (None, None), ("", None),
     ("Wed, 21 Oct 2015 07:28:00 GMT", None)],
)  # fmt: skip
def test_retry_after(value: str | None, expected: float | None) -> None:
    assert balance.retry_after(value) == expected
