"""The requester client against scripted nodes on a real nats-server.

The fake nodes below answer as PROTOCOL.md says (subjects §2, error replies §3, messages §4)
but each test scripts the answers it needs: an error, a late bid, no reply at all.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from schemas.callbacks import (
    CallbackKind,
    ComputeError,
    PublishResult,
    RunCommandResult,
    RunResult,
)
from schemas.compute import (
    AskForBidResponse,
    ExecutionResponse,
    ExecutionState,
    ExecutionSummary,
    ListExecutionsResponse,
)
from schemas.job import Engine, Job, Metadata, Spec, StorageSource, StorageSpec
from schemas.node import Capacity, ExecutionDetail, ExecutionView, NodeInfo
from tests.helpers import assert_eventually
from worker.requester import PlacementError, Requester, RequestFailed, flush_subscriptions

JOB = Job(Metadata=Metadata(ID="job-1"), Spec=Spec(Engine=Engine.NOOP))


@dataclass
class Err:
    """An error reply (PROTOCOL.md §3)."""

    code: int
    message: str
    state: str = ""
    cause: str = ""


@dataclass
class Seen:
    """One request a fake node received."""

    node: str
    method: str
    requester: str
    body: dict[str, Any]
    headers: dict[str, str]
    data: bytes


Reply = msgspec.Struct | Err | bytes | None
Handler = Callable[["FakeNode", Msg, dict[str, Any]], Awaitable[Reply]]


@dataclass
class FakeNode:
    """A scripted compute node: default answers per the protocol, overridable per method."""

    nc: Client
    node_id: str
    prefix: str
    log: list[Seen]
    estimate: float = 0.0
    accept_bids: bool = True
    handlers: dict[str, Handler] = field(default_factory=dict)
    instance: str = field(default_factory=lambda: str(uuid.uuid4()))
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        await self.nc.subscribe(f"{self.prefix}.compute.{self.node_id}.*.>", cb=self._spawn)
        await self.nc.subscribe(f"{self.prefix}.compute._all.*.>", cb=self._spawn)
        await flush_subscriptions(self.nc, 5.0)  # a bare flush() can overtake the SUBs
        info = NodeInfo(NodeID=self.node_id, InstanceID=self.instance)
        await self.nc.publish(f"{self.prefix}.info.{self.node_id}", msgspec.json.encode(info))

    async def _spawn(self, msg: Msg) -> None:
        # One task per message, as the real node does: a slow answer blocks nothing else.
        task = asyncio.create_task(self._handle(msg))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _handle(self, msg: Msg) -> None:
        tokens = msg.subject.split(".")
        requester, method = tokens[-2], tokens[-1].removesuffix("/v1")
        body = json.loads(msg.data) if msg.data else {}
        self.log.append(Seen(self.node_id, method, requester, body, msg.headers or {}, msg.data))
        handler = self.handlers.get(method, FakeNode.default)
        await self.reply(msg, await handler(self, msg, body))

    async def reply(self, msg: Msg, reply: Reply) -> None:
        if reply is None:
            return
        headers = {"Compute-Node-ID": self.node_id, "Compute-Instance-ID": self.instance}
        if isinstance(reply, Err):
            headers |= {
                "Nats-Service-Error-Code": str(reply.code),
                "Nats-Service-Error": reply.message,
            }
            body = {"Error": reply.message, "Code": reply.code, "NodeID": self.node_id}
            data = json.dumps(body | {"State": reply.state, "Cause": reply.cause}).encode()
        else:
            data = reply if isinstance(reply, bytes) else msgspec.json.encode(reply)
        await self.nc.publish(msg.reply, data, headers=headers)

    def bid(self, body: dict[str, Any]) -> AskForBidResponse:
        if not self.accept_bids:
            return AskForBidResponse(NodeID=self.node_id, Reason="not enough capacity available")
        return AskForBidResponse(
            ExecutionID=f"e-{self.node_id}",
            JobID=body["Job"]["Metadata"]["ID"],
            Accepted=True,
            NodeID=self.node_id,
            BidTTLSeconds=15.0,
            EstimatedStartSeconds=self.estimate,
        )

    async def default(self, msg: Msg, body: dict[str, Any]) -> Reply:
        tokens = msg.subject.split(".")
        method = tokens[-1].removesuffix("/v1")
        states = {
            "BidAccepted": ExecutionState.BID_ACCEPTED,
            "BidRejected": ExecutionState.CANCELLED,
            "CancelExecution": ExecutionState.CANCELLED,
            "ResultAccepted": ExecutionState.RESULT_ACCEPTED,
            "ResultRejected": ExecutionState.FAILED,
        }
        if method == "AskForBid":
            return self.bid(body)
        if method == "NodeInfo":
            return NodeInfo(NodeID=self.node_id, InstanceID=self.instance)
        if method in states:
            return ExecutionResponse(
                ExecutionID=body["ExecutionID"], JobID="job-1", State=states[method]
            )
        return Err(404, f"unknown method {method}")

    async def callback(self, requester: str, cb: msgspec.Struct, *, msg_id: str = "") -> None:
        """Publish a callback under this node's token (``SourcePeerID`` comes from the body)."""
        kind = type(cb).__name__
        method = {
            "RunResult": "OnRunComplete",
            "PublishResult": "OnPublishComplete",
            "CancelResult": "OnCancelComplete",
            "ComputeError": "OnComputeFailure",
        }[kind]
        subject = f"{self.prefix}.orchestrator.{requester}.{self.node_id}.{method}/v1"
        await self.nc.publish(subject, msgspec.json.encode(cb), headers={"Nats-Msg-Id": msg_id})


