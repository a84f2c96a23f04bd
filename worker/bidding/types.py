"""What the bid strategies see and say (Bacalhau ``pkg/bidstrategy/type.go``, split into
the semantic and resource halves as v1.0 did)."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

from schemas.job import Job
from worker.capacity.usage import ResourceUsage


@dataclass(frozen=True, slots=True, kw_only=True)
class BidRequest:
    """One AskForBid as the strategies see it; ``execution_id`` is the one the node
    generated for this bid, under which a positive decision reserves capacity."""

    node_id: str
    execution_id: str
    requester: str
    job: Job


@dataclass(frozen=True, slots=True)
class BidDecision:
    """``bid`` False with ``reason`` (Bacalhau's text first, detail after ``: ``);
    ``retryable`` marks declines that may succeed later (capacity, draining)."""

    bid: bool
    reason: str = ""
    retryable: bool = False


BID = BidDecision(True)


def decline(reason: str, *, retryable: bool = False) -> BidDecision:
    return BidDecision(False, reason, retryable)


class SemanticStrategy(Protocol):
    """A check on the job itself, before any usage is calculated."""

    def should_bid(self, req: BidRequest) -> Awaitable[BidDecision]:
        """Say whether to bid; the first no in the chain gives the reason."""
        ...


class ResourceStrategy(Protocol):
    """A check on the job's calculated usage."""

    def should_bid_on_usage(self, req: BidRequest, usage: ResourceUsage) -> Awaitable[BidDecision]:
        """Say whether to bid on a job that needs ``usage``."""
        ...
