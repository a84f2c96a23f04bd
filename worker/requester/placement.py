"""Placement: accept one bid of a fan-out, reject every other one, late bids included.

``choose`` picks among the bids still open; when an accept fails it is asked again. An
accept that got no usable answer may have taken: the execution is cancelled, until a
cancel is answered, before the job goes anywhere else (PROTOCOL.md §5). The fan-out's
inbox then lingers so that bids arriving late, or twice, are rejected too.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import msgspec
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from schemas.compute import ID_PATTERN, AskForBidResponse, ExecutionResponse
from worker.requester.errors import PlacementError, RequestFailed
from worker.requester.fanout import Bids, FanOut, drain, late_bids
from worker.requester.requests import NodeRequests

__all__ = [
    "Chooser",
    "Placement",
    "accept_one",
    "first_bid",
    "reject_all",
    "reject_late_bids",
]

log = logging.getLogger("worker.requester")  # one logger name for the whole package

_ID = re.compile(ID_PATTERN)

Chooser = Callable[[Sequence[AskForBidResponse]], AskForBidResponse | None]


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


def first_bid(bids: Sequence[AskForBidResponse]) -> AskForBidResponse | None:
    """Default chooser: the bid with the lowest EstimatedStartSeconds, then the earliest."""
    offers = [b for b in bids if b.Accepted and b.ExecutionID]
    return min(offers, key=_start_estimate, default=None)


def _start_estimate(bid: AskForBidResponse) -> float:
    est = bid.EstimatedStartSeconds
    return 0.0 if isinstance(est, msgspec.UnsetType) else est


async def accept_one(
    req: NodeRequests, fan: FanOut, choose: Chooser, cancel_attempts: int
) -> Placement:
    """Accept the chosen bid (choosing again while accepts fail); reject the others."""
    open_bids = [b for b in fan.bids if b.Accepted and b.ExecutionID and _ID.match(b.NodeID or "")]
    errors: list[BaseException] = []
    try:
        while (bid := choose(open_bids)) is not None:
            if bid not in open_bids:
                raise ValueError("choose returned a bid that is not open")
            open_bids.remove(bid)
            fan.handled.add(bid.ExecutionID)
            response = await _try_accept(req, bid, errors, cancel_attempts)
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
        await reject_all(req, fan, open_bids, "another bid was accepted", errors)


async def _try_accept(
    req: NodeRequests, bid: AskForBidResponse, errors: list[BaseException], cancel_attempts: int
) -> ExecutionResponse | None:
    """Accept ``bid``; None if it did not take (after cancelling it if unsure)."""
    try:
        return await req.accept(bid.NodeID, bid.ExecutionID)
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
    await _cancel_until_answered(req, bid, cancel_attempts, errors)
    return None


async def _cancel_until_answered(
    req: NodeRequests, bid: AskForBidResponse, attempts: int, errors: list[BaseException]
) -> None:
    for attempt in range(attempts):
        try:
            await req.cancel(bid.NodeID, bid.ExecutionID, "bid accept got no reply")
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


async def reject_all(
    req: NodeRequests,
    fan: FanOut,
    bids: Iterable[AskForBidResponse],
    why: str,
    errors: list[BaseException] | None = None,
) -> None:
    """Reject each of ``bids`` not handled yet, all at once; failures logged (and kept)."""
    todo = [b for b in bids if b.ExecutionID not in fan.handled]
    fan.handled.update(b.ExecutionID for b in todo)
    results = await asyncio.gather(
        *(req.reject(b.NodeID, b.ExecutionID, why) for b in todo), return_exceptions=True
    )
    for bid, result in zip(todo, results, strict=True):
        if isinstance(result, BaseException):
            log.info("reject of %s on %s failed: %s", bid.ExecutionID, bid.NodeID, result)
            if errors is not None:
                errors.append(result)


async def reject_late_bids(req: NodeRequests, fan: FanOut, seconds: float) -> None:
    """Reject the bids that arrive after the fan-out ended (and repeated ones)."""

    def stray(bids: Iterable[AskForBidResponse]) -> list[AskForBidResponse]:
        return [b for b in bids if b.Accepted and b.ExecutionID and _ID.match(b.NodeID)]

    try:
        # Whatever place() left open (it was cancelled, say) and repeated answers.
        await reject_all(req, fan, stray([*fan.bids, *fan.bids.duplicates]), "not chosen")
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while (remaining := end - loop.time()) > 0:
            try:
                msg = await asyncio.wait_for(fan.queue.get(), remaining)
            except TimeoutError:
                break
            if msg is None:  # close(): stop waiting
                break
            await reject_all(req, fan, stray(late_bids([msg])), "late bid")
        await reject_all(req, fan, stray(late_bids(drain(fan.queue))), "late bid")
    finally:
        await fan.close()
