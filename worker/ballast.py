"""Disk-full and locked-store guard: a ballast file, and a store that spends it.

A node whose disk fills up must still be able to finish what it started (issue 4,
PROTOCOL.md §3/§9): cancels, timeouts and terminal moves have to commit, with their
callbacks, while new work is declined with ``store unavailable`` (Retryable).

- :class:`Ballast` keeps ``size`` bytes of real, allocated space in a file of the data
  dir. It is (re)created only while the filesystem has at least ``size`` bytes free on top
  of it, so space given back is not taken again at once.
- :class:`GuardedStore` is the SQLite store with that policy:

  * a state change or outbox bookkeeping that fails with SQLITE_FULL releases the ballast
    and is tried once more, so it commits in the space given back;
  * creating an execution (an ask) never spends the ballast: it fails, and the ask is
    declined;
  * after any write failed for want of space or a lock, ``available()`` is False — the
    bidder's ``store_available`` hook then declines asks at once, without waiting on the
    store — and further writes fail at once (a 503, or a retry by their caller) instead of
    each holding the one writer thread for the busy timeout; only state changes still try
    on a full disk, where the ballast may pay for them;
  * ``maintain()`` (which must run) probes the store alone and reopens it once it is
    writable again (and the ballast back in place): the node recovers by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Literal, TypeVar

from worker.errors import StoreUnavailableError
from worker.store.sqlite import SqliteStore
from worker.store.types import Execution, UpdateRequest, UpdateResult

log = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], datetime]

DEFAULT_BALLAST = 8 * 1024 * 1024
_CHUNK = 1024 * 1024
_FULL_TEXT = "database or disk is full"


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still use on ``directory``'s filesystem."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) is SQLite's SQLITE_FULL or ENOSPC."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sqlite3.Error):
            code = getattr(current, "sqlite_errorcode", None)
            if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
                return True
        if isinstance(current, OSError) and current.errno == 28:  # ENOSPC
            return True
        if _FULL_TEXT in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


class Ballast:
    """``size`` bytes of allocated space in ``path``, given back on demand."""

    def __init__(self, path: Path, *, size: int = DEFAULT_BALLAST) -> None:
        if size <= 0:
            raise ValueError(f"ballast size must be positive, got {size}")
        self.path = Path(path)
        self.size = size

    @property
    def present(self) -> bool:
        try:
            return self.path.stat().st_size >= self.size
        except FileNotFoundError:
            return False

    def ensure(self) -> bool:
        """Create the ballast if it is missing and there is room for it and as much again.

        Blocking (run it in a thread from async code). True when the ballast is in place.
        """
        if self.present:
            return True
        directory = self.path.parent
        if free_bytes(directory) < 2 * self.size:
            return False
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                zeros = b"\0" * _CHUNK
                left = self.size
                while left > 0:  # real writes: a sparse file would reserve nothing
                    left -= os.write(fd, zeros[: min(_CHUNK, left)])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.warning("could not create the ballast %s: %s", self.path, exc)
            return False
        return True

    def release(self) -> bool:
        """Give the space back; True when there was a ballast to give."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True


def _probe(conn: sqlite3.Connection) -> None:
    """An empty write transaction: proves the write lock can be taken."""


