"""ExecutionStore on SQLite through aiosqlite: WAL, one writer connection, migrations.

Every operation is ONE plain function run in aiosqlite's connection thread with
``Connection._execute`` (private API: pyproject pins aiosqlite <0.23), so each costs one
thread hop; calls on the one connection run one after another and nothing awaits while a
transaction is open.

Writes commit in groups. A write appends its operation to a queue and submits a *drain*;
the first drain to run takes every queued operation (up to ``MAX_BATCH``) into one
``BEGIN IMMEDIATE … COMMIT``, each operation inside its own SAVEPOINT, so one that fails
(lost compare-and-set, unknown id, a builder that raises) is rolled back alone and its
caller gets its own answer; later drains find the queue empty and return at once. A lone
write is a plain transaction. Since a drain is queued after its operation and drains run
in order, an operation is always done when its caller's drain returns. Idle, this is one
commit per write; under load, one commit per batch (≈2× the writes/s).

The rules themselves (Bacalhau's checks, the update, the cursor) are shared with
``MemoryStore`` (``worker.store.memory``). An update's callback builder runs inside the
transaction, in the connection thread: it must stay pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from collections import Counter, deque
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

import aiosqlite
import msgspec

from schemas.compute import ExecutionState
from worker.errors import AlreadyExistsError, ExecutionNotFound, StoreError, StoreUnavailableError
from worker.states import TERMINAL
from worker.store.memory import (
    Clock,
    apply_update,
    check_limit,
    creation_history,
    decode_cursor,
    decode_execution,
    encode_cursor,
    encode_execution,
    from_us,
    normalize,
    to_us,
    utc,
    utc_now,
    validate_changes,
    validate_new,
)
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

P = ParamSpec("P")
T = TypeVar("T")

# Primary result codes that mean "the store cannot write now", not "this request is wrong".
_UNAVAILABLE_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
    }
)
_UNAVAILABLE_TEXTS = ("database or disk is full", "database is locked", "readonly database")

# Must match the WHERE of the partial indexes in 0001_init.sql word for word.
_LIVE = "state NOT IN ('Completed', 'Failed', 'Cancelled')"
_TERMINAL = "state IN ('Completed', 'Failed', 'Cancelled')"
_OUTBOX_COLUMNS = (
    "execution_id, seq, subject, kind, body, headers, created_us, attempts, parked, delivered,"
    " last_error, link"
)

_PRAGMA_NAME = re.compile(r"^[a-z_]+$")

_headers_encoder = msgspec.json.Encoder()
_headers_decoder = msgspec.json.Decoder(dict[str, str])


def is_unavailable(exc: sqlite3.Error) -> bool:
    """True for disk-full, locked, read-only and I/O errors (→ ``StoreUnavailableError``)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _UNAVAILABLE_CODES
    text = str(exc)
    return any(t in text for t in _UNAVAILABLE_TEXTS)


def store_error(exc: sqlite3.Error) -> StoreError:
    """The node's error for a SQLite one: 503 when it may pass, 500 otherwise."""
    if is_unavailable(exc):
        return StoreUnavailableError(f"execution store unavailable: {exc}")
    return StoreError(f"execution store error: {exc}")


