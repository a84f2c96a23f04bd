"""Deadlines of the waiting states (bid TTL, queue timeout, verification TTL).

One task sleeps until the earliest deadline; deadlines are wall-clock UTC so they survive
restarts (the store keeps them). A deadline already in the past fires at once, which
also covers a clock that stepped back (it is treated as now).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

log = logging.getLogger(__name__)

Fire = Callable[[str], Awaitable[None]]


class Deadlines:
    """A min-heap of (deadline, execution ID) with lazy cancellation."""

    def __init__(self, *, fire: Fire) -> None:
        self._fire = fire
        self._heap: list[tuple[datetime, int, str]] = []
        self._current: dict[str, tuple[datetime, int]] = {}
        self._counter = 0
        self._wake = asyncio.Event()

    def schedule(self, execution_id: str, when: datetime) -> None:
        self._counter += 1
        self._current[execution_id] = (when, self._counter)
        heapq.heappush(self._heap, (when, self._counter, execution_id))
        self._compact()
        if self._heap[0][1] == self._counter:
            self._wake.set()

    def cancel(self, execution_id: str) -> None:
        self._current.pop(execution_id, None)
        self._compact()

    def _compact(self) -> None:
        # Cancelled entries would otherwise stay until their time (up to the 1 h
        # verification TTL): ~700 bytes per finished job.
        if len(self._heap) > 64 and len(self._heap) > 2 * len(self._current):
            self._heap = [(w, c, i) for i, (w, c) in self._current.items()]
            heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._current)

    async def run(self) -> None:
        """Fire deadlines forever (cancel the task to stop)."""
        while True:
            self._wake.clear()
            now = datetime.now(UTC)
            due: list[str] = []
            while self._heap and self._heap[0][0] <= now:
                _, counter, execution_id = heapq.heappop(self._heap)
                if self._current.get(execution_id, (None, -1))[1] == counter:
                    del self._current[execution_id]
                    due.append(execution_id)
            for execution_id in due:
                try:
                    await self._fire(execution_id)
                except Exception:
                    log.exception("deadline of %s failed: again in 1s", execution_id)
                    if execution_id not in self._current:
                        self.schedule(execution_id, datetime.now(UTC) + timedelta(seconds=1))
            if due:
                continue
            timeout = None
            if self._heap:
                timeout = max(0.0, (self._heap[0][0] - now).total_seconds())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)
