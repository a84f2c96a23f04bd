"""The operator's procedures of deploy/README.md, on a running market: add a node, rotate
its creds, drain and remove it. Each step is the README's command (gen-creds, a
server reload, a node restart) and each promise is checked: a new node needs no server
change; after a rotation or a removal the old key is refused by every server."""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.errors import Error as NatsError

from tests.cluster.conftest import (
    PREFIX,
    Market,
    check_complete,
    make_job,
    make_market,
    read_callbacks,
    run_gen_creds,
    spawn_node,
)
from tests.helpers import assert_eventually
from worker.requester import Requester

WAIT = 15.0


@pytest.fixture
def market(tmp_path: Path) -> Iterator[Market]:
    yield from make_market(tmp_path / "market", nodes=["n1"], requesters=["r1"])


def reload_servers(market: Market) -> None:
    """``nats-server --signal reload`` on each server: SIGHUP, then wait for the log line."""
    for server in market.servers:
        assert server.proc is not None
        before = server.log.read_text().count("Reloaded server configuration")
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + WAIT
        while True:
            text = server.log.read_text()
            assert "Failed to reload" not in text, text[-2000:]
            if text.count("Reloaded server configuration") > before:
                break
            assert time.monotonic() < deadline, f"{server.name} did not reload"
            time.sleep(0.02)


async def can_connect(market: Market, creds: Path, inbox: str) -> bool:
    """Whether every server accepts ``creds``."""
    for server in market.servers:
        try:
            nc = await nats.connect(
                server.url,
                user_credentials=str(creds),
                inbox_prefix=inbox,
                tls=ssl.create_default_context(cafile=str(market.ca)),
                allow_reconnect=False,
                max_reconnect_attempts=0,
                connect_timeout=2,
            )
        except (NatsError, OSError, TimeoutError):
            return False
        await nc.close()
    return True


async def place_and_run(market: Market, node: str) -> str:
    nc = await market.connect("requester", "r1", market.url())
    requester = Requester(nc=nc, requester_id="r1", prefix=PREFIX, timeout=5)
    await requester.start()
    try:
        placement = await requester.place(make_job(), expected={node}, deadline=WAIT)
        assert placement.node_id == node
        await requester.run_to_completion(node, placement.execution_id, timeout=WAIT)
        return placement.execution_id
    finally:
        await requester.close()
        await nc.close()


async def test_add_rotate_drain_and_remove_a_node(market: Market, tmp_path: Path) -> None:
    # Add: gen-creds --node n2 signs a new user; the servers need no change at all.
    run_gen_creds(market.secrets, "--node", "n2")
    node = spawn_node(market, "n2", market.url(), tmp_path / "n2")
    executions = [await place_and_run(market, "n2")]

    # Rotate: a new key for n2; install its creds and restart the node (drain, exit 0,
    # same data dir); then reload the servers, which revokes the old key.
    old = tmp_path / "n2-old.creds"
    old.write_bytes(market.creds("node", "n2").read_bytes())
    run_gen_creds(market.secrets, "--rotate", "n2")
    assert market.creds("node", "n2").read_bytes() != old.read_bytes()
    assert await node.astop() == 0, node.log()[-2000:]
    node = spawn_node(market, "n2", market.url(), tmp_path / "n2")
    reload_servers(market)
    assert not await can_connect(market, old, "_INBOX_n2")
    assert await can_connect(market, market.creds("node", "n2"), "_INBOX_n2")
    executions.append(await place_and_run(market, "n2"))

    # Drain (SIGTERM: announce, finish, flush, exit 0), then remove: the key is revoked
    # and its creds are deleted; after a reload no server accepts it any more.
    current = tmp_path / "n2-current.creds"
    current.write_bytes(market.creds("node", "n2").read_bytes())
    assert await node.astop() == 0, node.log()[-2000:]
    run_gen_creds(market.secrets, "--remove", "n2")
    assert not market.creds("node", "n2").exists()
    reload_servers(market)
    assert not await can_connect(market, current, "_INBOX_n2")
    # n1 and r1 are untouched by all this.
    assert await can_connect(market, market.creds("node", "n1"), "_INBOX_n1")
    assert await can_connect(market, market.creds("requester", "r1"), "_INBOX_r1")

    # The removed node's callbacks all reached the stream before it left.
    reader = await market.connect("requester", "r1", market.url())
    try:
        check_complete(await read_callbacks(reader, "r1"), executions)
    finally:
        await reader.close()


async def test_revoked_node_is_disconnected_on_reload(market: Market, tmp_path: Path) -> None:
    """A removal takes effect on a node still connected: the servers close it."""
    run_gen_creds(market.secrets, "--node", "n3")
    node = spawn_node(market, "n3", market.url(0), tmp_path / "n3")
    try:
        await assert_eventually(
            lambda: "compute-node-n3" in market.servers[0].client_names(), timeout=WAIT
        )
        run_gen_creds(market.secrets, "--remove", "n3")
        reload_servers(market)
        await assert_eventually(
            lambda: all("compute-node-n3" not in s.client_names() for s in market.servers),
            timeout=WAIT,
        )
    finally:
        node.proc.kill()
        await asyncio.to_thread(node.proc.wait, 10)
        if node.proc.stdout is not None:
            node.proc.stdout.close()
