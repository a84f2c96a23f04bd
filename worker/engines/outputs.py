"""A child process's stdout/stderr into the results files, with a byte cap.

For every engine that runs a child process. :class:`CappedOutput` copies a pipe into a
file until ``limit`` bytes, then keeps reading and drops the rest, so a job flooding its
output neither blocks on a full pipe nor grows the node's memory (at most one chunk and
the 2 KiB summary head are held). :func:`supervise` pumps both pipes, waits for the
exit, and kills the child's process group (SIGKILL) on timeout, on cancellation or on
any error, so nothing outlives the run. :func:`command_result` builds the
RunCommandResult from what the pumps saw, as Bacalhau's ``WriteJobResults`` does: the
summaries are the first 2048 bytes of each stream, whatever the file cap.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import BinaryIO

from schemas.callbacks import RunCommandResult
from worker import results
from worker.children import kill_group

log = logging.getLogger(__name__)

CHUNK = 64 * 1024


class CappedOutput:
    """One output stream: the file ``path`` holds at most ``limit`` bytes of it."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = max(0, limit)
        self.total = 0  # bytes the child wrote
        self.written = 0  # bytes kept in the file
        self.head = bytearray()  # the first SUMMARY_BYTES + 1 bytes, for the summary

    @property
    def truncated(self) -> bool:
        """Whether the file lost bytes to the cap."""
        return self.total > self.written

    def feed(self, chunk: bytes, file: BinaryIO) -> None:
        self.total += len(chunk)
        room = self.limit - self.written
        if room > 0:
            kept = chunk[:room]
            file.write(kept)
            file.flush()  # ExecutionLogs with Follow reads the file while the job runs
            self.written += len(kept)
        want = results.SUMMARY_BYTES + 1 - len(self.head)
        if want > 0:
            self.head += chunk[:want]

    async def pump(self, reader: asyncio.StreamReader) -> None:
        """Copy ``reader`` to the file until EOF (the file is created even when empty)."""
        with self.path.open("wb") as file:
            while chunk := await reader.read(CHUNK):
                self.feed(chunk, file)
        if self.truncated:
            log.info(
                "%s capped at %d bytes (%d written by the job)",
                self.path.name,
                self.written,
                self.total,
            )


async def supervise(
    proc: asyncio.subprocess.Process,
    stdout: CappedOutput,
    stderr: CappedOutput,
    *,
    timeout: float | None,
) -> int:
    """Pump both pipes and wait for the child; its return code (negative: killed by
    that signal). Raises TimeoutError after ``timeout`` seconds. Whatever happens (a
    timeout, a cancellation), the process group is killed and reaped before returning.
    """
    assert proc.stdout is not None and proc.stderr is not None
    pumps = [
        asyncio.ensure_future(stdout.pump(proc.stdout)),
        asyncio.ensure_future(stderr.pump(proc.stderr)),
    ]
    try:
        async with asyncio.timeout(timeout):
            code = await proc.wait()
            kill_group(proc)  # anything the child left behind holds the pipes open
            await asyncio.gather(*pumps)
        return code
    finally:
        if proc.returncode is None:
            kill_group(proc)  # the child leads the group: no ``proc.kill()`` (see children)
            await _reap(proc)
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Wait for a killed child even when this task is being cancelled again."""
    waiter = asyncio.ensure_future(proc.wait())
    try:
        await asyncio.shield(waiter)
    except asyncio.CancelledError:
        await waiter
        raise


def command_result(
    stdout: CappedOutput, stderr: CappedOutput, exit_code: int, runner_error: str = ""
) -> RunCommandResult:
    """The RunCommandResult: summaries of the first 2048 bytes of each stream, and
    ``…truncated`` iff the stream was longer (PROTOCOL.md §4)."""
    out, out_truncated = results.summary(bytes(stdout.head))
    err, err_truncated = results.summary(bytes(stderr.head))
    return RunCommandResult(
        stdout=out,
        stdouttruncated=out_truncated,
        stderr=err,
        stderrtruncated=err_truncated,
        exitCode=exit_code,
        runnerError=runner_error,
    )
