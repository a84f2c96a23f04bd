"""The outbox dispatcher: delivers callbacks written by state changes (PROTOCOL.md §6).

Per execution at most one callback is in flight, in Seq order; different executions
are pipelined. ``jetstream`` mode retires a row on the stream's ack (a duplicate ack
included: the stream deduplicates on ``Nats-Msg-Id``); ``core`` mode retires it once
flushed. A row that keeps failing is parked: counted, logged, and it holds back only
its own execution's later rows until the next reconnect or restart re-sends it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from nats.aio.client import Client
from nats.errors import MaxPayloadError
from opentelemetry.trace import Tracer

from worker import telemetry
from worker.store.types import ExecutionStore, OutboxRow
from worker.tasks import TaskOwner
from worker.transport.publisher import StreamPublisher

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 5.0
MAX_BACKOFF = 5.0


class OutboxDispatcher:
    """Sends outbox rows; ``notify`` is called by whoever committed a row."""

    def __init__(
        self,
        *,
        nc: Client,
        store: ExecutionStore,
        mode: str,
        max_attempts: int,
        tracer: Tracer,
        publish_timeout: float = 5.0,
        concurrency: int = 256,
    ) -> None:
        self.nc = nc
        self.store = store
        self.mode = mode
        self.max_attempts = max_attempts
        self.tracer = tracer
        self.publish_timeout = publish_timeout
        self._owner = TaskOwner(name="outbox")
        self._queues: dict[str, deque[OutboxRow]] = {}
        self._known: set[tuple[str, int]] = set()
        self._slots = asyncio.Semaphore(concurrency)
        self._idle = asyncio.Event()
        self._idle.set()
        self._sweeper: asyncio.Task[None] | None = None
        self._stream = StreamPublisher(nc) if mode == "jetstream" else None
        self._recording = telemetry.recording(tracer)
        self._started = False
        self._loading = False  # start's first load of the store's undelivered rows

    async def start(self) -> None:
        """Start sending: every undelivered row in the store first (what was committed
        before ``start``, too), in the background, then rows as they are notified."""
        if self._stream is not None:
            await self._stream.start()
        self._started = self._loading = True
        self._idle.clear()  # ``flush`` waits for the rows being loaded, too
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="outbox-sweep")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self._owner.shutdown()
        if self._stream is not None:
            await self._stream.stop()

    def notify(self, row: OutboxRow) -> None:
        """Queue a committed row for delivery (duplicates are ignored). Before
        :meth:`start` nothing is queued: ``start`` loads every undelivered row from the
        store (the node's recovery writes thousands after a long stop, and sending each
        at once slowed the start-up down)."""
        key = (row.execution_id, row.seq)
        if not self._started or key in self._known or row.delivered:
            return
        self._known.add(key)
        queue = self._queues.get(row.execution_id)
        if queue is not None:
            queue.append(row)
            return
        self._queues[row.execution_id] = deque([row])
        self._idle.clear()
        self._owner.spawn(self._deliver(row.execution_id), name=f"outbox {row.execution_id}")

    async def resend_all(self) -> None:
        """Re-send every undelivered row, parked ones included (after reconnect/restart)."""
        await self.store.unpark_all()
        await self._load()

    async def _load(self) -> None:
        rows = await self.store.pending_outbox(limit=100_000)
        for row in sorted(rows, key=lambda r: (r.execution_id, r.seq)):
            if not row.parked:
                self.notify(row)

    async def _sweep(self) -> None:
        """Every undelivered row left from before ``start`` (parked ones too; tried again
        until the store answers), then a safety net: pick up rows whose notify was lost
        (e.g. a cancelled writer)."""
        resent = False
        while True:
            try:
                if resent:
                    await self._load()
                else:
                    await self.resend_all()
                    resent = True
            except Exception as exc:
                log.warning("outbox: loading the undelivered callbacks failed: %r", exc)
            finally:
                if self._loading:
                    self._loading = False
                    if not self._queues:
                        self._idle.set()
            await asyncio.sleep(SWEEP_INTERVAL)

    async def flush(self, timeout: float) -> bool:
        """Wait until nothing is queued; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def _deliver(self, execution_id: str) -> None:
        queue = self._queues[execution_id]
        try:
            async with self._slots:
                while queue:
                    row = queue[0]
                    if not await self._send_with_retry(row):
                        # Parked: later rows of this execution wait for the next resend.
                        for left in queue:
                            self._known.discard((left.execution_id, left.seq))
                        queue.clear()
                        break
                    queue.popleft()
                    self._known.discard((row.execution_id, row.seq))
        finally:
            # After an error (the store could not record an attempt, say) the rows left
            # must be forgotten, or notify() skips them until the next restart.
            for left in self._queues.pop(execution_id, ()):
                self._known.discard((left.execution_id, left.seq))
            if not self._queues and not self._loading:
                self._idle.set()

    async def _send_with_retry(self, row: OutboxRow) -> bool:
        attempts = row.attempts
        while True:
            error, permanent = await self._send(row)
            if error is None:
                await self.store.mark_delivered(row.execution_id, row.seq)
                return True
            attempts += 1
            park = permanent or attempts >= self.max_attempts
            await self.store.record_attempt(row.execution_id, row.seq, error, park=park)
            if park:
                log.error(
                    "callback %s:%d parked after %d attempts: %s",
                    row.execution_id,
                    row.seq,
                    attempts,
                    error,
                )
                return False
            await asyncio.sleep(min(MAX_BACKOFF, 0.05 * 2**attempts))

    async def _send(self, row: OutboxRow) -> tuple[str | None, bool]:
        """Publish one row: (None, _) on success, else (error, permanent)."""
        span: Any = telemetry.NOTHING  # without spans, the headers carry the context
        if self._recording:
            attributes = {
                "messaging.destination.name": row.subject,
                "messaging.message.id": row.headers.get("Nats-Msg-Id", ""),
                "execution.id": row.execution_id,
            }
            template = row.subject.rsplit(".", 1)[-1]
            parent = telemetry.trace_headers(row.headers)
            span = telemetry.producer_span(self.tracer, template, parent, row.link, attributes)
        with span:
            try:
                if self._stream is not None:
                    await self._stream.publish(
                        row.subject, row.body, timeout=self.publish_timeout, headers=row.headers
                    )
                else:
                    await self.nc.publish(row.subject, row.body, headers=row.headers)
                    await self.nc.flush(timeout=max(1, round(self.publish_timeout)))
            except MaxPayloadError as exc:
                return f"{type(exc).__name__}: {exc}", True
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}", False
        return None, False
