"""ExecutorBuffer: the queue between an accepted bid and a running job (Bacalhau
``compute/executor_buffer.go``), with the reference's defects fixed.

Kept from Bacalhau: FIFO with skip — one pass over the queue starts every job that fits
in the running capacity, so a big job is skipped and smaller later jobs still start.

Fixed:
- a cancel removes a queued execution and frees its capacity at once;
- capacity is freed when the run really ends (the task's ``finally``), never on a timer
  while the engine may still be running;
- the timeout lives in the executor and fails the execution exactly once;
- starvation: skipping is what lets small jobs through, but unbounded skipping starves a
  big job forever. A job skipped for longer than ``skip_limit`` can no longer be
  overtaken: the pass stops at it, capacity drains until it fits, then it starts. The
  trade-off is some idle capacity while that happens, bounded by the running jobs'
  timeouts.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from worker import telemetry
from worker.capacity.pool import CapacityPool
from worker.capacity.usage import ZERO, ResourceUsage
from worker.executor import BaseExecutor
from worker.store.types import Execution
from worker.tasks import TaskOwner

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Queued:
    execution: Execution
    enqueued_at: float
    enqueued_ns: int
    first_skipped: float | None = None


class ExecutorBuffer:
    """Admits accepted executions to the executor as running capacity allows."""

    def __init__(
        self, *, executor: BaseExecutor, pool: CapacityPool, owner: TaskOwner, skip_limit: float
    ) -> None:
        self.executor = executor
        self.pool = pool
        self.owner = owner
        self.skip_limit = skip_limit
        self._queue: OrderedDict[str, _Queued] = OrderedDict()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._publishing: dict[str, asyncio.Task[None]] = {}
        self._admitting = True
        # Running executions: (monotonic time their timeout ends, usage), for estimates.
        self._ends: dict[str, tuple[float, ResourceUsage]] = {}

    # -- admission -------------------------------------------------------------------
    def enqueue(self, execution: Execution) -> None:
        """Queue an execution whose BidAccepted is committed; its pending reservation
        becomes a queued one, which never fails (the bid already reserved it)."""
        if execution.id in self._queue or execution.id in self._running:
            return
        if execution.id not in self.pool:
            return  # cancelled or expired meanwhile: its reservation is gone
        self.pool.accept(execution.id)
        self._queue[execution.id] = _Queued(execution, time.monotonic(), time.time_ns())
        self._dequeue()

    def stop_admission(self) -> None:
        """Start nothing more (drain and shutdown): queued executions stay queued in the
        store for the restart policy."""
        self._admitting = False

    def claim(self, execution_id: str) -> bool:
        """Whether an execution being accepted would start at once (admitting, nothing
        queued ahead of it, its pending reservation fits next to the running ones). If
        so its reservation counts as running from now on: the caller commits BidAccepted
        and RunStarted in one write, then calls :meth:`started`, or :meth:`unclaim` when
        the write did not commit."""
        if not self._admitting or self._queue or execution_id in self._running:
            return False
        if self.pool.where(execution_id) != "pending" or not self.pool.can_start(execution_id):
            return False
        self.pool.start(execution_id)
        return True

    def unclaim(self, execution_id: str) -> None:
        """Undo :meth:`claim` (the write failed or was a duplicate): pending again, and
        what was queued meanwhile for want of that room may start."""
        if execution_id not in self._running:
            self.pool.unstart(execution_id)
            self._dequeue()

    def started(self, execution: Execution) -> None:
        """Run an execution whose Running committed with its BidAccepted (see :meth:`claim`)."""
        item = _Queued(execution, time.monotonic(), time.time_ns())
        self.executor.metrics.queue_wait.record(0.0)
        self._queue_span(item)  # it waited for nothing, as a run started by _dequeue at once
        self._launch(execution, item.enqueued_at)

    def _launch(self, execution: Execution, now: float) -> None:
        ends = now + self.executor.timeout_of(execution)
        self._ends[execution.id] = (ends, execution.usage)
        self._running[execution.id] = self.owner.spawn(
            self._run(execution), name=f"run {execution.id}"
        )

    def _dequeue(self) -> None:
        if not self._admitting:
            return
        now = time.monotonic()
        for execution_id, item in list(self._queue.items()):
            if self.pool.can_start(execution_id):
                del self._queue[execution_id]
                self.pool.start(execution_id)
                self.executor.metrics.queue_wait.record(now - item.enqueued_at)
                self._queue_span(item)
                self._launch(item.execution, now)
                continue
            if item.first_skipped is None:
                item.first_skipped = now
            if now - item.first_skipped >= self.skip_limit:
                break  # starving: nothing behind it may overtake it any more

    def _queue_span(self, item: _Queued) -> None:
        """A span covering the time the execution waited in the queue."""
        if not telemetry.recording(self.executor.tracer):
            return
        execution = item.execution
        span = self.executor.tracer.start_span(
            "queue wait",
            context=telemetry.extract(execution.trace),
            start_time=item.enqueued_ns,
            attributes={"execution.id": execution.id, "job.id": execution.job_id},
        )
        span.end()

    async def _run(self, execution: Execution) -> None:
        try:
            await self.executor.run(execution)
        finally:
            self._running.pop(execution.id, None)
            self._ends.pop(execution.id, None)
            self.pool.release(execution.id)
            self._dequeue()

    def publish(self, execution: Execution) -> None:
        """Publish in the background (no capacity, no queue, as in Bacalhau)."""
        if execution.id in self._publishing:
            return
        task = self.owner.spawn(self._publish(execution), name=f"publish {execution.id}")
        self._publishing[execution.id] = task

    async def _publish(self, execution: Execution) -> None:
        try:
            await self.executor.publish(execution)
        finally:
            self._publishing.pop(execution.id, None)

    def estimate_start(self, usage: ResourceUsage) -> float:
        """Seconds until a new job of ``usage`` would start: 0 when it fits now; else
        running jobs are taken to end at their timeouts and queued ones to start in FIFO
        order as capacity frees (a pessimistic bound: jobs usually end sooner)."""
        if not self._queue and self.pool.fits_running(usage):
            # It would start now: what the walk below finds, without walking every
            # running job (the pool's running sum counts at least what ``_ends`` holds).
            return 0.0
        now = time.monotonic()
        total = self.pool.total
        ending = [(max(now, end), i, u) for i, (end, u) in enumerate(self._ends.values())]
        heapq.heapify(ending)
        used = ZERO
        for _, _, u in ending:
            used = used.add(u)
        t, counter = now, len(ending)
        queue = [
            (q.execution.usage, self.executor.timeout_of(q.execution)) for q in self._queue.values()
        ]
        for job_usage, duration in [*queue, (usage, 0.0)]:
            while not used.add(job_usage).le(total) and ending:
                end, _, freed = heapq.heappop(ending)
                t, used = max(t, end), used.sub(freed)
            counter += 1
            heapq.heappush(ending, (t + duration, counter, job_usage))
            used = used.add(job_usage)
        return round(t - now, 3)

    # -- removal ---------------------------------------------------------------------
    def cancel(self, execution_id: str) -> None:
        """Stop whatever the buffer does for an execution whose state already moved to a
        terminal one: dequeue it, or cancel its run or upload. Capacity of a running job
        is released when its task has really finished."""
        if self._queue.pop(execution_id, None) is not None:
            self.pool.release(execution_id)
            self._dequeue()
            return
        task = self._running.get(execution_id) or self._publishing.get(execution_id)
        if task is not None:
            task.cancel()
            return
        self.pool.release(execution_id)

    # -- introspection -----------------------------------------------------------------
    @property
    def running_ids(self) -> list[str]:
        return list(self._running)

    @property
    def queued_ids(self) -> list[str]:
        return list(self._queue)

    def is_running(self, execution_id: str) -> bool:
        return execution_id in self._running

    async def wait_running(self, timeout: float) -> list[str]:
        """Wait up to ``timeout`` for the running jobs; return the IDs still running."""
        tasks = set(self._running.values())
        if tasks and timeout > 0:
            await asyncio.wait(tasks, timeout=timeout)
        return list(self._running)

    async def stop_running(self, ids: list[str]) -> None:
        """Cancel the given runs and wait until they have stopped."""
        tasks = [self._running[i] for i in ids if i in self._running]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=30)