@dataclass
class Market:
    nc: Client
    prefix: str
    log: list[Seen] = field(default_factory=list)
    nodes: dict[str, FakeNode] = field(default_factory=dict)

    async def node(self, node_id: str, **kw: Any) -> FakeNode:
        node = FakeNode(self.nc, node_id, self.prefix, self.log, **kw)
        self.nodes[node_id] = node
        await node.start()
        return node

    def seen(self, method: str, node: str | None = None) -> list[Seen]:
        return [s for s in self.log if s.method == method and node in (None, s.node)]


@pytest.fixture
async def market(nats_url: str) -> AsyncIterator[Market]:
    nc = await nats.connect(nats_url, max_reconnect_attempts=2, reconnect_time_wait=0.2)
    m = Market(nc, f"t{uuid.uuid4().hex[:10]}")
    yield m
    for node in m.nodes.values():
        for task in list(node.tasks):
            task.cancel()
    await nc.close()


@pytest.fixture
async def make_requester(
    nc: Client, market: Market
) -> AsyncIterator[Callable[..., Awaitable[Requester]]]:
    started: list[Requester] = []

    async def make(**kw: Any) -> Requester:
        mode = kw.pop("callbacks", "core")
        kw.setdefault("prefix", market.prefix)
        kw.setdefault("requester_id", "r1")
        req = Requester(nc=nc, **kw)
        await req.start(mode)
        started.append(req)
        return req

    yield make
    for req in started:
        await req.close()


def run_result(node: str, execution_id: str, seq: int = 1, *, source: str = "") -> RunResult:
    return RunResult(
        SourcePeerID=source or node,
        TargetPeerID="r1",
        ExecutionID=execution_id,
        JobID="job-1",
        Seq=seq,
        ResultProposal=b"proposal",
        RunCommandResult=RunCommandResult(stdout="hi\n"),
    )


def publish_result(node: str, execution_id: str, seq: int = 2) -> PublishResult:
    spec = StorageSpec(StorageSource=StorageSource.URL_DOWNLOAD, URL="http://x/e.tar.gz")
    return PublishResult(
        SourcePeerID=node,
        TargetPeerID="r1",
        ExecutionID=execution_id,
        JobID="job-1",
        Seq=seq,
        PublishResult=spec,
    )


# -- direct requests --------------------------------------------------------------------------


