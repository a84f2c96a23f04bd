"""The executor buffer through the node (reference §9.4 TestTotalResourceLimits, §4.1;
PROTOCOL.md §9 "Capacity"): concurrency bounded by the total, FIFO with skip, no
starvation, queue timeout, capacity given back on cancel and only after a run returned,
and an accepted bid never failing for capacity.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from schemas.callbacks import CancelResult, ComputeError, RunResult
from schemas.compute import ExecutionState as S
from tests.helpers import assert_eventually
from tests.integration.conftest import NodeFactory
from tests.integration.test_compute import (
    WAIT,
    Gate,
    assert_moved_together,
    bid,
    make_job,
    noop_plugins,
    state_of,
    wait_state,
)
from worker.capacity.usage import ZERO
from worker.engines.noop import NoopEngine
from worker.requester import Requester, RequestFailed
from worker.store.types import Execution


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.release.set()


async def test_total_cpu_limits_concurrency(
    make_node: NodeFactory, r1: Requester, gate: Gate
) -> None:
    """Total CPU 2, four jobs of CPU 1: never more than two at once, all four complete."""
    node = await make_node("n1", plugins=noop_plugins(gate), limit_total_cpu="2")
    eids = [await bid(r1, make_job(Resources={"CPU": "1", "Memory": "500Mb"})) for _ in range(4)]
    for eid in eids:
        await r1.accept("n1", eid)
    await assert_eventually(lambda: gate.running == 2, timeout=WAIT)
    assert len(node.parts.buffer.queued_ids) == 2
    assert gate.started == eids[:2]  # FIFO
    gate.release.set()
    for eid in eids:
        assert isinstance(await r1.wait_callback(eid, timeout=WAIT), RunResult)
    assert sorted(gate.returned) == sorted(eids)
    assert gate.max_running == 2
    await assert_eventually(lambda: node.parts.pool.snapshot().running_count == 0)


async def test_total_disk_limits_concurrency(
    make_node: NodeFactory, r1: Requester, gate: Gate
) -> None:
    """Total disk 1Gb, two jobs of 600Mb: never more than one at once (disk-limited)."""
    node = await make_node("n1", plugins=noop_plugins(gate), limit_total_disk="1Gb")
    job = {"CPU": "100m", "Memory": "100Mb", "Disk": "600Mb"}
    eids = [await bid(r1, make_job(Resources=job)) for _ in range(2)]
    for eid in eids:
        await r1.accept("n1", eid)
    await assert_eventually(lambda: gate.running == 1, timeout=WAIT)
    assert node.parts.buffer.queued_ids == [eids[1]]
    gate.job_event(eids[0]).set()
    await assert_eventually(lambda: eids[1] in gate.started, timeout=WAIT)
    gate.release.set()
    for eid in eids:
        assert isinstance(await r1.wait_callback(eid, timeout=WAIT), RunResult)
    assert gate.max_running == 1


async def test_fifo_with_skip(make_node: NodeFactory, r1: Requester, gate: Gate) -> None:
    """A big job that does not fit yet is skipped by a smaller later one that does."""
    node = await make_node("n1", plugins=noop_plugins(gate), limit_total_cpu="2")
    blocker = await bid(r1, make_job(Resources={"CPU": "1"}))
    await r1.accept("n1", blocker)
    await asyncio.wait_for(gate.started_event(blocker).wait(), WAIT)
    big = await bid(r1, make_job(Resources={"CPU": "2"}))
    await r1.accept("n1", big)
    small = await bid(r1, make_job(Resources={"CPU": "1"}))
    await r1.accept("n1", small)
    await asyncio.wait_for(gate.started_event(small).wait(), WAIT)
    assert node.parts.buffer.queued_ids == [big]
    assert await state_of(r1, big) == S.BID_ACCEPTED
    gate.release.set()
    for eid in (blocker, small, big):
        assert isinstance(await r1.wait_callback(eid, timeout=WAIT), RunResult)
    assert gate.started == [blocker, small, big]


async def test_big_job_does_not_starve(make_node: NodeFactory, r1: Requester, gate: Gate) -> None:
    """Once the big job has been skipped for ``skip_starvation_limit``, later small jobs
    no longer overtake it; it starts when capacity frees, before them."""
    node = await make_node(
        "n1", plugins=noop_plugins(gate), limit_total_cpu="2", skip_starvation_limit=0.5
    )
    buffer = node.parts.buffer
    blocker = await bid(r1, make_job(Resources={"CPU": "1"}))
    await r1.accept("n1", blocker)
    await asyncio.wait_for(gate.started_event(blocker).wait(), WAIT)
    big = await bid(r1, make_job(Resources={"CPU": "2"}))
    await r1.accept("n1", big)
    # Within the limit, a small job overtakes the big one.
    first = await bid(r1, make_job(Resources={"CPU": "1"}))
    await r1.accept("n1", first)
    assert buffer.is_running(first), "a small job did not overtake the big one"
    gate.job_event(first).set()
    assert isinstance(await r1.wait_callback(first, timeout=WAIT), RunResult)
    # Keep sending small jobs: once the limit has passed, one stays queued behind the big job.
    loop = asyncio.get_running_loop()
    end = loop.time() + WAIT
    held = ""
    while loop.time() < end:
        small = await bid(r1, make_job(Resources={"CPU": "1"}))
        await r1.accept("n1", small)  # enqueued (and started, if allowed) before the reply
        if not buffer.is_running(small):
            held = small
            break
        gate.job_event(small).set()
        assert isinstance(await r1.wait_callback(small, timeout=WAIT), RunResult)
    assert held, "small jobs kept overtaking the big one"
    assert buffer.queued_ids == [big, held]
    gate.job_event(blocker).set()  # capacity frees: the big job goes first
    await asyncio.wait_for(gate.started_event(big).wait(), WAIT)
    assert buffer.queued_ids == [held]
    assert held not in gate.started
    gate.job_event(big).set()
    await asyncio.wait_for(gate.started_event(held).wait(), WAIT)
    gate.release.set()
    for eid in (blocker, big, held):
        assert isinstance(await r1.wait_callback(eid, timeout=WAIT), RunResult)


async def test_queue_timeout(make_node: NodeFactory, r1: Requester, gate: Gate) -> None:
    node = await make_node("n1", plugins=noop_plugins(gate), limit_total_cpu="1", queue_timeout=0.5)
    blocker = await bid(r1, make_job(Resources={"CPU": "1"}))
    await r1.accept("n1", blocker)
    await asyncio.wait_for(gate.started_event(blocker).wait(), WAIT)
    queued = await bid(r1, make_job(Resources={"CPU": "1"}))
    await r1.accept("n1", queued)
    assert node.parts.buffer.queued_ids == [queued]
    assert node.parts.pool.snapshot().queued_count == 1
    error = await r1.wait_callback(queued, timeout=WAIT)
    assert isinstance(error, ComputeError)
    assert error.Cause == "QueueTimeout"
    assert error.Seq == 1
    await wait_state(r1, queued, S.FAILED)
    snap = node.parts.pool.snapshot()
    assert snap.queued_count == 0 and snap.queued == ZERO  # capacity freed
    assert snap.running_count == 1  # the running job is not affected
    assert snap.available.CPU == 1
    assert node.parts.buffer.queued_ids == []
    gate.release.set()
    assert isinstance(await r1.wait_callback(blocker, timeout=WAIT), RunResult)
    assert queued not in gate.started


async def test_cancel_of_queued_frees_capacity_at_once(
    make_node: NodeFactory, r1: Requester, gate: Gate
) -> None:
    node = await make_node("n1", plugins=noop_plugins(gate), limit_total_cpu="1")
    blocker = await bid(r1, make_job(Resources={"CPU": "1"}))
    await r1.accept("n1", blocker)
    await asyncio.wait_for(gate.started_event(blocker).wait(), WAIT)
    queued = await bid(r1, make_job(Resources={"CPU": "1"}))
    await r1.accept("n1", queued)
    snap = node.parts.pool.snapshot()
    assert snap.queued_count == 1 and snap.available.CPU == 0
    assert (await r1.ask("n1", make_job(Resources={"CPU": "1"}))).Accepted is False
    await r1.cancel("n1", queued)
    snap = node.parts.pool.snapshot()  # right after the reply, no waiting
    assert snap.queued_count == 0 and snap.queued == ZERO
    assert snap.available.CPU == 1
    assert (await r1.ask("n1", make_job(Resources={"CPU": "1"}))).Accepted
    assert isinstance(await r1.wait_callback(queued, timeout=WAIT), CancelResult)


async def test_running_capacity_released_only_after_the_handler_returned(
    make_node: NodeFactory, r1: Requester
) -> None:
    cancelled = asyncio.Event()
    may_exit = asyncio.Event()
    returned = asyncio.Event()

    async def slow_to_stop(execution: Execution, results_dir: Path) -> None:
        try:
            await asyncio.Event().wait()  # runs until cancelled
        except asyncio.CancelledError:
            cancelled.set()
            await may_exit.wait()  # still cleaning up
            raise
        finally:
            returned.set()

    plugins = noop_plugins()
    plugins.engines["Noop"] = NoopEngine(handler=slow_to_stop)
    node = await make_node("n1", plugins=plugins, limit_total_cpu="1")
    eid = await bid(r1, make_job(Resources={"CPU": "1"}))
    await r1.accept("n1", eid)
    await assert_eventually(lambda: node.parts.pool.snapshot().running_count == 1, timeout=WAIT)
    await wait_state(r1, eid, S.RUNNING)
    await r1.cancel("n1", eid)
    assert isinstance(await r1.wait_callback(eid, timeout=WAIT), CancelResult)
    await asyncio.wait_for(cancelled.wait(), WAIT)
    snap = node.parts.pool.snapshot()
    assert snap.running_count == 1 and snap.running.CPU == 1, "released before the run returned"
    assert not returned.is_set()
    may_exit.set()
    await asyncio.wait_for(returned.wait(), WAIT)
    await assert_eventually(lambda: node.parts.pool.snapshot().running_count == 0, timeout=WAIT)
    assert node.parts.pool.snapshot().running == ZERO


async def test_accepted_bids_never_fail_for_capacity(
    make_node: NodeFactory, r1: Requester, gate: Gate
) -> None:
    """Fill the node with bids (total + queue), accept them all: all run eventually."""
    node = await make_node("n1", plugins=noop_plugins(gate), limit_total_cpu="2")
    eids = []
    while True:
        reply = await r1.ask("n1", make_job(Resources={"CPU": "1"}))
        if not reply.Accepted:
            assert reply.Reason.startswith("not enough capacity available"), reply.Reason
            break
        eids.append(reply.ExecutionID)
        assert len(eids) <= 4, "the node bid beyond total + queue"
    assert len(eids) == 4
    for eid in eids:
        response = await r1.accept("n1", eid)
        assert response.State in (S.BID_ACCEPTED, S.RUNNING)
    await assert_eventually(lambda: gate.running == 2, timeout=WAIT)
    gate.release.set()
    for eid in eids:
        assert isinstance(await r1.wait_callback(eid, timeout=WAIT), RunResult)
    assert sorted(gate.started) == sorted(eids)
    assert gate.max_running == 2
    await assert_eventually(lambda: len(node.parts.pool) == 0, timeout=WAIT)


async def test_an_accept_with_room_commits_run_started_with_it(
    make_node: NodeFactory, r1: Requester, gate: Gate
) -> None:
    """Nothing queued and room to run: BidAccepted and RunStarted are one write. The
    reply reports BidAccepted; the store already holds Running."""
    node = await make_node("n1", plugins=noop_plugins(gate), limit_total_cpu="1")
    eid = await bid(r1, make_job(Resources={"CPU": "1"}))
    response = await r1.accept("n1", eid)
    assert response.State == S.BID_ACCEPTED
    await assert_moved_together(r1, eid, (S.BID_ACCEPTED, "BidAccepted"), (S.RUNNING, "RunStarted"))
    await assert_eventually(lambda: gate.started == [eid], timeout=WAIT)
    assert node.parts.pool.where(eid) == "running"
    gate.release.set()
    assert isinstance(await r1.wait_callback(eid, timeout=WAIT), RunResult)


async def test_an_accept_behind_a_running_job_waits_in_bid_accepted(
    make_node: NodeFactory, r1: Requester, gate: Gate
) -> None:
    """No room: the accept commits BidAccepted alone; RunStarted is its own write later."""
    node = await make_node("n1", plugins=noop_plugins(gate), limit_total_cpu="1")
    first, second = [await bid(r1, make_job(Resources={"CPU": "1"})) for _ in range(2)]
    await r1.accept("n1", first)
    assert (await r1.accept("n1", second)).State == S.BID_ACCEPTED
    view = await r1.get_execution("n1", second)
    assert view.Execution.State == S.BID_ACCEPTED
    assert view.History[-1].Cause == "BidAccepted"
    assert node.parts.buffer.queued_ids == [second]
    assert node.parts.pool.where(second) == "queued"
    gate.job_event(first).set()
    await wait_state(r1, second, S.RUNNING)
    causes = [h.Cause for h in (await r1.get_execution("n1", second)).History]
    assert causes[-2:] == ["BidAccepted", "RunStarted"]
    gate.release.set()
    assert isinstance(await r1.wait_callback(second, timeout=WAIT), RunResult)


async def test_an_accept_that_does_not_commit_gives_its_claim_back(
    make_node: NodeFactory, nc: Client, prefix: str, gate: Gate
) -> None:
    """The write of BidAccepted + RunStarted fails (another process holds the database):
    503, and the reservation is a pending bid again, not a running job; a retry runs."""
    node = await make_node("n1", plugins=noop_plugins(gate), limit_total_cpu="1")
    patient = Requester(nc=nc, requester_id="r1", prefix=prefix, timeout=20)
    await patient.start()
    try:
        eid = await bid(patient, make_job(Resources={"CPU": "1"}))
        locker = sqlite3.connect(node.store.path, timeout=10, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(RequestFailed) as err:
                await patient.accept("n1", eid)
            assert err.value.code == 503
            assert node.parts.pool.where(eid) == "pending"
            assert node.parts.buffer.running_ids == []
        finally:
            locker.execute("ROLLBACK")
            locker.close()

        async def accepted() -> bool:
            try:
                await patient.accept("n1", eid)
            except RequestFailed as exc:
                assert exc.code == 503, exc
                return False
            return True

        await assert_eventually(accepted, timeout=WAIT, interval=0.2)
        await assert_eventually(lambda: gate.started == [eid], timeout=WAIT)
        assert node.parts.pool.where(eid) == "running"
        gate.release.set()
        assert isinstance(await patient.wait_callback(eid, timeout=WAIT), RunResult)
    finally:
        await patient.close()
