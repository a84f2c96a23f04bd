"""The Docker engine against a real dockerd (``scripts/dockerd``: Debian's docker.io 20.10,
vfs, no bridge) and the busybox-static test image: Bacalhau's docker executor behaviour
(reference §3.4, §9.5), limits, isolation, cleanup on every path; then through a node on
the session's nats-server with the requester client.
"""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import pytest
from nats.aio.client import Client

from schemas.callbacks import CancelResult, ComputeError, PublishResult, RunResult
from schemas.compute import ExecutionState as S
from tests.engines.docker_fixtures import (
    IMAGE,
    WAIT,
    docker_host,
    docker_job,
    engine,
    execution_containers,
    request_for,
    run_sh,
    sh,
    wait_gone,
    wait_running,
)
from tests.integration.conftest import NodeFactory, make_node, prefix, spans
from worker.engines.docker import DockerEngine
from worker.engines.docker_spec import LABEL_JOB, LABEL_NODE, container_name
from worker.errors import EngineError
from worker.node import Node
from worker.plugins import Plugins
from worker.publishers.noop import NoopPublisher
from worker.requester import Requester
from worker.verifiers.noop import NoopVerifier

# Fixtures shared by import (pytest finds them in this module's namespace).
_FIXTURES = (docker_host, engine, make_node, prefix, spans)

MiB = 1 << 20


# ---------------------------------------------------------------------------------------
# Running a container


async def test_hello(engine: DockerEngine, tmp_path: Path) -> None:
    outcome, results = await run_sh(engine, tmp_path, "echo hello")
    assert (results / "stdout").read_bytes() == b"hello\n"
    assert (results / "stderr").read_bytes() == b""
    assert (results / "exitCode").read_text() == "0"
    result = outcome.result
    assert (result.stdout, result.stderr, result.exitCode) == ("hello\n", "", 0)
    assert result.stdouttruncated is False and result.runnerError == ""
    assert outcome.usage.WallSeconds > 0


async def test_exit_code_is_a_result(engine: DockerEngine, tmp_path: Path) -> None:
    outcome, results = await run_sh(engine, tmp_path, "echo out; echo err >&2; exit 7")
    assert outcome.result.exitCode == 7
    assert (results / "exitCode").read_text() == "7"
    assert (results / "stdout").read_bytes() == b"out\n"
    assert (results / "stderr").read_bytes() == b"err\n"


async def test_output_bytes_are_kept_exactly(engine: DockerEngine, tmp_path: Path) -> None:
    script = r"printf 'a\000b\377\n'; printf 'no newline' >&2"
    outcome, results = await run_sh(engine, tmp_path, script)
    assert (results / "stdout").read_bytes() == b"a\x00b\xff\n"
    assert (results / "stderr").read_bytes() == b"no newline"
    assert outcome.result.stdout == "a\x00b\ufffd\n"


async def test_env_and_job_spec(engine: DockerEngine, tmp_path: Path) -> None:
    env = ["GREETING=hello world", "EMPTY="]
    outcome, results = await run_sh(
        engine,
        tmp_path,
        'echo "$GREETING|${EMPTY}|"; echo "$BACALHAU_JOB_SPEC" >&2',
        Docker={"EnvironmentVariables": env},
    )
    assert (results / "stdout").read_text() == "hello world||\n"
    spec = json.loads((results / "stderr").read_text())
    assert spec["Engine"] == "Docker"
    assert spec["Docker"]["EnvironmentVariables"] == env
    assert outcome.result.exitCode == 0


async def test_entrypoint_and_working_directory(engine: DockerEngine, tmp_path: Path) -> None:
    job = docker_job(["pwd"], Docker={"WorkingDirectory": "/srv/job"})
    outcome = await engine.run(request_for(tmp_path, job))
    assert outcome.result.stdout == "/srv/job\n"
    job = docker_job(["/bin/echo", "-n", "argv", "kept"])
    outcome = await engine.run(request_for(tmp_path / "2", job))
    assert outcome.result.stdout == "argv kept"


async def test_missing_executable_is_an_engine_error(engine: DockerEngine, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"^Executable file not found: .*no-such-program"):
        await engine.run(request_for(tmp_path, docker_job(["no-such-program"])))