async def test_ask_and_node_info_carry_trace_context(market: Market, make_requester: Any) -> None:
    await market.node("n1", estimate=2.5)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    req = await make_requester(tracer=tracer)

    with tracer.start_as_current_span("job") as root:
        bid = await req.ask("n1", JOB)
        info = await req.node_info("n1")

    assert bid == AskForBidResponse(
        ExecutionID="e-n1",
        JobID="job-1",
        Accepted=True,
        NodeID="n1",
        BidTTLSeconds=15.0,
        EstimatedStartSeconds=2.5,
    )
    assert info.NodeID == "n1"
    ask, node_info = market.log
    assert ask.method == "AskForBid" and ask.requester == "r1"
    assert ask.body["SourcePeerID"] == "r1" and ask.body["TargetPeerID"] == "n1"
    assert ask.body["Job"]["Metadata"]["ID"] == "job-1"
    assert node_info.method == "NodeInfo" and node_info.data == b""
    trace_id = f"{root.get_span_context().trace_id:032x}"
    for seen in (ask, node_info):
        assert seen.headers["traceparent"].split("-")[1] == trace_id
    spans = {s.name: s for s in exporter.get_finished_spans()}
    publish = spans[f"{market.prefix}.compute.n1.r1.AskForBid/v1 publish"]
    assert publish.parent is not None and publish.parent.span_id == root.get_span_context().span_id


async def test_error_reply_raises_request_failed(market: Market, make_requester: Any) -> None:
    node = await market.node("n1")

    async def expired(_: FakeNode, __: Msg, body: dict[str, Any]) -> Reply:
        return Err(409, f"execution {body['ExecutionID']} is Cancelled", "Cancelled", "BidExpired")

    async def not_a_view(*_: Any) -> Reply:
        return b'{"ExecutionID": "e-1"}'

    node.handlers |= {"BidAccepted": expired, "GetExecution": not_a_view}
    req = await make_requester()

    with pytest.raises(RequestFailed) as failed:
        await req.accept("n1", "e-1")
    err = failed.value
    assert (err.code, err.message) == (409, "execution e-1 is Cancelled")
    assert (err.state, err.cause, err.node_id) == ("Cancelled", "BidExpired", "n1")

    with pytest.raises(RequestFailed) as bad_body:
        await req.get_execution("n1", "e-1")
    assert bad_body.value.code == 500 and bad_body.value.node_id == "n1"

    with pytest.raises(ValueError, match="invalid node ID"):
        await req.ask("n1.x.>", JOB)  # subject injection is refused before sending
    with pytest.raises(NoRespondersError):
        await req.ask("nobody", JOB)
    with pytest.raises(ValueError, match="invalid requester ID"):
        Requester(nc=req._nc, requester_id="_all")


async def test_execution_operations_send_protocol_bodies(
    market: Market, make_requester: Any
) -> None:
    node = await market.node("n1")
    view = ExecutionView(
        Execution=ExecutionDetail(
            ExecutionID="e-1",
            JobID="job-1",
            State=ExecutionState.COMPLETED,
            ResourceUsage=Capacity(CPU=0.1),
            Version=7,
            CreateTime="2024-01-01T00:00:00.000000Z",
            UpdateTime="2024-01-01T00:00:01.000000Z",
            LatestComment="",
        ),
        History=[],
        Callbacks=[],
    )

    async def get(*_: Any) -> Reply:
        return view

    node.handlers["GetExecution"] = get
    req = await make_requester()

    assert (await req.reject("n1", "e-1", "too slow")).State == ExecutionState.CANCELLED
    assert (await req.accept_result("n1", "e-1")).State == ExecutionState.RESULT_ACCEPTED
    assert (await req.reject_result("n1", "e-1", "wrong")).State == ExecutionState.FAILED
    assert (await req.cancel("n1", "e-1", "changed my mind")).State == ExecutionState.CANCELLED
    assert await req.get_execution("n1", "e-1") == view

    bodies = {s.method: s.body for s in market.log}
    base = {"SourcePeerID": "r1", "ExecutionID": "e-1"}
    assert bodies["BidRejected"] == base | {"TargetPeerID": "n1", "Justification": "too slow"}
    assert bodies["ResultAccepted"] == base | {"TargetPeerID": "n1"}
    assert bodies["ResultRejected"] == base | {"TargetPeerID": "n1", "Justification": "wrong"}
    assert bodies["CancelExecution"]["Justification"] == "changed my mind"
    assert bodies["GetExecution"] == base


