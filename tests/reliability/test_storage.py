"""Storage faults (issue 4, check 5) on a node process: a full disk (a small tmpfs mounted
by the test) and a locked database (another connection holding ``BEGIN EXCLUSIVE``).

PROTOCOL.md §9: asks decline with ``store unavailable`` (Retryable); §3: a change the node
cannot persist now is a 503, never for AskForBid. Issue 4: cancels, timeouts and terminal
moves still commit on a full disk (ballast), queries keep working, and the node recovers
by itself when the space or the lock comes back. Each test collects every deviation and
reports them together, then checks the §5 invariants after the recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from nats.aio.client import Client

from tests.reliability.conftest import (
    REQUEST_ERRORS,
    TERMINAL,
    Load,
    NodeFactory,
    NodeProc,
    fill_disk,
    final_checks,
    make_job,
    snapshot,
    stream_name,
    tmpfs,
    wait_for,
)
from worker.requester import Requester, RequestFailed

QUERY_WITHIN = 2.0  # a query answered later than this does not "keep working"
PROMPT_DECLINE = 1.0  # once the node knows its store is down, an ask is declined at once
LOCK_FOR = 12.0  # longer than the store's 5 s busy timeout, twice over


class Problems(list[str]):
    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.append(message)

    async def eventually(self, check: Callable[[], Any], *, timeout: float, what: str) -> bool:
        try:
            await wait_for(check, timeout=timeout, what=what)
        except AssertionError:
            self.append(f"not within {timeout}s: {what}")
            return False
        return True


def state_of(node: NodeProc, eid: str) -> str:
    return snapshot(node.db_path)[eid].state


async def place(r: Requester, node_id: str, tag: str, *, delay_ms: int = 0) -> str:
    bid = await r.ask(node_id, make_job(tag, delay_ms=delay_ms))
    assert bid.Accepted, bid.Reason
    await r.accept(node_id, bid.ExecutionID)
    return bid.ExecutionID


async def timed(coro: Awaitable[Any], timeout: float) -> tuple[Any, float]:
    """(the result or the exception, seconds taken)."""
    started = time.monotonic()
    try:
        result: Any = await asyncio.wait_for(coro, timeout)
    except (*REQUEST_ERRORS, TimeoutError) as exc:
        result = exc
    return result, time.monotonic() - started


async def settle(problems: Problems, r: Requester, node_id: str) -> None:
    try:
        await Load(r, node_id).settle(timeout=10)
    except AssertionError:
        states = await r.reconcile(node_id)
        stuck = {e: s.value for e, s in states.items() if s.value not in TERMINAL}
        problems.append(f"executions that never end: {stuck}")


async def check_ask_declines(problems: Problems, r: Requester, node_id: str) -> None:
    """The first decline may take the store's busy timeout; the next ones must not."""
    first = None
    for _ in range(300):  # SQLite may still fit a few rows in pages it already has
        reply, _took = await timed(r.ask(node_id, make_job("refused"), timeout=15), 16)
        if isinstance(reply, BaseException):
            problems.append(f"ask got no decline but {reply!r}")
            return
        if not reply.Accepted:
            first = reply
            break
    if first is None:
        problems.append("300 asks were all accepted on a full store")
        return
    problems.check(
        first.Reason.startswith("store unavailable") and first.Retryable,
        f"decline is not a retryable 'store unavailable': {first!r}",
    )
    again, took = await timed(r.ask(node_id, make_job("refused"), timeout=15), 16)
    problems.check(
        not isinstance(again, BaseException) and not again.Accepted,
        f"second ask on a down store: {again!r}",
    )
    problems.check(took <= PROMPT_DECLINE, f"second ask declined only after {took:.2f}s")


async def check_queries(problems: Problems, r: Requester, node_id: str, eid: str) -> None:
    for name, coro in (
        ("GetExecution", r.get_execution(node_id, eid)),
        ("ListExecutions", r.reconcile(node_id)),
        ("NodeInfo", r.node_info(node_id)),
    ):
        result, took = await timed(coro, QUERY_WITHIN + 3)
        problems.check(
            not isinstance(result, BaseException) and took <= QUERY_WITHIN,
            f"{name} while the store is down: {result!r} after {took:.2f}s",
        )


