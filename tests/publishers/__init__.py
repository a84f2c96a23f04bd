"""Tests of the publishers; :func:`make_execution` is shared with the verifier tests."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schemas.job import Engine, Job, JobRequester, Metadata, Publisher, PublisherSpec, Spec
from schemas.job import Verifier as VerifierName
from worker.capacity.usage import ResourceUsage
from worker.store.types import Execution

CREATED = datetime(2024, 3, 9, 7, 5, 3, tzinfo=UTC)


def make_execution(
    *,
    execution_id: str = "e-0b9d6c3e-5f0c-4a57-9d0e-1a2b3c4d5e6f",
    job_id: str = "job-1",
    requester: str = "req-a",
    public_key: str = "",
    verifier: VerifierName = VerifierName.NOOP,
    publisher: Publisher | None = None,
    params: dict[str, Any] | None = None,
    created: datetime = CREATED,
) -> Execution:
    spec = Spec(
        Engine=Engine.NOOP,
        Verifier=verifier,
        PublisherSpec=(
            PublisherSpec(Type=publisher, Params=params or {}) if publisher is not None else None
        ),
    )
    job = Job(
        Metadata=Metadata(
            ID=job_id,
            Requester=JobRequester(RequesterNodeID=requester, RequesterPublicKey=public_key),
        ),
        Spec=spec,
    )
    return Execution(
        id=execution_id,
        job=job,
        requester=requester,
        usage=ResourceUsage(),
        create_time=created,
        update_time=created,
    )


def make_results(root: Path) -> Path:
    """A results folder as an engine leaves it: streams, nested outputs, an empty folder,
    an empty file, unicode and spaces in names, an executable and a binary file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "stdout").write_text("hello\n")
    (root / "stderr").write_text("")
    (root / "exitCode").write_text("0")
    out = root / "outputs"
    (out / "nested" / "deeper").mkdir(parents=True)
    (out / "empty-folder").mkdir()
    (out / "a.txt").write_text("alpha\n")
    (out / "nested" / "deeper" / "b.txt").write_text("beta\n")
    (out / "file with spaces.txt").write_text("spaces\n")
    (out / "café ☕.md").write_text("unicode\n")
    (out / "empty").write_bytes(b"")
    (out / "blob.bin").write_bytes(bytes(range(256)) * 64)
    script = out / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    return root


class Blocker:
    """An ``on_progress`` hook that parks the upload at its ``after``-th step (until the
    test cancels it), so a test can cancel in the middle without guessing at timing."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.seen: list[str] = []
        self.reached = asyncio.Event()

    async def __call__(self, key: str) -> None:
        self.seen.append(key)
        if len(self.seen) >= self.after:
            self.reached.set()
            await asyncio.Event().wait()
