"""NodeInfo, the execution view of GetExecution, and log chunks (PROTOCOL.md §2, §4)."""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import Struct

from schemas.callbacks import RunCommandResult
from schemas.compute import ExecutionState
from schemas.job import StorageSpec


class Capacity(Struct, kw_only=True):
    """A resource amount: CPU in cores, Memory and Disk in bytes, whole GPUs."""

    CPU: float = 0.0
    Memory: int = 0
    Disk: int = 0
    GPU: int = 0


class ComputeNodeInfo(Struct, kw_only=True):
    ExecutionEngines: list[str] = msgspec.field(default_factory=list)
    Verifiers: list[str] = msgspec.field(default_factory=list)
    Publishers: list[str] = msgspec.field(default_factory=list)
    StorageSources: list[str] = msgspec.field(default_factory=list)
    MaxCapacity: Capacity = msgspec.field(default_factory=Capacity)
    QueueCapacity: Capacity = msgspec.field(default_factory=Capacity)
    RunningUsedCapacity: Capacity = msgspec.field(default_factory=Capacity)
    QueueUsedCapacity: Capacity = msgspec.field(default_factory=Capacity)
    PendingBidCapacity: Capacity = msgspec.field(default_factory=Capacity)
    AvailableCapacity: Capacity = msgspec.field(default_factory=Capacity)
    MaxJobRequirements: Capacity = msgspec.field(default_factory=Capacity)
    RunningExecutions: int = 0
    EnqueuedExecutions: int = 0
    OutboxPending: int = 0
    OutboxParked: int = 0
    OutboxOldestAgeSeconds: float = 0.0
    DroppedRequests: int = 0


class NodeInfo(Struct, kw_only=True):
    NodeID: str
    InstanceID: str
    NodeType: str = "Compute"
    Version: str = "0.1.0"
    ProtocolVersions: list[str] = msgspec.field(default_factory=lambda: ["v1"])
    Labels: dict[str, str] = msgspec.field(default_factory=dict)
    Draining: bool = False
    ComputeNodeInfo: ComputeNodeInfo = msgspec.field(default_factory=ComputeNodeInfo)


class HistoryEntry(Struct, kw_only=True):
    PreviousState: ExecutionState
    NewState: ExecutionState
    NewVersion: int
    Cause: str
    Comment: str
    Time: str


class CallbackView(Struct, kw_only=True):
    Seq: int
    Kind: str
    Body: dict[str, Any]
    CreatedAt: str
    Delivered: bool


class ExecutionDetail(Struct, kw_only=True):
    ExecutionID: str
    JobID: str
    State: ExecutionState
    ResourceUsage: Capacity
    Version: int
    CreateTime: str
    UpdateTime: str
    LatestComment: str
    RunCommandResult: RunCommandResult | None = None
    ResultProposal: bytes | None = None
    PublishResult: StorageSpec | None = None


class ExecutionView(Struct, kw_only=True):
    Execution: ExecutionDetail
    History: list[HistoryEntry]
    Callbacks: list[CallbackView]


class LogChunk(Struct, kw_only=True, omit_defaults=True):
    Stream: str = ""
    Offset: int = 0
    Data: str = ""
    EOF: bool = False
    ExitCode: int | None = None
