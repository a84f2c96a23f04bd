"""Bid-time checks of a Docker job (a SemanticStrategy, Bacalhau's executor bid strategy).

- ``Network.Type: HTTP`` is declined even on a node with an allowlist proxy: the engine
  cannot force a container through it (no bridge network here), and would fail the run.
- The image: Bacalhau checked its platforms against the registry at bid time; PROTOCOL.md
  §9 allows no network I/O then. The local daemon is asked instead (one ``GET
  /images/<x>/json`` over its socket, about a millisecond, cached a few seconds), and
  only when the engine will not pull: a node that pulls bids on any image, as it cannot
  know without the registry whether the pull will work.
"""

from __future__ import annotations

import time

from schemas.job import Engine, NetworkType
from worker.bidding.types import BID, BidDecision, BidRequest, decline
from worker.engines.docker import DockerEngine
from worker.errors import EngineError

CACHE_SIZE = 256


class DockerBidStrategy:
    """Declines Docker jobs with HTTP networking, and (when pulling is off) those whose
    image is not on the daemon."""

    def __init__(self, engine: DockerEngine, *, ttl: float = 5.0) -> None:
        self.engine = engine
        self.ttl = ttl
        self._seen: dict[str, tuple[float, bool]] = {}

    async def should_bid(self, req: BidRequest) -> BidDecision:
        spec = req.job.Spec
        if spec.Engine is not Engine.DOCKER:
            return BID
        if spec.Network.Type is NetworkType.HTTP:
            return decline("networking type HTTP not supported")
        if self.engine.pull_images:
            return BID
        image = spec.Docker.Image
        now = time.monotonic()
        cached = self._seen.get(image)
        if cached is not None and now - cached[0] < self.ttl:
            present = cached[1]
        else:
            try:
                present = await self.engine.has_image(image)
            except (EngineError, OSError, TimeoutError) as exc:
                return decline(f"image {image} not available: {exc}", retryable=True)
            if len(self._seen) >= CACHE_SIZE:
                self._seen.clear()
            self._seen[image] = (now, present)
        if present:
            return BID
        return decline(f"image {image} not available: not present locally")
