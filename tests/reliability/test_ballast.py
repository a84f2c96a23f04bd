"""worker.ballast on a real tmpfs and a real SQLite file: on a full disk a state change
(with its callback row) still commits, an execution cannot be created, the store reports
itself unavailable, and it recovers by itself when space or the lock comes back."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from schemas.compute import ExecutionState as S
from schemas.job import Engine, Job, Metadata, Spec
from tests.reliability.conftest import fill_disk, integrity, tmpfs, wait_for
from worker.ballast import Ballast, GuardedStore, free_bytes, is_disk_full
from worker.capacity.usage import ResourceUsage
from worker.errors import StoreUnavailableError
from worker.states import Cause
from worker.store.types import Execution, OutboxMessage, UpdateRequest

BALLAST = 4 * 1024 * 1024


def new_execution() -> Execution:
    now = datetime.now(UTC)
    return Execution(
        id=f"e-{uuid.uuid4()}",
        job=Job(Metadata=Metadata(ID=str(uuid.uuid4())), Spec=Spec(Engine=Engine.NOOP)),
        requester="r1",
        usage=ResourceUsage(CPU=1, Memory=2),
        create_time=now,
        update_time=now,
    )


def cancel(execution: Execution) -> UpdateRequest:
    def build(ex: Execution, seq: int) -> OutboxMessage:
        return OutboxMessage(
            subject="p.orchestrator.r1.n1.OnCancelComplete/v1",
            kind="OnCancelComplete",
            body=f'{{"ExecutionID":"{ex.id}","Seq":{seq}}}'.encode(),
            headers={"Nats-Msg-Id": f"{ex.id}:{seq}"},
        )

    return UpdateRequest(
        execution_id=execution.id,
        cause=Cause.CANCEL,
        new_state=S.CANCELLED,
        callback=build,
    )


@pytest.fixture
def disk() -> AsyncIterator[Path]:
    with tmpfs("24m") as mount:
        yield mount


@pytest.fixture
async def guarded(disk: Path) -> AsyncIterator[GuardedStore]:
    store = GuardedStore(
        disk / "worker.db", ballast=Ballast(disk / "ballast", size=BALLAST), busy_timeout=0.2
    )
    await store.open()
    await store.prepare()
    try:
        yield store
    finally:
        await store.close()


async def test_disk_full_spends_the_ballast_on_state_changes_only(
    disk: Path, guarded: GuardedStore
) -> None:
    assert guarded.ballast is not None and guarded.ballast.present and guarded.available()
    waiting = [await guarded.create_execution(new_execution()) for _ in range(5)]
    filler = fill_disk(disk)
    assert free_bytes(disk) < 64 * 1024

    # New work cannot be recorded: the create fails, the ballast stays.
    with pytest.raises(StoreUnavailableError) as refused:
        for _ in range(500):  # SQLite may still fit a few rows in pages it has
            await guarded.create_execution(new_execution())
    assert is_disk_full(refused.value)
    assert guarded.ballast.present and not guarded.available()

    # A state change with its callback row commits: the ballast pays for it.
    for execution in waiting:
        result = await guarded.update(cancel(execution))
        assert result.execution.state is S.CANCELLED and result.outbox is not None
    assert not guarded.ballast.present and not guarded.available()
    await guarded.mark_delivered(waiting[0].id, 1)
    assert (await guarded.get_execution(waiting[-1].id)).state is S.CANCELLED

    # Space comes back: the ballast is put back and the store takes work again.
    assert not await guarded.writable(), "the disk is still full: no recovery yet"
    maintain = asyncio.create_task(guarded.maintain(interval=0.05))
    try:
        filler.unlink()
        await wait_for(guarded.available, timeout=5, what="store available again")
        assert guarded.ballast.present
        await guarded.create_execution(new_execution())
    finally:
        maintain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await maintain
    assert await guarded.pragma("integrity_check") == "ok"
    await guarded.close()
    assert integrity(disk / "worker.db") == "ok"


async def test_locked_store_reports_unavailable_until_the_lock_goes(
    disk: Path, guarded: GuardedStore
) -> None:
    execution = await guarded.create_execution(new_execution())
    locker = sqlite3.connect(disk / "worker.db", timeout=5, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreUnavailableError) as locked:
            await guarded.update(cancel(execution))
        assert not is_disk_full(locked.value)
        assert not guarded.available()
        assert guarded.ballast is not None and guarded.ballast.present  # not spent on a lock
        assert (await guarded.get_execution(execution.id)).state is S.CREATED  # reads work
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    maintain = asyncio.create_task(guarded.maintain(interval=0.05))
    try:
        await wait_for(guarded.available, timeout=5, what="available once the lock goes")
    finally:
        maintain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await maintain
    assert (await guarded.update(cancel(execution))).execution.state is S.CANCELLED


def test_ballast_is_real_space_and_not_recreated_without_headroom(tmp_path: Path) -> None:
    with tmpfs("12m") as mount:
        ballast = Ballast(mount / "ballast", size=BALLAST)
        assert ballast.ensure() and ballast.present
        assert free_bytes(mount) <= 12 * 1024 * 1024 - BALLAST
        filler = fill_disk(mount)
        assert ballast.release() and not ballast.present
        assert not ballast.ensure(), "re-created in the space it just gave back"
        filler.unlink()
        assert ballast.ensure() and ballast.present
        assert not ballast.path.with_name(".ballast.tmp").exists()
