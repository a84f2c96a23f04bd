"""The store's writer on the event loop (worker/store/sqlite_inline.py): its connection is
used by one thread at a time, also when a call's caller is cancelled."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

from worker.store.sqlite_inline import InlineWriter


async def test_a_cancelled_call_keeps_the_connection_until_its_thread_is_done(
    tmp_path: Path,
) -> None:
    writer = InlineWriter(tmp_path / "w.db", asyncio.get_running_loop(), busy_timeout=1.0)
    await writer.start()
    started, release = threading.Event(), threading.Event()
    after: list[object] = []

    def slow(conn: sqlite3.Connection) -> None:  # a RESTART checkpoint, say
        started.set()
        release.wait(10)
        try:
            after.append(conn.execute("SELECT 1").fetchone()[0])
        except sqlite3.Error as exc:
            after.append(exc)

    call = asyncio.create_task(writer.call(slow))
    assert await asyncio.to_thread(started.wait, 10)
    call.cancel()  # the store's close cancels its checkpoints
    stop = asyncio.create_task(writer.stop())
    for _ in range(20):  # turns of the loop, not time: stop cannot end while slow runs
        await asyncio.sleep(0)
    assert not stop.done(), "the connection was closed under a running call"
    release.set()
    await stop
    assert after == [1]  # the thread's last statement ran on an open connection
    assert call.cancelled()


async def test_a_write_waits_for_a_call_and_then_commits(tmp_path: Path) -> None:
    writer = InlineWriter(tmp_path / "w.db", asyncio.get_running_loop(), busy_timeout=1.0)
    await writer.start()
    await writer.call(lambda c: c.execute("CREATE TABLE t (x INTEGER)"))
    started, release = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        started.set()
        release.wait(10)

    call = asyncio.create_task(writer.call(hold))
    assert await asyncio.to_thread(started.wait, 10)
    write = asyncio.create_task(writer.write(lambda c: c.execute("INSERT INTO t VALUES (1)")))
    for _ in range(20):  # turns of the loop: the write cannot commit while hold runs
        await asyncio.sleep(0)
    assert not write.done()
    release.set()
    await call
    await write
    rows = await writer.call(lambda c: c.execute("SELECT x FROM t").fetchall())
    assert rows == [(1,)]
    await writer.stop()
