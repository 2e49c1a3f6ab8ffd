"""The router addon through mitmproxy's taddons/tflow, and its profile sections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mitmproxy import exceptions, flow
from mitmproxy.proxy import mode_specs
from mitmproxy.test import taddons, tflow, tutils

from addons import schema
from addons.kernel import patching
from addons.kernel.record import record
from addons.routing import options, retry
from addons.routing.balance import Backend
from addons.routing.router import Router
from addons.routing.shared import SharedBreakers

A = "http://10.0.0.1:8080"
B = "http://10.0.0.2:8080"


def rules(*items: dict) -> str:
    return json.dumps(list(items))


def _flow(host: str = "api.example.com", path: str = "/v1/users", method: str = "GET", **kw):
    f = tflow.tflow(
        req=tutils.treq(
            method=method.encode(), host=host, port=80, path=path.encode(), headers=(), **kw
        )
    )
    f.request.headers["Host"] = host
    return f


def _reverse(f):
    f.client_conn.proxy_mode = mode_specs.ProxyMode.parse("reverse:http://10.0.0.1:8080")
    return f


def test_forward_mode_rule_matches_and_rewrites_in_request() -> None:
    r = Router()
    with taddons.context(r) as tctx:
        tctx.configure(
            r,
            routing_rules=rules(
                {"name": "api", "match": {"host": "api.example.com", "path": "/v1"},
                 "forward": {"target": A, "strip_prefix": "/v1", "timeout": 5}, "cache": True}
            ),
        )  # fmt: skip
        f = _flow()
        r.requestheaders(f)
        meta = record(f)
        assert meta["route"] == "api" and meta["route_cache"] is True
        assert f.request.host == "api.example.com"  # not yet: the cache looks up first
        r.request(f)
        assert (f.request.host, f.request.port, f.request.path) == ("10.0.0.1", 8080, "/users")
        assert f.request.headers["Host"] == "10.0.0.1:8080"
        assert meta["backend"] == "10.0.0.1:8080" and meta["read_timeout"] == 5
        other = _flow(host="www.example.com")
        r.requestheaders(other)
        r.request(other)
        assert "route" not in record(other) and other.request.host == "www.example.com"


def test_non_get_requests_are_rewritten_in_requestheaders() -> None:
    r = Router()
    with taddons.context(r) as tctx:
        tctx.configure(r, routing_rules=rules({"forward": {"target": A, "preserve_host": True}}))
        f = _flow(method="POST")
        r.requestheaders(f)
        assert f.request.host == "10.0.0.1"
        assert f.request.headers["Host"] == "api.example.com"  # preserve_host
        assert record(f)["route"] == "rule1"


def test_reverse_mode_default_backend_and_404() -> None:
    r = Router()
    with taddons.context(r) as tctx:
        tctx.configure(r, routing_default_backend=B)
        f = _reverse(_flow())
        r.requestheaders(f)
        r.request(f)
        assert f.request.host == "10.0.0.2" and record(f)["route"] == "default"
        tctx.configure(
            r,
            routing_default_backend="",
            routing_rules=rules({"name": "x", "match": {"path": "/x"}, "forward": {"target": A}}),
        )
        f = _reverse(_flow())
        r.requestheaders(f)
        assert f.response.status_code == 404
        assert record(f)["error_code"] == "NOT_FOUND"


def test_all_circuits_open_answers_503_at_once() -> None:
    r = Router()
    with taddons.context(r) as tctx:
        tctx.configure(
            r,
            routing_rules=rules({"forward": {"backends": [{"url": A}, {"url": B}]}}),
            router_circuit_breaker_failure_threshold=1,
        )
        for b in r.backends.values():
            b.breaker.record(False, 0.0)
            b.breaker.opened_at = 1e18  # far in the future: stays open
        f = _flow()
        r.requestheaders(f)
        r.request(f)
        assert f.response.status_code == 503
        body = json.loads(f.response.content)
        assert body["error"]["code"] == "CIRCUIT_OPEN"


def test_responses_feed_the_breaker_and_retry_after() -> None:
    r = Router()
    with taddons.context(r) as tctx:
        tctx.configure(
            r,
            routing_rules=rules({"forward": {"target": A}}),
            router_circuit_breaker_failure_threshold=2,
        )
        backend = r.backends["10.0.0.1:8080"]
        for status in (502, 504):
            f = _flow()
            r.requestheaders(f)
            r.request(f)
            assert backend.active == 1
            f.response = tutils.tresp(status_code=status)
            r.response(f)
            assert backend.active == 0
        assert backend.breaker.state == "open"
        assert [x.reason for x in backend.failures] == ["status 502", "status 504"]
        tctx.configure(r, router_circuit_breaker_enabled=False)
        f = _flow()
        r.requestheaders(f)
        r.request(f)
        f.response = tutils.tresp(status_code=503, headers=((b"Retry-After", b"20"),))
        r.response(f)
        assert not backend.available(0.0 + backend.unavailable_until - 1, breaker_enabled=False)


def test_a_stale_answer_after_a_backend_failure_counts_as_the_failure() -> None:
    r = Router()
    with taddons.context(r) as tctx:
        tctx.configure(r, routing_rules=rules({"forward": {"target": A}}))
        backend = r.backends["10.0.0.1:8080"]
        f = _flow()
        r.requestheaders(f)
        r.request(f)
        record(f)["backend_error"] = "closed"  # the cache answered stale instead
        f.response = tutils.tresp(status_code=200)
        r.response(f)
        assert backend.active == 0 and [x.reason for x in backend.failures] == ["closed"]


@pytest.mark.parametrize(
    "message,complete,response,counted",
    [
        # the client's mistakes: never the backend's
        ("HTTP/1 protocol error: Invalid chunk size: +5", False, False, None),
        ("The request body exceeds the limit of 1024 bytes.", False, False, None),
        (
            "HTTP/1 protocol error: peer closed connection without sending complete message "
            "body: received 5 bytes, expected 100",
            False,
            False,
            None,
        ),
        ("Client disconnected.", True, False, None),
        ("Client disconnected.", True, True, None),
        ("Connection killed.", True, False, None),
        # the backend's failures
        ("[Errno 111] Connect call failed ('10.0.0.1', 8080)", True, False, "connection_refused"),
        ("Server closed connection.", True, False, "closed"),
        ("HTTP/1 protocol error: Invalid chunk size: zz", True, True, "invalid_response"),
    ],
)
def test_only_the_backends_failures_count(
    message: str, complete: bool, response: bool, counted: str | None
) -> None:
    r = Router()
    with taddons.context(r) as tctx:
        tctx.configure(
            r,
            routing_rules=rules({"forward": {"target": A}}),
            router_circuit_breaker_failure_threshold=1,
        )
        backend = r.backends["10.0.0.1:8080"]
        f = _flow(method="POST")
        r.requestheaders(f)
        assert backend.active == 1
        f.request.timestamp_end = 2.0 if complete else None
        f.response = tutils.tresp(status_code=200) if response else None
        f.error = flow.Error(message)
        r.error(f)
        assert backend.active == 0
        assert [x.reason for x in backend.failures] == ([counted] if counted else [])
        assert backend.breaker.state == ("open" if counted else "closed")


def test_backend_answers_are_successes_and_proxy_answers_are_not_outcomes() -> None:
    r = Router()
    with taddons.context(r) as tctx:
        tctx.configure(
            r,
            routing_rules=rules({"forward": {"target": A}}),
            router_circuit_breaker_failure_threshold=1,
        )
        backend = r.backends["10.0.0.1:8080"]
        backend.health.record(False)
        f = _flow()
        r.requestheaders(f)
        r.request(f)
        f.response = tutils.tresp(status_code=404)  # an answer: the backend is up
        r.response(f)
        assert backend.health.failures == 0 and backend.breaker.state == "closed"
        backend.breaker.record(False, 0.0)  # open; half-open at once (timeout 0 passed)
        backend.breaker.timeout = 0.0
        f = _flow()
        r.requestheaders(f)
        r.request(f)
        assert backend.breaker.trial_since is not None
        # a proxy-made answer after routing (the cache, a policy) tells nothing about it
        record(f)["error_code"] = "ACCESS_DENIED"
        f.response = tutils.tresp(status_code=503)
        r.response(f)
        assert backend.active == 0 and backend.breaker.state == "half_open"
        assert backend.breaker.trial_since is None and not backend.failures


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("routing_rules", "not json", "routing_rules: "),
        ("routing_rules", rules({"forward": {}}), "forward needs either target"),
        ("routing_rules", rules({"forward": {"target": "ftp://x"}}), "a backend is a URL"),
        (
            "routing_rules",
            rules({"match": {"headers": [{"name": "X", "regex": "("}]}, "forward": {"target": A}}),
            "does not compile",
        ),
        ("routing_default_backend", "http://x/path", "routing_default_backend: a backend URL has no path"),
        ("router_retries_backoff", "soon", "router_retries_backoff"),
        ("router_circuit_breaker_failure_threshold", 0, "at least 1"),
    ],
)  # fmt: skip
def test_option_errors(option: str, value: object, message: str) -> None:
    r = Router()
    with taddons.context(r) as tctx:
        with pytest.raises(exceptions.OptionsError, match=message.replace("(", r"\(")):
            tctx.configure(r, **{option: value})


def test_backend_state_survives_a_reload_and_egress_exemption() -> None:
    r = Router()
    with taddons.context(r) as tctx:
        tctx.configure(r, routing_rules=rules({"forward": {"target": A}}))
        backend = r.backends["10.0.0.1:8080"]
        backend.breaker.record(False, 0.0)
        tctx.configure(r, routing_rules=rules({"name": "renamed", "forward": {"target": A}}))
        assert r.backends["10.0.0.1:8080"] is backend
        f = _flow()
        assert not r.egress_exempt(f.client_conn, ("10.0.0.1", 8080))  # forward, not routed
        r.requestheaders(f)
        r.request(f)
        assert r.egress_exempt(f.client_conn, ("10.0.0.1", 8080))
        assert not r.egress_exempt(f.client_conn, ("10.0.0.9", 8080))
        rev = _reverse(_flow())
        assert r.egress_exempt(rev.client_conn, ("10.0.0.1", 8080))
        r.client_disconnected(f.client_conn)
        assert not r.egress_exempt(f.client_conn, ("10.0.0.1", 8080))
        name, check, ok = r.readiness_check()
        assert name == "backends" and ok is True
        assert check == [
            {"name": "10.0.0.1:8080", "url": A, "status": "healthy", "circuit": "closed"}
        ]


def test_retry_patch_is_installed_on_checked_versions() -> None:
    r = Router()
    with taddons.context(r):
        assert r._patched is patching.checked(patching.version.VERSION)
        if r._patched:
            stream = retry.http_layer.HttpStream
            assert stream.make_server_connection is retry._make_server_connection
    r.done()
    assert retry.http_layer.HttpStream.make_server_connection is not retry._make_server_connection


# --- profile sections ------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return p


def test_profile_rule_errors_carry_their_line(tmp_path: Path) -> None:
    text = """\
