"""The rules every execution store shares, so that the stores cannot drift apart.

Bacalhau's checks, the update itself, change validation and the listing cursor are pure
functions: ``MemoryStore`` calls them directly and ``SqliteStore`` inside its transaction
(on the writer connection). Also here: the record codec (msgspec JSON, the form both
stores keep an execution in) and the times in UTC, compared as microseconds since the epoch.
"""

from __future__ import annotations

import base64
import binascii
import types
import typing
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from schemas.compute import ExecutionState
from worker.errors import ExecutionNotFound, InvalidStateError, VersionMismatchError
from worker.states import TERMINAL, Cause
from worker.store.types import Execution, HistoryEntry, OutboxRow, UpdateRequest

Clock = Callable[[], datetime]

CREATED_COMMENT = "Execution created"  # Bacalhau inmemory/store.go
MAX_CURSOR_LENGTH = 512

# Fields only the store writes, and those fixed at creation (the job and its requester:
# the SQLite store copies them into indexed columns once): ``changes`` may not touch them.
MANAGED_FIELDS = frozenset(
    {
        "id",
        "job",
        "requester",
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
# Per field, the plain types msgspec.convert would hand back unchanged (None included when
# the field allows it): a value of exactly one of them skips convert (~1 µs each).
_PLAIN = (type(None), bool, int, float, str, bytes, datetime)


def _as_is(tp: Any) -> frozenset[type]:
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    return frozenset(t for t in (typing.get_args(tp) if union else (tp,)) if t in _PLAIN)


_AS_IS: dict[str, frozenset[type]] = {name: _as_is(tp) for name, tp in _FIELD_TYPES.items()}

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
        if type(value) in _AS_IS[name]:
            converted = value
        else:
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
    """Bacalhau's checks, in its order: expected state, expected version, terminal —
    after the owner check (another requester's execution is as good as unknown)."""
    if request.owner and current.requester != request.owner:
        raise ExecutionNotFound(current.id)
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


def validate_chain(request: UpdateRequest) -> list[dict[str, Any]]:
    """``validate_changes`` of ``request`` and of each move of its ``then`` chain."""
    changes = [validate_changes(request.changes)]
    step = request.then
    while step is not None:
        changes.append(validate_changes(step.changes))
        step = step.then
    return changes


def apply_chain(
    current: Execution, request: UpdateRequest, changes: list[dict[str, Any]], now: datetime
) -> tuple[Execution, list[HistoryEntry], OutboxRow | None, Execution]:
    """``apply_update`` of ``request`` then of each move of its ``then`` chain (``changes``
    from ``validate_chain``): the execution after the last move, one history row per
    move, the chain's outbox row, and the execution after the first move."""
    after, entry, row = apply_update(current, request, changes[0], now)
    first, entries = after, [entry]
    step, i = request.then, 1
    while step is not None:
        after, entry, more = apply_update(after, step, changes[i], now)
        entries.append(entry)
        if more is not None:
            if row is not None:
                raise ValueError("only one move of a chain may carry a callback")
            row = more
        step, i = step.then, i + 1
    return after, entries, row, first


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
