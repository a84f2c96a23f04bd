"""A requester client of the compute node protocol (PROTOCOL.md §2–§6).

Used by the CLI and the tests. One :class:`Requester` per requester ID and connection:

```
start() ──► subscribe <p>.info.*                 (which nodes are up, for fan-out)
        └─► subscribe <p>.orchestrator.<r>.>     (callbacks: core sub, or an ordered
                                                  JetStream consumer on CALLBACKS_<p>)
place(job) ──► fan_out ──► choose ──► accept ──► reject the others (late bids too)
run_to_completion ──► wait RunResult ──► ResultAccepted ──► wait Publish/Failure/Cancel
```

Every request has an explicit timeout and carries W3C trace context, so a span the
caller opens around ``place`` and ``run_to_completion`` covers the whole job (§8).
Callbacks are checked (node token = ``SourcePeerID``), deduplicated by ``Nats-Msg-Id``
and queued per execution; in core mode they can be lost, so ``reconcile`` asks the node.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, TypeVar

import msgspec
from msgspec import Struct
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import ConsumerConfig, DeliverPolicy
from opentelemetry import trace
from opentelemetry.propagate import inject

from schemas.callbacks import (
    KIND_OF,
    Callback,
    CallbackKind,
    CancelResult,
    ComputeError,
    PublishResult,
    RunResult,
)
from schemas.codec import DecodeError, decode
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
from worker.connection import flush_subscriptions

__all__ = [
    "Bids",
    "Placement",
    "PlacementError",
    "RequestFailed",
    "Requester",
    "first_bid",
    "flush_subscriptions",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

INFO_INTERVAL = 30.0
SEEN_WINDOW = 3 * INFO_INTERVAL  # a node counts as up if seen within three info intervals
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
ERROR_HEADER = "Nats-Service-Error"
NODE_HEADER = "Compute-Node-ID"
MSG_ID_HEADER = "Nats-Msg-Id"
STATUS_HEADER = "Status"  # nats-py's key for a server status message (no responders)
DEDUP_MEMORY = 65_536  # Nats-Msg-Ids remembered (oldest forgotten first)

_ID = re.compile(ID_PATTERN)
_CALLBACK_TYPES: dict[str, type[Callback]] = {
    CallbackKind.RUN_COMPLETE: RunResult,
    CallbackKind.PUBLISH_COMPLETE: PublishResult,
    CallbackKind.CANCEL_COMPLETE: CancelResult,
    CallbackKind.COMPUTE_FAILURE: ComputeError,
}
TERMINAL_KINDS = frozenset(
    {CallbackKind.PUBLISH_COMPLETE, CallbackKind.COMPUTE_FAILURE, CallbackKind.CANCEL_COMPLETE}
)
_AFTER_ACCEPT = frozenset({CallbackKind.RUN_COMPLETE, *TERMINAL_KINDS})

Chooser = Callable[[Sequence[AskForBidResponse]], AskForBidResponse | None]


class RequestFailed(Exception):
    """The node answered with an error reply (§3), or with a body of the wrong type (500)."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        state: str = "",
        cause: str = "",
        node_id: str = "",
    ) -> None:
        super().__init__(f"{code} {message}" + (f" (node {node_id})" if node_id else ""))
        self.code = code
        self.message = message
        self.state = state
        self.cause = cause
        self.node_id = node_id


class PlacementError(Exception):
    """``place`` could not get any bid accepted (or could not settle a lost accept)."""

    def __init__(self, message: str, *, bids: Sequence[AskForBidResponse] = ()) -> None:
        super().__init__(message)
        self.bids = list(bids)


class Bids(list[AskForBidResponse]):
    """Fan-out replies, one per node in arrival order; error replies kept in ``errors``.

    ``duplicates`` holds further answers from a node that had already answered.
    """

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[RequestFailed] = []
        self.duplicates: list[AskForBidResponse] = []


