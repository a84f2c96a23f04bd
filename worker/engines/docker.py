"""The Docker engine (Bacalhau ``executor/docker``), over the Engine API with aiodocker.

Construction does no I/O; ``await engine.probe()`` asks the daemon (``/version``,
bounded by ``probe_timeout``) and caches the answer, which ``is_installed()`` then
returns: ``await DockerEngine.create(...)`` does both. Until probed it is not installed.

A run, step by step (Debian's dockerd 20.10 with vfs, 2 vCPUs: 0.2–0.75 s per run in
all, of which create ≈ 130–250 ms (vfs copies the image), start ≈ 240–400 ms (runc),
wait and output ≈ 30–45 ms, remove ≈ 20–50 ms; the engine's own calls a few ms):

1. the image is pulled only when it is not present locally; a failed pull is
   ``EngineError("image <x> not available: <reason>")``;
2. the container is created (see :mod:`worker.engines.docker_spec`), named
   ``worker-<ExecutionID>`` and labelled with the node, the execution and the job;
3. its output is attached (before the start, so nothing is missed) and copied into
   ``stdout``/``stderr`` of the results folder (byte-exact, each capped at
   ``max_output_bytes``; the daemon keeps no log copy: log driver ``none``); it is
   started and its stats are folded into Usage;
4. the exit code is waited for and written to ``exitCode``; an OOM kill is named in
   ``runnerError`` (a non-zero exit is still a normal outcome);
5. always — on success, error, timeout or cancel — the container is force-removed
   (SIGKILL then remove, one call, bounded by ``remove_timeout``, shielded from a
   second cancel: ``close()`` waits for such removals). ``cleanup_leftovers()`` removes
   any container of this node that a crash left behind; the node calls it once at
   start, before recovery.

Environment values are never logged (they may hold secrets).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from typing import Any

import aiodocker
import aiohttp
from aiodocker.containers import DockerContainer

from schemas.callbacks import Usage
from worker.engines.docker_spec import (
    LABEL_NODE,
    container_config,
    container_name,
    split_image,
)
from worker.engines.docker_streams import StatsPeak, attached, copy_frames, follow_stats
from worker.engines.outputs import CappedOutput, command_result
from worker.errors import EngineError
from worker.protocols import RunOutcome, RunRequest

log = logging.getLogger(__name__)

DEFAULT_HOST = "unix:///var/run/docker.sock"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, aiodocker.DockerError):
        return str(exc.message).strip()
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


class DockerEngine:
    """Runs Docker jobs on one daemon; one short-lived API client per operation."""

    name = "Docker"
    scratch = False  # inputs are fetched under work_dir and bind-mounted; nothing else

    def __init__(
        self,
        *,
        docker_host: str = "",
        node_id: str,
        accept_networked: bool = False,
        pull_images: bool = True,
        probe_timeout: float = 3.0,
        remove_timeout: float = 30.0,
        log_drain_timeout: float = 30.0,
    ) -> None:
        host = docker_host or os.environ.get("DOCKER_HOST", "") or DEFAULT_HOST
        if host.startswith("tcp://"):
            host = "http://" + host.removeprefix("tcp://")
        self.docker_host = host
        self.node_id = node_id
        self.accept_networked = accept_networked
        self.pull_images = pull_images
        self.probe_timeout = probe_timeout
        self.remove_timeout = remove_timeout
        self.log_drain_timeout = log_drain_timeout
        self.server_version = ""
        self.probe_error = "not probed yet"
        self._api_version = "auto"
        self._installed = False
        self._removals: set[asyncio.Task[None]] = set()

    @classmethod
    async def create(
        cls,
        *,
        docker_host: str = "",
        node_id: str,
        accept_networked: bool = False,
        pull_images: bool = True,
        probe_timeout: float = 3.0,
    ) -> DockerEngine:
        """A probed engine: ``is_installed()`` is true iff the daemon answered."""
        engine = cls(
            docker_host=docker_host,
            node_id=node_id,
            accept_networked=accept_networked,
            pull_images=pull_images,
            probe_timeout=probe_timeout,
        )
        await engine.probe()
        return engine

    def _client(self) -> aiodocker.Docker:
        return aiodocker.Docker(url=self.docker_host, api_version=self._api_version)

    async def probe(self) -> bool:
        """Ask the daemon for its version (bounded); cache and return whether it answered."""
        docker: aiodocker.Docker | None = None
        try:
            docker = aiodocker.Docker(url=self.docker_host)  # ValueError: a bad address
            async with asyncio.timeout(self.probe_timeout):
                version = await docker.version()
            self._api_version = f"v{version['ApiVersion']}"
            self.server_version = str(version.get("Version", ""))
            self._installed, self.probe_error = True, ""
        except (aiodocker.DockerError, OSError, TimeoutError, KeyError, ValueError) as exc:
            self._installed = False
            self.probe_error = _reason(exc) or "no answer"
            log.info("docker at %s is not usable: %s", self.docker_host, self.probe_error)
        finally:
            if docker is not None:
                await docker.close()
        return self._installed

    def is_installed(self) -> bool:
        return self._installed

    # -- images ---------------------------------------------------------------------------

    async def has_image(self, image: str) -> bool:
        """Whether ``image`` is present on the daemon (one local API call, no registry)."""
        docker = self._client()
        try:
            async with asyncio.timeout(self.probe_timeout):
                await docker.images.inspect(image)
            return True
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return False
            raise EngineError(f"image {image}: {_reason(exc)}") from exc
        finally:
            await docker.close()

    async def _ensure_image(self, docker: aiodocker.Docker, image: str) -> None:
        try:
            await docker.images.inspect(image)
            return
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise EngineError(f"image {image} not available: {_reason(exc)}") from exc
        if not self.pull_images:
            raise EngineError(f"image {image} not available: not present locally")
        repository, tag = split_image(image)
        log.info("pulling image %s", image)
        reference, tag_param = (
            (f"{repository}@{tag}", None) if tag.startswith("sha256:") else (repository, tag)
        )
        try:  # streamed: the progress messages of a large image are not kept
            async for _ in docker.images.pull(reference, tag=tag_param, stream=True):
                pass
        except (aiodocker.DockerError, OSError) as exc:
            raise EngineError(f"image {image} not available: {_reason(exc)}") from exc

    # -- run ------------------------------------------------------------------------------

    async def run(self, request: RunRequest) -> RunOutcome:
        config = container_config(
            request, node_id=self.node_id, accept_networked=self.accept_networked
        )
        name = container_name(request.execution.id)
        docker = self._client()
        try:
            await self._ensure_image(docker, config["Image"])
            container = await self._create(docker, config, name)
            log.info(
                "execution %s: container %s (%s) created",
                request.execution.id,
                name,
                config["Image"],
            )
            return await self._execute(docker, container, request)
        except (aiodocker.DockerError, aiohttp.ClientError) as exc:
            raise EngineError(f"docker: {_reason(exc)}") from exc
        finally:
            await self._remove_shielded(docker, name)

    async def _create(
        self, docker: aiodocker.Docker, config: dict[str, Any], name: str
    ) -> DockerContainer:
        try:
            return await docker.containers.create(config, name=name)
        except aiodocker.DockerError as exc:
            if exc.status != 409:
                raise EngineError(f"failed to create container: {_reason(exc)}") from exc
        # A container of that name is left over (never two runs of one execution): replace it.
        await docker.containers.container(name).delete(force=True)
        try:
            return await docker.containers.create(config, name=name)
        except aiodocker.DockerError as exc:
            raise EngineError(f"failed to create container: {_reason(exc)}") from exc

    async def _start(self, container: DockerContainer) -> None:
        try:
            await container.start()
        except aiodocker.DockerError as exc:
            reason = _reason(exc)
            missing = "exec:" in reason and "no such file or directory" in reason
            if missing or "executable file not found" in reason:
                raise EngineError(f"Executable file not found: {reason}") from exc
            raise EngineError(f"failed to start container: {reason}") from exc

    async def _execute(
        self, docker: aiodocker.Docker, container: DockerContainer, request: RunRequest
    ) -> RunOutcome:
        folder, cap = request.results_dir, request.max_output_bytes
        stdout = CappedOutput(folder / "stdout", cap)
        stderr = CappedOutput(folder / "stderr", cap)
        peak = StatsPeak()
        async with attached(docker, container.id) as stream:
            await self._start(container)
            started = time.monotonic()
            output = asyncio.create_task(copy_frames(stream, stdout, stderr))
            stats = asyncio.create_task(follow_stats(docker, container.id, peak))
            try:
                status = await container.wait()
                wall = time.monotonic() - started
                exit_code = int(status.get("StatusCode", -1))
                await self._drain(output)
            finally:
                for task in (output, stats):
                    task.cancel()
                await asyncio.gather(output, stats, return_exceptions=True)
        runner_error = await self._runner_error(container, exit_code, status)
        (folder / "exitCode").write_text(str(exit_code))
        log.info(
            "execution %s: exit code %d after %.3fs (stdout %d bytes, stderr %d bytes)",
            request.execution.id,
            exit_code,
            wall,
            stdout.total,
            stderr.total,
        )
        return RunOutcome(
            result=command_result(stdout, stderr, exit_code, runner_error),
            usage=Usage(
                WallSeconds=wall, CPUSeconds=peak.cpu_seconds, PeakMemoryBytes=peak.peak_memory
            ),
        )

    async def _drain(self, output: asyncio.Task[None]) -> None:
        """The output ends with the container; wait for the rest to be copied (bounded:
        a process the job left holding the output open does not hold the run)."""
        try:
            async with asyncio.timeout(self.log_drain_timeout):
                await asyncio.shield(output)
        except TimeoutError:
            raise EngineError(
                f"container output did not end within {self.log_drain_timeout:g}s after exit"
            ) from None

    async def _runner_error(self, container: DockerContainer, exit_code: int, status: Any) -> str:
        error = status.get("Error") if isinstance(status, dict) else None
        if isinstance(error, dict) and error.get("Message"):
            return str(error["Message"])
        if exit_code == 0:
            return ""
        info = await container.show()
        if info.get("State", {}).get("OOMKilled"):
            limit = info.get("HostConfig", {}).get("Memory", 0)
            return f"container killed: out of memory (limit {limit} bytes)"
        return ""

    # -- removal --------------------------------------------------------------------------

    async def _remove_shielded(self, docker: aiodocker.Docker, name: str) -> None:
        """Remove the container and close the client, even when this run is cancelled
        again meanwhile (the removal then finishes in the background)."""
        task = asyncio.create_task(self._remove(docker, name))
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)
        await asyncio.shield(task)

    async def _remove(self, docker: aiodocker.Docker, name: str) -> None:
        try:
            async with asyncio.timeout(self.remove_timeout):
                await docker.containers.container(name).delete(force=True, v=True)
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                log.warning("container %s not removed: %s", name, _reason(exc))
        except Exception as exc:  # never mask the run's own outcome
            log.warning("container %s not removed: %s", name, _reason(exc))
        finally:
            await docker.close()

    async def close(self) -> None:
        """Wait (bounded) for removals a repeated cancel left running in the background."""
        if self._removals:
            await asyncio.wait(list(self._removals), timeout=self.remove_timeout)

    async def cleanup_leftovers(self) -> int:
        """Force-remove every container labelled with this node (the restart policy:
        leftover containers of Running executions are killed). Returns how many."""
        docker = self._client()
        removed = 0
        try:
            async with asyncio.timeout(self.remove_timeout):
                filters = json.dumps({"label": [f"{LABEL_NODE}={self.node_id}"]})
                for container in await docker.containers.list(all=True, filters=filters):
                    with contextlib.suppress(aiodocker.DockerError):
                        await container.delete(force=True, v=True)
                        removed += 1
        except (aiodocker.DockerError, OSError, TimeoutError) as exc:
            log.warning("leftover containers not all removed: %s", _reason(exc))
        finally:
            await docker.close()
        if removed:
            log.info("removed %d leftover containers of node %s", removed, self.node_id)
        return removed
