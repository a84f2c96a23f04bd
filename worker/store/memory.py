"""In-memory ExecutionStore, and the rules every store shares.

``MemoryStore`` is the reference implementation of ``ExecutionStore``. The pure rules
(Bacalhau's checks, the update itself, the listing cursor) live here as functions that
``SqliteStore`` calls inside its transaction, so the two stores cannot drift apart; the
contract suite in ``tests/contract`` runs the same tests against both.

Executions are kept encoded (msgspec JSON, as SQLite keeps them), so a caller that mutates
a returned record never changes the stored one, and both stores round-trip alike.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from schemas.compute import ExecutionState
from worker.errors import (
    AlreadyExistsError,
    ExecutionNotFound,
    InvalidStateError,
    StoreUnavailableError,
    VersionMismatchError,
)
from worker.states import TERMINAL, Cause
from worker.store.types import (
    Execution,
    HistoryEntry,
    ListQuery,
    OutboxRow,
    OutboxStats,
    Tombstone,
    UpdateRequest,
    UpdateResult,
)

Clock = Callable[[], datetime]

CREATED_COMMENT = "Execution created"  # Bacalhau inmemory/store.go
MAX_CURSOR_LENGTH = 512

# Fields only the store writes: ``changes`` may not touch them.
MANAGED_FIELDS = frozenset(
    {
        "id",
        "state",
        "version",
        "create_time",
        "update_time",
        "latest_comment",
        "last_cause",
        "next_seq",
    }
)
_FIELD_TYPES: dict[str, Any] = {f.name: f.type for f in msgspec.structs.fields(Execution)}

_encoder = msgspec.json.Encoder()
_exec_decoder = msgspec.json.Decoder(Execution)
_cursor_decoder = msgspec.json.Decoder(tuple[int, str])


def utc_now() -> datetime:
    return datetime.now(UTC)


def utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a naive time is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment if moment.tzinfo is UTC else moment.astimezone(UTC)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_us(moment: datetime) -> int:
    """Microseconds since the Unix epoch: how times are compared and stored in SQLite."""
    delta = utc(moment) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def encode_execution(execution: Execution) -> bytes:
    return _encoder.encode(execution)


def decode_execution(data: bytes) -> Execution:
    return _exec_decoder.decode(data)


def normalize(execution: Execution) -> Execution:
    """The execution with its times in UTC (what the store keeps and returns)."""
    fixes: dict[str, Any] = {}
    for name in ("create_time", "update_time", "deadline"):
        value = getattr(execution, name)
        if value is not None and value.tzinfo is not UTC:
            fixes[name] = utc(value)
    return msgspec.structs.replace(execution, **fixes) if fixes else execution


def validate_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """Typed copies of ``changes``; ``ValueError`` for an unknown, managed or ill-typed field."""
    checked: dict[str, Any] = {}
    for name, value in changes.items():
        if name not in _FIELD_TYPES:
            raise ValueError(f"unknown execution field {name!r}")
        if name in MANAGED_FIELDS:
            raise ValueError(f"execution field {name!r} is managed by the store")
        try:
            converted = msgspec.convert(value, _FIELD_TYPES[name])
        except msgspec.ValidationError as exc:
            raise ValueError(f"execution field {name!r}: {exc}") from None
        checked[name] = utc(converted) if isinstance(converted, datetime) else converted
    return checked


def _names(states: Iterable[ExecutionState]) -> str:
    order = list(ExecutionState)
    return " or ".join(s.value for s in sorted(states, key=order.index))


def invalid_state(execution: Execution, expected: Iterable[ExecutionState]) -> InvalidStateError:
    """Bacalhau ``ErrInvalidExecutionState``."""
    return InvalidStateError(
        f"execution {execution.id} is in state {execution.state.value} "
        f"but expected {_names(expected)}",
        state=execution.state.value,
        cause=execution.last_cause,
    )


def validate_new(execution: Execution) -> None:
    """Bacalhau ``ValidateNewExecution``: State Created and Version 1."""
    if execution.state != ExecutionState.CREATED:
        err = invalid_state(execution, [ExecutionState.CREATED])
        raise InvalidStateError(f"CreateExecution failure: {err.message}", state=err.state)
    if execution.version != 1:
        raise VersionMismatchError(
            f"CreateExecution failure: execution {execution.id} has version "
            f"{execution.version} but expected 1"
        )


def creation_history(execution: Execution, comment: str) -> HistoryEntry:
    return HistoryEntry(
        execution_id=execution.id,
        previous_state=ExecutionState.UNDEFINED,
        new_state=execution.state,
        new_version=execution.version,
        cause=Cause.ASK_FOR_BID.value,
        requester=execution.requester,
        comment=comment or CREATED_COMMENT,
        time=execution.update_time,
    )


def check_update(current: Execution, request: UpdateRequest) -> None:
    """Bacalhau's checks, in its order: expected state, expected version, terminal."""
    if request.expected_states and current.state not in request.expected_states:
        raise invalid_state(current, request.expected_states)
    if request.expected_version != 0 and current.version != request.expected_version:
        raise VersionMismatchError(
            f"execution {current.id} has version {current.version} "
            f"but expected {request.expected_version}",
            state=current.state.value,
            cause=current.last_cause,
        )
    if current.state in TERMINAL:
        raise InvalidStateError(
            f"execution {current.id} is in terminal state {current.state.value} "
            f"and cannot transition to {request.new_state.value}",
            state=current.state.value,
            cause=current.last_cause,
        )


