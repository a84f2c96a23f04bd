"""The seams of the node (Bacalhau's Executor, Verifier and Publisher interfaces).

Implementations live in ``engines/``, ``verifiers/`` and ``publishers/``, each in a
registry keyed by the wire enum. ``run``/``publish`` are cancelled with
``asyncio.CancelledError`` when the execution is cancelled or times out; they must stop
promptly and leave nothing running.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from schemas.callbacks import RunCommandResult, Usage
from schemas.job import StorageSpec
from worker.store.types import Execution, OutboxRow

# Told about every outbox row a transition wrote, so the dispatcher sends it at once.
OutboxNotify = Callable[[OutboxRow], None]


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """What an engine returns when the job ran (whatever its exit code)."""

    result: RunCommandResult
    usage: Usage


class Engine(Protocol):
    """Runs a job's program; raises ``worker.errors.EngineError`` when it could not run it."""

    name: str

    def is_installed(self) -> bool:
        """Whether this engine can run jobs on this host."""

    async def run(self, execution: Execution, results_dir: Path) -> RunOutcome:
        """Run the job, writing ``stdout``, ``stderr`` and ``exitCode`` into ``results_dir``."""


class Verifier(Protocol):
    """Proposes a result for the requester to verify (compute side of Bacalhau's verifier)."""

    name: str

    def is_installed(self) -> bool:
        """Whether this verifier can be used."""

    async def proposal(self, execution: Execution, results_dir: Path) -> bytes:
        """The proposal sent in RunResult.ResultProposal."""


class Publisher(Protocol):
    """Publishes a results folder; must be idempotent (a restart publishes again)."""

    name: str

    def is_installed(self) -> bool:
        """Whether this publisher can be used."""

    async def publish(self, execution: Execution, results_dir: Path) -> StorageSpec:
        """Publish and say where the results went."""
