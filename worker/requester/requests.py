"""The protocol's requests to one node (PROTOCOL.md §2–§6), the base of ``Requester``.

Each is one NATS request on ``<p>.compute.<node>.<requester>.<Method>/v1`` with an
explicit timeout, a PRODUCER span and W3C trace context in its headers; an error reply
raises :class:`~worker.requester.errors.RequestFailed`.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from typing import TypeVar

import msgspec
from msgspec import Struct
from nats.aio.client import Client
from opentelemetry import trace
from opentelemetry.propagate import inject

from schemas.compute import (
    ID_PATTERN,
    AskForBidRequest,
    AskForBidResponse,
    BidAcceptedRequest,
    BidRejectedRequest,
    CancelExecutionRequest,
    ExecutionResponse,
    ExecutionState,
    ExecutionSummary,
    GetExecutionRequest,
    ListExecutionsRequest,
    ListExecutionsResponse,
    ResultAcceptedRequest,
    ResultRejectedRequest,
)
from schemas.job import Job
from schemas.node import ExecutionView, NodeInfo
from worker.requester.errors import RequestFailed, decode_reply

__all__ = ["NodeRequests"]

T = TypeVar("T")

_ID = re.compile(ID_PATTERN)


def _rfc3339(value: datetime | str | None) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _check_id(kind: str, value: str) -> str:
    if not _ID.match(value):
        raise ValueError(f"invalid {kind} {value!r}")
    return value


class NodeRequests:
    """One requester's requests to single nodes; ``Requester`` adds fan-out and callbacks."""

    def __init__(
        self,
        *,
        nc: Client,
        requester_id: str,
        prefix: str = "market",
        timeout: float = 5.0,
        tracer: trace.Tracer | None = None,
    ) -> None:
        if not prefix or any(not t or re.search(r"[\s*>]", t) for t in prefix.split(".")):
            raise ValueError(f"invalid subject prefix {prefix!r}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.requester_id = _check_id("requester ID", requester_id)
        self.prefix = prefix
        self.timeout = timeout
        self._nc = nc
        self._tracer = tracer or trace.get_tracer("worker.requester")

    def _subject(self, node_id: str, method: str) -> str:
        node = _check_id("node ID", node_id)
        return f"{self.prefix}.compute.{node}.{self.requester_id}.{method}/v1"

    def _trace_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        inject(headers)
        return headers

    async def _request(
        self,
        node_id: str,
        method: str,
        body: bytes,
        rtype: type[T],
        *,
        timeout: float | None = None,
        execution_id: str = "",
    ) -> T:
        subject = self._subject(node_id, method)
        attributes = {
            "messaging.system": "nats",
            "messaging.destination.name": subject,
            "node.id": node_id,
        }
        if execution_id:
            attributes["execution.id"] = execution_id
        with self._tracer.start_as_current_span(
            f"{subject} publish", kind=trace.SpanKind.PRODUCER, attributes=attributes
        ):
            msg = await self._nc.request(
                subject,
                body,
                timeout=self.timeout if timeout is None else timeout,
                headers=self._trace_headers(),
            )
            return decode_reply(msg, rtype, node_id)

    async def _operate(
        self, node_id: str, method: str, request: Struct, execution_id: str
    ) -> ExecutionResponse:
        body = msgspec.json.encode(request)
        return await self._request(
            node_id, method, body, ExecutionResponse, execution_id=execution_id
        )

    async def ask(
        self, node_id: str, job: Job, *, timeout: float | None = None
    ) -> AskForBidResponse:
        """Ask one node for a bid."""
        body = msgspec.json.encode(
            AskForBidRequest(SourcePeerID=self.requester_id, TargetPeerID=node_id, Job=job)
        )
        return await self._request(node_id, "AskForBid", body, AskForBidResponse, timeout=timeout)

    async def accept(
        self, node_id: str, execution_id: str, justification: str = ""
    ) -> ExecutionResponse:
        request = BidAcceptedRequest(
            SourcePeerID=self.requester_id,
            TargetPeerID=node_id,
            ExecutionID=execution_id,
            Accepted=True,
            Justification=justification,
        )
        return await self._operate(node_id, "BidAccepted", request, execution_id)

    async def reject(
        self, node_id: str, execution_id: str, justification: str = ""
    ) -> ExecutionResponse:
        request = BidRejectedRequest(
            SourcePeerID=self.requester_id,
            TargetPeerID=node_id,
            ExecutionID=execution_id,
            Justification=justification,
        )
        return await self._operate(node_id, "BidRejected", request, execution_id)

    async def accept_result(self, node_id: str, execution_id: str) -> ExecutionResponse:
        request = ResultAcceptedRequest(
            SourcePeerID=self.requester_id, TargetPeerID=node_id, ExecutionID=execution_id
        )
        return await self._operate(node_id, "ResultAccepted", request, execution_id)

    async def reject_result(
        self, node_id: str, execution_id: str, justification: str = ""
    ) -> ExecutionResponse:
        request = ResultRejectedRequest(
            SourcePeerID=self.requester_id,
            TargetPeerID=node_id,
            ExecutionID=execution_id,
            Justification=justification,
        )
        return await self._operate(node_id, "ResultRejected", request, execution_id)

    async def cancel(
        self, node_id: str, execution_id: str, justification: str = ""
    ) -> ExecutionResponse:
        request = CancelExecutionRequest(
            SourcePeerID=self.requester_id,
            TargetPeerID=node_id,
            ExecutionID=execution_id,
            Justification=justification,
        )
        return await self._operate(node_id, "CancelExecution", request, execution_id)

    async def get_execution(self, node_id: str, execution_id: str) -> ExecutionView:
        body = msgspec.json.encode(
            GetExecutionRequest(SourcePeerID=self.requester_id, ExecutionID=execution_id)
        )
        return await self._request(
            node_id, "GetExecution", body, ExecutionView, execution_id=execution_id
        )

    async def list_executions(
        self,
        node_id: str,
        *,
        updated_since: datetime | str | None = None,
        states: Iterable[ExecutionState | str] = (),
        limit: int = 0,
    ) -> AsyncIterator[ExecutionSummary]:
        """This requester's executions on ``node_id``, following ``Next`` page cursors."""
        request = ListExecutionsRequest(
            SourcePeerID=self.requester_id,
            UpdatedSince=_rfc3339(updated_since),
            States=[ExecutionState(s) for s in states],
            Limit=limit,
        )
        cursors: set[str] = set()
        while True:
            body = msgspec.json.encode(request)
            page = await self._request(node_id, "ListExecutions", body, ListExecutionsResponse)
            for summary in page.Executions:
                yield summary
            if not page.Next:
                return
            if page.Next in cursors:
                raise RequestFailed(500, f"cursor {page.Next!r} repeats", node_id=node_id)
            cursors.add(page.Next)
            request = msgspec.structs.replace(request, Cursor=page.Next)

    async def reconcile(self, node_id: str) -> dict[str, ExecutionState]:
        """The state of each of this requester's executions on ``node_id`` (ListExecutions)."""
        return {e.ExecutionID: e.State async for e in self.list_executions(node_id)}

    async def node_info(self, node_id: str) -> NodeInfo:
        return await self._request(node_id, "NodeInfo", b"", NodeInfo)
