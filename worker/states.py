"""Execution states and the ONE transition table (PROTOCOL.md §5).

```
              AskForBid
                 │
                 ▼
             Created ──BidRejected/BidExpired/Cancel──► Cancelled
                 │ BidAccepted
                 ▼
            BidAccepted ──QueueTimeout──► Failed          (any of BidAccepted … Publishing
                 │ RunStarted                              ──Cancel──► Cancelled + CancelResult)
                 ▼
              Running ──RunTimeout/EngineError/NodeRestart/NodeShutdown──► Failed
                 │ RunCompleted (RunResult)
                 ▼
       WaitingVerification ──ResultRejected──► Failed (no callback)
                 │        ──VerificationExpired──► Failed
                 │ ResultAccepted
                 ▼
          ResultAccepted ──PublishStarted──► Publishing ──PublishCompleted──► Completed
                                                  │                        (PublishResult)
                                                  └──PublishError──► Failed
```

Every move is a (Cause, from-state) pair; nothing else in the code decides legality.
Failures carry a ComputeError callback, except ResultRejected which the requester's own
reply confirms.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from schemas.callbacks import CallbackKind
from schemas.compute import ExecutionState

S = ExecutionState


class Cause(StrEnum):
    """Why an execution moved (stored in every history row)."""

    ASK_FOR_BID = "AskForBid"
    BID_ACCEPTED = "BidAccepted"
    BID_REJECTED = "BidRejected"
    BID_EXPIRED = "BidExpired"
    QUEUE_TIMEOUT = "QueueTimeout"
    RUN_STARTED = "RunStarted"
    RUN_COMPLETED = "RunCompleted"
    RUN_TIMEOUT = "RunTimeout"
    ENGINE_ERROR = "EngineError"
    RESULT_ACCEPTED = "ResultAccepted"
    RESULT_REJECTED = "ResultRejected"
    VERIFICATION_EXPIRED = "VerificationExpired"
    PUBLISH_STARTED = "PublishStarted"
    PUBLISH_COMPLETED = "PublishCompleted"
    PUBLISH_ERROR = "PublishError"
    CANCEL = "Cancel"
    NODE_RESTART = "NodeRestart"
    NODE_SHUTDOWN = "NodeShutdown"


TERMINAL: frozenset[ExecutionState] = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})
EXECUTING: frozenset[ExecutionState] = frozenset(
    {S.RUNNING, S.WAITING_VERIFICATION, S.RESULT_ACCEPTED, S.PUBLISHING}
)
ACTIVE: frozenset[ExecutionState] = frozenset({S.CREATED, S.BID_ACCEPTED}) | EXECUTING


@dataclass(frozen=True, slots=True)
class Transition:
    cause: Cause
    sources: frozenset[ExecutionState]
    target: ExecutionState
    callback: CallbackKind | None


def _t(
    cause: Cause, sources: set[ExecutionState], target: ExecutionState, cb: CallbackKind | None
) -> Transition:
    return Transition(cause, frozenset(sources), target, cb)


_FAIL = CallbackKind.COMPUTE_FAILURE
TRANSITIONS: tuple[Transition, ...] = (
    _t(Cause.ASK_FOR_BID, {S.UNDEFINED}, S.CREATED, None),
    _t(Cause.BID_ACCEPTED, {S.CREATED}, S.BID_ACCEPTED, None),
    _t(Cause.BID_REJECTED, {S.CREATED}, S.CANCELLED, None),
    _t(Cause.BID_EXPIRED, {S.CREATED}, S.CANCELLED, None),
    _t(Cause.QUEUE_TIMEOUT, {S.BID_ACCEPTED}, S.FAILED, _FAIL),
    _t(Cause.RUN_STARTED, {S.BID_ACCEPTED}, S.RUNNING, None),
    _t(Cause.RUN_COMPLETED, {S.RUNNING}, S.WAITING_VERIFICATION, CallbackKind.RUN_COMPLETE),
    _t(Cause.RUN_TIMEOUT, {S.RUNNING}, S.FAILED, _FAIL),
    _t(Cause.ENGINE_ERROR, {S.RUNNING}, S.FAILED, _FAIL),
    _t(Cause.RESULT_ACCEPTED, {S.WAITING_VERIFICATION}, S.RESULT_ACCEPTED, None),
    _t(Cause.RESULT_REJECTED, {S.WAITING_VERIFICATION}, S.FAILED, None),
    _t(Cause.VERIFICATION_EXPIRED, {S.WAITING_VERIFICATION}, S.FAILED, _FAIL),
    _t(Cause.PUBLISH_STARTED, {S.RESULT_ACCEPTED}, S.PUBLISHING, None),
    _t(Cause.PUBLISH_COMPLETED, {S.PUBLISHING}, S.COMPLETED, CallbackKind.PUBLISH_COMPLETE),
    _t(Cause.PUBLISH_ERROR, {S.PUBLISHING}, S.FAILED, _FAIL),
    _t(Cause.CANCEL, {S.CREATED}, S.CANCELLED, None),
    _t(Cause.CANCEL, set(EXECUTING) | {S.BID_ACCEPTED}, S.CANCELLED, CallbackKind.CANCEL_COMPLETE),
    _t(Cause.NODE_RESTART, {S.RUNNING}, S.FAILED, _FAIL),
    _t(Cause.NODE_SHUTDOWN, {S.RUNNING}, S.FAILED, _FAIL),
)

_INDEX: dict[tuple[Cause, ExecutionState], Transition] = {
    (t.cause, src): t for t in TRANSITIONS for src in t.sources
}


def transition(cause: Cause, current: ExecutionState) -> Transition | None:
    """The legal move for ``cause`` from ``current``, or None when the table forbids it."""
    return _INDEX.get((cause, current))


def _moves_of(cause: Cause) -> list[Transition]:
    return [t for t in TRANSITIONS if t.cause is cause]


# Looked up once per request: read from the table once, here.
_SINGLE: dict[Cause, Transition | None] = {
    c: moves[0] if len(moves := _moves_of(c)) == 1 else None for c in Cause
}
_SOURCES: dict[Cause, frozenset[ExecutionState]] = {
    c: frozenset(src for t in _moves_of(c) for src in t.sources) for c in Cause
}


def single_move(cause: Cause) -> Transition | None:
    """The move of ``cause`` when it does not depend on the current state (every cause
    but Cancel), so it can be applied by one compare-and-set on its sources."""
    return _SINGLE[cause]


def sources_of(cause: Cause) -> frozenset[ExecutionState]:
    """Every state from which ``cause`` may move an execution."""
    return _SOURCES[cause]


def is_terminal(state: ExecutionState) -> bool:
    return state in TERMINAL
