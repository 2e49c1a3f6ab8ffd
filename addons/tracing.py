"""OpenTelemetry tracing: one SERVER span per proxied request, exported over OTLP/HTTP.

- The W3C trace context (`traceparent`, `tracestate`) a client sends is continued (its sampled
  flag honoured: a ParentBased sampler); without one, a trace is started with probability
  `tracing_sample_ratio`. The backend receives the proxy span's `traceparent`; an unsampled
  request is forwarded untouched, and at ratio 0 one without a traceparent costs no span object.
- The server span carries the OTel HTTP attributes (method, URL without its query, status,
  client address, user agent) and Waypost's (request id, route, backend, cache result, the
  deciding policy and rule); status ERROR on a 5xx or a failed flow. Its children: the
  upstream exchange (CLIENT: connect and TLS as child spans when a connection was opened for
  it, the first response byte as an event), and through `kernel.spans` the cache lookup and
  the CLI's process run; `policy.decide` adds every decision as an event. The span's trace id
  goes into the flow's record (`trace_id`), so the access line shows it.
- Export: a BatchSpanProcessor (its own thread, never the event loop) and the OTLP/HTTP
  exporter; one WARNING when the receiver stops answering, one INFO when it is back. One
  provider per process (`kernel.options.once`), kept across profile reloads and rebuilt only
  when a tracing option changes; `done` (shutdown, or the script's removal when mitmproxy
  reloads it) flushes and ends it, without waiting on a receiver that is down.

Hooks: configure, done, requestheaders (start; the traceparent to the backend), response /
error (end), http_connect (start), http_connected / http_connect_error (end).
Options: tracing_enabled, tracing_endpoint, tracing_protocol, tracing_sample_ratio,
tracing_service_name.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from mitmproxy import ctx, exceptions, http
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode

from addons import errors
from addons.kernel import net
from addons.kernel.instance import identity
from addons.kernel.options import Option, declare, once
from addons.kernel.record import Record, record
from addons.kernel.spans import PROPAGATOR, TRACES
from addons.kernel.version import waypost_version
from addons.metrics import sent_status

log = logging.getLogger("waypost.tracing")

PROTOCOLS = ("http/protobuf",)
OPTIONS = [
    Option("tracing_enabled", bool, False, "Trace requests with OpenTelemetry (OTLP export)."),
    Option("tracing_endpoint", str, "http://127.0.0.1:4318/v1/traces",
           "OTLP/HTTP traces endpoint the spans are sent to."),
    Option("tracing_protocol", str, "http/protobuf", "OTLP protocol: http/protobuf.", PROTOCOLS),
    Option("tracing_sample_ratio", str, "1",
           "Share of new traces recorded, 0 to 1 (a client's sampled flag is honoured)."),
    Option("tracing_service_name", str, "waypost", "service.name of the exported spans."),
]  # fmt: skip
_WATCHED = frozenset(o.name for o in OPTIONS)
# Written by the exporter on every failed batch, from its thread: Exporting says it once.
_EXPORTER_LOGGER = "opentelemetry.exporter.otlp.proto.http"
# Proxy-port endpoints answered by the proxy itself: probes and scrapes are not traced.
_UNTRACED = frozenset({"health", "metrics"})


class Settings(NamedTuple):
    endpoint: str
    sample_ratio: float
    service_name: str


def sample_ratio(value: str) -> float:
    try:
        ratio = float(value)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise exceptions.OptionsError(
            f"tracing_sample_ratio: must be a number from 0 to 1, got {value!r}"
        )
    return ratio


class Exporting:
    """The process's tracer provider, rebuilt when its settings change. One per process
    (`once`): a script reload must not start a second export thread."""

    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.provider: TracerProvider | None = None
        self.reporting: Reporting | None = None

    def use(self, settings: Settings) -> trace.Tracer:
        if settings != self.settings or self.provider is None:
            self.stop(wait=False)
            exporter = OTLPSpanExporter(settings.endpoint)
            self.reporting = Reporting(exporter, settings.endpoint)
            self.provider = _provider(settings, self.reporting)
            self.settings = settings
        return self.provider.get_tracer("waypost", waypost_version())

    def stop(self, wait: bool) -> None:
        """Flush and end the provider; off the event loop unless `wait` (shutting down)."""
        provider, reporting = self.provider, self.reporting
        self.provider = self.reporting = self.settings = None
        if provider is None or reporting is None:
            return
        if wait:
            # A receiver that is down would hold the exit for an export timeout per batch.
            reporting.dropping = reporting.failing
            provider.shutdown()
        else:
            threading.Thread(target=provider.shutdown, name="tracing-shutdown", daemon=True).start()


def _provider(s: Settings, exporter: SpanExporter) -> TracerProvider:
    resource: dict[str, Any] = {
        "service.name": s.service_name,
        "service.version": waypost_version(),
        "process.pid": os.getpid(),
    }
    worker = identity()
    if worker.supervised:
        resource["waypost.worker"] = worker.index
    provider = TracerProvider(
        resource=Resource.create(resource),
        sampler=ParentBased(TraceIdRatioBased(s.sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class Reporting(SpanExporter):
    """The OTLP exporter, saying once that the receiver is unreachable instead of once per
    batch (the exporter's own loggers are quietened to CRITICAL while tracing is on)."""

    def __init__(self, inner: SpanExporter, endpoint: str) -> None:
        self.inner = inner
        self.endpoint = endpoint
        self.failing = False
        self.dropping = False  # shutting down with the receiver down: do not even try

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self.dropping:
            return SpanExportResult.FAILURE
        try:
            result = self.inner.export(spans)
        except Exception:  # the batch thread must go on: spans are dropped, not requests
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            if self.failing:
                self.failing = False
                log.info("tracing: exporting to %s again", self.endpoint)
        elif not self.failing:
            self.failing = True
            log.warning("tracing: spans could not be exported to %s; they are dropped until it "
                        "answers (requests are not affected)", self.endpoint)  # fmt: skip
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def _ns(timestamp: float) -> int:
    return int(timestamp * 1e9)


def _sent_traceparent(fields: tuple[tuple[bytes, bytes], ...]) -> bool:
    """`"traceparent" in headers` without its cost: a miss raises and catches a KeyError
    inside mitmproxy's multidict (measured 7x slower than this loop)."""
    for name, _ in fields:
        if name.lower() == b"traceparent":
            return True
    return False


def _traceparent(context: trace.SpanContext) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


class Tracing:
    def __init__(self) -> None:
        self.on = False
        self.ratio = 1.0
        self.tracer: trace.Tracer | None = None

    def load(self, loader: Any) -> None:
        declare(loader, OPTIONS)
        net.load(loader)  # client.address honours forwarding_trusted_proxies

    def configure(self, updated: set[str]) -> None:
        net.configure(updated)
        if not updated & _WATCHED:
            return
        opts = ctx.options
        ratio = sample_ratio(opts.tracing_sample_ratio)
        exporting = once("tracing.exporting", Exporting)
        if not opts.tracing_enabled:
            self.on, self.tracer = False, None
            TRACES.tracer = None
            exporting.stop(wait=False)
            return
        settings = Settings(opts.tracing_endpoint, ratio, opts.tracing_service_name)
        self.tracer = TRACES.tracer = exporting.use(settings)
        self.ratio = ratio
        self.on = True
        logging.getLogger(_EXPORTER_LOGGER).setLevel(logging.CRITICAL)

    def done(self) -> None:
        self.on = False
        TRACES.tracer = None
        once("tracing.exporting", Exporting).stop(wait=True)

    # --- the server span ---

    def _start(self, flow: http.HTTPFlow) -> trace.Span | None:
        headers = flow.request.headers
        continued = _sent_traceparent(headers.fields)
        if not continued and self.ratio == 0.0:
            return None  # a new trace would not be sampled: not even a span object
        assert self.tracer is not None
        req = flow.request
        attributes: dict[str, Any] = {
            "http.request.method": req.method,
            "url.scheme": req.scheme,
            "server.address": req.pretty_host,
            "server.port": req.port,
            "client.address": net.client_ip(flow) or "",
            "waypost.request_id": errors.request_id(flow),
        }
        if req.method != "CONNECT":
            # Without the query: its values may be secrets (the access log redacts them).
            attributes["url.full"] = req.pretty_url.partition("?")[0]
            attributes["url.path"] = req.path.partition("?")[0]
        agent = headers.get("user-agent")
        if agent is not None:
            attributes["user_agent.original"] = agent[:256]
        span = self.tracer.start_span(
            req.method,
            context=PROPAGATOR.extract(headers) if continued else None,
            kind=SpanKind.SERVER,
            attributes=attributes,
            start_time=_ns(req.timestamp_start),
        )
        if not span.is_recording():
            return None
        TRACES.spans[flow] = span
        record(flow)["trace_id"] = f"{span.get_span_context().trace_id:032x}"
        return span

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not self.on or flow.error or not flow.live:
            return
        span = self._start(flow)
        if span is None or flow.response:
            return  # an answer made already (hygiene): nothing goes to a backend
        # Here, not in `request`: a streamed request's head leaves before that hook. After
        # hygiene (the bundle's order), so the header counts against no client limit.
        context = span.get_span_context()
        headers = flow.request.headers
        headers["traceparent"] = _traceparent(context)
        if context.trace_state:
            headers["tracestate"] = context.trace_state.to_header()

    def response(self, flow: http.HTTPFlow) -> None:
        if self.on and TRACES.spans:
            self._end(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        if self.on and TRACES.spans:
            self._end(flow)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if self.on and not flow.error:
            self._start(flow)

    def http_connected(self, flow: http.HTTPFlow) -> None:
        if self.on and TRACES.spans:
            self._end(flow)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        if self.on and TRACES.spans:
            self._end(flow)

    def _end(self, flow: http.HTTPFlow) -> None:
        span = TRACES.spans.pop(flow, None)
        if span is None:
            return
        meta = record(flow)
        if meta.get("local") in _UNTRACED:
            return  # never ended, never exported
        now = time.time()
        status = sent_status(flow)
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        found = {
            "waypost.route": meta.get("route"),
            "waypost.backend": meta.get("backend"),
            "waypost.cache": meta.get("cache"),
            "waypost.decision": meta.get("decision"),
            "waypost.policy": meta.get("policy"),
            "waypost.rule": meta.get("rule"),
            "waypost.blocked_by": meta.get("blocked_by"),
        }
        span.set_attributes({k: v for k, v in found.items() if v is not None})
        route = meta.get("route")
        if route is not None:
            span.update_name(f"{flow.request.method} {route}")
        upstream = self._upstream(flow, span, meta, now)
        failure = meta.get("error_code") or meta.get("backend_error")
        if flow.error is not None or (status is not None and status >= 500):
            span.set_attribute("error.type", failure or str(status or "error"))
            span.set_status(StatusCode.ERROR, flow.error.msg if flow.error else failure)
        resp = flow.response
        end = resp.timestamp_end if resp is not None and resp.timestamp_end else now
        span.end(_ns(max(end, upstream)))

    def _upstream(self, flow: http.HTTPFlow, parent: trace.Span, meta: Record, now: float) -> float:
        """The CLIENT span of the exchange with the backend, from the flow's timestamps; its
        end (0 when there was no exchange)."""
        server = flow.server_conn
        resp = flow.response
        went = (
            not meta.get("cache_hit")
            and meta.get("local") not in ("admin", *_UNTRACED)
            and ("backend_error" in meta or (resp is not None and "error_code" not in meta))
        )
        if not went or server.address is None or flow.request.method == "CONNECT":
            return 0.0
        assert self.tracer is not None
        req = flow.request
        # A connection opened for this request starts the exchange; on a reused one, the
        # request's last byte does (the request hooks that follow take microseconds).
        opened = (
            server.timestamp_start is not None and server.timestamp_start >= req.timestamp_start
        )
        start = server.timestamp_start if opened else (req.timestamp_end or req.timestamp_start)
        end = (resp.timestamp_end if resp is not None else None) or now
        attributes: dict[str, Any] = {
            "http.request.method": req.method,
            "server.address": server.address[0],
            "server.port": server.address[1],
        }
        if "backend" in meta:
            attributes["waypost.backend"] = meta["backend"]
        if resp is not None and "error_code" not in meta:
            attributes["http.response.status_code"] = resp.status_code
        context = trace.set_span_in_context(parent)
        span = self.tracer.start_span(req.method, context=context, kind=SpanKind.CLIENT,
                                      attributes=attributes, start_time=_ns(start))  # fmt: skip
        if opened:
            inner = trace.set_span_in_context(span)
            self._phase("connect", inner, server.timestamp_start, server.timestamp_tcp_setup)
            self._phase("tls", inner, server.timestamp_tcp_setup, server.timestamp_tls_setup)
        if resp is not None and resp.timestamp_start and "error_code" not in meta:
            span.add_event("first_byte", timestamp=_ns(resp.timestamp_start))
        if "backend_error" in meta:
            span.set_attribute("error.type", meta["backend_error"])
            span.set_status(StatusCode.ERROR, meta["backend_error"])
        elif resp is not None and resp.status_code >= 500:
            span.set_attribute("error.type", str(resp.status_code))
            span.set_status(StatusCode.ERROR)
        span.end(_ns(end))
        return end

    def _phase(self, name: str, context: Any, start: float | None, end: float | None) -> None:
        if start is None or end is None:
            return
        assert self.tracer is not None
        self.tracer.start_span(name, context=context, start_time=_ns(start)).end(_ns(end))
