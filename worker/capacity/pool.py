"""The ONE committed-capacity pool (PROTOCOL.md §9 "Capacity").

Bacalhau v0.3.25 kept two trackers and bid when ``usage ≤ running_avail + queue_avail``
while the buffer needed the queue alone to fit, so a bid could fail at enqueue (#3898).
Here there is one pool and one sum: per dimension,

    committed = running + queued + pending bids ≤ total + queue

A bid reserves its usage as *pending*; BidAccepted moves it to *queued* and never fails,
because the capacity was already counted; the buffer moves it to *running* when
``running + usage ≤ total``. Every method is synchronous (no ``await``), so under asyncio
a check and the reservation it guards cannot interleave with another bid.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import msgspec

from worker.capacity.usage import ZERO, ResourceUsage

Where = Literal["pending", "queued", "running"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Decline:
    """Why a reservation was refused; every refusal of the pool is retryable."""

    reason: str
    retryable: bool = True


class PoolSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """The pool at one instant, for NodeInfo (``available`` is clamped at 0)."""

    total: ResourceUsage
    queue: ResourceUsage
    running: ResourceUsage
    queued: ResourceUsage
    pending: ResourceUsage
    available: ResourceUsage
    running_count: int = 0
    queued_count: int = 0
    pending_count: int = 0


@dataclass(slots=True)
class _Reservation:
    requester: str
    usage: ResourceUsage
    where: Where


def _describe(needed: ResourceUsage, free: ResourceUsage) -> str:
    parts = []
    for name in needed.exceeded(free):
        want, have = getattr(needed, name), getattr(free, name)
        if name == "CPU":
            parts.append(f"CPU {want:g} > {have:g} free")
        else:
            parts.append(f"{name} {want} > {have} free")
    return ", ".join(parts)


class CapacityPool:
    """Running, queued and pending-bid reservations against ``total + queue``."""

    def __init__(
        self,
        *,
        total: ResourceUsage,
        queue: ResourceUsage,
        max_pending_per_requester: int = 256,
    ) -> None:
        if max_pending_per_requester < 1:
            raise ValueError("max_pending_per_requester must be at least 1")
        self._total = total
        self._queue = queue
        self._limit = total.add(queue)
        self._max_pending = max_pending_per_requester
        self._items: dict[str, _Reservation] = {}
        self._sums: dict[Where, ResourceUsage] = {"pending": ZERO, "queued": ZERO, "running": ZERO}
        self._counts: dict[Where, int] = {"pending": 0, "queued": 0, "running": 0}
        self._pending_by_requester: dict[str, int] = {}
        self.on_change: Callable[[], None] | None = None
        """Set by the owner; called after every change (e.g. to republish NodeInfo)."""

    # -- queries ---------------------------------------------------------------------------

    @property
    def total(self) -> ResourceUsage:
        return self._total

    @property
    def queue(self) -> ResourceUsage:
        return self._queue

    def committed(self) -> ResourceUsage:
        """running + queued + pending."""
        s = self._sums
        return s["running"].add(s["queued"]).add(s["pending"])

    def pending_count(self, requester: str) -> int:
        return self._pending_by_requester.get(requester, 0)

    def where(self, execution_id: str) -> Where | None:
        item = self._items.get(execution_id)
        return item.where if item else None

    def usage_of(self, execution_id: str) -> ResourceUsage | None:
        item = self._items.get(execution_id)
        return item.usage if item else None

    def __contains__(self, execution_id: object) -> bool:
        return execution_id in self._items

    def __len__(self) -> int:
        return len(self._items)

    def can_start(self, execution_id: str) -> bool:
        """Whether a queued (or pending) reservation fits next to the running ones."""
        item = self._items.get(execution_id)
        if item is None:
            return False
        if item.where == "running":
            return True
        return self._sums["running"].add(item.usage).le(self._total)

    def fits_running(self, usage: ResourceUsage) -> bool:
        """Whether ``usage`` fits next to the running reservations now."""
        return self._sums["running"].add(usage).le(self._total)

    def snapshot(self) -> PoolSnapshot:
        s = self._sums
        return PoolSnapshot(
            total=self._total,
            queue=self._queue,
            running=s["running"],
            queued=s["queued"],
            pending=s["pending"],
            available=self._limit.sub(self.committed()),
            running_count=self._counts["running"],
            queued_count=self._counts["queued"],
            pending_count=self._counts["pending"],
        )

    # -- changes ---------------------------------------------------------------------------

    def try_reserve(
        self, execution_id: str, requester: str, usage: ResourceUsage
    ) -> Decline | None:
        """Reserve ``usage`` as a pending bid, or say why not (None = reserved)."""
        if execution_id in self._items:
            raise ValueError(f"execution {execution_id} already holds a reservation")
        if self.pending_count(requester) >= self._max_pending:
            return Decline(f"too many pending bids from {requester}")
        free = self._limit.sub(self.committed())
        if not usage.le(free):
            return Decline(f"not enough capacity available: {_describe(usage, free)}")
        self._put(execution_id, _Reservation(requester, usage, "pending"))
        self._changed()
        return None

    def restore(
        self, execution_id: str, requester: str, usage: ResourceUsage, where: Where
    ) -> None:
        """Record a reservation found at start-up, without any capacity check."""
        self._drop(execution_id)
        self._put(execution_id, _Reservation(requester, usage, where))
        self._changed()

    def accept(self, execution_id: str) -> None:
        """pending → queued; never fails (the capacity is already counted)."""
        self._move(execution_id, "queued", allowed=("pending",))

    def start(self, execution_id: str) -> None:
        """queued (or pending) → running. Call :meth:`can_start` first."""
        self._move(execution_id, "running", allowed=("pending", "queued"))

    def unstart(self, execution_id: str) -> None:
        """running → pending: undo a :meth:`start` made for a write that did not commit."""
        self._move(execution_id, "pending", allowed=("running",))

    def try_start(self, execution_id: str) -> bool:
        """:meth:`can_start` then :meth:`start`, in one step."""
        if not self.can_start(execution_id):
            return False
        self.start(execution_id)
        return True

    def release(self, execution_id: str) -> None:
        """Give the reservation back, wherever it is; unknown IDs are ignored."""
        if self._drop(execution_id):
            self._changed()

    # -- internals -------------------------------------------------------------------------

    def _move(self, execution_id: str, to: Where, *, allowed: tuple[Where, ...]) -> None:
        item = self._items.get(execution_id)
        if item is None or item.where not in allowed:
            return
        self._drop(execution_id)
        self._put(execution_id, _Reservation(item.requester, item.usage, to))
        self._changed()

    def _put(self, execution_id: str, item: _Reservation) -> None:
        self._items[execution_id] = item
        self._sums[item.where] = self._sums[item.where].add(item.usage)
        self._counts[item.where] += 1
        if item.where == "pending":
            r = item.requester
            self._pending_by_requester[r] = self._pending_by_requester.get(r, 0) + 1

    def _drop(self, execution_id: str) -> bool:
        item = self._items.pop(execution_id, None)
        if item is None:
            return False
        where = item.where
        self._counts[where] -= 1
        # An empty bucket is exactly zero: float sums never drift across a quiet period.
        self._sums[where] = self._sums[where].sub(item.usage) if self._counts[where] else ZERO
        if where == "pending":
            left = self._pending_by_requester[item.requester] - 1
            if left:
                self._pending_by_requester[item.requester] = left
            else:
                del self._pending_by_requester[item.requester]
        return True

    def _changed(self) -> None:
        callback = self.on_change
        if callback is None:
            return
        try:
            callback()
        except Exception:  # the pool must stay consistent whatever the hook does
            log.exception("capacity on_change hook failed")
