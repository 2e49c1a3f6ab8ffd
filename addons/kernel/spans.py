"""Where code other than the tracing addon adds to a request's trace, without importing it.

The tracing addon (`addons/tracing.py`) sets `TRACES.tracer` while tracing is on and keeps each
traced flow's server span in `TRACES.spans`; everything else calls these, which do nothing
(one emptiness test) while no flow is traced:

child(flow, name, attributes)    a context manager: a child span of the flow's server span
                                 (the cache lookup)
event(flow, name, attributes)    an event on the flow's server span (policy decisions)
remote(name, headers, attributes) a context manager: a span continuing the W3C trace context in
                                 `headers` (the CLI's process run, reached through its own
                                 listener with the traceparent the proxy sent it)
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

from mitmproxy import http
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

Attributes = Mapping[str, Any]

_NOTHING: contextlib.nullcontext[None] = contextlib.nullcontext()
PROPAGATOR = TraceContextTextMapPropagator()


class Traces:
    """The tracer while tracing is on, and the server span of every flow being traced. Flows
    are held weakly: a flow dropped without a response or error hook leaks nothing."""

    def __init__(self) -> None:
        self.tracer: trace.Tracer | None = None
        self.spans: weakref.WeakKeyDictionary[http.HTTPFlow, trace.Span] = (
            weakref.WeakKeyDictionary()
        )


# The one instance: the kernel is imported once, however often the addon scripts reload.
TRACES = Traces()


def child(
    flow: http.HTTPFlow, name: str, attributes: Attributes | None = None
) -> contextlib.AbstractContextManager[Any]:
    if not TRACES.spans or TRACES.tracer is None:
        return _NOTHING
    parent = TRACES.spans.get(flow)
    if parent is None:
        return _NOTHING
    span = TRACES.tracer.start_span(
        name, context=trace.set_span_in_context(parent), attributes=attributes
    )
    return _ending(span)


def event(flow: http.HTTPFlow, name: str, attributes: Attributes) -> None:
    if not TRACES.spans:
        return
    span = TRACES.spans.get(flow)
    if span is not None:
        span.add_event(name, attributes)


def remote(
    name: str, headers: Mapping[str, str], attributes: Attributes
) -> contextlib.AbstractContextManager[Any]:
    tracer = TRACES.tracer
    if tracer is None:
        return _NOTHING
    return _ending(
        tracer.start_span(name, context=PROPAGATOR.extract(headers), attributes=attributes)
    )


# Not start_as_current_span: the current context is the event loop's, shared by every flow.
@contextlib.contextmanager
def _ending(span: trace.Span) -> Iterator[None]:
    try:
        yield
    except BaseException as e:
        span.record_exception(e)
        span.set_status(trace.StatusCode.ERROR, type(e).__name__)
        raise
    finally:
        span.end()
