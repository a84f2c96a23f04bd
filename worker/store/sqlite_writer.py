"""Transactions on the SQLite writer connection: one write alone, or a group of writes.

Runs wherever the writer connection is used: on the event loop (``sqlite_inline``) or in
its own thread (``sqlite_thread``), which decide which writes form a group. A group is ONE
``BEGIN IMMEDIATE … COMMIT``; when a write fails (lost compare-and-set, unknown id, a
builder that raises) the group runs again with each write inside its own SAVEPOINT, so
that one is rolled back alone and its caller gets its own answer.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["Write", "group_begun", "transaction"]


def transaction(conn: sqlite3.Connection, op: Callable[[sqlite3.Connection], T]) -> T:
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


class Write:
    """One queued write; ``result``/``error`` are set where its group ran, before its
    caller is answered."""

    __slots__ = ("error", "op", "result")

    def __init__(self, op: Callable[[sqlite3.Connection], Any]) -> None:
        self.op = op
        self.result: Any = None
        self.error: BaseException | None = None


def group_begun(conn: sqlite3.Connection, batch: Sequence[Write]) -> None:
    """Run ``batch`` in the transaction its caller's ``BEGIN IMMEDIATE`` opened, and end
    it. Never raises: each write's outcome goes to its own ``Write``.

    The caller begins (the writers treat a busy BEGIN each in their own way). First
    optimistically, every write straight in the transaction (no savepoints: two statements
    fewer per write); if one of them raises, all is rolled back and the batch runs again
    with each write in its own savepoint (``_isolated``), so that only the failing one
    fails. Writes are pure functions of the database, so running one twice gives the same
    outcome as running it once.
    """
    try:
        for write in batch:
            write.result = write.op(conn)
    except BaseException as exc:
        _rollback(conn)
        for write in batch:
            write.result = None
        if len(batch) == 1:
            batch[0].error = exc
        else:
            _isolated(conn, batch)
        return
    try:
        conn.execute("COMMIT")
    except BaseException as exc:
        _rollback(conn)
        for write in batch:
            write.result, write.error = None, exc


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _isolated(conn: sqlite3.Connection, batch: Sequence[Write]) -> None:
    """Run ``batch`` in one transaction, each write in its savepoint. Never raises: each
    write's outcome goes to its own ``Write``."""
    kept: list[Write] = []  # done in the open transaction
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
