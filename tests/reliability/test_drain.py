"""Drain (issue 4, check 6; PROTOCOL.md §10) on node processes.

SIGTERM: first NodeInfo with ``Draining: true``, then asks declined ``node is draining``
(Retryable) while every other subject is served; Running executions get the grace period,
then fail ``node shutdown``; other states are left for the restart policy; the outbox is
flushed; exit 0. A second signal exits at once. A rolling restart (SIGTERM, start again)
under load loses nothing that a crash would keep.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg

from tests.reliability.conftest import (
    Load,
    NodeFactory,
    check_requester_view,
    final_checks,
    make_job,
    rng,
    snapshot,
    wait_for,
)
from worker.requester import Requester

GRACE = 2.0


async def place(r: Requester, node_id: str, tag: str, *, delay_ms: int = 0) -> str:
    bid = await r.ask(node_id, make_job(tag, delay_ms=delay_ms))
    assert bid.Accepted, bid.Reason
    await r.accept(node_id, bid.ExecutionID)
    return bid.ExecutionID


async def test_drain_follows_protocol(
    make_node: NodeFactory, requester: Requester, client: Client
) -> None:
    node = make_node(
        args=[f"--shutdown-grace={GRACE:g}s", "--limit-total-cpu=0.2", "--limit-queue-cpu=2"]
    )
    await node.start("--create-callback-stream")
    nid = node.node_id
    infos: list[dict[str, object]] = []

    async def on_info(msg: Msg) -> None:
        infos.append(json.loads(msg.data))

    await client.subscribe(f"{node.prefix}.info.{nid}", cb=on_info)
    await client.flush()

    verify = await place(requester, nid, "verify")
    await wait_for(
        lambda: snapshot(node.db_path)[verify].state == "WaitingVerification", timeout=10
    )
    stuck = await place(requester, nid, "stuck", delay_ms=60_000)  # outlives the grace
    short = await place(requester, nid, "short", delay_ms=int(GRACE * 400))  # ends within it
    queued = await place(requester, nid, "queued")  # no running capacity left: stays queued
    created = (await requester.ask(nid, make_job("created"))).ExecutionID
    cancel_me = (await requester.ask(nid, make_job("cancelme"))).ExecutionID

    def states() -> dict[str, str]:
        snap = snapshot(node.db_path)
        return {e: snap[e].state for e in (stuck, short, queued)}

    await wait_for(
        lambda: states() == {stuck: "Running", short: "Running", queued: "BidAccepted"},
        timeout=10,
        what="set-up",
    )
    infos.clear()
    signalled = time.monotonic()
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    await wait_for(lambda: infos, timeout=5, what="a NodeInfo after SIGTERM")
    assert infos[0]["Draining"] is True, infos[0]

    # Draining: asks declined, every other subject served.
    bid = await requester.ask(nid, make_job("late"))
    assert not bid.Accepted and bid.Reason.startswith("node is draining") and bid.Retryable, bid
    assert (await requester.cancel(nid, cancel_me, "drain test")).State.value == "Cancelled"
    assert (await requester.accept_result(nid, verify)).State.value != "WaitingVerification"
    view = await requester.get_execution(nid, stuck)
    assert view.Execution.State.value == "Running"
    assert (await requester.node_info(nid)).Draining is True

    code = await node.wait_exit(timeout=GRACE + 20)
    took = time.monotonic() - signalled
    assert code == 0, node.current_log()
    print(f"drained in {took:.2f}s (grace {GRACE}s)")
    assert took >= GRACE * 0.9, "did not wait the grace period for the stuck run"

    after = snapshot(node.db_path)
    assert (after[stuck].state, after[stuck].last_cause) == ("Failed", "NodeShutdown")
    failure = json.loads(after[stuck].outbox[-1].body)
    assert failure["Err"] == "node shutdown" and failure["Cause"] == "NodeShutdown", failure
    assert after[short].state == "WaitingVerification", after[short].causes()
    assert after[queued].state == "BidAccepted", after[queued].causes()  # restart policy's
    assert after[created].state == "Created"
    assert after[cancel_me].state == "Cancelled"
    undelivered = [(e, r.seq) for e, x in after.items() for r in x.outbox if not r.delivered]
    assert undelivered == [], f"outbox not flushed by the drain: {undelivered}"

    # The restart policy picks up what the drain left.
    await node.start()
    await wait_for(
        lambda: snapshot(node.db_path)[queued].state != "BidAccepted", timeout=10, what="runs"
    )
    await Load(requester, nid).settle(timeout=20)
    assert await node.sigterm() == 0, node.current_log()
    await final_checks(node, client)


async def test_sigterm_right_after_ready_drains(make_node: NodeFactory) -> None:
    """A supervisor may signal as soon as it reads NODE_ID=: the node drains and exits 0
    (the handlers are in place before the line is written, not after)."""
    node = make_node(env={"RELIABILITY_READY_PAUSE_MS": "500"})
    await node.start("--create-callback-stream")
    code = await node.sigterm(timeout=30)
    assert code == 0, (code, node.current_log())
    assert "draining" in node.current_log()


async def test_sigterm_during_start_up_drains_once_up(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    """SIGTERM while the node is still starting: it comes up, drains at once, exits 0
    (not killed by the signal's default action)."""
    mark = tmp_path / "starting"
    node = make_node(
        env={"RELIABILITY_START_PAUSE_MS": "1000", "RELIABILITY_START_MARK": str(mark)}
    )
    proc = await node.spawn("--create-callback-stream")
    await wait_for(mark.exists, timeout=30, what="start-up has begun")
    proc.send_signal(signal.SIGTERM)
    code = await node.wait_exit(timeout=60)
    log = node.current_log()
    assert code == 0, (code, log)
    assert "a signal came during start-up" in log and "draining" in log, log
    assert proc.stdout is not None
    assert (await proc.stdout.read()).decode().startswith("NODE_ID="), log


async def test_second_signal_exits_at_once(
    make_node: NodeFactory, requester: Requester, client: Client
) -> None:
    node = make_node(args=["--shutdown-grace=60s"])
    await node.start("--create-callback-stream")
    stuck = await place(requester, node.node_id, "stuck", delay_ms=60_000)
    await wait_for(lambda: snapshot(node.db_path)[stuck].state == "Running", timeout=10)
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    await wait_for(lambda: "draining" in node.current_log(), timeout=5, what="the drain has begun")
    second = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    code = await node.wait_exit(timeout=5)
    assert code != 0 and time.monotonic() - second < 3, (code, node.current_log())
    # Not drained: the restart policy fails the run it interrupted.
    await node.start()
    ex = snapshot(node.db_path)[stuck]
    assert (ex.state, ex.last_cause) == ("Failed", "NodeRestart"), ex.causes()
    assert await node.sigterm() == 0
    await final_checks(node, client)


async def test_rolling_restart_under_load_loses_nothing(
    make_node: NodeFactory, requester: Requester, client: Client
) -> None:
    r = rng()
    node = make_node(args=["--shutdown-grace=1s"])
    load: Load | None = None
    for round_no in range(3):
        nid = await node.start(*(["--create-callback-stream"] if round_no == 0 else []))
        if load is None:
            await requester.start(callbacks="jetstream")
            load = Load(requester, nid, slow_every=4, slow_ms=1_500, max_jobs=100_000)
            load.start()
        accepted = load.stats.accepts
        more = r.randint(10, 40)
        await wait_for(
            lambda: load is not None and load.stats.accepts >= accepted + more,  # noqa: B023
            timeout=30,
            what=f"round {round_no}: {more} accepts",
        )
        await asyncio.sleep(r.uniform(0, 0.5))  # the random moment of the rolling restart
        started = time.monotonic()
        code = await node.sigterm(timeout=30)
        assert code == 0, node.current_log()
        snap = snapshot(node.db_path)
        undelivered = [(e, x.seq) for e, ex in snap.items() for x in ex.outbox if not x.delivered]
        assert undelivered == [], f"round {round_no}: drain left callbacks: {undelivered}"
        print(f"round {round_no}: drained in {time.monotonic() - started:.2f}s, {len(snap)} ex.")
        assert load.executions <= set(snap), "a bid the node sent was lost"
    assert load is not None
    await node.start()
    await load.stop()
    await load.settle(timeout=30)
    assert await node.sigterm() == 0, node.current_log()
    snap = await final_checks(node, client)
    await check_requester_view(requester, snap)
    print(f"load: {load.stats}")
