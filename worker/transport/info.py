"""NodeInfo: built on request and published on ``<p>.info.<n>`` (PROTOCOL.md §2, §4).

Published once all subscriptions are ready, every interval, on drain, and on capacity
change (at most once a second).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from nats.aio.client import Client

from schemas.codec import encode
from schemas.node import Capacity, ComputeNodeInfo, NodeInfo
from worker.capacity.pool import CapacityPool
from worker.capacity.usage import ResourceUsage
from worker.metrics import Gauges
from worker.store.types import ExecutionStore
from worker.transport.subjects import Subjects

log = logging.getLogger(__name__)

VERSION = "0.1.0"
MIN_GAP = 1.0


def capacity(u: ResourceUsage) -> Capacity:
    return Capacity(CPU=u.CPU, Memory=u.Memory, Disk=u.Disk, GPU=u.GPU)


class NodeInfoService:
    """Builds and publishes this node's NodeInfo."""

    def __init__(
        self,
        *,
        nc: Client,
        subjects: Subjects,
        instance_id: str,
        labels: dict[str, str],
        pool: CapacityPool,
        store: ExecutionStore,
        max_job: ResourceUsage,
        engines: list[str],
        verifiers: list[str],
        publishers: list[str],
        storage_sources: list[str],
        interval: float,
        counters: Callable[[], tuple[int, int, int]],
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.instance_id = instance_id
        self.labels = labels
        self.pool = pool
        self.store = store
        self.max_job = max_job
        self.engines = engines
        self.verifiers = verifiers
        self.publishers = publishers
        self.storage_sources = storage_sources
        self.interval = interval
        self.counters = counters  # (running, enqueued, dropped requests)
        self.draining = False
        self.gauges: Gauges | None = None  # metrics gauges kept up to date from NodeInfo
        self._dirty = asyncio.Event()
        self._last = 0.0

    async def build(self) -> NodeInfo:
        snap = self.pool.snapshot()
        stats = await self.store.outbox_stats()
        running, enqueued, dropped = self.counters()
        if self.gauges is not None:
            self.gauges.outbox = {"pending": stats.pending, "parked": stats.parked}
        oldest = 0.0
        if stats.oldest is not None:
            oldest = max(0.0, (datetime.now(UTC) - stats.oldest).total_seconds())
        return NodeInfo(
            NodeID=self.subjects.node_id,
            InstanceID=self.instance_id,
            Version=VERSION,
            Labels=self.labels,
            Draining=self.draining,
            ComputeNodeInfo=ComputeNodeInfo(
                ExecutionEngines=self.engines,
                Verifiers=self.verifiers,
                Publishers=self.publishers,
                StorageSources=self.storage_sources,
                MaxCapacity=capacity(snap.total),
                QueueCapacity=capacity(snap.queue),
                RunningUsedCapacity=capacity(snap.running),
                QueueUsedCapacity=capacity(snap.queued),
                PendingBidCapacity=capacity(snap.pending),
                AvailableCapacity=capacity(snap.available),
                MaxJobRequirements=capacity(self.max_job),
                RunningExecutions=running,
                EnqueuedExecutions=enqueued,
                OutboxPending=stats.pending,
                OutboxParked=stats.parked,
                OutboxOldestAgeSeconds=oldest,
                DroppedRequests=dropped,
            ),
        )

    async def encoded(self) -> bytes:
        return encode(await self.build())

    async def publish(self) -> None:
        try:
            await self.nc.publish(self.subjects.info(), await self.encoded())
        except Exception as exc:
            log.warning("NodeInfo not published: %r", exc)
        self._last = asyncio.get_running_loop().time()

    def changed(self) -> None:
        """Capacity changed: publish soon (rate-limited)."""
        self._dirty.set()

    async def run(self) -> None:
        """Publish every interval, and on change at most once per ``MIN_GAP``."""
        loop = asyncio.get_running_loop()
        while True:
            next_periodic = self._last + self.interval
            try:
                await asyncio.wait_for(self._dirty.wait(), max(0.0, next_periodic - loop.time()))
                gap = self._last + MIN_GAP - loop.time()
                if gap > 0:
                    await asyncio.sleep(gap)
            except TimeoutError:
                pass
            self._dirty.clear()
            await self.publish()
