"""In-process store figures: transitions/s through ``SqliteStore``, a raw aiosqlite anchor
measured in the same run, and a data dir populated with many executions for the
start-up recovery figure.

Executions are built the way the node builds them (``BaseEndpoint._bid``) and moved with
the same ``UpdateRequest``s and callback builders as the endpoint and the executor, so the
store does exactly the work it does in the node.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite
import msgspec

from bench import wire
from schemas.callbacks import RunCommandResult, Usage
from schemas.codec import decode
from schemas.compute import AskForBidRequest
from schemas.compute import ExecutionState as S
from schemas.job import Job, StorageSpec
from worker.callbacks import CallbackFactory
from worker.capacity.usage import ResourceUsage
from worker.datadir import DataDir
from worker.states import Cause, sources_of, transition
from worker.store.sqlite import SqliteStore
from worker.store.types import Execution, UpdateRequest
from worker.transport.subjects import Subjects

HOUR = timedelta(hours=1)


class Factory:
    """Executions and their moves, as the node's endpoint and executor make them.

    Waiting states get deadlines ``deadline_in`` after the moment they are written (bid
    TTL, queue timeout, verification TTL): negative for ones that have already passed.
    """

    def __init__(self, *, node_id: str, prefix: str, deadline_in: timedelta = HOUR) -> None:
        self.deadline_in = deadline_in
        self.callbacks = CallbackFactory(
            node_id=node_id,
            subjects=Subjects(prefix=prefix, node_id=node_id),
            verification_ttl=3600.0,
        )
        self._job: Job = decode(wire.ask_body("template"), AskForBidRequest).Job
        self._n = itertools.count()
        self._tag = uuid.uuid4().hex[:8]
        self.usage = ResourceUsage(CPU=0.1, Memory=64 << 20)

    def execution(self) -> Execution:
        job_id = f"j-{self._tag}-{next(self._n)}"
        job = msgspec.structs.replace(
            self._job, Metadata=msgspec.structs.replace(self._job.Metadata, ID=job_id)
        )
        now = datetime.now(UTC)
        execution_id = f"e-{uuid.uuid4()}"
        reply = (
            b'{"ExecutionID":"%s","JobID":"%s","Accepted":true,"Reason":"","NodeID":"n",'
            b'"Retryable":false,"BidTTLSeconds":15.0}' % (execution_id.encode(), job_id.encode())
        )
        return Execution(
            id=execution_id,
            job=job,
            requester=wire.REQUESTER,
            usage=self.usage,
            create_time=now,
            update_time=now,
            ask_reply=reply,
            deadline=now + self.deadline_in,
            ask_trace={"traceparent": wire.traceparent()},
        )

    def move(self, execution_id: str, cause: Cause, current: S) -> UpdateRequest:
        move = transition(cause, current)
        assert move is not None, (cause, current)
        changes: dict[str, Any] = {}
        requester = ""
        expected = sources_of(cause)
        now = datetime.now(UTC)
        if cause is Cause.BID_ACCEPTED:
            changes = {
                "deadline": now + self.deadline_in,
                "trace": {"traceparent": wire.traceparent()},
            }
        if cause is Cause.RUN_COMPLETED:
            changes = {
                "run_result": RunCommandResult(),
                "run_usage": Usage(WallSeconds=0.001),
                "proposal": b"",
                "deadline": now + self.deadline_in,
            }
        if cause is Cause.RESULT_ACCEPTED:
            changes = {"deadline": None}
        if cause is Cause.PUBLISH_COMPLETED:
            changes = {"publish_result": StorageSpec()}
        if cause in (Cause.BID_ACCEPTED, Cause.BID_REJECTED, Cause.RESULT_ACCEPTED):
            requester, expected = wire.REQUESTER, frozenset({current})
        return UpdateRequest(
            execution_id=execution_id,
            cause=cause,
            new_state=move.target,
            expected_states=expected,
            comment="bid rejected due to: bench" if cause is Cause.BID_REJECTED else "",
            requester=requester,
            changes=changes,
            callback=self.callbacks.for_kind(move.callback, err="", cause=cause.value),
        )


# The moves of a noop job from Created to Completed (the store's share of an e2e job).
LIFECYCLE: tuple[tuple[Cause, S], ...] = (
    (Cause.BID_ACCEPTED, S.CREATED),
    (Cause.RUN_STARTED, S.BID_ACCEPTED),
    (Cause.RUN_COMPLETED, S.RUNNING),
    (Cause.RESULT_ACCEPTED, S.WAITING_VERIFICATION),
    (Cause.PUBLISH_STARTED, S.RESULT_ACCEPTED),
    (Cause.PUBLISH_COMPLETED, S.PUBLISHING),
)


async def drive(
    store: SqliteStore, f: Factory, until: S, *, deliver: bool = False
) -> tuple[int, Execution]:
    """Create one execution and move it along LIFECYCLE until it reaches ``until``
    (``Cancelled`` = rejected at once). Returns (transitions, execution)."""
    created = await store.create_execution(f.execution())
    count, state = 1, S.CREATED
    if until is S.CANCELLED:
        await store.update(f.move(created.id, Cause.BID_REJECTED, state))
        return 2, created
    for cause, src in LIFECYCLE:
        if state is until:
            break
        assert state is src
        result = await store.update(f.move(created.id, cause, state))
        count += 1
        state = result.execution.state
        if deliver and result.outbox is not None:
            await store.mark_delivered(result.outbox.execution_id, result.outbox.seq)
    return count, created


@dataclass
class Rate:
    ops: int = 0
    elapsed: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.ops / self.elapsed if self.elapsed else 0.0


async def _timed(
    workers: int, duration: float, one: Callable[[], Awaitable[int]], max_ops: int
) -> Rate:
    """``workers`` coroutines repeat ``one`` (returning the ops it did) for ``duration``."""
    result = Rate()
    t0 = time.perf_counter()
    end = t0 + duration

    async def worker() -> None:
        while time.perf_counter() < end and result.ops < max_ops:
            done = await one()  # not ``result.ops += await one()``: that loses updates
            result.ops += done

    await asyncio.gather(*(worker() for _ in range(workers)))
    result.elapsed = time.perf_counter() - t0
    return result


async def transitions(directory: Path, *, sync: str, workers: int, duration: float) -> Rate:
    """Full noop lifecycles (create + 6 updates = 7 transitions each) through the store."""
    store = SqliteStore(directory / "store.db", sync="full" if sync == "full" else "normal")
    await store.open()
    try:
        f = Factory(node_id="bench-store", prefix="bench")
        for _ in range(20):  # warm-up: caches, prepared statements
            await drive(store, f, S.COMPLETED)

        async def one() -> int:
            n, _ = await drive(store, f, S.COMPLETED)
            return n

        return await _timed(workers, duration, one, max_ops=10**7)
    finally:
        await store.close()


async def sqlite_anchor(directory: Path, *, sync: str, workers: int, duration: float) -> Rate:
    """The physical anchor (ecosystem.md §5): one ~300 B INSERT per await, autocommit,
    WAL, on one aiosqlite connection."""
    db = await aiosqlite.connect(directory / "anchor.db", isolation_level=None)
    try:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute(f"PRAGMA synchronous={sync.upper()}")
        await db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT, v BLOB)")
        row = b"x" * 300
        counter = itertools.count()

        async def one() -> int:
            await db.execute("INSERT INTO t (k, v) VALUES (?, ?)", (str(next(counter)), row))
            return 1

        for _ in range(200):
            await one()
        return await _timed(workers, duration, one, max_ops=10**7)
    finally:
        await db.close()


# --- a data dir with many executions, for the recovery figure -------------------------

# The 5 % that are live, by state (the rest is terminal: 80 % rejected, 20 % completed).
LIVE_MIX: tuple[tuple[S, float], ...] = (
    (S.CREATED, 0.40),
    (S.BID_ACCEPTED, 0.20),
    (S.RUNNING, 0.10),
    (S.WAITING_VERIFICATION, 0.20),
    (S.PUBLISHING, 0.10),
)


def recovery_plan(total: int, live_fraction: float = 0.05) -> list[S]:
    """Target state of each execution, in creation order (live ones spread evenly)."""
    live = round(total * live_fraction)
    states: list[S] = []
    for state, share in LIVE_MIX:
        states += [state] * round(live * share)
    terminal = total - len(states)
    completed = terminal // 5
    states += [S.COMPLETED] * completed + [S.CANCELLED] * (terminal - completed)
    # Interleave: sort by a stride so live executions are scattered among the terminal.
    return [states[(i * 7919) % len(states)] for i in range(len(states))] if states else []


async def populate(
    data_dir: Path,
    *,
    node_id: str,
    prefix: str,
    total: int,
    deadline_in: timedelta = HOUR,
    workers: int = 128,
) -> dict[str, Any]:
    """A node data dir holding ``total`` executions (5 % live) written via the store API,
    the live ones waiting for deadlines ``deadline_in`` after they were written."""
    d = DataDir(data_dir)
    d.create()
    d.lock()
    try:
        d.resolve_node_id(node_id, False)
        store = SqliteStore(d.db_path())
        await store.open()
        try:
            f = Factory(node_id=node_id, prefix=prefix, deadline_in=deadline_in)
            plan = recovery_plan(total)
            queue = iter(plan)
            writes = 0
            t0 = time.perf_counter()

            async def worker() -> None:
                nonlocal writes
                for target in queue:
                    n, _ = await drive(store, f, target, deliver=True)
                    writes += n

            await asyncio.gather(*(worker() for _ in range(workers)))
            elapsed = time.perf_counter() - t0
            count = await store.count()
            live = len(await store.live_executions())
        finally:
            await store.close()
    finally:
        d.unlock()
    size = sum(p.stat().st_size for p in data_dir.glob("*.db*"))
    return {
        "executions": count,
        "live": live,
        "deadline_in_s": deadline_in.total_seconds(),
        "transitions": writes,
        "seconds": round(elapsed, 2),
        "transitions_per_s": round(writes / elapsed),
        "db_bytes": size,
    }
