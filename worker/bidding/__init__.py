"""Bid decisions (PROTOCOL.md §9): the strategies and the chain that runs them."""

from worker.bidding.chain import Bidder
from worker.bidding.probes import ExecProbe, HttpProbe, make_probes
from worker.bidding.types import (
    BidDecision,
    BidRequest,
    ResourceStrategy,
    SemanticStrategy,
)

__all__ = [
    "BidDecision",
    "BidRequest",
    "Bidder",
    "ExecProbe",
    "HttpProbe",
    "ResourceStrategy",
    "SemanticStrategy",
    "make_probes",
]
