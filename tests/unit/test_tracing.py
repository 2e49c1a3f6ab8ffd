"""The tracing addon through taddons + tflow, its spans caught by an in-memory exporter."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from addons import policy, schema, tracing
from addons.kernel import spans
from addons.kernel.options import once
from addons.kernel.record import record

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


class Memory(InMemorySpanExporter):
    """Stands in for the OTLP exporter: keeps what it is given."""

    last: Memory

    def __init__(self, endpoint: str) -> None:
        super().__init__()
        Memory.last = self


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[tracing.Tracing, taddons.context]]:
    monkeypatch.setattr(tracing, "OTLPSpanExporter", Memory)
    addon = tracing.Tracing()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, tracing_enabled=True)
        try:
            yield addon, tctx
        finally:
            addon.done()


def finished() -> list[ReadableSpan]:
    provider = once("tracing.exporting", tracing.Exporting).provider
    assert provider is not None
    provider.force_flush()
    return list(Memory.last.get_finished_spans())


def through(addon: tracing.Tracing, f: tflow.HTTPFlow) -> None:
    """The flow's hooks in order: its response or error arrives after requestheaders."""
    resp, err = f.response, f.error
    f.response = f.error = None
    addon.requestheaders(f)
    f.response, f.error = resp, err
    if f.error is None:
        addon.response(f)
    else:
        addon.error(f)


def test_off_costs_no_span() -> None:
    addon = tracing.Tracing()
    with taddons.context(addon):
        f = tflow.tflow()
        addon.requestheaders(f)
        assert "traceparent" not in f.request.headers
        assert "trace_id" not in record(f)
        assert not spans.TRACES.spans


def test_a_request_gets_a_server_span_and_its_traceparent_goes_to_the_backend(traced) -> None:
    addon, _ = traced
    f = tflow.tflow(resp=True)
    through(addon, f)
    sent = f.request.headers["traceparent"]
    server = next(s for s in finished() if s.kind is SpanKind.SERVER)
    ctx = server.get_span_context()
    assert sent == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
    assert ctx.trace_flags.sampled
    assert record(f)["trace_id"] == f"{ctx.trace_id:032x}"
    assert server.parent is None
    attrs = server.attributes or {}
    assert attrs["http.request.method"] == "GET"
    assert attrs["http.response.status_code"] == 200
    assert attrs["url.full"] == "http://address:22/path"
    assert server.status.status_code is StatusCode.UNSET
    assert server.resource.attributes["service.name"] == "waypost"


def test_the_client_trace_is_continued(traced) -> None:
    addon, _ = traced
    f = tflow.tflow(resp=True)
    f.request.headers["traceparent"] = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    f.request.headers["tracestate"] = "vendor=1"
    through(addon, f)
    (server,) = [s for s in finished() if s.kind is SpanKind.SERVER]
    assert f"{server.get_span_context().trace_id:032x}" == CLIENT_TRACE
    assert server.parent is not None and f"{server.parent.span_id:016x}" == CLIENT_SPAN
    assert f.request.headers["traceparent"].split("-")[1] == CLIENT_TRACE
    assert f.request.headers["traceparent"].split("-")[2] != CLIENT_SPAN
    assert f.request.headers["tracestate"] == "vendor=1"


def test_an_unsampled_client_trace_is_forwarded_untouched(traced) -> None:
    addon, _ = traced
    f = tflow.tflow(resp=True)
    sent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"
    f.request.headers["traceparent"] = sent
    through(addon, f)
    assert f.request.headers["traceparent"] == sent
    assert "trace_id" not in record(f)
    assert finished() == []


def test_sample_ratio_zero_makes_no_span_object(traced, monkeypatch) -> None:
    addon, tctx = traced
    tctx.configure(addon, tracing_sample_ratio="0")
    made: list[str] = []
    monkeypatch.setattr(addon.tracer, "start_span", lambda *a, **k: made.append("span"))
    f = tflow.tflow(resp=True)
    through(addon, f)
    assert made == [] and "traceparent" not in f.request.headers


def test_server_errors_and_failed_flows_are_errors(traced) -> None:
    addon, _ = traced
    f = tflow.tflow(resp=tflow.tresp(status_code=503))
    through(addon, f)
    g = tflow.tflow(err=True)
    through(addon, g)
    statuses = [s.status.status_code for s in finished() if s.kind is SpanKind.SERVER]
    assert statuses == [StatusCode.ERROR, StatusCode.ERROR]


def test_policy_decisions_are_events(traced) -> None:
    addon, _ = traced
    f = tflow.tflow(resp=True)
    addon.requestheaders(f)
    policy.decide("filter", "ads", "10.0.0.1", "shadow", f)
    policy.decide("acl", "denied_ips", "10.0.0.1", "enforce", f, decision="deny")
    addon.response(f)
    (server,) = [s for s in finished() if s.kind is SpanKind.SERVER]
    assert [(e.name, dict(e.attributes or {})) for e in server.events] == [
        ("policy", {"waypost.policy": "filter", "waypost.decision": "would_block",
                    "waypost.rule": "ads"}),
        ("policy", {"waypost.policy": "acl", "waypost.decision": "deny",
                    "waypost.rule": "denied_ips"}),
    ]  # fmt: skip
    assert (server.attributes or {})["waypost.policy"] == "acl"


def test_cache_lookup_is_a_child_span(traced) -> None:
    addon, _ = traced
    f = tflow.tflow(resp=True)
    addon.requestheaders(f)
    with spans.child(f, "cache.lookup"):
        pass
    addon.response(f)
    by_name = {s.name: s for s in finished()}
    server = next(s for s in by_name.values() if s.kind is SpanKind.SERVER)
    lookup = by_name["cache.lookup"]
    assert lookup.parent is not None
    assert lookup.parent.span_id == server.get_span_context().span_id


