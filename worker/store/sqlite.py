"""ExecutionStore on SQLite through aiosqlite: WAL, one writer connection, migrations.

Every operation is ONE plain function of a connection. Writes go to the writer
connection: with ``sync="normal"`` it is used on the event loop itself
(``sqlite_inline.InlineWriter``: a commit never waits for the disk there, and a lock held
by another process is waited out from a timer), with ``sync="full"`` in a thread of its
own (``sqlite_thread.WriterThread``: each commit waits for an fsync). Queries run on a
second, read-only connection in aiosqlite's thread (``Connection._execute``, private API:
pyproject pins aiosqlite <0.23), so that they never queue behind a waiting write. Nothing
awaits while a transaction is open.

Writes commit in groups: those queued together (in one turn of the loop, or while the
thread was busy; up to ``MAX_BATCH``) share one ``BEGIN IMMEDIATE … COMMIT``. A group
first runs without savepoints; if a write fails (lost compare-and-set, unknown id, a
builder that raises) it runs again with each write in its own SAVEPOINT, so that one is
rolled back alone and its caller gets its own answer (``sqlite_writer``). At rest a write
commits alone, at once; under load, one commit per group. An update starts from the
store's own copy of the execution when SQLite confirms, in the UPDATE itself, that the
copy is still exactly the stored document (``sqlite_ops.update``). An update may carry a
follow-on move (``UpdateRequest.then``: BidAccepted then RunStarted, ResultAccepted then
PublishStarted): each move is checked and gets its version and history row, and the row
is written once.

Checkpoints (``sqlite_wal``): PASSIVE on the reader's connection every half second, and
RESTART on the writer's when steady writes keep the WAL from being started over.

The rules themselves (Bacalhau's checks, the update, the cursor) are shared with
``MemoryStore`` (``worker.store.common``). Beside this module: ``migrate`` (opening the
file), ``sqlite_ops`` (the operations) with ``sqlite_rows`` (their SQL and rows), and
``sqlite_writer`` (the transactions a drain runs). An update's callback builder runs inside
the transaction, in the connection thread: it must stay pure.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

import aiosqlite

from worker.errors import StoreUnavailableError
from worker.states import TERMINAL
from worker.store import sqlite_ops as ops
from worker.store import sqlite_wal as wal
from worker.store.common import (
    Clock,
    check_limit,
    decode_cursor,
    to_us,
    utc,
    utc_now,
    validate_chain,
)
from worker.store.migrate import migrations, setup, setup_reader, split_statements
from worker.store.sqlite_inline import InlineWriter
from worker.store.sqlite_rows import (
    DOC,
    LIVE,
    OUTBOX_ROW,
    docs,
    is_unavailable,
    live_known,
    outbox_rows,
    store_error,
)
from worker.store.sqlite_thread import MAX_BATCH, WriterThread
from worker.store.sqlite_writer import Write
from worker.store.sqlite_writer import group_begun as _group  # looked up per batch: tests spy
from worker.store.types import (
    Execution,
    HistoryEntry,
    ListQuery,
    OutboxRow,
    OutboxStats,
    Tombstone,
    UpdateRequest,
    UpdateResult,
)

__all__ = [
    "MAX_BATCH",
    "SqliteStore",
    "is_unavailable",
    "migrations",
    "split_statements",
    "store_error",
]

P = ParamSpec("P")
T = TypeVar("T")

_PRAGMA_NAME = re.compile(r"^[a-z_]+$")


async def _in_thread(
    db: aiosqlite.Connection,
    fn: Callable[Concatenate[sqlite3.Connection, P], T],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """``fn(conn, *args, **kwargs)`` in the connection's thread: one hop, typed."""
    result: T = await db._execute(fn, db._conn, *args, **kwargs)  # type: ignore[no-untyped-call]
    return result


LATEST_MAX = 100_000  # executions whose last written version is kept (see ``_latest``)


def _group_now(conn: sqlite3.Connection, batch: list[Write]) -> None:
    _group(conn, batch)  # the module's name at call time (tests replace it)


