"""The read side of the endpoint: GetExecution's view and ListExecutions' pages."""

from __future__ import annotations

from schemas.codec import DecodeError, decode, format_time, parse_time
from schemas.compute import ExecutionSummary, ListExecutionsRequest, ListExecutionsResponse
from schemas.node import CallbackView, Capacity, ExecutionDetail, ExecutionView, HistoryEntry
from worker.errors import RequestError
from worker.store.types import Execution, ExecutionStore, ListQuery


def _capacity(execution: Execution) -> Capacity:
    u = execution.usage
    return Capacity(CPU=u.CPU, Memory=u.Memory, Disk=u.Disk, GPU=u.GPU)


async def execution_view(store: ExecutionStore, execution: Execution) -> ExecutionView:
    """The execution with its history and stored callbacks (PROTOCOL.md §4)."""
    history = await store.get_history(execution.id)
    callbacks = await store.get_callbacks(execution.id)
    return ExecutionView(
        Execution=ExecutionDetail(
            ExecutionID=execution.id,
            JobID=execution.job_id,
            State=execution.state,
            ResourceUsage=_capacity(execution),
            Version=execution.version,
            CreateTime=format_time(execution.create_time),
            UpdateTime=format_time(execution.update_time),
            LatestComment=execution.latest_comment,
            RunCommandResult=execution.run_result,
            ResultProposal=execution.proposal,
            PublishResult=execution.publish_result,
        ),
        History=[
            HistoryEntry(
                PreviousState=h.previous_state,
                NewState=h.new_state,
                NewVersion=h.new_version,
                Cause=h.cause,
                Comment=h.comment,
                Time=format_time(h.time),
            )
            for h in history
        ],
        Callbacks=[
            CallbackView(
                Seq=row.seq,
                Kind=row.kind,
                Body=decode(row.body, dict),
                CreatedAt=format_time(row.created_at),
                Delivered=row.delivered,
            )
            for row in callbacks
        ],
    )


async def list_executions(
    store: ExecutionStore, request: ListExecutionsRequest, default_page: int
) -> ListExecutionsResponse:
    """One page of the requester's executions, and the cursor of the next."""
    since = None
    if request.UpdatedSince:
        try:
            since = parse_time(request.UpdatedSince)
        except DecodeError as exc:
            raise RequestError(f"UpdatedSince: {exc.message}") from exc
    query = ListQuery(
        requester=request.SourcePeerID,
        updated_since=since,
        states=tuple(request.States),
        limit=request.Limit or default_page,
        cursor=request.Cursor,
    )
    try:
        executions, cursor = await store.list_executions(query)
    except ValueError as exc:
        raise RequestError(f"bad Cursor: {exc}") from exc
    return ListExecutionsResponse(
        Executions=[
            ExecutionSummary(ExecutionID=e.id, JobID=e.job_id, State=e.state) for e in executions
        ],
        Next=cursor,
    )
