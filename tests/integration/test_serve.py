"""``worker serve`` as a separate process: stdout lines, drain on SIGTERM, exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from pathlib import Path

import nats

WORKER = [sys.executable, "-m", "worker"]


async def spawn(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *WORKER,
        "serve",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


async def read_line(proc: asyncio.subprocess.Process, timeout: float = 20) -> str:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    return line.decode().strip()


async def finish(proc: asyncio.subprocess.Process, timeout: float = 30) -> tuple[int, str]:
    _, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def stop(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    return await finish(proc)


async def test_embedded_broker_lines_and_drain(tmp_path: Path) -> None:
    proc = await spawn("--data-dir", str(tmp_path / "d"), "--node-id", "solo")
    try:
        first = await read_line(proc)
        assert first.startswith("NATS_URL=nats://127.0.0.1:"), first
        assert await read_line(proc) == "NODE_ID=solo"
        nc = await nats.connect(first.split("=", 1)[1])
        try:
            infos = await nc.subscribe("market.info.solo")
            reply = await nc.request("market.compute.solo.r1.NodeInfo/v1", b"", timeout=5)
            info = json.loads(reply.data)
            assert info["NodeID"] == "solo" and info["Draining"] is False
            assert "Noop" in info["ComputeNodeInfo"]["ExecutionEngines"]
            proc.send_signal(signal.SIGTERM)
            while True:  # the drain announces itself before anything else
                msg = await infos.next_msg(timeout=10)
                if json.loads(msg.data)["Draining"]:
                    break
        finally:
            await nc.close()
        code, err = await finish(proc)
        assert code == 0, err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_locked_data_dir_exits_3(tmp_path: Path, nats_url: str) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    args = ["--data-dir", str(tmp_path / "d"), "--nats-url", nats_url, "--subject-prefix", prefix]
    first = await spawn(*args, "--create-callback-stream")
    try:
        assert (await read_line(first)).startswith("NODE_ID=")
        second = await spawn(*args)
        code, err = await finish(second)
        assert code == 3, err
        assert "locked" in err
    finally:
        code, err = await stop(first)
        assert code == 0, err


async def test_node_id_in_use_exits_5(tmp_path: Path, nats_url: str) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    common = ["--nats-url", nats_url, "--subject-prefix", prefix, "--node-id", "twin"]
    first = await spawn("--data-dir", str(tmp_path / "a"), *common, "--create-callback-stream")
    try:
        assert await read_line(first) == "NODE_ID=twin"
        second = await spawn("--data-dir", str(tmp_path / "b"), *common)
        code, err = await finish(second)
        assert code == 5, err
        assert "node ID twin already in use" in err
    finally:
        await stop(first)


async def test_changed_node_id_with_executions_exits_4(tmp_path: Path, nats_url: str) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    data = str(tmp_path / "d")
    common = ["--data-dir", data, "--nats-url", nats_url, "--subject-prefix", prefix]
    first = await spawn(*common, "--node-id", "old", "--create-callback-stream")
    try:
        assert await read_line(first) == "NODE_ID=old"
        nc = await nats.connect(nats_url)
        ask = {"SourcePeerID": "r1", "Job": {"Metadata": {"ID": "j"}, "Spec": {"Engine": "Noop"}}}
        reply = await nc.request(
            f"{prefix}.compute.old.r1.AskForBid/v1", json.dumps(ask).encode(), timeout=5
        )
        assert json.loads(reply.data)["Accepted"] is True
        await nc.close()
    finally:
        code, err = await stop(first)
        assert code == 0, err
    second = await spawn(*common, "--node-id", "new")
    code, err = await finish(second)
    assert code == 4, err
    assert "old" in err and "new" in err


async def test_unreachable_broker_exits_6(tmp_path: Path) -> None:
    proc = await spawn(
        "--data-dir",
        str(tmp_path / "d"),
        "--nats-url",
        "nats://127.0.0.1:1",
        "--connect-timeout",
        "1s",
    )
    code, err = await finish(proc)
    assert code == 6, err
    assert "unreachable" in err


async def test_missing_callback_stream_exits_7(tmp_path: Path, nats_url: str) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    proc = await spawn(
        "--data-dir", str(tmp_path / "d"), "--nats-url", nats_url, "--subject-prefix", prefix
    )
    code, err = await finish(proc)
    assert code == 7, err
    assert f"CALLBACKS_{prefix}" in err


async def test_bad_flag_exits_2(tmp_path: Path) -> None:
    proc = await spawn("--data-dir", str(tmp_path / "d"), "--bid-ttl", "soon")
    code, err = await finish(proc)
    assert code == 2, err
