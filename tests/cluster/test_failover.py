"""Failover: the server a node is connected to dies (SIGKILL) while jobs run.

The node moves to another server of the cluster, keeps its subscriptions (direct and
fan-out requests reach it again), and no callback is lost: each execution accepted
before, during or after the failure has its complete callbacks, Seq 1, 2 without a gap,
in the callback stream (replicas 3, so it survives the loss of one server).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from schemas.callbacks import CallbackKind, PublishResult, RunResult
from tests.cluster.conftest import (
    PREFIX,
    STREAM,
    Market,
    check_complete,
    in_process_nodes,
    make_job,
    make_market,
    read_callbacks,
    spawn_node,
)
from tests.helpers import assert_eventually
from worker.engines.noop import NoopEngine
from worker.plugins import Plugins
from worker.publishers.noop import NoopPublisher
from worker.requester import Requester, RequestFailed
from worker.store.types import Execution
from worker.verifiers.noop import NoopVerifier

T = TypeVar("T")

JOB_SECONDS = 1.0  # how long a job of the in-process node holds its slot
WORKERS_PER_NODE = 3
JOBS_AFTER = 4  # jobs each node must complete after the failure
WAIT = 30.0


@pytest.fixture
def market(tmp_path: Path) -> Iterator[Market]:
    yield from make_market(tmp_path / "market", nodes=["p1", "s1"], requesters=["r1"])


def slow_plugins() -> Plugins:
    async def hold(execution: Execution, results_dir: Path) -> None:
        await asyncio.sleep(JOB_SECONDS)  # the job's run time

    return Plugins(
        engines={"Noop": NoopEngine(handler=hold)},
        verifiers={"Noop": NoopVerifier()},
        publishers={"Noop": NoopPublisher()},
    )


def server_of(market: Market, client: str) -> int | None:
    for i, server in enumerate(market.servers):
        if server.alive() and client in server.client_names():
            return i
    return None


async def retry(call: Callable[[], Awaitable[T]], *, within: float = WAIT) -> T:
    """Repeat a request while the node is unreachable (no responders, no reply)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except (NoRespondersError, NatsTimeout):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)  # back off while the node moves to another server


async def make_stream_leader(market: Market, name: str) -> None:
    """Move the callback stream's leadership to server ``name`` (admin step-down)."""
    admin = await market.connect("admin", "", market.url())
    try:
        js = admin.jetstream(timeout=5)

        async def leader() -> str:
            info = await js.stream_info(STREAM)
            assert info.cluster is not None
            return str(info.cluster.leader or "")

        deadline = time.monotonic() + WAIT
        while (current := await leader()) != name:
            assert time.monotonic() < deadline, f"stream leader stays {current}"
            if current:
                body = json.dumps({"placement": {"preferred": name}}).encode()
                await admin.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{STREAM}", body, timeout=5)
            await asyncio.sleep(0.2)  # the election
    finally:
        await admin.close()


class Load:
    """Workers that each run jobs one after the other on one node, until stopped."""

    def __init__(self, requester: Requester) -> None:
        self.r = requester
        self.accepted: dict[str, str] = {}  # execution ID → node
        self.completed: dict[str, float] = {}  # execution ID → when its last callback came
        self.expired = 0
        self.stop = asyncio.Event()

    def done_since(self, node: str, since: float) -> int:
        return sum(1 for e, t in self.completed.items() if self.accepted[e] == node and t > since)

    async def worker(self, node: str) -> None:
        while not self.stop.is_set():
            await self.one_job(node)

    async def one_job(self, node: str) -> None:
        job = make_job()
        bid = await retry(lambda: self.r.ask(node, job, timeout=2))
        assert bid.Accepted, bid
        try:
            # A repeated BidAccepted is a duplicate, answered as the first (§5).
            await retry(lambda: self.r.accept(node, bid.ExecutionID))
        except RequestFailed as exc:  # the bid expired while the node was away
            assert exc.code == 409 and exc.cause == "BidExpired", exc
            self.expired += 1
            return
        self.accepted[bid.ExecutionID] = node
        run = await self.r.wait_callback(
            bid.ExecutionID, [CallbackKind.RUN_COMPLETE, CallbackKind.COMPUTE_FAILURE], WAIT
        )
        assert isinstance(run, RunResult), run
        await retry(lambda: self.r.accept_result(node, bid.ExecutionID))
        final = await self.r.wait_callback(
            bid.ExecutionID,
            [CallbackKind.PUBLISH_COMPLETE, CallbackKind.COMPUTE_FAILURE],
            WAIT,
        )
        assert isinstance(final, PublishResult), final
        self.completed[bid.ExecutionID] = time.monotonic()


