"""The S3 publisher (Bacalhau v1.0's ``publisher/s3``; reference §3.6).

``Spec.PublisherSpec = {Type: S3, Params: {Bucket, Key, Endpoint, Region, Compress}}``
(keys matched case-insensitively; Bucket and Key required; Endpoint defaults to the node's
``--s3-endpoint``, Region to the AWS config's, else us-east-1). Credentials come from the
usual AWS chain (environment, shared files, instance role). An Endpoint the job chooses
(other than the node's) gets the address policy of URL and S3 inputs
(:mod:`worker.storage.url`: no loopback, private, link-local… addresses unless in
``url_input_allow_cidr``), enforced in the HTTP client's resolver, so a job cannot aim the
node's credentials at its internal network.

**Key.** As in Bacalhau (``ParsePublishedKey``): with ``Compress`` the key gets ``.tar.gz``
appended unless it ends so, and the deterministic archive (:mod:`worker.publishers.archive`)
is uploaded there; without it the key gets a trailing ``/`` and every file is uploaded to
``<key><relative path>``. Placeholders: ``{executionID}``, ``{jobID}``, ``{date}``
(``YYYYMMDD``) and ``{time}`` (``HHMMSS``). PROTOCOL.md §7 wants the key resolved once and
persisted so that a re-publish after a restart yields the same result. The store has no
field for it, so the key is a *pure function of the execution*: ``{date}``/``{time}`` are
the execution's ``create_time`` in UTC, not the time of publishing (Bacalhau v1.0.x
inserted the literal layout strings, a bug; later versions used the current time). So
every attempt, before or after a restart, resolves the same key.

**Idempotent.** Each object carries ``x-amz-meta-sha256`` (hex of its content) and
``x-amz-meta-execution-id``. An object already holding the same content for the same
execution is not uploaded again and its version is reused, so a re-publish returns the same
``StorageSpec`` even in a versioned bucket.

**Cancel and failure.** When ``publish`` is cancelled or fails, it aborts an unfinished
multipart upload and deletes the objects (the versions, in a versioned bucket) this attempt
uploaded or found from an earlier attempt of the same execution, then re-raises; retries
start from scratch.

Returns ``{StorageSource: S3, Name: "s3://<bucket>/<key>", S3: {Bucket, Key, Region,
Endpoint, ChecksumSHA256, VersionID}}``; checksum and version only for the archive, as
the server reports them (base64 SHA-256, ``<base64>-<parts>`` for a multipart upload; empty
when it reports none).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import get_session  # type: ignore[import-untyped]
from yarl import URL

from schemas.job import Publisher as PublisherName
from schemas.job import S3StorageSpec, StorageSource, StorageSpec
from worker.errors import EngineError, PublishError
from worker.publishers.archive import entries, run_to_end, scratch, write_archive
from worker.storage.url import AddressPolicy, GuardedResolver, check_host, refused_in
from worker.store.types import Execution

log = logging.getLogger(__name__)

MIB = 1 << 20
MAX_KEY_BYTES = 1024
Progress = Callable[[str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class S3Params:
    bucket: str
    key: str
    endpoint: str = ""
    region: str = ""
    compress: bool = False
    job_endpoint: bool = False  # chosen by the job, not the node's default


TRUE = frozenset({"true", "1", "yes"})
FALSE = frozenset({"false", "0", "no", ""})


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text in TRUE or text in FALSE:
        return text in TRUE
    raise PublishError(f"invalid S3 publisher param Compress: {value!r} (expected a boolean)")


def parse_params(params: Mapping[str, Any], *, default_endpoint: str = "") -> S3Params:
    """The publisher params, or ``PublishError`` naming what is wrong."""
    lowered = {str(k).lower(): v for k, v in params.items()}
    text: dict[str, str] = {}
    for name in ("bucket", "key", "endpoint", "region"):
        value = lowered.get(name, "")
        if not isinstance(value, str):
            raise PublishError(f"invalid S3 publisher param {name.title()}: expected a string")
        text[name] = value.strip()
    if not text["bucket"]:
        raise PublishError("invalid S3 publisher params: Bucket is required")
    if not text["key"]:
        raise PublishError("invalid S3 publisher params: Key is required")
    chosen = text["endpoint"]
    return S3Params(
        bucket=text["bucket"],
        key=text["key"],
        endpoint=chosen or default_endpoint,
        region=text["region"],
        compress=_flag(lowered.get("compress", False)),
        job_endpoint=bool(chosen) and chosen.rstrip("/") != default_endpoint.rstrip("/"),
    )


def resolve_key(template: str, execution: Execution, *, archive: bool) -> str:
    """The object key (or key prefix) of ``execution``: a pure function of it."""
    key = template
    if archive and not key.endswith(".tar.gz"):
        key += ".tar.gz"
    if not archive and not key.endswith("/"):
        key += "/"
    created = execution.create_time
    if created.tzinfo is not None:  # naive times are UTC already (the store's convention)
        created = created.astimezone(UTC)
    for placeholder, value in (
        ("{executionID}", execution.id),
        ("{jobID}", execution.job_id),
        ("{date}", created.strftime("%Y%m%d")),
        ("{time}", created.strftime("%H%M%S")),
    ):
        key = key.replace(placeholder, value)
    if len(key.encode()) > MAX_KEY_BYTES:
        raise PublishError(f"S3 key {key[:64]!r}… is longer than {MAX_KEY_BYTES} bytes")
    return key


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


@dataclass(slots=True)
class _Upload:
    """What one publish attempt put in the bucket, to undo it on cancel or failure."""

    client: Any
    bucket: str
    objects: list[tuple[str, str]] = field(default_factory=list)  # (key, version id)
    multipart: dict[str, str] = field(default_factory=dict)  # key → upload id
    pending: str = ""  # key of the object being sent

    async def undo(self) -> None:
        if self.pending:  # an interrupted send may have stored it (a delete marker if versioned)
            self.objects.append((self.pending, ""))
        for key, upload_id in list(self.multipart.items()):
            with contextlib.suppress(Exception):
                await self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id
                )
        for key, version in reversed(self.objects):
            extra = {"VersionId": version} if version else {}
            try:
                await self.client.delete_object(Bucket=self.bucket, Key=key, **extra)
            except Exception as exc:
                log.warning("could not delete s3://%s/%s: %r", self.bucket, key, exc)


class S3Publisher:
    name = PublisherName.S3.value

    def __init__(
        self,
        *,
        default_endpoint: str = "",
        allow_cidr: Sequence[str] = (),
        scratch_dir: Path | None = None,
        part_size: int = 16 * MIB,
        client_options: Mapping[str, Any] | None = None,
        on_progress: Progress | None = None,
    ) -> None:
        """``default_endpoint`` is the node's ``--s3-endpoint``; ``allow_cidr`` (the node's
        ``url_input_allow_cidr``) lets a job-chosen endpoint reach those private ranges;
        ``scratch_dir`` holds the archive while it uploads (default: the temp dir);
        ``part_size`` (≥ 5 MiB) is the multipart threshold and part size;
        ``client_options`` go to ``create_client`` (credentials, for instance);
        ``on_progress(key)`` is awaited after each object is stored (or found stored by an
        earlier attempt) and after each part (``<key>#<n>``) of a multipart upload."""
        if part_size < 5 * MIB:
            raise ValueError("part_size must be at least 5 MiB (the S3 minimum)")
        self.default_endpoint = default_endpoint
        self.policy = AddressPolicy(allow_cidr)
        self.scratch_dir = scratch_dir
        self.part_size = part_size
        self.client_options = dict(client_options or {})
        self.on_progress = on_progress

    def is_installed(self) -> bool:
        return True

    def _guard(self, params: S3Params) -> GuardedResolver | None:
        """The resolver that keeps a job-chosen endpoint off the node's network (the S3
        and URL inputs' address policy); None for the node's own endpoint."""
        if not params.job_endpoint:
            return None
        what = f"S3 publisher endpoint {params.endpoint}"
        try:
            url = URL(params.endpoint)
        except ValueError:
            raise PublishError(f"{what} is not a valid URL") from None
        if url.scheme not in ("http", "https"):
            raise PublishError(f"{what}: only http and https endpoints are allowed")
        try:
            check_host(url.raw_host, self.policy, what)
        except EngineError as exc:
            raise PublishError(exc.message) from None
        return GuardedResolver(self.policy)

    @contextlib.asynccontextmanager
    async def _client(self, params: S3Params) -> AsyncIterator[Any]:
        session = get_session()
        config: dict[str, Any] = {
            "retries": {"max_attempts": 3, "mode": "standard"},
            "connect_timeout": 10,
            "read_timeout": 60,
        }
        options: dict[str, Any] = {
            "region_name": params.region or session.get_config_variable("region") or "us-east-1"
        }
        if params.endpoint:
            config["s3"] = {"addressing_style": "path"}
            options["endpoint_url"] = params.endpoint
        resolver = self._guard(params)
        if resolver is not None:
            config["connector_args"] = {"resolver": resolver}
        options["config"] = AioConfig(**config)
        options.update(self.client_options)
        async with session.create_client("s3", **options) as client:
            yield client

    async def publish(self, execution: Execution, results_dir: Path) -> StorageSpec:
        spec = execution.job.Spec.PublisherSpec
        params = parse_params(
            spec.Params if spec is not None else {}, default_endpoint=self.default_endpoint
        )
        key = resolve_key(params.key, execution, archive=params.compress)
        try:
            async with self._client(params) as client:
                upload = _Upload(client, params.bucket)
                try:
                    checksum, version = await self._upload(
                        upload, execution, results_dir, key, params
                    )
                except BaseException:
                    await run_to_end(upload.undo())
                    raise
        except (PublishError, asyncio.CancelledError):
            raise
        except Exception as exc:
            refused = refused_in(exc)
            if refused is not None:
                raise PublishError(
                    f"S3 publisher endpoint {params.endpoint}: refused: {refused}"
                ) from exc
            raise PublishError(f"S3 upload to s3://{params.bucket}/{key} failed: {exc}") from exc
        return StorageSpec(
            StorageSource=StorageSource.S3,
            Name=f"s3://{params.bucket}/{key}",
            S3=S3StorageSpec(
                Bucket=params.bucket,
                Key=key,
                Region=params.region,
                Endpoint=params.endpoint,
                ChecksumSHA256=checksum,
                VersionID=version,
            ),
        )

    async def _upload(
        self, upload: _Upload, execution: Execution, results_dir: Path, key: str, params: S3Params
    ) -> tuple[str, str]:
        if not params.compress:
            for entry in await asyncio.to_thread(entries, results_dir):
                if not entry.is_dir:
                    sha = await asyncio.to_thread(_sha256_file, entry.path)
                    await self._put(upload, execution, key + entry.name, entry.path, sha)
            return "", ""
        with scratch(self.scratch_dir, "s3-publish-") as tmp:
            archive = Path(tmp) / "results.tar.gz"
            info = await write_archive(results_dir, archive)
            return await self._put(upload, execution, key, archive, info.sha256, "application/gzip")

    async def _put(
        self,
        upload: _Upload,
        execution: Execution,
        key: str,
        path: Path,
        sha: str,
        content_type: str = "application/octet-stream",
    ) -> tuple[str, str]:
        """Store one file (unless the same content is there already) → (checksum, version)."""
        meta = {"sha256": sha, "execution-id": execution.id}
        existing = await self._existing(upload.client, upload.bucket, key)
        if existing is not None and existing.get("Metadata", {}) == meta:
            res = existing  # stored by an earlier attempt: not uploaded again
        else:
            upload.pending = key  # it may get stored even if the send is interrupted
            res = await self._send(upload, key, path, sha, meta, content_type)
            upload.pending = ""
        version = str(res.get("VersionId") or "")
        upload.objects.append((key, version))
        upload.multipart.pop(key, None)
        if self.on_progress is not None:
            await self.on_progress(key)
        return str(res.get("ChecksumSHA256") or ""), version

    async def _send(
        self,
        upload: _Upload,
        key: str,
        path: Path,
        sha: str,
        meta: dict[str, str],
        content_type: str,
    ) -> dict[str, Any]:
        client = upload.client
        size = path.stat().st_size
        put = {"Bucket": upload.bucket, "Key": key, "Metadata": meta, "ContentType": content_type}
        if size <= self.part_size:
            body = await asyncio.to_thread(path.read_bytes)
            res: dict[str, Any] = await client.put_object(
                **put, Body=body, ChecksumAlgorithm="SHA256", ChecksumSHA256=_b64(sha)
            )
            return res
        return await self._multipart(upload, key, path, put)

    @staticmethod
    async def _existing(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = await client.head_object(
                Bucket=bucket, Key=key, ChecksumMode="ENABLED"
            )
        except client.exceptions.ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return head

    async def _multipart(
        self, upload: _Upload, key: str, path: Path, put: dict[str, Any]
    ) -> dict[str, Any]:
        client = upload.client
        created = await client.create_multipart_upload(**put, ChecksumAlgorithm="SHA256")
        upload_id = created["UploadId"]
        upload.multipart[key] = upload_id
        parts: list[dict[str, Any]] = []
        with path.open("rb") as f:
            while chunk := await asyncio.to_thread(f.read, self.part_size):
                number = len(parts) + 1
                part_sha = base64.b64encode(hashlib.sha256(chunk).digest()).decode()
                res = await client.upload_part(
                    Bucket=upload.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=chunk,
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=part_sha,
                )
                parts.append(
                    {"ETag": res["ETag"], "PartNumber": number, "ChecksumSHA256": part_sha}
                )
                if self.on_progress is not None:
                    await self.on_progress(f"{key}#{number}")
        done: dict[str, Any] = await client.complete_multipart_upload(
            Bucket=upload.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )
        return done
