"""Sources this node cannot fetch (IPFS, Filecoin, Estuary): declared, never installed, so
a job using one is declined at bid time with ``<Source> installed: false``."""

from __future__ import annotations

from pathlib import Path

from schemas.job import StorageSpec
from worker.errors import EngineError

UNSUPPORTED = ("IPFS", "Filecoin", "Estuary")


class Unsupported:
    """A source known by name only."""

    def __init__(self, *, name: str) -> None:
        self.name = name

    def is_installed(self) -> bool:
        return False

    def is_local(self, spec: StorageSpec) -> bool:
        return False

    def known_size(self, spec: StorageSpec) -> int:
        return 0

    async def prepare(self, spec: StorageSpec, dest: Path, *, requester: str) -> Path:
        raise EngineError(f"storage source {self.name} installed: false")
