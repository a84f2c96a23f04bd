"""The usage a job needs, and the resource strategies that judge it.

Usage is Bacalhau's chained calculator: the request, with the node's defaults filling each
dimension it leaves out, and Disk at least the sum of the input sizes known without network
I/O (``input_size``). Capacity itself is judged by
:meth:`~worker.capacity.pool.CapacityPool.try_reserve`, which also reserves it.
"""

from __future__ import annotations

from collections.abc import Callable

from schemas.job import Job, StorageSpec
from worker.bidding.types import BID, BidDecision, BidRequest, decline
from worker.capacity.usage import ResourceUsage

InputSize = Callable[[StorageSpec], int]


def calculate_usage(
    job: Job,
    requested: ResourceUsage,
    *,
    defaults: ResourceUsage,
    input_size: InputSize | None = None,
) -> ResourceUsage:
    """``requested`` with ``defaults`` for its unset dimensions, Disk ≥ Σ input sizes."""
    usage = requested.fill_defaults(defaults)
    if input_size is None:
        return usage
    inputs = sum(max(0, int(input_size(spec))) for spec in job.Spec.inputs)
    if inputs > usage.Disk:
        usage = ResourceUsage(CPU=usage.CPU, Memory=usage.Memory, Disk=inputs, GPU=usage.GPU)
    return usage


def _detail(usage: ResourceUsage, limit: ResourceUsage) -> str:
    parts = []
    for name in usage.exceeded(limit):
        want, have = getattr(usage, name), getattr(limit, name)
        parts.append(f"{name} {want:g} > {have:g}" if name == "CPU" else f"{name} {want} > {have}")
    return ", ".join(parts)


class MaxPerJobStrategy:
    """Bacalhau's ``MaxCapacityStrategy``: every dimension ≤ the per-job limit."""

    def __init__(self, *, job_limit: ResourceUsage) -> None:
        self.job_limit = job_limit

    def check(self, usage: ResourceUsage) -> BidDecision:
        if usage.le(self.job_limit):
            return BID
        detail = _detail(usage, self.job_limit)
        return decline(f"job requirements exceed max allowed per job: {detail}")

    async def should_bid_on_usage(self, req: BidRequest, usage: ResourceUsage) -> BidDecision:
        return self.check(usage)
