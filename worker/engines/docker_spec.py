"""The container a Docker execution runs in (Bacalhau ``executor/docker/executor.go``
steps 2–9), as a Docker Engine API ``ContainerCreate`` body.

Pure functions, no I/O: what the daemon is asked for is testable on its own.

- Env: ``Docker.EnvironmentVariables`` then ``BACALHAU_JOB_SPEC`` (the Spec as JSON).
- Entrypoint and working directory as given; no ``Cmd`` (Bacalhau sets only Entrypoint).
- Resources: from the job's own request, as Bacalhau did (a job that asks for nothing
  runs unlimited): ``NanoCpus`` = CPU × 1e9, ``Memory`` (and ``MemorySwap`` equal to it,
  so the limit is not doubled by swap), GPUs as one device request for that many GPUs.
- Network: ``None`` → ``NetworkMode none``; ``Full`` → ``host``, only on a node that
  accepts networked jobs; ``HTTP`` is refused (no allowlist gateway here).
- Inputs bound read-only at their targets, outputs read-write; labels name the node,
  the execution and the job, so leftovers can be found after a restart.
"""

from __future__ import annotations

import re
from typing import Any

from schemas.codec import encode
from schemas.job import NetworkType
from worker.capacity.parse import ResourceParseError, parse_resources
from worker.errors import EngineError
from worker.protocols import RunRequest

LABEL_NODE = "worker.node"
LABEL_EXECUTION = "worker.execution"
LABEL_JOB = "worker.job"
JOB_SPEC_ENV = "BACALHAU_JOB_SPEC"

_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def container_name(execution_id: str) -> str:
    """``worker-<ExecutionID>`` (IDs are subject tokens, already valid Docker names)."""
    return "worker-" + _NAME_UNSAFE.sub("_", execution_id)


def split_image(image: str) -> tuple[str, str]:
    """``(repository, tag or digest)`` of an image reference; the tag defaults to
    ``latest`` (a pull without a tag would fetch every tag)."""
    if "@" in image:
        repository, digest = image.split("@", 1)
        return repository, digest
    name, _, last = image.rpartition("/")
    if ":" in last:
        repo, tag = last.rsplit(":", 1)
        return (f"{name}/{repo}" if name else repo), tag
    return image, "latest"


def _resources(request: RunRequest) -> dict[str, Any]:
    try:
        wanted = parse_resources(request.execution.job.Spec.Resources)
    except ResourceParseError as exc:
        raise EngineError(f"invalid resource request: {exc}") from exc
    host: dict[str, Any] = {}
    if wanted.CPU > 0:
        host["NanoCpus"] = round(wanted.CPU * 1e9)
    if wanted.Memory > 0:
        host["Memory"] = wanted.Memory
        host["MemorySwap"] = wanted.Memory
    if wanted.GPU > 0:
        host["DeviceRequests"] = [
            {"Driver": "", "Count": wanted.GPU, "Capabilities": [["gpu"]], "Options": {}}
        ]
    return host


def _network(request: RunRequest, accept_networked: bool) -> tuple[dict[str, Any], bool]:
    """HostConfig network settings, and whether the container has no network at all."""
    kind = request.execution.job.Spec.Network.Type
    if kind is NetworkType.NONE:
        return {"NetworkMode": "none"}, True
    if kind is NetworkType.FULL:
        if not accept_networked:
            raise EngineError("networking is enabled: false")
        return {"NetworkMode": "host", "ExtraHosts": ["host.docker.internal:127.0.0.1"]}, False
    raise EngineError(f"networking type {kind.value} not supported")


def _mounts(request: RunRequest) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"Type": "bind", "Source": str(i.source.resolve()), "Target": i.target, "ReadOnly": True}
        for i in request.inputs
    ]
    mounts += [
        {"Type": "bind", "Source": str(o.source.resolve()), "Target": o.target, "ReadOnly": False}
        for o in request.outputs
    ]
    return mounts


def labels(node_id: str, request: RunRequest) -> dict[str, str]:
    execution = request.execution
    return {
        LABEL_NODE: node_id,
        LABEL_EXECUTION: execution.id,
        LABEL_JOB: execution.job_id,
    }


def container_config(
    request: RunRequest, *, node_id: str, accept_networked: bool
) -> dict[str, Any]:
    """The ContainerCreate body for ``request``; EngineError when the job cannot run here."""
    spec = request.execution.job.Spec
    docker = spec.Docker
    if not docker.Image:
        raise EngineError("docker job has no image")
    network, disabled = _network(request, accept_networked)
    host_config: dict[str, Any] = {
        **network,
        **_resources(request),
        "Mounts": _mounts(request),
        # The output is read through attach; the daemon keeps no copy of it.
        "LogConfig": {"Type": "none", "Config": {}},
    }
    config: dict[str, Any] = {
        "Image": docker.Image,
        "Env": [*docker.EnvironmentVariables, f"{JOB_SPEC_ENV}={encode(spec).decode()}"],
        "Labels": labels(node_id, request),
        "AttachStdin": False,
        "AttachStdout": False,
        "AttachStderr": False,
        "Tty": False,
        "OpenStdin": False,
        "NetworkDisabled": disabled,
        "HostConfig": host_config,
    }
    if docker.Entrypoint:
        config["Entrypoint"] = list(docker.Entrypoint)
    if docker.WorkingDirectory:
        config["WorkingDir"] = docker.WorkingDirectory
    return config
