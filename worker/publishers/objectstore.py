"""The ObjectStore publisher: results into a NATS JetStream object store (PROTOCOL.md §7).

``Spec.PublisherSpec = {Type: ObjectStore, Params: {Bucket}}`` (key matched
case-insensitively). The bucket is the operator's: it must exist (``nats object add``);
the node never creates it. The deterministic archive of the results folder
(:mod:`worker.publishers.archive`) is stored as the object
``<requester>/<ExecutionID>.tar.gz``: each requester's objects live under its own
``<requester>/`` prefix, the isolation rule of ObjectStore inputs
(:mod:`worker.storage.objectstore`), so a broker account can confine each requester to its
prefix. The result is ``{StorageSource: ObjectStore, Metadata: {Bucket, Object, Size,
SHA256}}`` with ``SHA256`` the hex SHA-256 of the archive (the object's ``SHA-256=`` digest
is the same hash in base64url).

The object is written in the wire format of nats.go / nats-py (chunks on
``$O.<bucket>.C.<nuid>``, then a roll-up meta message on ``$O.<bucket>.M.<base64url name>``)
by this module rather than by nats-py's ``ObjectStore.put``, which leaves its chunks behind
when cancelled. Here a cancelled or failed publish purges the chunks it sent and, if its meta
message got through, marks the object deleted. A re-publish finds the object with the same
digest and size and uploads nothing, so it returns the same result.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError
from nats.js.kv import MSG_ROLLUP_SUBJECT
from nats.nuid import NUID

from schemas.job import Publisher as PublisherName
from schemas.job import StorageSource, StorageSpec
from worker.errors import PublishError
from worker.publishers.archive import ArchiveInfo, run_to_end, scratch, write_archive
from worker.store.types import Execution

CHUNK_SIZE = 128 * 1024  # nats.go's and nats-py's default
READ_SIZE = 8 * CHUNK_SIZE
BUCKET_RE = re.compile(r"[A-Za-z0-9_-]+")
Progress = Callable[[str], Awaitable[None]]


def object_name(execution: Execution) -> str:
    """``<requester>/<ExecutionID>.tar.gz`` (both are checked subject tokens)."""
    return f"{execution.requester}/{execution.id}.tar.gz"


def bucket_param(params: dict[str, Any]) -> str:
    lowered = {str(k).lower(): v for k, v in params.items()}
    bucket = lowered.get("bucket", "")
    if not isinstance(bucket, str) or not bucket:
        raise PublishError("invalid ObjectStore publisher params: Bucket is required")
    if BUCKET_RE.fullmatch(bucket) is None:
        raise PublishError(f"invalid ObjectStore bucket name {bucket!r}")
    return bucket


def digest_of(sha256_hex: str) -> str:
    return "SHA-256=" + base64.urlsafe_b64encode(bytes.fromhex(sha256_hex)).decode()


def meta_subject(bucket: str, name: str) -> str:
    return f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


class ObjectStorePublisher:
    name = PublisherName.OBJECT_STORE.value

    def __init__(
        self,
        *,
        connection: Callable[[], Client | None],
        scratch_dir: Path | None = None,
        on_progress: Progress | None = None,
    ) -> None:
        """``connection`` returns the node's connected client, or None while it has none
        (as for ObjectStore inputs: the node connects after building its plugins);
        ``scratch_dir`` holds the archive while it uploads (default: the temp dir);
        ``on_progress(subject)`` is awaited after each chunk is stored."""
        self.connection = connection
        self.scratch_dir = scratch_dir
        self.on_progress = on_progress
        self._nuid = NUID()

    def is_installed(self) -> bool:
        return True

    def _js(self) -> JetStreamContext:
        nc = self.connection()
        if nc is None or not nc.is_connected:
            raise PublishError("ObjectStore publisher: not connected to the broker")
        return nc.jetstream()

    async def publish(self, execution: Execution, results_dir: Path) -> StorageSpec:
        spec = execution.job.Spec.PublisherSpec
        bucket = bucket_param(spec.Params if spec is not None else {})
        name = object_name(execution)
        js = self._js()
        try:
            await js.object_store(bucket)
        except BucketNotFoundError:
            raise PublishError(f"object store bucket {bucket} not found") from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise PublishError(f"object store bucket {bucket}: {exc!r}") from exc
        nuid = self._nuid.next().decode()
        try:
            with scratch(self.scratch_dir, "os-publish-") as tmp:
                archive = Path(tmp) / "results.tar.gz"
                info = await write_archive(results_dir, archive)
                await self._store(js, bucket, name, nuid, archive, info)
        except BaseException as exc:
            await run_to_end(self._remove(js, bucket, name, nuid))
            if isinstance(exc, PublishError | asyncio.CancelledError) or not isinstance(
                exc, Exception
            ):
                raise
            raise PublishError(f"object store upload of {bucket}/{name} failed: {exc!r}") from exc
        return StorageSpec(
            StorageSource=StorageSource.OBJECT_STORE,
            Name=f"{bucket}/{name}",
            Metadata={"Bucket": bucket, "Object": name, "Size": info.size, "SHA256": info.sha256},
        )

    async def _existing(
        self, js: JetStreamContext, bucket: str, name: str
    ) -> api.ObjectInfo | None:
        try:
            msg = await js.get_last_msg(f"OBJ_{bucket}", meta_subject(bucket, name))
        except (NotFoundError, ObjectNotFoundError):
            return None
        found = api.ObjectInfo.from_response(json.loads(msg.data or b"{}"))
        return None if found.deleted else found

    async def _store(
        self,
        js: JetStreamContext,
        bucket: str,
        name: str,
        nuid: str,
        path: Path,
        archive: ArchiveInfo,
    ) -> None:
        digest = digest_of(archive.sha256)
        before = await self._existing(js, bucket, name)
        if before is not None and before.digest == digest and before.size == archive.size:
            return  # the same content is there already (a re-publish)
        sent = await self._send_chunks(js, f"$O.{bucket}.C.{nuid}", path)
        info = api.ObjectInfo(
            name=name,
            bucket=bucket,
            nuid=nuid,
            size=archive.size,
            chunks=sent,
            digest=digest,
            mtime=datetime.now(UTC).isoformat(),
            options=api.ObjectMetaOptions(max_chunk_size=CHUNK_SIZE),
        )
        await js.publish(
            meta_subject(bucket, name),
            json.dumps(info.as_dict()).encode(),
            headers={api.Header.ROLLUP: MSG_ROLLUP_SUBJECT},
        )
        if before is not None and before.nuid != nuid:
            await js.purge_stream(f"OBJ_{bucket}", subject=f"$O.{bucket}.C.{before.nuid}")

    async def _send_chunks(self, js: JetStreamContext, subject: str, path: Path) -> int:
        sent = 0
        with path.open("rb") as f:
            while block := await asyncio.to_thread(f.read, READ_SIZE):
                for start in range(0, len(block), CHUNK_SIZE):
                    await js.publish(subject, block[start : start + CHUNK_SIZE])
                    sent += 1
                    if self.on_progress is not None:
                        await self.on_progress(subject)
        return sent

    async def _remove(self, js: JetStreamContext, bucket: str, name: str, nuid: str) -> None:
        """Undo an interrupted publish: the chunks it sent and the execution's object,
        whichever attempt stored it (a deleted-marker roll-up, as ``delete`` does)."""
        stream = f"OBJ_{bucket}"
        with contextlib.suppress(Exception):
            nc = self.connection()
            if nc is not None:
                await nc.flush(timeout=5)  # let in-flight chunks land before the purge
        with contextlib.suppress(Exception):
            found = await self._existing(js, bucket, name)
            if found is not None:
                marker = api.ObjectInfo(
                    name=name,
                    bucket=bucket,
                    nuid=found.nuid,
                    size=0,
                    chunks=0,
                    digest="",
                    deleted=True,
                )
                await js.publish(
                    meta_subject(bucket, name),
                    json.dumps(marker.as_dict()).encode(),
                    headers={api.Header.ROLLUP: MSG_ROLLUP_SUBJECT},
                )
                await js.purge_stream(stream, subject=f"$O.{bucket}.C.{found.nuid}")
        with contextlib.suppress(Exception):
            await js.purge_stream(stream, subject=f"$O.{bucket}.C.{nuid}")
