"""AskForBid: the bid half of the endpoint (Bacalhau ``endpoint.AskForBid``).

A bid is committed (Created, with its reply and a deadline) before it is answered. A
repeat of an ask whose execution is still Created gets the stored reply; one racing the
first waits for it; one past Created gets 409. Declines are not remembered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta

from opentelemetry.trace import Tracer

from schemas.codec import decode, encode
from schemas.compute import AskForBidRequest, AskForBidResponse
from schemas.compute import ExecutionState as S
from worker import telemetry
from worker.bidding.chain import Bidder
from worker.bidding.types import BidRequest
from worker.buffer import ExecutorBuffer
from worker.capacity.pool import CapacityPool
from worker.errors import ConflictError, StoreUnavailableError
from worker.ids import uuid4_text
from worker.metrics import NodeMetrics
from worker.pricing import PriceList
from worker.store.types import Execution, ExecutionStore
from worker.timers import Deadlines

log = logging.getLogger(__name__)

# The grace added to the bid TTL before an unanswered bid expires (PROTOCOL.md §5).
BID_EXPIRY_GRACE = 2.0


def same_spec(existing: Execution, request: AskForBidRequest) -> bool:
    """Whether a repeated ask is for the Spec ``existing`` was created for: both encode to
    the same bytes. Compared only when an ask repeats, so a first ask pays nothing for it
    (a hash of every Spec, kept in each execution, cost ~4 % of an ask and its reject)."""
    return encode(existing.job.Spec) == encode(request.Job.Spec)


class BidMaking:
    """The AskForBid operation; the endpoint's constructor sets these attributes."""

    node_id: str
    store: ExecutionStore
    bidder: Bidder
    pool: CapacityPool
    buffer: ExecutorBuffer
    deadlines: Deadlines
    bid_ttl: float
    prices: PriceList | None
    metrics: NodeMetrics
    tracer: Tracer
    _asking: dict[tuple[str, str], asyncio.Event]

    async def ask_for_bid(
        self, request: AskForBidRequest, trace: dict[str, str]
    ) -> AskForBidResponse:
        started = time.monotonic()
        try:
            reply = await self._ask(request, trace)
        finally:
            self.metrics.bid_duration.record(time.monotonic() - started)
        self.metrics.asks.add(1)
        if reply.Accepted:
            self.metrics.bids.add(1)
        else:
            self.metrics.decline(reply.Reason)
        return reply

    async def _ask(self, request: AskForBidRequest, trace: dict[str, str]) -> AskForBidResponse:
        requester, job_id = request.SourcePeerID, request.Job.Metadata.ID
        key = (requester, job_id)
        while True:
            if (busy := self._asking.get(key)) is not None:
                # The same job is being asked for right now (a retry racing the first
                # ask): wait for that one, then answer as a repeat of it.
                await busy.wait()
                continue
            existing = await self.store.find_active(requester, job_id)
            if existing is not None:
                return self._repeat_ask(existing, request)
            if key not in self._asking:
                break
        self._asking[key] = done = asyncio.Event()
        try:
            return await self._bid(request, trace)
        finally:
            del self._asking[key]
            done.set()

    def _repeat_ask(self, existing: Execution, request: AskForBidRequest) -> AskForBidResponse:
        job_id = existing.job_id
        if existing.state is S.CREATED:
            if same_spec(existing, request):
                return decode(existing.ask_reply, AskForBidResponse)
            raise ConflictError(
                f"job {job_id} already has execution {existing.id} with a different spec",
                state=existing.state.value,
                cause=existing.last_cause,
            )
        raise ConflictError(
            f"job {job_id} already has execution {existing.id} in state {existing.state.value}",
            state=existing.state.value,
            cause=existing.last_cause,
        )

    async def _bid(self, request: AskForBidRequest, trace: dict[str, str]) -> AskForBidResponse:
        job = request.Job
        execution_id = f"e-{uuid4_text()}"
        with telemetry.child_span(self.tracer, "bid strategies"):
            decision, usage = await self.bidder.decide(
                BidRequest(
                    node_id=self.node_id,
                    execution_id=execution_id,
                    requester=request.SourcePeerID,
                    job=job,
                )
            )
        if not decision.bid or usage is None:
            return self._decline(job.Metadata.ID, decision.reason, decision.retryable)
        reply = AskForBidResponse(
            ExecutionID=execution_id,
            JobID=job.Metadata.ID,
            Accepted=True,
            NodeID=self.node_id,
            BidTTLSeconds=self.bid_ttl,
            EstimatedStartSeconds=self.buffer.estimate_start(usage),
        )
        if self.prices is not None:
            timeout = job.Spec.Timeout or self.buffer.executor.default_timeout
            reply.Price = self.prices.price(usage, timeout)
        now = datetime.now(UTC)
        deadline = now + timedelta(seconds=self.bid_ttl + BID_EXPIRY_GRACE)
        execution = Execution(
            id=execution_id,
            job=job,
            requester=request.SourcePeerID,
            usage=usage,
            create_time=now,
            update_time=now,
            ask_reply=encode(reply),
            deadline=deadline,
            ask_trace=trace,
        )
        try:
            await self.store.create_execution(execution)
        except StoreUnavailableError as exc:
            self.pool.release(execution_id)
            log.warning("declining %s: store unavailable: %s", job.Metadata.ID, exc.message)
            return self._decline(job.Metadata.ID, "store unavailable", True)
        except BaseException:
            self.pool.release(execution_id)
            raise
        self.deadlines.schedule(execution_id, deadline)
        return reply

    def _decline(self, job_id: str, reason: str, retryable: bool) -> AskForBidResponse:
        return AskForBidResponse(
            JobID=job_id, Accepted=False, Reason=reason, NodeID=self.node_id, Retryable=retryable
        )
