"""The SQLite store's rows: shared SQL fragments, record ⇄ row, SQLite's errors as ours.

The tables themselves are defined by ``migrations/``. Everything here runs on the writer
or the reader connection, inside the caller's transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import msgspec

from schemas.job import Job
from worker.errors import StoreError, StoreUnavailableError
from worker.store.common import decode_execution, from_us, to_us
from worker.store.types import Execution, HistoryEntry, OutboxRow

__all__ = [
    "DOC",
    "LIVE",
    "OUTBOX_COLUMNS",
    "OUTBOX_ROW",
    "TERMINAL",
    "decode_doc",
    "docs",
    "encode_doc",
    "encode_job",
    "execution_params",
    "insert_history",
    "insert_outbox",
    "is_unavailable",
    "outbox_row",
    "outbox_rows",
    "store_error",
]

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

# Must match the WHERE of the partial indexes in 0007_ended_us.sql word for word.
LIVE = "ended_us IS NULL"
TERMINAL = "ended_us IS NOT NULL"
OUTBOX_COLUMNS = (
    "execution_id, seq, subject, kind, body, headers, created_us, attempts, parked, delivered,"
    " last_error, link"
)

# An execution's stored document and its job (``jobs``, 0005), in a query on executions.
DOC = "doc, (SELECT job FROM jobs WHERE execution_ord = executions.ord)"

_headers_encoder = msgspec.json.Encoder()
_doc_encoder = msgspec.json.Encoder()
# Where the job was cut out of a document. `id` comes first and `job` second; the first
# match is that one, since a quote inside a JSON string is always escaped.
_NO_JOB = b',"job":null,'

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


def encode_doc(e: Execution) -> bytes:
    """The stored document: the execution without its job (that is in ``jobs``)."""
    return _doc_encoder.encode(msgspec.structs.replace(e, job=None))


def encode_job(job: Job) -> bytes:
    return _doc_encoder.encode(job)


def decode_doc(doc: bytes, job: bytes | None) -> Execution:
    """The execution from its stored document and its job."""
    head, slot, tail = doc.partition(_NO_JOB)
    if not slot or job is None:
        raise msgspec.DecodeError("stored execution without its job")
    return decode_execution(b"".join((head, b',"job":', job, b",", tail)))


def execution_params(e: Execution) -> tuple[Any, ...]:
    deadline = to_us(e.deadline) if e.deadline is not None else None
    return (
        e.job_id,
        e.requester,
        e.state.value,
        e.version,
        to_us(e.update_time),
        deadline,
        e.last_cause,
        encode_doc(e),
        e.id,
    )


def insert_history(conn: sqlite3.Connection, h: HistoryEntry, ord_: int) -> None:
    """``h``, a row of the execution whose ``ord`` is ``ord_`` (history is keyed by it)."""
    conn.execute(
        "INSERT INTO history (execution_ord, new_version, previous_state, new_state, cause,"
        " requester, comment, time_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            ord_,
            h.new_version,
            h.previous_state.value,
            h.new_state.value,
            h.cause,
            h.requester,
            h.comment,
            to_us(h.time),
        ),
    )


# The outbox row of an execution's callback, by the execution's ID (rows are keyed by its
# ``ord``, 0006).
OUTBOX_ROW = "execution_ord = (SELECT ord FROM executions WHERE id = ?) AND seq = ?"


def insert_outbox(conn: sqlite3.Connection, row: OutboxRow, ord_: int) -> None:
    """``row``, a callback of the execution whose ``ord`` is ``ord_``."""
    conn.execute(
        f"INSERT INTO outbox (execution_ord, {OUTBOX_COLUMNS})"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 0, 0, '', ?)",
        (
            ord_,
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


def outbox_rows(conn: sqlite3.Connection, where: str, params: Sequence[Any]) -> list[OutboxRow]:
    """The outbox rows ``WHERE where`` (an ORDER BY and LIMIT may follow) selects."""
    sql = f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE {where}"
    return [outbox_row(r) for r in conn.execute(sql, params)]


def outbox_row(r: tuple[Any, ...]) -> OutboxRow:
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


def docs(conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> list[Execution]:
    """The executions a query selecting ``DOC`` found."""
    return [decode_doc(r[0], r[1]) for r in conn.execute(sql, params)]


def live_known(conn: sqlite3.Connection) -> list[tuple[Execution, int, bytes]]:
    """The live executions in creation order, each with its ``ord`` and its job as stored
    (what the store keeps of the executions it wrote, ``sqlite_ops.Known``)."""
    sql = f"SELECT {DOC}, ord FROM executions WHERE {LIVE} ORDER BY ord"
    return [(decode_doc(r[0], r[1]), r[2], r[1]) for r in conn.execute(sql)]
