"""Broker faults (issue 4, check 2): nats-server killed and restarted on the same port and
store dir, and a silent partition through a blackholing TCP proxy. The node must notice
within 15 s, reconnect and resubscribe by itself, answer requests within 10 s of the
broker being reachable again (PROTOCOL.md §6), and re-send its outbox: in ``jetstream``
mode no callback is lost and none is delivered twice with different content."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client

from tests.reliability.conftest import (
    Broker,
    Load,
    NodeFactory,
    NodeProc,
    Tap,
    check_requester_view,
    connect,
    final_checks,
    node_answers,
    snapshot,
    wait_for,
)
from tests.reliability.tcpproxy import TcpProxy
from worker.requester import Requester

DISCONNECTED = "disconnected from the broker"
RECONNECTED = "reconnected to"


def undelivered(node: NodeProc) -> int:
    return sum(not r.delivered for e in snapshot(node.db_path).values() for r in e.outbox)


def finished_while_away(node: NodeProc, since_us: int) -> bool:
    """Some run ended while the broker was away: its RunResult had to wait in the outbox."""
    return any(
        h.cause == "RunCompleted" and h.time_us > since_us
        for e in snapshot(node.db_path).values()
        for h in e.history
    )


async def answers_within(url: str, prefix: str, node_id: str, timeout: float) -> float:
    """Seconds until the node answers a request, asked over a fresh connection."""
    started = time.monotonic()
    nc = await connect(url)
    try:
        await wait_for(
            lambda: node_answers(nc, prefix, node_id, timeout=0.5),
            timeout=timeout,
            interval=0.1,
            what=f"node answers within {timeout}s",
        )
    finally:
        await nc.close()
    return time.monotonic() - started


@pytest.fixture
async def proxy(broker: Broker) -> AsyncIterator[TcpProxy]:
    p = TcpProxy("127.0.0.1", broker.port)
    await p.start()
    yield p
    await p.stop()


async def test_broker_kill9_restart_same_port(
    make_node: NodeFactory, broker: Broker, requester: Requester, client: Client
) -> None:
    node = make_node()
    await node.start("--create-callback-stream")
    await requester.start(callbacks="jetstream")
    tap = Tap()
    await tap.start(client, node.prefix)
    load = Load(requester, node.node_id, slow_every=3, slow_ms=1_500)
    load.start()
    await wait_for(lambda: load.stats.accepts >= 30, timeout=30, what="load running")

    killed_us = time.time_ns() // 1000
    killed = time.monotonic()
    broker.kill9()
    await wait_for(lambda: DISCONNECTED in node.current_log(), timeout=15, what="node notices")
    print(f"noticed the dead broker in {time.monotonic() - killed:.2f}s")
    # Stay down until some run has ended meanwhile (its callback can only wait).
    await wait_for(
        lambda: finished_while_away(node, killed_us), timeout=15, what="a run ends offline"
    )
    assert undelivered(node) > 0
    broker.restart()
    took = await answers_within(broker.url, node.prefix, node.node_id, timeout=10)
    print(f"answered {took:.2f}s after the broker came back")
    await wait_for(lambda: RECONNECTED in node.current_log(), timeout=10, what="reconnect log")

    accepted = load.stats.accepts
    await wait_for(lambda: load.stats.accepts >= accepted + 10, timeout=30, what="bids again")
    await load.stop()
    await load.settle()
    await wait_for(lambda: undelivered(node) == 0, timeout=30, what="outbox re-sent")
    assert node.alive
    assert await node.sigterm() == 0, node.current_log()
    snap = await final_checks(node, client, tap=tap)
    # Its ordered consumer re-attaches only after missed heartbeats (~10-15 s).
    await check_requester_view(requester, snap, timeout=30)
    print(f"requester dropped {requester.duplicate_callbacks} duplicates")


async def test_silent_partition_through_proxy(
    make_node: NodeFactory, broker: Broker, proxy: TcpProxy, requester: Requester, client: Client
) -> None:
    node = make_node(nats_url=proxy.url)
    await node.start("--create-callback-stream")
    await requester.start(callbacks="jetstream")
    tap = Tap()
    await tap.start(client, node.prefix)
    load = Load(requester, node.node_id, slow_every=3, slow_ms=1_500)
    load.start()
    await wait_for(lambda: load.stats.accepts >= 30, timeout=30, what="load running")

    cut_us = time.time_ns() // 1000
    cut = time.monotonic()
    proxy.blackhole()
    # Nothing tells the node: only its pings can. It must notice within 15 s.
    await wait_for(lambda: DISCONNECTED in node.current_log(), timeout=15, what="node notices")
    print(f"noticed the partition in {time.monotonic() - cut:.2f}s")
    assert not await node_answers(client, node.prefix, node.node_id, timeout=0.5)
    await wait_for(lambda: finished_while_away(node, cut_us), timeout=15, what="a run ends")
    assert undelivered(node) > 0

    await proxy.heal()
    took = await answers_within(broker.url, node.prefix, node.node_id, timeout=10)
    print(f"answered {took:.2f}s after the partition healed")
    await wait_for(lambda: RECONNECTED in node.current_log(), timeout=10, what="reconnect log")

    accepted = load.stats.accepts
    await wait_for(lambda: load.stats.accepts >= accepted + 10, timeout=30, what="bids again")
    await load.stop()
    await load.settle()
    await wait_for(lambda: undelivered(node) == 0, timeout=30, what="outbox re-sent")
    assert await node.sigterm() == 0, node.current_log()
    snap = await final_checks(node, client, tap=tap)
    # Its ordered consumer re-attaches only after missed heartbeats (~10-15 s).
    await check_requester_view(requester, snap, timeout=30)
    print(f"requester dropped {requester.duplicate_callbacks} duplicates")
