"""The seams of the node (Bacalhau's Executor, Verifier and Publisher interfaces).

Implementations live in ``engines/``, ``verifiers/`` and ``publishers/``, each in a
registry keyed by the wire enum. ``run``/``publish`` are cancelled with
``asyncio.CancelledError`` when the execution is cancelled or times out; they must stop
promptly and leave nothing running.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from schemas.callbacks import RunCommandResult, Usage
from schemas.job import StorageSpec
from worker.store.types import Execution, OutboxRow

# Told about every outbox row a transition wrote, so the dispatcher sends it at once.
OutboxNotify = Callable[[OutboxRow], None]


@dataclass(frozen=True, slots=True)
class PreparedInput:
    """An input fetched onto the node: ``source`` (a file or a folder, read-only for the
    job) is what the job sees at ``target`` (the spec's ``path``)."""

    spec: StorageSpec
    source: Path
    target: str


@dataclass(frozen=True, slots=True)
class PreparedOutput:
    """An output folder ``results_dir/<Name>`` (created empty), seen by the job read-write
    at ``target`` (the spec's ``path``, else ``/<Name>``)."""

    spec: StorageSpec
    source: Path
    target: str


# Fetches one StorageSpec (a Wasm module, an import module, a job context) onto the node.
Fetch = Callable[[StorageSpec], Awaitable[Path]]


@dataclass(frozen=True, slots=True)
class RunRequest:
    """Everything an engine needs to run one execution.

    ``results_dir`` receives ``stdout``, ``stderr`` and ``exitCode`` (at most
    ``max_output_bytes`` each) and holds the output folders; ``work_dir`` is scratch space
    of this execution, removed after the run. The executor also enforces ``timeout``
    (seconds, counted from Running), by cancelling ``run``.
    """

    execution: Execution
    results_dir: Path
    work_dir: Path
    inputs: Sequence[PreparedInput] = ()
    outputs: Sequence[PreparedOutput] = ()
    timeout: float = 600.0
    max_output_bytes: int = 1 << 30
    fetch: Fetch | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """What an engine returns when the job ran (whatever its exit code)."""

    result: RunCommandResult
    usage: Usage


class Engine(Protocol):
    """Runs a job's program; raises ``worker.errors.EngineError`` when it could not run it."""

    name: str
    # Whether ``run`` uses ``request.work_dir`` as scratch space. When False (and the job
    # has no inputs, which are fetched below it) the folder is not made at all.
    scratch: bool

    def is_installed(self) -> bool:
        """Whether this engine can run jobs on this host."""

    async def run(self, request: RunRequest) -> RunOutcome:
        """Run the job, writing ``stdout``, ``stderr`` and ``exitCode`` into
        ``request.results_dir``. A non-zero exit code is a normal outcome."""


class StorageProvider(Protocol):
    """An input source (Bacalhau's storage providers), keyed by ``StorageSource``."""

    name: str

    def is_installed(self) -> bool:
        """Whether this source can be used on this host."""

    def is_local(self, spec: StorageSpec) -> bool:
        """Whether the data is already on this node (locality ``local``); no network I/O."""

    def known_size(self, spec: StorageSpec) -> int:
        """Bytes the input will take, as far as known at bid time without network I/O."""

    async def prepare(self, spec: StorageSpec, dest: Path, *, requester: str) -> Path:
        """Fetch the input under ``dest`` (a fresh folder) and return the local path of
        the file or folder. Raises ``worker.errors.EngineError`` with a clear message."""


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
