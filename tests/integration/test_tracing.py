"""W3C trace context through requests and callbacks (PROTOCOL.md §6, §8).

The requester side has its own TracerProvider; the node's spans go to the ``spans``
fixture's exporter (see ``make_node``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.aio.client import Client
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from schemas.callbacks import PublishResult, RunResult
from tests.helpers import assert_eventually
from tests.integration.conftest import NodeFactory
from tests.integration.test_compute import WAIT, Tap, make_job
from worker.requester import Requester


class RequesterSide:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("test-requester")


@pytest.fixture
def side() -> RequesterSide:
    return RequesterSide()


@pytest.fixture
async def r1(nc: Client, prefix: str, side: RequesterSide) -> AsyncIterator[Requester]:
    r = Requester(nc=nc, requester_id="r1", prefix=prefix, tracer=side.tracer)
    await r.start()
    yield r
    await r.close()


@pytest.fixture
async def tap(nc: Client, prefix: str) -> AsyncIterator[Tap]:
    t = await Tap(nc, prefix).start()
    yield t
    await t.close()


def trace_id_of(traceparent: str) -> int:
    version, trace_id, span_id, _flags = traceparent.split("-")
    assert version == "00" and len(trace_id) == 32 and len(span_id) == 16, traceparent
    return int(trace_id, 16)


def hexid(trace_id: int) -> str:
    return format(trace_id, "032x")


def producer_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind == SpanKind.PRODUCER]


async def test_one_trace_from_ask_to_publish(
    make_node: NodeFactory,
    r1: Requester,
    side: RequesterSide,
    spans: InMemorySpanExporter,
    tap: Tap,
) -> None:
    await make_node("n1")
    with side.tracer.start_as_current_span("job") as root:
        trace_id = root.get_span_context().trace_id
        reply = await r1.ask("n1", make_job())
        eid = reply.ExecutionID
        await r1.accept("n1", eid)
        assert isinstance(await r1.wait_callback(eid, timeout=WAIT), RunResult)
        await r1.accept_result("n1", eid)
        assert isinstance(await r1.wait_callback(eid, timeout=WAIT), PublishResult)

    # Callbacks carry a traceparent of the job's trace.
    for _ in range(2):
        kind, headers, _body = await tap.next()
        assert "traceparent" in headers, (kind, headers)
        assert trace_id_of(headers["traceparent"]) == trace_id, (kind, headers["traceparent"])

    # The node's callback spans end after the broker's ack: wait for both.
    await assert_eventually(lambda: len(producer_spans(spans)) == 2, timeout=WAIT)
    node_spans = spans.get_finished_spans()
    consumers = [s for s in node_spans if s.kind == SpanKind.CONSUMER]
    methods = sorted(
        str((s.attributes or {}).get("messaging.destination.name", "")).rsplit(".", 1)[-1]
        for s in consumers
    )
    assert methods == ["AskForBid/v1", "BidAccepted/v1", "ResultAccepted/v1"]
    wrong = [
        (s.name, hexid(s.context.trace_id)) for s in node_spans if s.context.trace_id != trace_id
    ]
    assert wrong == [], f"node spans outside the job's trace {hexid(trace_id)}: {wrong}"
    # Every stage of the job has its span in that trace.
    names = {s.name for s in node_spans}
    stages = {
        "bid strategies",
        "queue wait",
        "execution run",
        "inputs fetch",
        "engine run Noop",
        "verify Noop",
        "execution publish",
    }
    assert stages <= names, stages - names
    by_id = {s.context.span_id: s for s in node_spans}
    engine = next(s for s in node_spans if s.name == "engine run Noop")
    assert engine.parent is not None and by_id[engine.parent.span_id].name == "execution run"


async def test_request_spans_are_consumer_children_of_the_requester(
    make_node: NodeFactory,
    r1: Requester,
    side: RequesterSide,
    spans: InMemorySpanExporter,
    prefix: str,
) -> None:
    await make_node("n1")
    with side.tracer.start_as_current_span("job"):
        reply = await r1.ask("n1", make_job())
        await r1.get_execution("n1", reply.ExecutionID)
        await r1.cancel("n1", reply.ExecutionID)
        await r1.node_info("n1")
    sent = {
        str((s.attributes or {}).get("messaging.destination.name")): s
        for s in producer_spans(side.exporter)
    }
    consumers = [s for s in spans.get_finished_spans() if s.kind == SpanKind.CONSUMER]
    assert len(consumers) == 4
    for span in consumers:
        attributes: dict[str, Any] = dict(span.attributes or {})
        subject = str(attributes.get("messaging.destination.name"))
        method = subject.rsplit(".", 1)[-1]
        assert span.name == f"{prefix}.compute.{{node}}.{{requester}}.{method} process", span.name
        assert attributes.get("messaging.system") == "nats"
        assert subject == f"{prefix}.compute.n1.r1.{method}"
        parent = sent[subject]
        assert span.parent is not None, span.name
        assert span.parent.span_id == parent.context.span_id, span.name
        assert span.context.trace_id == parent.context.trace_id


async def test_callbacks_continue_the_accepts_trace_and_link_the_ask(
    make_node: NodeFactory,
    r1: Requester,
    side: RequesterSide,
    spans: InMemorySpanExporter,
    tap: Tap,
) -> None:
    """§8: the execution keeps the context of BidAccepted; its callbacks continue that
    trace, and the ask's context is linked when it differs."""
    await make_node("n1")
    with side.tracer.start_as_current_span("ask") as ask_span:
        reply = await r1.ask("n1", make_job())
    ask_trace = ask_span.get_span_context().trace_id
    with side.tracer.start_as_current_span("accept") as accept_span:
        await r1.accept("n1", reply.ExecutionID)
    accept_trace = accept_span.get_span_context().trace_id
    assert ask_trace != accept_trace
    assert isinstance(await r1.wait_callback(reply.ExecutionID, timeout=WAIT), RunResult)
    kind, headers, _ = await tap.next()
    assert kind == "OnRunComplete"
    assert trace_id_of(headers["traceparent"]) == accept_trace
    await assert_eventually(lambda: len(producer_spans(spans)) == 1, timeout=WAIT)
    (callback,) = producer_spans(spans)
    assert callback.context.trace_id == accept_trace
    linked = [link.context.trace_id for link in callback.links]
    assert linked == [ask_trace], (
        f"callback span links {[hexid(t) for t in linked]}, want the ask's {hexid(ask_trace)}"
    )
