"""Records and the ExecutionStore protocol (Bacalhau ``store/types.go``, made durable).

The store enforces compare-and-set on (expected states, expected version) and refuses
any move out of a terminal state; *which* moves are legal is decided by the caller from
``worker.states.TRANSITIONS``. Every update writes one history row and, when asked,
one outbox row, in the same transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import msgspec

from schemas.callbacks import RunCommandResult, Usage
from schemas.compute import ExecutionState
from schemas.job import Job, StorageSpec
from worker.capacity.usage import ResourceUsage
from worker.states import Cause


class Execution(msgspec.Struct, kw_only=True):
    """One execution of a job on this node, as stored."""

    id: str
    job: Job
    requester: str
    usage: ResourceUsage
    state: ExecutionState = ExecutionState.CREATED
    version: int = 1
    create_time: datetime
    update_time: datetime
    latest_comment: str = ""
    last_cause: str = Cause.ASK_FOR_BID.value
    ask_reply: bytes = b""  # the AskForBidResponse as first sent, for duplicate asks
    deadline: datetime | None = None  # deadline of the current waiting state (UTC)
    trace: dict[str, str] = msgspec.field(default_factory=dict)  # BidAccepted's trace context
    ask_trace: dict[str, str] = msgspec.field(default_factory=dict)  # AskForBid's trace context
    run_result: RunCommandResult | None = None
    run_usage: Usage | None = None
    proposal: bytes | None = None
    publish_result: StorageSpec | None = None
    next_seq: int = 1  # Seq the next callback of this execution will get

    @property
    def job_id(self) -> str:
        return self.job.Metadata.ID


class HistoryEntry(msgspec.Struct, kw_only=True, frozen=True):
    execution_id: str
    previous_state: ExecutionState
    new_state: ExecutionState
    new_version: int
    cause: str
    requester: str
    comment: str
    time: datetime


class OutboxMessage(msgspec.Struct, kw_only=True, frozen=True):
    """A callback exactly as it will be published."""

    subject: str
    kind: str
    body: bytes
    headers: dict[str, str]
    # Trace context the send span links to (not published): the ask's, when it differs.
    link: dict[str, str] = msgspec.field(default_factory=dict)


class OutboxRow(msgspec.Struct, kw_only=True):
    execution_id: str
    seq: int
    subject: str
    kind: str
    body: bytes
    headers: dict[str, str]
    created_at: datetime
    attempts: int = 0
    parked: bool = False
    delivered: bool = False
    last_error: str = ""
    link: dict[str, str] = msgspec.field(default_factory=dict)


class Tombstone(msgspec.Struct, kw_only=True, frozen=True):
    """What is left of a terminal execution after retention deleted it."""

    id: str
    job_id: str
    requester: str
    state: ExecutionState
    cause: str
    deleted_at: datetime


class OutboxStats(msgspec.Struct, kw_only=True, frozen=True):
    pending: int = 0
    parked: int = 0
    oldest: datetime | None = None


# Builds the callback of an update from the execution as it will be after the update
# and the Seq the store assigned to it. Runs inside the store's transaction: keep it pure.
CallbackBuilder = Callable[[Execution, int], OutboxMessage]


@dataclass(slots=True)
class UpdateRequest:
    """A compare-and-set state change (Bacalhau ``UpdateExecutionStateRequest`` + Cause).

    ``expected_states`` empty means "any non-terminal state"; ``expected_version`` 0
    means "any version". ``changes`` sets other ``Execution`` fields in the same
    transaction (deadline, trace, run_result, run_usage, proposal, publish_result).
    """

    execution_id: str
    cause: Cause
    new_state: ExecutionState
    expected_states: frozenset[ExecutionState] = frozenset()
    expected_version: int = 0
    comment: str = ""
    requester: str = ""
    changes: dict[str, Any] = field(default_factory=dict)
    callback: CallbackBuilder | None = None
    owner: str = ""  # when set, the execution must belong to this requester (else not found)
    # A move that follows at once, in the same transaction (ResultAccepted, then
    # PublishStarted): one write, one history row per move. At most one move of a
    # chain may carry a callback.
    then: UpdateRequest | None = None


@dataclass(slots=True)
class UpdateResult:
    execution: Execution  # after the last move
    outbox: OutboxRow | None
    first: Execution | None = None  # with ``then``: after the first move (what a reply reports)


@dataclass(slots=True)
class ListQuery:
    requester: str
    updated_since: datetime | None = None
    states: Sequence[ExecutionState] = ()
    limit: int = 100
    cursor: str = ""


class ExecutionStore(Protocol):
    """Durable record of every execution, its history and its outbox.

    Errors: ``ExecutionNotFound``, ``InvalidStateError`` (state CAS lost or terminal),
    ``VersionMismatchError``, ``AlreadyExistsError``, ``StoreUnavailableError``.
    """

    async def open(self) -> None:
        """Open, migrate and check the store."""

    async def close(self) -> None:
        """Close every connection (a leftover aiosqlite connection hangs the process)."""

    async def create_execution(self, execution: Execution, *, comment: str = "") -> Execution:
        """Insert a new execution (State Created, Version 1) and its first history row
        (Undefined → Created, Cause AskForBid, requester = execution.requester)."""

    async def get_execution(self, execution_id: str) -> Execution:
        """The execution, or ``ExecutionNotFound``."""

    async def get_executions_for_job(self, job_id: str) -> list[Execution]:
        """Every execution of a job, in creation order ([] when none)."""

    async def find_active(self, requester: str, job_id: str) -> Execution | None:
        """The latest non-terminal execution of (requester, job), if any."""

    async def get_history(self, execution_id: str) -> list[HistoryEntry]:
        """History rows in order ([] for an unknown execution)."""

    async def update(self, request: UpdateRequest) -> UpdateResult:
        """Apply one compare-and-set update with its history row and outbox row."""

    async def live_executions(self) -> list[Execution]:
        """Every non-terminal execution (used on start-up and by timers)."""

    async def list_executions(self, query: ListQuery) -> tuple[list[Execution], str]:
        """One page of a requester's executions ordered by (update_time, id), and the
        cursor of the next page ("" when this is the last)."""

    async def get_callbacks(self, execution_id: str) -> list[OutboxRow]:
        """Every outbox row of an execution (delivered ones included), by Seq."""

    async def pending_outbox(self, limit: int = 1000) -> list[OutboxRow]:
        """Undelivered rows (parked ones included), ordered by (created_at, seq)."""

    async def mark_delivered(self, execution_id: str, seq: int) -> None:
        """Retire an outbox row."""

    async def record_attempt(self, execution_id: str, seq: int, error: str, *, park: bool) -> None:
        """Count a failed delivery; park the row when ``park``."""

    async def unpark_all(self) -> int:
        """Make parked rows pending again (after a reconnect or restart)."""

    async def outbox_stats(self) -> OutboxStats:
        """Pending / parked counts and the oldest undelivered row's time."""

    async def get_tombstone(self, execution_id: str) -> Tombstone | None:
        """The tombstone of a deleted execution, if it is still kept."""

    async def purge(self, terminal_before: datetime, tombstones_before: datetime) -> list[str]:
        """Delete terminal executions last updated before ``terminal_before`` (history and
        outbox included), leaving tombstones; drop tombstones older than
        ``tombstones_before``. Returns the deleted execution IDs."""

    async def delete_execution(self, execution_id: str) -> None:
        """Remove an execution, its history and outbox (no error when unknown)."""

    async def count(self) -> int:
        """Number of stored executions."""
