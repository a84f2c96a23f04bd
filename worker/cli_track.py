"""Following a placed execution to its end, and downloading what it published.

:func:`drive` is the requester's side of PROTOCOL.md §5 after BidAccepted: it waits for
callbacks and, whenever none came for ``poll`` seconds, asks GetExecution, so the caller
sees every state (BidAccepted, Running, …), not only those a callback reports, and a
callback lost in ``--callbacks core`` mode costs a poll, not the job. Once the result
waits for verification it sends ResultAccepted (once), then waits for the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from nats.aio.client import Client
from nats.errors import Error as NatsError

from schemas.callbacks import Callback, ComputeError, PublishResult, RunCommandResult, RunResult
from schemas.compute import ExecutionState as S
from schemas.job import StorageSource, StorageSpec
from schemas.node import ExecutionView
from worker.cli_common import CommandError
from worker.requester import Requester, RequestFailed

log = logging.getLogger(__name__)

TERMINAL: Final = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})
DOWNLOAD_CHUNK: Final = 1 << 16
_RANK: Final = {
    state: rank
    for rank, states in enumerate(
        [
            (S.UNDEFINED,),
            (S.CREATED,),
            (S.BID_ACCEPTED,),
            (S.RUNNING,),
            (S.WAITING_VERIFICATION,),
            (S.RESULT_ACCEPTED,),
            (S.PUBLISHING,),
            tuple(TERMINAL),
        ]
    )
    for state in states
}


@dataclass
class Outcome:
    """How an execution ended."""

    state: S
    run: RunCommandResult | None = None
    published: StorageSpec | None = None
    error: str = ""


async def drive(
    requester: Requester,
    node: str,
    execution_id: str,
    *,
    on_state: Callable[[S], None],
    accept_result: bool = True,
    poll: float = 0.5,
) -> Outcome:
    """Wait for ``execution_id`` on ``node`` to end, accepting its result on the way;
    ``on_state`` hears each new state. Transient request failures are retried."""
    tracker = _Tracker(on_state)
    accepted = False
    while True:
        try:
            callback = await requester.wait_callback(execution_id, None, timeout=poll)
        except TimeoutError:
            callback = None
        if callback is not None:
            done = tracker.callback(callback)
        else:
            try:
                view = await requester.get_execution(node, execution_id)
            except (NatsError, TimeoutError) as exc:  # the node is busy or away: poll again
                log.debug("GetExecution %s: %r", execution_id, exc)
                continue
            done = tracker.view(view)
        if done is not None:
            return done
        if accept_result and not accepted and tracker.state is S.WAITING_VERIFICATION:
            try:
                await requester.accept_result(node, execution_id)
            except RequestFailed as exc:
                if exc.code != 409:  # 409: it moved on already (another accept, expiry)
                    raise
            except (NatsError, TimeoutError) as exc:
                log.debug("ResultAccepted %s: %r; retrying", execution_id, exc)
                continue
            accepted = True


class _Tracker:
    def __init__(self, on_state: Callable[[S], None]) -> None:
        self.on_state = on_state
        self.state: S | None = None
        self.run: RunCommandResult | None = None

    def move(self, state: S) -> None:
        if state is not self.state:
            self.state = state
            self.on_state(state)

    def callback(self, cb: Callback) -> Outcome | None:
        if isinstance(cb, RunResult):
            self.run = cb.RunCommandResult
            if self.state not in (S.RESULT_ACCEPTED, S.PUBLISHING):
                self.move(S.WAITING_VERIFICATION)
            return None
        if isinstance(cb, PublishResult):
            self.move(S.COMPLETED)
            return Outcome(S.COMPLETED, self.run, cb.PublishResult)
        if isinstance(cb, ComputeError):
            self.move(S.FAILED)
            return Outcome(S.FAILED, self.run, error=cb.Err)
        self.move(S.CANCELLED)
        return Outcome(S.CANCELLED, self.run)

    def view(self, view: ExecutionView) -> Outcome | None:
        detail = view.Execution
        if detail.RunCommandResult is not None:
            self.run = detail.RunCommandResult
        if self.state is not None and _RANK[detail.State] < _RANK[self.state]:
            return None  # never show a state moving backwards
        self.move(detail.State)
        if detail.State not in TERMINAL:
            return None
        error = detail.LatestComment if detail.State is S.FAILED else ""
        return Outcome(detail.State, self.run, detail.PublishResult, error)


# -- download -------------------------------------------------------------------------------


async def download(
    nc: Client, spec: StorageSpec, execution_id: str, dest: Path, *, max_bytes: int
) -> Path:
    """Fetch a Local (URLDownload of a ``.tar.gz``) or ObjectStore result and extract it
    safely into ``dest/<execution_id>``; return that folder."""
    from worker.errors import EngineError
    from worker.storage.archive import extract

    target = dest / execution_id
    if target.exists():
        raise CommandError(f"{target} exists already: remove it or choose another --download")
    dest.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".download-", suffix=".tar.gz", dir=dest)
    os.close(fd)
    archive = Path(name)
    try:
        if spec.StorageSource is StorageSource.URL_DOWNLOAD and spec.URL:
            await _http_get(spec.URL, archive, max_bytes)
        elif spec.StorageSource is StorageSource.OBJECT_STORE:
            await _object_get(nc, spec, archive, max_bytes)
        else:
            source = spec.StorageSource.value if spec.StorageSource else "no storage"
            raise CommandError(
                f"the result was published to {source}: only Local (URLDownload) and "
                "ObjectStore results can be downloaded"
            )
        try:
            await asyncio.to_thread(
                extract, archive, target, kind="tar", max_bytes=max_bytes, what="result"
            )
        except EngineError as exc:
            raise CommandError(str(exc)) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            archive.unlink()
    return target


async def _http_get(url: str, path: Path, max_bytes: int) -> None:
    import aiohttp

    try:
        async with (
            aiohttp.ClientSession(auto_decompress=False) as http,
            http.get(url, timeout=aiohttp.ClientTimeout(sock_connect=10, sock_read=60)) as resp,
        ):
            if resp.status != 200:
                raise CommandError(f"GET {url}: HTTP {resp.status}")
            size = 0
            with path.open("wb") as out:
                async for block in resp.content.iter_chunked(DOWNLOAD_CHUNK):
                    size += len(block)
                    if size > max_bytes:
                        raise CommandError(f"{url} is larger than {max_bytes} bytes")
                    out.write(block)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CommandError(f"GET {url}: {exc!r}") from exc


async def _object_get(nc: Client, spec: StorageSpec, path: Path, max_bytes: int) -> None:
    from nats.js.errors import BucketNotFoundError, ObjectNotFoundError

    bucket, name = str(spec.Metadata.get("Bucket", "")), str(spec.Metadata.get("Object", ""))
    if not bucket or not name:
        raise CommandError("the ObjectStore result names no Bucket and Object")
    size = spec.Metadata.get("Size")
    if isinstance(size, int) and size > max_bytes:
        raise CommandError(f"{bucket}/{name} is larger than {max_bytes} bytes")
    try:
        store = await nc.jetstream().object_store(bucket)
        result = await store.get(name)
    except (BucketNotFoundError, ObjectNotFoundError):
        raise CommandError(f"object {bucket}/{name} not found") from None
    except (NatsError, TimeoutError) as exc:
        raise CommandError(f"object {bucket}/{name}: {exc!r}") from exc
    data = result.data or b""
    expected = str(spec.Metadata.get("SHA256", "")).lower()
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise CommandError(f"object {bucket}/{name} does not match its SHA256")
    path.write_bytes(data)
