"""The no-span fast path of trace propagation against OpenTelemetry's own propagator."""

from __future__ import annotations

import pytest
from opentelemetry import context as otel_context
from opentelemetry.trace import NoOpTracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from worker import telemetry

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"

CASES: list[dict[str, str]] = [
    {},
    {"traceparent": ""},
    {"traceparent": f"00-{TRACE}-{SPAN}-01"},
    {"traceparent": f"00-{TRACE}-{SPAN}-00"},
    {"traceparent": f"00-{TRACE}-{SPAN}-ff"},
    {"traceparent": f" \t00-{TRACE}-{SPAN}-01 \t"},
    {"traceparent": f"00-{TRACE.upper()}-{SPAN}-01"},
    {"traceparent": f"00-{TRACE}-{SPAN}-01-extra"},
    {"traceparent": f"01-{TRACE}-{SPAN}-01-extra"},
    {"traceparent": f"cc-{TRACE}-{SPAN}-09"},
    {"traceparent": f"ff-{TRACE}-{SPAN}-01"},
    {"traceparent": f"00-{'0' * 32}-{SPAN}-01"},
    {"traceparent": f"00-{TRACE}-{'0' * 16}-01"},
    {"traceparent": f"00-{TRACE}-{SPAN}"},
    {"traceparent": f"00-{TRACE}-{SPAN}-01" + " " * 600},
    {"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "vendor=1,other=two"},
    {"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "vendor=1 , other=two"},
    {"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "vendor=ü, x=1"},
    {"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": ""},
    {"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "a=" + "b" * 600},
    {"tracestate": "vendor=1"},
    {"Compute-Node-ID": "n1", "traceparent": f"00-{TRACE}-{SPAN}-01", "other": "x"},
]


def _through_opentelemetry(headers: dict[str, str]) -> dict[str, str]:
    w3c = TraceContextTextMapPropagator()
    token = otel_context.attach(w3c.extract(headers))
    try:
        out: dict[str, str] = {}
        w3c.inject(out)
        return out
    finally:
        otel_context.detach(token)


@pytest.mark.parametrize("headers", CASES)
def test_w3c_headers_are_what_extract_then_inject_write(headers: dict[str, str]) -> None:
    assert telemetry.w3c_headers(headers) == _through_opentelemetry(headers)


@pytest.mark.parametrize("headers", CASES)
def test_inject_under_a_no_op_consumer_span_passes_the_context_on(
    headers: dict[str, str],
) -> None:
    with telemetry.consumer_span(NoOpTracer(), "t", headers, {}):
        injected = telemetry.inject({"keep": "me"})
    assert injected == {"keep": "me", **_through_opentelemetry(headers)}
    assert telemetry.inject({}) == {}  # nothing is left current afterwards
