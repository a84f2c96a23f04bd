"""The SQLite writer connection's own thread: group commit with one wake-up per batch.

Every write of the store goes through one ``sqlite3`` connection owned by this thread.
The event loop appends a job to a deque and sets an event; the thread takes every queued
job (up to ``MAX_BATCH`` writes) into one transaction (``sqlite_writer.group_begun``), then
hands the whole batch back to the loop with ONE ``call_soon_threadsafe``. aiosqlite, used
before, paid a queue hand-off, a future and a loop wake-up per call even when a drain had
already done the work; under load that bookkeeping cost as much as the SQL.

A *call* (``call``) runs alone, outside any transaction, in queue order: set-up, pragmas,
``optimize`` at close. A *write* (``write``) runs inside a transaction, grouped with the
writes queued beside it. Nothing is dropped: a job whose caller stopped waiting
(cancelled) still runs, and its outcome is discarded. Used for ``sync="full"``;
``sqlite_inline.InlineWriter`` is the same interface on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from worker.store.sqlite_writer import Write, group_begun

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BATCH = 256

__all__ = ["MAX_BATCH", "Job", "WriterThread", "complete"]


class Job(Write):
    """A write (grouped, in a transaction) or a call (alone, no transaction)."""

    __slots__ = ("future", "raw")

    def __init__(
        self, op: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any], raw: bool
    ) -> None:
        super().__init__(op)
        self.future = future
        self.raw = raw


_STOP = object()


def complete(batch: list[Job]) -> None:
    """On the loop: every job's outcome to its caller (one callback per batch)."""
    for job in batch:
        future = job.future
        if future.done():  # the caller was cancelled; the job ran all the same
            continue
        if job.error is not None:
            future.set_exception(job.error)
        else:
            future.set_result(job.result)


class WriterThread:
    """One SQLite connection and the thread that runs everything on it."""

    def __init__(
        self,
        path: Path,
        loop: asyncio.AbstractEventLoop,
        *,
        group: Callable[[sqlite3.Connection, list[Any]], None] | None = None,
    ) -> None:
        self._path = path
        self._loop = loop
        self._group = group or group_begun  # runs a batch once BEGIN is done
        self._queue: deque[Job | object] = deque()
        self._wake = threading.Event()
        self._conn: sqlite3.Connection | None = None
        self._thread = threading.Thread(target=self._main, name="store-writer", daemon=True)
        self._stopped = False

    # -- the loop's side ------------------------------------------------------------------
    async def ready(self) -> None:
        """After set-up (nothing to change: this thread may wait out the busy timeout)."""

    async def start(self) -> None:
        """Open the connection in the thread; raises what ``sqlite3.connect`` raised."""
        self._thread.start()
        try:
            await self.call(self._connect)
        except BaseException:
            await self.stop()
            raise

    def _connect(self, _: Any) -> None:
        self._conn = sqlite3.connect(
            self._path, isolation_level=None, check_same_thread=False, cached_statements=256
        )

    def _submit(self, op: Callable[[sqlite3.Connection], Any], raw: bool) -> asyncio.Future[Any]:
        if self._stopped:
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
        future = self._loop.create_future()
        self._queue.append(Job(op, future, raw))
        self._wake.set()
        return future

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, *args)`` alone, outside any transaction."""
        result: T = await self._submit(lambda conn: fn(conn, *args), True)
        return result

    async def write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """``op(conn)`` inside a committed transaction, grouped with concurrent writes."""
        result: T = await self._submit(op, False)
        return result

    async def stop(self) -> None:
        """Run what is queued, close the connection, end the thread."""
        if self._stopped:
            return
        self._stopped = True
        self._queue.append(_STOP)
        self._wake.set()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)

    # -- the thread's side -----------------------------------------------------------------
    def _main(self) -> None:
        queue = self._queue
        while True:
            self._wake.wait()
            self._wake.clear()
            while queue:
                head = queue[0]
                if head is _STOP:
                    queue.popleft()
                    self._close()
                    return
                batch: list[Job] = []
                if isinstance(head, Job) and head.raw:
                    batch.append(queue.popleft())  # type: ignore[arg-type]
                    self._run_call(batch[0])
                else:
                    while queue and len(batch) < MAX_BATCH:
                        job = queue[0]
                        if job is _STOP or (isinstance(job, Job) and job.raw):
                            break
                        batch.append(queue.popleft())  # type: ignore[arg-type]
                    self._run_writes(batch)
                self._hand_back(batch)

    def _run_call(self, job: Job) -> None:
        try:
            job.result = job.op(self._conn)  # type: ignore[arg-type]
        except BaseException as exc:
            job.error = exc

    def _run_writes(self, batch: list[Job]) -> None:
        conn = self._conn
        if conn is None:
            error = sqlite3.ProgrammingError("the store's connection is not open")
            for job in batch:
                job.error = error
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except BaseException as exc:  # locked, full, I/O: nothing ran
            for job in batch:
                job.error = exc
            return
        self._group(conn, batch)

    def _hand_back(self, batch: list[Job]) -> None:
        try:
            self._loop.call_soon_threadsafe(complete, batch)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            log.debug("store writer: loop closed, %d outcomes dropped", len(batch))

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