async def test_disk_full_declines_asks_but_commits_what_must_end(
    make_node: NodeFactory, requester: Requester, client: Client
) -> None:
    problems = Problems()
    with tmpfs("32m") as mount:
        node = make_node(data_dir=mount / "data", args=["--bid-ttl=1s"])
        await node.start("--create-callback-stream")
        nid = node.node_id
        running = await place(requester, nid, "cancelme", delay_ms=60_000)
        waiting = await place(requester, nid, "verifyme")
        await wait_for(
            lambda: (
                state_of(node, waiting) == "WaitingVerification"
                and state_of(node, running) == "Running"
            ),
            timeout=10,
            what="set-up",
        )
        expiring = (await requester.ask(nid, make_job("expireme"))).ExecutionID  # TTL 1+2 s
        filler = fill_disk(mount)

        await check_ask_declines(problems, requester, nid)
        reply, _ = await timed(requester.cancel(nid, running, "disk full test"), 15)
        problems.check(
            getattr(reply, "State", None) is not None and reply.State.value == "Cancelled",
            f"cancel on a full disk: {reply!r} (want it committed, with its CancelResult)",
        )
        reply, _ = await timed(requester.accept_result(nid, waiting), 15)
        problems.check(
            not isinstance(reply, BaseException),
            f"ResultAccepted on a full disk: {reply!r} (want it committed)",
        )
        await problems.eventually(
            lambda: state_of(node, waiting) == "Completed", timeout=5, what="publish completes"
        )
        await problems.eventually(
            lambda: state_of(node, expiring) == "Cancelled",
            timeout=6,
            what="bid TTL expires on a full disk (BidExpired)",
        )
        await check_queries(problems, requester, nid, waiting)
        assert node.alive, node.current_log()

        filler.unlink()
        recovered = time.monotonic()

        async def bids() -> bool:
            bid = await requester.ask(nid, make_job("after"), timeout=5)
            if bid.Accepted:
                await requester.reject(nid, bid.ExecutionID, "test over")
            return bid.Accepted

        if await problems.eventually(bids, timeout=10, what="asks bid again once space is back"):
            print(f"bids again {time.monotonic() - recovered:.2f}s after space came back")
        # Whatever could not commit before commits now (a retried cancel included).
        with contextlib.suppress(*REQUEST_ERRORS):
            await requester.cancel(nid, running, "disk full test")
        await problems.eventually(
            lambda: state_of(node, expiring) == "Cancelled", timeout=3, what="bid expiry, late"
        )
        await settle(problems, requester, nid)
        assert await node.sigterm() == 0, node.current_log()
        if not problems:
            await final_checks(node, client)
    assert not problems, "disk full:\n  " + "\n  ".join(problems)


async def test_locked_database_node_recovers_by_itself(
    make_node: NodeFactory, requester: Requester, client: Client
) -> None:
    problems = Problems()
    node = make_node(args=["--bid-ttl=1s"])
    await node.start("--create-callback-stream")
    nid = node.node_id
    v = await place(requester, nid, "verify")
    await wait_for(lambda: state_of(node, v) == "WaitingVerification", timeout=10, what="ran")

    # A callback that keeps failing (the stream refuses it) while the lock comes.
    js = client.jetstream()
    info = await js.stream_info(stream_name(node.prefix))
    await js.update_stream(replace(info.config, max_msg_size=1))
    held = await place(requester, nid, "held")
    await wait_for(
        lambda: (rows := snapshot(node.db_path)[held].outbox) and rows[0].attempts >= 1,
        timeout=10,
        what="a callback retried",
    )
    running = await place(requester, nid, "run", delay_ms=1_500)  # ends under the lock
    expiring = (await requester.ask(nid, make_job("expire"))).ExecutionID  # fires under it

    locker = sqlite3.connect(node.db_path, timeout=10, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    locked_at = time.monotonic()
    try:
        queries = Problems()
        patient = Requester(
            nc=client, requester_id=requester.requester_id, prefix=node.prefix, timeout=15
        )

        async def keep_querying() -> None:
            while time.monotonic() - locked_at < LOCK_FOR - QUERY_WITHIN - 1:
                await check_queries(queries, requester, nid, v)

        async def cancel_refused() -> None:
            reply, took = await timed(patient.cancel(nid, v, "locked"), 16)
            problems.check(
                isinstance(reply, RequestFailed) and reply.code == 503,
                f"cancel on a locked store: {reply!r} after {took:.2f}s (want 503)",
            )

        await asyncio.gather(
            keep_querying(), check_ask_declines(problems, requester, nid), cancel_refused()
        )
        problems.extend(sorted(set(queries))[:5])
        await wait_for(lambda: time.monotonic() - locked_at >= LOCK_FOR, timeout=LOCK_FOR)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    await js.update_stream(info.config)
    assert node.alive, node.current_log()

    # No restart: the node must get going again by itself.
    async def bids() -> bool:
        bid = await requester.ask(nid, make_job("after"), timeout=5)
        if bid.Accepted:
            await requester.reject(nid, bid.ExecutionID, "test over")
        return bid.Accepted

    await problems.eventually(bids, timeout=10, what="asks bid again after the lock")
    await problems.eventually(
        lambda: state_of(node, running) != "Running",
        timeout=5,
        what="the run that ended under the lock leaves Running",
    )
    await problems.eventually(
        lambda: state_of(node, expiring) == "Cancelled",
        timeout=5,
        what="the bid TTL that expired under the lock (BidExpired)",
    )

    async def cancelled() -> bool:
        with contextlib.suppress(*REQUEST_ERRORS):
            return (await requester.cancel(nid, v, "locked")).State.value == "Cancelled"
        return False

    await problems.eventually(cancelled, timeout=5, what="a retried cancel commits")
    await problems.eventually(
        lambda: all(r.delivered for e in snapshot(node.db_path).values() for r in e.outbox),
        timeout=12,
        what="every callback delivered (the one retried under the lock too)",
    )
    await settle(problems, requester, nid)
    assert await node.sigterm() == 0, node.current_log()
    if not problems:
        await final_checks(node, client)
    assert not problems, "locked database:\n  " + "\n  ".join(problems)
