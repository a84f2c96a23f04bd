"""Drain (PROTOCOL.md §10) and the restart policy (§5), with nodes in-process."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

import worker.store.sqlite as sqlite_module
from schemas.callbacks import RunCommandResult
from schemas.compute import ExecutionState as S
from schemas.job import Engine, Job, Metadata, Spec
from tests.helpers import assert_eventually
from tests.integration.conftest import NodeFactory
from worker.capacity.usage import ResourceUsage
from worker.engines.noop import NoopEngine
from worker.plugins import Plugins
from worker.publishers.noop import NoopPublisher
from worker.recovery import Recovery
from worker.requester import Requester, RequestFailed
from worker.states import Cause, transition
from worker.store import SqliteStore
from worker.store.types import Execution, UpdateRequest
from worker.verifiers.noop import NoopVerifier


def gated_plugins(gate: asyncio.Event, started: list[str]) -> Plugins:
    async def handler(execution: Execution, results_dir: Path) -> None:
        started.append(execution.id)
        await gate.wait()

    return Plugins(
        engines={"Noop": NoopEngine(handler=handler)},
        verifiers={"Noop": NoopVerifier()},
        publishers={"Noop": NoopPublisher()},
    )


def job(job_id: str) -> Job:
    return Job(Metadata=Metadata(ID=job_id), Spec=Spec(Engine=Engine.NOOP))


async def test_drain_fails_running_after_grace_and_declines_asks(
    make_node: NodeFactory, nc: Client, prefix: str
) -> None:
    gate, started = asyncio.Event(), []
    node = await make_node("n1", plugins=gated_plugins(gate, started), shutdown_grace=0.3)
    requester = Requester(nc=nc, requester_id="r1", prefix=prefix)
    await requester.start()
    infos = await nc.subscribe(f"{prefix}.info.n1")
    try:
        bid = await requester.ask("n1", job("j1"))
        await requester.accept("n1", bid.ExecutionID)
        await assert_eventually(lambda: started == [bid.ExecutionID])
        drain = asyncio.create_task(node.drain())
        while True:
            msg = await infos.next_msg(timeout=5)
            if json.loads(msg.data)["Draining"]:
                break
        declined = await requester.ask("n1", job("j2"))
        assert not declined.Accepted
        assert declined.Reason.startswith("node is draining") and declined.Retryable
        failure = await requester.wait_callback(bid.ExecutionID, timeout=10)
        assert type(failure).__name__ == "ComputeError"
        assert failure.Err == "node shutdown" and failure.Cause == "NodeShutdown"  # type: ignore[union-attr]
        await asyncio.wait_for(drain, 20)
    finally:
        gate.set()
        await requester.close()


async def test_restart_fails_running_and_requeues_accepted(
    make_node: NodeFactory, nc: Client, prefix: str
) -> None:
    gate, started = asyncio.Event(), []
    # One CPU: the first job runs, the second waits in the queue.
    node = await make_node("n1", plugins=gated_plugins(gate, started), limit_total_cpu="1")
    requester = Requester(nc=nc, requester_id="r1", prefix=prefix)
    await requester.start()
    try:
        spec = Spec(Engine=Engine.NOOP)
        spec.Resources.CPU = "1"
        first = await requester.ask("n1", Job(Metadata=Metadata(ID="a"), Spec=spec))
        second = await requester.ask("n1", Job(Metadata=Metadata(ID="b"), Spec=spec))
        assert first.Accepted and second.Accepted
        await requester.accept("n1", first.ExecutionID)
        await assert_eventually(lambda: started == [first.ExecutionID])
        await requester.accept("n1", second.ExecutionID)
        # A crash: nothing is drained, the store keeps Running and BidAccepted.
        await node.close()
        gate.set()  # the restarted node's jobs finish at once
        await make_node("n1", plugins=gated_plugins(gate, started), limit_total_cpu="1")
        failure = await requester.wait_callback(first.ExecutionID, timeout=10)
        assert type(failure).__name__ == "ComputeError"
        assert failure.Err == "node restart" and failure.Cause == "NodeRestart"  # type: ignore[union-attr]
        run = await requester.wait_callback(second.ExecutionID, timeout=10)
        assert type(run).__name__ == "RunResult"
        view = await requester.get_execution("n1", second.ExecutionID)
        assert view.Execution.State.value == "WaitingVerification"
    finally:
        gate.set()
        await requester.close()


async def test_retention_deletes_terminal_executions_and_keeps_tombstones(
    make_node: NodeFactory, nc: Client, prefix: str
) -> None:
    node = await make_node("n1", retention=0.2)
    requester = Requester(nc=nc, requester_id="r1", prefix=prefix)
    await requester.start()
    try:
        bid = await requester.ask("n1", job("j1"))
        await requester.accept("n1", bid.ExecutionID)
        callbacks = await requester.run_to_completion("n1", bid.ExecutionID, timeout=10)
        assert type(callbacks[-1]).__name__ == "PublishResult"
        folder = node.datadir.results_dir(bid.ExecutionID)
        assert folder.is_dir()

        async def gone() -> bool:
            try:
                await requester.get_execution("n1", bid.ExecutionID)
            except RequestFailed as exc:
                assert exc.code == 409, exc
                assert exc.state == "Completed" and exc.cause == "PublishCompleted"
                return True
            return False

        await assert_eventually(gone, timeout=10)
        assert not folder.exists()
        other = Requester(nc=nc, requester_id="r2", prefix=prefix)
        try:
            await other.get_execution("n1", bid.ExecutionID)
        except RequestFailed as exc:
            assert exc.code == 404  # another requester's tombstone stays invisible
        else:
            raise AssertionError("another requester saw the tombstone")
    finally:
        await requester.close()


async def _waiting_executions(db: Path, per_state: int, *, past: datetime) -> dict[str, str]:
    """``per_state`` executions each in Created, BidAccepted and WaitingVerification,
    written through the store with deadlines at ``past``: {ID: state}."""
    store = SqliteStore(db)
    await store.open()
    states: dict[str, str] = {}
    try:
        for i in range(3 * per_state):
            now = datetime.now(UTC)
            execution = Execution(
                id=f"e-{uuid.uuid4()}",
                job=job(f"waiting-{i}"),
                requester="r1",
                usage=ResourceUsage(CPU=0.001, Memory=1 << 20),
                create_time=now,
                update_time=now,
                deadline=past,
            )
            await store.create_execution(execution)
            moves = [(Cause.BID_ACCEPTED, {"deadline": past})] if i >= per_state else []
            if i >= 2 * per_state:
                run_result = RunCommandResult()
                moves += [
                    (Cause.RUN_STARTED, {"deadline": None}),
                    (Cause.RUN_COMPLETED, {"run_result": run_result, "deadline": past}),
                ]
            state = S.CREATED
            for cause, changes in moves:
                move = transition(cause, state)
                assert move is not None
                await store.update(
                    UpdateRequest(
                        execution_id=execution.id,
                        cause=cause,
                        new_state=move.target,
                        expected_states=frozenset({state}),
                        changes=changes,
                    )
                )
                state = move.target
            states[execution.id] = state.value
    finally:
        await store.close()
    return states


async def test_recovery_runs_with_the_wal_restarts_held(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recovery's moves are a burst the start-up waits for: no RESTART checkpoint (writes
    waiting for the disk, 0.2 s of a 0.85 s recovery on ext4) starts in the middle of
    it. The hold ends with recovery (the store's own test shows what it holds back)."""
    holding: list[bool] = []
    original = Recovery.run

    async def run(self: Recovery) -> None:
        assert isinstance(self.store, SqliteStore)
        holding.append(self.store.restarts.holding)
        await original(self)

    monkeypatch.setattr(Recovery, "run", run)
    node = await make_node("n1")
    assert holding == [True]
    assert isinstance(node.store, SqliteStore)
    assert not node.store.restarts.holding