async def test_list_executions_follows_cursors(market: Market, make_requester: Any) -> None:
    node = await market.node("n1")

    def summary(eid: str) -> ExecutionSummary:
        return ExecutionSummary(ExecutionID=eid, JobID="job-1", State=ExecutionState.RUNNING)

    async def pages(_: FakeNode, __: Msg, body: dict[str, Any]) -> Reply:
        if body["Cursor"] == "":
            return ListExecutionsResponse(Executions=[summary("e-1"), summary("e-2")], Next="c-2")
        assert body["Cursor"] == "c-2"
        return ListExecutionsResponse(Executions=[summary("e-3")], Next="")

    node.handlers["ListExecutions"] = pages
    req = await make_requester()

    since = datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    found = [
        s.ExecutionID
        async for s in req.list_executions("n1", updated_since=since, states=["Running"], limit=2)
    ]

    assert found == ["e-1", "e-2", "e-3"]
    first, second = (s.body for s in market.seen("ListExecutions"))
    query = {
        "SourcePeerID": "r1",
        "UpdatedSince": "2024-01-02T03:04:05.000006Z",
        "States": ["Running"],
        "Limit": 2,
    }
    assert first == query | {"Cursor": ""}
    assert second == query | {"Cursor": "c-2"}
    assert await req.reconcile("n1") == dict.fromkeys(found, ExecutionState.RUNNING)


# -- fan-out and placement --------------------------------------------------------------------


async def test_fan_out_waits_for_seen_nodes_dedupes_and_keeps_errors(
    market: Market, make_requester: Any
) -> None:
    req = await make_requester()
    twice = await market.node("a")
    await market.node("b", accept_bids=False)
    broken = await market.node("c")

    async def answer_twice(node: FakeNode, msg: Msg, body: dict[str, Any]) -> Reply:
        await node.reply(msg, node.bid(body))
        return node.bid(body)

    async def bad_request(*_: Any) -> Reply:
        return Err(400, 'unknown engine "X"')

    twice.handlers["AskForBid"] = answer_twice
    broken.handlers["AskForBid"] = bad_request
    await assert_eventually(lambda: req.seen_nodes() == {"a", "b", "c"})

    # A long deadline: the fan-out ends as soon as every node seen on info has answered.
    async with asyncio.timeout(5):
        bids = await req.fan_out(JOB, deadline=60)

    assert sorted((b.NodeID, b.Accepted) for b in bids) == [("a", True), ("b", False)]
    assert [(e.code, e.node_id, e.message) for e in bids.errors] == [
        (400, "c", 'unknown engine "X"')
    ]
    assert [d.NodeID for d in bids.duplicates] == ["a"]
    ask = market.seen("AskForBid")[0]
    assert ask.body["TargetPeerID"] == "" and ask.requester == "r1"
    assert len(market.seen("AskForBid")) == 3  # one publish, one delivery per node

    async with asyncio.timeout(5):
        only_a = await req.fan_out(JOB, deadline=60, expected={"a"})
    assert "a" in {b.NodeID for b in only_a}


async def test_fan_out_without_any_node_ends_at_once(make_requester: Any) -> None:
    req = await make_requester()
    async with asyncio.timeout(5):  # the server's no-responders status ends it early
        bids = await req.fan_out(JOB, deadline=60)
    assert (list(bids), bids.errors) == ([], [])


async def test_place_accepts_soonest_and_rejects_the_rest_late_bid_included(
    market: Market, make_requester: Any
) -> None:
    req = await make_requester()
    accepted = asyncio.Event()
    await market.node("a", estimate=5.0)
    b = await market.node("b", estimate=0.5)
    await market.node("c", accept_bids=False)
    late = await market.node("d", estimate=0.0)  # would win, but answers too late

    async def accept_b(node: FakeNode, msg: Msg, body: dict[str, Any]) -> Reply:
        accepted.set()
        return await node.default(msg, body)

    async def bid_after_accept(node: FakeNode, msg: Msg, body: dict[str, Any]) -> Reply:
        await accepted.wait()
        return node.bid(body)

    b.handlers["BidAccepted"] = accept_b
    late.handlers["AskForBid"] = bid_after_accept
    await assert_eventually(lambda: req.seen_nodes() == {"a", "b", "c", "d"})

    placement = await req.place(JOB, deadline=0.3)

    assert (placement.node_id, placement.execution_id) == ("b", "e-b")
    assert placement.response.State == ExecutionState.BID_ACCEPTED
    assert [s.node for s in market.seen("BidAccepted")] == ["b"]
    await assert_eventually(
        lambda: (
            sorted((s.node, s.body["ExecutionID"]) for s in market.seen("BidRejected"))
            == [("a", "e-a"), ("d", "e-d")]
        )
    )
    methods = [(s.node, s.method) for s in market.log if s.method != "AskForBid"]
    assert methods.index(("b", "BidAccepted")) < methods.index(("d", "BidRejected"))


