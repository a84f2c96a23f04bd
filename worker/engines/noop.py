"""The Noop engine: runs nothing, exit code 0 (Bacalhau ``executor/noop``).

``handler`` is Bacalhau's ``JobHandler`` hook: tests and the devstack give it a coroutine
that stands in for a job (to hold capacity for a while, or to fail).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from schemas.callbacks import RunCommandResult, Usage
from worker import results
from worker.protocols import RunOutcome, RunRequest
from worker.store.types import Execution

JobHandler = Callable[[Execution, Path], Awaitable[None]]


class NoopEngine:
    name = "Noop"
    scratch = False

    def __init__(self, *, handler: JobHandler | None = None) -> None:
        self.handler = handler

    def is_installed(self) -> bool:
        return True

    async def run(self, request: RunRequest) -> RunOutcome:
        started = time.monotonic()
        results_dir = request.results_dir
        if self.handler is not None:
            await self.handler(request.execution, results_dir)
        results.write_results(results_dir, stdout=b"", stderr=b"", exit_code=0)
        return RunOutcome(
            result=RunCommandResult(exitCode=0),  # what the empty files just written say
            usage=Usage(WallSeconds=time.monotonic() - started),
        )
