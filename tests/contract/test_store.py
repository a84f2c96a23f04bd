"""ExecutionStore contract: one suite, run against MemoryStore and SqliteStore.

The first part ports Bacalhau v0.3.25's store tests (``inmemory/store_test.go``,
``store/utils_test.go``, ``store/test/active_executions_test.go``) with this project's
error classes; the rest covers what this store adds: Causes, the outbox, listing,
retention, ``changes`` and compare-and-set under concurrency. The last part is SQLite only.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import sqlite3
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

import msgspec
import pytest
from msgspec.structs import replace as dataclass_replace

import worker.store.sqlite as sqlite_module
import worker.store.sqlite_wal as sqlite_wal
from schemas.callbacks import RunCommandResult
from schemas.compute import ExecutionState as S
from schemas.job import Engine, Job, Metadata, Spec, StorageSource, StorageSpec
from tests.contract.conftest import ManualClock
from tests.helpers import assert_eventually
from worker.capacity.usage import ResourceUsage
from worker.errors import (
    AlreadyExistsError,
    ExecutionNotFound,
    InvalidStateError,
    StoreError,
    StoreUnavailableError,
    VersionMismatchError,
)
from worker.states import TERMINAL, Cause
from worker.store import SqliteStore
from worker.store.common import encode_execution, to_us
from worker.store.migrate import setup
from worker.store.sqlite import migrations
from worker.store.sqlite_rows import execution_params
from worker.store.types import (
    Execution,
    ExecutionStore,
    ListQuery,
    OutboxMessage,
    OutboxStats,
    UpdateRequest,
    UpdateResult,
)

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def new_execution(
    *, job_id: str | None = None, requester: str = "nodeID-1", at: datetime | None = None
) -> Execution:
    """Bacalhau ``newExecution()``: a uuid, a job of its own, CPU 1 / Memory 2."""
    now = at or datetime.now(UTC)
    return Execution(
        id=f"e-{uuid.uuid4()}",
        job=Job(Metadata=Metadata(ID=job_id or str(uuid.uuid4())), Spec=Spec(Engine=Engine.NOOP)),
        requester=requester,
        usage=ResourceUsage(CPU=1, Memory=2),
        create_time=now,
        update_time=now,
    )


def builder(
    kind: str = "OnRunComplete",
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    seen: list[tuple[Execution, int]] | None = None,
) -> Callable[[Execution, int], OutboxMessage]:
    def build(execution: Execution, seq: int) -> OutboxMessage:
        if seen is not None:
            seen.append((execution, seq))
        return OutboxMessage(
            subject=f"bacalhau.orchestrator.{execution.requester}.{kind}",
            kind=kind,
            body=body if body is not None else f'{{"ID":"{execution.id}","Seq":{seq}}}'.encode(),
            headers=headers if headers is not None else {"Nats-Msg-Id": f"{execution.id}:{seq}"},
        )

    return build


async def move(
    store: ExecutionStore, execution_id: str, state: S, cause: Cause = Cause.CANCEL, **kw: Any
) -> UpdateResult:
    return await store.update(
        UpdateRequest(execution_id=execution_id, cause=cause, new_state=state, **kw)
    )


async def created(store: ExecutionStore, **kw: Any) -> Execution:
    return await store.create_execution(new_execution(**kw))


# --- Bacalhau v0.3.25 store tests --------------------------------------------------------


async def test_create_execution(store: ExecutionStore) -> None:
    execution = new_execution()
    await store.create_execution(execution)
    assert await store.get_execution(execution.id) == execution

    history = await store.get_history(execution.id)
    assert len(history) == 1
    h = history[0]
    assert (h.execution_id, h.previous_state, h.new_state) == (execution.id, S.UNDEFINED, S.CREATED)
    assert (h.new_version, h.time, h.comment) == (1, execution.update_time, "Execution created")
    assert (h.cause, h.requester) == ("AskForBid", "nodeID-1")


async def test_create_execution_comment(store: ExecutionStore) -> None:
    execution = await store.create_execution(new_execution(), comment="bid: ok")
    assert (await store.get_history(execution.id))[0].comment == "bid: ok"


async def test_create_execution_already_exists(store: ExecutionStore) -> None:
    execution = await created(store)
    with pytest.raises(
        AlreadyExistsError, match=re.escape(f"execution already exists: {execution.id}")
    ):
        await store.create_execution(execution)
    assert len(await store.get_history(execution.id)) == 1


async def test_create_execution_invalid_state(store: ExecutionStore) -> None:
    execution = new_execution()
    execution.state = S.BID_ACCEPTED
    with pytest.raises(InvalidStateError, match="is in state BidAccepted but expected Created"):
        await store.create_execution(execution)
    with pytest.raises(ExecutionNotFound):
        await store.get_execution(execution.id)
    assert await store.get_history(execution.id) == []


async def test_validate_new_execution_version(store: ExecutionStore) -> None:
    execution = new_execution()
    execution.version = 2
    with pytest.raises(VersionMismatchError, match="has version 2 but expected 1"):
        await store.create_execution(execution)
    assert await store.count() == 0


async def test_get_execution_doesnt_exist(store: ExecutionStore) -> None:
    with pytest.raises(ExecutionNotFound, match=r"^execution not found: e-nope$"):
        await store.get_execution("e-nope")


async def test_get_executions(store: ExecutionStore) -> None:
    first = await created(store)
    assert await store.get_executions_for_job(first.job_id) == [first]
    second = await created(store, job_id=first.job_id)
    await created(store)  # another job
    assert await store.get_executions_for_job(first.job_id) == [first, second]


async def test_get_executions_doesnt_exist(store: ExecutionStore) -> None:
    assert await store.get_executions_for_job("no-such-job") == []


async def test_update_execution(store: ExecutionStore) -> None:
    execution = await created(store)
    request = UpdateRequest(
        execution_id=execution.id,
        cause=Cause.PUBLISH_STARTED,
        new_state=S.PUBLISHING,
        comment="Hello There!",
    )
    result = await store.update(request)

    got = await store.get_execution(execution.id)
    assert got == result.execution
    assert (got.state, got.version) == (S.PUBLISHING, 2)
    assert result.outbox is None
    history = await store.get_history(execution.id)
    assert len(history) == 2
    h = history[1]
    assert (h.previous_state, h.new_state, h.new_version) == (S.CREATED, S.PUBLISHING, 2)
    assert (h.comment, h.time) == ("Hello There!", got.update_time)


async def test_update_execution_conditions_pass(store: ExecutionStore) -> None:
    execution = await created(store)
    result = await move(
        store,
        execution.id,
        S.BID_ACCEPTED,
        Cause.BID_ACCEPTED,
        expected_states=frozenset({S.CREATED}),
        expected_version=1,
    )
    assert (result.execution.state, result.execution.version) == (S.BID_ACCEPTED, 2)


async def test_update_execution_conditions_state_fail(store: ExecutionStore) -> None:
    execution = await created(store)
    with pytest.raises(InvalidStateError) as info:
        await move(
            store,
            execution.id,
            S.RUNNING,
            Cause.RUN_STARTED,
            expected_states=frozenset({S.BID_ACCEPTED}),
        )
    assert info.value.message == (
        f"execution {execution.id} is in state Created but expected BidAccepted"
    )
    assert (info.value.state, info.value.cause) == ("Created", "AskForBid")
    assert await store.get_execution(execution.id) == execution


async def test_update_execution_conditions_version_fail(store: ExecutionStore) -> None:
    execution = await created(store)
    with pytest.raises(VersionMismatchError) as info:
        await move(store, execution.id, S.BID_ACCEPTED, expected_version=execution.version + 99)
    assert info.value.message == f"execution {execution.id} has version 1 but expected 100"
    assert len(await store.get_history(execution.id)) == 1


async def test_delete_execution(store: ExecutionStore) -> None:
    execution = await created(store)
    await store.delete_execution(execution.id)
    with pytest.raises(ExecutionNotFound):
        await store.get_execution(execution.id)
    assert await store.get_executions_for_job(execution.job_id) == []
    assert await store.get_history(execution.id) == []


async def test_delete_execution_multi_entries(store: ExecutionStore) -> None:
    a1 = await created(store)
    a2 = await created(store, job_id=a1.job_id)
    b1 = await created(store)

    await store.delete_execution(a1.id)
    assert await store.get_executions_for_job(a1.job_id) == [a2]
    assert await store.get_executions_for_job(b1.job_id) == [b1]
    await store.delete_execution(a2.id)
    assert await store.get_executions_for_job(a1.job_id) == []
    await store.delete_execution(b1.id)
    assert await store.get_executions_for_job(b1.job_id) == []
    assert await store.count() == 0


async def test_delete_execution_doesnt_exist(store: ExecutionStore) -> None:
    await store.delete_execution("e-nope")


async def test_get_execution_history_doesnt_exist(store: ExecutionStore) -> None:
    assert await store.get_history("e-nope") == []


async def test_active_execution_single(store: ExecutionStore) -> None:
    execution = await created(store)
    assert await store.find_active(execution.requester, execution.job_id) == execution


async def test_active_execution_latest_wins(store: ExecutionStore) -> None:
    older = new_execution(at=T0)
    newer = new_execution(job_id=older.job_id, at=T0)
    newer.update_time = T0 + timedelta(microseconds=1)
    await store.create_execution(newer)  # inserted first: UpdateTime decides, not order
    await store.create_execution(older)
    assert await store.find_active(older.requester, older.job_id) == newer


async def test_active_execution_unknown_job(store: ExecutionStore) -> None:
    assert await store.find_active("nodeID-1", "no-such-job") is None


async def test_active_execution_ignores_terminal_and_other_requesters(
    store: ExecutionStore,
) -> None:
    done = await created(store)
    await move(store, done.id, S.CANCELLED)
    assert await store.find_active(done.requester, done.job_id) is None
    await created(store, job_id=done.job_id, requester="other")
    assert await store.find_active(done.requester, done.job_id) is None
    mine = await created(store, job_id=done.job_id)
    assert await store.find_active(done.requester, done.job_id) == mine


# --- update semantics ----------------------------------------------------------------------


async def test_update_unknown_execution(store: ExecutionStore) -> None:
    with pytest.raises(ExecutionNotFound, match="e-nope"):
        await move(store, "e-nope", S.CANCELLED)


@pytest.mark.parametrize("final", sorted(TERMINAL))
async def test_terminal_refuses_any_move(store: ExecutionStore, final: S) -> None:
    execution = await created(store)
    await move(store, execution.id, final, Cause.NODE_SHUTDOWN)
    for target in S:
        with pytest.raises(InvalidStateError) as info:
            await move(store, execution.id, target, Cause.CANCEL, callback=builder())
        assert info.value.message == (
            f"execution {execution.id} is in terminal state {final.value}"
            f" and cannot transition to {target.value}"
        )
        assert (info.value.state, info.value.cause) == (final.value, "NodeShutdown")
    after = await store.get_execution(execution.id)
    assert (after.state, after.version, after.next_seq) == (final, 2, 1)
    assert len(await store.get_history(execution.id)) == 2
    assert await store.get_callbacks(execution.id) == []


async def test_checks_run_in_bacalhau_order(store: ExecutionStore) -> None:
    execution = await created(store)
    await move(store, execution.id, S.FAILED, Cause.ENGINE_ERROR)
    # expected state first, then expected version, then terminal
    with pytest.raises(InvalidStateError, match="but expected Created"):
        await move(
            store,
            execution.id,
            S.RUNNING,
            expected_states=frozenset({S.CREATED}),
            expected_version=9,
        )
    with pytest.raises(VersionMismatchError):
        await move(
            store,
            execution.id,
            S.RUNNING,
            expected_states=frozenset({S.FAILED}),
            expected_version=9,
        )
    with pytest.raises(InvalidStateError, match="terminal state Failed") as info:
        await move(store, execution.id, S.RUNNING, expected_version=2)
    assert info.value.cause == "EngineError"


async def test_expected_states_any_of(store: ExecutionStore) -> None:
    execution = await created(store)
    states = frozenset({S.BID_ACCEPTED, S.RUNNING, S.PUBLISHING})
    with pytest.raises(InvalidStateError) as info:
        await move(store, execution.id, S.CANCELLED, expected_states=states)
    assert info.value.message.endswith("but expected BidAccepted or Running or Publishing")
    await move(store, execution.id, S.BID_ACCEPTED, Cause.BID_ACCEPTED)
    result = await move(store, execution.id, S.CANCELLED, expected_states=states)
    assert result.execution.state is S.CANCELLED


async def test_history_records_cause_requester_and_comment(store: ExecutionStore) -> None:
    execution = await created(store, requester="req-A")
    await move(store, execution.id, S.BID_ACCEPTED, Cause.BID_ACCEPTED, requester="req-A")
    result = await move(
        store, execution.id, S.CANCELLED, Cause.CANCEL, requester="req-A", comment="changed mind"
    )
    assert result.execution.last_cause == "Cancel"
    assert result.execution.latest_comment == "changed mind"
    rows = [
        (h.cause, h.requester, h.new_state, h.new_version)
        for h in await store.get_history(execution.id)
    ]
    assert rows == [
        ("AskForBid", "req-A", S.CREATED, 1),
        ("BidAccepted", "req-A", S.BID_ACCEPTED, 2),
        ("Cancel", "req-A", S.CANCELLED, 3),
    ]
    history = await store.get_history(execution.id)
    assert history[-1].comment == "changed mind"
    assert history[-1].time == result.execution.update_time


async def test_update_sets_update_time_from_clock(
    store: ExecutionStore, clock: ManualClock
) -> None:
    execution = await store.create_execution(new_execution(at=T0))
    clock.set(T0 + timedelta(seconds=5))
    result = await move(store, execution.id, S.BID_ACCEPTED, Cause.BID_ACCEPTED)
    assert result.execution.update_time == T0 + timedelta(seconds=5)
    assert result.execution.create_time == T0


async def test_update_time_never_goes_backwards(store: ExecutionStore, clock: ManualClock) -> None:
    execution = await store.create_execution(new_execution(at=T0))
    clock.set(T0 + timedelta(seconds=10))
    await move(store, execution.id, S.BID_ACCEPTED, Cause.BID_ACCEPTED, callback=builder())
    clock.set(T0 + timedelta(seconds=5))  # the wall clock stepped back
    result = await move(store, execution.id, S.RUNNING, Cause.RUN_STARTED, callback=builder())
    assert result.execution.update_time == T0 + timedelta(seconds=10)
    pending = await store.pending_outbox()
    assert [r.seq for r in pending] == [1, 2]


async def test_changes_applied(store: ExecutionStore) -> None:
    execution = await created(store)
    deadline = datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    spec = StorageSpec(StorageSource=StorageSource.URL_DOWNLOAD, URL="http://x/e.tar.gz")
    result = await move(
        store,
        execution.id,
        S.WAITING_VERIFICATION,
        Cause.RUN_COMPLETED,
        changes={
            "deadline": deadline,
            "trace": {"traceparent": "00-abc-def-01"},
            "run_result": RunCommandResult(stdout="hi\n", exitCode=3),
            "proposal": b"\x00\xffproposal",
            "publish_result": spec,
            "ask_trace": {"traceparent": "00-123-456-01"},
        },
    )
    got = await store.get_execution(execution.id)
    assert got == result.execution
    assert got.deadline == deadline and got.deadline is not None
    assert got.deadline.utcoffset() == timedelta(0)
    assert got.trace == {"traceparent": "00-abc-def-01"}
    assert got.run_result == RunCommandResult(stdout="hi\n", exitCode=3)
    assert (got.proposal, got.publish_result, got.ask_trace) == (
        b"\x00\xffproposal",
        spec,
        {"traceparent": "00-123-456-01"},
    )

    cleared = await move(store, execution.id, S.RESULT_ACCEPTED, changes={"deadline": None})
    assert cleared.execution.deadline is None
    assert (await store.get_execution(execution.id)).deadline is None


async def test_change_times_are_stored_in_utc(store: ExecutionStore) -> None:
    """A naive time is taken as UTC, an aware one is converted (the plain-value path)."""
    execution = await created(store)
    naive = datetime(2030, 1, 2, 3, 4, 5, 6)
    moved = await move(store, execution.id, S.BID_ACCEPTED, changes={"deadline": naive})
    assert moved.execution.deadline == naive.replace(tzinfo=UTC)
    assert moved.execution.deadline.tzinfo is UTC
    plus_two = timezone(timedelta(hours=2))
    aware = datetime(2030, 1, 2, 5, 4, 5, 6, tzinfo=plus_two)
    moved = await move(store, execution.id, S.RUNNING, changes={"deadline": aware})
    assert moved.execution.deadline is not None and moved.execution.deadline.tzinfo is UTC
    assert moved.execution.deadline == naive.replace(tzinfo=UTC)
    assert (await store.get_execution(execution.id)).deadline == naive.replace(tzinfo=UTC)


@pytest.mark.parametrize(
    "changes",
    [
        {"no_such_field": 1},
        {"state": S.RUNNING},
        {"version": 7},
        {"next_seq": 9},
        {"requester": "someone-else"},
        {"job": new_execution().job},
        {"deadline": "not a time"},
        {"trace": ["not", "a", "dict"]},
        {"trace": "a string, not a dict"},
        {"proposal": True},
        {"ask_reply": 5},
        {"run_result": "not a RunCommandResult"},
    ],
)
async def test_bad_changes_rejected(store: ExecutionStore, changes: dict[str, Any]) -> None:
    execution = await created(store)
    with pytest.raises(ValueError):
        await move(store, execution.id, S.BID_ACCEPTED, changes=changes)
    assert await store.get_execution(execution.id) == execution
    assert len(await store.get_history(execution.id)) == 1


async def test_returned_records_are_copies(store: ExecutionStore) -> None:
    execution = new_execution()
    stored = await store.create_execution(execution)
    execution.trace["mutated"] = "1"
    stored.trace["mutated"] = "2"
    got = await store.get_execution(execution.id)
    got.trace["mutated"] = "3"
    assert (await store.get_execution(execution.id)).trace == {}


async def test_count(store: ExecutionStore) -> None:
    assert await store.count() == 0
    executions = [await created(store) for _ in range(3)]
    assert await store.count() == 3
    await move(store, executions[0].id, S.COMPLETED)
    assert await store.count() == 3
    await store.delete_execution(executions[1].id)
    assert await store.count() == 2


async def test_live_executions(store: ExecutionStore) -> None:
    a, b, c, d = [await created(store) for _ in range(4)]
    await move(store, b.id, S.COMPLETED)
    await move(store, c.id, S.RUNNING)
    await move(store, d.id, S.FAILED)
    assert [e.id for e in await store.live_executions()] == [a.id, c.id]


async def test_closed_store_is_unavailable(store: ExecutionStore) -> None:
    execution = await created(store)
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StoreUnavailableError):
        await store.get_execution(execution.id)
    with pytest.raises(StoreUnavailableError):
        await store.create_execution(new_execution())
    await store.open()
    assert await store.get_execution(execution.id) == execution


# --- outbox ---------------------------------------------------------------------------------


async def test_outbox_seq_per_execution(store: ExecutionStore) -> None:
    a = await created(store)
    b = await created(store)
    states = [S.BID_ACCEPTED, S.RUNNING, S.WAITING_VERIFICATION]
    for state in states:
        result = await move(store, a.id, state, callback=builder())
        assert result.outbox is not None
        assert result.outbox.seq == result.execution.next_seq - 1
    await move(store, a.id, S.RESULT_ACCEPTED)  # no callback: no Seq used
    rb = await move(store, b.id, S.CANCELLED, callback=builder("OnCancelComplete"))
    assert rb.outbox is not None and rb.outbox.seq == 1
    ra = await move(store, a.id, S.CANCELLED, callback=builder("OnCancelComplete"))
    assert ra.outbox is not None and ra.outbox.seq == 4

    rows = await store.get_callbacks(a.id)
    assert [r.seq for r in rows] == [1, 2, 3, 4]
    assert [r.kind for r in rows] == ["OnRunComplete"] * 3 + ["OnCancelComplete"]
    assert rows[-1] == ra.outbox
    assert (await store.get_execution(a.id)).next_seq == 5
    assert [r.seq for r in await store.get_callbacks(b.id)] == [1]


async def test_outbox_seq_never_reused(store: ExecutionStore) -> None:
    execution = await created(store)
    await move(store, execution.id, S.BID_ACCEPTED, callback=builder())
    await store.mark_delivered(execution.id, 1)

    def explode(e: Execution, seq: int) -> OutboxMessage:
        raise RuntimeError("builder failed")

    with pytest.raises(RuntimeError, match="builder failed"):
        await move(store, execution.id, S.RUNNING, callback=explode)
    after = await store.get_execution(execution.id)
    assert (after.state, after.version, after.next_seq) == (S.BID_ACCEPTED, 2, 2)
    assert len(await store.get_history(execution.id)) == 2

    result = await move(store, execution.id, S.RUNNING, callback=builder())
    assert result.outbox is not None and result.outbox.seq == 2
    assert [r.seq for r in await store.get_callbacks(execution.id)] == [1, 2]


async def test_outbox_body_and_headers_byte_exact(store: ExecutionStore) -> None:
    execution = await created(store)
    body = b'{"Err":"caf\xc3\xa9"}\x00\xff\n  '
    headers = {
        "Nats-Msg-Id": f"{execution.id}:1",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "vendor=ü, x=1",
        "Empty": "",
    }
    result = await move(store, execution.id, S.FAILED, callback=builder(body=body, headers=headers))
    for row in [result.outbox, *(await store.get_callbacks(execution.id))]:
        assert row is not None
        assert row.body == body and isinstance(row.body, bytes)
        assert row.headers == headers
        assert list(row.headers) == list(headers)
        assert row.subject == "bacalhau.orchestrator.nodeID-1.OnRunComplete"
        assert (row.attempts, row.parked, row.delivered, row.last_error) == (0, False, False, "")
    (pending,) = await store.pending_outbox()
    assert pending.body == body and pending.headers == headers


async def test_callback_builder_sees_post_update_execution(store: ExecutionStore) -> None:
    execution = await created(store)
    await move(store, execution.id, S.BID_ACCEPTED, callback=builder())
    seen: list[tuple[Execution, int]] = []
    result = await move(
        store,
        execution.id,
        S.RUNNING,
        Cause.RUN_STARTED,
        comment="go",
        changes={"trace": {"traceparent": "t"}},
        callback=builder(seen=seen),
    )
    ((passed, seq),) = seen
    assert seq == 2
    assert (passed.state, passed.version, passed.last_cause) == (S.RUNNING, 3, "RunStarted")
    assert (passed.latest_comment, passed.trace) == ("go", {"traceparent": "t"})
    assert passed.next_seq == 3
    assert passed == result.execution == await store.get_execution(execution.id)
    assert result.outbox is not None
    assert result.outbox.created_at == passed.update_time


async def test_pending_outbox_order(store: ExecutionStore, clock: ManualClock) -> None:
    a, b, c = [await store.create_execution(new_execution(at=T0)) for _ in range(3)]
    b_id, c_id = sorted([b.id, c.id])
    clock.set(T0 + timedelta(seconds=1))
    await move(store, a.id, S.BID_ACCEPTED, callback=builder())
    clock.set(T0 + timedelta(seconds=2))
    await move(store, c_id, S.BID_ACCEPTED, callback=builder())  # same instant as b: seq, id
    await move(store, b_id, S.BID_ACCEPTED, callback=builder())
    await move(store, b_id, S.RUNNING, callback=builder())
    clock.set(T0 + timedelta(seconds=3))
    await move(store, a.id, S.RUNNING, callback=builder())

    pending = [(r.execution_id, r.seq) for r in await store.pending_outbox()]
    assert pending == [(a.id, 1), (b_id, 1), (c_id, 1), (b_id, 2), (a.id, 2)]
    assert [(r.execution_id, r.seq) for r in await store.pending_outbox(limit=2)] == pending[:2]
    await store.mark_delivered(b_id, 1)
    await store.mark_delivered(b_id, 1)  # retiring twice is harmless
    await store.mark_delivered("e-nope", 1)
    pending = [(r.execution_id, r.seq) for r in await store.pending_outbox()]
    assert pending == [(a.id, 1), (c_id, 1), (b_id, 2), (a.id, 2)]
    assert [r.delivered for r in await store.get_callbacks(b_id)] == [True, False]


async def test_park_unpark_and_stats(store: ExecutionStore, clock: ManualClock) -> None:
    assert await store.outbox_stats() == OutboxStats()
    a, b = [await store.create_execution(new_execution(at=T0)) for _ in range(2)]
    clock.set(T0 + timedelta(seconds=1))
    await move(store, a.id, S.BID_ACCEPTED, callback=builder())
    clock.set(T0 + timedelta(seconds=2))
    await move(store, b.id, S.BID_ACCEPTED, callback=builder())
    await move(store, b.id, S.RUNNING, callback=builder())

    await store.record_attempt(a.id, 1, "no responders", park=False)
    await store.record_attempt(a.id, 1, "timeout", park=True)
    (row,) = await store.get_callbacks(a.id)
    assert (row.attempts, row.last_error, row.parked, row.delivered) == (2, "timeout", True, False)
    stats = await store.outbox_stats()
    assert (stats.pending, stats.parked, stats.oldest) == (3, 1, T0 + timedelta(seconds=1))

    # parked rows stay in the pending list: they are re-sent after a reconnect or restart
    assert [(r.execution_id, r.seq, r.parked) for r in await store.pending_outbox()] == [
        (a.id, 1, True),
        (b.id, 1, False),
        (b.id, 2, False),
    ]
    await store.record_attempt(b.id, 2, "boom", park=True)
    await store.record_attempt(b.id, 2, "again", park=False)  # parked stays parked
    assert (await store.get_callbacks(b.id))[1].parked is True
    assert (await store.outbox_stats()).parked == 2

    assert await store.unpark_all() == 2
    assert await store.unpark_all() == 0
    stats = await store.outbox_stats()
    assert (stats.pending, stats.parked) == (3, 0)
    (row,) = await store.get_callbacks(a.id)
    assert (row.parked, row.attempts, row.last_error) == (False, 0, "timeout")

    await store.mark_delivered(a.id, 1)
    await store.record_attempt(a.id, 1, "late", park=True)  # a delivered row is left alone
    (row,) = await store.get_callbacks(a.id)
    assert (row.delivered, row.parked, row.attempts) == (True, False, 0)
    stats = await store.outbox_stats()
    assert (stats.pending, stats.parked, stats.oldest) == (2, 0, T0 + timedelta(seconds=2))
    await store.mark_delivered(b.id, 1)
    await store.mark_delivered(b.id, 2)
    assert await store.outbox_stats() == OutboxStats(pending=0, parked=0, oldest=None)


# --- listing --------------------------------------------------------------------------------


async def _populate(store: ExecutionStore, n: int, requester: str = "req-1") -> list[Execution]:
    """n executions whose update times repeat (three per instant), to test the id tiebreak."""
    out = []
    for i in range(n):
        out.append(
            await store.create_execution(
                new_execution(requester=requester, at=T0 + timedelta(seconds=i // 3))
            )
        )
    return sorted(out, key=lambda e: (e.update_time, e.id))


async def _all_pages(store: ExecutionStore, query: ListQuery) -> list[list[Execution]]:
    pages = []
    while True:
        page, cursor = await store.list_executions(query)
        pages.append(page)
        if not cursor:
            return pages
        assert len(page) == query.limit
        query = ListQuery(
            requester=query.requester,
            updated_since=query.updated_since,
            states=query.states,
            limit=query.limit,
            cursor=cursor,
        )


@pytest.mark.parametrize(("n", "limit", "sizes"), [(25, 7, [7, 7, 7, 4]), (21, 7, [7, 7, 7])])
async def test_list_pagination(store: ExecutionStore, n: int, limit: int, sizes: list[int]) -> None:
    expected = await _populate(store, n)
    await _populate(store, 4, requester="req-2")
    pages = await _all_pages(store, ListQuery(requester="req-1", limit=limit))
    assert [len(p) for p in pages] == sizes
    flat = [e for p in pages for e in p]
    assert flat == expected  # ordered by (update_time, id), no duplicates, no gaps
    assert len({e.id for e in flat}) == n


async def test_list_filters(store: ExecutionStore, clock: ManualClock) -> None:
    executions = await _populate(store, 9)
    clock.set(T0 + timedelta(seconds=60))
    running = [await move(store, e.id, S.RUNNING) for e in executions[:2]]
    failed = await move(store, executions[2].id, S.FAILED)

    page, cursor = await store.list_executions(ListQuery(requester="req-1"))
    assert len(page) == 9 and cursor == ""
    assert page[-3:] == sorted(
        [r.execution for r in [*running, failed]], key=lambda e: (e.update_time, e.id)
    )

    since = T0 + timedelta(seconds=1)  # inclusive: executions[3:6] have exactly this time
    page, _ = await store.list_executions(ListQuery(requester="req-1", updated_since=since))
    assert {e.id for e in page} == {e.id for e in executions}
    page, _ = await store.list_executions(
        ListQuery(requester="req-1", updated_since=since + timedelta(microseconds=1))
    )
    assert [e.id for e in page[:3]] == [e.id for e in executions[6:]]
    assert {e.id for e in page[3:]} == {e.id for e in executions[:3]}

    page, _ = await store.list_executions(
        ListQuery(requester="req-1", states=[S.RUNNING, S.FAILED])
    )
    assert {e.id for e in page} == {e.id for e in executions[:3]}
    page, _ = await store.list_executions(
        ListQuery(requester="req-1", states=[S.CREATED], updated_since=since)
    )
    assert [e.id for e in page] == [e.id for e in executions[3:]]

    page, cursor = await store.list_executions(
        ListQuery(requester="req-1", states=[S.CREATED], limit=2)
    )
    assert len(page) == 2 and cursor
    page, cursor = await store.list_executions(
        ListQuery(requester="req-1", states=[S.CREATED], limit=5, cursor=cursor)
    )
    assert [e.id for e in page] == [e.id for e in executions[5:]] and cursor == ""

    assert await store.list_executions(ListQuery(requester="nobody")) == ([], "")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


@pytest.mark.parametrize(
    "cursor",
    [
        "!!!not base64!!!",
        _b64(b"not json"),
        _b64(b'{"t": 1, "id": "x"}'),
        _b64(b"[1]"),
        _b64(b'["1", "e-1"]'),
        _b64(b'[1, ""]'),
        _b64(b'[-5, "e-1"]'),
        _b64(b'[1, "e-1", 3]'),
        "A" * 600,
    ],
)
async def test_list_bad_cursor(store: ExecutionStore, cursor: str) -> None:
    await _populate(store, 2)
    with pytest.raises(ValueError, match="invalid cursor"):
        await store.list_executions(ListQuery(requester="req-1", cursor=cursor))


async def test_list_bad_limit(store: ExecutionStore) -> None:
    with pytest.raises(ValueError, match="limit"):
        await store.list_executions(ListQuery(requester="req-1", limit=0))


# --- retention --------------------------------------------------------------------------------


async def test_purge_and_tombstones(store: ExecutionStore, clock: ManualClock) -> None:
    old_done, old_pending, live, recent = [
        await store.create_execution(new_execution(at=T0)) for _ in range(4)
    ]
    clock.set(T0 + timedelta(seconds=1))
    await move(store, old_done.id, S.BID_ACCEPTED, callback=builder())
    await move(store, old_done.id, S.COMPLETED, Cause.PUBLISH_COMPLETED, callback=builder())
    await store.mark_delivered(old_done.id, 1)
    await store.mark_delivered(old_done.id, 2)
    await move(store, old_pending.id, S.FAILED, Cause.ENGINE_ERROR, callback=builder())
    await move(store, live.id, S.RUNNING)
    clock.set(T0 + timedelta(seconds=10))
    await move(store, recent.id, S.CANCELLED, Cause.BID_EXPIRED)

    clock.set(T0 + timedelta(seconds=20))
    deleted = await store.purge(T0 + timedelta(seconds=5), T0)
    assert deleted == [old_done.id]
    with pytest.raises(ExecutionNotFound):
        await store.get_execution(old_done.id)
    assert await store.get_history(old_done.id) == []
    assert await store.get_callbacks(old_done.id) == []
    tomb = await store.get_tombstone(old_done.id)
    assert tomb is not None
    assert (tomb.id, tomb.job_id, tomb.requester) == (old_done.id, old_done.job_id, "nodeID-1")
    assert (tomb.state, tomb.cause, tomb.deleted_at) == (
        S.COMPLETED,
        "PublishCompleted",
        T0 + timedelta(seconds=20),
    )
    # an undelivered callback keeps its execution; live and recent ones stay too
    for kept in (old_pending, live, recent):
        await store.get_execution(kept.id)
        assert await store.get_tombstone(kept.id) is None
    assert len(await store.get_callbacks(old_pending.id)) == 1

    await store.mark_delivered(old_pending.id, 1)
    clock.set(T0 + timedelta(seconds=30))
    assert await store.purge(T0 + timedelta(seconds=5), T0) == [old_pending.id]
    tomb = await store.get_tombstone(old_pending.id)
    assert tomb is not None and (tomb.state, tomb.cause) == (S.FAILED, "EngineError")
    assert await store.count() == 2

    # tombstones older than the second bound go
    assert await store.purge(T0, T0 + timedelta(seconds=25)) == []
    assert await store.get_tombstone(old_done.id) is None
    assert await store.get_tombstone(old_pending.id) is not None
    clock.set(T0 + timedelta(seconds=40))
    assert await store.purge(T0 + timedelta(seconds=11), T0 + timedelta(seconds=31)) == [recent.id]
    assert await store.get_tombstone(old_pending.id) is None
    assert await store.get_tombstone(recent.id) is not None
    assert [e.id for e in await store.live_executions()] == [live.id]


async def test_purge_nothing(store: ExecutionStore) -> None:
    await created(store)
    assert await store.purge(datetime.now(UTC) + timedelta(days=1), T0) == []


# --- concurrency ------------------------------------------------------------------------------


async def test_concurrent_compare_and_set_one_winner(store: ExecutionStore) -> None:
    execution = await created(store)
    results = await asyncio.gather(
        *(
            move(
                store,
                execution.id,
                S.BID_ACCEPTED,
                Cause.BID_ACCEPTED,
                expected_version=1,
                requester=f"req-{i}",
                callback=builder(),
            )
            for i in range(50)
        ),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, UpdateResult)]
    losers = [r for r in results if not isinstance(r, UpdateResult)]
    assert len(winners) == 1 and len(losers) == 49
    assert all(isinstance(r, VersionMismatchError) for r in losers)
    got = await store.get_execution(execution.id)
    assert (got.version, got.next_seq) == (2, 2)
    history = await store.get_history(execution.id)
    assert len(history) == 2 and history[1].requester.startswith("req-")
    assert [r.seq for r in await store.get_callbacks(execution.id)] == [1]


async def test_concurrent_creates_one_winner(store: ExecutionStore) -> None:
    execution = new_execution()
    results = await asyncio.gather(
        *(store.create_execution(execution) for _ in range(20)), return_exceptions=True
    )
    assert sum(isinstance(r, Execution) for r in results) == 1
    assert sum(isinstance(r, AlreadyExistsError) for r in results) == 19


async def test_concurrent_updates_on_many_executions(store: ExecutionStore) -> None:
    executions = [await created(store) for _ in range(20)]
    await asyncio.gather(
        *(
            move(store, e.id, state, callback=builder())
            for state in (S.BID_ACCEPTED,)
            for e in executions
        )
    )
    await asyncio.gather(*(move(store, e.id, S.RUNNING, callback=builder()) for e in executions))
    for e in executions:
        assert [r.seq for r in await store.get_callbacks(e.id)] == [1, 2]
    assert (await store.outbox_stats()).pending == 40


# --- SQLite only --------------------------------------------------------------------------------


async def test_sqlite_survives_reopen(db_path: Path, clock: ManualClock) -> None:
    db_path.parent.mkdir(parents=True)
    first = SqliteStore(db_path, clock=clock)
    await first.open()
    try:
        execution = await first.create_execution(new_execution(), comment="first")
        await move(first, execution.id, S.BID_ACCEPTED, Cause.BID_ACCEPTED, callback=builder())
        await first.record_attempt(execution.id, 1, "down", park=True)
        done = await created(first)
        await move(first, done.id, S.CANCELLED)
        await first.purge(datetime.now(UTC) + timedelta(days=1), T0)
        before = (
            await first.get_execution(execution.id),
            await first.get_history(execution.id),
            await first.get_callbacks(execution.id),
        )
    finally:
        await first.close()

    second = SqliteStore(db_path, clock=clock)
    await second.open()
    try:
        after = (
            await second.get_execution(execution.id),
            await second.get_history(execution.id),
            await second.get_callbacks(execution.id),
        )
        assert after == before
        assert after[2][0].parked and after[2][0].last_error == "down"
        assert await second.get_tombstone(done.id) is not None
        result = await move(second, execution.id, S.RUNNING, callback=builder())
        assert result.outbox is not None and result.outbox.seq == 2
    finally:
        await second.close()


async def test_sqlite_migrations_idempotent(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    latest = migrations()[-1][0]
    for _ in range(3):
        store = SqliteStore(db_path)
        await store.open()
        try:
            assert await store.pragma("user_version") == latest
            await created(store)
        finally:
            await store.close()
    conn = sqlite3.connect(db_path)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"executions", "history", "outbox", "tombstones"} <= tables
        assert conn.execute("SELECT count(*) FROM executions").fetchone()[0] == 3
    finally:
        conn.close()


def insert_before_5(conn: sqlite3.Connection, e: Execution, ord_: int) -> None:
    """An execution row as schemas 1-4 held it: the whole execution in ``doc``."""
    conn.execute(
        "INSERT INTO executions (job_id, requester, state, version, update_us, deadline_us,"
        " last_cause, doc, id, create_us, ord) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
        (*execution_params(e)[:7], encode_execution(e), e.id, ord_),
    )


def schema_4_store(db_path: Path, executions: list[Execution]) -> sqlite3.Connection:
    """A store file as schema 4 left it, holding ``executions`` (``ord`` 10, 11, …); its
    connection stays open for more rows."""
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path, isolation_level=None)
    setup(conn, "normal", 0, migrations()[:4])
    for ord_, e in enumerate(executions, start=10):
        insert_before_5(conn, e, ord_)
    return conn


async def test_sqlite_migration_5_moves_each_job_apart(db_path: Path) -> None:
    """Schema 5 keeps each execution's job in ``jobs``: a store made by schema 4 reads
    back every execution unchanged, its documents no longer carry the job, and updates
    and deletes go on from there."""
    executions = [new_execution(at=T0) for _ in range(3)]
    schema_4_store(db_path, executions).close()
    store = SqliteStore(db_path)
    await store.open()
    try:
        assert await store.pragma("user_version") == migrations()[-1][0]
        for e in executions:
            assert await store.get_execution(e.id) == e
        assert await store.get_executions_for_job(executions[1].job_id) == [executions[1]]
        moved = await move(store, executions[1].id, S.BID_ACCEPTED, Cause.BID_ACCEPTED)
        assert await store.get_execution(executions[1].id) == moved.execution
        assert moved.execution.job == executions[1].job
        await store.delete_execution(executions[0].id)  # its job goes with it
        assert await store.pragma("integrity_check") == "ok"
        assert await store.pragma("foreign_key_check") is None
    finally:
        await store.close()
    conn = sqlite3.connect(db_path)
    try:
        rows = conn.execute("SELECT id, doc FROM executions ORDER BY ord").fetchall()
        assert [r[0] for r in rows] == [e.id for e in executions[1:]]
        assert all(b'"job":null' in r[1] and b"ClientID" not in r[1] for r in rows)
        assert conn.execute("SELECT execution_ord FROM jobs ORDER BY 1").fetchall() == [
            (11,),
            (12,),
        ]
    finally:
        conn.close()


async def test_sqlite_migration_6_keys_the_outbox_by_ord(db_path: Path) -> None:
    """Schema 6 keys the outbox by the execution's ``ord``: a store made before keeps
    every callback, delivered, parked or pending, and the dispatcher's operations go on."""
    executions = [new_execution(at=T0) for _ in range(2)]
    conn = schema_4_store(db_path, executions)
    for e in executions:
        for seq, delivered, parked in ((1, 1, 0), (2, 0, 1), (3, 0, 0)):
            conn.execute(
                "INSERT INTO outbox (execution_id, seq, subject, kind, body, headers,"
                " created_us, attempts, parked, delivered, last_error, link)"
                " VALUES (?, ?, 's', 'k', ?, '{}', ?, 1, ?, ?, 'e', '{}')",
                (e.id, seq, b"body %d" % seq, seq, parked, delivered),
            )
    conn.close()
    first, second = (e.id for e in executions)
    store = SqliteStore(db_path)
    await store.open()
    try:
        assert await store.pragma("user_version") == migrations()[-1][0]
        for e in executions:
            rows = await store.get_callbacks(e.id)
            assert [(r.execution_id, r.seq, r.delivered, r.parked, r.body) for r in rows] == [
                (e.id, 1, True, False, b"body 1"),
                (e.id, 2, False, True, b"body 2"),
                (e.id, 3, False, False, b"body 3"),
            ]
        pending = [(r.execution_id, r.seq) for r in await store.pending_outbox()]
        assert pending == sorted([(first, 2), (second, 2)]) + sorted([(first, 3), (second, 3)])
        await store.mark_delivered(first, 3)
        await store.record_attempt(second, 3, "down", park=True)
        assert (await store.outbox_stats()).pending == 3
        assert [(r.seq, r.delivered) for r in await store.get_callbacks(first)][2] == (3, True)
        assert (await store.get_callbacks(second))[2].last_error == "down"
        await store.delete_execution(first)  # its callbacks go with it
        assert await store.get_callbacks(first) == []
        assert len(await store.get_callbacks(second)) == 3
        assert await store.pragma("integrity_check") == "ok"
        assert await store.pragma("foreign_key_check") is None
    finally:
        await store.close()


