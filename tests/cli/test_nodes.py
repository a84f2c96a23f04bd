"""``worker nodes ls`` and ``worker node info`` against in-process nodes."""

from __future__ import annotations

import json

from tests.cli import client_args, invoke
from tests.integration.conftest import NodeFactory, make_node, prefix, spans

_FIXTURES = (make_node, prefix, spans)


async def test_nodes_ls_lists_every_running_node(
    make_node: NodeFactory, nats_url: str, prefix: str
) -> None:
    for name in ("n1", "n2", "n3"):
        await make_node(name, labels={"zone": name})
    result = await invoke("nodes", "ls", "--json", *client_args(nats_url, prefix))
    assert result.exit_code == 0, result.output
    infos = json.loads(result.stdout)
    assert [i["NodeID"] for i in infos] == ["n1", "n2", "n3"]
    for info in infos:
        assert info["Reachable"] is True and info["Draining"] is False
        assert info["Labels"] == {"zone": info["NodeID"]}
        assert info["ComputeNodeInfo"]["MaxCapacity"]["CPU"] == 2.0
        assert "Noop" in info["ComputeNodeInfo"]["ExecutionEngines"]
    human = await invoke("nodes", "ls", *client_args(nats_url, prefix))
    rows = [line for line in human.stdout.splitlines() if line.startswith("│")]
    assert [r.split("│")[1].strip() for r in rows] == ["n1", "n2", "n3"], human.stdout
    assert all("ready" in r and "4/4" in r and "0/0" in r for r in rows), human.stdout


async def test_nodes_ls_ignores_other_markets_and_fails_on_none(
    make_node: NodeFactory, nats_url: str, prefix: str
) -> None:
    await make_node("n1")
    other = await invoke("nodes", "ls", *client_args(nats_url, prefix + "x"))
    assert other.exit_code == 1
    assert other.stderr == (
        f"worker: error: no compute node answered on {nats_url} with subject prefix "
        f"'{prefix}x' within 2s\n"
    )


async def test_node_info(make_node: NodeFactory, nats_url: str, prefix: str) -> None:
    node = await make_node("n1", labels={"gpu": "none"})
    only = await invoke("node", "info", "--json", *client_args(nats_url, prefix))
    assert only.exit_code == 0, only.output
    info = json.loads(only.stdout)
    assert info["NodeID"] == "n1" and info["InstanceID"] == node.instance_id
    human = await invoke("node", "info", "--node", "n1", *client_args(nats_url, prefix))
    assert human.exit_code == 0, human.output
    for text in ("Node        n1", "Labels      gpu=none", "available", "max per job"):
        assert text in human.stdout, human.stdout
    await make_node("n2")
    two = await invoke("node", "info", *client_args(nats_url, prefix))
    assert two.exit_code == 1
    assert "2 nodes are up (n1, n2): choose one with --node" in two.stderr
    gone = await invoke("node", "info", "--node", "n9", *client_args(nats_url, prefix))
    assert gone.exit_code == 1 and gone.stderr.startswith("worker: error: no node is listening")