routing:
  rules:
    - name: ok
      forward: {target: "http://10.0.0.1:80"}
    - name: bad
      match:
        headers:
          - {name: X-Env, regex: "("}
      forward: {target: "http://10.0.0.1:80"}
    - name: nothing
      forward: {}
circuit_breaker: {failure_threshold: 0}
"""
    with pytest.raises(schema.ProfileError) as e:
        schema.load(write(tmp_path, text), {})
    problems = "\n".join(e.value.problems)
    assert ":8: routing.rules.1.match.headers.0: regex '(' does not compile" in problems
    assert ":11: routing.rules.2.forward: forward needs either target" in problems
    assert ":12: circuit_breaker.failure_threshold" in problems


def test_profile_listeners_become_modes(tmp_path: Path) -> None:
    text = """\
server: {port: 8080}
routing:
  listeners: [{mode: forward}, {mode: reverse, port: 8081}, {mode: reverse, host: 0.0.0.0, port: 8082}]
  default_backend: http://app.internal
"""
    opts = schema.to_options(schema.load(write(tmp_path, text), {}).profile)
    assert opts["mode"] == [
        "regular",
        "reverse:http://app.internal:80@8081",
        "reverse:http://app.internal:80@0.0.0.0:8082",
    ]
    assert opts["connection_strategy"] == "lazy" and opts["keep_host_header"] is True
    assert opts["routing_default_backend"] == "http://app.internal:80"
    assert "mode" not in schema.to_options(schema.Profile())


def test_profile_reverse_listener_needs_a_backend(tmp_path: Path) -> None:
    with pytest.raises(schema.ProfileError, match="needs routing.rules or routing.default_backend"):
        schema.load(write(tmp_path, "routing: {listeners: [{port: 8081}]}\n"), {})


def test_profile_rules_round_trip_through_the_flat_option(tmp_path: Path) -> None:
    text = """\
