"""BaseEndpoint: the operations a requester calls (Bacalhau ``compute/endpoint.go``),
with the duplicates, conflicts and races of PROTOCOL.md §5 settled.

Checks run in the order of §3: validation (400, done by the codec and ``check_routing``),
lookup (404), then the transition table (409) and the store (503). A request that
repeats one already applied — the history holds a row with the same Cause from the
same requester — is answered like the first and changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from opentelemetry import trace
from opentelemetry.trace import Tracer

from schemas.compute import (
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
from worker.asking import BidMaking
from worker.bidding.chain import Bidder
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
from worker.states import Cause, Transition, single_move, transition
from worker.store.types import Execution, ExecutionStore, UpdateRequest
from worker.timers import Deadlines

log = logging.getLogger(__name__)

DEFAULT_PAGE = 100


class BaseEndpoint(BidMaking):
    """The six operations of Bacalhau's endpoint plus the two queries (AskForBid in
    :class:`worker.asking.BidMaking`)."""

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

    # -- the state-changing operations ----------------------------------------------------
    async def bid_accepted(
        self, request: BidAcceptedRequest, trace: dict[str, str]
    ) -> ExecutionResponse:
        deadline = datetime.now(UTC) + timedelta(seconds=self.queue_timeout)
        # When it would start at once, RunStarted commits with BidAccepted (one write);
        # the reply still reports BidAccepted. Nothing awaits between the commit and
        # ``started``, so a cancel that commits after this finds the run registered.
        claimed = self.buffer.claim(request.ExecutionID)
        try:
            execution, moved = await self._operate(
                request.SourcePeerID,
                request.ExecutionID,
                Cause.BID_ACCEPTED,
                changes={"deadline": deadline, "trace": trace},
                then=Cause.RUN_STARTED if claimed else None,
            )
        except BaseException:
            if claimed:
                self.buffer.unclaim(request.ExecutionID)
            raise
        run_now = moved is not None and moved.state is S.RUNNING
        if claimed and not run_now:
            self.buffer.unclaim(request.ExecutionID)
        if moved is not None:
            self.metrics.accepted.add(1)
            self.deadlines.schedule(execution.id, deadline)
            if run_now:
                self.buffer.started(moved)
            else:
                self.buffer.enqueue(moved)
        return _response(execution)

    async def bid_rejected(self, request: BidRejectedRequest) -> ExecutionResponse:
        execution, moved = await self._operate(
            request.SourcePeerID,
            request.ExecutionID,
            Cause.BID_REJECTED,
            comment=f"bid rejected due to: {request.Justification}",
        )
        if moved is not None:
            self._forget(execution.id)
        return _response(execution)

    async def result_accepted(self, request: ResultAcceptedRequest) -> ExecutionResponse:
        # PublishStarted commits with it (one write): the reply still reports the state
        # ResultAccepted put it in, and the publisher starts from Publishing. Nothing
        # awaits between the commit and ``publish``, so a cancel that commits after this
        # finds the upload's task registered.
        execution, moved = await self._operate(
            request.SourcePeerID,
            request.ExecutionID,
            Cause.RESULT_ACCEPTED,
            changes={"deadline": None},
            then=Cause.PUBLISH_STARTED,
        )
        if moved is not None:
            self.deadlines.cancel(execution.id)
            self.buffer.publish(moved)
        return _response(execution)

    async def result_rejected(self, request: ResultRejectedRequest) -> ExecutionResponse:
        execution, moved = await self._operate(
            request.SourcePeerID,
            request.ExecutionID,
            Cause.RESULT_REJECTED,
            comment=f"result rejected due to: {request.Justification}",
        )
        if moved is not None:
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
        if moved is not None:
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
        then: Cause | None = None,
    ) -> tuple[Execution, Execution | None]:
        """Apply ``cause`` by compare-and-set, and ``then`` (an automatic move) in the same
        write: (the execution as ``cause`` left it, as it is after the last move); the
        second is None for a duplicate, which changes nothing.

        The common case is one store round trip: when the move does not depend on the
        current state (every cause but Cancel), the write itself checks the owner and the
        source states. Only when that fails, or for Cancel, does the careful path look the
        execution up to answer a duplicate, a 404 or a 409."""
        move = single_move(cause)
        if move is not None:
            direct = self._update(
                execution_id, cause, move, requester, comment, changes, owner=requester
            )
            direct.then = self._then(execution_id, move, then)
            try:
                return await self._commit(direct)
            except (ExecutionNotFound, InvalidStateError, VersionMismatchError):
                pass
        for _ in range(3):
            execution = await self.lookup(requester, execution_id)
            found = transition(cause, execution.state)
            if found is None:
                if await self._is_duplicate(execution, cause, requester):
                    return execution, None
                raise ConflictError(
                    f"cannot apply {cause.value} to execution {execution_id} "
                    f"in state {execution.state.value}",
                    state=execution.state.value,
                    cause=execution.last_cause,
                )
            update = self._update(execution_id, cause, found, requester, comment, changes)
            update.expected_states = frozenset({execution.state})
            update.expected_version = execution.version
            update.then = self._then(execution_id, found, then)
            try:
                return await self._commit(update)
            except (InvalidStateError, VersionMismatchError):
                continue  # lost a race with another move: look again
        raise StoreUnavailableError(f"execution {execution_id} keeps changing; try again")

    def _then(
        self, execution_id: str, move: Transition, then: Cause | None
    ) -> UpdateRequest | None:
        """The automatic move ``then`` from where ``move`` leads, if it applies there."""
        if then is None:
            return None
        follow = transition(then, move.target)
        return None if follow is None else self._update(execution_id, then, follow, "", "", None)

    def _update(
        self,
        execution_id: str,
        cause: Cause,
        move: Transition,
        requester: str,
        comment: str,
        changes: dict[str, object] | None,
        *,
        owner: str = "",
    ) -> UpdateRequest:
        return UpdateRequest(
            execution_id=execution_id,
            cause=cause,
            new_state=move.target,
            expected_states=move.sources,
            owner=owner,
            comment=comment,
            requester=requester,
            changes=dict(changes or {}),
            callback=self.callbacks.for_kind(move.callback, err=comment, cause=cause.value),
        )

    async def _commit(self, update: UpdateRequest) -> tuple[Execution, Execution]:
        """(the execution after the first move, after the last one)."""
        result = await self.store.update(update)
        if result.outbox is not None:
            self.notify(result.outbox)
        return result.first or result.execution, result.execution

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