async def test_input_is_read_only(engine: DockerEngine, tmp_path: Path) -> None:
    data = tmp_path / "in"
    data.mkdir()
    (data / "file.txt").write_text("kiwi is delicious\n")
    script = "cat /inputs/file.txt; echo x > /inputs/file.txt; echo rc=$? >&2"
    outcome, results = await run_sh(engine, tmp_path, script, inputs=[(data, "/inputs")])
    assert outcome.result.stdout == "kiwi is delicious\n"
    stderr = (results / "stderr").read_text()
    assert "Read-only file system" in stderr and "rc=1" in stderr, stderr
    assert (data / "file.txt").read_text() == "kiwi is delicious\n"


async def test_single_file_input(engine: DockerEngine, tmp_path: Path) -> None:
    data = tmp_path / "file.txt"
    data.write_text("hello world")
    outcome, _ = await run_sh(
        engine, tmp_path, "cat /data/file.txt", inputs=[(data, "/data/file.txt")]
    )
    assert outcome.result.stdout == "hello world"


async def test_output_folder_is_written(engine: DockerEngine, tmp_path: Path) -> None:
    script = "echo LISBON > /output_data/output_file.txt; mkdir /output_data/sub"
    outcome, results = await run_sh(engine, tmp_path, script, outputs=[("test", "/output_data")])
    assert outcome.result.exitCode == 0, outcome.result.stderr
    assert (results / "test" / "output_file.txt").read_text() == "LISBON\n"
    assert (results / "test" / "sub").is_dir()


# ---------------------------------------------------------------------------------------
# Limits and isolation


async def test_memory_limit_is_visible_and_enforced(engine: DockerEngine, tmp_path: Path) -> None:
    script = (
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null"
        " || cat /sys/fs/cgroup/memory.max;"
        " exec dd if=/dev/zero of=/dev/null bs=100M count=1"
    )
    outcome, _ = await run_sh(engine, tmp_path, script, Resources={"Memory": "32Mi"})
    assert outcome.result.stdout.splitlines()[0] == str(32 * MiB)
    assert outcome.result.exitCode == 137  # SIGKILL by the OOM killer
    assert outcome.result.runnerError == f"container killed: out of memory (limit {32 * MiB} bytes)"


async def test_cpu_limit_is_visible(engine: DockerEngine, tmp_path: Path) -> None:
    script = (
        "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us"
        " 2>/dev/null || cat /sys/fs/cgroup/cpu.max"
    )
    outcome, _ = await run_sh(engine, tmp_path, script, Resources={"CPU": "500m"})
    numbers = [int(n) for n in outcome.result.stdout.split()]
    assert numbers[0] / numbers[1] == pytest.approx(0.5), numbers


async def test_no_resources_means_no_limits(engine: DockerEngine, tmp_path: Path) -> None:
    script = "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || cat /sys/fs/cgroup/cpu.max"
    outcome, _ = await run_sh(engine, tmp_path, script)
    assert outcome.result.stdout.split()[0] in ("-1", "max")


async def test_network_none_has_only_loopback(engine: DockerEngine, tmp_path: Path) -> None:
    outcome, _ = await run_sh(engine, tmp_path, "tail -n +3 /proc/net/dev | cut -d: -f1")
    assert outcome.result.stdout.split() == ["lo"]


async def test_full_network_needs_the_node_to_accept_it(
    engine: DockerEngine, docker_host: str, tmp_path: Path
) -> None:
    script = "tail -n +3 /proc/net/dev | cut -d: -f1"
    with pytest.raises(EngineError, match=r"^networking is enabled: false$"):
        await run_sh(engine, tmp_path, script, Network={"Type": "Full"})
    with pytest.raises(EngineError, match=r"^networking type HTTP not supported$"):
        await run_sh(engine, tmp_path / "2", script, Network={"Type": "HTTP"})
    networked = DockerEngine(docker_host=docker_host, node_id=engine.node_id, accept_networked=True)
    await networked.probe()
    outcome, _ = await run_sh(networked, tmp_path / "3", script, Network={"Type": "Full"})
    host_interfaces = [
        line.split(":")[0].strip() for line in Path("/proc/net/dev").read_text().splitlines()[2:]
    ]
    assert sorted(outcome.result.stdout.split()) == sorted(host_interfaces)


