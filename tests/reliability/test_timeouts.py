"""Timeouts of the waiting states across a restart (issue 4, check 3; PROTOCOL.md §5).

Bid TTL (Created → Cancelled ``BidExpired``), queue timeout (BidAccepted → Failed
``QueueTimeout``, counted from BidAccepted across restarts) and verification TTL
(WaitingVerification → Failed ``VerificationExpired``): when the deadline passes while the
node is down, the move fires right after the next start, and what expired never runs.
"""

from __future__ import annotations

import contextlib
import json
import time

from nats.aio.client import Client

from tests.reliability.conftest import (
    ExecRec,
    NodeFactory,
    final_checks,
    make_job,
    snapshot,
    wait_for,
)
from worker.requester import Requester

FIRE_WITHIN = 2.0  # seconds after the node is ready again


async def test_deadlines_passed_while_down_fire_right_after_start(
    make_node: NodeFactory, requester: Requester, client: Client
) -> None:
    node = make_node(
        args=[
            "--bid-ttl=2s",
            "--queue-timeout=3s",
            "--verification-ttl=3s",
            "--limit-total-cpu=1.5",
            "--limit-queue-cpu=4",
        ]
    )
    await node.start("--create-callback-stream")
    nid = node.node_id

    async def place(tag: str, *, cpu: str = "100m", delay_ms: int = 0) -> str:
        bid = await requester.ask(nid, make_job(tag, cpu=cpu, delay_ms=delay_ms))
        assert bid.Accepted, bid.Reason
        await requester.accept(nid, bid.ExecutionID)
        return bid.ExecutionID

    verify = await place("verify")  # runs at once, then waits for verification
    await wait_for(
        lambda: snapshot(node.db_path)[verify].state == "WaitingVerification",
        timeout=5,
        what="run done",
    )
    slow = await place("slow", cpu="1", delay_ms=60_000)  # holds the running capacity
    await wait_for(
        lambda: snapshot(node.db_path)[slow].state == "Running", timeout=5, what="slow runs"
    )
    queued = [await place(f"queued{i}", cpu="1") for i in range(2)]  # cannot start
    created = (await requester.ask(nid, make_job("created"))).ExecutionID  # never answered
    await node.kill9()

    before = snapshot(node.db_path)
    expect = {
        verify: "WaitingVerification",
        slow: "Running",
        queued[0]: "BidAccepted",
        queued[1]: "BidAccepted",
        created: "Created",
    }
    assert {eid: before[eid].state for eid in expect} == expect, "set-up too slow"
    deadlines = [before[eid].deadline_us for eid in (verify, *queued, created)]
    assert all(d is not None for d in deadlines)
    last = max(d for d in deadlines if d is not None) / 1e6
    # Down until every deadline has passed (a wall-clock condition, polled).
    await wait_for(lambda: time.time() > last + 0.2, timeout=10, what="deadlines pass")

    await node.start()
    ready = time.monotonic()

    def fired() -> bool:
        snap = snapshot(node.db_path)
        return all(snap[e].state in ("Failed", "Cancelled") for e in expect)

    with contextlib.suppress(AssertionError):  # the asserts below say what is missing
        await wait_for(fired, timeout=FIRE_WITHIN, what="expiries after start")
    print(f"waited {time.monotonic() - ready:.2f}s after the node was ready")
    after = snapshot(node.db_path)

    def ended(ex: ExecRec, state: str, cause: str) -> None:
        assert (ex.state, ex.last_cause) == (state, cause), (ex.id, ex.causes())

    ended(after[created], "Cancelled", "BidExpired")
    assert after[created].outbox == []
    ended(after[verify], "Failed", "VerificationExpired")
    ended(after[slow], "Failed", "NodeRestart")
    for eid in queued:
        assert "RunStarted" not in after[eid].causes(), (
            f"{eid} was started by the restart although its queue timeout had passed while "
            f"the node was down: {after[eid].causes()}"
        )
        ended(after[eid], "Failed", "QueueTimeout")
        err = json.loads(after[eid].outbox[-1].body)
        assert err["Cause"] == "QueueTimeout", err
        assert err["Err"] == "execution not started within the queue timeout of 3s", err
    for eid in (*queued, created):
        assert eid not in node.runs(), f"{eid} ran though it had expired"

    assert await node.sigterm() == 0, node.current_log()
    await final_checks(node, client)
