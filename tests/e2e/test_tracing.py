"""Tracing through a real bundle exporting to a real OTLP/HTTP receiver on loopback."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import MANAGEMENT, REVERSE, Backend, Proxy, raw_request, status_of
from tests.e2e.cli_helpers import TOKEN, execute
from tests.e2e.otlp_receiver import Receiver, Span

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
# Batches leave every 100 ms instead of 5 s; a failed export gives up after 1 s.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "1"}


def profile(endpoint: str, **sections: Any) -> dict[str, Any]:
    return {
        "server": {"shutdown_timeout": "2s", "timeouts": {"connect": "2s", "read": "5s"}},
        "logging": {"level": "info", "format": "json"},
        "metrics": {"port": 0},
        "security": {
            "egress": {"block_private": True, "allowed_networks": ["127.0.0.1/32"]},
            "filtering": {"domains": {"blocked": ["blocked.test"]}},
        },
        "cli": {"enabled": True, "token": TOKEN, "allowed_commands": ["/bin/echo"]},
        "tracing": {"enabled": True, "endpoint": endpoint},
        **sections,
    }


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture
def traced(proxy_factory, tmp_path: Path) -> Callable[..., Proxy]:
    def start(text: dict[str, Any], reverse: bool = False) -> Proxy:
        path = tmp_path / "profile.yaml"
        path.write_text(yaml.safe_dump(text))
        p = proxy_factory(options={"waypost_profile": str(path)}, env=FAST_EXPORT, wait=False)
        if reverse:
            p.port = int(p.wait_for(REVERSE, timeout=40).group(2))
        p.wait_for(MANAGEMENT, timeout=40)
        return p

    return start


def started(p: Proxy) -> Proxy:
    m = p.wait_for(r"(?i)proxy listening at \*?\[?[0-9a-f.:]+?\]?:(\d+)", timeout=40)
    p.port = int(m.group(1))
    return p


def servers(spans: list[Span]) -> list[Span]:
    return [s for s in spans if s.kind == "SERVER"]


def children(spans: list[Span], parent: Span) -> list[Span]:
    return [s for s in spans if s.parent_id == parent.span_id]


def access(p: Proxy) -> list[dict[str, Any]]:
    return [j for j in p.json_lines() if j.get("logger") == "waypost.access"]


def sent_traceparent(body: dict[str, Any]) -> str:
    """The traceparent the backend received (the echo endpoint lists the headers)."""
    (value,) = [v for k, v in body["headers"] if k.lower() == "traceparent"]
    return value


def test_forward_requests_are_traced_end_to_end(traced, receiver, backend: Backend) -> None:
    p = started(traced(profile(receiver.endpoint)))
    with httpx.Client(proxy=p.url, timeout=10, trust_env=False) as c:
        fresh = c.get(f"{backend.url}/echo?token=secret")
        continued = c.get(
            f"{backend.url}/echo",
            headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "tracestate": "k=v"},
        )
        refused = c.get("http://blocked.test/")
    assert (fresh.status_code, continued.status_code, refused.status_code) == (200, 200, 403)
    tunnel = raw_request(p.port, b"CONNECT blocked.test:443 HTTP/1.1\r\nHost: blocked.test\r\n\r\n")
    assert status_of(tunnel) == 403
    spans = receiver.wait_for(lambda s: len(servers(s)) == 4)
    by_id = {s.attributes["waypost.request_id"]: s for s in servers(spans)}
    first = by_id[fresh.headers["x-request-id"]]
    second = by_id[continued.headers["x-request-id"]]
    third = by_id[refused.headers["x-request-id"]]

    # a trace started by the proxy: its span is the backend's parent
    assert first.parent_id == "" and first.service == "waypost" and first.name == "GET"
    assert first.attributes["http.request.method"] == "GET"
    assert first.attributes["http.response.status_code"] == 200
    assert first.attributes["url.full"] == f"{backend.url}/echo"  # the query may hold secrets
    assert first.attributes["client.address"] == "127.0.0.1"
    assert first.status == "UNSET"
    version, trace_id, parent, _ = sent_traceparent(fresh.json()).split("-")
    assert (version, trace_id, parent) == ("00", first.trace_id, first.span_id)

    # its children: the cache lookup, the upstream exchange with its connect
    kids = {s.name: s for s in children(spans, first)}
    assert set(kids) == {"cache.lookup", "GET"}
    upstream = kids["GET"]
    assert upstream.kind == "CLIENT" and upstream.trace_id == first.trace_id
    assert upstream.attributes["server.port"] == backend.port
    assert [name for name, _ in upstream.events] == ["first_byte"]
    assert [s.name for s in children(spans, upstream)] == ["connect"]
    assert first.start_ns <= upstream.start_ns <= upstream.end_ns <= first.end_ns

    # the client's trace continued: same trace, the client's span as parent
    assert (second.trace_id, second.parent_id) == (CLIENT_TRACE, CLIENT_SPAN)
    assert sent_traceparent(continued.json()).split("-")[1:3] == [CLIENT_TRACE, second.span_id]
    assert ["tracestate", "k=v"] in [[k.lower(), v] for k, v in continued.json()["headers"]]

    # a policy refusal is an event on the span
    assert third.attributes["http.response.status_code"] == 403
    assert ("policy", {"waypost.policy": "filter", "waypost.decision": "block",
                       "waypost.rule": "blocked.test"}) in third.events  # fmt: skip
    assert not [s for s in children(spans, third) if s.kind == "CLIENT"]
    (connect,) = [s for s in servers(spans) if s.name == "CONNECT"]
    assert connect.attributes["http.response.status_code"] == 403
    assert [e[1]["waypost.policy"] for e in connect.events] == ["filter"]

    # the access lines name the spans' traces
    lines = {j["request_id"]: j for j in access(p)}
    for r, span in ((fresh, first), (continued, second), (refused, third)):
        assert lines[r.headers["x-request-id"]]["trace_id"] == span.trace_id


def test_a_cli_run_is_a_child_of_the_request_span(traced, receiver) -> None:
    p = started(traced(profile(receiver.endpoint)))
    reply = execute(p.port, {"command": "echo", "args": ["hi"]})
    assert reply.status == 200 and reply.text("stdout") == "hi\n"
    spans = receiver.wait_for(lambda s: any(x.name == "cli.execute" for x in s))
    (run,) = [s for s in spans if s.name == "cli.execute"]
    (server,) = servers(spans)
    assert run.trace_id == server.trace_id
    assert run.parent_id == server.span_id
    assert run.attributes["waypost.cli.command"] == "/bin/echo"


def test_reverse_requests_are_traced(traced, receiver, backend: Backend) -> None:
    routing = {
        "listeners": [{"mode": "reverse", "host": "127.0.0.1", "port": 0}],
        "default_backend": backend.url,
    }
    p = traced(profile(receiver.endpoint, routing=routing), reverse=True)
    with httpx.Client(timeout=10, trust_env=False) as c:
        r = c.get(f"http://127.0.0.1:{p.port}/echo")
    assert r.status_code == 200
    (server,) = servers(receiver.wait_for(lambda s: len(servers(s)) == 1))
    assert sent_traceparent(r.json()).split("-")[1:3] == [server.trace_id, server.span_id]
    upstream = [s for s in receiver.received() if s.parent_id == server.span_id]
    assert [s.kind for s in upstream if s.kind == "CLIENT"] == ["CLIENT"]


def test_sample_ratio_zero_exports_nothing(traced, receiver, backend: Backend) -> None:
    p = started(traced(profile(receiver.endpoint, tracing={
        "enabled": True, "endpoint": receiver.endpoint, "sample_ratio": 0})))  # fmt: skip
    with httpx.Client(proxy=p.url, timeout=10, trust_env=False) as c:
        for _ in range(5):
            r = c.get(f"{backend.url}/echo")
            assert r.status_code == 200
            assert not [k for k, _ in r.json()["headers"] if k.lower() == "traceparent"]
    assert p.stop() == 0  # shutdown flushes whatever was queued
    assert receiver.received() == [] and receiver.requests == 0
    assert all("trace_id" not in line for line in access(p))


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_receiver_that_is_down_costs_one_warning(traced, backend: Backend) -> None:
    p = started(traced(profile(f"http://127.0.0.1:{unused_port()}/v1/traces")))
    with httpx.Client(proxy=p.url, timeout=10, trust_env=False) as c:
        first = c.get(f"{backend.url}/echo")
        p.wait_for("spans could not be exported", timeout=15)
        more = [c.get(f"{backend.url}/echo").status_code for _ in range(3)]
    assert first.status_code == 200 and more == [200, 200, 200]
    p.stop()
    warnings = [
        j for j in p.json_lines() if j.get("logger", "").startswith(("waypost.tracing", "opentel"))
    ]
    assert [(j["level"], j["logger"]) for j in warnings] == [("WARNING", "waypost.tracing")]
    # nothing from the exporter itself: neither its log lines nor a traceback through it
    assert not [line for line in p.lines if "opentelemetry" in line], json.dumps(p.lines[-20:])