@dataclass
class Placement:
    """The bid ``place`` got accepted, with everything the fan-out collected."""

    node_id: str
    execution_id: str
    job_id: str
    bid: AskForBidResponse
    response: ExecutionResponse
    bids: Bids
    errors: list[BaseException] = field(default_factory=list)


class _ErrorReply(Struct):
    """The error body, read leniently: every field may be missing."""

    Error: str = ""
    Code: int = 0
    NodeID: str = ""
    State: str = ""
    Cause: str = ""


def first_bid(bids: Sequence[AskForBidResponse]) -> AskForBidResponse | None:
    """Default chooser: the bid with the lowest EstimatedStartSeconds, then the earliest."""
    offers = [b for b in bids if b.Accepted and b.ExecutionID]
    return min(offers, key=_start_estimate, default=None)


def _start_estimate(bid: AskForBidResponse) -> float:
    est = bid.EstimatedStartSeconds
    return 0.0 if isinstance(est, msgspec.UnsetType) else est


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


def _error_from(msg: Msg, node_id: str) -> RequestFailed:
    headers = msg.headers or {}
    try:
        code = int(headers.get(ERROR_CODE_HEADER, "500"))
    except ValueError:
        code = 500
    try:
        body = decode(msg.data, _ErrorReply)
    except DecodeError:
        body = _ErrorReply()
    return RequestFailed(
        code,
        headers.get(ERROR_HEADER) or body.Error,
        state=body.State,
        cause=body.Cause,
        node_id=body.NodeID or headers.get(NODE_HEADER) or node_id,
    )


def _decode_reply(msg: Msg, rtype: type[T], node_id: str) -> T:
    """The reply's body as ``rtype``; raise RequestFailed for an error reply or a bad body."""
    if ERROR_CODE_HEADER in (msg.headers or {}):
        raise _error_from(msg, node_id)
    try:
        return decode(msg.data, rtype)
    except DecodeError as exc:
        name = getattr(rtype, "__name__", str(rtype))
        raise RequestFailed(500, f"reply is not a {name}: {exc}", node_id=node_id) from exc


