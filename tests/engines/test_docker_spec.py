"""What the Docker engine asks the daemon for (``docker_spec``, no daemon needed: GPUs
cannot be tested on this host any other way); images, probing and the bid-time image
check against the real daemon."""

from __future__ import annotations

import json
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest

from schemas.job import Job
from tests.engines.docker_fixtures import (
    IMAGE,
    docker_host,
    docker_job,
    engine,
    request_for,
    sh,
)
from worker.bidding.types import BidRequest
from worker.engines.docker import DockerEngine
from worker.engines.docker_bid import DockerBidStrategy
from worker.engines.docker_spec import container_config, container_name, split_image
from worker.errors import EngineError

_FIXTURES = (docker_host, engine)


def config_of(tmp_path: Path, job: Job, **kwargs: Any) -> dict[str, Any]:
    request = request_for(tmp_path, job, **kwargs)
    return container_config(request, node_id="n1", accept_networked=False)


def test_container_config(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    job = docker_job(
        ["sh", "-c", "true"],
        Docker={"EnvironmentVariables": ["A=1"], "WorkingDirectory": "/w"},
        Resources={"CPU": "250m", "Memory": "64Mi"},
    )
    config = config_of(tmp_path, job, inputs=[(data, "/in")], outputs=[("out", "/out")])
    assert config["Image"] == IMAGE
    assert config["Entrypoint"] == ["sh", "-c", "true"] and "Cmd" not in config
    assert config["WorkingDir"] == "/w"
    assert config["Env"][0] == "A=1"
    name, _, value = config["Env"][1].partition("=")
    assert name == "BACALHAU_JOB_SPEC" and json.loads(value)["Engine"] == "Docker"
    assert config["NetworkDisabled"] is True
    host = config["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert host["NanoCpus"] == 250_000_000
    assert host["Memory"] == host["MemorySwap"] == 64 << 20
    assert "DeviceRequests" not in host
    assert host["LogConfig"]["Type"] == "none"
    assert host["Mounts"] == [
        {"Type": "bind", "Source": str(data), "Target": "/in", "ReadOnly": True},
        {
            "Type": "bind",
            "Source": str(tmp_path / "results" / "out"),
            "Target": "/out",
            "ReadOnly": False,
        },
    ]
    labels = config["Labels"]
    assert labels["worker.node"] == "n1"
    assert labels["worker.job"] == job.Metadata.ID
    assert labels["worker.execution"].startswith("e-")


def test_gpus_are_requested_only_when_asked_for(tmp_path: Path) -> None:
    config = config_of(tmp_path, sh("nvidia-smi", Resources={"GPU": "2"}))
    assert config["HostConfig"]["DeviceRequests"] == [
        {"Driver": "", "Count": 2, "Capabilities": [["gpu"]], "Options": {}}
    ]
    config = config_of(tmp_path / "0", sh("true", Resources={"GPU": "0"}))
    assert "DeviceRequests" not in config["HostConfig"]


def test_jobs_that_cannot_run_here(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"^docker job has no image$"):
        config_of(tmp_path / "1", docker_job(["true"], image=""))
    with pytest.raises(EngineError, match=r"^invalid resource request: Memory"):
        config_of(tmp_path / "2", sh("true", Resources={"Memory": "lots"}))
    with pytest.raises(EngineError, match=r"^networking is enabled: false$"):
        config_of(tmp_path / "3", sh("true", Network={"Type": "Full"}))
    request = request_for(tmp_path / "4", sh("true", Network={"Type": "Full"}))
    host = container_config(request, node_id="n1", accept_networked=True)["HostConfig"]
    assert host["NetworkMode"] == "host"


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("ubuntu", ("ubuntu", "latest")),
        ("ubuntu:22.04", ("ubuntu", "22.04")),
        ("localhost:5000/team/app", ("localhost:5000/team/app", "latest")),
        ("localhost:5000/team/app:v2", ("localhost:5000/team/app", "v2")),
        ("ghcr.io/x/y@sha256:abcd", ("ghcr.io/x/y", "sha256:abcd")),
    ],
)
def test_split_image(image: str, expected: tuple[str, str]) -> None:
    assert split_image(image) == expected