async def test_sqlite_migration_7_dates_the_end_of_terminal_executions(db_path: Path) -> None:
    """Schema 7 finds live and terminal executions by ``ended_us``, set by the move that
    ends one: a store made before knows which are which, and moves go on setting it."""
    created_, running, done = (new_execution(at=T0) for _ in range(3))
    running = dataclass_replace(running, state=S.RUNNING, version=3)
    done = dataclass_replace(done, state=S.COMPLETED, version=7)
    schema_4_store(db_path, [created_, running, done]).close()
    clock = ManualClock()
    clock.set(T0 + timedelta(seconds=10))
    store = SqliteStore(db_path, clock=clock)
    await store.open()
    reader = sqlite3.connect(db_path)
    try:
        assert [e.id for e in await store.live_executions()] == [created_.id, running.id]
        await move(store, running.id, S.WAITING_VERIFICATION, Cause.RUN_COMPLETED)
        await move(store, created_.id, S.CANCELLED, Cause.CANCEL)
        ended = dict(reader.execute("SELECT id, ended_us FROM executions").fetchall())
        assert ended == {
            created_.id: to_us(T0 + timedelta(seconds=10)),  # the cancel's time
            running.id: None,
            done.id: to_us(T0),  # its last update time, from before schema 7
        }
        assert [e.id for e in await store.live_executions()] == [running.id]
        assert await store.purge(T0 + timedelta(seconds=5), T0) == [done.id]
        assert await store.purge(T0 + timedelta(seconds=11), T0) == [created_.id]
        assert await store.pragma("integrity_check") == "ok"
    finally:
        reader.close()
        await store.close()


