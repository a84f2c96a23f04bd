"""The store contract suite runs every test against each ExecutionStore implementation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from worker.store import MemoryStore, SqliteStore
from worker.store.types import ExecutionStore


class ManualClock:
    """Real time until ``set``; then a fixed time moved only by ``set``/``advance``."""

    def __init__(self) -> None:
        self.fixed: datetime | None = None

    def __call__(self) -> datetime:
        return self.fixed if self.fixed is not None else datetime.now(UTC)

    def set(self, moment: datetime) -> None:
        self.fixed = moment

    def advance(self, seconds: float) -> datetime:
        self.fixed = self() + timedelta(seconds=seconds)
        return self.fixed


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(params=["memory", "sqlite", "sqlite-full"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: ManualClock
) -> AsyncIterator[ExecutionStore]:
    """An opened store of each kind (SQLite on a file in tmp_path), closed afterwards.
    ``sqlite`` writes on the event loop (sync=normal), ``sqlite-full`` in its own thread."""
    s: ExecutionStore
    if request.param == "memory":
        s = MemoryStore(clock=clock)
    else:
        sync = "full" if request.param == "sqlite-full" else "normal"
        s = SqliteStore(tmp_path / "executions.db", clock=clock, sync=sync)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "node" / "executions.db"


@pytest.fixture(params=["normal", "full"])
async def sqlite_store(
    request: pytest.FixtureRequest, db_path: Path, clock: ManualClock
) -> AsyncIterator[SqliteStore]:
    """An opened SqliteStore for the SQLite-only tests, with each writer (sync=normal:
    on the loop; sync=full: in a thread)."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    s = SqliteStore(db_path, clock=clock, sync=request.param)
    await s.open()
    try:
        yield s
    finally:
        await s.close()
