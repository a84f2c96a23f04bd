"""Streams read from a running container: its output (attached before start,
demultiplexed into the results files byte-exact, each capped by
:class:`~worker.engines.outputs.CappedOutput` as for the other engines) and its stats
(CPU time and peak memory for Usage).

Both go straight through the client's aiohttp session: aiodocker's own readers decode to
text and drop which stream a frame came from.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiodocker
import aiohttp
from aiohttp import StreamReader

from worker.engines.outputs import CHUNK, CappedOutput

STDOUT, STDERR = 1, 2  # stream kinds in the 8-byte frame header
_HEADER = struct.Struct(">BxxxL")
_ENDLESS = aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=30)


def api_url(docker: aiodocker.Docker, path: str) -> str:
    """An unversioned Engine API URL (the daemon serves its own latest version there)."""
    return f"{docker.docker_host}/{path}"


@contextlib.asynccontextmanager
async def attached(docker: aiodocker.Docker, container_id: str) -> AsyncIterator[StreamReader]:
    """The container's stdout and stderr, multiplexed, from the moment it starts: attach
    BEFORE starting it (as ``docker run`` does). Byte-exact and complete, unlike reading
    the logs back (json-file turns invalid UTF-8 into U+FFFD; a follower can miss the
    last partial line). The stream ends when the container's output is closed."""
    params = {"stream": "1", "stdout": "1", "stderr": "1"}
    url = api_url(docker, f"containers/{container_id}/attach")
    async with docker.session.post(url, params=params, timeout=_ENDLESS) as response:
        if response.status != 200:
            detail = (await response.read()).decode("utf-8", "replace").strip()
            raise aiodocker.DockerError(response.status, detail)
        yield response.content


async def copy_frames(stream: StreamReader, stdout: CappedOutput, stderr: CappedOutput) -> None:
    """Demultiplex ``stream`` into the two capped files until it ends. Everything is read
    (what is over the cap is dropped), so a chatty job never blocks on a full socket;
    memory stays at one chunk."""
    outs = {STDOUT: stdout, STDERR: stderr}
    with stdout.path.open("wb") as out_file, stderr.path.open("wb") as err_file:
        files = {STDOUT: out_file, STDERR: err_file}
        while True:
            try:
                header = await stream.readexactly(_HEADER.size)
            except asyncio.IncompleteReadError:  # the container closed its output
                return
            kind, remaining = _HEADER.unpack(header)
            while remaining:
                chunk = await stream.read(min(remaining, CHUNK))
                if not chunk:
                    return
                remaining -= len(chunk)
                if kind in outs:
                    outs[kind].feed(chunk, files[kind])


@dataclass(slots=True)
class StatsPeak:
    """The latest CPU total and the highest memory seen (0 when no sample came)."""

    cpu_seconds: float = 0.0
    peak_memory: int = 0

    def add(self, sample: dict[str, Any]) -> None:
        cpu = sample.get("cpu_stats", {}).get("cpu_usage", {}).get("total_usage", 0)
        if isinstance(cpu, int) and cpu > 0:
            self.cpu_seconds = max(self.cpu_seconds, cpu / 1e9)
        memory = sample.get("memory_stats", {})
        for key in ("max_usage", "usage"):  # max_usage: cgroup v1's peak
            value = memory.get(key)
            if isinstance(value, int):
                self.peak_memory = max(self.peak_memory, value)


async def follow_stats(docker: aiodocker.Docker, container_id: str, peak: StatsPeak) -> None:
    """Fold the daemon's stats stream (about one sample a second) into ``peak`` until the
    container stops or this task is cancelled. Best effort: errors end it quietly."""
    url = api_url(docker, f"containers/{container_id}/stats")
    with contextlib.suppress(aiohttp.ClientError, ValueError):
        async with docker.session.get(url, params={"stream": "1"}, timeout=_ENDLESS) as response:
            if response.status != 200:
                return
            async for line in response.content:
                if line.strip():
                    sample = json.loads(line)
                    if isinstance(sample, dict):
                        peak.add(sample)
