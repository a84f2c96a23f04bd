"""The NATS scenarios: the echo baseline and the node's bid, throughput, end-to-end and
fan-out figures, each run by the load generator in the bench process (raw nats-py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.aio.msg import Msg

from bench import wire
from bench.load import LoadResult, Op, concurrent, sequential

TIMEOUT = 10.0


@dataclass
class Counters:
    declines: int = 0
    decline_reasons: dict[str, int] = field(default_factory=dict)
    rejects: list[float] = field(default_factory=list)

    def decline(self, reason: str) -> None:
        self.declines += 1
        self.decline_reasons[reason] = self.decline_reasons.get(reason, 0) + 1


# --- the baseline --------------------------------------------------------------------


def echo_op(nc: Client, subject: str, body: bytes, headers: wire.Headers) -> Op:
    async def op() -> float:
        h = headers.next()
        t0 = time.perf_counter()
        await nc.request(subject, body, timeout=TIMEOUT, headers=h)
        return time.perf_counter() - t0

    return op


# --- one node ------------------------------------------------------------------------


class NodeClient:
    """The requester side of PROTOCOL.md §2 for one node, with the least client work."""

    def __init__(self, nc: Client, *, prefix: str, node_id: str, tag: str) -> None:
        self.nc = nc
        self.prefix = prefix
        self.node_id = node_id
        self.ids = wire.JobIds(tag)
        self.headers = wire.Headers()
        base = f"{prefix}.compute.{node_id}.{wire.REQUESTER}."
        self.ask_subject = base + "AskForBid/v1"
        self.reject_subject = base + "BidRejected/v1"
        self.accept_subject = base + "BidAccepted/v1"
        self.result_accepted_subject = base + "ResultAccepted/v1"
        self.counters = Counters()

    async def request(self, subject: str, body: bytes) -> Msg:
        msg = await self.nc.request(subject, body, timeout=TIMEOUT, headers=self.headers.next())
        wire.check(msg.headers, msg.data)
        return msg

    async def ask(self) -> tuple[wire.Bid, float]:
        body = wire.ask_body(self.ids.next())
        h = self.headers.next()
        t0 = time.perf_counter()
        msg = await self.nc.request(self.ask_subject, body, timeout=TIMEOUT, headers=h)
        elapsed = time.perf_counter() - t0
        wire.check(msg.headers, msg.data)
        return wire.bid_decoder.decode(msg.data), elapsed

    async def reject(self, execution_id: str) -> None:
        t0 = time.perf_counter()
        await self.request(self.reject_subject, wire.op_body(execution_id, "bench"))
        self.counters.rejects.append(time.perf_counter() - t0)

    def bid_op(self) -> Op:
        """Ask (timed), then reject the bid at once (not timed)."""

        async def op() -> float | None:
            bid, elapsed = await self.ask()
            if not bid.Accepted:
                self.counters.decline(bid.Reason)
                return None
            await self.reject(bid.ExecutionID)
            return elapsed

        return op


class CallbackRouter:
    """One subscription on ``<p>.orchestrator.bench.>``; hands each callback of a
    registered execution to the future waiting for its kind."""

    KINDS = ("OnRunComplete", "OnPublishComplete", "OnComputeFailure", "OnCancelComplete")

    def __init__(self, nc: Client, prefix: str) -> None:
        self.nc = nc
        self.subject = f"{prefix}.orchestrator.{wire.REQUESTER}.>"
        self.waiting: dict[str, dict[str, asyncio.Future[bytes]]] = {}
        self.unrouted = 0

    async def start(self) -> None:
        self.sub = await self.nc.subscribe(self.subject, cb=self._on_msg)
        await self.nc.flush()

    async def stop(self) -> None:
        await self.sub.unsubscribe()

    def register(self, execution_id: str) -> dict[str, asyncio.Future[bytes]]:
        loop = asyncio.get_running_loop()
        futures = {k: loop.create_future() for k in self.KINDS}
        self.waiting[execution_id] = futures
        return futures

    def forget(self, execution_id: str) -> None:
        self.waiting.pop(execution_id, None)

    async def _on_msg(self, msg: Msg) -> None:
        kind = msg.subject.rsplit(".", 1)[-1].partition("/")[0]
        execution_id = wire.callback_decoder.decode(msg.data).ExecutionID
        futures = self.waiting.get(execution_id)
        if futures is None or kind not in futures:
            self.unrouted += 1
            return
        if kind in ("OnComputeFailure", "OnCancelComplete"):
            for fut in futures.values():
                if not fut.done():
                    fut.set_exception(RuntimeError(f"{kind}: {msg.data[:200]!r}"))
            return
        if not futures[kind].done():
            futures[kind].set_result(msg.data)


def job_op(client: NodeClient, router: CallbackRouter) -> Op:
    """ask → BidAccepted → RunResult → ResultAccepted → PublishResult, timed whole."""

    async def op() -> float | None:
        t0 = time.perf_counter()
        bid, _ = await client.ask()
        if not bid.Accepted:
            client.counters.decline(bid.Reason)
            return None
        execution_id = bid.ExecutionID
        futures = router.register(execution_id)
        try:
            await client.request(client.accept_subject, wire.op_body(execution_id))
            async with asyncio.timeout(30):
                await futures["OnRunComplete"]
            await client.request(client.result_accepted_subject, wire.op_body(execution_id))
            async with asyncio.timeout(30):
                await futures["OnPublishComplete"]
        finally:
            router.forget(execution_id)
            for fut in futures.values():  # retrieve exceptions nobody awaited
                if fut.done() and not fut.cancelled():
                    fut.exception()
        return time.perf_counter() - t0

    return op


# --- fan-out -------------------------------------------------------------------------


@dataclass
class FanoutResult:
    times_to_all: list[float] = field(default_factory=list)  # seconds, one per fan-out
    rank_times: list[list[float]] = field(default_factory=list)  # per fan-out, sorted
    incomplete: int = 0
    bids: list[tuple[str, str]] = field(default_factory=list)  # (node, execution) to reject
    declines: int = 0
    errors: int = 0


class FanOut:
    """Publishes one request to many responders and waits for ``expect`` replies."""

    def __init__(self, nc: Client, *, subject: str, expect: int) -> None:
        self.nc = nc
        self.subject = subject
        self.expect = expect
        self.headers = wire.Headers()
        self.inbox = nc.new_inbox()
        self._current = ""
        self._arrivals: list[tuple[float, Msg]] = []
        self._complete = asyncio.Event()

    async def start(self) -> None:
        self.sub = await self.nc.subscribe(self.inbox + ".*", cb=self._on_reply)
        await self.nc.flush()

    async def stop(self) -> None:
        await self.sub.unsubscribe()

    async def _on_reply(self, msg: Msg) -> None:
        if msg.subject != self._current:
            return  # a late reply to an earlier round
        self._arrivals.append((time.perf_counter(), msg))
        if len(self._arrivals) >= self.expect:
            self._complete.set()

    async def one(self, n: int, result: FanoutResult, body: bytes, wait: float = 2.0) -> None:
        self._current = f"{self.inbox}.{n}"
        self._arrivals = []
        self._complete.clear()
        t0 = time.perf_counter()
        await self.nc.publish(self.subject, body, reply=self._current, headers=self.headers.next())
        try:
            await asyncio.wait_for(self._complete.wait(), wait)
        except TimeoutError:
            result.incomplete += 1
        arrivals, self._current = self._arrivals, ""
        ranks = sorted(t - t0 for t, _ in arrivals)
        if len(ranks) >= self.expect:
            result.times_to_all.append(ranks[self.expect - 1])
        result.rank_times.append(ranks)
        for _, msg in arrivals:
            if msg.headers and wire.ERROR_CODE in msg.headers:
                result.errors += 1
                continue
            bid = _maybe_bid(msg.data)
            if bid is None:
                continue
            if bid.Accepted:
                result.bids.append((bid.NodeID, bid.ExecutionID))
            else:
                result.declines += 1


def _maybe_bid(data: bytes) -> wire.Bid | None:
    try:
        bid = wire.bid_decoder.decode(data)
    except Exception:
        return None
    return bid if bid.NodeID and bid.NodeID != "echo" else None


async def reject_all(nc: Client, prefix: str, bids: Sequence[tuple[str, str]]) -> int:
    """Reject every collected bid, 64 at a time; returns the number of failures."""
    failures = 0
    sem = asyncio.Semaphore(64)
    headers = wire.Headers()

    async def one(node: str, execution_id: str) -> None:
        nonlocal failures
        async with sem:
            subject = f"{prefix}.compute.{node}.{wire.REQUESTER}.BidRejected/v1"
            try:
                msg = await nc.request(
                    subject,
                    wire.op_body(execution_id, "bench"),
                    timeout=TIMEOUT,
                    headers=headers.next(),
                )
                wire.check(msg.headers, msg.data)
            except Exception:
                failures += 1

    await asyncio.gather(*(one(n, e) for n, e in bids))
    return failures


__all__ = [
    "CallbackRouter",
    "FanOut",
    "FanoutResult",
    "LoadResult",
    "NodeClient",
    "concurrent",
    "echo_op",
    "job_op",
    "reject_all",
    "sequential",
]