class GuardedStore(SqliteStore):
    """``SqliteStore`` that spends a ballast on disk full and reports its own health."""

    def __init__(
        self,
        path: Path,
        *,
        ballast: Ballast | None,
        sync: Literal["normal", "full"] = "normal",
        busy_timeout: float = 5.0,
        clock: Clock | None = None,
    ) -> None:
        if clock is None:
            super().__init__(path, sync=sync, busy_timeout=busy_timeout)
        else:
            super().__init__(path, sync=sync, busy_timeout=busy_timeout, clock=clock)
        self.ballast = ballast
        self.unavailable_reason = ""  # why writes failed last; "" while they work
        self._full = False  # that reason was a full disk: only ``maintain`` clears it
        # Whether the ballast was in place when last looked at: set by ``prepare``,
        # ``maintain`` (every interval) and a release, so an ask costs no stat() call.
        self._ballast_ok = ballast is None

    # -- health ---------------------------------------------------------------------------
    def available(self) -> bool:
        """Whether new work may be taken (the bidder's ``store_available``)."""
        return not self.unavailable_reason and self._ballast_ok

    async def prepare(self) -> None:
        """Put the ballast in place (call once the data dir is locked)."""
        if self.ballast is None:
            return
        self._ballast_ok = await asyncio.to_thread(self.ballast.ensure)
        if not self._ballast_ok:
            log.warning(
                "no room for the %d-byte ballast in %s: new work is declined until there is",
                self.ballast.size,
                self.ballast.path.parent,
            )

    async def maintain(self, interval: float = 1.0) -> None:
        """Forever: while unavailable, check whether the store can take writes again."""
        while True:
            await asyncio.sleep(interval)
            if self.ballast is not None:
                self._ballast_ok = self.ballast.present  # removed by hand, say
            if not self.available() and await self.writable():
                log.info("execution store writable again: taking new work")
                self.unavailable_reason = ""
                self._full = False

    async def writable(self) -> bool:
        """Whether the store can take new work now (ballast in place, room, no lock)."""
        if self.ballast is not None:
            self._ballast_ok = await asyncio.to_thread(self.ballast.ensure)
            if not self._ballast_ok:
                return False
            if free_bytes(self.ballast.path.parent) < self.ballast.size:
                return False  # the ballast is back but the disk is as good as full
        try:
            await self._write(_probe)
        except StoreUnavailableError:
            return False
        return True

    # -- the guarded writes ---------------------------------------------------------------
    async def _guard(self, op: Callable[[], Awaitable[T]], *, spend_ballast: bool) -> T:
        if self.unavailable_reason and not (self._full and spend_ballast):
            # Known down: fail at once (a 503, a decline, a retry later). Waiting out the
            # busy timeout here would hold the one writer thread for seconds per call;
            # ``maintain`` alone waits on the store and reopens it.
            raise StoreUnavailableError(self.unavailable_reason)
        try:
            result = await op()
        except StoreUnavailableError as exc:
            full = is_disk_full(exc)
            self.unavailable_reason = exc.message
            self._full = self._full or full
            if not (spend_ballast and full and self.ballast is not None):
                raise
            self._ballast_ok = False
            if not await asyncio.to_thread(self.ballast.release):
                raise
            log.warning(
                "disk full: released the %d-byte ballast so a state change can commit; "
                "new work is declined until there is room again",
                self.ballast.size,
            )
            result = await op()
        if self.unavailable_reason and not self._full:
            self.unavailable_reason = ""  # a write committed: the lock has gone
        return result

    async def create_execution(self, execution: Execution, *, comment: str = "") -> Execution:
        op = partial(SqliteStore.create_execution, self, execution, comment=comment)
        return await self._guard(op, spend_ballast=False)

    async def update(self, request: UpdateRequest) -> UpdateResult:
        return await self._guard(partial(SqliteStore.update, self, request), spend_ballast=True)

    async def mark_delivered(self, execution_id: str, seq: int) -> None:
        op = partial(SqliteStore.mark_delivered, self, execution_id, seq)
        await self._guard(op, spend_ballast=True)

    async def record_attempt(self, execution_id: str, seq: int, error: str, *, park: bool) -> None:
        op = partial(SqliteStore.record_attempt, self, execution_id, seq, error, park=park)
        await self._guard(op, spend_ballast=True)

    async def unpark_all(self) -> int:
        return await self._guard(partial(SqliteStore.unpark_all, self), spend_ballast=True)

    async def purge(self, terminal_before: datetime, tombstones_before: datetime) -> list[str]:
        op = partial(SqliteStore.purge, self, terminal_before, tombstones_before)
        return await self._guard(op, spend_ballast=False)
