"""Metrics through OpenTelemetry: exported by OTLP (``--otlp-endpoint``) and on a
Prometheus endpoint (``--metrics-listen``); with neither, instruments are no-ops.

| instrument                        | kind      | attributes |
|-----------------------------------|-----------|------------|
| worker.asks                       | counter   |            |
| worker.bids                       | counter   |            |
| worker.declines                   | counter   | reason     |
| worker.executions.accepted        | counter   |            |
| worker.executions.completed       | counter   |            |
| worker.executions.failed          | counter   | cause      |
| worker.executions.cancelled       | counter   |            |
| worker.bid.duration               | histogram | (seconds)  |
| worker.queue.wait                 | histogram | (seconds)  |
| worker.queue.depth                | gauge     |            |
| worker.running                    | gauge     |            |
| worker.capacity.used              | gauge     | dimension  |
| worker.outbox.pending / .parked   | gauge     |            |
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, NoOpMeter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Gauges:
    """What the observable gauges read; the node fills it in."""

    queue_depth: Callable[[], int] = lambda: 0
    running: Callable[[], int] = lambda: 0
    used: Callable[[], dict[str, float]] = dict
    outbox: dict[str, int] = field(default_factory=lambda: {"pending": 0, "parked": 0})


class NodeMetrics:
    """The node's instruments (no-ops on a ``NoOpMeter``)."""

    def __init__(self, meter: Meter | None = None) -> None:
        m = meter or NoOpMeter("worker")
        self.gauges = Gauges()
        self.asks = m.create_counter("worker.asks", description="AskForBid requests answered")
        self.bids = m.create_counter("worker.bids", description="asks answered with a bid")
        self.declines = m.create_counter("worker.declines", description="declined asks")
        self.accepted = m.create_counter("worker.executions.accepted")
        self.completed = m.create_counter("worker.executions.completed")
        self.failed = m.create_counter("worker.executions.failed")
        self.cancelled = m.create_counter("worker.executions.cancelled")
        self.bid_duration = m.create_histogram("worker.bid.duration", unit="s")
        self.queue_wait = m.create_histogram("worker.queue.wait", unit="s")
        m.create_observable_gauge("worker.queue.depth", [self._queue_depth])
        m.create_observable_gauge("worker.running", [self._running])
        m.create_observable_gauge("worker.capacity.used", [self._used])
        m.create_observable_gauge("worker.outbox.pending", [self._outbox("pending")])
        m.create_observable_gauge("worker.outbox.parked", [self._outbox("parked")])

    def decline(self, reason: str) -> None:
        # The reason up to its detail (Bacalhau's text), so the label stays low-cardinality.
        self.declines.add(1, {"reason": reason.split(":", 1)[0][:80]})

    def _queue_depth(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self.gauges.queue_depth())]

    def _running(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self.gauges.running())]

    def _used(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(v, {"dimension": k}) for k, v in self.gauges.used().items()]

    def _outbox(self, key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_: CallbackOptions) -> Iterable[Observation]:
            return [Observation(self.gauges.outbox[key])]

        return observe


@dataclass(slots=True)
class MetricsSetup:
    provider: MeterProvider | None
    server: Any = None  # the Prometheus HTTP server, when listening
    port: int = 0

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.provider is not None:
            self.provider.shutdown()


def make_metrics(*, node_id: str, otlp_endpoint: str, metrics_listen: str) -> MetricsSetup:
    """A MeterProvider with the configured exporters, or none (no-op instruments)."""
    readers: list[MetricReader] = []
    server, port = None, 0
    if metrics_listen:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()
        readers.append(PrometheusMetricReader(registry=registry))
        host, _, port_text = metrics_listen.rpartition(":")
        server, _thread = start_http_server(
            int(port_text), addr=host or "127.0.0.1", registry=registry
        )
        port = int(server.server_port)
        log.info("metrics on http://%s:%d/metrics", host or "127.0.0.1", port)
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        endpoint = otlp_endpoint.rstrip("/")
        if not endpoint.endswith("/v1/metrics"):
            endpoint += "/v1/metrics"
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint)))
    if not readers:
        return MetricsSetup(provider=None)
    provider = MeterProvider(
        metric_readers=readers,
        resource=Resource.create({"service.name": "worker", "service.instance.id": node_id}),
    )
    return MetricsSetup(provider=provider, server=server, port=port)
