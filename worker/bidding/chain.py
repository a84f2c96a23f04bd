"""The bid chain of PROTOCOL.md §9, in the table's order; the first no gives the Reason.

```
draining / store ─► resources parse ─► networking ─► stateless ─► installed
  (engine, verifier, publisher, storage) ─► executor-specific ─► locality ─► timeout
  ─► probes ─► usage (defaults, input sizes) ─► max per job ─► extra resource strategies
  ─► requester share + capacity (CapacityPool.try_reserve: reserves on success)
```

Static checks come first so a cheap no never waits for a probe. The reservation is the
last step and synchronous, so no other bid can slip between the capacity check and the
reservation; draining is checked again just before it, because probes await.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence

from schemas.job import StorageSpec
from worker.bidding.resource import InputSize, MaxPerJobStrategy, calculate_usage
from worker.bidding.semantic import (
    InstalledStrategy,
    Locality,
    LocalityStrategy,
    NetworkingStrategy,
    StatelessStrategy,
    TimeoutStrategy,
)
from worker.bidding.types import (
    BID,
    BidDecision,
    BidRequest,
    ResourceStrategy,
    SemanticStrategy,
    decline,
)
from worker.capacity.limits import Limits
from worker.capacity.parse import ResourceParseError, parse_resources
from worker.capacity.pool import CapacityPool
from worker.capacity.usage import ResourceUsage

log = logging.getLogger(__name__)

Decided = tuple[BidDecision, ResourceUsage | None]


def _never() -> bool:
    return False


def _always() -> bool:
    return True


def _failed(strategy: object, exc: BaseException) -> BidDecision:
    name = type(strategy).__name__
    log.warning("bid strategy %s failed", name, exc_info=exc)
    return decline(f"bid strategy {name} failed: {exc or type(exc).__name__}")


class Bidder:
    """Runs the whole chain for one AskForBid; see :meth:`decide`."""

    def __init__(
        self,
        *,
        pool: CapacityPool,
        limits: Limits,
        engines: Collection[str],
        verifiers: Collection[str],
        publishers: Collection[str],
        storage_sources: Collection[str],
        accept_networked: bool = False,
        http_proxy: bool = False,
        reject_stateless: bool = False,
        locality: Locality = "anywhere",
        is_local: Callable[[StorageSpec], bool] | None = None,
        timeout_bypass: Collection[str] = (),
        probes: Sequence[SemanticStrategy] = (),
        executor_strategies: Mapping[str, SemanticStrategy] | None = None,
        resource_strategies: Sequence[ResourceStrategy] = (),
        input_size: InputSize | None = None,
        is_draining: Callable[[], bool] = _never,
        store_available: Callable[[], bool] = _always,
    ) -> None:
        self.pool = pool
        self.limits = limits
        self.is_draining = is_draining
        self.store_available = store_available
        self._static = (
            NetworkingStrategy(accept_networked=accept_networked, http_proxy=http_proxy),
            StatelessStrategy(reject=reject_stateless),
            InstalledStrategy(
                engines=engines,
                verifiers=verifiers,
                publishers=publishers,
                storage_sources=storage_sources,
            ),
        )
        self._executor_strategies = dict(executor_strategies or {})
        self._late = (
            LocalityStrategy(locality=locality, is_local=is_local),
            TimeoutStrategy(
                max_seconds=limits.job_timeout_max,
                min_seconds=limits.job_timeout_min,
                bypass=timeout_bypass,
            ),
        )
        self._probes = tuple(probes)
        self._max_per_job = MaxPerJobStrategy(job_limit=limits.job)
        self._resource = tuple(resource_strategies)
        self._input_size = input_size

    def _node_state(self) -> BidDecision:
        if self.is_draining():
            return decline("node is draining", retryable=True)
        if not self.store_available():
            return decline("store unavailable", retryable=True)
        return BID

    def _static_checks(self, req: BidRequest) -> BidDecision:
        for strategy in self._static:
            decision = strategy.check(req)
            if not decision.bid:
                return decision
        return BID

    async def _semantic(self, req: BidRequest) -> BidDecision:
        executor = self._executor_strategies.get(req.job.Spec.Engine.value)
        if executor is not None:
            decision = await self._ask(executor, req)
            if not decision.bid:
                return decision
        for late in self._late:
            try:
                decision = late.check(req)
            except Exception as exc:
                return _failed(late, exc)
            if not decision.bid:
                return decision
        for probe in self._probes:
            decision = await self._ask(probe, req)
            if not decision.bid:
                return decision
        return BID

    @staticmethod
    async def _ask(strategy: SemanticStrategy, req: BidRequest) -> BidDecision:
        try:
            return await strategy.should_bid(req)
        except Exception as exc:
            return _failed(strategy, exc)

    async def _resources(self, req: BidRequest, usage: ResourceUsage) -> BidDecision:
        decision = self._max_per_job.check(usage)
        if not decision.bid:
            return decision
        for strategy in self._resource:
            try:
                decision = await strategy.should_bid_on_usage(req, usage)
            except Exception as exc:
                return _failed(strategy, exc)
            if not decision.bid:
                return decision
        return BID

    async def decide(self, req: BidRequest) -> Decided:
        """Run the chain. A bid comes back with the job's usage, already reserved as a
        pending bid under ``req.execution_id``: the caller must ``pool.release`` it if it
        cannot record the execution. A decline comes back with ``None`` and holds nothing."""
        decision = self._node_state()
        if not decision.bid:
            return decision, None
        try:
            requested = parse_resources(req.job.Spec.Resources)
        except ResourceParseError as exc:
            return decline(f"invalid resource request: {exc}"), None
        decision = self._static_checks(req)
        if decision.bid:
            decision = await self._semantic(req)
        if not decision.bid:
            return decision, None
        try:
            usage = calculate_usage(
                req.job,
                requested,
                defaults=self.limits.default_job,
                input_size=self._input_size,
            )
        except Exception as exc:
            log.warning("input size of job %s failed", req.job.Metadata.ID, exc_info=exc)
            return decline(f"error getting job disk space requirements: {exc}"), None
        decision = await self._resources(req, usage)
        if not decision.bid:
            return decision, None
        # Nothing below awaits: the node state and the pool are read and changed at once.
        decision = self._node_state()
        if not decision.bid:
            return decision, None
        refused = self.pool.try_reserve(req.execution_id, req.requester, usage)
        if refused is not None:
            return decline(refused.reason, retryable=refused.retryable), None
        return BID, usage