def apply_update(
    current: Execution, request: UpdateRequest, changes: dict[str, Any], now: datetime
) -> tuple[Execution, HistoryEntry, OutboxRow | None]:
    """Check and apply one update: the execution after it, its history row, its outbox row.

    ``changes`` must come from ``validate_changes``. The update time never goes backwards
    for one execution: a clock stepping back would otherwise reorder its callbacks, which
    are sent by (created_at, seq).
    """
    check_update(current, request)
    now = max(now, current.update_time)
    seq = current.next_seq
    after = msgspec.structs.replace(
        current,
        **changes,
        state=request.new_state,
        version=current.version + 1,
        update_time=now,
        latest_comment=request.comment,
        last_cause=request.cause.value,
        next_seq=seq + 1 if request.callback is not None else seq,
    )
    entry = HistoryEntry(
        execution_id=current.id,
        previous_state=current.state,
        new_state=request.new_state,
        new_version=after.version,
        cause=request.cause.value,
        requester=request.requester,
        comment=request.comment,
        time=now,
    )
    if request.callback is None:
        return after, entry, None
    message = request.callback(after, seq)
    row = OutboxRow(
        execution_id=current.id,
        seq=seq,
        subject=message.subject,
        kind=message.kind,
        body=bytes(message.body),
        headers=dict(message.headers),
        created_at=now,
        link=dict(message.link),
    )
    return after, entry, row


def encode_cursor(update_time: datetime, execution_id: str) -> str:
    """The opaque cursor after (update_time, id): URL-safe base64 of a JSON pair."""
    raw = _encoder.encode((to_us(update_time), execution_id))
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """(update time in µs, execution id) from a cursor; ``ValueError`` when it is not one."""
    if len(cursor) > MAX_CURSOR_LENGTH:
        raise ValueError("invalid cursor: too long")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        update_us, execution_id = _cursor_decoder.decode(raw)
    except (binascii.Error, ValueError) as exc:  # msgspec errors are ValueErrors
        raise ValueError(f"invalid cursor: {exc}") from None
    if not execution_id or update_us < 0:
        raise ValueError("invalid cursor: out of range")
    return update_us, execution_id


def check_limit(limit: int) -> None:
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")


def _copy_row(row: OutboxRow) -> OutboxRow:
    return msgspec.structs.replace(row, headers=dict(row.headers))


