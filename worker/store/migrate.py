"""Opening a store file: the connection's pragmas, then the numbered migrations.

Each ``migrations/NNNN_*.sql`` newer than the file's ``user_version`` runs in its own
transaction, statement by statement, and sets ``user_version`` to its number; a file newer
than this node is refused. Runs in a worker thread on the writer connection, at open.
Upgrading a store that has data is logged, one line per migration with its time: some
rewrite every execution (4 s for 100,000 here), and the node is not up meanwhile.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from collections.abc import Sequence
from functools import cache
from importlib import resources

from worker.errors import StoreError
from worker.store.sqlite_writer import transaction

__all__ = ["migrate", "migrations", "setup", "setup_reader", "split_statements"]

log = logging.getLogger(__name__)

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


def migrate(conn: sqlite3.Connection, scripts: Sequence[tuple[int, str]]) -> None:
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

        started = time.monotonic()
        transaction(conn, apply)
        if current > 0:  # not a new store
            log.info(
                "store upgraded to schema %d in %.2f s: %s",
                number,
                time.monotonic() - started,
                _title(script),
            )


def _title(script: str) -> str:
    """What a migration does: its first comment paragraph, without its number."""
    words: list[str] = []
    for line in script.strip().splitlines():
        text = line.removeprefix("--").strip()
        if not line.startswith("--") or not text:
            break
        words.append(text)
    return re.sub(r"^\d+:\s*", "", " ".join(words))


JOURNAL_SIZE_LIMIT = 64 << 20  # bytes of WAL file kept once it is started over


def setup(
    conn: sqlite3.Connection, sync: str, busy_ms: int, scripts: Sequence[tuple[int, str]]
) -> None:
    """The pragmas of the store's connection (WAL, ``sync``), then ``migrate``."""
    conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoints run off the writer's path
    # When the writer starts the WAL over (see ``sqlite_wal``), it cuts the
    # file back to this size: what a burst made it grow to is given back to the disk.
    conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
    conn.execute(f"PRAGMA synchronous = {sync.upper()}")
    conn.execute("PRAGMA foreign_keys = ON")
    migrate(conn, scripts)


def setup_reader(conn: sqlite3.Connection, busy_ms: int) -> None:
    """The pragmas of the store's reader connection: it waits on locks, and never writes."""
    conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
    conn.execute("PRAGMA query_only = ON")