async def test_usage_from_container_stats(engine: DockerEngine, tmp_path: Path) -> None:
    # A 40 MiB buffer, then 2.5 s of busy shell (the daemon samples stats once a second).
    script = (
        "dd if=/dev/zero of=/dev/null bs=40M count=1 2>/dev/null;"
        " t() { cut -d' ' -f1 /proc/uptime | tr -d .; }; start=$(t);"
        " while [ $(($(t) - start)) -lt 250 ]; do :; done"
    )
    outcome, _ = await run_sh(engine, tmp_path, script)
    usage = outcome.usage
    assert usage.WallSeconds >= 2.5
    assert usage.CPUSeconds > 0.25, usage
    assert usage.PeakMemoryBytes >= 40 * MiB, usage


# ---------------------------------------------------------------------------------------
# Output caps


async def test_output_is_capped_per_stream(engine: DockerEngine, tmp_path: Path) -> None:
    script = "yes o | head -c 100000; yes e | head -c 5000 >&2"
    outcome, results = await run_sh(engine, tmp_path, script, max_output_bytes=1000)
    assert (results / "stdout").read_bytes() == b"o\n" * 500
    assert (results / "stderr").read_bytes() == b"e\n" * 500
    result = outcome.result
    # The summaries are the first 2048 bytes of each stream, whatever the file cap.
    assert result.stdout == "o\n" * 1024 and result.stdouttruncated is True
    assert result.stderr == "e\n" * 1024 and result.stderrtruncated is True
    assert result.exitCode == 0


