"""Transactions on the SQLite writer connection: one write alone, or a group of writes.

Runs in aiosqlite's connection thread. A group is ONE ``BEGIN IMMEDIATE … COMMIT`` with
each write inside its own SAVEPOINT, so one that fails (lost compare-and-set, unknown id,
a builder that raises) is rolled back alone and its caller gets its own answer; which
writes form a group is decided by ``SqliteStore`` (``worker.store.sqlite``).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["Write", "group", "transaction"]


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
    """One queued write; ``result``/``error`` are set in the connection thread before the
    caller's drain returns."""

    __slots__ = ("error", "op", "result")

    def __init__(self, op: Callable[[sqlite3.Connection], Any]) -> None:
        self.op = op
        self.result: Any = None
        self.error: BaseException | None = None


def group(conn: sqlite3.Connection, batch: list[Write]) -> None:
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