async def _in_thread(
    db: aiosqlite.Connection,
    fn: Callable[Concatenate[sqlite3.Connection, P], T],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """``fn(conn, *args, **kwargs)`` in the connection's thread: one hop, typed."""
    result: T = await db._execute(fn, db._conn, *args, **kwargs)  # type: ignore[no-untyped-call]
    return result


# --- migrations --------------------------------------------------------------------------

_MIGRATION_NAME = re.compile(r"^(\d{4})_[A-Za-z0-9_]+\.sql$")


@cache
def migrations() -> tuple[tuple[int, str], ...]:
    """(number, script) of every ``migrations/NNNN_*.sql``, numbered 1, 2, … without gaps."""
    found: list[tuple[int, str]] = []
    for entry in resources.files("worker.store").joinpath("migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text(encoding="utf-8")))
    found.sort()
    if [n for n, _ in found] != list(range(1, len(found) + 1)):
        raise StoreError(f"migrations are not numbered 1..N: {[n for n, _ in found]}")
    return tuple(found)


def split_statements(script: str) -> list[str]:
    """The statements of a script (``executescript`` would COMMIT our transaction)."""
    statements: list[str] = []
    start = 0
    for i, char in enumerate(script):
        if char == ";" and sqlite3.complete_statement(script[start : i + 1]):
            statements.append(script[start : i + 1].strip())
            start = i + 1
    tail = [ln.strip() for ln in script[start:].splitlines()]
    if any(ln and not ln.startswith("--") for ln in tail):
        raise StoreError("migration ends with an incomplete statement")
    return statements


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _migrate(conn: sqlite3.Connection, scripts: Sequence[tuple[int, str]]) -> None:
    """Apply each migration newer than ``user_version``, each in its own transaction."""
    latest = scripts[-1][0] if scripts else 0
    current = _user_version(conn)
    if current > latest:
        raise StoreError(
            f"database schema version {current} is newer than this node supports ({latest})"
        )
    for number, script in scripts:
        if number <= current:
            continue

        def apply(c: sqlite3.Connection, number: int = number, script: str = script) -> None:
            if _user_version(c) >= number:  # another process got there first
                return
            for statement in split_statements(script):
                c.execute(statement)
            c.execute(f"PRAGMA user_version = {number}")

        _transaction(conn, apply)


def _setup(
    conn: sqlite3.Connection, sync: str, busy_ms: int, scripts: Sequence[tuple[int, str]]
) -> None:
    conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {sync.upper()}")
    conn.execute("PRAGMA foreign_keys = ON")
    _migrate(conn, scripts)


# --- transactions and rows ---------------------------------------------------------------


def _transaction(conn: sqlite3.Connection, op: Callable[[sqlite3.Connection], T]) -> T:
    """Run ``op`` inside BEGIN IMMEDIATE … COMMIT; roll back on any error (COMMIT's too)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = op(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):  # the original error says more
                conn.execute("ROLLBACK")
        raise
    return result


def _execution_params(e: Execution) -> tuple[Any, ...]:
    deadline = to_us(e.deadline) if e.deadline is not None else None
    return (
        e.job_id,
        e.requester,
        e.state.value,
        e.version,
        to_us(e.update_time),
        deadline,
        e.last_cause,
        encode_execution(e),
        e.id,
    )


def _insert_history(conn: sqlite3.Connection, h: HistoryEntry) -> None:
    conn.execute(
        "INSERT INTO history (execution_id, new_version, previous_state, new_state, cause,"
        " requester, comment, time_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            h.execution_id,
            h.new_version,
            h.previous_state.value,
            h.new_state.value,
            h.cause,
            h.requester,
            h.comment,
            to_us(h.time),
        ),
    )


def _outbox_row(r: tuple[Any, ...]) -> OutboxRow:
    return OutboxRow(
        execution_id=r[0],
        seq=r[1],
        subject=r[2],
        kind=r[3],
        body=bytes(r[4]),
        headers=_headers_decoder.decode(r[5]),
        created_at=from_us(r[6]),
        attempts=r[7],
        parked=bool(r[8]),
        delivered=bool(r[9]),
        last_error=r[10],
        link=_headers_decoder.decode(r[11]),
    )


def _docs(conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> list[Execution]:
    return [decode_execution(r[0]) for r in conn.execute(sql, params)]


# --- operations (each runs in the connection thread) -------------------------------------


def _create(conn: sqlite3.Connection, execution: Execution, comment: str) -> Execution:
    if conn.execute("SELECT 1 FROM executions WHERE id = ?", (execution.id,)).fetchone():
        raise AlreadyExistsError(f"execution already exists: {execution.id}")
    validate_new(execution)
    stored = normalize(execution)
    conn.execute(
        "INSERT INTO executions (job_id, requester, state, version, update_us, deadline_us,"
        " last_cause, doc, id, create_us, ord) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
        " (SELECT IFNULL(MAX(ord), 0) + 1 FROM executions))",
        (*_execution_params(stored), to_us(stored.create_time)),
    )
    _insert_history(conn, creation_history(stored, comment))
    return stored


def _update(
    conn: sqlite3.Connection, request: UpdateRequest, changes: dict[str, Any], now: datetime
) -> tuple[Execution, OutboxRow | None]:
    found = conn.execute(
        "SELECT doc FROM executions WHERE id = ?", (request.execution_id,)
    ).fetchone()
    if found is None:
        raise ExecutionNotFound(request.execution_id)
    after, entry, row = apply_update(decode_execution(found[0]), request, changes, now)
    conn.execute(
        "UPDATE executions SET job_id = ?, requester = ?, state = ?, version = ?, update_us = ?,"
        " deadline_us = ?, last_cause = ?, doc = ? WHERE id = ?",
        _execution_params(after),
    )
    _insert_history(conn, entry)
    if row is not None:
        conn.execute(
            f"INSERT INTO outbox ({_OUTBOX_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, 0, 0, 0, '', ?)",
            (
                row.execution_id,
                row.seq,
                row.subject,
                row.kind,
                row.body,
                _headers_encoder.encode(row.headers).decode(),
                to_us(row.created_at),
                _headers_encoder.encode(row.link).decode(),
            ),
        )
    return after, row


def _get(conn: sqlite3.Connection, execution_id: str) -> Execution:
    found = conn.execute("SELECT doc FROM executions WHERE id = ?", (execution_id,)).fetchone()
    if found is None:
        raise ExecutionNotFound(execution_id)
    return decode_execution(found[0])


def _find_active(conn: sqlite3.Connection, requester: str, job_id: str) -> Execution | None:
    found = _docs(
        conn,
        f"SELECT doc FROM executions WHERE requester = ? AND job_id = ? AND {_LIVE}"
        " ORDER BY update_us DESC, ord DESC LIMIT 1",
        (requester, job_id),
    )
    return found[0] if found else None


def _history(conn: sqlite3.Connection, execution_id: str) -> list[HistoryEntry]:
    rows = conn.execute(
        "SELECT previous_state, new_state, new_version, cause, requester, comment, time_us"
        " FROM history WHERE execution_id = ? ORDER BY new_version",
        (execution_id,),
    )
    return [
        HistoryEntry(
            execution_id=execution_id,
            previous_state=ExecutionState(r[0]),
            new_state=ExecutionState(r[1]),
            new_version=r[2],
            cause=r[3],
            requester=r[4],
            comment=r[5],
            time=from_us(r[6]),
        )
        for r in rows
    ]


def _list(
    conn: sqlite3.Connection, query: ListQuery, after: tuple[int, str] | None
) -> tuple[list[Execution], str]:
    where: list[str] = ["requester = ?"]
    params: list[Any] = [query.requester]
    if query.updated_since is not None:
        where.append("update_us >= ?")
        params.append(to_us(query.updated_since))
    if query.states:
        states = sorted({s.value for s in query.states})
        where.append(f"state IN ({', '.join('?' * len(states))})")
        params.extend(states)
    if after is not None:
        where.append("(update_us, id) > (?, ?)")
        params.extend(after)
    found = _docs(
        conn,
        f"SELECT doc FROM executions WHERE {' AND '.join(where)} ORDER BY update_us, id LIMIT ?",
        (*params, query.limit + 1),
    )
    page = found[: query.limit]
    more = len(found) > query.limit
    return page, encode_cursor(page[-1].update_time, page[-1].id) if more else ""


def _stats(conn: sqlite3.Connection) -> OutboxStats:
    pending, parked, oldest = conn.execute(
        "SELECT count(*), IFNULL(sum(parked), 0), min(created_us) FROM outbox WHERE delivered = 0"
    ).fetchone()
    return OutboxStats(
        pending=pending,
        parked=parked,
        oldest=from_us(oldest) if oldest is not None else None,
    )


def _tombstone(conn: sqlite3.Connection, execution_id: str) -> Tombstone | None:
    r = conn.execute(
        "SELECT id, job_id, requester, state, cause, deleted_us FROM tombstones WHERE id = ?",
        (execution_id,),
    ).fetchone()
    if r is None:
        return None
    return Tombstone(
        id=r[0],
        job_id=r[1],
        requester=r[2],
        state=ExecutionState(r[3]),
        cause=r[4],
        deleted_at=from_us(r[5]),
    )


def _purge(conn: sqlite3.Connection, cutoff_us: int, tombstones_us: int, now_us: int) -> list[str]:
    doomed = conn.execute(
        "SELECT id, job_id, requester, state, last_cause FROM executions AS e"
        f" WHERE {_TERMINAL} AND update_us < ? AND NOT EXISTS (SELECT 1 FROM outbox AS o"
        " WHERE o.execution_id = e.id AND o.delivered = 0) ORDER BY update_us, id",
        (cutoff_us,),
    ).fetchall()
    conn.executemany(
        "INSERT OR REPLACE INTO tombstones (id, job_id, requester, state, cause, deleted_us)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        [(*r, now_us) for r in doomed],
    )
    conn.executemany("DELETE FROM executions WHERE id = ?", [(r[0],) for r in doomed])
    conn.execute("DELETE FROM tombstones WHERE deleted_us < ?", (tombstones_us,))
    return [r[0] for r in doomed]


def _changes(conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> int:
    """One statement; the number of rows it changed."""
    return conn.execute(sql, params).rowcount


# --- group commit ------------------------------------------------------------------------

MAX_BATCH = 256


class _Write:
    """One queued write; ``result``/``error`` are set in the connection thread before the
    caller's drain returns."""

    __slots__ = ("error", "op", "result")

    def __init__(self, op: Callable[[sqlite3.Connection], Any]) -> None:
        self.op = op
        self.result: Any = None
        self.error: BaseException | None = None


def _drain(conn: sqlite3.Connection, queue: deque[_Write]) -> None:
    """Run every queued write (up to MAX_BATCH) in one transaction. Never raises: each
    write's outcome goes to its own ``_Write``."""
    batch: list[_Write] = []
    while queue and len(batch) < MAX_BATCH:
        batch.append(queue.popleft())
    if len(batch) == 1:
        write = batch[0]
        try:
            write.result = _transaction(conn, write.op)
        except BaseException as exc:
            write.error = exc
    elif batch:
        _group(conn, batch)


def _group(conn: sqlite3.Connection, batch: list[_Write]) -> None:
    kept: list[_Write] = []  # done in the open transaction
    try:
        conn.execute("BEGIN IMMEDIATE")
        for write in batch:
            conn.execute("SAVEPOINT write")
            try:
                write.result = write.op(conn)
            except BaseException as exc:
                write.error = exc
                if not conn.in_transaction:  # SQLite rolled everything back (e.g. disk full)
                    for lost in kept:
                        lost.result, lost.error = None, exc
                    kept.clear()
                    conn.execute("BEGIN IMMEDIATE")
                    continue
                conn.execute("ROLLBACK TO write")
            conn.execute("RELEASE write")
            if write.error is None:
                kept.append(write)
        conn.execute("COMMIT")
    except BaseException as exc:  # BEGIN, SAVEPOINT or COMMIT failed: nothing is kept
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        for write in batch:
            if write.error is None:
                write.result, write.error = None, exc


def _optimize(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA optimize")


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
        self._db: aiosqlite.Connection | None = None
        self._queue: deque[_Write] = deque()  # appended here, taken in the connection thread
        # Live executions per (requester, job): a new job's ask (the common case) learns
        # that it has none without a thread hop. It may over-count for a moment (then the
        # query answers), never under-count: +1 before a create, -1 once a move is terminal.
        self._live: Counter[tuple[str, str]] = Counter()

    @property
    def path(self) -> Path:
        return self._path

    async def open(self) -> None:
        if self._db is not None:
            return
        scripts = migrations()
        db = aiosqlite.connect(self._path, isolation_level=None)
        try:
            try:
                await db
            except BaseException:
                # aiosqlite stops its thread on a failed connect without waiting for it;
                # wait here, or it may report to a loop that has closed meanwhile.
                await asyncio.to_thread(db._thread.join, 10)
                raise
            try:
                await _in_thread(db, _setup, self._sync, self._busy_ms, scripts)
            except BaseException:
                await db.close()
                raise
        except sqlite3.Error as exc:
            raise store_error(exc) from exc
        self._db = db
        rows = await self._run(
            lambda c: c.execute(
                f"SELECT requester, job_id FROM executions WHERE {_LIVE}"
            ).fetchall()
        )
        self._live = Counter((r, j) for r, j in rows)

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is None:
            return
        try:
            await _in_thread(db, _optimize)
        except sqlite3.Error:
            pass  # closing matters more than the planner statistics
        finally:
            await db.close()

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
        """One hop to the connection thread: ``fn(conn, *args, **kwargs)`` runs there."""
        db = self._db
        if db is None:
            raise StoreUnavailableError("execution store is not open")
        try:
            return await _in_thread(db, fn, *args, **kwargs)
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

        write = _Write(op)
        self._queue.append(write)
        try:
            await self._run(_drain, self._queue)
        except StoreError:
            with contextlib.suppress(ValueError):  # not taken by another drain: drop it
                self._queue.remove(write)
            raise
        if write.error is not None:
            if isinstance(write.error, sqlite3.Error):
                raise store_error(write.error) from write.error
            raise write.error
        result: T = write.result
        return result

    async def create_execution(self, execution: Execution, *, comment: str = "") -> Execution:
        key = (execution.requester, execution.job_id)
        self._live[key] += 1
        try:
            return await self._write(_create, execution, comment)
        except BaseException:
            self._forget(key)
            raise

    def _forget(self, key: tuple[str, str]) -> None:
        self._live[key] -= 1
        if self._live[key] <= 0:
            del self._live[key]

    async def get_execution(self, execution_id: str) -> Execution:
        return await self._run(_get, execution_id)

    async def get_executions_for_job(self, job_id: str) -> list[Execution]:
        return await self._run(
            _docs, "SELECT doc FROM executions WHERE job_id = ? ORDER BY ord", (job_id,)
        )

    async def find_active(self, requester: str, job_id: str) -> Execution | None:
        if (requester, job_id) not in self._live:
            return None
        return await self._run(_find_active, requester, job_id)

    async def get_history(self, execution_id: str) -> list[HistoryEntry]:
        return await self._run(_history, execution_id)

    async def update(self, request: UpdateRequest) -> UpdateResult:
        changes = validate_changes(request.changes)
        after, row = await self._write(_update, request, changes, utc(self._clock()))
        if after.state in TERMINAL:
            self._forget((after.requester, after.job_id))
        return UpdateResult(after, row)

    async def live_executions(self) -> list[Execution]:
        return await self._run(_docs, f"SELECT doc FROM executions WHERE {_LIVE} ORDER BY ord")

    async def list_executions(self, query: ListQuery) -> tuple[list[Execution], str]:
        check_limit(query.limit)
        after = decode_cursor(query.cursor) if query.cursor else None
        return await self._run(_list, query, after)

    async def get_callbacks(self, execution_id: str) -> list[OutboxRow]:
        rows = await self._run(
            lambda c: c.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE execution_id = ? ORDER BY seq",
                (execution_id,),
            ).fetchall()
        )
        return [_outbox_row(r) for r in rows]

    async def pending_outbox(self, limit: int = 1000) -> list[OutboxRow]:
        check_limit(limit)
        rows = await self._run(
            lambda c: c.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE delivered = 0"
                " ORDER BY created_us, seq, execution_id LIMIT ?",
                (limit,),
            ).fetchall()
        )
        return [_outbox_row(r) for r in rows]

    async def mark_delivered(self, execution_id: str, seq: int) -> None:
        await self._write(
            _changes,
            "UPDATE outbox SET delivered = 1, parked = 0 WHERE execution_id = ? AND seq = ?",
            (execution_id, seq),
        )

    async def record_attempt(self, execution_id: str, seq: int, error: str, *, park: bool) -> None:
        await self._write(
            _changes,
            "UPDATE outbox SET attempts = attempts + 1, last_error = ?, parked = (parked OR ?)"
            " WHERE execution_id = ? AND seq = ? AND delivered = 0",
            (error, park, execution_id, seq),
        )

    async def unpark_all(self) -> int:
        return await self._write(
            _changes,
            "UPDATE outbox SET parked = 0, attempts = 0 WHERE parked = 1 AND delivered = 0",
        )

    async def outbox_stats(self) -> OutboxStats:
        return await self._run(_stats)

    async def get_tombstone(self, execution_id: str) -> Tombstone | None:
        return await self._run(_tombstone, execution_id)

    async def purge(self, terminal_before: datetime, tombstones_before: datetime) -> list[str]:
        now = to_us(utc(self._clock()))
        return await self._write(_purge, to_us(terminal_before), to_us(tombstones_before), now)

    async def delete_execution(self, execution_id: str) -> None:
        # ON DELETE CASCADE removes the history and outbox rows in the same statement.
        await self._write(_changes, "DELETE FROM executions WHERE id = ?", (execution_id,))

    async def count(self) -> int:
        return await self._run(
            lambda c: int(c.execute("SELECT count(*) FROM executions").fetchone()[0])
        )
