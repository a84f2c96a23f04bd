"""The WAL's checkpoints: copying the log into the database, and starting it over.

The writer never checkpoints in a commit (``wal_autocheckpoint = 0``: an automatic
checkpoint inside a commit made the bid p99 several ms). Every ``CHECKPOINT_INTERVAL`` a
PASSIVE checkpoint runs on the reader's connection, beside the writes.

A PASSIVE checkpoint copies what was committed when it began; under steady writes
something newer is always left, and SQLite starts the WAL over only once all of it has
been copied: the file grew without end (~22 KB per ask+reject, 470 MB in 90 s at full
load). Past ``WAL_RESTART_FRAMES`` the rest is copied by a RESTART checkpoint on the
writer's connection: the writes wait for it, off the event loop (2-4 ms here at moderate
load, 15-45 ms at full load, where it comes every half second); the next commit starts
the WAL over, and the writer's ``journal_size_limit`` (``migrate.JOURNAL_SIZE_LIMIT``)
gives the space back.

A RESTART checkpoint also waits until the database file is on disk, and the writes wait
with it: 0.2 s on ext4 after the 5,000 moves of a start-up recovery, a fifth of its time.
Inside ``Restarts.held()`` none starts (PASSIVE ones go on beside the writes) until the
WAL passes HELD_MAX_FRAMES, so a burst its caller waits for as a whole does not pay that;
the first check after starts the WAL over.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable, Iterator

CHECKPOINT_INTERVAL = 0.5  # seconds between PASSIVE checkpoints
# WAL frames (pages, 4 KiB) past which a checkpoint holds the writes back until it is
# done, so that the next commit starts the WAL over.
WAL_RESTART_FRAMES = 4096
# While restarts are held (``Restarts.held``), the WAL may grow to this many frames (256
# MiB) before one runs all the same: a hold must not let a huge backlog fill the disk.
HELD_MAX_FRAMES = 65_536


def passive_checkpoint(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """(busy, frames in the WAL, frames copied to the database) after a PASSIVE one."""
    row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return int(row[0]), int(row[1]), int(row[2])


def restart_checkpoint(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """On the writer connection, no write running: copy the rest of the WAL and wait
    (50 ms at most) for readers to leave it, so that the next commit writes it from the
    start. The connection's own busy timeout is restored afterwards."""
    previous = int(conn.execute("PRAGMA busy_timeout").fetchone()[0])
    conn.execute("PRAGMA busy_timeout = 50")
    try:
        row = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
    finally:
        conn.execute(f"PRAGMA busy_timeout = {previous}")
    return int(row[0]), int(row[1]), int(row[2])


class Restarts:
    """Whether a RESTART checkpoint may start now (see the module)."""

    def __init__(self) -> None:
        self._held = 0

    @property
    def holding(self) -> bool:
        return self._held > 0

    def allows(self, frames: int) -> bool:
        """Whether a RESTART may run with ``frames`` in the WAL."""
        return not self._held or frames > HELD_MAX_FRAMES

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """No RESTART checkpoint starts inside the block unless the WAL is past
        HELD_MAX_FRAMES (one already running finishes)."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1


async def checkpoints(
    passive: Callable[[], Awaitable[int]], restart: Callable[[int], Awaitable[object]]
) -> None:
    """Forever: ``passive()`` (a PASSIVE checkpoint, returning the frames in the WAL)
    every ``CHECKPOINT_INTERVAL``, and ``restart(frames)`` when they are past
    ``WAL_RESTART_FRAMES``. A failed checkpoint is tried again next time."""
    while True:
        await asyncio.sleep(CHECKPOINT_INTERVAL)
        with contextlib.suppress(sqlite3.Error):
            if (frames := await passive()) > WAL_RESTART_FRAMES:
                await restart(frames)
