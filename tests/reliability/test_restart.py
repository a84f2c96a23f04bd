"""Restart recovery (issue 4, check 1): kill -9 the node process under load, restart it on
the same data dir, and check PROTOCOL.md §1 (same node ID), §5 (restart policy: every
execution kept, Running → Failed ``node restart`` with a ComputeError, nothing run twice)
and §6 (undelivered callbacks re-sent in order with the same ``Nats-Msg-Id``)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

import pytest
from nats.aio.client import Client

from tests.reliability.conftest import (
    Load,
    NodeFactory,
    NodeProc,
    Snapshot,
    StreamMsg,
    Tap,
    check_requester_view,
    final_checks,
    make_job,
    read_stream,
    rng,
    snapshot,
    stream_name,
    wait_for,
)
from worker.requester import Requester


def running(snap: Snapshot) -> list[str]:
    return [e.id for e in snap.values() if e.state == "Running"]


def assert_restart_policy(before: Snapshot, after: Snapshot) -> None:
    """What the node must have done before it printed NODE_ID again (§5 restart policy)."""
    missing = sorted(set(before) - set(after))
    assert not missing, f"executions lost over the restart: {missing}"
    for eid in running(before):
        ex = after[eid]
        assert ex.state == "Failed", (eid, ex.state, ex.causes())
        assert ex.last_cause == "NodeRestart", (eid, ex.causes())
        assert ex.history[-1].comment == "node restart"
        last = ex.outbox[-1]
        assert last.kind == "OnComputeFailure", (eid, [r.kind for r in ex.outbox])
        body = json.loads(last.body)
        assert body["Err"] == "node restart" and body["Cause"] == "NodeRestart", body
    for eid, ex in before.items():
        # Nothing else moved backwards, and what was written stays written.
        now = after[eid]
        assert now.history[: len(ex.history)] == ex.history, eid
        assert [(r.seq, r.body) for r in now.outbox[: len(ex.outbox)]] == [
            (r.seq, r.body) for r in ex.outbox
        ], eid


def node_id_file(node: NodeProc) -> str:
    return (node.data_dir / "node_id").read_text().strip()


async def test_kill9_under_load_then_restart(
    make_node: NodeFactory, requester: Requester, client: Client
) -> None:
    """One kill -9 at a random moment while jobs are being placed and some are Running."""
    r = rng()
    node = make_node("gen", node_id="")  # the node generates and persists its ID
    first_id = await node.start("--create-callback-stream")
    assert first_id.startswith("n-") and node_id_file(node) == first_id
    tap = Tap()
    await tap.start(client, node.prefix)
    load = Load(requester, first_id, slow_every=4, slow_ms=6_000)
    load.start()
    target = r.randint(20, 60)
    await wait_for(
        lambda: load.stats.accepts >= target and running(snapshot(node.db_path)),
        timeout=30,
        what=f"{target} accepted jobs and one Running",
    )
    await node.kill9()
    before = snapshot(node.db_path)
    assert running(before), "the kill should catch slow jobs Running"
    load.slow_every = 0  # no more slow jobs: the test must settle soon

    assert await node.start() == first_id  # no --node-id: the persisted one
    assert node_id_file(node) == first_id
    after = snapshot(node.db_path)
    assert_restart_policy(before, after)

    # The node bids again and runs what was queued; then everything settles.
    accepted = load.stats.accepts
    await wait_for(lambda: load.stats.accepts >= accepted + 10, timeout=30, what="bids again")
    await load.stop()
    await load.settle()
    assert await node.sigterm() == 0, node.current_log()
    await final_checks(node, client, tap=tap)


async def test_undelivered_callbacks_resent_in_order_after_kill9(
    make_node: NodeFactory, requester: Requester, client: Client
) -> None:
    """Callbacks the stream refused stay in the outbox; after kill -9 and restart they are
    re-sent in Seq order with the same Nats-Msg-Id and the same bytes."""
    node = make_node()
    await node.start("--create-callback-stream")
    tap = Tap()
    await tap.start(client, node.prefix)
    js = client.jetstream()
    name = stream_name(node.prefix)
    info = await js.stream_info(name)
    # The operator's stream refuses every message for a while: publishes fail (retryable).
    await js.update_stream(replace(info.config, max_msg_size=1))

    ids = []
    for _ in range(4):
        bid = await requester.ask(node.node_id, make_job("held"))
        await requester.accept(node.node_id, bid.ExecutionID)
        ids.append(bid.ExecutionID)
    slow = await requester.ask(node.node_id, make_job("slow", delay_ms=60_000))
    await requester.accept(node.node_id, slow.ExecutionID)

    async def results_waiting() -> bool:
        states = await requester.reconcile(node.node_id)
        return all(states[i].value == "WaitingVerification" for i in ids)

    await wait_for(results_waiting, timeout=15, what="runs done")
    for eid in ids[:2]:
        await requester.accept_result(node.node_id, eid)  # PublishResult queues behind

    def held() -> bool:
        snap = snapshot(node.db_path)
        rows = [r for i in ids for r in snap[i].outbox]
        two = all(len(snap[i].outbox) == 2 for i in ids[:2])
        # Seq 1 was tried and refused; Seq 2 waits behind it (one in flight per execution).
        tried = all(snap[i].outbox[0].attempts >= 1 for i in ids)
        return two and tried and not any(r.delivered for r in rows)

    await wait_for(held, timeout=15, what="callbacks tried and held in the outbox")
    await node.kill9()
    before = snapshot(node.db_path)
    pending = {(i, r.seq): r for i in before for r in before[i].outbox if not r.delivered}
    assert len(pending) == 6, sorted(pending)
    assert before[slow.ExecutionID].state == "Running"

    await js.update_stream(info.config)
    started = time.monotonic()
    await node.start()

    async def all_in_stream() -> list[StreamMsg] | None:
        msgs = await read_stream(client, node.prefix)
        ids_seen = {m.msg_id for m in msgs}
        wanted = {f"{i}:{s}" for i, s in pending} | {f"{slow.ExecutionID}:1"}
        return msgs if wanted <= ids_seen else None

    msgs: list[StreamMsg] = await wait_for(all_in_stream, timeout=15, what="re-sent")
    print(f"re-sent within {time.monotonic() - started:.2f}s of the restart")
    order: dict[str, list[int]] = {}
    for m in msgs:
        eid, seq = m.msg_id.rsplit(":", 1)
        order.setdefault(eid, []).append(int(seq))
        row = pending.get((eid, int(seq)))
        if row is not None:
            assert m.data == row.body and m.subject == row.subject, m.msg_id
            assert m.headers["Nats-Msg-Id"] == row.headers["Nats-Msg-Id"] == m.msg_id
    for eid in ids[:2]:
        assert order[eid] == [1, 2], (eid, order[eid])
    for eid in ids[2:]:
        assert order[eid] == [1], (eid, order[eid])
    failure = next(m for m in msgs if m.msg_id == f"{slow.ExecutionID}:1")
    assert failure.kind == "OnComputeFailure" and failure.body["Err"] == "node restart"

    load = Load(requester, node.node_id)
    await load.settle()
    assert await node.sigterm() == 0, node.current_log()
    await final_checks(node, client, tap=tap)


async def kill_loop(
    node: NodeProc,
    requester: Requester,
    client: Client,
    *,
    rounds: int,
    min_delay: float,
    max_delay: float,
    slow_ms: int,
) -> None:
    """``rounds`` × (start, load for a random while, kill -9, check the restart policy)."""
    r = rng()
    tap = Tap()
    await tap.start(client, node.prefix)
    load: Load | None = None
    before: Snapshot | None = None
    caught_running = 0
    for round_no in range(rounds):
        node_id = await node.start(*(["--create-callback-stream"] if round_no == 0 else []))
        assert node_id == node.requested_id
        after = snapshot(node.db_path)
        if before is not None:
            assert_restart_policy(before, after)
        if load is None:
            await requester.start(callbacks="jetstream")
            load = Load(
                requester,
                node_id,
                slow_every=5,
                slow_ms=slow_ms,
                max_jobs=100_000,
                reject_every=7,
            )
            load.start()
        # The nemesis' random moment, always under load: some new accepts, then a while.
        accepted = load.stats.accepts
        more = r.randint(3, 30)
        await wait_for(
            lambda: load.stats.accepts >= accepted + more,  # noqa: B023
            timeout=30,
            what=f"round {round_no}: {more} accepts",
        )
        await asyncio.sleep(r.uniform(min_delay, max_delay))
        await node.kill9()
        before = snapshot(node.db_path)
        caught_running += len(running(before))
        print(f"round {round_no}: {len(before)} executions, {len(running(before))} Running")
    assert load is not None
    await node.start()
    assert before is not None
    assert_restart_policy(before, snapshot(node.db_path))
    await load.stop()
    await load.settle(timeout=60)
    assert await node.sigterm() == 0, node.current_log()
    snap = await final_checks(node, client, tap=tap)
    await check_requester_view(requester, snap)
    print(f"load: {load.stats}; caught Running at kill: {caught_running}")
    assert caught_running > 0
    # Every bid the requester received was committed before it was sent (§5).
    assert load.executions <= set(snapshot(node.db_path)), "a bid the node sent was lost"


async def test_kill9_loop_ten_rounds_under_load(
    make_node: NodeFactory, requester: Requester, client: Client
) -> None:
    node = make_node()
    await kill_loop(node, requester, client, rounds=10, min_delay=0.0, max_delay=0.5, slow_ms=1_000)


@pytest.mark.soak
@pytest.mark.timeout(900)
async def test_kill9_soak(make_node: NodeFactory, requester: Requester, client: Client) -> None:
    """Nomad's KillDuringRestart, bounded: 60 kills, 1.5–7.5 s of load each (≈ 5 min)."""
    node = make_node()
    await kill_loop(node, requester, client, rounds=60, min_delay=1.5, max_delay=7.5, slow_ms=3_000)
