"""The compute node end to end on a real broker: Bacalhau's ``pkg/test/compute`` suite
(reference §9.4), the bid strategies visible through the node (§9.3), and PROTOCOL.md §2–§9.

Jobs run on the Noop engine; its ``handler`` (Bacalhau's JobHandler hook) holds a job
running until an event is set, or fails it. Nothing here sleeps for a fixed time: tests
wait for callbacks, for events, or poll with ``assert_eventually``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas.callbacks import (
    CallbackKind,
    CancelResult,
    ComputeError,
    PublishResult,
    RunResult,
)
from schemas.compute import ExecutionState as S
from schemas.job import Job, StorageSpec
from schemas.node import NodeInfo
from tests.helpers import assert_eventually
from tests.integration.conftest import NodeFactory
from worker.engines.noop import NoopEngine
from worker.errors import EngineError
from worker.node import Node
from worker.plugins import Plugins
from worker.publishers.noop import NoopPublisher
from worker.requester import Requester, RequestFailed
from worker.states import Cause
from worker.store.types import Execution, UpdateRequest
from worker.verifiers.noop import NoopVerifier

WAIT = 10.0  # upper bound for anything that should happen "soon"


# ---------------------------------------------------------------------------------------
# helpers


def make_job(
    job_id: str | None = None, *, metadata: dict[str, Any] | None = None, **spec: Any
) -> Job:
    """A Noop job (Bacalhau's test fixture: Engine, Verifier and Publisher Noop)."""
    body = {"Engine": "Noop", "Verifier": "Noop", "Publisher": "Noop", **spec}
    meta = {"ID": job_id or f"job-{uuid.uuid4().hex[:12]}", **(metadata or {})}
    return msgspec.convert({"Metadata": meta, "Spec": body}, Job)


class LocalStorage:
    """Bacalhau's noop storage provider: every input is local, empty and of size 0
    (IPFS cannot run here; this stands in for it at the seam, as in Bacalhau's tests)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def is_installed(self) -> bool:
        return True

    def is_local(self, spec: StorageSpec) -> bool:
        return True

    def known_size(self, spec: StorageSpec) -> int:
        return 0

    async def prepare(self, spec: StorageSpec, dest: Path, *, requester: str) -> Path:
        return dest


class Gate:
    """A JobHandler that holds every job until ``release`` is set (or its own event is),
    and records what it saw: starts, cancellations, returns, concurrency."""

    def __init__(self, *, release: bool = False) -> None:
        self.release = asyncio.Event()
        if release:
            self.release.set()
        self.per_job: dict[str, asyncio.Event] = {}
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.returned: list[str] = []
        self.running = 0
        self.max_running = 0
        self._started_event: dict[str, asyncio.Event] = {}

    def job_event(self, execution_id: str) -> asyncio.Event:
        return self.per_job.setdefault(execution_id, asyncio.Event())

    def started_event(self, execution_id: str) -> asyncio.Event:
        return self._started_event.setdefault(execution_id, asyncio.Event())

    async def handler(self, execution: Execution, results_dir: Path) -> None:
        self.started.append(execution.id)
        self.started_event(execution.id).set()
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        own = self.job_event(execution.id)
        try:
            waiters = [
                asyncio.ensure_future(self.release.wait()),
                asyncio.ensure_future(own.wait()),
            ]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
        except asyncio.CancelledError:
            self.cancelled.append(execution.id)
            raise
        finally:
            self.running -= 1
            self.returned.append(execution.id)


def noop_plugins(gate: Gate | None = None, *, storage_sources: list[str] | None = None) -> Plugins:
    return Plugins(
        engines={"Noop": NoopEngine(handler=gate.handler if gate else None)},
        verifiers={"Noop": NoopVerifier()},
        publishers={"Noop": NoopPublisher()},
        storage={name: LocalStorage(name) for name in storage_sources or []},
    )


class Tap:
    """A plain subscription on the requester's callback subjects (headers included)."""

    def __init__(self, nc: Client, prefix: str, requester: str = "r1") -> None:
        self.nc = nc
        self.subject = f"{prefix}.orchestrator.{requester}.>"
        self.sub: Any = None

    async def start(self) -> Tap:
        self.sub = await self.nc.subscribe(self.subject)
        await self.nc.flush()
        return self

    async def next(self, timeout: float = WAIT) -> tuple[str, dict[str, str], dict[str, Any]]:
        msg: Msg = await self.sub.next_msg(timeout=timeout)
        kind = msg.subject.rsplit(".", 1)[-1].removesuffix("/v1")
        return kind, dict(msg.headers or {}), json.loads(msg.data)

    async def assert_quiet(self, node: Node) -> None:
        """Nothing more has been sent: the outbox is empty and the broker delivered all."""
        assert await node.parts.dispatcher.flush(WAIT), "outbox not flushed"
        await self.nc.flush(timeout=5)
        pending = []
        while self.sub.pending_msgs:
            msg = await self.sub.next_msg(timeout=1)
            pending.append((msg.subject, msg.data))
        assert pending == [], f"unexpected callbacks: {pending}"

    async def close(self) -> None:
        if self.sub is not None:
            await self.sub.unsubscribe()


async def settle(node: Node, nc: Client) -> None:
    """Every callback the node committed so far has been sent and reached ``nc``'s
    subscriptions (not necessarily their callback tasks: see :func:`received`)."""
    assert await node.parts.dispatcher.flush(WAIT), "outbox not flushed"
    await nc.flush(timeout=5)


async def received(r: Requester, execution_id: str, n: int) -> list[Any]:
    """Wait until the requester has received ``n`` callbacks of the execution."""

    def enough() -> list[Any] | None:
        got = r.callbacks(execution_id)
        return got if len(got) >= n else None

    return await assert_eventually(enough, timeout=WAIT)


async def state_of(r: Requester, execution_id: str, node: str = "n1") -> S:
    return (await r.get_execution(node, execution_id)).Execution.State


async def wait_state(r: Requester, execution_id: str, state: S, node: str = "n1") -> None:
    async def check() -> bool:
        current = await state_of(r, execution_id, node)
        assert current == state, f"{execution_id} is {current}, want {state}"
        return True

    await assert_eventually(check, timeout=WAIT, interval=0.02)


async def bid(r: Requester, job: Job, node: str = "n1") -> str:
    reply = await r.ask(node, job)
    assert reply.Accepted, reply
    assert reply.ExecutionID.startswith("e-"), reply
    return reply.ExecutionID


async def force_state(node: Node, execution_id: str, state: S, cause: Cause) -> None:
    """Bacalhau's tests force a state through the store (test-only hook)."""
    await node.store.update(UpdateRequest(execution_id=execution_id, cause=cause, new_state=state))


async def assert_moved_together(
    r: Requester, execution_id: str, first: tuple[S, str], then: tuple[S, str]
) -> None:
    """The execution is already in ``then``'s state (no polling: it was committed before
    the reply), its last two history rows are ``first`` then ``then`` (state, Cause), and
    they carry the same time (one write)."""
    view = await r.get_execution("n1", execution_id)
    assert view.Execution.State == then[0]
    last = view.History[-2:]
    assert [(h.NewState, h.Cause) for h in last] == [first, then]
    assert last[0].Time == last[1].Time


def kinds(callbacks: list[Any]) -> list[type]:
    return [type(cb) for cb in callbacks]


@pytest.fixture
async def tap(nc: Client, prefix: str) -> AsyncIterator[Tap]:
    t = await Tap(nc, prefix).start()
    yield t
    await t.close()


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.release.set()


# ---------------------------------------------------------------------------------------
# TestAskForBid and friends (reference §9.4)


async def test_ask_for_bid_stores_created(make_node: NodeFactory, r1: Requester) -> None:
    await make_node("n1")
    job = make_job()
    reply = await r1.ask("n1", job)
    assert reply.Accepted is True
    assert reply.NodeID == "n1"
    assert reply.JobID == job.Metadata.ID
    assert reply.Reason == ""
    assert reply.Retryable is False
    assert reply.BidTTLSeconds > 0
    view = await r1.get_execution("n1", reply.ExecutionID)
    assert view.Execution.State == S.CREATED
    assert view.Execution.JobID == job.Metadata.ID
    assert [(h.PreviousState, h.NewState, h.Cause) for h in view.History] == [
        (S.UNDEFINED, S.CREATED, "AskForBid")
    ]
    assert view.Callbacks == []


async def test_ask_for_bid_populates_default_resource_usage(
    make_node: NodeFactory, r1: Requester
) -> None:
    await make_node("n1")
    eid = await bid(r1, make_job())
    usage = (await r1.get_execution("n1", eid)).Execution.ResourceUsage
    assert (usage.CPU, usage.Memory, usage.Disk, usage.GPU) == (0.1, 104857600, 0, 0)


async def test_ask_for_bid_keeps_requested_resource_usage(
    make_node: NodeFactory, r1: Requester
) -> None:
    await make_node("n1")
    eid = await bid(r1, make_job(Resources={"CPU": "1", "Memory": "2", "Disk": "3"}))
    usage = (await r1.get_execution("n1", eid)).Execution.ResourceUsage
    assert (usage.CPU, usage.Memory, usage.Disk, usage.GPU) == (1, 2, 3, 0)


async def test_ask_for_bid_job_resource_limits(make_node: NodeFactory, r1: Requester) -> None:
    await make_node("n1", limit_job_cpu="2")
    for cpu in ("1", "2"):
        reply = await r1.ask("n1", make_job(Resources={"CPU": cpu}))
        assert reply.Accepted, (cpu, reply)
    reply = await r1.ask("n1", make_job(Resources={"CPU": "2.01"}))
    assert reply.Accepted is False
    assert reply.ExecutionID == ""
    assert reply.Reason.startswith("job requirements exceed max allowed per job"), reply.Reason
    assert reply.Retryable is False
    assert reply.BidTTLSeconds == 0


async def test_ask_for_bid_reject_stateless(make_node: NodeFactory, r1: Requester) -> None:
    node = await make_node(
        "n1", plugins=noop_plugins(storage_sources=["IPFS"]), job_selection_reject_stateless=True
    )
    before = await node.store.count()
    reply = await r1.ask("n1", make_job())
    assert reply.Accepted is False
    assert reply.Reason.startswith("stateless jobs not accepted"), reply.Reason
    assert await node.store.count() == before  # declines are not remembered
    with_input = make_job(inputs=[{"StorageSource": "IPFS", "CID": "cid", "path": "/inputs"}])
    reply = await r1.ask("n1", with_input)
    assert reply.Accepted is True, reply


# ---------------------------------------------------------------------------------------
# BidAccepted / BidRejected


async def test_bid_accepted_reaches_waiting_verification(
    make_node: NodeFactory, r1: Requester, tap: Tap
) -> None:
    await make_node("n1")
    eid = await bid(r1, make_job())
    response = await r1.accept("n1", eid)
    assert response.ExecutionID == eid
    assert response.State in (S.BID_ACCEPTED, S.RUNNING, S.WAITING_VERIFICATION)
    kind, headers, body = await tap.next()
    assert kind == "OnRunComplete"
    assert headers.get("Nats-Msg-Id") == f"{eid}:1"
    assert body["Seq"] == 1
    assert body["ExecutionID"] == eid
    assert body["SourcePeerID"] == "n1" and body["TargetPeerID"] == "r1"
    assert body["RunCommandResult"]["exitCode"] == 0
    await wait_state(r1, eid, S.WAITING_VERIFICATION)


async def test_bid_accepted_unknown_execution_is_404(make_node: NodeFactory, r1: Requester) -> None:
    await make_node("n1")
    with pytest.raises(RequestFailed) as err:
        await r1.accept("n1", f"e-{uuid.uuid4()}")
    assert err.value.code == 404


FORCED = [
    (S.WAITING_VERIFICATION, Cause.RUN_COMPLETED),
    (S.PUBLISHING, Cause.PUBLISH_STARTED),
    (S.CANCELLED, Cause.BID_EXPIRED),
    (S.COMPLETED, Cause.PUBLISH_COMPLETED),
]


@pytest.mark.parametrize(("state", "cause"), FORCED, ids=[s.value for s, _ in FORCED])
async def test_bid_accepted_wrong_state_is_409(
    make_node: NodeFactory, r1: Requester, state: S, cause: Cause
) -> None:
    node = await make_node("n1")
    eid = await bid(r1, make_job())
    await force_state(node, eid, state, cause)
    with pytest.raises(RequestFailed) as err:
        await r1.accept("n1", eid)
    assert err.value.code == 409
    assert err.value.state == state.value
    assert err.value.cause == cause.value
    assert await state_of(r1, eid) == state


async def test_bid_rejected_cancels(make_node: NodeFactory, r1: Requester, tap: Tap) -> None:
    node = await make_node("n1")
    eid = await bid(r1, make_job())
    response = await r1.reject("n1", eid, "no thanks")
    assert response.State == S.CANCELLED
    view = await r1.get_execution("n1", eid)
    assert view.Execution.State == S.CANCELLED
    assert view.History[-1].Cause == "BidRejected"
    assert view.Callbacks == []
    snap = node.parts.pool.snapshot()
    assert snap.pending_count == 0  # the bid's reservation is given back
    await tap.assert_quiet(node)


async def test_bid_rejected_unknown_execution_is_404(make_node: NodeFactory, r1: Requester) -> None:
    await make_node("n1")
    with pytest.raises(RequestFailed) as err:
        await r1.reject("n1", f"e-{uuid.uuid4()}")
    assert err.value.code == 404


@pytest.mark.parametrize(("state", "cause"), FORCED, ids=[s.value for s, _ in FORCED])
async def test_bid_rejected_wrong_state_is_409(
    make_node: NodeFactory, r1: Requester, state: S, cause: Cause
) -> None:
    node = await make_node("n1")
    eid = await bid(r1, make_job())
    await force_state(node, eid, state, cause)
    with pytest.raises(RequestFailed) as err:
        await r1.reject("n1", eid)
    assert err.value.code == 409
    assert err.value.state == state.value
    assert await state_of(r1, eid) == state


# ---------------------------------------------------------------------------------------
# The whole life of an execution


async def test_happy_path_callbacks_in_order_and_nothing_after(
    make_node: NodeFactory, r1: Requester, tap: Tap
) -> None:
    node = await make_node("n1")
    job = make_job()
    eid = await bid(r1, job)
    await r1.accept("n1", eid)
    run = await r1.wait_callback(eid, timeout=WAIT)
    assert isinstance(run, RunResult)
    assert run.Seq == 1 and run.JobID == job.Metadata.ID
    assert run.RunCommandResult is not None and run.RunCommandResult.exitCode == 0
    assert run.VerificationTTLSeconds > 0
    response = await r1.accept_result("n1", eid)
    assert response.State in (S.RESULT_ACCEPTED, S.PUBLISHING, S.COMPLETED)
    published = await r1.wait_callback(eid, timeout=WAIT)
    assert isinstance(published, PublishResult)
    assert published.Seq == 2
    await wait_state(r1, eid, S.COMPLETED)
    # On the wire: exactly OnRunComplete(1), OnPublishComplete(2), then nothing.
    seen = [await tap.next() for _ in range(2)]
    assert [(k, b["Seq"]) for k, _, b in seen] == [("OnRunComplete", 1), ("OnPublishComplete", 2)]
    await tap.assert_quiet(node)
    view = await r1.get_execution("n1", eid)
    assert [(c.Seq, c.Kind) for c in view.Callbacks] == [
        (1, "OnRunComplete"),
        (2, "OnPublishComplete"),
    ]
    assert all(c.Delivered for c in view.Callbacks)
    assert kinds(r1.callbacks(eid)) == [RunResult, PublishResult]


async def test_run_to_completion(make_node: NodeFactory, r1: Requester) -> None:
    await make_node("n1")
    eid = await bid(r1, make_job())
    await r1.accept("n1", eid)
    callbacks = await r1.run_to_completion("n1", eid, timeout=WAIT)
    assert kinds(callbacks) == [RunResult, PublishResult]


async def test_result_rejected_fails_without_callback(
    make_node: NodeFactory, r1: Requester, tap: Tap
) -> None:
    node = await make_node("n1")
    eid = await bid(r1, make_job())
    await r1.accept("n1", eid)
    assert isinstance(await r1.wait_callback(eid, timeout=WAIT), RunResult)
    response = await r1.reject_result("n1", eid, "wrong answer")
    assert response.State == S.FAILED
    assert (await tap.next())[0] == "OnRunComplete"
    await tap.assert_quiet(node)
    view = await r1.get_execution("n1", eid)
    assert view.Execution.State == S.FAILED
    assert view.History[-1].Cause == "ResultRejected"
    assert [c.Kind for c in view.Callbacks] == ["OnRunComplete"]


# ---------------------------------------------------------------------------------------
# Cancel


async def test_cancel_created_sends_no_callback(
    make_node: NodeFactory, r1: Requester, tap: Tap
) -> None:
    node = await make_node("n1")
    eid = await bid(r1, make_job())
    response = await r1.cancel("n1", eid, "changed my mind")
    assert response.State == S.CANCELLED
    await tap.assert_quiet(node)
    view = await r1.get_execution("n1", eid)
    assert view.History[-1].Cause == "Cancel"
    assert view.Callbacks == []
    assert node.parts.pool.snapshot().pending_count == 0


async def test_cancel_queued_execution(
    make_node: NodeFactory, r1: Requester, nc: Client, gate: Gate
) -> None:
    node = await make_node("n1", plugins=noop_plugins(gate), limit_total_cpu="1")
    blocker = await bid(r1, make_job(Resources={"CPU": "1"}))
    await r1.accept("n1", blocker)
    await asyncio.wait_for(gate.started_event(blocker).wait(), WAIT)
    queued = await bid(r1, make_job(Resources={"CPU": "1"}))
    assert (await r1.accept("n1", queued)).State == S.BID_ACCEPTED
    assert node.parts.buffer.queued_ids == [queued]
    response = await r1.cancel("n1", queued)
    assert response.State == S.CANCELLED
    cancel = await r1.wait_callback(queued, timeout=WAIT)
    assert isinstance(cancel, CancelResult)
    assert cancel.Seq == 1
    assert node.parts.buffer.queued_ids == []
    gate.release.set()
    assert isinstance(await r1.wait_callback(blocker, timeout=WAIT), RunResult)
    await settle(node, nc)
    assert queued not in gate.started  # it never ran
    assert kinds(r1.callbacks(queued)) == [CancelResult]
    assert await state_of(r1, queued) == S.CANCELLED


async def test_cancel_running_execution(
    make_node: NodeFactory, r1: Requester, tap: Tap, gate: Gate
) -> None:
    node = await make_node("n1", plugins=noop_plugins(gate))
    eid = await bid(r1, make_job())
    await r1.accept("n1", eid)
    await asyncio.wait_for(gate.started_event(eid).wait(), WAIT)
    await wait_state(r1, eid, S.RUNNING)
    response = await r1.cancel("n1", eid, "stop")
    assert response.State == S.CANCELLED
    cancel = await r1.wait_callback(eid, timeout=WAIT)
    assert isinstance(cancel, CancelResult)
    # The job's handler saw the cancellation.
    await assert_eventually(lambda: eid in gate.cancelled, timeout=WAIT)
    kind, headers, body = await tap.next()
    assert kind == "OnCancelComplete" and body["Seq"] == 1
    assert headers.get("Nats-Msg-Id") == f"{eid}:1"
    await assert_eventually(lambda: not node.parts.buffer.is_running(eid), timeout=WAIT)
    await tap.assert_quiet(node)  # nothing after CancelResult
    view = await r1.get_execution("n1", eid)
    assert view.Execution.State == S.CANCELLED
    assert [c.Kind for c in view.Callbacks] == ["OnCancelComplete"]


async def test_cancel_waiting_verification_sends_cancel_result(
    make_node: NodeFactory, r1: Requester, tap: Tap
) -> None:
    node = await make_node("n1")
    eid = await bid(r1, make_job())
    await r1.accept("n1", eid)
    assert isinstance(await r1.wait_callback(eid, timeout=WAIT), RunResult)
    response = await r1.cancel("n1", eid)
    assert response.State == S.CANCELLED
    cancel = await r1.wait_callback(eid, timeout=WAIT)
    assert isinstance(cancel, CancelResult) and cancel.Seq == 2
    assert [(await tap.next())[0] for _ in range(2)] == ["OnRunComplete", "OnCancelComplete"]
    await tap.assert_quiet(node)
    with pytest.raises(RequestFailed) as err:
        await r1.accept_result("n1", eid)
    assert err.value.code == 409
    assert (err.value.state, err.value.cause) == ("Cancelled", "Cancel")


class HeldPublisher:
    """A Noop publisher that holds each upload until ``release`` is set."""

    name = "Noop"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.cancelled = False

    def is_installed(self) -> bool:
        return True

    async def publish(self, execution: Execution, results_dir: Path) -> StorageSpec:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return StorageSpec()


async def test_result_accepted_commits_publish_started_with_it(
    make_node: NodeFactory, r1: Requester, tap: Tap
) -> None:
    """ResultAccepted and PublishStarted are one write: the reply reports ResultAccepted,
    the store already holds Publishing, and a cancel right after stops the upload."""
    publisher = HeldPublisher()
    plugins = noop_plugins()
    plugins.publishers["Noop"] = publisher
    node = await make_node("n1", plugins=plugins)
    eid = await bid(r1, make_job())
    await r1.accept("n1", eid)
    assert isinstance(await r1.wait_callback(eid, timeout=WAIT), RunResult)
    response = await r1.accept_result("n1", eid)
    assert response.State == S.RESULT_ACCEPTED
    await assert_moved_together(
        r1, eid, (S.RESULT_ACCEPTED, "ResultAccepted"), (S.PUBLISHING, "PublishStarted")
    )
    await asyncio.wait_for(publisher.started.wait(), WAIT)
    assert (await r1.cancel("n1", eid)).State == S.CANCELLED
    assert isinstance(await r1.wait_callback(eid, timeout=WAIT), CancelResult)
    await assert_eventually(lambda: publisher.cancelled, timeout=WAIT)
    assert [(await tap.next())[0] for _ in range(2)] == ["OnRunComplete", "OnCancelComplete"]
    await tap.assert_quiet(node)


async def test_cancel_of_cancelled_is_a_duplicate(make_node: NodeFactory, r1: Requester) -> None:
    await make_node("n1")
    eid = await bid(r1, make_job())
    first = await r1.cancel("n1", eid, "one")
    second = await r1.cancel("n1", eid, "two")
    assert first == second
    assert second.State == S.CANCELLED
    history = (await r1.get_execution("n1", eid)).History
    assert [h.Cause for h in history] == ["AskForBid", "Cancel"]


async def test_cancel_of_bid_rejected_is_a_duplicate(make_node: NodeFactory, r1: Requester) -> None:
    """§5: Cancel on a Cancelled execution is a duplicate, whatever cancelled it."""
    await make_node("n1")
    eid = await bid(r1, make_job())
    first = await r1.reject("n1", eid)
    second = await r1.cancel("n1", eid)
    assert second == first


async def test_cancel_of_completed_is_409(make_node: NodeFactory, r1: Requester) -> None:
    await make_node("n1")
    eid = await bid(r1, make_job())
    await r1.accept("n1", eid)
    await r1.run_to_completion("n1", eid, timeout=WAIT)
    await wait_state(r1, eid, S.COMPLETED)
    with pytest.raises(RequestFailed) as err:
        await r1.cancel("n1", eid)
    assert err.value.code == 409
    assert err.value.state == "Completed"
    assert err.value.cause == "PublishCompleted"


# ---------------------------------------------------------------------------------------
# Duplicates and conflicts (§5)


async def test_bid_accepted_twice_is_a_duplicate(
    make_node: NodeFactory, r1: Requester, gate: Gate
) -> None:
    await make_node("n1", plugins=noop_plugins(gate))
    eid = await bid(r1, make_job())
    first = await r1.accept("n1", eid, "first")
    second = await r1.accept("n1", eid, "second justification is not compared")
    assert (second.ExecutionID, second.JobID) == (first.ExecutionID, first.JobID)
    assert second.State in (S.BID_ACCEPTED, S.RUNNING)
    await asyncio.wait_for(gate.started_event(eid).wait(), WAIT)
    third = await r1.accept("n1", eid)
    assert third.State == S.RUNNING  # answered with the current State
    history = (await r1.get_execution("n1", eid)).History
    assert [h.Cause for h in history].count("BidAccepted") == 1
    gate.release.set()
    assert isinstance(await r1.wait_callback(eid, timeout=WAIT), RunResult)
    assert gate.started == [eid]  # it ran once


async def test_ask_twice_same_spec_returns_the_stored_bid(
    make_node: NodeFactory, r1: Requester
) -> None:
    node = await make_node("n1")
    job = make_job()
    first = await r1.ask("n1", job)
    second = await r1.ask("n1", job)
    assert first.Accepted and second == first
    assert await node.store.count() == 1


async def test_ask_again_with_different_spec_while_created_is_409(
    make_node: NodeFactory, r1: Requester
) -> None:
    await make_node("n1")
    job = make_job()
    eid = await bid(r1, job)
    other = make_job(job.Metadata.ID, Resources={"CPU": "1"})
    with pytest.raises(RequestFailed) as err:
        await r1.ask("n1", other)
    assert err.value.code == 409
    assert err.value.state == "Created"
    assert await state_of(r1, eid) == S.CREATED


async def test_ask_for_active_job_past_created_is_409(
    make_node: NodeFactory, r1: Requester, gate: Gate
) -> None:
    await make_node("n1", plugins=noop_plugins(gate))
    job = make_job()
    eid = await bid(r1, job)
    await r1.accept("n1", eid)
    await asyncio.wait_for(gate.started_event(eid).wait(), WAIT)
    await wait_state(r1, eid, S.RUNNING)
    with pytest.raises(RequestFailed) as err:
        await r1.ask("n1", job)
    assert err.value.code == 409
    assert (
        err.value.message == f"job {job.Metadata.ID} already has execution {eid} in state Running"
    )
    assert err.value.state == "Running"


async def test_ask_after_terminal_is_a_new_bid(make_node: NodeFactory, r1: Requester) -> None:
    await make_node("n1")
    job = make_job()
    first = await bid(r1, job)
    await r1.reject("n1", first)
    second = await bid(r1, job)
    assert second != first
    assert await state_of(r1, second) == S.CREATED
    assert await state_of(r1, first) == S.CANCELLED


async def test_bid_accepted_after_bid_expired_is_409(make_node: NodeFactory, r1: Requester) -> None:
    node = await make_node("n1", bid_ttl=0.2)
    reply = await r1.ask("n1", make_job())
    assert reply.Accepted and reply.BidTTLSeconds == pytest.approx(0.2)
    eid = reply.ExecutionID
    await wait_state(r1, eid, S.CANCELLED)  # bid TTL + 2 s grace
    assert node.parts.pool.snapshot().pending_count == 0
    with pytest.raises(RequestFailed) as err:
        await r1.accept("n1", eid)
    assert err.value.code == 409
    assert err.value.state == "Cancelled"
    assert err.value.cause == "BidExpired"


async def test_bid_rejected_after_bid_accepted_is_409(
    make_node: NodeFactory, r1: Requester, gate: Gate
) -> None:
    await make_node("n1", plugins=noop_plugins(gate))
    eid = await bid(r1, make_job())
    await r1.accept("n1", eid)
    with pytest.raises(RequestFailed) as err:
        await r1.reject("n1", eid)
    assert err.value.code == 409
    assert err.value.state in ("BidAccepted", "Running")
    assert err.value.cause in ("BidAccepted", "RunStarted")


async def test_another_requesters_execution_is_404(
    make_node: NodeFactory, r1: Requester, r2: Requester
) -> None:
    await make_node("n1")
    eid = await bid(r1, make_job())
    with pytest.raises(RequestFailed) as err:
        await r2.get_execution("n1", eid)
    assert err.value.code == 404
    with pytest.raises(RequestFailed) as err:
        await r2.cancel("n1", eid)
    assert err.value.code == 404
    with pytest.raises(RequestFailed) as err:
        await r2.accept("n1", eid)
    assert err.value.code == 404
    assert await state_of(r1, eid) == S.CREATED


# ---------------------------------------------------------------------------------------
# ListExecutions, NodeInfo, service discovery


async def _list_raw(nc: Client, prefix: str, requester: str, **body: Any) -> dict[str, Any]:
    msg = await nc.request(
        f"{prefix}.compute.n1.{requester}.ListExecutions/v1",
        json.dumps({"SourcePeerID": requester, **body}).encode(),
        timeout=5,
    )
    assert "Nats-Service-Error-Code" not in (msg.headers or {}), msg.data
    return json.loads(msg.data)


async def test_list_executions_owner_filter_and_pages(
    make_node: NodeFactory, r1: Requester, r2: Requester, nc: Client, prefix: str
) -> None:
    await make_node("n1")
    mine = [await bid(r1, make_job()) for _ in range(3)]
    theirs = await bid(r2, make_job())
    await r1.reject("n1", mine[1])

    listed = [e async for e in r1.list_executions("n1")]
    assert sorted(e.ExecutionID for e in listed) == sorted(mine)
    assert theirs not in {e.ExecutionID for e in listed}
    assert [e.ExecutionID async for e in r2.list_executions("n1")] == [theirs]

    cancelled = [e async for e in r1.list_executions("n1", states=[S.CANCELLED])]
    assert [(e.ExecutionID, e.State) for e in cancelled] == [(mine[1], S.CANCELLED)]
    created = [e.ExecutionID async for e in r1.list_executions("n1", states=["Created"])]
    assert sorted(created) == sorted([mine[0], mine[2]])

    pages: list[list[str]] = []
    page = await _list_raw(nc, prefix, "r1", Limit=1)
    while True:
        pages.append([e["ExecutionID"] for e in page["Executions"]])
        if not page["Next"]:
            break
        assert len(pages) <= 4, pages  # 3 pages, and perhaps an empty last one
        page = await _list_raw(nc, prefix, "r1", Limit=1, Cursor=page["Next"])
    if pages[-1] == [] and len(pages) == 4:
        pages.pop()
    assert [len(p) for p in pages] == [1, 1, 1], pages
    assert sorted(eid for p in pages for eid in p) == sorted(mine)


async def test_node_info_request_and_publication(
    make_node: NodeFactory, r1: Requester, nc: Client, prefix: str
) -> None:
    infos = await nc.subscribe(f"{prefix}.info.*")
    await nc.flush()
    node = await make_node("n1")
    msg = await infos.next_msg(timeout=WAIT)
    assert msg.subject == f"{prefix}.info.n1"
    published = msgspec.json.decode(msg.data, type=NodeInfo)
    assert published.NodeID == "n1"
    assert published.InstanceID == node.instance_id
    await infos.unsubscribe()

    reply = await nc.request(f"{prefix}.compute.n1.r1.NodeInfo/v1", b"", timeout=5)
    headers = reply.headers or {}
    assert "Nats-Service-Error-Code" not in headers, reply.data
    assert headers.get("Compute-Node-ID") == "n1"
    assert headers.get("Compute-Instance-ID") == node.instance_id
    info = msgspec.json.decode(reply.data, type=NodeInfo)
    assert info.NodeID == "n1" and info.InstanceID == node.instance_id
    assert info.NodeType == "Compute"
    assert info.ProtocolVersions == ["v1"]
    assert info.Draining is False
    cni = info.ComputeNodeInfo
    assert "Noop" in cni.ExecutionEngines
    assert cni.MaxCapacity.CPU == 2
    assert cni.MaxCapacity.Memory == 4 * 1024**3
    assert cni.QueueCapacity.CPU == 2  # queue defaults to total
    assert cni.AvailableCapacity.CPU == 4
    # A bid shows as pending capacity.
    await bid(r1, make_job(Resources={"CPU": "1"}))
    info = await r1.node_info("n1")
    assert info.ComputeNodeInfo.PendingBidCapacity.CPU == 1
    assert info.ComputeNodeInfo.AvailableCapacity.CPU == 3
    # A JSON object body is accepted too.
    reply = await nc.request(f"{prefix}.compute.n1.r1.NodeInfo/v1", b"{}", timeout=5)
    assert "Nats-Service-Error-Code" not in (reply.headers or {}), reply.data


async def test_srv_ping_answered_by_compute_node(
    make_node: NodeFactory, nc: Client, prefix: str
) -> None:
    node = await make_node("n1")
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish("$SRV.PING", b"", reply=inbox)

    async def ours() -> dict[str, Any]:
        while True:
            msg = await sub.next_msg(timeout=WAIT)
            data = json.loads(msg.data)
            if (data.get("metadata") or {}).get("node_id") == "n1" and (
                data["metadata"].get("subject_prefix") == prefix
            ):
                return data

    try:
        pong = await asyncio.wait_for(ours(), WAIT)
    finally:
        await sub.unsubscribe()
    assert pong["name"] == "compute-node"
    assert pong["metadata"]["instance_id"] == node.instance_id
    reply = await nc.request("$SRV.PING.compute-node", b"", timeout=5)
    assert json.loads(reply.data)["name"] == "compute-node"


async def test_core_callbacks_mode_delivers(
    make_node: NodeFactory, r1: Requester, tap: Tap
) -> None:
    node = await make_node("n1", callbacks="core")
    eid = await bid(r1, make_job())
    await r1.accept("n1", eid)
    callbacks = await r1.run_to_completion("n1", eid, timeout=WAIT)
    assert kinds(callbacks) == [RunResult, PublishResult]
    seen = [await tap.next(), await tap.next()]
    assert [(k, h.get("Nats-Msg-Id")) for k, h, _ in seen] == [
        ("OnRunComplete", f"{eid}:1"),
        ("OnPublishComplete", f"{eid}:2"),
    ]
    await tap.assert_quiet(node)


# ---------------------------------------------------------------------------------------
# Failures


async def test_engine_error_is_compute_error(make_node: NodeFactory, r1: Requester) -> None:
    async def fail(execution: Execution, results_dir: Path) -> None:
        raise EngineError("the engine broke")

    plugins = noop_plugins()
    plugins.engines["Noop"] = NoopEngine(handler=fail)
    node = await make_node("n1", plugins=plugins)
    eid = await bid(r1, make_job())
    await r1.accept("n1", eid)
    error = await r1.wait_callback(eid, timeout=WAIT)
    assert isinstance(error, ComputeError)
    assert error.Cause == "EngineError"
    assert "the engine broke" in error.Err
    assert error.Seq == 1
    await wait_state(r1, eid, S.FAILED)
    await assert_eventually(lambda: node.parts.pool.snapshot().running_count == 0)


async def test_run_timeout_is_one_compute_error(
    make_node: NodeFactory, r1: Requester, tap: Tap, gate: Gate
) -> None:
    node = await make_node("n1", plugins=noop_plugins(gate))
    eid = await bid(r1, make_job(Timeout=0.5))
    await r1.accept("n1", eid)
    error = await r1.wait_callback(eid, timeout=WAIT)
    assert isinstance(error, ComputeError)
    assert error.Err == "execution timed out after 500ms"
    assert error.Cause == "RunTimeout"
    await wait_state(r1, eid, S.FAILED)
    assert eid in gate.cancelled  # the handler was stopped
    kind, _, body = await tap.next()
    assert kind == "OnComputeFailure" and body["Cause"] == "RunTimeout"
    await tap.assert_quiet(node)
    view = await r1.get_execution("n1", eid)
    assert [c.Kind for c in view.Callbacks] == ["OnComputeFailure"]
    assert view.History[-1].Cause == "RunTimeout"
    assert node.parts.pool.snapshot().running_count == 0


async def test_verification_ttl_expiry_is_compute_error(
    make_node: NodeFactory, r1: Requester
) -> None:
    await make_node("n1", verification_ttl=0.3)
    eid = await bid(r1, make_job())
    await r1.accept("n1", eid)
    run = await r1.wait_callback(eid, timeout=WAIT)
    assert isinstance(run, RunResult)
    assert run.VerificationTTLSeconds == pytest.approx(0.3)
    error = await r1.wait_callback(eid, timeout=WAIT)
    assert isinstance(error, ComputeError)
    assert error.Cause == "VerificationExpired"
    assert error.Seq == 2
    await wait_state(r1, eid, S.FAILED)
    with pytest.raises(RequestFailed) as err:
        await r1.accept_result("n1", eid)
    assert err.value.code == 409 and err.value.cause == "VerificationExpired"


# ---------------------------------------------------------------------------------------
# Bid strategies visible through the node (reference §9.3, PROTOCOL.md §9)


async def _reason(r: Requester, job: Job) -> str:
    reply = await r.ask("n1", job)
    assert reply.Accepted is False, reply
    assert reply.ExecutionID == "" and reply.BidTTLSeconds == 0
    return reply.Reason


async def test_networking_declined_unless_accepted(make_node: NodeFactory, r1: Requester) -> None:
    await make_node("n1")
    assert (await r1.ask("n1", make_job(Network={"Type": "None"}))).Accepted
    reason = await _reason(r1, make_job(Network={"Type": "Full"}))
    assert reason.startswith("networking is enabled: false"), reason


async def test_networking_accepted_with_flag(make_node: NodeFactory, r1: Requester) -> None:
    await make_node("n1", job_selection_accept_networked=True)
    assert (await r1.ask("n1", make_job(Network={"Type": "Full"}))).Accepted
    assert (await r1.ask("n1", make_job(Network={"Type": "None"}))).Accepted


async def test_timeout_strategy(make_node: NodeFactory, r1: Requester) -> None:
    await make_node("n1", timeout_bypass_client=["client"])
    bypass = {"ClientID": "client"}
    reply = await r1.ask("n1", make_job(metadata=bypass, Timeout=9223372036.1))
    assert reply.Accepted is False
    assert reply.Reason == "job timeout 9223372036.1 exceeds maximum possible value"
    reply = await r1.ask("n1", make_job(metadata=bypass, Timeout=9223372036))
    assert reply.Accepted is True and reply.Reason == ""
    reason = await _reason(r1, make_job(Timeout=7200))
    assert reason.startswith("job timeout 2h0m0s exceeds maximum allowed 1h0m0s"), reason
    assert (await r1.ask("n1", make_job(metadata=bypass, Timeout=7200))).Accepted
    reason = await _reason(r1, make_job(Timeout=0.1))
    assert reason.startswith("job timeout 100ms below minimum allowed 500ms"), reason
    assert (await r1.ask("n1", make_job(Timeout=0))).Accepted  # 0 = the node's default


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"Engine": "Docker", "Docker": {"Image": "ubuntu"}}, "Docker installed: false"),
        ({"Verifier": "Deterministic"}, "Deterministic installed: false"),
        ({"Publisher": "Estuary"}, "Estuary installed: false"),
        (
            {"inputs": [{"StorageSource": "IPFS", "CID": "volume-id", "path": "/in"}]},
            "IPFS installed: false",
        ),
    ],
    ids=["engine", "verifier", "publisher", "storage"],
)
async def test_not_installed(
    make_node: NodeFactory, r1: Requester, spec: dict[str, Any], reason: str
) -> None:
    await make_node("n1", plugins=noop_plugins())
    got = await _reason(r1, make_job(**spec))
    assert got.startswith(reason), got


