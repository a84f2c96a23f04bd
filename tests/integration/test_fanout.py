"""Fan-out on ``<p>.compute._all.<r>.AskForBid/v1`` with three nodes (PROTOCOL.md §2):
one reply per node, silent declines, placement, and a malformed ask answered 400 by each.
"""

from __future__ import annotations

import json

from nats.aio.client import Client
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from schemas.callbacks import PublishResult, RunResult
from schemas.compute import ExecutionState as S
from tests.helpers import assert_eventually
from tests.integration.conftest import NodeFactory
from tests.integration.test_compute import WAIT, make_job, state_of
from worker.requester import Requester

NODES = {"n1", "n2", "n3"}


async def test_fan_out_three_bids(make_node: NodeFactory, r1: Requester) -> None:
    nodes = {name: await make_node(name) for name in sorted(NODES)}
    job = make_job()
    bids = await r1.fan_out(job, expected=NODES, deadline=WAIT)
    assert bids.errors == [] and bids.duplicates == []
    assert sorted(b.NodeID for b in bids) == sorted(NODES)
    assert all(b.Accepted and b.JobID == job.Metadata.ID for b in bids)
    assert len({b.ExecutionID for b in bids}) == 3
    for b in bids:
        assert await state_of(r1, b.ExecutionID, b.NodeID) == S.CREATED
        assert await nodes[b.NodeID].store.count() == 1
    for b in bids:
        await r1.reject(b.NodeID, b.ExecutionID, "test over")


async def test_fan_out_seen_nodes_by_default(make_node: NodeFactory, r1: Requester) -> None:
    """Without ``expected`` the requester waits for the nodes it saw on ``<p>.info.*``."""
    for name in sorted(NODES):
        await make_node(name)
    await assert_eventually(lambda: r1.seen_nodes() == NODES, timeout=WAIT)
    bids = await r1.fan_out(make_job(), deadline=WAIT)
    assert sorted(b.NodeID for b in bids) == sorted(NODES)
    for b in bids:
        await r1.reject(b.NodeID, b.ExecutionID)


async def test_fan_out_declines_are_answered(make_node: NodeFactory, r1: Requester) -> None:
    await make_node("n1", job_selection_accept_networked=True)
    await make_node("n2")
    await make_node("n3")
    bids = await r1.fan_out(make_job(Network={"Type": "Full"}), expected=NODES, deadline=WAIT)
    by_node = {b.NodeID: b for b in bids}
    assert set(by_node) == NODES
    assert by_node["n1"].Accepted is True
    for name in ("n2", "n3"):
        assert by_node[name].Accepted is False
        assert by_node[name].Reason.startswith("networking is enabled: false")
        assert by_node[name].ExecutionID == ""
    await r1.reject("n1", by_node["n1"].ExecutionID)


async def test_silent_declines_answer_only_bids(
    make_node: NodeFactory, r1: Requester, spans: InMemorySpanExporter, prefix: str
) -> None:
    await make_node("n1", fanout_silent_declines=True, job_selection_accept_networked=True)
    await make_node("n2", fanout_silent_declines=True)
    await make_node("n3", fanout_silent_declines=True)
    job = make_job(Network={"Type": "Full"})
    # n2 and n3 stay silent, so the fan-out runs to its deadline.
    bids = await r1.fan_out(job, expected=NODES, deadline=1.0)
    assert [(b.NodeID, b.Accepted) for b in bids] == [("n1", True)]
    assert bids.errors == []
    # They did get the ask (their request spans ended) and declined it silently.
    template = f"{prefix}.compute._all.{{requester}}.AskForBid/v1 process"

    def handled_by() -> set[str]:
        return {
            str((s.attributes or {}).get("node.id"))
            for s in spans.get_finished_spans()
            if s.name == template and s.kind == SpanKind.CONSUMER
        }

    await assert_eventually(lambda: handled_by() == NODES, timeout=WAIT)
    # A direct ask still gets its decline: silence applies to _all only.
    reply = await r1.ask("n2", job)
    assert reply.Accepted is False and reply.Reason.startswith("networking is enabled: false")
    await r1.reject("n1", bids[0].ExecutionID)


async def test_place_accepts_one_and_rejects_the_others(
    make_node: NodeFactory, r1: Requester
) -> None:
    for name in sorted(NODES):
        await make_node(name)
    job = make_job()
    placement = await r1.place(job, expected=NODES, deadline=WAIT, linger=0.5)
    assert placement.node_id in NODES
    assert placement.response.State in (S.BID_ACCEPTED, S.RUNNING, S.WAITING_VERIFICATION)
    assert placement.errors == []
    assert sorted(b.NodeID for b in placement.bids) == sorted(NODES)
    for b in placement.bids:
        if b.NodeID == placement.node_id:
            continue
        assert await state_of(r1, b.ExecutionID, b.NodeID) == S.CANCELLED
        view = await r1.get_execution(b.NodeID, b.ExecutionID)
        assert view.History[-1].Cause == "BidRejected"
        assert view.Callbacks == []
    callbacks = await r1.run_to_completion(placement.node_id, placement.execution_id, timeout=WAIT)
    assert [type(cb) for cb in callbacks] == [RunResult, PublishResult]
    assert await state_of(r1, placement.execution_id, placement.node_id) == S.COMPLETED


async def test_malformed_ask_on_all_gets_400_from_each_node(
    make_node: NodeFactory, nc: Client, prefix: str
) -> None:
    nodes = {name: await make_node(name) for name in sorted(NODES)}
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(
            f"{prefix}.compute._all.r1.AskForBid/v1", b'{"SourcePeerID": 1}', reply=inbox
        )
        replies = []
        for _ in NODES:
            replies.append(await sub.next_msg(timeout=WAIT))
    finally:
        await sub.unsubscribe()
    seen = set()
    for msg in replies:
        headers = msg.headers or {}
        node_id = headers.get("Compute-Node-ID", "")
        seen.add(node_id)
        assert headers.get("Nats-Service-Error-Code") == "400", (headers, msg.data)
        assert headers.get("Compute-Instance-ID") == nodes[node_id].instance_id
        body = json.loads(msg.data)
        assert body["Code"] == 400 and body["NodeID"] == node_id
        assert body["Error"] == headers.get("Nats-Service-Error")
    assert seen == NODES
    for node in nodes.values():
        assert await node.store.count() == 0