async def test_restart_after_a_long_stop_expires_the_waiting_executions_together(
    make_node: NodeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every deadline passed while the node was down: the expiries commit together, in
    a few group commits (one at a time, 600 took 600 commits and seconds of start-up),
    with the right causes, and their ComputeErrors are delivered once the node runs."""
    node = await make_node("n1")
    await node.close()
    past = datetime.now(UTC) - timedelta(hours=1)
    states = await _waiting_executions(tmp_path / "n1" / "worker.db", 200, past=past)
    groups = []
    original = sqlite_module._group

    def counted(conn: Any, batch: Any) -> None:
        groups.append(len(batch))
        original(conn, batch)

    monkeypatch.setattr(sqlite_module, "_group", counted)
    node = await make_node("n1")
    during_start = list(groups)
    monkeypatch.setattr(sqlite_module, "_group", original)

    expected = {
        "Created": ("Cancelled", "BidExpired"),
        "BidAccepted": ("Failed", "QueueTimeout"),
        "WaitingVerification": ("Failed", "VerificationExpired"),
    }
    for eid, before in states.items():
        after = await node.store.get_execution(eid)
        assert (after.state.value, after.last_cause) == expected[before], (eid, before)
    assert sum(during_start) >= len(states)  # every expiry was written during the start
    assert len(during_start) < 60, f"{len(during_start)} commits for {len(states)} expiries"
    assert node.parts.pool.snapshot().pending_count == 0  # nothing expired holds capacity
    # Their callbacks, committed before the dispatcher started, go out after it did.
    assert await node.parts.dispatcher.flush(10)
    assert (await node.store.outbox_stats()).pending == 0
    failed = [eid for eid, before in states.items() if before != "Created"]
    for eid in failed:
        (row,) = await node.store.get_callbacks(eid)
        assert row.kind == "OnComputeFailure" and row.delivered, (eid, row)