async def test_exec_probe(make_node: NodeFactory, r1: Requester) -> None:
    await make_node("n1", job_selection_probe_exec="exit 1")
    reason = await _reason(r1, make_job())
    assert reason.startswith("command `exit 1` returned non-zero exit code 1"), reason


async def test_exec_probe_zero_bids(make_node: NodeFactory, r1: Requester) -> None:
    await make_node("n1", job_selection_probe_exec="exit 0")
    assert (await r1.ask("n1", make_job())).Accepted


@pytest.mark.parametrize(
    "resources",
    [{"CPU": "lots"}, {"Memory": "12 parsecs"}, {"Disk": "-1Gb"}, {"GPU": "1.0"}],
    ids=["cpu", "memory", "disk", "gpu"],
)
async def test_invalid_resource_request(
    make_node: NodeFactory, r1: Requester, resources: dict[str, str]
) -> None:
    node = await make_node("n1")
    reason = await _reason(r1, make_job(Resources=resources))
    assert reason.startswith("invalid resource request"), reason
    assert await node.store.count() == 0


async def test_pending_bids_per_requester(
    make_node: NodeFactory, r1: Requester, r2: Requester
) -> None:
    await make_node("n1", max_pending_bids_per_requester=2)
    for _ in range(2):
        await bid(r1, make_job())
    reply = await r1.ask("n1", make_job())
    assert reply.Accepted is False
    assert reply.Reason.startswith("too many pending bids from r1"), reply.Reason
    assert reply.Retryable is True
    assert (await r2.ask("n1", make_job())).Accepted  # another requester is not held back


