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
from collections.abc import Awaitable, Callable
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
        now = datetime.now(UTC)
        # Fail the Running ones first and together, before any run or upload restored
        # below could compete for the store; then expire, together too, whatever waited
        # past its deadline while the node was down (a queued job must not run after its
        # queue timeout). Together: their writes share group commits, where one at a time
        # each paid a commit (4,000 expiries took 3 s of start-up).
        running = [e for e in live if e.state is S.RUNNING]
        await _together(
            running,
            lambda e: self.executor.fail(e, Cause.NODE_RESTART, "node restart", reload=False),
        )
        expired = [e for e in live if _expired(e, now)]
        await _together(
            expired,
            lambda e: self.expire_now(
                e, executor=self.executor, buffer=self.buffer, queue_timeout=self.queue_timeout
            ),
        )
        for execution in live:
            if execution.state is not S.RUNNING and not _expired(execution, now):
                self._restore(execution)
        if live:
            log.info(
                "restored %d live executions (%d failed as running, %d expired)",
                len(live),
                len(running),
                len(expired),
            )

    def _restore(self, execution: Execution) -> None:
        """A live execution that is neither Running nor past its deadline."""
        state = execution.state
        if execution.deadline is not None and state in _WAITING:
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
        await Recovery.expire_now(
            execution, executor=executor, buffer=buffer, queue_timeout=queue_timeout
        )

    @staticmethod
    async def expire_now(
        execution: Execution,
        *,
        executor: BaseExecutor,
        buffer: ExecutorBuffer,
        queue_timeout: float,
    ) -> None:
        """The move of a waiting state whose deadline has passed, from ``execution`` just
        read: BidExpired, QueueTimeout or VerificationExpired (nothing for another state;
        if the state changed since the read, the move finds out and writes nothing)."""
        state = execution.state
        if state is S.CREATED:
            if await executor.move(execution, Cause.BID_EXPIRED, comment="bid expired") is not None:
                buffer.cancel(execution.id)
        elif state is S.BID_ACCEPTED:
            message = (
                "execution not started within the queue timeout of "
                f"{durations.format(queue_timeout)}"
            )
            if await executor.fail(execution, Cause.QUEUE_TIMEOUT, message, reload=False):
                buffer.cancel(execution.id)
        elif state is S.WAITING_VERIFICATION:
            await executor.fail(
                execution,
                Cause.VERIFICATION_EXPIRED,
                "result not verified within the verification TTL",
                reload=False,
            )


# The states that wait for a deadline (bid TTL, queue timeout, verification TTL).
_WAITING = frozenset({S.CREATED, S.BID_ACCEPTED, S.WAITING_VERIFICATION})

# How many of recovery's moves are in flight at once: enough to fill the store's group
# commits, few enough that a store of many live executions does not hold them all as tasks.
RECOVERY_CONCURRENCY = 256


def _expired(execution: Execution, now: datetime) -> bool:
    """Waiting, and its deadline passed (while the node was down)."""
    return (
        execution.state in _WAITING and execution.deadline is not None and execution.deadline <= now
    )


async def _together(
    executions: list[Execution], move: Callable[[Execution], Awaitable[object]]
) -> None:
    """``move`` each execution, RECOVERY_CONCURRENCY at a time."""
    for start in range(0, len(executions), RECOVERY_CONCURRENCY):
        chunk = executions[start : start + RECOVERY_CONCURRENCY]
        await asyncio.gather(*(move(e) for e in chunk))
