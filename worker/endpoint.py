"""BaseEndpoint: the operations a requester calls (Bacalhau ``compute/endpoint.go``),
with the duplicates, conflicts and races of PROTOCOL.md §5 settled.

Checks run in the order of §3: validation (400, done by the codec and ``_check_routing``),
lookup (404), then the transition table (409) and the store (503). A request that
repeats one already applied — the history holds a row with the same Cause from the
same requester — is answered like the first and changes nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta

from opentelemetry import trace
from opentelemetry.trace import Tracer

from schemas.codec import decode, encode
from schemas.compute import (
    AskForBidRequest,
    AskForBidResponse,
    BidAcceptedRequest,
    BidRejectedRequest,
    CancelExecutionRequest,
    ExecutionResponse,
    GetExecutionRequest,
    ListExecutionsRequest,
    ListExecutionsResponse,
    ResultAcceptedRequest,
    ResultRejectedRequest,
)
from schemas.compute import ExecutionState as S
from schemas.node import ExecutionView
from worker import views
from worker.bidding.chain import Bidder
from worker.bidding.types import BidRequest
from worker.buffer import ExecutorBuffer
from worker.callbacks import CallbackFactory
from worker.capacity.pool import CapacityPool
from worker.errors import (
    ConflictError,
    ExecutionNotFound,
    InvalidStateError,
    NotFoundError,
    RequestError,
    StoreUnavailableError,
    VersionMismatchError,
)
from worker.metrics import NodeMetrics
from worker.pricing import PriceList
from worker.protocols import OutboxNotify
from worker.states import Cause, single_move, transition
from worker.store.types import Execution, ExecutionStore, UpdateRequest
from worker.timers import Deadlines

log = logging.getLogger(__name__)

# The grace added to the bid TTL before an unanswered bid expires (PROTOCOL.md §5).
BID_EXPIRY_GRACE = 2.0
DEFAULT_PAGE = 100


def spec_hash(request: AskForBidRequest) -> str:
    return hashlib.sha256(encode(request.Job.Spec)).hexdigest()


class BaseEndpoint:
    """The six operations of Bacalhau's endpoint plus the two queries."""

    def __init__(
        self,
        *,
        node_id: str,
        store: ExecutionStore,
        bidder: Bidder,
        pool: CapacityPool,
        buffer: ExecutorBuffer,
        callbacks: CallbackFactory,
        deadlines: Deadlines,
        notify: OutboxNotify,
        bid_ttl: float,
        queue_timeout: float,
        prices: PriceList | None = None,
        metrics: NodeMetrics | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.node_id = node_id
        self.store = store
        self.bidder = bidder
        self.pool = pool
        self.buffer = buffer
        self.callbacks = callbacks
        self.deadlines = deadlines
        self.notify = notify
        self.bid_ttl = bid_ttl
        self.queue_timeout = queue_timeout
        self.prices = prices
        self.metrics = metrics or NodeMetrics()
        self.tracer = tracer or trace.get_tracer("worker")
        self._asking: dict[tuple[str, str], asyncio.Event] = {}

    # -- validation ---------------------------------------------------------------------
    def check_routing(self, source: str, target: str, subject_requester: str) -> None:
        if source != subject_requester:
            raise RequestError(
                f"SourcePeerID {source!r} does not match the requester {subject_requester!r} "
                "of the subject"
            )
        if target not in ("", self.node_id):
            raise RequestError(f"TargetPeerID {target!r} is not this node ({self.node_id})")

    # -- AskForBid ----------------------------------------------------------------------
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
        digest = spec_hash(request)
        key = (requester, job_id)
        while True:
            if (busy := self._asking.get(key)) is not None:
                # The same job is being asked for right now (a retry racing the first
                # ask): wait for that one, then answer as a repeat of it.
                await busy.wait()
                continue
            existing = await self.store.find_active(requester, job_id)
            if existing is not None:
                return self._repeat_ask(existing, digest)
            if key not in self._asking:
                break
        self._asking[key] = done = asyncio.Event()
        try:
            return await self._bid(request, digest, trace)
        finally:
            del self._asking[key]
            done.set()

    def _repeat_ask(self, existing: Execution, digest: str) -> AskForBidResponse:
        job_id = existing.job_id
        if existing.state is S.CREATED:
            if existing.spec_hash == digest:
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

    async def _bid(
        self, request: AskForBidRequest, digest: str, trace: dict[str, str]
    ) -> AskForBidResponse:
        job = request.Job
        execution_id = f"e-{uuid.uuid4()}"
        with self.tracer.start_as_current_span("bid strategies"):
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
            spec_hash=digest,
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

    # -- the state-changing operations ----------------------------------------------------
    async def bid_accepted(
        self, request: BidAcceptedRequest, trace: dict[str, str]
    ) -> ExecutionResponse:
        deadline = datetime.now(UTC) + timedelta(seconds=self.queue_timeout)
        execution, moved = await self._operate(
            request.SourcePeerID,
            request.ExecutionID,
            Cause.BID_ACCEPTED,
            changes={"deadline": deadline, "trace": trace},
        )
        if moved:
            self.metrics.accepted.add(1)
            self.deadlines.schedule(execution.id, deadline)
            self.buffer.enqueue(execution)
        return _response(execution)

    async def bid_rejected(self, request: BidRejectedRequest) -> ExecutionResponse:
        execution, moved = await self._operate(
            request.SourcePeerID,
            request.ExecutionID,
            Cause.BID_REJECTED,
            comment=f"bid rejected due to: {request.Justification}",
        )
        if moved:
            self._forget(execution.id)
        return _response(execution)

    async def result_accepted(self, request: ResultAcceptedRequest) -> ExecutionResponse:
        execution, moved = await self._operate(
            request.SourcePeerID,
            request.ExecutionID,
            Cause.RESULT_ACCEPTED,
            changes={"deadline": None},
        )
        if moved:
            self.deadlines.cancel(execution.id)
            self.buffer.publish(execution)
        return _response(execution)

    async def result_rejected(self, request: ResultRejectedRequest) -> ExecutionResponse:
        execution, moved = await self._operate(
            request.SourcePeerID,
            request.ExecutionID,
            Cause.RESULT_REJECTED,
            comment=f"result rejected due to: {request.Justification}",
        )
        if moved:
            self.metrics.failed.add(1, {"cause": Cause.RESULT_REJECTED.value})
            self.deadlines.cancel(execution.id)
        return _response(execution)

    async def cancel(self, request: CancelExecutionRequest) -> ExecutionResponse:
        execution, moved = await self._operate(
            request.SourcePeerID,
            request.ExecutionID,
            Cause.CANCEL,
            comment=f"execution canceled due to: {request.Justification}",
        )
        if moved:
            self.metrics.cancelled.add(1)
            self._forget(execution.id)
        return _response(execution)

    def _forget(self, execution_id: str) -> None:
        """Drop timers, queue place, run or upload, and capacity of a finished execution."""
        self.deadlines.cancel(execution_id)
        self.buffer.cancel(execution_id)

    async def _operate(
        self,
        requester: str,
        execution_id: str,
        cause: Cause,
        *,
        comment: str = "",
        changes: dict[str, object] | None = None,
    ) -> tuple[Execution, bool]:
        """Apply ``cause`` by compare-and-set; (execution, False) for a duplicate."""
        applied = await self._apply_directly(requester, execution_id, cause, comment, changes)
        if applied is not None:
            return applied, True
        for _ in range(3):
            execution = await self.lookup(requester, execution_id)
            move = transition(cause, execution.state)
            if move is None:
                if await self._is_duplicate(execution, cause, requester):
                    return execution, False
                raise ConflictError(
                    f"cannot apply {cause.value} to execution {execution_id} "
                    f"in state {execution.state.value}",
                    state=execution.state.value,
                    cause=execution.last_cause,
                )
            update = UpdateRequest(
                execution_id=execution_id,
                cause=cause,
                new_state=move.target,
                expected_states=frozenset({execution.state}),
                expected_version=execution.version,
                comment=comment,
                requester=requester,
                changes=dict(changes or {}),
                callback=self.callbacks.for_kind(move.callback, err=comment, cause=cause.value),
            )
            try:
                result = await self.store.update(update)
            except (InvalidStateError, VersionMismatchError):
                continue  # lost a race with another move: look again
            if result.outbox is not None:
                self.notify(result.outbox)
            return result.execution, True
        raise StoreUnavailableError(f"execution {execution_id} keeps changing; try again")

    async def _apply_directly(
        self,
        requester: str,
        execution_id: str,
        cause: Cause,
        comment: str,
        changes: dict[str, object] | None,
    ) -> Execution | None:
        """The common case in one store round trip: the owner and state checks happen in
        the write itself. None when it does not apply (unknown, another's, a duplicate,
        a conflict): the careful path then finds out which, and answers accordingly."""
        move = single_move(cause)
        if move is None:
            return None
        update = UpdateRequest(
            execution_id=execution_id,
            cause=cause,
            new_state=move.target,
            expected_states=move.sources,
            owner=requester,
            comment=comment,
            requester=requester,
            changes=dict(changes or {}),
            callback=self.callbacks.for_kind(move.callback, err=comment, cause=cause.value),
        )
        try:
            result = await self.store.update(update)
        except (ExecutionNotFound, InvalidStateError, VersionMismatchError):
            return None
        if result.outbox is not None:
            self.notify(result.outbox)
        return result.execution

    async def _is_duplicate(self, execution: Execution, cause: Cause, requester: str) -> bool:
        if cause is Cause.CANCEL and execution.state is S.CANCELLED:
            return True
        history = await self.store.get_history(execution.id)
        return any(h.cause == cause.value and h.requester == requester for h in history)

    async def lookup(self, requester: str, execution_id: str) -> Execution:
        """The requester's execution; 404 when unknown or another's, 409 for a tombstone."""
        try:
            execution = await self.store.get_execution(execution_id)
        except ExecutionNotFound:
            execution = None
        if execution is not None and execution.requester == requester:
            return execution
        if execution is None:
            tomb = await self.store.get_tombstone(execution_id)
            if tomb is not None and tomb.requester == requester:
                raise ConflictError(
                    f"execution {execution_id} ended in state {tomb.state.value} and was deleted",
                    state=tomb.state.value,
                    cause=tomb.cause,
                )
        raise NotFoundError(f"execution not found: {execution_id}")

    # -- queries ------------------------------------------------------------------------
    async def get_execution(self, request: GetExecutionRequest) -> ExecutionView:
        execution = await self.lookup(request.SourcePeerID, request.ExecutionID)
        return await views.execution_view(self.store, execution)

    async def list_executions(self, request: ListExecutionsRequest) -> ListExecutionsResponse:
        return await views.list_executions(self.store, request, DEFAULT_PAGE)


def _response(execution: Execution) -> ExecutionResponse:
    return ExecutionResponse(
        ExecutionID=execution.id, JobID=execution.job_id, State=execution.state
    )