async def test_capacity_decline_is_retryable(make_node: NodeFactory, r1: Requester) -> None:
    await make_node("n1")  # total CPU 2, queue 2
    first = await bid(r1, make_job(Resources={"CPU": "2"}))
    await bid(r1, make_job(Resources={"CPU": "2"}))
    reply = await r1.ask("n1", make_job(Resources={"CPU": "1"}))
    assert reply.Accepted is False
    assert reply.Reason.startswith("not enough capacity available"), reply.Reason
    assert reply.Retryable is True
    await r1.reject("n1", first)  # capacity is given back: a bid fits again
    assert (await r1.ask("n1", make_job(Resources={"CPU": "1"}))).Accepted


async def test_callback_kinds_are_the_methods(make_node: NodeFactory, r1: Requester) -> None:
    """ExecutionView.Callbacks[].Body is the callback as sent."""
    await make_node("n1")
    eid = await bid(r1, make_job())
    await r1.accept("n1", eid)
    await r1.run_to_completion("n1", eid, timeout=WAIT)
    view = await r1.get_execution("n1", eid)
    assert [c.Kind for c in view.Callbacks] == [
        CallbackKind.RUN_COMPLETE.value,
        CallbackKind.PUBLISH_COMPLETE.value,
    ]
    assert [c.Body["Seq"] for c in view.Callbacks] == [1, 2]
    assert all(c.Body["ExecutionID"] == eid for c in view.Callbacks)


async def test_verification_ttl_expiry_after_a_run_longer_than_the_queue_timeout(
    make_node: NodeFactory, r1: Requester, gate: Gate
) -> None:
    """The verification TTL counts from RunCompleted, whatever happened to the
    queue-timeout deadline of BidAccepted while the job was running."""
    node = await make_node(
        "n1", plugins=noop_plugins(gate), queue_timeout=0.3, verification_ttl=0.3
    )
    eid = await bid(r1, make_job())
    await r1.accept("n1", eid)
    await asyncio.wait_for(gate.started_event(eid).wait(), WAIT)
    # The BidAccepted deadline (queue timeout) fires while the job runs: no effect on it.
    await assert_eventually(lambda: len(node.parts.deadlines) == 0, timeout=WAIT)
    assert await state_of(r1, eid) == S.RUNNING
    gate.release.set()
    assert isinstance(await r1.wait_callback(eid, timeout=WAIT), RunResult)
    error = await r1.wait_callback(eid, timeout=WAIT)
    assert isinstance(error, ComputeError)
    assert error.Cause == "VerificationExpired"
    await wait_state(r1, eid, S.FAILED)
