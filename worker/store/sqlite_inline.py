"""The SQLite writer on the event loop itself, for ``sync=normal``: no thread hop per write.

With ``synchronous=NORMAL`` in WAL mode a commit writes the WAL pages to the page cache
and never waits for the disk (checkpoints, which do, run on the reader's thread), so a
transaction costs tens of microseconds of CPU. A round trip to a writer thread cost
~90 µs of wake-ups on this kind of machine, and every GIL hand-off to that thread stalled
the loop: under load the loop paid more for the hops than for the SQL.

Writes queued during one turn of the loop are committed together at the start of the
next (``call_soon``): one ``BEGIN IMMEDIATE … COMMIT`` per group, as ``WriterThread``
does. The one thing that could block the loop, a lock held by another process, never
does: the connection's own busy timeout is 0 and a busy ``BEGIN`` is retried from a
timer, with back-off, until the store's ``busy_timeout`` has passed, then fails. *Calls*
(set-up, pragmas, ``optimize``) run in a worker thread, and writes wait for them.

``sync=full`` keeps ``WriterThread``: there each commit waits for an fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from worker.store.sqlite_thread import MAX_BATCH, Job, complete
from worker.store.sqlite_writer import group_begun

T = TypeVar("T")

__all__ = ["InlineWriter"]

# Back-off between tries of a busy BEGIN (SQLite's own busy handler sleeps about so).
_BUSY_DELAYS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05)


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return bool(code & 0xFF == sqlite3.SQLITE_BUSY)
    return "database is locked" in str(exc)


class InlineWriter:
    """The store's writer connection, written on the loop; same interface as
    ``WriterThread`` (``start``, ``ready``, ``call``, ``write``, ``stop``)."""

    def __init__(
        self,
        path: Path,
        loop: asyncio.AbstractEventLoop,
        *,
        busy_timeout: float,
        group: Callable[[sqlite3.Connection, list[Any]], None] | None = None,
    ) -> None:
        self._path = path
        self._loop = loop
        self._busy_timeout = busy_timeout
        self._group = group or group_begun  # runs a batch once BEGIN is done
        self._conn: sqlite3.Connection | None = None
        self._pending: deque[Job] = deque()
        self._scheduled = False
        self._busy_since: float | None = None
        self._busy_tries = 0
        self._calls = 0  # calls running in a thread: the connection is theirs meanwhile
        self._idle = True  # writes come one at a time: commit each at once (``write``)
        self._call_lock = asyncio.Lock()
        self._stopped = False

    async def start(self) -> None:
        self._conn = await asyncio.to_thread(
            sqlite3.connect,
            self._path,
            isolation_level=None,
            check_same_thread=False,
            cached_statements=256,
        )

    async def ready(self) -> None:
        """After set-up: the connection never waits on a lock itself (see the module)."""
        await self.call(lambda conn: conn.execute("PRAGMA busy_timeout = 0"))

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, *args)`` alone, outside any transaction, in a worker thread."""
        if self._stopped or self._conn is None:
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
        conn = self._conn
        async with self._call_lock:
            self._calls += 1
            done = asyncio.ensure_future(asyncio.to_thread(fn, conn, *args))
            try:
                return await asyncio.shield(done)
            except asyncio.CancelledError:
                # The thread goes on using the connection (a RESTART checkpoint when the
                # store closes, say): it stays the thread's, this call holding the lock,
                # until it is done. Closing it under the thread crashed the process.
                while not done.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait({done})
                if not done.cancelled():
                    done.exception()  # retrieved: the caller gave up on the result
                raise
            finally:
                self._calls -= 1
                if self._pending:
                    self._schedule()

    async def write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """``op(conn)`` inside a committed transaction, grouped with this turn's writes."""
        if self._stopped:
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
        future: asyncio.Future[T] = self._loop.create_future()
        self._pending.append(Job(op, future, False))
        if self._idle and not self._scheduled and not self._calls and self._busy_since is None:
            # Nothing else is being written: commit now, in this turn, and the caller
            # goes on without waiting for the loop (the bid round trip at rest). A
            # second write in this turn ends this until the writes come one by one again.
            self._idle = False
            self._loop.call_soon(self._turn_over)
            self._flush(now=True)
        else:
            self._schedule()
        return await future

    def _turn_over(self) -> None:
        self._idle = not self._scheduled and not self._pending

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        async with self._call_lock:  # no call is using the connection
            self._busy_since = None
            self._flush(final=True)
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    # -- committing ------------------------------------------------------------------------
    def _schedule(self, delay: float = 0.0) -> None:
        if self._scheduled:
            return
        self._scheduled = True
        if delay:
            self._loop.call_later(delay, self._flush)
        else:
            self._loop.call_soon(self._flush)

    def _flush(self, final: bool = False, now: bool = False) -> None:
        self._scheduled = False
        if (self._calls and not final) or not self._pending:
            return  # a call holds the connection; its end schedules this again
        conn = self._conn
        if conn is None:
            self._fail_all(sqlite3.ProgrammingError("Cannot operate on a closed database."))
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if _is_busy(exc) and not final and self._retry_later():
                return
            self._busy_since = None
            self._fail_batch(exc)
        else:
            self._busy_since = None
            batch = self._take()
            self._group(conn, batch)
            complete(batch)
            if len(batch) == 1 and not self._pending and not now:
                self._idle = True  # a deferred group of one: the writes are sparse again
        if self._pending:
            if final:
                self._flush(final=True)
            else:
                self._schedule()

    def _retry_later(self) -> bool:
        """Another connection holds the write lock: try again soon, unless the store's
        busy timeout has passed (then the writes fail, as SQLite's busy handler would)."""
        now = time.monotonic()
        if self._busy_since is None:
            self._busy_since, self._busy_tries = now, 0
        if now - self._busy_since >= self._busy_timeout:
            return False
        delay = _BUSY_DELAYS[min(self._busy_tries, len(_BUSY_DELAYS) - 1)]
        self._busy_tries += 1
        self._schedule(min(delay, max(0.0, self._busy_since + self._busy_timeout - now)) or 1e-4)
        return True

    def _take(self) -> list[Job]:
        batch: list[Job] = []
        while self._pending and len(batch) < MAX_BATCH:
            batch.append(self._pending.popleft())
        return batch

    def _fail_batch(self, exc: BaseException) -> None:
        batch = self._take()
        for job in batch:
            job.error = exc
        complete(batch)

    def _fail_all(self, exc: BaseException) -> None:
        while self._pending:
            self._fail_batch(exc)
