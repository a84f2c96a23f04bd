"""BaseExecutor: run → propose, and publish, with ONE failure funnel (Bacalhau
``compute/executor.go``).

Every move is a compare-and-set through the store with its Cause; a move that loses the
race (the execution was cancelled meanwhile) is dropped silently, so after a
CancelResult nothing more is sent. A non-zero exit code is a RunResult, not a failure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Tracer

from schemas.compute import ExecutionState as S
from schemas.job import StorageSpec
from worker import durations, results, telemetry
from worker.callbacks import CallbackFactory
from worker.errors import (
    EngineError,
    InvalidStateError,
    StoreError,
    StoreUnavailableError,
    WorkerError,
)
from worker.logconfig import about
from worker.metrics import NodeMetrics
from worker.protocols import (
    Engine,
    OutboxNotify,
    PreparedInput,
    PreparedOutput,
    Publisher,
    RunOutcome,
    RunRequest,
    StorageProvider,
    Verifier,
)
from worker.redact import SECRET_PATTERNS, scrub
from worker.states import Cause, sources_of, transition
from worker.storage import paths
from worker.store.types import Execution, ExecutionStore, UpdateRequest, UpdateResult

log = logging.getLogger(__name__)


class BaseExecutor:
    """Runs and publishes executions; the buffer decides when."""

    def __init__(
        self,
        *,
        store: ExecutionStore,
        callbacks: CallbackFactory,
        engines: Mapping[str, Engine],
        storage: Mapping[str, StorageProvider] | None = None,
        work_root: Path | None = None,
        max_output_bytes: int = 1 << 30,
        verifiers: Mapping[str, Verifier],
        publishers: Mapping[str, Publisher],
        results_root: Path,
        default_timeout: float,
        verification_ttl: float,
        publish_attempts: int = 3,
        publish_backoff: float = 0.5,
        notify: OutboxNotify | None = None,
        schedule: Callable[[str, datetime], None] | None = None,
        metrics: NodeMetrics | None = None,
        tracer: Tracer | None = None,
        secret_patterns: Sequence[str] = SECRET_PATTERNS,
    ) -> None:
        self.store = store
        self.callbacks = callbacks
        self.engines = engines
        self.storage = storage or {}
        self.work_root = work_root or results_root.parent / "work"
        self.max_output_bytes = max_output_bytes
        self.verifiers = verifiers
        self.publishers = publishers
        self.results_root = results_root
        self.default_timeout = default_timeout
        self.verification_ttl = verification_ttl
        self.publish_attempts = publish_attempts
        self.publish_backoff = publish_backoff
        self.notify = notify
        self.metrics = metrics or NodeMetrics()
        self.tracer = tracer or trace.get_tracer("worker")
        self.secret_patterns = tuple(secret_patterns)
        self.schedule = schedule  # told the deadline of a waiting state this executor enters

    def timeout_of(self, execution: Execution) -> float:
        return execution.job.Spec.Timeout or self.default_timeout

    async def move(
        self,
        execution: Execution,
        cause: Cause,
        *,
        comment: str = "",
        changes: dict[str, object] | None = None,
    ) -> Execution | None:
        """Apply the table's move for ``cause``; None when the execution is no longer in a
        state it applies to (lost a race with a cancel or a timeout)."""
        current = execution.state
        move = transition(cause, current)
        if move is None:
            return None
        request = UpdateRequest(
            execution_id=execution.id,
            cause=cause,
            new_state=move.target,
            expected_states=sources_of(cause),
            comment=comment,
            changes=dict(changes or {}),
            callback=self.callbacks.for_kind(move.callback, err=comment, cause=cause.value),
        )
        delay = 0.1
        while True:
            try:
                result = await self.store.update(request)
                break
            except InvalidStateError:
                return None
            except StoreUnavailableError as exc:
                # Disk full or locked: it passes. Dropping the move would leave the
                # execution in a state nothing ever leaves (Running forever).
                log.warning(
                    "%s of %s waits for the store: %s", cause.value, execution.id, exc.message
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self._announce(result)
        return result.execution

    def _announce(self, result: UpdateResult) -> None:
        if result.outbox is not None and self.notify is not None:
            self.notify(result.outbox)

    async def fail(
        self, execution: Execution, cause: Cause, err: str, *, reload: bool = True
    ) -> bool:
        """The failure funnel: move to Failed with ``cause`` and a ComputeError, once.
        False when the execution had already moved on (nothing is written then).

        ``reload=False`` when ``execution`` was just read from the store: the store's
        read is skipped (the move still finds out if the state changed meanwhile)."""
        fresh = await self._reload(execution) if reload else execution
        if fresh is None or transition(cause, fresh.state) is None:
            return False
        # The message goes to logs, the store and ComputeError: mask secret values.
        err = scrub(err, fresh.job, self.secret_patterns)
        log.info("execution %s failed (%s): %s", execution.id, cause.value, err)
        if await self.move(fresh, cause, comment=err) is None:
            return False
        self.metrics.failed.add(1, {"cause": cause.value})
        return True

    async def _reload(self, execution: Execution) -> Execution | None:
        try:
            return await self.store.get_execution(execution.id)
        except StoreError:
            return None

    def span(self, name: str, execution: Execution) -> Any:
        """A span of this execution's trace (the BidAccepted request's context)."""
        if not telemetry.recording(self.tracer):
            return telemetry.NOTHING
        return self.tracer.start_as_current_span(
            name,
            context=telemetry.extract(execution.trace or execution.ask_trace),
            attributes={"execution.id": execution.id, "job.id": execution.job_id},
        )

    async def run(self, execution: Execution) -> None:
        """See :meth:`_run`; one span of the execution's trace around it."""
        with self.span("execution run", execution), about(execution.id, execution.job_id):
            await self._run(execution)

    async def _run(self, execution: Execution) -> None:
        """BidAccepted → Running → WaitingVerification (RunResult), or Failed.

        The timeout counts from entering Running and covers input preparation.
        Cancellation (``CancelledError``) comes from a cancel or a shutdown; the state was
        already moved by whoever cancelled, so nothing is written here.
        """
        if execution.state is S.RUNNING:  # RunStarted committed with BidAccepted
            running: Execution | None = execution
        else:
            running = await self.move(execution, Cause.RUN_STARTED)
        if running is None:
            return
        timeout = self.timeout_of(running)
        try:
            async with asyncio.timeout(timeout):
                outcome, proposal = await self._run_engine(running)
        except TimeoutError:
            await self.fail(
                running, Cause.RUN_TIMEOUT, f"execution timed out after {durations.format(timeout)}"
            )
            return
        except WorkerError as exc:
            await self.fail(running, Cause.ENGINE_ERROR, exc.message)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("engine failed for %s", running.id)
            await self.fail(running, Cause.ENGINE_ERROR, f"{type(exc).__name__}: {exc}")
            return
        deadline = datetime.now(UTC) + timedelta(seconds=self.verification_ttl)
        waiting = await self.move(
            running,
            Cause.RUN_COMPLETED,
            changes={
                "run_result": outcome.result,
                "run_usage": outcome.usage,
                "proposal": proposal,
                "deadline": deadline,
            },
        )
        if waiting is not None and self.schedule is not None:
            self.schedule(waiting.id, deadline)

    async def _run_engine(self, execution: Execution) -> tuple[RunOutcome, bytes]:
        spec = execution.job.Spec
        engine = self.engines.get(spec.Engine.value)
        if engine is None:
            raise WorkerError(f"failed to get executor {spec.Engine.value}: not installed")
        verifier = self.verifiers.get(spec.verifier.value)
        if verifier is None:
            raise WorkerError(f"failed to get verifier {spec.verifier.value}: not installed")
        folder = results.prepare(self.results_root, execution.id)
        if engine.scratch or spec.inputs:
            work = results.prepare(self.work_root, execution.id)
        else:  # not made at all (a mkdir and an rmdir are ~140 us on ext4 here)
            work = results.results_dir(self.work_root, execution.id)
        try:
            with telemetry.child_span(self.tracer, "inputs fetch"):
                request = await self._request(execution, folder, work)
            with telemetry.child_span(self.tracer, f"engine run {engine.name}"):
                outcome = await engine.run(request)
        finally:
            results.discard(work)
        try:
            with telemetry.child_span(self.tracer, f"verify {verifier.name}"):
                proposal = await verifier.proposal(execution, folder)
        except WorkerError as exc:
            raise WorkerError(f"failed to get proposal: {exc.message}") from exc
        return outcome, proposal

    async def _request(self, execution: Execution, folder: Path, work: Path) -> RunRequest:
        """Fetch the inputs (this counts against the run timeout) and make the outputs."""
        spec = execution.job.Spec
        counter = 0

        async def fetch(storage_spec: StorageSpec) -> Path:
            nonlocal counter
            source = storage_spec.StorageSource
            provider = self.storage.get(source.value) if source is not None else None
            if provider is None:
                name = source.value if source is not None else "(none)"
                raise EngineError(f"storage source {name} installed: false")
            counter += 1
            dest = work / "inputs" / str(counter)
            dest.mkdir(parents=True, mode=0o700)
            return await provider.prepare(storage_spec, dest, requester=execution.requester)

        inputs = [
            PreparedInput(
                spec=i, source=await fetch(i), target=paths.mount_target(i.path, "input path")
            )
            for i in spec.inputs
        ]
        outputs = []
        for o in spec.outputs:
            name = paths.check_name(o.Name)
            target = paths.mount_target(o.path or f"/{name}", "output path")
            source = folder / name
            source.mkdir(mode=0o700)
            outputs.append(PreparedOutput(spec=o, source=source, target=target))
        return RunRequest(
            execution=execution,
            results_dir=folder,
            work_dir=work,
            inputs=inputs,
            outputs=outputs,
            timeout=self.timeout_of(execution),
            max_output_bytes=self.max_output_bytes,
            fetch=fetch,
        )

    async def publish(self, execution: Execution) -> None:
        """See :meth:`_publish`; one span of the execution's trace around it."""
        with self.span("execution publish", execution), about(execution.id, execution.job_id):
            await self._publish(execution)

    async def _publish(self, execution: Execution) -> None:
        """ResultAccepted → Publishing → Completed (PublishResult), or Failed after retries.

        Also used on restart for executions found in Publishing (publishers are idempotent).
        """
        if execution.state is S.RESULT_ACCEPTED:
            moved = await self.move(execution, Cause.PUBLISH_STARTED)
            if moved is None:
                return
            execution = moved
        if execution.state is not S.PUBLISHING:
            return
        name = execution.job.Spec.publisher.value
        publisher = self.publishers.get(name)
        if publisher is None:
            await self.fail(execution, Cause.PUBLISH_ERROR, f"failed to get publisher {name}")
            return
        folder = results.results_dir(self.results_root, execution.id)
        error = ""
        for attempt in range(1, self.publish_attempts + 1):
            try:
                spec = await publisher.publish(execution, folder)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = exc.message if isinstance(exc, WorkerError) else f"{exc}"
                log.warning("publish of %s failed (attempt %d): %s", execution.id, attempt, error)
                await asyncio.sleep(self.publish_backoff * attempt)
                continue
            done = await self.move(
                execution, Cause.PUBLISH_COMPLETED, changes={"publish_result": spec}
            )
            if done is not None:
                self.metrics.completed.add(1)
            return
        await self.fail(execution, Cause.PUBLISH_ERROR, f"failed to publish result: {error}")
