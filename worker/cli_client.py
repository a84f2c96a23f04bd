"""The client side of the CLI: a connection with a requester, node discovery, finding an
execution, following its logs (PROTOCOL.md §2).

Discovery asks ``$SRV.INFO.compute-node`` (the NATS service API every node registers,
with its node ID and subject prefix in the metadata) and listens on ``<p>.info.*`` at
the same time. Nodes answer within milliseconds of each other, so it stops once replies
have paused for :data:`QUIET` seconds after the first, or at ``--discover-timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from schemas.codec import DecodeError, decode
from schemas.compute import ExecutionLogsRequest, ExecutionLogsResponse
from schemas.node import ExecutionView, LogChunk, NodeInfo
from worker.cli_common import ClientOptions, CommandError, stderr_console
from worker.connection import connect, flush_subscriptions
from worker.requester import Requester, RequestFailed

log = logging.getLogger(__name__)

SERVICE: Final = "compute-node"
QUIET: Final = 0.25  # seconds without a new discovery reply that end the discovery
CALLBACK_REPLAY: Final = timedelta(minutes=5)  # callbacks replayed from the stream at start
ERROR_CODE_HEADER: Final = "Nats-Service-Error-Code"
ERROR_HEADER: Final = "Nats-Service-Error"


@dataclass
class Session:
    nc: Client
    requester: Requester
    options: ClientOptions


@asynccontextmanager
async def session(
    options: ClientOptions, *, callbacks: Literal["core", "jetstream"] | None = None
) -> AsyncIterator[Session]:
    """A connection and a requester; with ``callbacks``, the requester also follows its
    callbacks (``jetstream``: replayed from the stream since a few minutes ago)."""

    async def nothing() -> None:
        return None

    nc = await connect(
        options.config,
        url=options.nats_url,
        name=f"worker-cli-{options.requester_id}",
        inbox_prefix=options.inbox_prefix,
        on_reconnect=nothing,
    )
    requester = Requester(
        nc=nc, requester_id=options.requester_id, prefix=options.prefix, timeout=options.timeout
    )
    try:
        if callbacks is not None:
            await _start(requester, callbacks)
        yield Session(nc=nc, requester=requester, options=options)
    finally:
        try:
            await requester.close()
        finally:
            await nc.close()


async def _start(requester: Requester, mode: Literal["core", "jetstream"]) -> None:
    from nats.js.errors import NotFoundError

    try:
        await requester.start(mode, since=datetime.now(UTC) - CALLBACK_REPLAY)
    except NotFoundError:
        raise CommandError(
            f"no callback stream {requester.callback_stream} on this broker: are the nodes "
            "running with --callbacks core? Then pass --callbacks core"
        ) from None


# -- discovery ------------------------------------------------------------------------------


@dataclass
class Discovery:
    """Nodes of this prefix that answered $SRV.INFO, and NodeInfo heard on <p>.info.*."""

    services: dict[str, dict[str, object]] = field(default_factory=dict)
    infos: dict[str, NodeInfo] = field(default_factory=dict)

    @property
    def node_ids(self) -> list[str]:
        return sorted(set(self.services) | set(self.infos))


async def discover(nc: Client, prefix: str, timeout: float) -> Discovery:
    """The compute nodes of ``prefix`` that are up (see the module docstring)."""
    found = Discovery()
    arrived = asyncio.Event()

    async def on_service(msg: Msg) -> None:
        try:
            data = json.loads(msg.data)
            meta = data.get("metadata") or {}
            node = meta.get("node_id")
        except (ValueError, AttributeError):
            return
        if isinstance(node, str) and node and meta.get("subject_prefix") == prefix:
            found.services[node] = data
            arrived.set()

    async def on_info(msg: Msg) -> None:
        try:
            info = decode(msg.data, NodeInfo)
        except DecodeError:
            return
        if info.NodeID == msg.subject.rsplit(".", 1)[-1]:
            found.infos[info.NodeID] = info
            arrived.set()

    inbox = nc.new_inbox()
    subs = [
        await nc.subscribe(inbox, cb=on_service),
        await nc.subscribe(f"{prefix}.info.*", cb=on_info),
    ]
    try:
        await flush_subscriptions(nc, timeout)
        await nc.publish(f"$SRV.INFO.{SERVICE}", b"", reply=inbox)
        await _gather(arrived, timeout)
    finally:
        for sub in subs:
            await sub.unsubscribe()
    return found


async def _gather(arrived: asyncio.Event, timeout: float) -> None:
    """Wait for the first reply (at most ``timeout``), then until replies pause."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    wait = timeout
    while (left := end - loop.time()) > 0:
        try:
            await asyncio.wait_for(arrived.wait(), min(wait, left))
        except TimeoutError:
            return
        arrived.clear()
        wait = QUIET