routing:
  rules:
    - name: api
      match: {host: "*.Example.com", path: /api, method: get, headers: [{name: X-A, value: "1"}]}
      forward:
        backends: [{url: "http://10.0.0.1:8080", weight: 3}, {url: "http://10.0.0.2"}]
        strategy: weighted_round_robin
        strip_prefix: /api
        timeout: 2s
      cache: false
"""
    opts = schema.to_options(schema.load(write(tmp_path, text), {}).profile)
    parsed = options.parse_rules(opts["routing_rules"])
    assert parsed[0].match.host == "*.example.com" and parsed[0].match.method == ["GET"]
    assert parsed[0].forward.timeout == 2.0 and parsed[0].cache is False
    r = Router()
    with taddons.context(r) as tctx:
        tctx.configure(r, routing_rules=opts["routing_rules"])
        assert [b.name for b in r.routes[0].pool.backends] == ["10.0.0.1:8080", "10.0.0.2:80"]


# Route hosts: the profile checks them with the router's own grammar (kernel.hosts), so a host
# the profile accepts is one the router compiles, and a bad one is reported at its line.
@pytest.mark.parametrize(
    "host, key",
    [
        ("*", "anything.example"),
        ("*.Bücher.example", "shop.xn--bcher-kva.example"),
        ("API.example.com.", "api.example.com"),
        ("10.0.0.1", "10.0.0.1"),
        ("[2001:db8::1]", "2001:db8::1"),
    ],
)
def test_profile_route_hosts_are_the_routers(tmp_path: Path, host: str, key: str) -> None:
    text = f"""\
