"""The real Docker daemon for the Docker engine tests (``scripts/dockerd``).

``docker_host`` (session) reuses the project's daemon when it answers and has the test
image, and otherwise runs ``scripts/dockerd start`` (which installs Debian's docker.io on
a fresh machine). It fails — never skips — when the daemon cannot be had: a Docker
engine that silently goes untested is worse than a red build.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiodocker
import msgspec
import pytest

from schemas.job import Job, StorageSpec
from tests.helpers import assert_eventually
from worker.capacity.usage import ResourceUsage
from worker.engines.docker import DockerEngine
from worker.engines.docker_spec import LABEL_EXECUTION, LABEL_NODE
from worker.protocols import PreparedInput, PreparedOutput, RunOutcome, RunRequest
from worker.store.types import Execution

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "dockerd"
IMAGE = "worker-test/busybox:latest"
OWN_HOST = "unix:///run/worker-dockerd/docker.sock"
START_TIMEOUT = 110.0  # under pytest's 120 s; CI starts the daemon before pytest anyway
WAIT = 30.0


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _ready(host: str) -> bool:
    """The daemon answers and has the test image (docker CLI, bounded)."""
    env = {**os.environ, "DOCKER_HOST": host}
    try:
        done = subprocess.run(
            ["docker", "image", "inspect", IMAGE],
            capture_output=True,
            timeout=10,
            env=env,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.fixture(scope="session")
def docker_host() -> str:
    if _ready(OWN_HOST):
        return OWN_HOST
    try:
        done = _script("start", timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"scripts/dockerd start took over {START_TIMEOUT:g}s: {exc.stderr!r}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("DOCKER_HOST=")]
    if done.returncode != 0 or not lines:
        pytest.fail(f"scripts/dockerd start failed ({done.returncode}):\n{done.stderr}")
    host = lines[-1].removeprefix("DOCKER_HOST=")
    if not _ready(host):
        pytest.fail(f"docker at {host} has no {IMAGE} after scripts/dockerd start")
    return host


async def containers_of(host: str, label: str, value: str) -> list[dict[str, Any]]:
    """Every container (running or not) whose ``label`` is ``value``."""
    async with aiodocker.Docker(url=host) as docker:
        found = await docker.containers.list(
            all=True, filters=msgspec.json.encode({"label": [f"{label}={value}"]}).decode()
        )
        shown = []
        for container in found:
            try:
                shown.append(await container.show())
            except aiodocker.DockerError as exc:  # removed meanwhile
                if exc.status != 404:
                    raise
        return shown


@pytest.fixture
async def engine(docker_host: str) -> AsyncIterator[DockerEngine]:
    """A probed engine of a node of this test's own; after the test, no container of that
    node may be left (every run removes its own)."""
    node_id = f"test-{uuid.uuid4().hex[:10]}"
    docker = await DockerEngine.create(docker_host=docker_host, node_id=node_id)
    assert docker.is_installed(), docker.probe_error
    yield docker
    left = await containers_of(docker_host, LABEL_NODE, node_id)
    await docker.cleanup_leftovers()
    assert left == [], f"containers left behind: {[c.get('Name') for c in left]}"


def docker_job(entrypoint: Sequence[str], image: str = IMAGE, **spec: Any) -> Job:
    docker = {"Image": image, "Entrypoint": list(entrypoint)}
    docker.update(spec.pop("Docker", {}))
    body = {"Engine": "Docker", "Verifier": "Noop", "Publisher": "Noop", "Docker": docker, **spec}
    return msgspec.convert({"Metadata": {"ID": f"job-{uuid.uuid4().hex[:8]}"}, "Spec": body}, Job)


def sh(script: str, **spec: Any) -> Job:
    """A job running ``sh -c script`` in the busybox test image."""
    return docker_job(["sh", "-c", script], **spec)


def request_for(
    tmp_path: Path,
    job: Job,
    *,
    inputs: Sequence[tuple[Path, str]] = (),
    outputs: Sequence[tuple[str, str]] = (),
    max_output_bytes: int = 1 << 30,
) -> RunRequest:
    """A RunRequest as the executor builds it: fresh results and work folders, outputs
    ``(Name, target)`` created empty under the results folder."""
    now = datetime.now(UTC)
    execution = Execution(
        id=f"e-{uuid.uuid4()}",
        job=job,
        requester="r1",
        usage=ResourceUsage(),
        create_time=now,
        update_time=now,
    )
    results_dir, work_dir = tmp_path / "results", tmp_path / "work"
    results_dir.mkdir(parents=True)
    work_dir.mkdir(parents=True)
    prepared = []
    for name, target in outputs:
        (results_dir / name).mkdir()
        prepared.append(
            PreparedOutput(spec=StorageSpec(Name=name), source=results_dir / name, target=target)
        )
    return RunRequest(
        execution=execution,
        results_dir=results_dir,
        work_dir=work_dir,
        inputs=[PreparedInput(spec=StorageSpec(), source=s, target=t) for s, t in inputs],
        outputs=prepared,
        max_output_bytes=max_output_bytes,
    )


async def execution_containers(host: str, execution_id: str) -> list[dict[str, Any]]:
    return await containers_of(host, LABEL_EXECUTION, execution_id)


async def run_sh(
    engine: DockerEngine, tmp_path: Path, script: str, **kwargs: object
) -> tuple[RunOutcome, Path]:
    """Run ``sh -c script``; ``Docker``/``Resources``/``Network`` go to the job's Spec,
    the other keywords to :func:`request_for`."""
    spec = {k: kwargs.pop(k) for k in ("Docker", "Resources", "Network") if k in kwargs}
    request = request_for(tmp_path, sh(script, **spec), **kwargs)  # type: ignore[arg-type]
    outcome = await engine.run(request)
    return outcome, request.results_dir


async def wait_running(host: str, execution_id: str) -> dict[str, Any]:
    """The container of ``execution_id`` once it runs."""

    async def running() -> dict[str, Any]:
        found = await execution_containers(host, execution_id)
        assert found and found[0]["State"]["Running"], found
        return found[0]

    return await assert_eventually(running, timeout=WAIT)


async def wait_gone(host: str, execution_id: str) -> None:
    """Until no container of ``execution_id`` exists."""

    async def gone() -> bool:
        return await execution_containers(host, execution_id) == []

    removed: bool = await assert_eventually(gone, timeout=WAIT)
    assert removed
