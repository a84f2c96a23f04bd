"""The SQLite store's operations: each one plain function of the connection.

``SqliteStore`` runs a read on its reader connection (aiosqlite's thread), a write inside a
(possibly grouped) transaction of the writer connection (on the loop, or in the writer's
thread with ``sync="full"``). An update's callback builder runs here too, so it must stay
pure: a group may run a write twice (see ``sqlite_writer.group_begun``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from schemas.compute import ExecutionState
from worker.errors import (
    AlreadyExistsError,
    ExecutionNotFound,
    InvalidStateError,
    VersionMismatchError,
)
from worker.states import TERMINAL as TERMINAL_STATES
from worker.store.common import (
    apply_chain,
    creation_history,
    encode_cursor,
    from_us,
    normalize,
    to_us,
    validate_new,
)
from worker.store.sqlite_rows import (
    DOC,
    LIVE,
    TERMINAL,
    decode_doc,
    docs,
    encode_doc,
    encode_job,
    execution_params,
    insert_history,
    insert_outbox,
)
from worker.store.types import (
    Execution,
    HistoryEntry,
    ListQuery,
    OutboxRow,
    OutboxStats,
    Tombstone,
    UpdateRequest,
)

__all__ = [
    "Known",
    "changed_rows",
    "create",
    "find_active",
    "get",
    "history",
    "list_page",
    "optimize",
    "outbox_stats",
    "purge",
    "tombstone",
    "update",
]


# An execution as the store last wrote it, its ``ord`` (which never changes) and its job
# as stored in ``jobs`` (see ``update``).
Known = tuple[Execution, int, bytes]


class Ords:
    """The ``ord`` of the next new execution, counted by the store that writes them: a
    create then skips a ``MAX(ord)`` query (~4 µs of the ~150 an ask and its reject cost).
    Asked of the database when not known yet, and again when another writer has taken
    the number. Numbers of a rolled-back create are not reused: ``ord`` is an order, and
    gaps do not change it."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next: int | None = None

    def take(self, conn: sqlite3.Connection) -> int:
        taken = self._next
        if taken is None:
            (taken,) = conn.execute("SELECT IFNULL(MAX(ord), 0) + 1 FROM executions").fetchone()
        self._next = taken + 1
        return taken

    def forget(self) -> None:
        self._next = None


def create(conn: sqlite3.Connection, execution: Execution, comment: str, ords: Ords) -> Known:
    """Insert ``execution``, its job and its first history row."""
    try:
        validate_new(execution)
    except (InvalidStateError, VersionMismatchError):
        # A taken ID is reported first, as Bacalhau's store does (and as a query would).
        if conn.execute("SELECT 1 FROM executions WHERE id = ?", (execution.id,)).fetchone():
            raise AlreadyExistsError(f"execution already exists: {execution.id}") from None
        raise
    stored = normalize(execution)
    params = (*execution_params(stored), to_us(stored.create_time))
    for tries_left in (1, 0):
        ord_ = ords.take(conn)
        try:
            conn.execute(
                "INSERT INTO executions (job_id, requester, state, version, update_us,"
                " deadline_us, last_cause, doc, id, create_us, ord)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*params, ord_),
            )
            break
        except sqlite3.IntegrityError as exc:  # one statement fewer than asking first
            if "executions.id" in str(exc):
                raise AlreadyExistsError(f"execution already exists: {execution.id}") from None
            ords.forget()  # another writer took the number: ask the database
            if not tries_left or "executions.ord" not in str(exc):
                raise
    job = encode_job(stored.job)
    conn.execute("INSERT INTO jobs (execution_ord, job) VALUES (?, ?)", (ord_, job))
    insert_history(conn, creation_history(stored, comment), ord_)
    return stored, ord_, job


# job_id and requester never change: leaving them out of SET spares SQLite two indexes.
# ended_us is set only by the move into a terminal state: the indexes that read it are
# written then, not on every update (0007). Keyed by (ends, guarded).
_SET = (
    "UPDATE executions SET state = ?, version = ?, update_us = ?, deadline_us = ?,"
    " last_cause = ?, doc = ?"
)
_UPDATES = {
    (False, False): _SET + " WHERE id = ?",
    (True, False): _SET + ", ended_us = ? WHERE id = ?",
    (False, True): _SET + " WHERE id = ? AND doc = ?",  # only if the stored document is this
    (True, True): _SET + ", ended_us = ? WHERE id = ? AND doc = ?",
}


def _write_row(conn: sqlite3.Connection, after: Execution, guard: bytes | None = None) -> int:
    """UPDATE the row of ``after`` (if ``guard``, only where the stored document is it):
    the number of rows changed."""
    p = execution_params(after)  # job_id, requester, state … doc, id: SET from state on
    ends = after.state in TERMINAL_STATES
    params = (*p[2:8], p[4], p[8]) if ends else p[2:]  # ended_us = its update_us
    if guard is not None:
        params = (*params, guard)
    return conn.execute(_UPDATES[ends, guard is not None], params).rowcount