class SqliteStore:
    """``ExecutionStore`` in one SQLite file (WAL; ``sync="full"`` survives power loss too).

    ``synchronous=NORMAL`` may lose the last commits on power loss, never on a process
    crash, and never corrupts the file.
    """

    def __init__(
        self,
        path: Path,
        *,
        sync: Literal["normal", "full"] = "normal",
        busy_timeout: float = 5.0,
        clock: Clock = utc_now,
    ) -> None:
        if sync not in ("normal", "full"):
            raise ValueError(f"sync must be 'normal' or 'full', got {sync!r}")
        if busy_timeout < 0:
            raise ValueError(f"busy_timeout must be >= 0, got {busy_timeout}")
        self._path = Path(path)
        self._sync = sync
        self._busy_ms = round(busy_timeout * 1000)
        self._clock = clock
        self._db: WriterThread | InlineWriter | None = None
        # Queries have a connection of their own: in WAL they never wait for a lock, so
        # they must not queue in the writer's thread behind a write waiting out busy_timeout.
        self._reader: aiosqlite.Connection | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self.restarts = wal.Restarts()  # ``with store.restarts.held():`` a burst of writes
        # Live executions per (requester, job): a new job's ask (the common case) learns
        # that it has none without a thread hop. It may over-count for a moment (then the
        # query answers), never under-count: +1 before a create, -1 once a move is terminal.
        self._live: Counter[tuple[str, str]] = Counter()
        # The last version this store wrote of each live execution, with its ``ord`` and
        # job: an update starts from it instead of reading and decoding the row, if it still
        # encodes to the stored row (``sqlite_ops.update`` checks that). Terminal ones leave.
        self._latest: dict[str, ops.Known] = {}
        self._ords = ops.Ords()

    @property
    def path(self) -> Path:
        return self._path

    async def open(self) -> None:
        if self._db is not None:
            return
        scripts = migrations()
        loop = asyncio.get_running_loop()
        db: WriterThread | InlineWriter
        if self._sync == "normal":
            db = InlineWriter(self._path, loop, busy_timeout=self._busy_ms / 1000, group=_group_now)
        else:
            db = WriterThread(self._path, loop, group=_group_now)
        try:
            await db.start()
            try:
                await db.call(setup, self._sync, self._busy_ms, scripts)
                await db.ready()
            except BaseException:
                await db.stop()
                raise
        except sqlite3.Error as exc:
            raise store_error(exc) from exc
        self._db = db
        reader = aiosqlite.connect(self._path, isolation_level=None)
        await reader
        await _in_thread(reader, setup_reader, self._busy_ms)
        self._reader = reader
        self._checkpointer = asyncio.get_running_loop().create_task(
            wal.checkpoints(self._passive_checkpoint, self._restart_checkpoint)
        )
        rows = await self._run(
            lambda c: c.execute(f"SELECT requester, job_id FROM executions WHERE {LIVE}").fetchall()
        )
        self._live = Counter((r, j) for r, j in rows)

    async def _passive_checkpoint(self) -> int:  # on the reader's connection: WAL frames
        reader = self._reader
        return 0 if reader is None else (await _in_thread(reader, wal.passive_checkpoint))[1]

    async def _restart_checkpoint(self, frames: int) -> None:  # on the writer's, writes wait
        if self._db is not None and self.restarts.allows(frames):
            await self._db.call(wal.restart_checkpoint)

    async def close(self) -> None:
        self._latest.clear()
        task, self._checkpointer = self._checkpointer, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.close()
        db, self._db = self._db, None
        if db is None:
            return
        try:
            await db.call(ops.optimize)
        except sqlite3.Error:
            pass  # closing matters more than the planner statistics
        finally:
            await db.stop()

    async def pragma(self, name: str) -> Any:
        """The value of ``PRAGMA name`` on the store's connection (diagnostics and tests:
        ``synchronous``, ``journal_mode``, ``integrity_check``, ``user_version`` …)."""
        if not _PRAGMA_NAME.match(name):
            raise ValueError(f"not a pragma name: {name!r}")
        row = await self._run(lambda c: c.execute(f"PRAGMA {name}").fetchone())
        return row[0] if row is not None else None

    async def _run(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """``fn(conn, *args, **kwargs)`` in the writer's thread, alone, outside any
        transaction (set-up, pragmas, diagnostics)."""
        db = self._db
        if db is None:
            raise StoreUnavailableError("execution store is not open")
        try:
            return await db.call(lambda conn: fn(conn, *args, **kwargs))
        except sqlite3.Error as exc:
            raise store_error(exc) from exc

    async def _read(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """A query, on the reader connection (the writer's before open() made one)."""
        reader = self._reader
        if reader is None:
            return await self._run(fn, *args, **kwargs)
        try:
            return await _in_thread(reader, fn, *args, **kwargs)
        except sqlite3.Error as exc:
            raise store_error(exc) from exc

    async def _write(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """``fn`` inside a committed transaction (grouped with concurrent writes), one hop."""

        def op(conn: sqlite3.Connection) -> T:
            return fn(conn, *args, **kwargs)

        db = self._db
        if db is None:
            raise StoreUnavailableError("execution store is not open")
        try:
            return await db.write(op)
        except sqlite3.Error as exc:
            raise store_error(exc) from exc

    async def create_execution(self, execution: Execution, *, comment: str = "") -> Execution:
        key = (execution.requester, execution.job_id)
        self._live[key] += 1
        try:
            stored = await self._write(ops.create, execution, comment, self._ords)
        except BaseException:
            self._forget(key)
            raise
        self._remember(stored)
        return stored[0]

    def _remember(self, known: ops.Known) -> None:
        execution = known[0]
        if execution.state in TERMINAL:
            self._latest.pop(execution.id, None)
            return
        if len(self._latest) >= LATEST_MAX:  # only a bound: a miss costs one query
            self._latest.clear()
        self._latest[execution.id] = known

    def _forget(self, key: tuple[str, str]) -> None:
        self._live[key] -= 1
        if self._live[key] <= 0:
            del self._live[key]

    async def get_execution(self, execution_id: str) -> Execution:
        return await self._read(ops.get, execution_id)

    async def get_executions_for_job(self, job_id: str) -> list[Execution]:
        return await self._read(
            docs, f"SELECT {DOC} FROM executions WHERE job_id = ? ORDER BY ord", (job_id,)
        )

    async def find_active(self, requester: str, job_id: str) -> Execution | None:
        if (requester, job_id) not in self._live:
            return None
        return await self._read(ops.find_active, requester, job_id)

    async def get_history(self, execution_id: str) -> list[HistoryEntry]:
        return await self._read(ops.history, execution_id)

    async def update(self, request: UpdateRequest) -> UpdateResult:
        changes = validate_chain(request)
        known = self._latest.get(request.execution_id)
        now = utc(self._clock())
        try:
            stored, row, first = await self._write(ops.update, request, changes, now, known)
        except BaseException:
            self._latest.pop(request.execution_id, None)
            raise
        self._remember(stored)
        after = stored[0]
        if after.state in TERMINAL:
            self._forget((after.requester, after.job_id))
        return UpdateResult(after, row, None if first is after else first)

    async def live_executions(self) -> list[Execution]:
        found = await self._read(live_known)
        for known in found:  # the store's copies now, unless it wrote one since (see update)
            if known[0].id not in self._latest:
                self._remember(known)
        return [known[0] for known in found]

    async def list_executions(self, query: ListQuery) -> tuple[list[Execution], str]:
        check_limit(query.limit)
        after = decode_cursor(query.cursor) if query.cursor else None
        return await self._read(ops.list_page, query, after)

    async def get_callbacks(self, execution_id: str) -> list[OutboxRow]:
        return await self._read(
            outbox_rows,
            "execution_ord = (SELECT ord FROM executions WHERE id = ?) ORDER BY seq",
            (execution_id,),
        )

    async def pending_outbox(self, limit: int = 1000) -> list[OutboxRow]:
        check_limit(limit)
        return await self._read(
            outbox_rows, "delivered = 0 ORDER BY created_us, seq, execution_id LIMIT ?", (limit,)
        )

    async def mark_delivered(self, execution_id: str, seq: int) -> None:
        await self._write(
            ops.changed_rows,
            f"UPDATE outbox SET delivered = 1, parked = 0 WHERE {OUTBOX_ROW}",
            (execution_id, seq),
        )

    async def record_attempt(self, execution_id: str, seq: int, error: str, *, park: bool) -> None:
        await self._write(
            ops.changed_rows,
            "UPDATE outbox SET attempts = attempts + 1, last_error = ?, parked = (parked OR ?)"
            f" WHERE {OUTBOX_ROW} AND delivered = 0",
            (error, park, execution_id, seq),
        )

    async def unpark_all(self) -> int:
        return await self._write(
            ops.changed_rows,
            "UPDATE outbox SET parked = 0, attempts = 0 WHERE parked = 1 AND delivered = 0",
        )

    async def outbox_stats(self) -> OutboxStats:
        return await self._read(ops.outbox_stats)

    async def get_tombstone(self, execution_id: str) -> Tombstone | None:
        return await self._read(ops.tombstone, execution_id)

    async def purge(self, terminal_before: datetime, tombstones_before: datetime) -> list[str]:
        now = to_us(utc(self._clock()))
        return await self._write(ops.purge, to_us(terminal_before), to_us(tombstones_before), now)

    async def delete_execution(self, execution_id: str) -> None:
        # ON DELETE CASCADE removes the history and outbox rows in the same statement.
        self._latest.pop(execution_id, None)
        await self._write(ops.changed_rows, "DELETE FROM executions WHERE id = ?", (execution_id,))

    async def count(self) -> int:
        return await self._read(
            lambda c: int(c.execute("SELECT count(*) FROM executions").fetchone()[0])
        )