async def test_sqlite_upgrade_is_logged_migration_by_migration(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Upgrading a store that has data logs each migration, its time and what it does (some
    take seconds on a big store, while the node is not up); a new store logs none."""
    schema_4_store(db_path, [new_execution(at=T0)]).close()
    caplog.set_level(logging.INFO, logger="worker.store.migrate")
    store = SqliteStore(db_path)
    await store.open()
    await store.close()
    upgrades = [r.getMessage() for r in caplog.records if r.name == "worker.store.migrate"]
    assert [m.split(" in ")[0] for m in upgrades] == [
        f"store upgraded to schema {n}" for n, _ in migrations()[4:]
    ]
    assert "each execution's job in a table of its own" in upgrades[0]
    caplog.clear()
    fresh = SqliteStore(db_path.parent / "fresh.db")
    await fresh.open()
    await fresh.close()
    assert not [r for r in caplog.records if r.name == "worker.store.migrate"]


async def test_sqlite_migration_3_keeps_each_history_row(db_path: Path) -> None:
    """Schema 2 keyed history by execution ID, 3 by the execution's ``ord``: a store made
    by schema 2 keeps every row, in order, and the rows still go with their execution."""
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path, isolation_level=None)
    setup(conn, "normal", 0, migrations()[:2])
    executions = [new_execution(at=T0) for _ in range(3)]
    for ord_, e in enumerate(executions, start=10):
        insert_before_5(conn, e, ord_)
        for version in (1, 2):  # rows as schema 2 held them, whatever their states
            conn.execute(
                "INSERT INTO history (execution_id, new_version, previous_state, new_state,"
                " cause, requester, comment, time_us) VALUES (?, ?, 'Created', 'Created', ?,"
                " 'r', ?, ?)",
                (e.id, version, f"cause {version}", f"{e.id} v{version}", version),
            )
    conn.close()
    store = SqliteStore(db_path)
    await store.open()
    try:
        assert await store.pragma("user_version") == migrations()[-1][0]
        for e in executions:
            history = await store.get_history(e.id)
            assert [(h.new_version, h.comment, h.cause) for h in history] == [
                (1, f"{e.id} v1", "cause 1"),
                (2, f"{e.id} v2", "cause 2"),
            ]
        await store.delete_execution(executions[0].id)  # its history goes with it
        assert await store.get_history(executions[0].id) == []
        assert len(await store.get_history(executions[1].id)) == 2
        new = await created(store)  # and new rows go on from there
        assert len(await store.get_history(new.id)) == 1
        assert await store.pragma("integrity_check") == "ok"
        assert await store.pragma("foreign_key_check") is None
    finally:
        await store.close()


async def test_sqlite_refuses_newer_schema(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    store = SqliteStore(db_path)
    with pytest.raises(StoreError, match="newer"):
        await store.open()
    await store.close()


async def test_sqlite_pragmas_and_integrity(sqlite_store: SqliteStore) -> None:
    for _ in range(5):
        e = await created(sqlite_store)
        await move(sqlite_store, e.id, S.CANCELLED, callback=builder())
    await sqlite_store.purge(datetime.now(UTC) + timedelta(days=1), T0)
    assert await sqlite_store.pragma("integrity_check") == "ok"
    assert await sqlite_store.pragma("foreign_key_check") is None
    assert await sqlite_store.pragma("journal_mode") == "wal"
    assert await sqlite_store.pragma("foreign_keys") == 1
    if sqlite_store._sync == "normal":
        assert await sqlite_store.pragma("synchronous") == 1
        # Writes on the loop: the connection never waits on a lock itself, the store
        # retries a busy BEGIN from a timer for its busy timeout (5 s by default).
        assert await sqlite_store.pragma("busy_timeout") == 0
    else:
        assert await sqlite_store.pragma("synchronous") == 2
        assert await sqlite_store.pragma("busy_timeout") == 5000  # its thread waits
    with pytest.raises(ValueError):
        await sqlite_store.pragma("user_version = 3")


async def test_sqlite_sync_full(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    store = SqliteStore(db_path, sync="full")
    await store.open()
    try:
        assert await store.pragma("synchronous") == 2
        assert await store.pragma("busy_timeout") == 5000  # its own thread waits
        e = await created(store)
        await move(store, e.id, S.CANCELLED, callback=builder())
        assert (await store.get_execution(e.id)).state is S.CANCELLED
    finally:
        await store.close()
    with pytest.raises(ValueError):
        SqliteStore(db_path, sync="extra")  # type: ignore[arg-type]


async def test_sqlite_disk_full_is_unavailable(sqlite_store: SqliteStore) -> None:
    existing = await created(sqlite_store)
    # max_page_count is per connection: set it on the store's own writer connection
    pages = await sqlite_store.pragma("page_count")
    await _writer_pragma(sqlite_store, f"PRAGMA max_page_count = {pages + 2}")
    big = new_execution()
    # More pages than the file's free ones (a migration may leave a few) and the 2 allowed.
    big.job.Metadata.ClientID = "x" * 200_000
    with pytest.raises(StoreUnavailableError, match="full"):
        await sqlite_store.create_execution(big)
    # the failed transaction was rolled back and the store still works
    with pytest.raises(ExecutionNotFound):
        await sqlite_store.get_execution(big.id)
    assert await sqlite_store.get_executions_for_job(existing.job_id) == [existing]
    await _writer_pragma(sqlite_store, "PRAGMA max_page_count = 1073741823")
    await sqlite_store.create_execution(big)
    assert (await sqlite_store.get_execution(big.id)).job.Metadata.ClientID == "x" * 200_000
    assert await sqlite_store.pragma("integrity_check") == "ok"


async def _store_with_one(db_path: Path, busy_timeout: float) -> tuple[SqliteStore, Execution]:
    """An opened SqliteStore (sync=normal) holding one Created execution."""
    db_path.parent.mkdir(parents=True)
    store = SqliteStore(db_path, busy_timeout=busy_timeout)
    await store.open()
    return store, await created(store)


async def test_sqlite_locked_is_unavailable(db_path: Path) -> None:
    store, execution = await _store_with_one(db_path, busy_timeout=0.05)
    try:
        other = sqlite3.connect(db_path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
            with pytest.raises(StoreUnavailableError, match="locked"):
                await move(store, execution.id, S.BID_ACCEPTED)
            assert await store.get_execution(execution.id) == execution  # WAL: reads go on
            other.execute("ROLLBACK")
        finally:
            other.close()
        result = await move(store, execution.id, S.BID_ACCEPTED)
        assert result.execution.version == 2
    finally:
        await store.close()


async def test_sqlite_write_waits_for_a_lock_without_blocking_the_loop(db_path: Path) -> None:
    """sync=normal commits on the event loop; a lock held by another process must not
    stall the loop for the busy timeout: the write waits from a timer and then commits."""
    store, execution = await _store_with_one(db_path, busy_timeout=30)
    try:
        other = sqlite3.connect(db_path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            waiting = asyncio.create_task(move(store, execution.id, S.BID_ACCEPTED))
            for _ in range(50):  # the loop keeps turning while the write waits
                await asyncio.sleep(0)
            assert not waiting.done()
            assert await store.get_execution(execution.id) == execution
            other.execute("ROLLBACK")
        finally:
            other.close()
        result = await asyncio.wait_for(waiting, timeout=10)
        assert result.execution.version == 2
        assert (await store.get_history(execution.id))[-1].new_state is S.BID_ACCEPTED
    finally:
        await store.close()


async def test_sqlite_unopenable_path_is_unavailable(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "missing-dir" / "x.db")
    with pytest.raises(StoreUnavailableError):
        await store.open()
    await store.close()


async def test_sqlite_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not an SQLite file" * 200)
    store = SqliteStore(path)
    with pytest.raises(StoreError, match="not a database") as info:
        await store.open()
    assert not isinstance(info.value, StoreUnavailableError)
    await store.close()


async def _writer_pragma(store: SqliteStore, sql: str) -> None:
    """``sql`` on the store's writer connection (a per-connection pragma)."""
    await store._run(lambda conn: conn.execute(sql))


@pytest.fixture
def batch_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the group commits the SQLite store makes (to check that batches form)."""
    sizes: list[int] = []
    original = sqlite_module._group

    def spy(conn: sqlite3.Connection, batch: list[Any]) -> None:
        sizes.append(len(batch))
        original(conn, batch)

    monkeypatch.setattr(sqlite_module, "_group", spy)
    return sizes


async def test_sqlite_group_commit_answers_each_caller(
    sqlite_store: SqliteStore, batch_sizes: list[int]
) -> None:
    executions = [await created(sqlite_store) for _ in range(30)]
    requests = []
    for i, e in enumerate(executions):
        if i % 3 == 0:
            requests.append(move(sqlite_store, e.id, S.BID_ACCEPTED, callback=builder()))
        elif i % 3 == 1:
            requests.append(move(sqlite_store, e.id, S.BID_ACCEPTED, expected_version=5))
        else:
            requests.append(move(sqlite_store, f"{e.id}-unknown", S.BID_ACCEPTED))
    results = await asyncio.gather(*requests, return_exceptions=True)
    assert max(batch_sizes) > 1

    for i, (e, result) in enumerate(zip(executions, results, strict=True)):
        got = await sqlite_store.get_execution(e.id)
        if i % 3 == 0:
            assert isinstance(result, UpdateResult) and result.execution == got
            assert result.outbox is not None and result.outbox.seq == 1
            assert got.version == 2
        else:
            expected = VersionMismatchError if i % 3 == 1 else ExecutionNotFound
            assert isinstance(result, expected)
            assert got == e and len(await sqlite_store.get_history(e.id)) == 1
    assert (await sqlite_store.outbox_stats()).pending == 10


async def test_sqlite_group_commit_disk_full(
    sqlite_store: SqliteStore, batch_sizes: list[int]
) -> None:
    pages = await sqlite_store.pragma("page_count")
    await _writer_pragma(sqlite_store, f"PRAGMA max_page_count = {pages + 30}")
    bigs = []
    for _ in range(40):
        big = new_execution()
        big.job.Metadata.ClientID = "x" * 8_000
        bigs.append(big)
    results = await asyncio.gather(
        *(sqlite_store.create_execution(b) for b in bigs), return_exceptions=True
    )
    assert max(batch_sizes) > 1
    ok = [b for b, r in zip(bigs, results, strict=True) if isinstance(r, Execution)]
    failed = [b for b, r in zip(bigs, results, strict=True) if not isinstance(r, Execution)]
    assert failed  # 40 rows of ~3 pages never fit in 30 pages
    assert all(isinstance(r, (Execution, StoreUnavailableError)) for r in results)
    for b in ok:  # what was reported done is there, what failed is not
        assert (await sqlite_store.get_execution(b.id)).id == b.id
    for b in failed:
        with pytest.raises(ExecutionNotFound):
            await sqlite_store.get_execution(b.id)
    assert await sqlite_store.count() == len(ok)
    assert await sqlite_store.pragma("integrity_check") == "ok"
    await _writer_pragma(sqlite_store, "PRAGMA max_page_count = 1073741823")
    await sqlite_store.create_execution(failed[0])  # space again: writes go through
    assert await sqlite_store.count() == len(ok) + 1


async def test_find_active_sees_executions_after_reopen(tmp_path: Path) -> None:
    """The SQLite store answers find_active from an in-memory index of live keys: it
    must be rebuilt on open, and follow creates and terminal moves."""
    path = tmp_path / "idx.db"
    store = SqliteStore(path)
    await store.open()
    try:
        ex = new_execution()
        await store.create_execution(ex)
        assert (await store.find_active(ex.requester, ex.job_id)) is not None
    finally:
        await store.close()
    store = SqliteStore(path)
    await store.open()
    try:
        found = await store.find_active(ex.requester, ex.job_id)
        assert found is not None and found.id == ex.id
        await store.update(
            UpdateRequest(execution_id=ex.id, cause=Cause.CANCEL, new_state=S.CANCELLED)
        )
        assert await store.find_active(ex.requester, ex.job_id) is None
    finally:
        await store.close()


async def test_update_with_an_owner_refuses_another_requesters_execution(
    store: ExecutionStore,
) -> None:
    """An owned update of another requester's execution is 'not found' and changes
    nothing; the owner's goes through."""
    execution = await created(store)
    request = UpdateRequest(
        execution_id=execution.id,
        cause=Cause.BID_ACCEPTED,
        new_state=S.BID_ACCEPTED,
        expected_states=frozenset({S.CREATED}),
        owner="someone-else",
    )
    with pytest.raises(ExecutionNotFound):
        await store.update(request)
    assert (await store.get_execution(execution.id)).version == 1
    request.owner = execution.requester
    assert (await store.update(request)).execution.state is S.BID_ACCEPTED


async def test_sqlite_writes_wait_for_a_call_on_the_writer(sqlite_store: SqliteStore) -> None:
    """A call (pragmas, optimize) has the writer connection to itself in a worker thread:
    writes made meanwhile wait for it, then all commit."""
    executions = [await created(sqlite_store) for _ in range(20)]
    started, release = threading.Event(), threading.Event()

    def slow_call(conn: sqlite3.Connection) -> str:
        started.set()
        assert release.wait(10)
        return str(conn.execute("PRAGMA quick_check").fetchone()[0])

    call = asyncio.create_task(sqlite_store._run(slow_call))
    await assert_eventually(started.is_set)
    moves = [
        asyncio.create_task(move(sqlite_store, e.id, S.BID_ACCEPTED, callback=builder()))
        for e in executions
    ]
    for _ in range(20):
        await asyncio.sleep(0)
    assert not any(m.done() for m in moves)  # held back while the call has the connection
    release.set()
    assert await call == "ok"
    results = await asyncio.gather(*moves)
    assert [r.execution.version for r in results] == [2] * len(executions)
    assert (await sqlite_store.outbox_stats()).pending == len(executions)
    assert await sqlite_store.pragma("integrity_check") == "ok"


# --- updates from the store's own copy -----------------------------------------------------


def _count_statements(store: SqliteStore, prefix: str) -> list[str]:
    """The statements starting with ``prefix`` the store's writer connection runs from now
    (the writer is on the loop with sync=normal, in its thread with sync=full: both call
    the trace callback on the connection)."""
    seen: list[str] = []
    db = store._db
    assert db is not None
    conn = db._conn
    assert conn is not None
    conn.set_trace_callback(lambda sql: seen.append(sql) if sql.startswith(prefix) else None)
    return seen


async def test_sqlite_updates_skip_the_read_of_an_execution_it_wrote(
    sqlite_store: SqliteStore,
) -> None:
    e = await created(sqlite_store)
    reads = _count_statements(sqlite_store, "SELECT doc")
    r1 = await move(sqlite_store, e.id, S.BID_ACCEPTED, Cause.BID_ACCEPTED)
    r2 = await move(sqlite_store, e.id, S.RUNNING, Cause.RUN_STARTED, callback=builder())
    r3 = await move(sqlite_store, e.id, S.CANCELLED, Cause.CANCEL)
    assert reads == []  # each update started from the copy the store had written
    assert [r.execution.version for r in (r1, r2, r3)] == [2, 3, 4]
    assert await sqlite_store.get_execution(e.id) == r3.execution
    history = await sqlite_store.get_history(e.id)
    assert [(h.new_version, h.new_state) for h in history] == [
        (1, S.CREATED),
        (2, S.BID_ACCEPTED),
        (3, S.RUNNING),
        (4, S.CANCELLED),
    ]
    assert e.id not in sqlite_store._latest  # terminal: not kept


async def test_sqlite_update_ignores_a_copy_changed_by_its_holder(
    sqlite_store: SqliteStore,
) -> None:
    """The execution an update returns is the store's copy too; changing it in place
    must not change what the next update writes."""
    e = await created(sqlite_store)
    original = (e.ask_trace, e.job.Metadata.ClientID)  # e shares its job with the copies
    r1 = await move(sqlite_store, e.id, S.BID_ACCEPTED, Cause.BID_ACCEPTED)
    r1.execution.ask_trace = {"changed": "by the caller"}
    r1.execution.job.Metadata.ClientID = "changed too"
    reads = _count_statements(sqlite_store, "SELECT doc")
    r2 = await move(sqlite_store, e.id, S.RUNNING, Cause.RUN_STARTED)
    assert len(reads) == 1  # the copy did not match the stored row: read it
    stored = await sqlite_store.get_execution(e.id)
    assert stored == r2.execution
    assert (stored.ask_trace, stored.job.Metadata.ClientID) == original
    assert stored.version == 3


async def test_sqlite_update_ignores_a_job_changed_by_its_holder(
    sqlite_store: SqliteStore,
) -> None:
    """The job is stored apart and never written again, but the store's copy shares it
    with its holders: one changed in place must not come back from the next update."""
    e = await created(sqlite_store)
    original = e.job.Metadata.ClientID
    r1 = await move(sqlite_store, e.id, S.BID_ACCEPTED, Cause.BID_ACCEPTED)
    r1.execution.job.Metadata.ClientID = "changed by the caller"
    reads = _count_statements(sqlite_store, "SELECT doc")
    r2 = await move(sqlite_store, e.id, S.RUNNING, Cause.RUN_STARTED)
    assert len(reads) == 1  # the copy's job did not match the stored one: read it
    assert r2.execution.job.Metadata.ClientID == original
    assert await sqlite_store.get_execution(e.id) == r2.execution


async def test_sqlite_live_executions_are_kept_as_the_store_copies(
    sqlite_store: SqliteStore, db_path: Path, clock: ManualClock
) -> None:
    """After a restart the store has no copy of anything: live_executions keeps what it
    read, so moving those executions (recovery's work) reads none of them again; one its
    holder changed in place is read again, and its change is not written."""
    usage = ResourceUsage(CPU=0.5, Memory=2)  # a float, as the node's: "CPU":1 reads as 1.0
    first, second = [
        await sqlite_store.create_execution(dataclass_replace(new_execution(), usage=usage))
        for _ in range(2)
    ]
    await move(sqlite_store, first.id, S.BID_ACCEPTED, Cause.BID_ACCEPTED)
    await sqlite_store.close()
    store = SqliteStore(db_path, clock=clock, sync=sqlite_store._sync)
    await store.open()
    try:
        live = {e.id: e for e in await store.live_executions()}
        assert set(live) == {first.id, second.id}
        original = live[second.id].job.Metadata.ClientID
        live[second.id].job.Metadata.ClientID = "changed by the caller"
        reads = _count_statements(store, "SELECT doc")
        r1 = await move(store, first.id, S.RUNNING, Cause.RUN_STARTED)
        assert reads == []  # the copy live_executions read was current: no read
        r2 = await move(store, second.id, S.BID_ACCEPTED, Cause.BID_ACCEPTED)
        assert len(reads) == 1  # changed in place: read again
        assert r2.execution.job.Metadata.ClientID == original
        assert await store.get_execution(first.id) == r1.execution
        assert await store.get_execution(second.id) == r2.execution
        assert [h.new_version for h in await store.get_history(first.id)] == [1, 2, 3]
    finally:
        await store.close()


async def test_sqlite_update_follows_a_row_changed_behind_its_back(
    sqlite_store: SqliteStore, db_path: Path
) -> None:
    """Another writer (an operator's sqlite3 shell, say) changed the row: the store's copy
    no longer matches it, so the update starts from the stored row."""
    e = await created(sqlite_store)
    await move(sqlite_store, e.id, S.BID_ACCEPTED, Cause.BID_ACCEPTED)
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        doc = other.execute("SELECT doc FROM executions WHERE id = ?", (e.id,)).fetchone()[0]
        needle = b'"ask_trace":%s' % msgspec.json.encode(e.ask_trace)
        assert needle in doc
        changed = doc.replace(needle, b'"ask_trace":{"by":"hand"}')
        other.execute("UPDATE executions SET doc = ? WHERE id = ?", (changed, e.id))
    finally:
        other.close()
    r = await move(sqlite_store, e.id, S.RUNNING, Cause.RUN_STARTED, expected_version=2)
    assert (r.execution.version, r.execution.ask_trace) == (3, {"by": "hand"})
    assert (await sqlite_store.get_execution(e.id)).ask_trace == {"by": "hand"}
    assert [h.new_version for h in await sqlite_store.get_history(e.id)] == [1, 2, 3]


async def test_sqlite_create_after_another_writer_took_the_next_ord(
    sqlite_store: SqliteStore, db_path: Path
) -> None:
    """The store counts ``ord`` itself. A row another writer added took the number it
    would give next: the create asks the database and goes through, still in order."""
    first = await created(sqlite_store)
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute(
            "INSERT INTO executions (id, ord, job_id, requester, state, version, create_us,"
            " update_us, deadline_us, last_cause, doc) SELECT 'e-by-hand', ord + 1, job_id,"
            " requester, state, version, create_us, update_us, deadline_us, last_cause, doc"
            " FROM executions WHERE id = ?",
            (first.id,),
        )
    finally:
        other.close()
    second = await created(sqlite_store)
    third = await created(sqlite_store)
    check = sqlite3.connect(db_path)
    try:
        ords = dict(check.execute("SELECT id, ord FROM executions").fetchall())
    finally:
        check.close()
    assert ords[first.id] < ords["e-by-hand"] < ords[second.id] < ords[third.id]
    assert await sqlite_store.get_execution(second.id) == second


async def test_sqlite_reads_a_document_with_a_field_it_no_longer_has(
    sqlite_store: SqliteStore, db_path: Path
) -> None:
    """Nodes before this one kept ``spec_hash`` (a hash of the Spec) in each document: such a
    row still reads, and its next update writes the document without it."""
    e = await created(sqlite_store)
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        doc = other.execute("SELECT doc FROM executions WHERE id = ?", (e.id,)).fetchone()[0]
        old = doc.replace(b',"ask_reply":', b',"spec_hash":"%s","ask_reply":' % (b"ab" * 32), 1)
        assert old != doc
        other.execute("UPDATE executions SET doc = ? WHERE id = ?", (old, e.id))
    finally:
        other.close()
    assert await sqlite_store.get_execution(e.id) == e
    r = await move(sqlite_store, e.id, S.BID_ACCEPTED, Cause.BID_ACCEPTED, expected_version=1)
    assert r.execution.version == 2
    check = sqlite3.connect(db_path)
    try:
        (doc,) = check.execute("SELECT doc FROM executions WHERE id = ?", (e.id,)).fetchone()
    finally:
        check.close()
    assert b"spec_hash" not in doc


async def test_sqlite_racing_updates_of_one_execution_in_one_group(
    sqlite_store: SqliteStore, batch_sizes: list[int]
) -> None:
    """Two competing moves of each execution, committed in groups: the store's copy of an
    execution is out of date once the first move is in, so the second move must see the
    stored row. Exactly one move of each wins."""
    executions = [await created(sqlite_store) for _ in range(10)]
    batch_sizes.clear()
    created_only = frozenset({S.CREATED})
    moves = []
    for e in executions:
        moves.append(
            move(
                sqlite_store, e.id, S.BID_ACCEPTED, Cause.BID_ACCEPTED, expected_states=created_only
            )
        )
        moves.append(
            move(sqlite_store, e.id, S.CANCELLED, Cause.BID_REJECTED, expected_states=created_only)
        )
    results = await asyncio.gather(*moves, return_exceptions=True)
    assert max(batch_sizes) > 2  # both moves of some executions were in one group
    for i, e in enumerate(executions):
        pair = results[2 * i : 2 * i + 2]
        won = [r for r in pair if isinstance(r, UpdateResult)]
        lost = [r for r in pair if isinstance(r, BaseException)]
        assert len(won) == 1 and len(lost) == 1 and isinstance(lost[0], InvalidStateError)
        assert await sqlite_store.get_execution(e.id) == won[0].execution
        assert [h.new_version for h in await sqlite_store.get_history(e.id)] == [1, 2]
        if won[0].execution.state is S.BID_ACCEPTED:  # the copy kept is the winner's
            after = await move(sqlite_store, e.id, S.RUNNING, Cause.RUN_STARTED)
            assert after.execution.version == 3


async def test_sqlite_update_survives_a_copy_its_holder_broke(sqlite_store: SqliteStore) -> None:
    """A copy changed into something that does not even encode is only a copy: the
    update reads the stored row and goes through."""
    e = await created(sqlite_store)
    r1 = await move(sqlite_store, e.id, S.BID_ACCEPTED, Cause.BID_ACCEPTED)
    r1.execution.ask_trace = object()  # type: ignore[assignment]
    r2 = await move(sqlite_store, e.id, S.RUNNING, Cause.RUN_STARTED)
    assert (r2.execution.version, r2.execution.ask_trace) == (3, e.ask_trace)
    assert await sqlite_store.get_execution(e.id) == r2.execution


@pytest.mark.parametrize("sync", ["normal", "full"])
async def test_sqlite_wal_starts_over_under_steady_writes(
    sync: Literal["normal", "full"], db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers that never pause: a PASSIVE checkpoint never catches up with them, and
    SQLite starts the WAL over only once everything in it has been copied. The store's
    RESTART checkpoint past WAL_RESTART_FRAMES keeps the file from growing without end
    (it did: ~22 KB per create+reject, all of it kept)."""
    monkeypatch.setattr(sqlite_wal, "CHECKPOINT_INTERVAL", 0.02)
    monkeypatch.setattr(sqlite_wal, "WAL_RESTART_FRAMES", 100)
    db_path.parent.mkdir(parents=True)
    store = SqliteStore(db_path, sync=sync)
    await store.open()
    try:
        await _steady_writes(store, db_path.with_name(db_path.name + "-wal"))
    finally:
        await store.close()


def _count_checkpoints(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Checkpoints every 10 ms, a RESTART past 20 frames, and how many of each ran."""
    monkeypatch.setattr(sqlite_wal, "CHECKPOINT_INTERVAL", 0.01)
    monkeypatch.setattr(sqlite_wal, "WAL_RESTART_FRAMES", 20)
    calls = {"passive": 0, "restart": 0}
    for kind in list(calls):
        original = getattr(sqlite_wal, f"{kind}_checkpoint")

        def counted(conn: sqlite3.Connection, kind: str = kind, original: Any = original) -> Any:
            calls[kind] += 1
            return original(conn)

        monkeypatch.setattr(sqlite_wal, f"{kind}_checkpoint", counted)
    return calls


async def _create_and_reject(store: SqliteStore, n: int) -> None:
    for _ in range(n):
        e = await created(store)
        await move(store, e.id, S.CANCELLED, Cause.BID_REJECTED)


async def test_sqlite_no_wal_restart_while_restarts_are_held(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A RESTART checkpoint makes the writes wait for the disk: inside
    ``restarts.held()`` none starts, however large the WAL, while PASSIVE ones go on;
    the first check after the block starts the WAL over."""
    calls = _count_checkpoints(monkeypatch)
    db_path.parent.mkdir(parents=True)
    store = SqliteStore(db_path)
    await store.open()
    try:
        with store.restarts.held():
            assert store.restarts.holding
            await _create_and_reject(store, 100)  # far more than 20 frames of WAL
            seen = calls["passive"]
            await assert_eventually(lambda: calls["passive"] >= seen + 3)
            assert calls["restart"] == 0
        assert not store.restarts.holding
        await assert_eventually(lambda: calls["restart"] >= 1)
        assert await store.count() == 100
        assert await store.pragma("integrity_check") == "ok"
    finally:
        await store.close()


async def test_sqlite_held_restarts_still_bound_the_wal(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hold must not let a huge backlog fill the disk: past HELD_MAX_FRAMES a RESTART
    runs all the same, and the WAL is started over."""
    calls = _count_checkpoints(monkeypatch)
    monkeypatch.setattr(sqlite_wal, "HELD_MAX_FRAMES", 40)
    db_path.parent.mkdir(parents=True)
    store = SqliteStore(db_path)
    await store.open()
    try:
        with store.restarts.held():
            await _create_and_reject(store, 100)  # far more than 40 frames of WAL
            await assert_eventually(lambda: calls["restart"] >= 1)
        assert await store.pragma("integrity_check") == "ok"
    finally:
        await store.close()


async def _steady_writes(sqlite_store: SqliteStore, wal: Path) -> None:
    pairs, sizes = 0, [0]

    async def writer() -> None:
        nonlocal pairs
        while pairs < 3000:
            e = await created(sqlite_store)
            await move(sqlite_store, e.id, S.CANCELLED, Cause.BID_REJECTED)
            pairs += 1
            if pairs % 20 == 0:  # the file's size as the writes go on
                sizes.append(wal.stat().st_size if wal.exists() else 0)

    await asyncio.gather(*(writer() for _ in range(64)))
    written = 3000 * 20_000  # what the WAL grew by without the restarts (measured: ~22 KB)
    assert max(sizes) < written / 4, (max(sizes), written)
    assert await sqlite_store.count() >= 3000
    assert await sqlite_store.pragma("integrity_check") == "ok"
    assert await sqlite_store.pragma("journal_size_limit") == 64 << 20