async def test_large_output_streams_in_bounded_memory(engine: DockerEngine, tmp_path: Path) -> None:
    script = "head -c 48000000 /dev/zero | tr '\\0' x"
    tracemalloc.start()
    try:
        outcome, results = await run_sh(engine, tmp_path, script, max_output_bytes=8 * MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (results / "stdout").stat().st_size == 8 * MiB
    assert outcome.result.stdouttruncated is True
    assert peak < 4 * MiB, f"the node held {peak} bytes"


# ---------------------------------------------------------------------------------------
# Cleanup: timeout, cancel, restart


async def test_timeout_kills_and_removes_the_container(
    engine: DockerEngine, docker_host: str, tmp_path: Path
) -> None:
    request = request_for(tmp_path, sh("echo started; sleep 1000"))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(2.0):  # what the executor does with the job's timeout
            await engine.run(request)
    assert time.monotonic() - started < 2.0 + 5.0
    assert await execution_containers(docker_host, request.execution.id) == []


async def test_cancel_kills_and_removes_the_container(
    engine: DockerEngine, docker_host: str, tmp_path: Path
) -> None:
    request = request_for(tmp_path, sh("sleep 1000"))
    task = asyncio.create_task(engine.run(request))
    info = await wait_running(docker_host, request.execution.id)
    assert info["Name"] == "/" + container_name(request.execution.id)
    labels = info["Config"]["Labels"]
    assert labels[LABEL_NODE] == engine.node_id
    assert labels[LABEL_JOB] == request.execution.job_id
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 5.0
    assert await execution_containers(docker_host, request.execution.id) == []


async def test_repeated_cancels_still_remove_the_container(
    engine: DockerEngine, docker_host: str, tmp_path: Path
) -> None:
    # A shutdown may cancel again while the first cancel's cleanup is under way.
    request = request_for(tmp_path, sh("sleep 1000"))
    task = asyncio.create_task(engine.run(request))
    await wait_running(docker_host, request.execution.id)
    while not task.done():  # cancelled again at every step it takes
        task.cancel()
        await asyncio.sleep(0)
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_gone(docker_host, request.execution.id)


async def test_cleanup_leftovers_removes_only_this_nodes_containers(
    engine: DockerEngine, docker_host: str
) -> None:
    other = f"test-other-{uuid.uuid4().hex[:8]}"
    async with aiodocker.Docker(url=docker_host) as docker:
        ids = []
        for node, run in ((engine.node_id, True), (engine.node_id, False), (other, True)):
            config: dict[str, Any] = {
                "Image": IMAGE,
                "Entrypoint": ["sleep", "1000"],
                "Labels": {LABEL_NODE: node},
                "HostConfig": {"NetworkMode": "none"},
            }
            container = await docker.containers.create(config)
            if run:
                await container.start()
            ids.append(container.id)
        try:
            assert await engine.cleanup_leftovers() == 2
            remaining = {c.id for c in await docker.containers.list(all=True)}
            assert ids[0] not in remaining and ids[1] not in remaining
            assert ids[2] in remaining
        finally:
            await docker.containers.container(ids[2]).delete(force=True)


# ---------------------------------------------------------------------------------------
# Per-run overhead (create → start → wait → logs → remove)


async def test_per_run_overhead(engine: DockerEngine, tmp_path: Path) -> None:
    times = []
    for i in range(5):
        started = time.monotonic()
        outcome, _ = await run_sh(engine, tmp_path / str(i), "true")
        times.append(time.monotonic() - started)
        assert outcome.result.exitCode == 0
    times.sort()
    print(f"docker run overhead: median {times[2]:.3f}s, min {times[0]:.3f}s")
    assert times[2] < 3.0, times


# ---------------------------------------------------------------------------------------
# Through a node on the session's nats-server


@pytest.fixture
async def r1(nc: Client, prefix: str) -> AsyncIterator[Requester]:
    requester = Requester(nc=nc, requester_id="r1", prefix=prefix)
    await requester.start()
    yield requester
    await requester.close()


async def docker_node(make_node: NodeFactory, engine: DockerEngine) -> Node:
    """A node whose ID is the engine's (its containers carry that label)."""
    plugins = Plugins(
        engines={"Docker": engine},
        verifiers={"Noop": NoopVerifier()},
        publishers={"Noop": NoopPublisher()},
    )
    return await make_node(engine.node_id, plugins=plugins)


async def test_node_runs_a_docker_job_to_completion(
    engine: DockerEngine, make_node: NodeFactory, r1: Requester
) -> None:
    started = await docker_node(make_node, engine)
    node = started.node_id
    job = sh(
        "echo grep me; cp /etc/passwd /outputs/passwd",
        outputs=[{"Name": "outputs", "path": "/outputs"}],
    )
    placement = await r1.place(job, expected={node}, linger=0)
    assert placement.node_id == node
    callbacks = await r1.run_to_completion(node, placement.execution_id, timeout=WAIT)
    run_result, published = callbacks[0], callbacks[-1]
    assert isinstance(run_result, RunResult), callbacks
    assert run_result.RunCommandResult is not None
    assert run_result.RunCommandResult.stdout == "grep me\n"
    assert run_result.RunCommandResult.exitCode == 0
    assert run_result.Usage.WallSeconds > 0
    assert isinstance(published, PublishResult), callbacks
    view = await r1.get_execution(node, placement.execution_id)
    assert view.Execution.State == S.COMPLETED
    results = started.datadir.results_dir(placement.execution_id)
    assert (results / "outputs" / "passwd").read_text().startswith("root:x:0:0:")
    assert (results / "stdout").read_text() == "grep me\n"


async def test_node_cancel_removes_the_container(
    engine: DockerEngine, docker_host: str, make_node: NodeFactory, r1: Requester
) -> None:
    node = (await docker_node(make_node, engine)).node_id
    bid = await r1.ask(node, sh("sleep 1000"))
    assert bid.Accepted, bid
    await r1.accept(node, bid.ExecutionID)
    await wait_running(docker_host, bid.ExecutionID)
    await r1.cancel(node, bid.ExecutionID, "stop")
    assert isinstance(await r1.wait_callback(bid.ExecutionID, timeout=WAIT), CancelResult)
    await wait_gone(docker_host, bid.ExecutionID)


async def test_node_reports_a_missing_image(
    engine: DockerEngine, make_node: NodeFactory, r1: Requester
) -> None:
    node = (await docker_node(make_node, engine)).node_id
    bid = await r1.ask(node, docker_job(["true"], image="worker-test/absent:2"))
    await r1.accept(node, bid.ExecutionID)
    error = await r1.wait_callback(bid.ExecutionID, timeout=WAIT)
    assert isinstance(error, ComputeError), error
    assert error.Cause == "EngineError"
    assert error.Err.startswith("image worker-test/absent:2 not available: ")


async def test_node_times_out_and_removes_the_container(
    engine: DockerEngine, docker_host: str, make_node: NodeFactory, r1: Requester
) -> None:
    node = (await docker_node(make_node, engine)).node_id
    bid = await r1.ask(node, sh("sleep 1000", Timeout=1))
    await r1.accept(node, bid.ExecutionID)
    error = await r1.wait_callback(bid.ExecutionID, timeout=WAIT)
    assert isinstance(error, ComputeError), error
    assert (error.Cause, error.Err) == ("RunTimeout", "execution timed out after 1s")
    assert await execution_containers(docker_host, bid.ExecutionID) == []