async def test_place_cancels_an_unanswered_accept_before_the_next_bid(
    market: Market, make_requester: Any
) -> None:
    req = await make_requester(timeout=0.3)
    silent = await market.node("a", estimate=0.0)
    await market.node("b", estimate=1.0)
    cancels = 0

    async def no_reply(*_: Any) -> Reply:
        return None

    async def cancel_on_second_try(node: FakeNode, msg: Msg, body: dict[str, Any]) -> Reply:
        nonlocal cancels
        cancels += 1
        return await node.default(msg, body) if cancels == 2 else None

    silent.handlers |= {"BidAccepted": no_reply, "CancelExecution": cancel_on_second_try}

    placement = await req.place(JOB, expected={"a", "b"}, deadline=5)

    assert placement.node_id == "b"
    steps = [(s.node, s.method) for s in market.log if s.method != "AskForBid"]
    assert steps == [
        ("a", "BidAccepted"),
        ("a", "CancelExecution"),
        ("a", "CancelExecution"),
        ("b", "BidAccepted"),
    ]


async def test_place_stops_when_a_lost_accept_cannot_be_cancelled(
    market: Market, make_requester: Any
) -> None:
    req = await make_requester(timeout=0.2)
    silent = await market.node("a", estimate=0.0)
    await market.node("b", estimate=1.0)

    async def no_reply(*_: Any) -> Reply:
        return None

    silent.handlers |= {"BidAccepted": no_reply, "CancelExecution": no_reply}

    with pytest.raises(PlacementError, match="not placing it elsewhere"):
        await req.place(JOB, expected={"a", "b"}, deadline=5, cancel_attempts=2)

    # b was never accepted, and its bid is released.
    assert market.seen("BidAccepted", "b") == []
    await assert_eventually(lambda: len(market.seen("BidRejected", "b")) == 1)
    assert len(market.seen("CancelExecution", "a")) == 2


async def test_place_without_bids_raises(market: Market, make_requester: Any) -> None:
    req = await make_requester()
    await market.node("a", accept_bids=False)
    with pytest.raises(PlacementError) as failed:
        await req.place(JOB, expected={"a"}, deadline=5)
    assert [b.Reason for b in failed.value.bids] == ["not enough capacity available"]


# -- callbacks ----------------------------------------------------------------------------------


async def test_forged_callback_dropped_and_duplicate_delivered_once(
    market: Market, make_requester: Any
) -> None:
    req = await make_requester()
    n1 = await market.node("n1")

    # Published under n1's token but claiming n2: forged, dropped (and not remembered).
    await n1.callback("r1", run_result("n1", "e-1", source="n2"), msg_id="e-1:1")
    await n1.callback("r1", run_result("n1", "e-1"), msg_id="e-1:1")
    await n1.callback("r1", run_result("n1", "e-1"), msg_id="e-1:1")  # duplicate
    await n1.callback("r1", publish_result("n1", "e-1"), msg_id="e-1:2")

    first = await req.wait_callback("e-1", timeout=5)
    second = await req.wait_callback("e-1", timeout=5)

    assert isinstance(first, RunResult) and first.SourcePeerID == "n1"
    assert first.ResultProposal == b"proposal"
    assert isinstance(second, PublishResult)
    assert (req.dropped_callbacks, req.duplicate_callbacks) == (1, 1)
    assert req.callbacks("e-1") == [first, second]
    with pytest.raises(TimeoutError):
        await req.wait_callback("e-1", timeout=0.05)


async def test_wait_callback_by_kind_leaves_others_queued(
    market: Market, make_requester: Any
) -> None:
    req = await make_requester()
    n1 = await market.node("n1")
    await n1.callback("r1", run_result("n1", "e-1"), msg_id="e-1:1")
    await n1.callback("r1", publish_result("n1", "e-1"), msg_id="e-1:2")

    done = await req.wait_callback("e-1", [CallbackKind.PUBLISH_COMPLETE], timeout=5)
    run = await req.wait_callback("e-1", timeout=5)

    assert isinstance(done, PublishResult) and isinstance(run, RunResult)


