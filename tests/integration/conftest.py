"""Fixtures for in-process nodes against the real nats-server of the session."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from worker.config import Config
from worker.node import Node
from worker.plugins import Plugins
from worker.requester import Requester

NodeFactory = Callable[..., Awaitable[Node]]


@pytest.fixture
def prefix() -> str:
    """A subject prefix of this test's own, so tests never see each other's traffic."""
    return f"t{uuid.uuid4().hex[:10]}"


@contextlib.asynccontextmanager
async def started_requester(nc: Client, prefix: str, name: str) -> AsyncIterator[Requester]:
    """A requester on the test's prefix, its callback subscriptions made."""
    r = Requester(nc=nc, requester_id=name, prefix=prefix)
    await r.start()
    try:
        yield r
    finally:
        await r.close()


@pytest.fixture
async def r1(nc: Client, prefix: str) -> AsyncIterator[Requester]:
    async with started_requester(nc, prefix, "r1") as r:
        yield r


@pytest.fixture
async def r2(nc: Client, prefix: str) -> AsyncIterator[Requester]:
    """A second requester, for what one must not see of another's executions."""
    async with started_requester(nc, prefix, "r2") as r:
        yield r


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def make_node(
    tmp_path: Path, nats_url: str, prefix: str, spans: InMemorySpanExporter
) -> AsyncIterator[NodeFactory]:
    """Start nodes on the session's broker; every one is closed at the end of the test."""
    nodes: list[Node] = []

    async def factory(
        name: str = "n1",
        *,
        plugins: Plugins | None = None,
        record_spans: bool = True,
        **settings: Any,
    ) -> Node:
        values: dict[str, Any] = {
            "data_dir": tmp_path / name,
            "node_id": name,
            "subject_prefix": prefix,
            "limit_total_cpu": "2",
            "limit_total_memory": "4Gi",
            "limit_total_disk": "10Gi",
            "nodeinfo_interval": 30.0,
        }
        values.update(settings)
        config = msgspec.convert(values, Config, from_attributes=False, strict=False)
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(spans))
        node = Node(
            config=config,
            nats_url=nats_url,
            plugins=plugins,
            tracer_provider=provider if record_spans else None,
            create_callback_stream=True,
        )
        await node.start()
        nodes.append(node)
        return node

    yield factory
    for node in nodes:
        await node.close()
