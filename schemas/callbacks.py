"""Callbacks the node sends to the requester (PROTOCOL.md §4, §6).

In every callback ``SourcePeerID`` is the node and ``TargetPeerID`` the requester.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec
from msgspec import Struct

from schemas.job import StorageSpec


class CallbackKind(StrEnum):
    """The method token of a callback subject."""

    RUN_COMPLETE = "OnRunComplete"
    PUBLISH_COMPLETE = "OnPublishComplete"
    CANCEL_COMPLETE = "OnCancelComplete"
    COMPUTE_FAILURE = "OnComputeFailure"


class RunCommandResult(Struct, kw_only=True):
    stdout: str = ""
    stdouttruncated: bool = False
    stderr: str = ""
    stderrtruncated: bool = False
    exitCode: int = 0
    runnerError: str = ""


class Usage(Struct, kw_only=True):
    WallSeconds: float = 0.0
    CPUSeconds: float = 0.0
    PeakMemoryBytes: int = 0


class RunResult(Struct, kw_only=True):
    SourcePeerID: str
    TargetPeerID: str
    ExecutionID: str
    JobID: str
    Seq: int
    ResultProposal: bytes = b""
    RunCommandResult: RunCommandResult | None = None
    VerificationTTLSeconds: float = 0.0
    Usage: Usage = msgspec.field(default_factory=Usage)


class PublishResult(Struct, kw_only=True):
    SourcePeerID: str
    TargetPeerID: str
    ExecutionID: str
    JobID: str
    Seq: int
    PublishResult: StorageSpec = msgspec.field(default_factory=StorageSpec)


class CancelResult(Struct, kw_only=True):
    SourcePeerID: str
    TargetPeerID: str
    ExecutionID: str
    JobID: str
    Seq: int


class ComputeError(Struct, kw_only=True):
    SourcePeerID: str
    TargetPeerID: str
    ExecutionID: str
    JobID: str
    Seq: int
    Err: str
    Cause: str


Callback = RunResult | PublishResult | CancelResult | ComputeError

KIND_OF: dict[type[Struct], CallbackKind] = {
    RunResult: CallbackKind.RUN_COMPLETE,
    PublishResult: CallbackKind.PUBLISH_COMPLETE,
    CancelResult: CallbackKind.CANCEL_COMPLETE,
    ComputeError: CallbackKind.COMPUTE_FAILURE,
}
