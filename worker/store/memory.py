"""In-memory ExecutionStore: the reference implementation of ``ExecutionStore``.

The pure rules it shares with ``SqliteStore`` (Bacalhau's checks, the update itself, the
listing cursor) live in ``worker.store.common`` and are re-exported here; the contract
suite in ``tests/contract`` runs the same tests against both stores.

Executions are kept encoded (msgspec JSON, as SQLite keeps them), so a caller that mutates
a returned record never changes the stored one, and both stores round-trip alike.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from worker.errors import AlreadyExistsError, ExecutionNotFound, StoreUnavailableError
from worker.states import TERMINAL
from worker.store.common import (
    CREATED_COMMENT,
    MANAGED_FIELDS,
    MAX_CURSOR_LENGTH,
    Clock,
    apply_chain,
    apply_update,
    check_limit,
    check_update,
    creation_history,
    decode_cursor,
    decode_execution,
    encode_cursor,
    encode_execution,
    from_us,
    invalid_state,
    normalize,
    to_us,
    utc,
    utc_now,
    validate_chain,
    validate_changes,
    validate_new,
)
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

__all__ = [
    "CREATED_COMMENT",
    "MANAGED_FIELDS",
    "MAX_CURSOR_LENGTH",
    "Clock",
    "MemoryStore",
    "apply_chain",
    "apply_update",
    "check_limit",
    "check_update",
    "creation_history",
    "decode_cursor",
    "decode_execution",
    "encode_cursor",
    "encode_execution",
    "from_us",
    "invalid_state",
    "normalize",
    "to_us",
    "utc",
    "utc_now",
    "validate_chain",
    "validate_changes",
    "validate_new",
]


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
        changes = validate_chain(request)
        current = self._load(request.execution_id)
        after, entries, row, first = apply_chain(current, request, changes, utc(self._clock()))
        data = encode_execution(after)  # before any write: a bad value changes nothing
        self._executions[after.id] = data
        self._history[after.id].extend(entries)
        if row is not None:
            self._outbox[after.id][row.seq] = row
            row = _copy_row(row)
        return UpdateResult(after, row, None if first is after else first)

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
