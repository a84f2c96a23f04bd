"""Tracing set-up and the NATS header carrier (PROTOCOL.md §8).

One CONSUMER span per request named ``<subject template> process``, a child of the
incoming W3C context; callbacks are PRODUCER spans continuing the trace of the
execution's BidAccepted request, linked to the ask's context when it differs.
Setup lives only here; everything else takes a ``Tracer``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import IO, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import INVALID_SPAN, Link, NoOpTracer, Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import _TRACECONTEXT_MAXIMUM_TRACESTATE_LENGTH, TraceState

TRACE_KEYS = ("traceparent", "tracestate")

# PROTOCOL.md §8 carries W3C trace context only: the W3C propagator itself, not the global
# composite one (which also parses and writes ``baggage`` on every message).
_W3C = TraceContextTextMapPropagator()

# What a span helper returns when no span would be recorded: entering it costs nothing
# (a no-op tracer's span still extracts its parent and swaps the current context).
NOTHING: contextlib.nullcontext[None] = contextlib.nullcontext()


def recording(tracer: Tracer) -> bool:
    """Whether ``tracer`` records spans (``make_provider`` gave None: it does not)."""
    return not isinstance(tracer, NoOpTracer)


def child_span(tracer: Tracer, name: str) -> Any:
    """A span under the current one, or ``NOTHING`` when spans are not recorded."""
    if not recording(tracer):
        return NOTHING
    return tracer.start_as_current_span(name)


class FileSpanExporter(SpanExporter):
    """Writes one JSON object per finished span to a file (for cross-process tests)."""

    def __init__(self, path: str) -> None:
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in shutdown
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            for span in spans:
                ctx = span.get_span_context()
                parent = span.parent
                record = {
                    "name": span.name,
                    "traceId": format(ctx.trace_id, "032x") if ctx else "",
                    "spanId": format(ctx.span_id, "016x") if ctx else "",
                    "parentSpanId": format(parent.span_id, "016x") if parent else "",
                    "kind": span.kind.name,
                    "attributes": dict(span.attributes or {}),
                    "links": [format(link.context.trace_id, "032x") for link in span.links],
                }
                self._file.write(json.dumps(record, default=str) + "\n")
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()


def make_provider(*, node_id: str, otlp_endpoint: str = "") -> TracerProvider | None:
    """A TracerProvider for the node: OTLP/HTTP when an endpoint is configured, a JSON-lines
    file when ``WORKER_TRACE_FILE`` is set; None when nothing would export spans (then no
    span is made at all, and requests' trace context is only passed along)."""
    trace_file = os.environ.get("WORKER_TRACE_FILE", "")
    if not otlp_endpoint and not trace_file:
        return None
    provider = TracerProvider(
        resource=Resource.create({"service.name": "worker", "service.instance.id": node_id})
    )
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = otlp_endpoint.rstrip("/")
        if not endpoint.endswith("/v1/traces"):
            endpoint += "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    if trace_file:
        provider.add_span_processor(SimpleSpanProcessor(FileSpanExporter(trace_file)))
    return provider


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The W3C context carried by NATS headers."""
    return _W3C.extract(headers or {})


def trace_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Only the trace-context headers of a message (what an execution stores)."""
    if not headers:
        return {}
    return {k: v for k, v in headers.items() if k in TRACE_KEYS}


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current context to ``headers`` (a fresh dict per message)."""
    passed = _passed.get()
    if passed is not None:
        headers.update(passed)
    else:
        _W3C.inject(headers)
    return headers


# The W3C propagator's own check of a traceparent (opentelemetry TraceContextTextMapPropagator).
_TRACEPARENT = re.compile(
    "^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:(-.*)|[ \t]*)$"
)
_TRACEPARENT_MAX = 512
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16

# With no spans recorded, a request's context is only passed on: the headers that
# ``inject`` would write for it, made once per request (see ``w3c_headers``).
_passed: ContextVar[dict[str, str] | None] = ContextVar("worker_trace_passed", default=None)


def w3c_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The trace headers ``inject`` writes after ``extract(headers)`` is made current, without
    building the context: the same checks as the W3C propagator (a malformed, all-zero or
    version-ff traceparent carries nothing; the version is written as 00), and the
    tracestate through OpenTelemetry's own ``TraceState`` when there is one."""
    if not headers:
        return {}
    parent = headers.get("traceparent")
    if not parent or len(parent) > _TRACEPARENT_MAX:
        return {}
    match = _TRACEPARENT.search(parent)
    if match is None:
        return {}
    version, trace_id, span_id, flags, rest = match.groups()
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN or version == "ff":
        return {}
    if version == "00" and rest:
        return {}
    out = {"traceparent": f"00-{trace_id}-{span_id}-{flags}"}
    state = headers.get("tracestate")
    if state is not None and len(state) <= _TRACECONTEXT_MAXIMUM_TRACESTATE_LENGTH:
        parsed = TraceState.from_header([state])
        if parsed:
            out["tracestate"] = parsed.to_header()
    return out


class _PropagateOnly:
    """Makes a request's trace headers the ones ``inject`` writes, for the ``with`` block
    (a class: half the cost of a generator's context manager, paid per request)."""

    __slots__ = ("_headers", "_token")

    def __init__(self, headers: Mapping[str, str] | None) -> None:
        self._headers = headers

    def __enter__(self) -> Span:
        self._token = _passed.set(w3c_headers(self._headers))
        return INVALID_SPAN

    def __exit__(self, *exc_info: object) -> None:
        _passed.reset(self._token)


def consumer_span(
    tracer: Tracer, template: str, headers: Mapping[str, str] | None, attributes: dict[str, Any]
) -> Any:
    """The CONSUMER span of a request, child of the incoming context; with a no-op tracer
    only the incoming context is made current, so replies and callbacks carry it on."""
    if not recording(tracer):
        return _PropagateOnly(headers)
    return tracer.start_as_current_span(
        f"{template} process",
        context=extract(headers),
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "nats",
            "messaging.operation.type": "process",
            **attributes,
        },
    )


def producer_span(
    tracer: Tracer,
    template: str,
    parent: Mapping[str, str],
    link: Mapping[str, str] | None,
    attributes: dict[str, Any],
) -> Any:
    """A PRODUCER span for a callback, continuing ``parent``'s trace, linked to ``link``."""
    if not recording(tracer):
        return NOTHING  # the callback's headers already carry its trace context
    parent_ctx = extract(parent)
    links = []
    if link:
        link_span = trace.get_current_span(extract(link)).get_span_context()
        parent_span = trace.get_current_span(parent_ctx).get_span_context()
        if link_span.is_valid and link_span.trace_id != parent_span.trace_id:
            links.append(Link(link_span))
    return tracer.start_as_current_span(
        f"{template} send",
        context=parent_ctx,
        kind=SpanKind.PRODUCER,
        links=links,
        attributes={"messaging.system": "nats", "messaging.operation.type": "send", **attributes},
    )
