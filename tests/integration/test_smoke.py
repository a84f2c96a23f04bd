"""A job from ask to PublishResult through raw NATS requests."""

from __future__ import annotations

import json

from nats.aio.client import Client

from tests.integration.conftest import NodeFactory


def ask_body(job_id: str = "j1", requester: str = "r1", **spec: object) -> bytes:
    return json.dumps(
        {
            "SourcePeerID": requester,
            "Job": {"Metadata": {"ID": job_id}, "Spec": {"Engine": "Noop", **spec}},
        }
    ).encode()


async def test_noop_job_end_to_end(make_node: NodeFactory, nc: Client, prefix: str) -> None:
    await make_node("n1")
    callbacks = await nc.subscribe(f"{prefix}.orchestrator.r1.>")
    reply = await nc.request(f"{prefix}.compute.n1.r1.AskForBid/v1", ask_body(), timeout=5)
    bid = json.loads(reply.data)
    assert bid["Accepted"] is True, bid
    assert bid["ExecutionID"].startswith("e-")
    eid = bid["ExecutionID"]
    body = json.dumps({"SourcePeerID": "r1", "ExecutionID": eid}).encode()
    reply = await nc.request(f"{prefix}.compute.n1.r1.BidAccepted/v1", body, timeout=5)
    assert json.loads(reply.data)["State"] in ("BidAccepted", "Running", "WaitingVerification")
    msg = await callbacks.next_msg(timeout=5)
    assert msg.subject.endswith("OnRunComplete/v1")
    assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == f"{eid}:1"
    run = json.loads(msg.data)
    assert run["Seq"] == 1 and run["RunCommandResult"]["exitCode"] == 0
    reply = await nc.request(f"{prefix}.compute.n1.r1.ResultAccepted/v1", body, timeout=5)
    assert json.loads(reply.data)["State"] in ("ResultAccepted", "Publishing", "Completed")
    msg = await callbacks.next_msg(timeout=5)
    assert msg.subject.endswith("OnPublishComplete/v1")
    assert json.loads(msg.data)["Seq"] == 2
    reply = await nc.request(f"{prefix}.compute.n1.r1.GetExecution/v1", body, timeout=5)
    view = json.loads(reply.data)
    assert view["Execution"]["State"] == "Completed"
    causes = [h["Cause"] for h in view["History"]]
    assert causes == [
        "AskForBid",
        "BidAccepted",
        "RunStarted",
        "RunCompleted",
        "ResultAccepted",
        "PublishStarted",
        "PublishCompleted",
    ]


async def test_without_an_exporter_no_span_is_made_but_context_flows(
    make_node: NodeFactory, nc: Client, prefix: str
) -> None:
    """Nothing exports: the node makes no span, yet its reply and callbacks carry the
    requester's trace context (PROTOCOL.md §8)."""
    node = await make_node("n1", record_spans=False)
    assert node._provider is None
    callbacks = await nc.subscribe(f"{prefix}.orchestrator.r1.>")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    reply = await nc.request(
        f"{prefix}.compute.n1.r1.AskForBid/v1", ask_body(), timeout=5, headers=headers
    )
    assert trace_id in (reply.headers or {}).get("traceparent", "")
    eid = json.loads(reply.data)["ExecutionID"]
    body = json.dumps({"SourcePeerID": "r1", "ExecutionID": eid}).encode()
    await nc.request(f"{prefix}.compute.n1.r1.BidAccepted/v1", body, timeout=5, headers=headers)
    msg = await callbacks.next_msg(timeout=5)
    assert msg.headers is not None and trace_id in msg.headers["traceparent"]
