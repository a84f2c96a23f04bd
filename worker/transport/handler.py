"""Request subjects → endpoint calls → replies (PROTOCOL.md §2, §3).

A NATS subscription runs its callbacks one at a time, so the callbacks here only put
the message on a queue; two pools of workers serve asks and every other operation
separately, so a flood of asks never delays a cancel. Every request gets exactly one
reply (or none: a fan-out decline with ``--fanout-silent-declines``, or a request with
no reply subject, which is counted); nothing a sender does can crash the node.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry.trace import Tracer

from schemas.codec import DecodeError, decode, encode
from schemas.compute import (
    AskForBidRequest,
    AskForBidResponse,
    BidAcceptedRequest,
    BidRejectedRequest,
    CancelExecutionRequest,
    ErrorBody,
    ExecutionLogsRequest,
    GetExecutionRequest,
    ListExecutionsRequest,
    ResultAcceptedRequest,
    ResultRejectedRequest,
)
from worker import telemetry
from worker.connection import flush_subscriptions
from worker.endpoint import BaseEndpoint
from worker.errors import NotFoundError, RequestError, WorkerError
from worker.transport.publisher import HeaderPublisher
from worker.transport.subjects import ALL, Method, RequestSubject, Subjects, valid_id

log = logging.getLogger(__name__)

QUEUE_LIMIT = 20_000


@dataclass(slots=True)
class Reply:
    body: bytes
    silent: bool = False


class RequestHandler:
    """Subscribes the node's request subjects and answers them."""

    def __init__(
        self,
        *,
        nc: Client,
        subjects: Subjects,
        endpoint: BaseEndpoint,
        instance_id: str,
        tracer: Tracer,
        max_request_bytes: int,
        fanout_silent_declines: bool,
        node_info: Callable[[], Awaitable[bytes]],
        logs: Callable[[ExecutionLogsRequest, str], Awaitable[bytes]] | None = None,
        workers: int = 64,
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.endpoint = endpoint
        self.node_id = subjects.node_id
        self.instance_id = instance_id
        self.tracer = tracer
        self.max_request_bytes = max_request_bytes
        self.fanout_silent_declines = fanout_silent_declines
        self.node_info = node_info
        self.logs = logs
        self.workers = workers
        self.dropped = 0
        self._asks: asyncio.Queue[Msg] = asyncio.Queue(QUEUE_LIMIT)
        self._ops: asyncio.Queue[Msg] = asyncio.Queue(QUEUE_LIMIT)
        self._subs: list[Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._replies = HeaderPublisher(
            nc, {"Compute-Node-ID": self.node_id, "Compute-Instance-ID": instance_id}
        )
        self._recording = telemetry.recording(tracer)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for queue in (self._asks, self._ops):
            for i in range(self.workers):
                self._tasks.append(loop.create_task(self._serve(queue), name=f"handler-{i}"))
        self._subs.append(await self.nc.subscribe(self.subjects.direct(), cb=self._on_message))
        self._subs.append(await self.nc.subscribe(self.subjects.fanout(), cb=self._on_message))
        await flush_subscriptions(self.nc, 5.0)

    async def stop(self) -> None:
        """Stop intake, let queued requests be answered, then stop the workers."""
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection may be gone already
                log.debug("unsubscribe failed: %r", exc)
        self._subs.clear()
        for queue in (self._asks, self._ops):
            try:
                await asyncio.wait_for(queue.join(), timeout=5)
            except TimeoutError:
                log.warning("%d requests left unanswered at stop", queue.qsize())
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _on_message(self, msg: Msg) -> None:
        if not msg.reply:
            self.dropped += 1
            return
        queue = self._asks if msg.subject.endswith(Method.ASK_FOR_BID.value) else self._ops
        try:
            queue.put_nowait(msg)
        except asyncio.QueueFull:
            self.dropped += 1

    async def _serve(self, queue: asyncio.Queue[Msg]) -> None:
        while True:
            msg = await queue.get()
            try:
                await self.handle(msg)
            except Exception:
                log.exception("unexpected failure answering %s", msg.subject)
            finally:
                queue.task_done()

    async def handle(self, msg: Msg) -> None:
        """Answer one request; every failure becomes an error reply."""
        parsed = self.subjects.parse(msg.subject)
        if self._recording:
            template = _template(self.subjects, parsed)
            attributes = {
                "messaging.destination.name": msg.subject,
                "messaging.destination.template": template,
                "node.id": self.node_id,
            }
            span_cm = telemetry.consumer_span(self.tracer, template, msg.headers, attributes)
        else:  # no span: the request's context is only passed on
            span_cm = telemetry.consumer_span(self.tracer, "", msg.headers, {})
        with span_cm as span:
            try:
                reply = await self._dispatch(msg, parsed)
            except DecodeError as exc:
                await self._error(msg, RequestError(exc.message))
                return
            except WorkerError as exc:
                span.set_attribute("error.type", type(exc).__name__)
                await self._error(msg, exc)
                return
            except Exception as exc:
                log.exception("request on %s failed", msg.subject)
                span.set_attribute("error.type", type(exc).__name__)
                await self._error(msg, WorkerError(f"internal error: {type(exc).__name__}: {exc}"))
                return
            if not reply.silent:
                await self._publish(msg.reply, reply.body, {})

    async def _dispatch(self, msg: Msg, parsed: RequestSubject | None) -> Reply:
        if len(msg.data) > self.max_request_bytes:
            raise RequestError(
                f"request of {len(msg.data)} bytes exceeds the limit of {self.max_request_bytes}"
            )
        if parsed is not None and parsed.method is not None and not valid_id(parsed.requester):
            raise RequestError(f"invalid requester ID {parsed.requester!r}")
        if parsed is None or parsed.method is None:
            raise NotFoundError(f"unknown method {parsed.raw_method if parsed else msg.subject}")
        if parsed.node == ALL and parsed.method is not Method.ASK_FOR_BID:
            raise NotFoundError(f"unknown method {parsed.method.value} on {ALL}")
        handler: Handler = _HANDLERS[parsed.method]
        return await handler(self, msg, parsed)

    # -- one function per method -----------------------------------------------------------
    async def _ask(self, msg: Msg, parsed: RequestSubject) -> Reply:
        request = decode(msg.data, AskForBidRequest)
        self.endpoint.check_routing(request.SourcePeerID, request.TargetPeerID, parsed.requester)
        response = await self.endpoint.ask_for_bid(request, telemetry.inject({}))
        silent = parsed.node == ALL and self.fanout_silent_declines and not response.Accepted
        return Reply(_encode_ask(response), silent=silent)

    async def _bid_accepted(self, msg: Msg, parsed: RequestSubject) -> Reply:
        request = decode(msg.data, BidAcceptedRequest)
        self.endpoint.check_routing(request.SourcePeerID, request.TargetPeerID, parsed.requester)
        return Reply(encode(await self.endpoint.bid_accepted(request, telemetry.inject({}))))

    async def _bid_rejected(self, msg: Msg, parsed: RequestSubject) -> Reply:
        request = decode(msg.data, BidRejectedRequest)
        self.endpoint.check_routing(request.SourcePeerID, request.TargetPeerID, parsed.requester)
        return Reply(encode(await self.endpoint.bid_rejected(request)))

    async def _result_accepted(self, msg: Msg, parsed: RequestSubject) -> Reply:
        request = decode(msg.data, ResultAcceptedRequest)
        self.endpoint.check_routing(request.SourcePeerID, request.TargetPeerID, parsed.requester)
        return Reply(encode(await self.endpoint.result_accepted(request)))

    async def _result_rejected(self, msg: Msg, parsed: RequestSubject) -> Reply:
        request = decode(msg.data, ResultRejectedRequest)
        self.endpoint.check_routing(request.SourcePeerID, request.TargetPeerID, parsed.requester)
        return Reply(encode(await self.endpoint.result_rejected(request)))

    async def _cancel(self, msg: Msg, parsed: RequestSubject) -> Reply:
        request = decode(msg.data, CancelExecutionRequest)
        self.endpoint.check_routing(request.SourcePeerID, request.TargetPeerID, parsed.requester)
        return Reply(encode(await self.endpoint.cancel(request)))

    async def _get(self, msg: Msg, parsed: RequestSubject) -> Reply:
        request = decode(msg.data, GetExecutionRequest)
        self.endpoint.check_routing(request.SourcePeerID, "", parsed.requester)
        return Reply(encode(await self.endpoint.get_execution(request)))

    async def _list(self, msg: Msg, parsed: RequestSubject) -> Reply:
        request = decode(msg.data, ListExecutionsRequest)
        self.endpoint.check_routing(request.SourcePeerID, "", parsed.requester)
        return Reply(encode(await self.endpoint.list_executions(request)))

    async def _info(self, msg: Msg, parsed: RequestSubject) -> Reply:
        if msg.data.strip():
            decode(msg.data, dict)  # any JSON object; anything else is a 400
        return Reply(await self.node_info())

    async def _logs(self, msg: Msg, parsed: RequestSubject) -> Reply:
        request = decode(msg.data, ExecutionLogsRequest)
        self.endpoint.check_routing(request.SourcePeerID, "", parsed.requester)
        if self.logs is None:
            raise NotFoundError("execution logs are not served by this node")
        return Reply(await self.logs(request, parsed.requester))

    # -- replies -------------------------------------------------------------------------
    async def _error(self, msg: Msg, exc: WorkerError) -> None:
        message = " ".join(exc.message.split())  # one line
        body = ErrorBody(
            Error=message, Code=exc.code, NodeID=self.node_id, State=exc.state, Cause=exc.cause
        )
        headers = {"Nats-Service-Error-Code": str(exc.code), "Nats-Service-Error": message}
        await self._publish(msg.reply, encode(body), headers)

    async def _publish(self, subject: str, body: bytes, extra: dict[str, str]) -> None:
        headers = telemetry.inject(dict(extra))  # after the node's own headers
        try:
            await self._replies.publish(subject, body, headers)
        except Exception as exc:  # a broken connection: the requester will retry
            log.warning("reply to %s not sent: %r", subject, exc)


_ask_encoder = msgspec.json.Encoder()


def _encode_ask(response: AskForBidResponse) -> bytes:
    return _ask_encoder.encode(response)


def _template(subjects: Subjects, parsed: RequestSubject | None) -> str:
    if parsed is None:
        return f"{subjects.prefix}.compute"
    node = "_all" if parsed.node == ALL else "{node}"
    return f"{subjects.prefix}.compute.{node}.{{requester}}.{parsed.raw_method}"


Handler = Callable[[RequestHandler, Msg, RequestSubject], Awaitable[Reply]]
_HANDLERS: dict[Method, Handler] = {
    Method.ASK_FOR_BID: RequestHandler._ask,
    Method.BID_ACCEPTED: RequestHandler._bid_accepted,
    Method.BID_REJECTED: RequestHandler._bid_rejected,
    Method.RESULT_ACCEPTED: RequestHandler._result_accepted,
    Method.RESULT_REJECTED: RequestHandler._result_rejected,
    Method.CANCEL_EXECUTION: RequestHandler._cancel,
    Method.GET_EXECUTION: RequestHandler._get,
    Method.LIST_EXECUTIONS: RequestHandler._list,
    Method.NODE_INFO: RequestHandler._info,
    Method.EXECUTION_LOGS: RequestHandler._logs,
}
