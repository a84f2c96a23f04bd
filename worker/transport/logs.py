"""ExecutionLogs (PROTOCOL.md §2): the last bytes of stdout/stderr, then, with Follow,
new output as it is written, then EOF with the exit code."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from nats.aio.client import Client

from schemas.codec import encode
from schemas.compute import ExecutionLogsRequest, ExecutionLogsResponse
from schemas.compute import ExecutionState as S
from schemas.node import LogChunk
from worker import results
from worker.endpoint import BaseEndpoint
from worker.errors import ExecutionNotFound
from worker.store.types import ExecutionStore
from worker.tasks import TaskOwner
from worker.transport.subjects import Subjects

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
STREAMS = ("stdout", "stderr")
NOT_ENDED = frozenset({S.CREATED, S.BID_ACCEPTED, S.RUNNING})


class LogStreamer:
    """Serves ExecutionLogs requests; each stream is a task owned here."""

    def __init__(
        self,
        *,
        nc: Client,
        subjects: Subjects,
        endpoint: BaseEndpoint,
        store: ExecutionStore,
        results_root: Path,
        poll_interval: float = 0.2,
        max_follow: float = 24 * 3600.0,
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.endpoint = endpoint
        self.store = store
        self.results_root = results_root
        self.poll_interval = poll_interval
        self.max_follow = max_follow
        self.owner = TaskOwner(name="logs")

    async def serve(self, request: ExecutionLogsRequest, requester: str) -> bytes:
        execution = await self.endpoint.lookup(requester, request.ExecutionID)
        subject = self.subjects.logs(requester, execution.id)
        folder = results.results_dir(self.results_root, execution.id)
        self.owner.spawn(
            self._stream(execution.id, folder, subject, request.Follow, request.TailBytes),
            name=f"logs {execution.id}",
        )
        return encode(ExecutionLogsResponse(Subject=subject))

    async def _stream(
        self, execution_id: str, folder: Path, subject: str, follow: bool, tail: int | None
    ) -> None:
        await asyncio.sleep(0)  # let the reply go out first
        offsets: dict[str, int] = {}
        for stream in STREAMS:
            size = _size(folder / stream)
            start = 0 if tail is None else max(0, size - tail)
            offsets[stream] = await self._send(folder / stream, stream, start, subject)
        if follow:
            async with asyncio.timeout(self.max_follow):
                while await self._running(execution_id):
                    await asyncio.sleep(self.poll_interval)
                    for stream in STREAMS:
                        offsets[stream] = await self._send(
                            folder / stream, stream, offsets[stream], subject
                        )
            for stream in STREAMS:  # what was written between the last poll and the end
                offsets[stream] = await self._send(
                    folder / stream, stream, offsets[stream], subject
                )
        await self.nc.publish(subject, encode(LogChunk(EOF=True, ExitCode=_exit_code(folder))))

    async def _running(self, execution_id: str) -> bool:
        try:
            execution = await self.store.get_execution(execution_id)
        except ExecutionNotFound:
            return False
        return execution.state in NOT_ENDED

    async def _send(self, path: Path, stream: str, offset: int, subject: str) -> int:
        """Publish ``path`` from ``offset`` to its current end; return the new offset."""
        try:
            with path.open("rb") as f:
                f.seek(offset)
                while data := f.read(CHUNK):
                    chunk = LogChunk(
                        Stream=stream, Offset=offset, Data=data.decode("utf-8", "replace")
                    )
                    await self.nc.publish(subject, encode(chunk))
                    offset += len(data)
        except FileNotFoundError:
            pass
        return offset

    async def stop(self) -> None:
        await self.owner.shutdown()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _exit_code(folder: Path) -> int | None:
    try:
        return int((folder / "exitCode").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
