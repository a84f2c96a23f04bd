"""``worker devstack`` as a real process: embedded broker, in-process nodes, sample jobs
run to completion, the other commands against it, Ctrl-C drains everything."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import nats
import pytest

from tests.cli import finish, invoke, json_lines, kill, read_line, spawn

# The Language engine runs jobs as other uids: it is offered only when running as root.
SAMPLES = ["noop", "wasm", "python"] if os.geteuid() == 0 else ["noop", "wasm"]


async def test_runs_every_sample_to_completion_and_exits(tmp_path: Path) -> None:
    proc = await spawn("devstack", "--nodes", "3", "--jobs", "6", "--exit-when-done", "--json")
    try:
        code, out, err = await finish(proc, timeout=90)
    finally:
        await kill(proc)
    assert code == 0, err
    events = json_lines(out)
    ready, done, stopped = events[0], events[-2], events[-1]
    assert ready["event"] == "ready" and ready["Nodes"] == ["node-1", "node-2", "node-3"]
    assert ready["Samples"] == SAMPLES and ready["NatsURL"].startswith("nats://127.0.0.1:")
    assert done == {"event": "done", "Jobs": 6, "States": {"Completed": 6}}
    assert stopped == {"event": "stopped", "Nodes": ready["Nodes"]}
    finals: dict[str, dict[str, str]] = {}
    for e in events:
        if e["event"] == "job":
            finals[e["JobID"]] = e
    assert len(finals) == 6 and {e["State"] for e in finals.values()} == {"Completed"}
    outputs = {e["Sample"]: e["Detail"] for e in finals.values()}
    assert outputs["noop"] == "exit code 0" and outputs["wasm"] == "Hello, world!"
    if "python" in SAMPLES:
        assert outputs["python"].startswith("Hello from Python 3.")
    assert all(e["NodeID"] in ready["Nodes"] for e in finals.values())
    assert not Path(ready["DataDir"]).exists()  # the temporary folder went with it
    host, port = ready["NatsURL"].removeprefix("nats://").rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError):  # and so did the broker
        await asyncio.open_connection(host, int(port))


async def test_stays_up_for_the_other_commands_until_ctrl_c() -> None:
    proc = await spawn("devstack", "--nodes", "2", "--jobs", "3")
    try:
        url = (await read_line(proc.stdout)).strip().removeprefix("NATS_URL=")
        assert url.startswith("nats://127.0.0.1:"), url
        up = await read_line(proc.stdout)
        assert up.startswith("2 nodes up: node-1, node-2 (data in "), up
        data_dir = Path(up.rsplit("(data in ", 1)[1].rstrip(")\n"))
        assert data_dir.is_dir()
        while "The stack is up" not in (line := await read_line(proc.stderr)):
            assert line, "devstack ended early"
            assert not line.startswith("worker: error"), line
        listed = await invoke("nodes", "ls", "--json", "--nats-url", url)
        assert listed.exit_code == 0, listed.output
        assert [i["NodeID"] for i in json.loads(listed.stdout)] == ["node-1", "node-2"]
        nc = await nats.connect(url)
        try:
            infos = await nc.subscribe("market.info.*")
            await nc.flush()
            proc.send_signal(signal.SIGINT)
            draining: set[str] = set()
            while draining != {"node-1", "node-2"}:  # each node announces its drain
                info = json.loads((await infos.next_msg(timeout=20)).data)
                if info["Draining"]:
                    draining.add(info["NodeID"])
        finally:
            await nc.close()
        code, out, err = await finish(proc)
    finally:
        await kill(proc)
    assert code == 0, err
    assert "3/3 jobs done" in out and out.count("Completed") == 3, out
    assert "Stopped: 2 nodes drained, broker stopped." in err
    assert not data_dir.exists()


async def test_bad_flags_exit_2() -> None:
    bad = await invoke("devstack", "--samples", "noop,cobol")
    assert bad.exit_code == 2
    assert bad.stderr == (
        "worker: error: --samples: unknown sample 'cobol' (known: noop, wasm, python)\n"
    )
    zero = await invoke("devstack", "--nodes", "0")
    assert zero.exit_code == 2


async def test_ctrl_c_while_jobs_run_stops_cleanly(tmp_path: Path) -> None:
    proc = await spawn("devstack", "--nodes", "1", "--jobs", "40", "--data-dir", str(tmp_path))
    try:
        await read_line(proc.stdout)  # NATS_URL=
        await read_line(proc.stdout)  # nodes up: the jobs are being placed now
        proc.send_signal(signal.SIGINT)
        code, _, err = await finish(proc)
    finally:
        await kill(proc)
    assert code == 130, err  # interrupted before the 40 jobs ended
    assert "Stopped: 1 nodes drained, broker stopped." in err
    assert (tmp_path / "node-1").is_dir()  # --data-dir is kept
