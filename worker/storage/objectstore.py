"""ObjectStore inputs: an object of a NATS JetStream object store on the node's broker.

``Metadata {Bucket, Object, Size, SHA256}``. **Isolation rule:** a requester may read only
objects whose name starts with ``<requester>/`` (its ``SourcePeerID``), in any bucket;
anything else is refused before the broker is asked. The requester must be a single name
(no ``/``), so no requester's prefix contains another's, and the rest of the object name
must be a relative path without ``..``. Object-store *links* are refused, not followed: a
link under one's own prefix could point at another requester's object (nats-py's ``get``
follows links into any bucket), so the chunks are read here, from the stream of the
object's own bucket, by the object's ``nuid`` as first looked up.

The object is written to ``dest/<last segment of the name>`` and that file is returned.
Its size is bounded by ``max_bytes`` (checked up front and while reading), and it is
verified against the object's own digest and, when given, ``Metadata.Size`` and
``Metadata.SHA256`` (hex, or base64 / base64url of the SHA-256). The size known at bid
time is ``Metadata.Size``.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client

from schemas.job import StorageSpec
from worker.errors import EngineError
from worker.storage.archive import Budget, NewFile, target
from worker.storage.paths import check_name, check_relative

_BUCKET = re.compile(r"[A-Za-z0-9_-]+")


def _size(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _matches(given: str, digest: bytes) -> bool:
    given = given.strip()
    if given.lower().startswith("sha-256="):
        given = given[len("sha-256=") :]
    forms = {
        digest.hex(),
        base64.b64encode(digest).decode(),
        base64.urlsafe_b64encode(digest).decode(),
    }
    return given in forms or given.lower() in forms


class ObjectStore:
    """``StorageSource: ObjectStore``; ``connection`` returns the node's connected client
    (or None while it has none)."""

    name = "ObjectStore"

    def __init__(
        self,
        *,
        connection: Callable[[], Client | None],
        max_bytes: int = 1 << 30,
        chunk_timeout: float = 30.0,
    ) -> None:
        self.connection = connection
        self.max_bytes = max_bytes
        self.chunk_timeout = chunk_timeout

    def is_installed(self) -> bool:
        return True

    def is_local(self, spec: StorageSpec) -> bool:
        return False

    def known_size(self, spec: StorageSpec) -> int:
        return _size(spec.Metadata.get("Size")) or 0

    @staticmethod
    def check(spec: StorageSpec, requester: str) -> tuple[str, str, str]:
        """(bucket, object, file name) when ``requester`` may read the object."""
        bucket = spec.Metadata.get("Bucket")
        obj = spec.Metadata.get("Object")
        if not isinstance(bucket, str) or not _BUCKET.fullmatch(bucket):
            raise EngineError(f"ObjectStore input: invalid Metadata.Bucket {bucket!r}")
        if not isinstance(obj, str) or not obj:
            raise EngineError("ObjectStore input: Metadata.Object is required")
        try:
            check_name(requester, "requester")
        except EngineError:
            raise EngineError(
                f"ObjectStore input {bucket}/{obj}: requester {requester!r} cannot own objects"
            ) from None
        prefix = f"{requester}/"
        rest = obj[len(prefix) :] if obj.startswith(prefix) else ""
        if not rest:
            raise EngineError(
                f"ObjectStore input {bucket}/{obj}: refused: a requester may only read "
                f"objects named {prefix}..."
            )
        parts = check_relative(rest, "ObjectStore object name").parts
        if not parts:
            raise EngineError(f"ObjectStore input {bucket}/{obj}: invalid object name")
        return bucket, obj, parts[-1]

    async def prepare(self, spec: StorageSpec, dest: Path, *, requester: str) -> Path:
        bucket, obj, file_name = self.check(spec, requester)
        where = f"ObjectStore input {bucket}/{obj}"
        nc = self.connection()
        if nc is None or not nc.is_connected:
            raise EngineError(f"{where}: not connected to the broker")
        js = nc.jetstream()
        try:
            store = await js.object_store(bucket)
            info = await store.get_info(obj)
        except nats.js.errors.BucketNotFoundError:
            raise EngineError(f"{where}: no such bucket") from None
        except nats.js.errors.ObjectNotFoundError:
            raise EngineError(f"{where}: no such object") from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise EngineError(f"{where}: {exc!r}") from exc
        if info.is_link():
            raise EngineError(f"{where}: refused: object links are not followed")
        size = int(info.size or 0)
        wanted_size = _size(spec.Metadata.get("Size"))
        if wanted_size is not None and wanted_size != size:
            raise EngineError(f"{where}: size mismatch: Metadata.Size {wanted_size}, object {size}")
        budget = Budget(self.max_bytes, where)
        budget.check(size)
        path = target(dest, file_name, "ObjectStore object name")
        with NewFile(path, budget) as out:
            if size:
                await self._read(js, bucket, str(info.nuid), size, out, where)
            digest = out.sha256.digest()
            if info.digest and not _matches(info.digest, digest):
                raise EngineError(f"{where}: digest mismatch with the object store's digest")
            wanted = spec.Metadata.get("SHA256")
            if wanted and not (isinstance(wanted, str) and _matches(wanted, digest)):
                raise EngineError(
                    f"{where}: SHA256 mismatch: Metadata.SHA256 {wanted}, object {digest.hex()}"
                )
        return path

    async def _read(
        self, js: Any, bucket: str, nuid: str, size: int, out: NewFile, where: str
    ) -> None:
        """The chunks of object ``nuid`` of ``bucket``, in order, into ``out``."""
        sub = await js.subscribe(
            f"$O.{bucket}.C.{nuid}", stream=f"OBJ_{bucket}", ordered_consumer=True
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=self.chunk_timeout)
                except (nats.errors.TimeoutError, TimeoutError):
                    raise EngineError(f"{where}: timed out reading the object") from None
                out.write(msg.data)
                if out.size > size:
                    raise EngineError(f"{where}: object is larger than its recorded size")
                if msg.metadata.num_pending == 0:
                    break
        finally:
            await sub.unsubscribe()
        if out.size != size:
            raise EngineError(f"{where}: object is shorter than its recorded size")