class _FanOut:
    """One fan-out: the inbox subscription and what has arrived on it."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Msg | None] = asyncio.Queue()
        self.sub: Subscription | None = None
        self.bids = Bids()
        self.answered: set[str] = set()
        self.handled: set[str] = set()  # execution IDs accepted, rejected or cancelled
        self.no_responders = False

    async def put(self, msg: Msg) -> None:
        self.queue.put_nowait(msg)

    def take(self, msg: Msg) -> None:
        """File one reply: a bid or decline per node, an error, or a duplicate."""
        headers = msg.headers or {}
        node = headers.get(NODE_HEADER, "")
        if STATUS_HEADER in headers:  # from the server: 503 = no node subscribed at all
            self.no_responders |= headers[STATUS_HEADER] == "503"
            return
        if ERROR_CODE_HEADER in headers:
            err = _error_from(msg, node)
            self.bids.errors.append(err)
            self.answered.add(err.node_id)
            return
        try:
            bid = decode(msg.data, AskForBidResponse)
        except DecodeError as exc:
            self.bids.errors.append(RequestFailed(500, f"bad fan-out reply: {exc}", node_id=node))
            self.answered.add(node)
            return
        node = bid.NodeID or node
        if node in self.answered:
            self.bids.duplicates.append(bid)
            return
        self.answered.add(node)
        self.bids.append(bid)

    async def close(self) -> None:
        if self.sub is not None:
            sub, self.sub = self.sub, None
            try:
                await sub.unsubscribe()
            except NatsError as exc:  # the connection is closed: nothing to undo
                log.debug("unsubscribe failed: %s", exc)


class Requester:
    """A requester: asks nodes for bids, places jobs, follows their callbacks."""

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
        self.dropped_callbacks = 0
        self.duplicate_callbacks = 0
        self._nc = nc
        self._tracer = tracer or trace.get_tracer(__name__)
        self._subs: list[Subscription] = []
        self._nodes: dict[str, tuple[float, NodeInfo]] = {}
        self._pending: dict[str, deque[Callback]] = {}
        self._received: dict[str, list[Callback]] = {}
        self._msg_ids: OrderedDict[str, None] = OrderedDict()
        self._arrived = asyncio.Condition()
        self._lingering: dict[asyncio.Task[None], _FanOut] = {}

    # -- subjects ---------------------------------------------------------------------------

    @property
    def callback_subject(self) -> str:
        return f"{self.prefix}.orchestrator.{self.requester_id}.>"

    @property
    def callback_stream(self) -> str:
        return "CALLBACKS_" + self.prefix.replace(".", "_")

    def _subject(self, node_id: str, method: str) -> str:
        node = _check_id("node ID", node_id)
        return f"{self.prefix}.compute.{node}.{self.requester_id}.{method}/v1"

    # -- lifecycle --------------------------------------------------------------------------

    async def start(
        self,
        callbacks: Literal["core", "jetstream"] = "core",
        *,
        since: datetime | None = None,
    ) -> None:
        """Subscribe node info and callbacks.

        ``jetstream`` reads callbacks through an ordered ephemeral consumer on the callback
        stream, from the first one it retains (or from ``since``), so none is lost while
        this requester was away; ``core`` is a plain subscription (at most once).
        """
        if self._subs:
            raise RuntimeError("requester already started")
        if callbacks not in ("core", "jetstream"):
            raise ValueError(f"unknown callback mode {callbacks!r}")
        self._subs.append(await self._nc.subscribe(f"{self.prefix}.info.*", cb=self._on_info))
        if callbacks == "core":
            self._subs.append(await self._nc.subscribe(self.callback_subject, cb=self._on_callback))
        else:
            config = ConsumerConfig(opt_start_time=since) if since else None
            self._subs.append(
                await self._nc.jetstream(timeout=self.timeout).subscribe(
                    self.callback_subject,
                    stream=self.callback_stream,
                    cb=self._on_callback,
                    ordered_consumer=True,
                    config=config,
                    deliver_policy=DeliverPolicy.BY_START_TIME if since else DeliverPolicy.ALL,
                )
            )
        await flush_subscriptions(self._nc, self.timeout)

    async def close(self) -> None:
        """Stop: finish rejecting late bids already received, then unsubscribe everything."""
        for fan in self._lingering.values():
            fan.queue.put_nowait(None)  # stop lingering now, after the replies already queued
        if self._lingering:
            await asyncio.gather(*self._lingering, return_exceptions=True)
        subs, self._subs = self._subs, []
        for sub in subs:
            try:
                await sub.unsubscribe()
            except NatsError as exc:  # a closed connection: nothing left to undo
                log.debug("unsubscribe failed: %s", exc)

    # -- node info --------------------------------------------------------------------------

    async def _on_info(self, msg: Msg) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        try:
            info = decode(msg.data, NodeInfo)
        except DecodeError:
            return
        if info.NodeID == token:
            self._nodes[token] = (time.monotonic(), info)

    def seen_nodes(self, within: float = SEEN_WINDOW) -> set[str]:
        """Nodes that published NodeInfo within the last ``within`` seconds."""
        now = time.monotonic()
        return {n for n, (at, _) in self._nodes.items() if now - at <= within}

    def node_infos(self) -> dict[str, NodeInfo]:
        """The last NodeInfo seen from each node."""
        return {n: info for n, (_, info) in self._nodes.items()}

    # -- callbacks --------------------------------------------------------------------------

    def _parse_callback(self, msg: Msg) -> Callback | None:
        head = f"{self.prefix}.orchestrator.{self.requester_id}."
        if not msg.subject.startswith(head):
            return None
        node, _, method = msg.subject[len(head) :].partition(".")
        kind, slash, version = method.partition("/")
        cls = _CALLBACK_TYPES.get(kind)
        if cls is None or (slash, version) != ("/", "v1"):
            return None
        try:
            cb = decode(msg.data, cls)
        except DecodeError:
            return None
        # A node may publish only under its own token: a body claiming another is forged.
        return cb if cb.SourcePeerID == node else None

    async def _on_callback(self, msg: Msg) -> None:
        cb = self._parse_callback(msg)
        if cb is None:
            self.dropped_callbacks += 1
            log.warning("dropped callback on %s", msg.subject)
            return
        msg_id = (msg.headers or {}).get(MSG_ID_HEADER) or f"{cb.ExecutionID}:{cb.Seq}"
        if msg_id in self._msg_ids:
            self.duplicate_callbacks += 1
            return
        self._msg_ids[msg_id] = None
        if len(self._msg_ids) > DEDUP_MEMORY:
            self._msg_ids.popitem(last=False)
        async with self._arrived:
            self._pending.setdefault(cb.ExecutionID, deque()).append(cb)
            self._received.setdefault(cb.ExecutionID, []).append(cb)
            self._arrived.notify_all()

    def _take(self, execution_id: str, kinds: frozenset[CallbackKind] | None) -> Callback | None:
        queue = self._pending.get(execution_id, deque())
        for i, cb in enumerate(queue):
            if kinds is None or KIND_OF[type(cb)] in kinds:
                del queue[i]
                return cb
        return None

    async def wait_callback(
        self,
        execution_id: str,
        kinds: Iterable[CallbackKind | str] | None = None,
        timeout: float | None = 30.0,
    ) -> Callback:
        """The next callback of ``execution_id`` (of one of ``kinds``), consumed once.

        Callbacks of other kinds stay queued. Raises TimeoutError after ``timeout`` s.
        """
        wanted = None if kinds is None else frozenset(CallbackKind(k) for k in kinds)
        async with asyncio.timeout(timeout), self._arrived:
            while (found := self._take(execution_id, wanted)) is None:
                await self._arrived.wait()
            return found

    def callbacks(self, execution_id: str) -> list[Callback]:
        """Every callback received for ``execution_id``, in arrival order."""
        return list(self._received.get(execution_id, ()))

    async def run_to_completion(
        self,
        node_id: str,
        execution_id: str,
        *,
        accept_result: bool = True,
        timeout: float = 660.0,
    ) -> list[Callback]:
        """Wait for the run, accept (or reject) its result, wait for the final callback.

        Returns every callback received for the execution. Raises TimeoutError when the
        callbacks do not come within ``timeout`` (in core mode, see ``reconcile``).
        """
        with self._tracer.start_as_current_span(
            "requester run", attributes={"execution.id": execution_id, "node.id": node_id}
        ):
            async with asyncio.timeout(timeout):
                first = await self.wait_callback(execution_id, _AFTER_ACCEPT, timeout=None)
                if isinstance(first, RunResult):
                    if accept_result:
                        await self.accept_result(node_id, execution_id)
                        await self.wait_callback(execution_id, TERMINAL_KINDS, timeout=None)
                    else:
                        # The reply confirms the end: the node sends no callback after it.
                        await self.reject_result(node_id, execution_id, "result rejected")
        return self.callbacks(execution_id)

    async def reconcile(self, node_id: str) -> dict[str, ExecutionState]:
        """The state of each of this requester's executions on ``node_id`` (ListExecutions)."""
        return {e.ExecutionID: e.State async for e in self.list_executions(node_id)}

    # -- requests ---------------------------------------------------------------------------

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
            return _decode_reply(msg, rtype, node_id)

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

    async def node_info(self, node_id: str) -> NodeInfo:
        return await self._request(node_id, "NodeInfo", b"", NodeInfo)

    # -- fan-out and placement --------------------------------------------------------------

    async def _open_fan_out(self, job: Job) -> _FanOut:
        fan = _FanOut()
        inbox = self._nc.new_inbox()
        fan.sub = await self._nc.subscribe(inbox, cb=fan.put)
        subject = f"{self.prefix}.compute._all.{self.requester_id}.AskForBid/v1"
        body = msgspec.json.encode(AskForBidRequest(SourcePeerID=self.requester_id, Job=job))
        with self._tracer.start_as_current_span(
            f"{subject} publish",
            kind=trace.SpanKind.PRODUCER,
            attributes={"messaging.system": "nats", "messaging.destination.name": subject},
        ):
            await self._nc.publish(subject, body, reply=inbox, headers=self._trace_headers())
        return fan

    async def _collect(self, fan: _FanOut, deadline: float, expected: set[str] | None) -> None:
        """Gather replies until every expected node answered or the deadline passed."""
        waiting = set(expected) if expected is not None else self.seen_nodes()
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        # No known node means nothing to wait for but the deadline.
        while (not waiting or not waiting <= fan.answered) and not fan.no_responders:
            try:
                msg = await asyncio.wait_for(fan.queue.get(), max(0.0, end - loop.time()))
            except TimeoutError:
                break
            if msg is not None:
                fan.take(msg)
        while not fan.queue.empty():  # already arrived: count them too
            if (msg := fan.queue.get_nowait()) is not None:
                fan.take(msg)

    async def fan_out(
        self, job: Job, *, deadline: float = 0.25, expected: set[str] | None = None
    ) -> Bids:
        """Ask every node at once (``_all``); one reply per node, errors in ``.errors``.

        Waits until each node in ``expected`` (default: those seen on ``<p>.info.*`` in the
        last three intervals) has answered, or ``deadline`` seconds. The caller must reject
        the bids it does not accept; ``place`` does that, late bids included.
        """
        fan = await self._open_fan_out(job)
        try:
            await self._collect(fan, deadline, expected)
        finally:
            await fan.close()
        return fan.bids

    async def place(
        self,
        job: Job,
        *,
        choose: Chooser | None = None,
        deadline: float = 0.25,
        expected: set[str] | None = None,
        linger: float = 2.0,
        cancel_attempts: int = 5,
    ) -> Placement:
        """Fan out, accept the chosen bid and reject every other one.

        ``choose`` picks from the bids still open (default :func:`first_bid`); it is asked
        again when an accept fails. The fan-out inbox stays open ``linger`` seconds more so
        that bids arriving late are rejected too. Raises PlacementError if no bid could be
        accepted.
        """
        with self._tracer.start_as_current_span(
            "requester place", attributes={"job.id": job.Metadata.ID}
        ):
            fan = await self._open_fan_out(job)
            try:
                await self._collect(fan, deadline, expected)
                return await self._accept_one(fan, choose or first_bid, cancel_attempts)
            finally:
                task = asyncio.create_task(self._linger(fan, linger))
                self._lingering[task] = fan
                task.add_done_callback(self._lingering.pop)

    async def _accept_one(self, fan: _FanOut, choose: Chooser, cancel_attempts: int) -> Placement:
        open_bids = [
            b for b in fan.bids if b.Accepted and b.ExecutionID and _ID.match(b.NodeID or "")
        ]
        errors: list[BaseException] = []
        try:
            while (bid := choose(open_bids)) is not None:
                if bid not in open_bids:
                    raise ValueError("choose returned a bid that is not open")
                open_bids.remove(bid)
                fan.handled.add(bid.ExecutionID)
                response = await self._try_accept(bid, errors, cancel_attempts)
                if response is not None:
                    return Placement(
                        node_id=bid.NodeID,
                        execution_id=bid.ExecutionID,
                        job_id=bid.JobID,
                        bid=bid,
                        response=response,
                        bids=fan.bids,
                        errors=errors,
                    )
            raise PlacementError(f"no bid accepted ({len(fan.bids)} replies)", bids=fan.bids)
        finally:
            await self._reject_all(fan, open_bids, "another bid was accepted", errors)

    async def _try_accept(
        self, bid: AskForBidResponse, errors: list[BaseException], cancel_attempts: int
    ) -> ExecutionResponse | None:
        """Accept ``bid``; None if it did not take (after cancelling it if unsure)."""
        try:
            return await self.accept(bid.NodeID, bid.ExecutionID)
        except NoRespondersError as exc:
            errors.append(exc)  # no node subscribed: the accept was never delivered
            return None
        except RequestFailed as exc:
            errors.append(exc)
            if exc.code != 500:  # the node refused it: nothing to undo
                return None
        except NatsTimeoutError as exc:
            errors.append(exc)
        # No (usable) answer: the accept may have taken. §5: cancel, until answered,
        # before placing the job anywhere else.
        await self._cancel_until_answered(bid, cancel_attempts, errors)
        return None

    async def _cancel_until_answered(
        self, bid: AskForBidResponse, attempts: int, errors: list[BaseException]
    ) -> None:
        for attempt in range(attempts):
            try:
                await self.cancel(bid.NodeID, bid.ExecutionID, "bid accept got no reply")
                return
            except RequestFailed:
                return  # answered (409 / 404): the execution is not running for us
            except NoRespondersError as exc:
                errors.append(exc)
                await asyncio.sleep(min(0.1 * 2**attempt, 2.0))  # backoff while it is away
            except NatsTimeoutError as exc:
                errors.append(exc)
        raise PlacementError(
            f"accept of {bid.ExecutionID} on {bid.NodeID} got no reply and "
            f"{attempts} cancels were not answered; not placing it elsewhere"
        )

    async def _reject_all(
        self,
        fan: _FanOut,
        bids: Iterable[AskForBidResponse],
        why: str,
        errors: list[BaseException] | None = None,
    ) -> None:
        todo = [b for b in bids if b.ExecutionID not in fan.handled]
        fan.handled.update(b.ExecutionID for b in todo)
        results = await asyncio.gather(
            *(self.reject(b.NodeID, b.ExecutionID, why) for b in todo), return_exceptions=True
        )
        for bid, result in zip(todo, results, strict=True):
            if isinstance(result, BaseException):
                log.info("reject of %s on %s failed: %s", bid.ExecutionID, bid.NodeID, result)
                if errors is not None:
                    errors.append(result)

    async def _linger(self, fan: _FanOut, linger: float) -> None:
        """Reject the bids that arrive after the fan-out ended (and repeated ones)."""

        def stray(bids: Iterable[AskForBidResponse]) -> list[AskForBidResponse]:
            return [b for b in bids if b.Accepted and b.ExecutionID and _ID.match(b.NodeID)]

        try:
            # Whatever place() left open (it was cancelled, say) and repeated answers.
            await self._reject_all(fan, stray([*fan.bids, *fan.bids.duplicates]), "not chosen")
            loop = asyncio.get_running_loop()
            end = loop.time() + linger
            while (remaining := end - loop.time()) > 0:
                try:
                    msg = await asyncio.wait_for(fan.queue.get(), remaining)
                except TimeoutError:
                    break
                if msg is None:  # close(): stop waiting
                    break
                await self._reject_all(fan, stray(_late_bids([msg])), "late bid")
            await self._reject_all(fan, stray(_late_bids(_drain(fan.queue))), "late bid")
        finally:
            await fan.close()


def _drain(queue: asyncio.Queue[Msg | None]) -> list[Msg | None]:
    items: list[Msg | None] = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def _late_bids(msgs: Iterable[Msg | None]) -> list[AskForBidResponse]:
    bids = []
    for msg in msgs:
        headers = {} if msg is None else msg.headers or {}
        if msg is None or ERROR_CODE_HEADER in headers or STATUS_HEADER in headers:
            continue
        try:
            bids.append(decode(msg.data, AskForBidResponse))
        except DecodeError:
            log.info("late fan-out reply is not a bid: %r", msg.data[:200])
    return bids
