"""ExecutionStore contract: an update with a ``then`` chain (two moves, one write).

The endpoint commits ResultAccepted and PublishStarted this way. Each move keeps its own
checks, version and history row; the chain commits whole or not at all.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas.compute import ExecutionState as S
from tests.contract.test_store import _count_statements, builder, created, move
from worker.errors import InvalidStateError
from worker.states import Cause
from worker.store import SqliteStore
from worker.store.types import Execution, ExecutionStore, UpdateRequest


def accept_then_publish(execution_id: str, **then: object) -> UpdateRequest:
    return UpdateRequest(
        execution_id=execution_id,
        cause=Cause.RESULT_ACCEPTED,
        new_state=S.RESULT_ACCEPTED,
        expected_states=frozenset({S.WAITING_VERIFICATION}),
        requester="r1",
        changes={"deadline": None},
        then=UpdateRequest(
            execution_id=execution_id,
            cause=Cause.PUBLISH_STARTED,
            new_state=S.PUBLISHING,
            expected_states=frozenset({S.RESULT_ACCEPTED}),
            **then,  # type: ignore[arg-type]
        ),
    )


async def waiting(store: ExecutionStore) -> str:
    e = await created(store)
    deadline = datetime.now(UTC) + timedelta(hours=1)
    await move(
        store, e.id, S.WAITING_VERIFICATION, Cause.RUN_COMPLETED, changes={"deadline": deadline}
    )
    return e.id


async def test_a_chain_applies_both_moves_with_a_history_row_each(store: ExecutionStore) -> None:
    eid = await waiting(store)
    result = await store.update(accept_then_publish(eid, comment="started"))
    assert result.first is not None
    assert (result.first.state, result.first.version) == (S.RESULT_ACCEPTED, 3)
    assert result.first.deadline is None  # the first move's changes
    assert (result.execution.state, result.execution.version) == (S.PUBLISHING, 4)
    assert result.execution.last_cause == Cause.PUBLISH_STARTED.value
    assert result.execution.latest_comment == "started"
    assert result.outbox is None
    assert await store.get_execution(eid) == result.execution
    rows = [
        (h.previous_state, h.new_state, h.new_version, h.cause, h.requester)
        for h in (await store.get_history(eid))[2:]
    ]
    assert rows == [
        (S.WAITING_VERIFICATION, S.RESULT_ACCEPTED, 3, "ResultAccepted", "r1"),
        (S.RESULT_ACCEPTED, S.PUBLISHING, 4, "PublishStarted", ""),
    ]


async def test_an_update_without_a_chain_has_no_first(store: ExecutionStore) -> None:
    eid = await waiting(store)
    result = await move(store, eid, S.RESULT_ACCEPTED, Cause.RESULT_ACCEPTED)
    assert result.first is None


async def test_a_chain_whose_first_move_fails_writes_nothing(store: ExecutionStore) -> None:
    e = await created(store)  # Created, not WaitingVerification
    with pytest.raises(InvalidStateError):
        await store.update(accept_then_publish(e.id))
    assert (await store.get_execution(e.id)).version == 1
    assert len(await store.get_history(e.id)) == 1


async def test_a_chain_whose_second_move_fails_writes_nothing(store: ExecutionStore) -> None:
    eid = await waiting(store)
    request = accept_then_publish(eid)
    assert request.then is not None
    request.then.expected_states = frozenset({S.RUNNING})  # never true after the first move
    with pytest.raises(InvalidStateError):
        await store.update(request)
    after = await store.get_execution(eid)
    assert (after.state, after.version) == (S.WAITING_VERIFICATION, 2)
    assert len(await store.get_history(eid)) == 2
    # The store is still usable for that execution: the plain move goes through.
    assert (await move(store, eid, S.RESULT_ACCEPTED, Cause.RESULT_ACCEPTED)).execution.version == 3


async def test_a_callback_on_the_second_move_sees_the_final_execution(
    store: ExecutionStore,
) -> None:
    eid = await waiting(store)
    seen: list[tuple[Execution, int]] = []
    result = await store.update(accept_then_publish(eid, callback=builder(seen=seen)))
    assert result.outbox is not None and result.outbox.seq == 1
    assert len(seen) == 1
    built, seq = seen[0]
    assert (built.state, seq) == (S.PUBLISHING, 1)
    assert [r.seq for r in await store.get_callbacks(eid)] == [1]
    assert result.execution.next_seq == 2


async def test_a_chain_with_two_callbacks_is_refused_and_writes_nothing(
    store: ExecutionStore,
) -> None:
    eid = await waiting(store)
    request = accept_then_publish(eid, callback=builder())
    request.callback = builder()
    with pytest.raises(ValueError, match="only one move of a chain"):
        await store.update(request)
    assert len(await store.get_history(eid)) == 2
    assert await store.get_callbacks(eid) == []


async def test_bad_changes_in_the_second_move_are_refused_before_any_write(
    store: ExecutionStore,
) -> None:
    eid = await waiting(store)
    with pytest.raises(ValueError, match="unknown execution field"):
        await store.update(accept_then_publish(eid, changes={"no_such_field": 1}))
    assert (await store.get_execution(eid)).state is S.WAITING_VERIFICATION


async def test_sqlite_a_chain_is_one_row_update(sqlite_store: SqliteStore) -> None:
    eid = await waiting(sqlite_store)
    statements = _count_statements(sqlite_store, "")
    await sqlite_store.update(accept_then_publish(eid))
    assert len([s for s in statements if s.startswith("UPDATE executions")]) == 1
    assert len([s for s in statements if s.startswith("INSERT INTO history")]) == 2
