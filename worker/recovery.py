"""The restart policy (PROTOCOL.md §5) and the expiry of waiting states.

| state on start        | becomes                                                        |
|-----------------------|----------------------------------------------------------------|
| Created               | stays until its bid TTL (pending capacity restored)            |
| BidAccepted           | queued again; the queue timeout still counts from BidAccepted  |
| Running               | Failed (`node restart`, ComputeError): its process is gone     |
| WaitingVerification   | stays until its verification TTL                               |
| ResultAccepted        | published again (publishers are idempotent)                    |
| Publishing            | published again                                                |

Deadlines are stored in UTC; one already past fires at once (a clock that stepped back
is treated as now).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from schemas.compute import ExecutionState as S
from worker import durations
from worker.buffer import ExecutorBuffer
from worker.capacity.pool import CapacityPool
from worker.errors import ExecutionNotFound
from worker.executor import BaseExecutor
from worker.states import Cause
from worker.store.types import Execution, ExecutionStore
from worker.timers import Deadlines

log = logging.getLogger(__name__)


class Recovery:
    """Applies the restart policy to every live execution, before the node subscribes."""

    def __init__(
        self,
        *,
        store: ExecutionStore,
        pool: CapacityPool,
        buffer: ExecutorBuffer,
        executor: BaseExecutor,
        deadlines: Deadlines,
        queue_timeout: float,
    ) -> None:
        self.store = store
        self.queue_timeout = queue_timeout
        self._deferred: list[Execution] = []
        self.pool = pool
        self.buffer = buffer
        self.executor = executor
        self.deadlines = deadlines

    async def run(self) -> None:
        live = await self.store.live_executions()
        live.sort(key=lambda e: e.update_time)  # keep the queue's FIFO order
        # Fail the Running ones first and together (one group commit), before any run or
        # upload restored below could compete for the store.
        running = [e for e in live if e.state is S.RUNNING]
        await asyncio.gather(
            *(self.executor.fail(e, Cause.NODE_RESTART, "node restart") for e in running)
        )
        for execution in live:
            if execution.state is not S.RUNNING:
                await self._restore(execution)
        if live:
            log.info("restored %d live executions", len(live))

    async def _restore(self, execution: Execution) -> None:
        state = execution.state
        waiting = state in (S.CREATED, S.BID_ACCEPTED, S.WAITING_VERIFICATION)
        if waiting and execution.deadline is not None:
            if execution.deadline <= datetime.now(UTC):
                # It passed while the node was down: expire it now, before anything
                # could start it (a queued job must not run after its queue timeout).
                await self.expire(
                    execution.id,
                    store=self.store,
                    executor=self.executor,
                    buffer=self.buffer,
                    deadlines=self.deadlines,
                    queue_timeout=self.queue_timeout,
                )
                return
            self.deadlines.schedule(execution.id, execution.deadline)
        if state is S.CREATED:
            self.pool.restore(execution.id, execution.requester, execution.usage, "pending")
        elif state is S.BID_ACCEPTED:
            self.pool.restore(execution.id, execution.requester, execution.usage, "pending")
            self._deferred.append(execution)
        elif state in (S.RESULT_ACCEPTED, S.PUBLISHING):
            self._deferred.append(execution)

    def resume(self) -> None:
        """Start the restored runs and uploads, once the node serves (so a big backlog
        does not hold up the start). A run whose execution was cancelled meanwhile does
        not start: its first move finds the state changed."""
        deferred, self._deferred = self._deferred, []
        for execution in deferred:
            if execution.state is S.BID_ACCEPTED:
                self.buffer.enqueue(execution)
            else:
                self.buffer.publish(execution)

    @staticmethod
    async def expire(
        execution_id: str,
        *,
        store: ExecutionStore,
        executor: BaseExecutor,
        buffer: ExecutorBuffer,
        deadlines: Deadlines,
        queue_timeout: float,
    ) -> None:
        """A waiting state's deadline passed: BidExpired, QueueTimeout or
        VerificationExpired, whichever applies to the state it is in now."""
        try:
            execution = await store.get_execution(execution_id)
        except ExecutionNotFound:
            return
        if execution.deadline is not None and execution.deadline > datetime.now(UTC):
            deadlines.schedule(execution_id, execution.deadline)  # moved on meanwhile
            return
        state = execution.state
        if state is S.CREATED:
            if await executor.move(execution, Cause.BID_EXPIRED, comment="bid expired") is not None:
                buffer.cancel(execution_id)
        elif state is S.BID_ACCEPTED:
            message = (
                "execution not started within the queue timeout of "
                f"{durations.format(queue_timeout)}"
            )
            if await executor.fail(execution, Cause.QUEUE_TIMEOUT, message):
                buffer.cancel(execution_id)
        elif state is S.WAITING_VERIFICATION:
            await executor.fail(
                execution,
                Cause.VERIFICATION_EXPIRED,
                "result not verified within the verification TTL",
            )
