"""A real OTLP/HTTP traces receiver on 127.0.0.1:0 for the tests: it decodes the
ExportTraceServiceRequest protobufs that arrive (opentelemetry-proto) and keeps their spans."""

from __future__ import annotations

import gzip
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status

PATH = "/v1/traces"


@dataclass
class Span:
    """One received span, ids as lowercase hex (parent "" for a root)."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: str  # "SERVER", "CLIENT", "INTERNAL", ...
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status: str  # "UNSET", "OK", "ERROR"
    service: str
    start_ns: int
    end_ns: int


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs if isinstance(kv, KeyValue)}


def decode(body: bytes) -> list[Span]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    out = []
    for rs in request.resource_spans:
        service = _attributes(rs.resource.attributes).get("service.name", "")
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    Span(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex(),
                        name=s.name,
                        kind=ProtoSpan.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_"),
                        attributes=_attributes(s.attributes),
                        events=[(e.name, _attributes(e.attributes)) for e in s.events],
                        status=Status.StatusCode.Name(s.status.code).removeprefix("STATUS_CODE_"),
                        service=service,
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                    )
                )
    return out


@dataclass
class Receiver:
    """`with Receiver() as r:` serves until the block ends; `r.endpoint` is the URL to export
    to, `r.spans` what arrived, `r.requests` how many export requests came."""

    spans: list[Span] = field(default_factory=list)
    requests: int = 0

    def __post_init__(self) -> None:
        receiver = self
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != PATH or self.headers.get("Content-Type") != (
                    "application/x-protobuf"
                ):
                    self.send_error(404 if self.path != PATH else 415)
                    return
                spans = decode(body)
                with receiver._lock:
                    receiver.spans.extend(spans)
                    receiver.requests += 1
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the test's output stays the proxy's

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}{PATH}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def received(self) -> list[Span]:
        with self._lock:
            return list(self.spans)

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> list[Span]:
        """Poll until `predicate(spans)` is true; the spans then."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.received()
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                raise TimeoutError(f"the receiver has {spans}")
            time.sleep(0.05)
