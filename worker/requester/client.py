"""``Requester``: a requester's view of the market, over :class:`NodeRequests`.

It follows which nodes are up (``<p>.info.*``), receives its callbacks (a core
subscription, or an ordered JetStream consumer on ``CALLBACKS_<p>``), fans out asks and
places jobs (``fanout``, ``placement``), and runs a placed job to its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Literal

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError as JsNotFoundError
from opentelemetry import trace

from schemas.callbacks import Callback, CallbackKind, RunResult
from schemas.codec import DecodeError, decode
from schemas.compute import AskForBidRequest
from schemas.job import Job
from schemas.node import NodeInfo
from worker.connection import flush_subscriptions
from worker.requester.callbacks import AFTER_ACCEPT, TERMINAL_KINDS, CallbackInbox
from worker.requester.fanout import Bids, FanOut
from worker.requester.placement import (
    Chooser,
    Placement,
    accept_one,
    first_bid,
    reject_late_bids,
)
from worker.requester.requests import NodeRequests

__all__ = ["INFO_INTERVAL", "SEEN_WINDOW", "Requester"]

log = logging.getLogger("worker.requester")  # one logger name for the whole package

INFO_INTERVAL = 30.0
SEEN_WINDOW = 3 * INFO_INTERVAL  # a node counts as up if seen within three info intervals


class Requester(NodeRequests):
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
        super().__init__(
            nc=nc, requester_id=requester_id, prefix=prefix, timeout=timeout, tracer=tracer
        )
        self._subs: list[Subscription | JetStreamContext.PullSubscription] = []
        self._puller: asyncio.Task[None] | None = None
        self._consumer = ""
        self._nodes: dict[str, tuple[float, NodeInfo]] = {}
        self._inbox = CallbackInbox(prefix=prefix, requester_id=self.requester_id)
        self._lingering: dict[asyncio.Task[None], FanOut] = {}

    # -- subjects ---------------------------------------------------------------------------

    @property
    def callback_subject(self) -> str:
        return f"{self.prefix}.orchestrator.{self.requester_id}.>"

    @property
    def callback_stream(self) -> str:
        return "CALLBACKS_" + self.prefix.replace(".", "_")

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
            self._subs.append(await self._nc.subscribe(self.callback_subject, cb=self._inbox.put))
        else:
            await self._start_stream_consumer(since)
        await flush_subscriptions(self._nc, self.timeout)

    async def _start_stream_consumer(self, since: datetime | None) -> None:
        """A consumer named on create and filtered on this requester's own subjects —
        the only kind its permissions allow (PROTOCOL.md §6) — pulled and acknowledged."""
        psub = await self._bind_consumer(since=since, after_seq=0)
        self._puller = asyncio.get_running_loop().create_task(self._pull(psub))

    async def _bind_consumer(
        self, *, since: datetime | None, after_seq: int
    ) -> JetStreamContext.PullSubscription:
        js = self._nc.jetstream(timeout=self.timeout)
        name = f"{self.requester_id}-{uuid.uuid4().hex[:10]}"
        config = ConsumerConfig(
            name=name,
            filter_subject=self.callback_subject,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            inactive_threshold=60.0,
            mem_storage=True,
        )
        if after_seq:  # resuming: right after the last callback taken
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = after_seq + 1
        elif since is not None:
            config.deliver_policy = DeliverPolicy.BY_START_TIME
            config.opt_start_time = since
        await js.add_consumer(self.callback_stream, config)
        psub = await js.pull_subscribe_bind(durable=name, stream=self.callback_stream)
        self._subs.append(psub)
        self._consumer = name
        return psub

    async def _pull(self, psub: JetStreamContext.PullSubscription) -> None:
        """Fetch forever; a consumer lost with the broker (it lives in memory) is made
        again from the stream sequence after the last callback taken."""
        last_seq = 0
        while True:
            try:
                msgs = await psub.fetch(256, timeout=1)
            except (NatsTimeout, TimeoutError):
                continue  # nothing new
            except NatsError as exc:
                log.debug("callback fetch failed: %r", exc)
                await asyncio.sleep(0.5)
                psub = await self._rebind_if_lost(psub, last_seq)
                continue
            for msg in msgs:
                await self._inbox.put(msg)
                await msg.ack()
                last_seq = max(last_seq, msg.metadata.sequence.stream)

    async def _rebind_if_lost(
        self, psub: JetStreamContext.PullSubscription, last_seq: int
    ) -> JetStreamContext.PullSubscription:
        js = self._nc.jetstream(timeout=self.timeout)
        try:
            await js.consumer_info(self.callback_stream, self._consumer)
            return psub
        except JsNotFoundError:
            pass
        except NatsError:
            return psub  # still disconnected: try again later
        with contextlib.suppress(NatsError):
            await psub.unsubscribe()
        if psub in self._subs:
            self._subs.remove(psub)
        try:
            return await self._bind_consumer(since=None, after_seq=last_seq)
        except NatsError as exc:
            log.debug("callback consumer not re-created yet: %r", exc)
            return psub

    async def close(self) -> None:
        """Stop: finish rejecting late bids already received, then unsubscribe everything."""
        for fan in self._lingering.values():
            fan.queue.put_nowait(None)  # stop lingering now, after the replies already queued
        if self._lingering:
            await asyncio.gather(*self._lingering, return_exceptions=True)
        if self._puller is not None:
            self._puller.cancel()
            await asyncio.gather(self._puller, return_exceptions=True)
            self._puller = None
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

    @property
    def dropped_callbacks(self) -> int:
        """Callbacks refused: a foreign subject, an unreadable body or a forged sender."""
        return self._inbox.dropped

    @dropped_callbacks.setter
    def dropped_callbacks(self, value: int) -> None:
        self._inbox.dropped = value

    @property
    def duplicate_callbacks(self) -> int:
        """Callbacks received again (same ``Nats-Msg-Id``) and not queued twice."""
        return self._inbox.duplicates

    @duplicate_callbacks.setter
    def duplicate_callbacks(self, value: int) -> None:
        self._inbox.duplicates = value

    async def wait_callback(
        self,
        execution_id: str,
        kinds: Iterable[CallbackKind | str] | None = None,
        timeout: float | None = 30.0,
    ) -> Callback:
        """The next callback of ``execution_id`` (of one of ``kinds``), consumed once.

        Callbacks of other kinds stay queued. Raises TimeoutError after ``timeout`` s.
        """
        return await self._inbox.wait(execution_id, kinds, timeout)

    def callbacks(self, execution_id: str) -> list[Callback]:
        """Every callback received for ``execution_id``, in arrival order."""
        return self._inbox.received(execution_id)

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
                first = await self.wait_callback(execution_id, AFTER_ACCEPT, timeout=None)
                if isinstance(first, RunResult):
                    if accept_result:
                        await self.accept_result(node_id, execution_id)
                        await self.wait_callback(execution_id, TERMINAL_KINDS, timeout=None)
                    else:
                        # The reply confirms the end: the node sends no callback after it.
                        await self.reject_result(node_id, execution_id, "result rejected")
        return self.callbacks(execution_id)

    # -- fan-out and placement --------------------------------------------------------------

    async def _open_fan_out(self, job: Job) -> FanOut:
        fan = FanOut()
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

    async def _collect(self, fan: FanOut, deadline: float, expected: set[str] | None) -> None:
        """Gather replies until every expected node answered or the deadline passed."""
        waiting = set(expected) if expected is not None else self.seen_nodes()
        await fan.collect(deadline, waiting)

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
                return await accept_one(self, fan, choose or first_bid, cancel_attempts)
            finally:
                task = asyncio.create_task(reject_late_bids(self, fan, linger))
                self._lingering[task] = fan
                task.add_done_callback(self._lingering.pop)