def test_container_name() -> None:
    assert container_name("e-1234") == "worker-e-1234"


def bid_request(job: Job) -> BidRequest:
    return BidRequest(node_id="n1", execution_id="e-1", requester="r1", job=job)


async def test_bid_strategy(docker_host: str) -> None:
    node_id = f"test-{uuid.uuid4().hex[:8]}"
    offline = await DockerEngine.create(docker_host=docker_host, node_id=node_id, pull_images=False)
    strategy = DockerBidStrategy(offline)
    assert (await strategy.should_bid(bid_request(sh("true")))).bid is True
    missing = await strategy.should_bid(bid_request(docker_job(["true"], image="absent/x:1")))
    assert (missing.bid, missing.retryable) == (False, False)
    assert missing.reason == "image absent/x:1 not available: not present locally"
    noop = msgspec.convert({"Metadata": {"ID": "j1"}, "Spec": {"Engine": "Noop"}}, Job)
    assert (await strategy.should_bid(bid_request(noop))).bid is True
    pulling = await DockerEngine.create(docker_host=docker_host, node_id=node_id)
    decision = await DockerBidStrategy(pulling).should_bid(
        bid_request(docker_job(["true"], image="absent/x:1"))
    )
    assert decision.bid is True  # a node that pulls cannot know at bid time
    http = await DockerBidStrategy(pulling).should_bid(
        bid_request(sh("true", Network={"Type": "HTTP", "Domains": ["example.com"]}))
    )
    assert (http.bid, http.reason) == (False, "networking type HTTP not supported")


# ---------------------------------------------------------------------------------------
# Images


async def test_missing_image_is_an_engine_error(engine: DockerEngine, tmp_path: Path) -> None:
    job = docker_job(["true"], image="worker-test/no-such-image:1")
    with pytest.raises(EngineError, match=r"^image worker-test/no-such-image:1 not available: .+"):
        await engine.run(request_for(tmp_path, job))
    assert await engine.has_image("worker-test/no-such-image:1") is False
    assert await engine.has_image(IMAGE) is True


async def test_no_pull_when_pulling_is_off(docker_host: str, tmp_path: Path) -> None:
    offline = await DockerEngine.create(
        docker_host=docker_host, node_id=f"test-{uuid.uuid4().hex[:8]}", pull_images=False
    )
    job = docker_job(["true"], image="worker-test/no-such-image")
    message = "^image worker-test/no-such-image not available: not present locally$"
    with pytest.raises(EngineError, match=message):
        await offline.run(request_for(tmp_path, job))


async def test_a_daemon_that_does_not_answer_is_not_installed(tmp_path: Path) -> None:
    started = time.monotonic()
    dead = await DockerEngine.create(
        docker_host=f"unix://{tmp_path}/no.sock", node_id="n1", probe_timeout=2.0
    )
    assert dead.is_installed() is False
    assert "Cannot connect to Docker Engine" in dead.probe_error, dead.probe_error
    assert time.monotonic() - started < 2.5
    nonsense = await DockerEngine.create(docker_host="gopher://x", node_id="n1")
    assert nonsense.is_installed() is False and nonsense.probe_error
    with socket.socket(socket.AF_UNIX) as silent:  # listens, never answers
        silent.bind(str(tmp_path / "silent.sock"))
        silent.listen()
        started = time.monotonic()
        hung = await DockerEngine.create(
            docker_host=f"unix://{tmp_path}/silent.sock", node_id="n1", probe_timeout=0.5
        )
        assert hung.is_installed() is False and hung.probe_error == "TimeoutError"
        assert time.monotonic() - started < 1.5
    unprobed = DockerEngine(node_id="n1")
    assert unprobed.is_installed() is False
