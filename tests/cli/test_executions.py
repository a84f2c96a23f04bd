"""``worker executions ls|show|logs|cancel|accept|reject`` over NATS, against in-process
nodes; ``logs -f`` as a real subprocess following a Wasm job while it writes."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from schemas.codec import decode
from schemas.compute import ExecutionState as S
from schemas.job import Job
from tests.cli import (
    REQUESTER,
    TICKER_WAT,
    client_args,
    finish,
    invoke,
    json_lines,
    kill,
    read_line,
    spawn,
    wasm_spec,
)
from tests.helpers import assert_eventually
from tests.integration.conftest import NodeFactory, make_node, prefix, spans
from worker.requester import Requester

_FIXTURES = (make_node, prefix, spans)

SAMPLES = Path(__file__).resolve().parents[2] / "worker" / "samples"


@pytest.fixture
async def requester(nc: Client, prefix: str) -> AsyncIterator[Requester]:
    r = Requester(nc=nc, requester_id=REQUESTER, prefix=prefix)
    yield r
    await r.close()


async def submit(nats_url: str, prefix: str, *args: str) -> dict[str, Any]:
    """``worker submit … --json``; the accepted event (or the result, with --wait)."""
    result = await invoke("submit", *args, "--json", *client_args(nats_url, prefix))
    assert result.exit_code == 0, result.output
    return json_lines(result.stdout)[-1]  # type: ignore[no-any-return]


async def ls(nats_url: str, prefix: str, *args: str) -> list[dict[str, Any]]:
    result = await invoke("executions", "ls", "--json", *args, *client_args(nats_url, prefix))
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    return rows


async def test_ls_show_accept_reject_cancel(
    make_node: NodeFactory, nats_url: str, prefix: str
) -> None:
    await make_node("n1")
    await make_node("n2")
    noop = str(SAMPLES / "noop.yaml")
    done = await submit(nats_url, prefix, noop, "--node", "n1", "--wait")
    waiting = await submit(nats_url, prefix, noop, "--node", "n2")  # not accepted: it waits
    to_reject = await submit(nats_url, prefix, noop, "--node", "n1")
    a, b, c = done["ExecutionID"], waiting["ExecutionID"], to_reject["ExecutionID"]

    async def states() -> dict[str, tuple[str, str]]:
        rows = await ls(nats_url, prefix)
        found = {r["ExecutionID"]: (r["NodeID"], r["State"]) for r in rows}
        assert found.get(b, ("", ""))[1] == "WaitingVerification", found
        assert found.get(c, ("", ""))[1] == "WaitingVerification", found
        return found

    found = await assert_eventually(states, timeout=15)
    assert found[a] == ("n1", "Completed") and found[b][0] == "n2"
    assert [r["ExecutionID"] for r in await ls(nats_url, prefix, "--state", "completed")] == [a]
    assert {r["ExecutionID"] for r in await ls(nats_url, prefix, "--node", "n2")} == {b}
    assert await ls(nats_url, prefix, "--since", "2999-01-01T00:00:00Z") == []

    shown = await invoke("executions", "show", a, "--json", *client_args(nats_url, prefix))
    assert shown.exit_code == 0, shown.output
    view = json.loads(shown.stdout)
    assert view["NodeID"] == "n1" and view["Execution"]["State"] == "Completed"
    assert view["History"][0]["PreviousState"] == "Undefined"
    assert [h["Cause"] for h in view["History"]][-1] == "PublishCompleted"
    assert [c["Kind"] for c in view["Callbacks"]] == ["OnRunComplete", "OnPublishComplete"]
    human = await invoke("executions", "show", a, *client_args(nats_url, prefix))
    assert "History" in human.stdout and "PublishCompleted" in human.stdout
    assert f"Execution  {a}" in human.stdout

    accepted = await invoke("executions", "accept", b, *client_args(nats_url, prefix))
    assert accepted.exit_code == 0, accepted.output
    assert accepted.stdout.startswith(f"Accepted the result of {b} on n2: ")

    async def completed() -> bool:
        return ("n2", "Completed") in [
            (r["NodeID"], r["State"]) for r in await ls(nats_url, prefix)
        ]

    await assert_eventually(completed, timeout=15)
    rejected = await invoke(
        "executions",
        "reject",
        c,
        "--reason",
        "wrong answer",
        "--json",
        *client_args(nats_url, prefix),
    )
    assert rejected.exit_code == 0, rejected.output
    assert json.loads(rejected.stdout) == {"NodeID": "n1", "ExecutionID": c, "State": "Failed"}

    late = await invoke("executions", "cancel", a, *client_args(nats_url, prefix))
    assert late.exit_code == 1
    assert late.stderr.startswith("worker: error: node n1 answered 409: ")
    assert len(late.stderr.strip().splitlines()) == 1

    unknown = f"e-{uuid.uuid4()}"
    missing = await invoke("executions", "show", unknown, *client_args(nats_url, prefix))
    assert missing.exit_code == 1
    assert f"execution {unknown} of requester {REQUESTER} not found on any of 2 nodes" in (
        missing.stderr
    )


async def test_logs_of_a_finished_job(make_node: NodeFactory, nats_url: str, prefix: str) -> None:
    await make_node("n1")
    result = await submit(nats_url, prefix, str(SAMPLES / "hello-wasm.yaml"), "--wait")
    execution_id = result["ExecutionID"]
    args = client_args(nats_url, prefix)
    logs = await invoke("executions", "logs", execution_id, *args)
    assert logs.exit_code == 0, logs.output
    assert logs.stdout == "Hello, world!\n"
    tail = await invoke("executions", "logs", execution_id, "--tail", "6", "--node", "n1", *args)
    assert tail.stdout == "orld!\n"
    as_json = await invoke("executions", "logs", execution_id, "--json", *args)
    lines = json_lines(as_json.stdout)
    assert lines[0] == {"event": "log", "Stream": "stdout", "Offset": 0, "Data": "Hello, world!\n"}
    assert lines[-1] == {"EOF": True, "ExitCode": 0}


async def test_logs_follow_shows_output_as_it_is_written(
    make_node: NodeFactory, nats_url: str, prefix: str, requester: Requester
) -> None:
    node = await make_node("n1")
    doc = wasm_spec(TICKER_WAT, Timeout=60)
    doc["Metadata"] = {"ID": f"ticker-{uuid.uuid4().hex[:8]}"}
    job = decode(json.dumps(doc).encode(), Job)
    bid = await requester.ask(node.node_id, job)
    await requester.accept(node.node_id, bid.ExecutionID)
    proc = await spawn("executions", "logs", "-f", bid.ExecutionID, *client_args(nats_url, prefix))
    try:
        # Two lines while the job runs (it never ends by itself): they were followed.
        assert await read_line(proc.stdout, timeout=15) == "tick\n"
        assert await read_line(proc.stdout, timeout=15) == "tick\n"
        view = await requester.get_execution(node.node_id, bid.ExecutionID)
        assert view.Execution.State is S.RUNNING
        await requester.cancel(node.node_id, bid.ExecutionID, "enough")
        code, out, err = await finish(proc)  # EOF once the run has ended
        assert code == 0, err
        assert set(out.splitlines()) <= {"tick"}
    finally:
        await kill(proc)
