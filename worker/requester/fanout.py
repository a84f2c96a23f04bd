"""One fan-out: an AskForBid to every node at once, and the replies filed per node.

``_all`` reaches every subscribed node; each answers on the fan-out's inbox. A reply is a
bid or a decline, an error reply, a repeated answer of a node that already answered, or
the server's status that nobody is subscribed. Bids that come after the fan-out ended
are read with :func:`late_bids` so that they can be rejected.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from schemas.codec import DecodeError, decode
from schemas.compute import AskForBidResponse
from worker.requester.errors import (
    ERROR_CODE_HEADER,
    NODE_HEADER,
    STATUS_HEADER,
    RequestFailed,
    error_from,
)

__all__ = ["Bids", "FanOut", "drain", "late_bids"]

log = logging.getLogger("worker.requester")  # one logger name for the whole package


class Bids(list[AskForBidResponse]):
    """Fan-out replies, one per node in arrival order; error replies kept in ``errors``.

    ``duplicates`` holds further answers from a node that had already answered.
    """

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[RequestFailed] = []
        self.duplicates: list[AskForBidResponse] = []


class FanOut:
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
            err = error_from(msg, node)
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

    async def collect(self, deadline: float, waiting: set[str]) -> None:
        """Gather replies until every node in ``waiting`` answered or the deadline passed."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        # No known node means nothing to wait for but the deadline.
        while (not waiting or not waiting <= self.answered) and not self.no_responders:
            try:
                msg = await asyncio.wait_for(self.queue.get(), max(0.0, end - loop.time()))
            except TimeoutError:
                break
            if msg is not None:
                self.take(msg)
        while not self.queue.empty():  # already arrived: count them too
            if (msg := self.queue.get_nowait()) is not None:
                self.take(msg)

    async def close(self) -> None:
        if self.sub is not None:
            sub, self.sub = self.sub, None
            try:
                await sub.unsubscribe()
            except NatsError as exc:  # the connection is closed: nothing to undo
                log.debug("unsubscribe failed: %s", exc)


def drain(queue: asyncio.Queue[Msg | None]) -> list[Msg | None]:
    items: list[Msg | None] = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def late_bids(msgs: Iterable[Msg | None]) -> list[AskForBidResponse]:
    """The bids among replies read after the fan-out ended (errors and statuses skipped)."""
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
