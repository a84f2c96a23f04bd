"""The outbox dispatcher on a real broker and stream (PROTOCOL.md §6): many rows at once
are all delivered and retired; one the stream refuses is retried, parked after
``--outbox-max-attempts``, and re-sent by ``resend_all``. (Core subscribers, the requester
included, see every attempt: only the stream refuses it.)"""

from __future__ import annotations

import asyncio
import dataclasses

from nats.aio.client import Client

from schemas.callbacks import RunResult
from tests.helpers import assert_eventually
from tests.integration.conftest import NodeFactory
from tests.integration.test_compute import WAIT, bid, make_job, noop_plugins
from worker.requester import Requester


async def test_many_callbacks_at_once_are_all_delivered_and_retired(
    make_node: NodeFactory, r1: Requester
) -> None:
    node = await make_node("n1", plugins=noop_plugins(), limit_total_cpu="64")
    eids = [await bid(r1, make_job(Resources={"CPU": "100m"})) for _ in range(40)]
    await asyncio.gather(*(r1.accept("n1", eid) for eid in eids))
    for eid in eids:
        assert isinstance(await r1.wait_callback(eid, timeout=WAIT), RunResult)
    assert await node.parts.dispatcher.flush(WAIT)
    # flush() returns once the acked rows are marked, not only sent
    for eid in eids:
        rows = await node.store.get_callbacks(eid)
        assert [(r.seq, r.delivered, r.attempts) for r in rows] == [(1, True, 0)], eid
    assert (await node.store.outbox_stats()).pending == 0
    assert node.parts.dispatcher.queued == 0


async def test_a_refused_callback_is_retried_parked_and_resent(
    make_node: NodeFactory, r1: Requester, nc: Client
) -> None:
    node = await make_node("n1", plugins=noop_plugins(), outbox_max_attempts=3)
    js = nc.jetstream()
    name = node.parts.handler.subjects.stream_name()
    info = await js.stream_info(name)
    await js.update_stream(dataclasses.replace(info.config, max_msg_size=1))  # refuses all
    try:
        eid = await bid(r1, make_job())
        await r1.accept("n1", eid)

        async def parked() -> bool:
            rows = await node.store.get_callbacks(eid)
            return bool(rows) and rows[0].parked

        await assert_eventually(parked, timeout=WAIT)
        (row,) = await node.store.get_callbacks(eid)
        assert (row.attempts, row.delivered) == (3, False)
        assert "message size exceeds maximum" in row.last_error, row.last_error
        assert (await js.stream_info(name)).state.messages == 0
        assert await node.parts.dispatcher.flush(WAIT)  # parked: nothing is in flight
    finally:
        await js.update_stream(info.config)
    await node.parts.dispatcher.resend_all()
    assert await node.parts.dispatcher.flush(WAIT)
    (row,) = await node.store.get_callbacks(eid)
    assert (row.delivered, row.parked) == (True, False)
    assert (await js.stream_info(name)).state.messages == 1