def update(
    conn: sqlite3.Connection,
    request: UpdateRequest,
    changes: list[dict[str, Any]],
    now: datetime,
    known: Known | None = None,
) -> tuple[Known, OutboxRow | None, Execution]:
    """Apply ``request`` (and its ``then`` chain; ``changes`` from ``validate_chain``) to
    the stored execution: (the execution after it, with its ``ord`` and job; its outbox
    row; the execution after the first move).

    ``known`` is the store's copy of the execution as it last wrote it. The copy may be
    out of date (or changed in place by whoever holds it). It is used only if it encodes
    to exactly the stored document and job: the UPDATE says so in its WHERE, compared by
    SQLite in the same statement (the job, never written again, is compared here). Then
    the stored row decodes to an equal execution and the query and the decoding are
    skipped. Otherwise the database's copy is read, as always.
    """
    if known is not None:
        done = _update_known(conn, request, changes, now, known)
        if done is not None:
            return done
    found = conn.execute(
        f"SELECT {DOC}, ord FROM executions WHERE id = ?", (request.execution_id,)
    ).fetchone()
    if found is None:
        raise ExecutionNotFound(request.execution_id)
    after, entries, row, first = apply_chain(decode_doc(found[0], found[1]), request, changes, now)
    _write_row(conn, after)
    return _recorded(conn, (after, found[2], found[1]), entries, row), row, first


def _update_known(
    conn: sqlite3.Connection,
    request: UpdateRequest,
    changes: list[dict[str, Any]],
    now: datetime,
    known: Known,
) -> tuple[Known, OutboxRow | None, Execution] | None:
    """``update`` from ``known``; None when ``known`` is not what is stored (nothing
    written then), or its checks failed (maybe only because it is out of date: the
    caller redoes them on the stored copy)."""
    execution, ord_, job = known
    try:
        if encode_job(execution.job) != job:
            return None
        stored = encode_doc(execution)  # what the row must hold for it to count
        after, entries, row, first = apply_chain(execution, request, changes, now)
    except Exception:
        return None
    if _write_row(conn, after, stored) != 1:
        return None
    return _recorded(conn, (after, ord_, job), entries, row), row, first


def _recorded(
    conn: sqlite3.Connection,
    after: Known,
    entries: list[HistoryEntry],
    row: OutboxRow | None,
) -> Known:
    for entry in entries:
        insert_history(conn, entry, after[1])
    if row is not None:
        insert_outbox(conn, row, after[1])
    return after


def get(conn: sqlite3.Connection, execution_id: str) -> Execution:
    found = conn.execute(f"SELECT {DOC} FROM executions WHERE id = ?", (execution_id,)).fetchone()
    if found is None:
        raise ExecutionNotFound(execution_id)
    return decode_doc(found[0], found[1])


def find_active(conn: sqlite3.Connection, requester: str, job_id: str) -> Execution | None:
    found = docs(
        conn,
        # INDEXED BY: the planner otherwise picks the listing index and scans every
        # execution of the requester (45 ms at 100,000 instead of a few µs).
        f"SELECT {DOC} FROM executions INDEXED BY executions_job"
        f" WHERE requester = ? AND job_id = ? AND {LIVE}"
        " ORDER BY update_us DESC, ord DESC LIMIT 1",
        (requester, job_id),
    )
    return found[0] if found else None


def history(conn: sqlite3.Connection, execution_id: str) -> list[HistoryEntry]:
    rows = conn.execute(
        "SELECT previous_state, new_state, new_version, cause, requester, comment, time_us"
        " FROM history WHERE execution_ord = (SELECT ord FROM executions WHERE id = ?)"
        " ORDER BY new_version",
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


def list_page(
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
    found = docs(
        conn,
        f"SELECT {DOC} FROM executions WHERE {' AND '.join(where)} ORDER BY update_us, id LIMIT ?",
        (*params, query.limit + 1),
    )
    page = found[: query.limit]
    more = len(found) > query.limit
    return page, encode_cursor(page[-1].update_time, page[-1].id) if more else ""


def outbox_stats(conn: sqlite3.Connection) -> OutboxStats:
    pending, parked, oldest = conn.execute(
        "SELECT count(*), IFNULL(sum(parked), 0), min(created_us) FROM outbox WHERE delivered = 0"
    ).fetchone()
    return OutboxStats(
        pending=pending,
        parked=parked,
        oldest=from_us(oldest) if oldest is not None else None,
    )


def tombstone(conn: sqlite3.Connection, execution_id: str) -> Tombstone | None:
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


def purge(conn: sqlite3.Connection, cutoff_us: int, tombstones_us: int, now_us: int) -> list[str]:
    doomed = conn.execute(
        "SELECT id, job_id, requester, state, last_cause FROM executions AS e"
        f" WHERE {TERMINAL} AND ended_us < ? AND NOT EXISTS (SELECT 1 FROM outbox AS o"
        " WHERE o.execution_ord = e.ord AND o.delivered = 0) ORDER BY ended_us, id",
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


def changed_rows(conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> int:
    """One statement; the number of rows it changed."""
    return conn.execute(sql, params).rowcount


def optimize(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA optimize")