routing:
  rules:
    - match: {{host: "{host}"}}
      forward: {{target: "http://10.0.0.9"}}
"""
    opts = schema.to_options(schema.load(write(tmp_path, text), {}).profile)
    r = Router()
    with taddons.context(r) as tctx:
        tctx.configure(r, routing_rules=opts["routing_rules"])
        assert r.routes[0].matcher.matches("GET", key, "/", {})


@pytest.mark.parametrize(
    "host", ["api.example.com:8080", "a*.example.com", "*.*.example.com", "exa mple.com", "a..b"]
)
def test_profile_route_host_errors_carry_their_line(tmp_path: Path, host: str) -> None:
    text = f"""\
routing:
  rules:
    - match: {{host: "{host}"}}
      forward: {{target: "http://10.0.0.9"}}
"""
    with pytest.raises(schema.ProfileError) as e:
        schema.load(write(tmp_path, text), {})
    (problem,) = e.value.problems
    assert ":3: routing.rules.0.match.host: " in problem
    assert "is not a host pattern" in problem


def test_breaker_messages_from_other_processes() -> None:
    a = Backend("a", "http", "10.0.0.1", 8080)
    a.breaker.timeout = 30.0
    shared = SharedBreakers(lambda: {"a": a})
    url = "http://10.0.0.1:8080"
    shared.received({"backend": "a", "url": "http://10.0.0.9:8080", "state": "open"})
    assert a.breaker.state == "closed"  # same name, another backend: not ours
    shared.received({"backend": "b", "url": url, "state": "open"})
    shared.received({"backend": "a", "url": url, "state": "ajar"})
    assert a.breaker.state == "closed"
    shared.received({"backend": "a", "url": url, "state": "open", "seconds": 5.0})
    assert a.breaker.state == "open" and a.breaker.failures == 0
    shared.received({"backend": "a", "url": url, "state": "closed"})
    assert a.breaker.state == "closed"


def test_breakers_are_not_shared_with_the_memory_backend() -> None:
    a = Backend("a", "http", "10.0.0.1", 8080)
    shared = SharedBreakers(lambda: {"a": a})
    # No Redis, no task: this would raise without a running loop if it tried to spawn one.
    shared.outcome(a, False, True, None)
    shared.outcome(a, False, False, ("closed", "open"))
    shared.start()
