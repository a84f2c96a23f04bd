"""Requests and replies of the compute endpoint (PROTOCOL.md §2–§5).

``RoutingMetadata`` and ``ExecutionMetadata`` are flattened into each message, as Go
embedding does. Required fields (``*`` in PROTOCOL.md §4) have no default; IDs carry
the subject-token pattern so a bad ID is a 400 before anything is looked up.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from schemas.job import Job

# A whole-string match that also refuses a trailing newline (``$`` would accept it).
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}(?![\s\S])"
PeerID = Annotated[str, Meta(pattern=ID_PATTERN)]
ExecutionID = Annotated[str, Meta(pattern=ID_PATTERN)]
OptionalPeerID = Annotated[str, Meta(pattern=r"^(|[A-Za-z0-9][A-Za-z0-9_-]{0,127})(?![\s\S])")]


class ExecutionState(StrEnum):
    """Execution states on the wire (Bacalhau ``store.ExecutionState.String()``)."""

    UNDEFINED = "Undefined"
    CREATED = "Created"
    BID_ACCEPTED = "BidAccepted"
    RUNNING = "Running"
    WAITING_VERIFICATION = "WaitingVerification"
    RESULT_ACCEPTED = "ResultAccepted"
    PUBLISHING = "Publishing"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


class AskForBidRequest(Struct, kw_only=True):
    SourcePeerID: PeerID
    TargetPeerID: OptionalPeerID = ""
    Job: Job


class Price(Struct, kw_only=True):
    Amount: float
    Unit: str


class AskForBidResponse(Struct, kw_only=True):
    ExecutionID: str = ""
    JobID: str = ""
    Accepted: bool = False
    Reason: str = ""
    NodeID: str = ""
    Retryable: bool = False
    BidTTLSeconds: float = 0.0
    Price: Price | UnsetType = UNSET
    EstimatedStartSeconds: float | UnsetType = UNSET


class BidAcceptedRequest(Struct, kw_only=True):
    SourcePeerID: PeerID
    TargetPeerID: OptionalPeerID = ""
    ExecutionID: ExecutionID
    Accepted: Any = None  # ignored, as in Bacalhau
    Justification: str = ""


class BidRejectedRequest(Struct, kw_only=True):
    SourcePeerID: PeerID
    TargetPeerID: OptionalPeerID = ""
    ExecutionID: ExecutionID
    Justification: str = ""


class ResultAcceptedRequest(Struct, kw_only=True):
    SourcePeerID: PeerID
    TargetPeerID: OptionalPeerID = ""
    ExecutionID: ExecutionID


class ResultRejectedRequest(Struct, kw_only=True):
    SourcePeerID: PeerID
    TargetPeerID: OptionalPeerID = ""
    ExecutionID: ExecutionID
    Justification: str = ""


class CancelExecutionRequest(Struct, kw_only=True):
    SourcePeerID: PeerID
    TargetPeerID: OptionalPeerID = ""
    ExecutionID: ExecutionID
    Justification: str = ""


class ExecutionResponse(Struct, kw_only=True):
    ExecutionID: str
    JobID: str
    State: ExecutionState


class GetExecutionRequest(Struct, kw_only=True):
    SourcePeerID: PeerID
    ExecutionID: ExecutionID


class ListExecutionsRequest(Struct, kw_only=True):
    SourcePeerID: PeerID
    UpdatedSince: str = ""  # RFC 3339; empty = from the beginning
    States: list[ExecutionState] = msgspec.field(default_factory=list)
    Limit: Annotated[int, Meta(ge=0, le=10_000)] = 0  # 0 = the node's default page size
    Cursor: Annotated[str, Meta(max_length=512)] = ""


class ExecutionLogsRequest(Struct, kw_only=True):
    SourcePeerID: PeerID
    ExecutionID: ExecutionID
    Follow: bool = False
    TailBytes: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None


class ExecutionLogsResponse(Struct, kw_only=True):
    Subject: str


class ExecutionSummary(Struct, kw_only=True):
    ExecutionID: str
    JobID: str
    State: ExecutionState


class ListExecutionsResponse(Struct, kw_only=True):
    Executions: list[ExecutionSummary]
    Next: str = ""


class ErrorBody(Struct, kw_only=True):
    """The body of every error reply (PROTOCOL.md §3)."""

    Error: str
    Code: int
    NodeID: str = ""
    State: str = ""
    Cause: str = ""
