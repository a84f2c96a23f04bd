"""The error tree of the node; each error maps to a reply code of PROTOCOL.md §3.

```
WorkerError (500)
├── RequestError (400)            bad JSON, types, IDs, sizes, unknown enums
├── NotFoundError (404)           unknown execution, another requester's, unknown method
├── ConflictError (409)           the state machine forbids the operation (State, Cause)
├── StoreError (500)
│   ├── StoreUnavailableError (503)   disk full, database locked
│   ├── ExecutionNotFound (404)
│   ├── InvalidStateError (409)       compare-and-set lost on state
│   ├── VersionMismatchError (409)    compare-and-set lost on version
│   └── AlreadyExistsError (409)
├── EngineError (500)             the run failed (not a non-zero exit)
└── PublishError (500)
```
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of every error the node raises on purpose."""

    code = 500

    def __init__(self, message: str, *, state: str = "", cause: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.state = state
        self.cause = cause


class RequestError(WorkerError):
    code = 400


class NotFoundError(WorkerError):
    code = 404


class ConflictError(WorkerError):
    code = 409


class StoreError(WorkerError):
    code = 500


class StoreUnavailableError(StoreError):
    code = 503


class ExecutionNotFound(StoreError):
    code = 404

    def __init__(self, execution_id: str) -> None:
        super().__init__(f"execution not found: {execution_id}")
        self.execution_id = execution_id


class InvalidStateError(StoreError):
    code = 409


class VersionMismatchError(StoreError):
    code = 409


class AlreadyExistsError(StoreError):
    code = 409


class EngineError(WorkerError):
    code = 500


class PublishError(WorkerError):
    code = 500
