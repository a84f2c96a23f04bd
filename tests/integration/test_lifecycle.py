"""Drain (PROTOCOL.md §10) and the restart policy (§5), with nodes in-process."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from nats.aio.client import Client

from schemas.job import Engine, Job, Metadata, Spec
from tests.helpers import assert_eventually
from tests.integration.conftest import NodeFactory
from worker.engines.noop import NoopEngine
from worker.plugins import Plugins
from worker.publishers.noop import NoopPublisher
from worker.requester import Requester, RequestFailed
from worker.store.types import Execution
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