def test_the_upstream_exchange_is_a_client_span_with_connect_and_first_byte(traced) -> None:
    addon, _ = traced
    f = tflow.tflow(resp=True)
    start = f.request.timestamp_start
    f.server_conn.timestamp_start = start + 0.001
    f.server_conn.timestamp_tcp_setup = start + 0.002
    f.server_conn.timestamp_tls_setup = None
    record(f)["backend"] = "api"
    through(addon, f)
    done = finished()
    server = next(s for s in done if s.kind is SpanKind.SERVER)
    client = next(s for s in done if s.kind is SpanKind.CLIENT)
    connect = next(s for s in done if s.name == "connect")
    assert client.parent is not None
    assert client.parent.span_id == server.get_span_context().span_id
    assert connect.parent is not None
    assert connect.parent.span_id == client.get_span_context().span_id
    assert (client.attributes or {})["waypost.backend"] == "api"
    assert [e.name for e in client.events] == ["first_byte"]
    assert not any(s.name == "tls" for s in done)


def test_a_cache_hit_has_no_upstream_span(traced) -> None:
    addon, _ = traced
    f = tflow.tflow(resp=True)
    record(f)["cache_hit"] = True
    through(addon, f)
    assert [s.kind for s in finished()] == [SpanKind.SERVER]


def test_probes_are_not_traced(traced) -> None:
    addon, _ = traced
    f = tflow.tflow(resp=True)
    addon.requestheaders(f)
    record(f)["local"] = "health"
    addon.response(f)
    assert finished() == []


def test_connect_gets_a_span(traced) -> None:
    addon, _ = traced
    f = tflow.tflow(resp=True)
    f.request.method = "CONNECT"
    addon.http_connect(f)
    addon.http_connected(f)
    (server,) = finished()
    assert server.name == "CONNECT" and server.kind is SpanKind.SERVER


@pytest.mark.parametrize("value", ["-0.1", "1.5", "half"])
def test_sample_ratio_is_checked(value: str) -> None:
    addon = tracing.Tracing()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match="tracing_sample_ratio"):
            tctx.configure(addon, tracing_sample_ratio=value)


def profile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "profile.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_grpc_is_refused_by_the_option_and_the_profile(tmp_path: Path) -> None:
    addon = tracing.Tracing()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match="tracing_protocol"):
            tctx.configure(addon, tracing_protocol="grpc")
    with pytest.raises(schema.ProfileError, match=r"tracing\.protocol.*grpc is not supported"):
        schema.load(profile(tmp_path, "tracing:\n  protocol: grpc\n"), {})


def test_the_profile_maps_to_the_options(tmp_path: Path) -> None:
    path = profile(tmp_path, "tracing:\n  enabled: true\n  sample_ratio: 0.25\n")
    options = schema.to_options(schema.load(path, {}).profile)
    assert options["tracing_enabled"] is True
    assert options["tracing_sample_ratio"] == "0.25"


def test_the_provider_survives_a_reload_with_the_same_settings(traced) -> None:
    addon, tctx = traced
    exporting = once("tracing.exporting", tracing.Exporting)
    provider = exporting.provider
    tctx.configure(addon, tracing_service_name="waypost")
    assert exporting.provider is provider
    tctx.configure(addon, tracing_service_name="edge")
    assert exporting.provider is not provider


class Failing(InMemorySpanExporter):
    def __init__(self) -> None:
        super().__init__()
        self.up = False

    def export(self, batch: Sequence[ReadableSpan]) -> SpanExportResult:
        if not self.up:
            raise ConnectionError("refused")
        return SpanExportResult.SUCCESS


def test_an_unreachable_receiver_is_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    inner = Failing()
    exporter = tracing.Reporting(inner, "http://127.0.0.1:9/v1/traces")
    with caplog.at_level(logging.INFO, logger="waypost.tracing"):
        assert exporter.export([]) is SpanExportResult.FAILURE
        assert exporter.export([]) is SpanExportResult.FAILURE
        inner.up = True
        assert exporter.export([]) is SpanExportResult.SUCCESS
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]


def test_a_remote_span_continues_the_headers_trace(traced) -> None:
    headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
    with spans.remote("cli.execute", headers, {"waypost.cli.command": "/bin/echo"}):
        pass
    with pytest.raises(RuntimeError), spans.remote("cli.execute", {}, {}):
        raise RuntimeError("boom")
    ok, failed = finished()
    assert f"{ok.get_span_context().trace_id:032x}" == CLIENT_TRACE
    assert ok.parent is not None and f"{ok.parent.span_id:016x}" == CLIENT_SPAN
    assert failed.parent is None and failed.status.status_code is StatusCode.ERROR


def test_without_tracing_the_extension_points_do_nothing() -> None:
    f = tflow.tflow()
    with spans.child(f, "cache.lookup"), spans.remote("cli.execute", {}, {}):
        spans.event(f, "policy", {"waypost.policy": "acl"})
    assert not spans.TRACES.spans and spans.TRACES.tracer is None


def test_at_ratio_zero_a_sampled_client_trace_is_still_recorded(traced) -> None:
    addon, tctx = traced
    tctx.configure(addon, tracing_sample_ratio="0")
    f = tflow.tflow(resp=True)
    f.request.headers["TraceParent"] = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    through(addon, f)
    (server,) = [s for s in finished() if s.kind is SpanKind.SERVER]
    assert f"{server.get_span_context().trace_id:032x}" == CLIENT_TRACE
