"""Identity (issue 4, check 7; PROTOCOL.md §1). tests/integration/test_serve.py covers
each exit code alone (3 locked, 4 ID mismatch, 5 ID in use); this adds what it does not:
the order of the checks (lock → ID mismatch → ID in use) when several apply, that a
refused process disturbs neither the running node nor any data dir, and that a node
killed with -9 leaves neither a stale lock nor a taken ID behind."""

from __future__ import annotations

import json

from nats.aio.client import Client

from tests.reliability.conftest import (
    NodeFactory,
    count_executions,
    final_checks,
    make_job,
)
from worker.requester import Requester


async def info(client: Client, prefix: str, node_id: str) -> dict[str, object]:
    reply = await client.request(f"{prefix}.compute.{node_id}.probe.NodeInfo/v1", b"", timeout=5)
    value: dict[str, object] = json.loads(reply.data)
    return value


async def test_start_up_checks_in_order_and_harmless(
    make_node: NodeFactory, requester: Requester, client: Client
) -> None:
    a = make_node("a")
    await a.start("--create-callback-stream")
    assert (await requester.ask("a", make_job("mine"))).Accepted
    before = await info(client, a.prefix, "a")

    # A data dir "c" that holds executions under the ID c.
    c = make_node("c")
    await c.start()
    assert (await requester.ask("c", make_job("theirs"))).Accepted
    assert await c.sigterm() == 0

    # Locked AND a different --node-id: the lock is checked first (3, not 4).
    intruder = make_node("other", data_dir=a.data_dir)
    await intruder.spawn()
    assert await intruder.wait_exit() == 3, intruder.current_log()
    assert "locked" in intruder.current_log()

    # c's data dir with --node-id a, which is also in use: mismatch first (4, not 5).
    c.requested_id = "a"
    await c.spawn()
    assert await c.wait_exit() == 4, c.current_log()

    # Nothing was disturbed.
    assert (a.data_dir / "node_id").read_text().strip() == "a"
    assert (c.data_dir / "node_id").read_text().strip() == "c"
    assert count_executions(a.db_path) == 1 and count_executions(c.db_path) == 1
    now = await info(client, a.prefix, "a")
    assert now["InstanceID"] == before["InstanceID"] and now["NodeID"] == "a"

    # kill -9: no stale lock, no taken ID; the same data dir starts again as a.
    first_instance = now["InstanceID"]
    await a.kill9()
    assert await a.start() == "a"
    again = await info(client, a.prefix, "a")
    assert again["InstanceID"] != first_instance
    await requester.reject("a", next(iter(await requester.reconcile("a"))), "done")
    assert await a.sigterm() == 0
    await final_checks(a, client)