async def test_run_to_completion_core(market: Market, make_requester: Any) -> None:
    req = await make_requester()
    n1 = await market.node("n1")

    async def accept_then_run(node: FakeNode, msg: Msg, body: dict[str, Any]) -> Reply:
        await node.reply(msg, await node.default(msg, body))
        await node.callback("r1", run_result("n1", body["ExecutionID"]), msg_id="e-n1:1")
        return None

    async def publish(node: FakeNode, msg: Msg, body: dict[str, Any]) -> Reply:
        await node.reply(msg, await node.default(msg, body))
        await node.callback("r1", publish_result("n1", body["ExecutionID"]), msg_id="e-n1:2")
        return None

    n1.handlers |= {"BidAccepted": accept_then_run, "ResultAccepted": publish}

    placement = await req.place(JOB, expected={"n1"}, deadline=5)
    callbacks = await req.run_to_completion("n1", placement.execution_id, timeout=5)

    assert [type(c) for c in callbacks] == [RunResult, PublishResult]
    assert [s.method for s in market.log] == ["AskForBid", "BidAccepted", "ResultAccepted"]


async def test_run_to_completion_returns_on_failure(market: Market, make_requester: Any) -> None:
    req = await make_requester()
    n1 = await market.node("n1")
    failure = ComputeError(
        SourcePeerID="n1",
        TargetPeerID="r1",
        ExecutionID="e-9",
        JobID="job-1",
        Seq=1,
        Err="execution timed out after 10m0s",
        Cause="RunTimeout",
    )
    await n1.callback("r1", failure, msg_id="e-9:1")

    assert await req.run_to_completion("n1", "e-9", timeout=5) == [failure]
    assert market.seen("ResultAccepted") == []


async def test_run_to_completion_rejecting_the_result(market: Market, make_requester: Any) -> None:
    req = await make_requester()
    n1 = await market.node("n1")
    await n1.callback("r1", run_result("n1", "e-n1"), msg_id="e-n1:1")

    callbacks = await req.run_to_completion("n1", "e-n1", accept_result=False, timeout=5)

    assert [type(c) for c in callbacks] == [RunResult]
    assert [s.method for s in market.log] == ["ResultRejected"]


async def test_callbacks_over_jetstream_survive_the_requester(
    nc: Client, market: Market, make_requester: Any
) -> None:
    market.prefix = f"mk.{market.prefix}"  # a dotted prefix: the stream name uses "_"
    js = market.nc.jetstream()
    stream = "CALLBACKS_" + market.prefix.replace(".", "_")
    await js.add_stream(
        name=stream, subjects=[f"{market.prefix}.orchestrator.>"], duplicate_window=600
    )
    try:
        n1 = await market.node("n1")

        async def publish_js(cb: msgspec.Struct, msg_id: str) -> None:
            subject = f"{market.prefix}.orchestrator.r1.n1.{cb_method(cb)}/v1"
            data = msgspec.json.encode(cb)
            await js.publish(subject, data, headers={"Nats-Msg-Id": msg_id})

        async def accept_then_run(node: FakeNode, msg: Msg, body: dict[str, Any]) -> Reply:
            await node.reply(msg, await node.default(msg, body))
            await publish_js(run_result("n1", "e-n1"), "e-n1:1")
            await publish_js(run_result("n1", "e-n1"), "e-n1:1")  # deduplicated by the stream
            return None

        async def publish(node: FakeNode, msg: Msg, body: dict[str, Any]) -> Reply:
            await node.reply(msg, await node.default(msg, body))
            await publish_js(publish_result("n1", "e-n1"), "e-n1:2")
            return None

        n1.handlers |= {"BidAccepted": accept_then_run, "ResultAccepted": publish}
        req = await make_requester(callbacks="jetstream")
        assert req.callback_stream == stream

        placement = await req.place(JOB, expected={"n1"}, deadline=5)
        callbacks = await req.run_to_completion("n1", placement.execution_id, timeout=5)
        assert [type(c) for c in callbacks] == [RunResult, PublishResult]

        # A requester started later (same ID) still reads them from the stream.
        again = await make_requester(callbacks="jetstream")
        replay = [await again.wait_callback("e-n1", timeout=5) for _ in range(2)]
        assert replay == callbacks
        await req.close()
        await again.close()
    finally:
        await js.delete_stream(stream)


def cb_method(cb: msgspec.Struct) -> str:
    return {RunResult: "OnRunComplete", PublishResult: "OnPublishComplete"}[type(cb)]
