"""The Noop publisher publishes nothing and returns an empty StorageSpec."""

from __future__ import annotations

from pathlib import Path

from schemas.job import StorageSpec
from worker.store.types import Execution


class NoopPublisher:
    name = "Noop"

    def is_installed(self) -> bool:
        return True

    async def publish(self, execution: Execution, results_dir: Path) -> StorageSpec:
        return StorageSpec()