async def test_node_fails_over_to_another_server_and_loses_no_callback(
    market: Market, tmp_path: Path
) -> None:
    # p1: a `worker serve` process given every server's URL, like a deployed node.
    p1 = spawn_node(market, "p1", market.url(), tmp_path / "p1")
    victim = await assert_eventually(lambda: server_of(market, "compute-node-p1") is not None)
    victim = server_of(market, "compute-node-p1")
    assert victim is not None
    others = [i for i in range(3) if i != victim]
    # The victim also leads the callback stream, so the crash takes the leader with it:
    # the node's publishes fail until a new leader is elected, and are re-sent.
    await make_stream_leader(market, market.servers[victim].name)
    # s1: an in-process node whose jobs take a second, given the victim's URL only: it
    # learns the other servers from the cluster (INFO connect_urls).
    async with in_process_nodes(
        market, {"s1": market.servers[victim].url}, tmp_path, plugins=slow_plugins()
    ) as nodes:
        s1 = nodes["s1"]
        nc = await market.connect("requester", "r1", market.url(*others))
        requester = Requester(nc=nc, requester_id="r1", prefix=PREFIX, timeout=5)
        await requester.start()
        load = Load(requester)
        workers = [
            asyncio.create_task(load.worker(node))
            for node in ("p1", "s1")
            for _ in range(WORKERS_PER_NODE)
        ]
        try:
            # Under load: jobs done on both nodes, jobs running on s1, then the crash.
            await assert_eventually(
                lambda: load.done_since("p1", 0) >= 3 and load.done_since("s1", 0) >= 3,
                timeout=WAIT,
            )
            await assert_eventually(lambda: len(s1.parts.buffer.running_ids) >= 2, timeout=WAIT)
            running_at_kill = set(s1.parts.buffer.running_ids)
            killed_at = time.monotonic()
            market.servers[victim].kill()

            # Both nodes move to a surviving server ...
            moved = await assert_eventually(
                lambda: all(server_of(market, f"compute-node-{n}") in others for n in ("p1", "s1")),
                timeout=WAIT,
            )
            assert moved
            failover_seconds = time.monotonic() - killed_at
            # ... keep serving direct requests (the workers) and fan-out asks ...
            await assert_eventually(
                lambda: (
                    load.done_since("p1", killed_at) >= JOBS_AFTER
                    and load.done_since("s1", killed_at) >= JOBS_AFTER
                ),
                timeout=2 * WAIT,
            )
            bids = await requester.fan_out(make_job(), expected={"p1", "s1"}, deadline=WAIT)
            assert sorted(b.NodeID for b in bids) == ["p1", "s1"]
            for bid in bids:
                await requester.reject(bid.NodeID, bid.ExecutionID)
        finally:
            load.stop.set()
            results = await asyncio.gather(*workers, return_exceptions=True)
        assert [r for r in results if isinstance(r, BaseException)] == []

        # The runs in flight at the crash finished and were reported.
        assert running_at_kill <= set(load.completed), running_at_kill - set(load.completed)
        # Nothing is left in either node's outbox (the last rows retire on their PubAck).
        for node in ("p1", "s1"):

            async def outbox_empty(node: str = node) -> bool:
                info = (await retry(lambda: requester.node_info(node))).ComputeNodeInfo
                assert info.OutboxParked == 0, info
                return info.OutboxPending == 0

            await assert_eventually(outbox_empty, timeout=WAIT, interval=0.1)
        # Every accepted execution reached its end, and the requester got each callback
        # exactly once (duplicates from re-sends are dropped by Nats-Msg-Id).
        assert set(load.accepted) == set(load.completed)
        for execution_id in load.accepted:
            kinds = [type(c).__name__ for c in requester.callbacks(execution_id)]
            assert kinds == ["RunResult", "PublishResult"], (execution_id, kinds)
        duplicates = requester.duplicate_callbacks
        await requester.close()
        await nc.close()

    # The stream, read from a surviving server through the requester's own consumer,
    # holds every callback of every accepted execution: none lost, none doubled.
    reader = await market.connect("requester", "r1", market.url(*others))
    admin = await market.connect("admin", "", market.url(*others))
    try:
        stored = await read_callbacks(reader, "r1")
        info = await admin.jetstream().stream_info(STREAM)
    finally:
        await reader.close()
        await admin.close()
    check_complete(stored, load.accepted)
    assert len(stored) == 2 * len(load.accepted), "callbacks of unknown executions"
    assert info.config.num_replicas == 3
    assert info.cluster is not None and info.cluster.leader in {
        market.servers[i].name for i in others
    }  # a new leader was elected among the survivors

    code = await p1.astop()
    assert code == 0, p1.log()[-3000:]
    # A reply the node had not yet sent when its server died goes out on the new
    # connection, where the server has no record of the request (responses are allowed
    # per connection): it is refused and logged as a violation, and the requester's
    # retry gets the answer. Nothing else may be refused.
    violations = [v for v in market.violations() if "compute-node-" in v]
    stale_replies = [v for v in violations if 'Subject "_INBOX_r1.' in v]
    assert [v for v in violations if v not in stale_replies] == []
    print(
        f"\nfailover: moved in {failover_seconds:.1f}s; {len(load.accepted)} executions, "
        f"{len(running_at_kill)} running at the crash, {load.expired} bids expired, "
        f"{duplicates} re-sent callbacks dropped as duplicates by the requester, "
        f"{len(stale_replies)} replies refused on the new connection"
    )
