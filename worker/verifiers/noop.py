"""The Noop verifier proposes an empty proposal (Bacalhau ``verifier/noop``)."""

from __future__ import annotations

from pathlib import Path

from worker.store.types import Execution


class NoopVerifier:
    name = "Noop"

    def is_installed(self) -> bool:
        return True

    async def proposal(self, execution: Execution, results_dir: Path) -> bytes:
        return b""