class MemoryStore:
    """``ExecutionStore`` in memory: for tests and for a node that keeps nothing on disk.

    Every method runs without awaiting, so each one is atomic on the event loop.
    """

    def __init__(self, *, clock: Clock = utc_now) -> None:
        self._clock = clock
        self._open = False
        self._executions: dict[str, bytes] = {}  # insertion order = creation order
        self._history: dict[str, list[HistoryEntry]] = {}
        self._outbox: dict[str, dict[int, OutboxRow]] = {}
        self._tombstones: dict[str, Tombstone] = {}

    async def open(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False

    def _check_open(self) -> None:
        if not self._open:
            raise StoreUnavailableError("execution store is not open")

    def _load(self, execution_id: str) -> Execution:
        self._check_open()
        data = self._executions.get(execution_id)
        if data is None:
            raise ExecutionNotFound(execution_id)
        return decode_execution(data)

    def _all(self) -> list[Execution]:
        self._check_open()
        return [decode_execution(d) for d in self._executions.values()]

    async def create_execution(self, execution: Execution, *, comment: str = "") -> Execution:
        self._check_open()
        if execution.id in self._executions:
            raise AlreadyExistsError(f"execution already exists: {execution.id}")
        validate_new(execution)
        data = encode_execution(normalize(execution))
        stored = decode_execution(data)
        self._executions[execution.id] = data
        self._history[execution.id] = [creation_history(stored, comment)]
        self._outbox[execution.id] = {}
        return stored

    async def get_execution(self, execution_id: str) -> Execution:
        return self._load(execution_id)

    async def get_executions_for_job(self, job_id: str) -> list[Execution]:
        return [e for e in self._all() if e.job_id == job_id]

    async def find_active(self, requester: str, job_id: str) -> Execution | None:
        active = [
            (to_us(e.update_time), n, e)
            for n, e in enumerate(self._all())
            if e.requester == requester and e.job_id == job_id and e.state not in TERMINAL
        ]
        return max(active, key=lambda t: t[:2])[2] if active else None

    async def get_history(self, execution_id: str) -> list[HistoryEntry]:
        self._check_open()
        return list(self._history.get(execution_id, ()))

    async def update(self, request: UpdateRequest) -> UpdateResult:
        changes = validate_changes(request.changes)
        current = self._load(request.execution_id)
        after, entry, row = apply_update(current, request, changes, utc(self._clock()))
        data = encode_execution(after)  # before any write: a bad value changes nothing
        self._executions[after.id] = data
        self._history[after.id].append(entry)
        if row is not None:
            self._outbox[after.id][row.seq] = row
            row = _copy_row(row)
        return UpdateResult(after, row)

    async def live_executions(self) -> list[Execution]:
        return [e for e in self._all() if e.state not in TERMINAL]

    async def list_executions(self, query: ListQuery) -> tuple[list[Execution], str]:
        check_limit(query.limit)
        after = decode_cursor(query.cursor) if query.cursor else None
        since = to_us(query.updated_since) if query.updated_since is not None else None
        states = frozenset(query.states)
        keyed = sorted(
            ((to_us(e.update_time), e.id), e)
            for e in self._all()
            if e.requester == query.requester
            and (not states or e.state in states)
            and (since is None or to_us(e.update_time) >= since)
        )
        if after is not None:
            keyed = [(k, e) for k, e in keyed if k > after]
        page = [e for _, e in keyed[: query.limit]]
        more = len(keyed) > query.limit
        return page, encode_cursor(page[-1].update_time, page[-1].id) if more else ""

    async def get_callbacks(self, execution_id: str) -> list[OutboxRow]:
        self._check_open()
        rows = self._outbox.get(execution_id, {})
        return [_copy_row(rows[seq]) for seq in sorted(rows)]

    def _undelivered(self) -> list[OutboxRow]:
        self._check_open()
        rows = [r for rows in self._outbox.values() for r in rows.values() if not r.delivered]
        rows.sort(key=lambda r: (to_us(r.created_at), r.seq, r.execution_id))
        return rows

    async def pending_outbox(self, limit: int = 1000) -> list[OutboxRow]:
        check_limit(limit)
        return [_copy_row(r) for r in self._undelivered()[:limit]]

    def _row(self, execution_id: str, seq: int) -> OutboxRow | None:
        self._check_open()
        return self._outbox.get(execution_id, {}).get(seq)

    async def mark_delivered(self, execution_id: str, seq: int) -> None:
        row = self._row(execution_id, seq)
        if row is not None:
            row.delivered, row.parked = True, False

    async def record_attempt(self, execution_id: str, seq: int, error: str, *, park: bool) -> None:
        row = self._row(execution_id, seq)
        if row is not None and not row.delivered:
            row.attempts += 1
            row.last_error = error
            row.parked = row.parked or park

    async def unpark_all(self) -> int:
        parked = [r for r in self._undelivered() if r.parked]
        for row in parked:
            row.parked, row.attempts = False, 0
        return len(parked)

    async def outbox_stats(self) -> OutboxStats:
        rows = self._undelivered()
        return OutboxStats(
            pending=len(rows),
            parked=sum(r.parked for r in rows),
            oldest=min((r.created_at for r in rows), default=None),
        )

    async def get_tombstone(self, execution_id: str) -> Tombstone | None:
        self._check_open()
        return self._tombstones.get(execution_id)

    async def purge(self, terminal_before: datetime, tombstones_before: datetime) -> list[str]:
        cutoff, now = to_us(terminal_before), utc(self._clock())
        doomed = sorted(
            (to_us(e.update_time), e.id, e)
            for e in self._all()
            if e.state in TERMINAL
            and to_us(e.update_time) < cutoff
            and all(r.delivered for r in self._outbox[e.id].values())
        )
        for _, _, e in doomed:
            self._drop(e.id)
            self._tombstones[e.id] = Tombstone(
                id=e.id,
                job_id=e.job_id,
                requester=e.requester,
                state=e.state,
                cause=e.last_cause,
                deleted_at=now,
            )
        keep_after = to_us(tombstones_before)
        for tomb in [t for t in self._tombstones.values() if to_us(t.deleted_at) < keep_after]:
            del self._tombstones[tomb.id]
        return [e.id for _, _, e in doomed]

    def _drop(self, execution_id: str) -> None:
        self._executions.pop(execution_id, None)
        self._history.pop(execution_id, None)
        self._outbox.pop(execution_id, None)

    async def delete_execution(self, execution_id: str) -> None:
        self._check_open()
        self._drop(execution_id)

    async def count(self) -> int:
        self._check_open()
        return len(self._executions)