async def nodes_or_fail(s: Session, wanted: Iterable[str] = ()) -> list[str]:
    """``wanted`` when given, else every node discovered (none is an error)."""
    chosen = list(wanted)
    if chosen:
        return chosen
    found = await discover(s.nc, s.options.prefix, s.options.discover_timeout)
    if not found.node_ids:
        raise CommandError(no_nodes_message(s.options))
    return found.node_ids


def no_nodes_message(options: ClientOptions) -> str:
    return (
        f"no compute node answered on {options.nats_url} with subject prefix "
        f"{options.prefix!r} within {options.discover_timeout:g}s"
    )


async def find_execution(
    s: Session, execution_id: str, nodes: Iterable[str] = ()
) -> tuple[str, ExecutionView]:
    """The node holding ``execution_id`` (of this requester) and its view."""
    with stderr_console().status(f"Looking for {execution_id}…"):
        candidates = await nodes_or_fail(s, nodes)
        results = await asyncio.gather(*(_get(s, n, execution_id) for n in candidates))
    errors: list[BaseException] = []
    for node, result in zip(candidates, results, strict=True):
        if isinstance(result, ExecutionView):
            return node, result
        if not (isinstance(result, RequestFailed) and result.code == 404):
            errors.append(result)
    if isinstance(err := next(iter(errors), None), RequestFailed):
        raise err
    where = f"node {candidates[0]}" if len(candidates) == 1 else f"any of {len(candidates)} nodes"
    detail = f" ({len(errors)} did not answer)" if errors else ""
    raise CommandError(
        f"execution {execution_id} of requester {s.options.requester_id} not found on "
        f"{where}{detail}"
    )


async def _get(s: Session, node: str, execution_id: str) -> ExecutionView | BaseException:
    try:
        return await s.requester.get_execution(node, execution_id)
    except Exception as exc:
        return exc


# -- logs -----------------------------------------------------------------------------------


def _reply_error(msg: Msg, node: str) -> RequestFailed | None:
    headers = msg.headers or {}
    if ERROR_CODE_HEADER not in headers:
        return None
    try:
        code = int(headers[ERROR_CODE_HEADER])
    except ValueError:
        code = 500
    return RequestFailed(code, headers.get(ERROR_HEADER, "error"), node_id=node)


async def stream_logs(
    s: Session,
    node: str,
    execution_id: str,
    *,
    follow: bool,
    tail: int | None,
    emit: Callable[[LogChunk], None],
) -> int | None:
    """ExecutionLogs: subscribe the log subject first, then ask; pass each chunk to
    ``emit`` in order until EOF; return its exit code.
    Without ``follow`` the EOF must come within the request timeout."""
    prefix, requester = s.options.prefix, s.options.requester_id
    subject = f"{prefix}.logs.{requester}.{node}.{execution_id}"
    queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def put(msg: Msg) -> None:
        queue.put_nowait(msg)

    sub = await s.nc.subscribe(subject, cb=put)
    try:
        await flush_subscriptions(s.nc, s.options.timeout)
        body = msgspec.json.encode(
            ExecutionLogsRequest(
                SourcePeerID=requester, ExecutionID=execution_id, Follow=follow, TailBytes=tail
            )
        )
        reply = await s.nc.request(
            f"{prefix}.compute.{node}.{requester}.ExecutionLogs/v1", body, timeout=s.options.timeout
        )
        if (error := _reply_error(reply, node)) is not None:
            raise error
        answer = decode(reply.data, ExecutionLogsResponse)
        if answer.Subject != subject:
            raise CommandError(f"node {node} streams logs on {answer.Subject}, not {subject}")
        return await _read_chunks(queue, None if follow else s.options.timeout, emit)
    finally:
        with contextlib.suppress(NatsError):  # the connection closed: nothing to undo
            await sub.unsubscribe()


async def _read_chunks(
    queue: asyncio.Queue[Msg], timeout: float | None, emit: Callable[[LogChunk], None]
) -> int | None:
    last: dict[str, int] = {}  # the Offset of the last chunk emitted, per stream
    while True:
        msg = await asyncio.wait_for(queue.get(), timeout)
        try:
            chunk = decode(msg.data, LogChunk)
        except DecodeError as exc:
            log.warning("bad log chunk: %s", exc)
            continue
        if chunk.EOF:
            return chunk.ExitCode
        # Offsets count the file's bytes, and Data is those bytes decoded with
        # replacement, so only the order of offsets is comparable: skip what repeats.
        if chunk.Offset <= last.get(chunk.Stream, -1):
            continue
        last[chunk.Stream] = chunk.Offset
        emit(chunk)
