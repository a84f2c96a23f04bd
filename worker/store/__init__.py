"""The execution store: the ``ExecutionStore`` protocol and its two implementations."""

from worker.store.memory import MemoryStore
from worker.store.sqlite import SqliteStore
from worker.store.types import (
    Execution,
    ExecutionStore,
    HistoryEntry,
    ListQuery,
    OutboxMessage,
    OutboxRow,
    OutboxStats,
    Tombstone,
    UpdateRequest,
    UpdateResult,
)

__all__ = [
    "Execution",
    "ExecutionStore",
    "HistoryEntry",
    "ListQuery",
    "MemoryStore",
    "OutboxMessage",
    "OutboxRow",
    "OutboxStats",
    "SqliteStore",
    "Tombstone",
    "UpdateRequest",
    "UpdateResult",
]
