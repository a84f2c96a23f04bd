"""S3 inputs: one object, or every object under a prefix, fetched with aiobotocore.

``S3.Key`` names one object, downloaded to ``dest/<last segment of the key>`` (the file is
returned), unless it ends in ``/`` or ``*`` (or is empty), or no object has that key: then
every object under the prefix (``Key`` without the ``*``; ``Key + "/"`` for a missing key)
is downloaded into ``dest`` keeping its path relative to the prefix (each checked, no
``..``, nothing written through a symlink), and ``dest`` is returned. ``VersionID`` and
``ChecksumSHA256`` apply to a single key only. The checksum is S3's: base64 (or hex) of
the SHA-256 of the object, verified against the bytes received; a multipart composite
(``...-N``) is compared with the one S3 reports. The total size is bounded by
``max_bytes``.

The endpoint is ``S3.Endpoint`` or the node's ``s3_endpoint`` (empty: AWS); credentials and
region come from the standard AWS chain (environment, config files, instance role), the
region defaulting to us-east-1. An endpoint the job chooses (one other than the node's)
gets the URL inputs' address policy, enforced in the HTTP client's resolver, so a job
cannot point the node's credentials at its internal network.

aiobotocore and botocore ship without type information; they are imported lazily (also
keeping their import cost off nodes that never see an S3 input).
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from schemas.job import S3StorageSpec, StorageSpec
from worker.errors import EngineError
from worker.storage.archive import CHUNK, Budget, NewFile, target
from worker.storage.url import (
    AddressPolicy,
    GuardedResolver,
    RefusedAddress,
    check_host,
    refused_in,
)

_CODES = {
    "NoSuchBucket": "bucket does not exist",
    "NoSuchKey": "no such key",
    "NoSuchVersion": "no such version",
    "AccessDenied": "access denied",
    "InvalidAccessKeyId": "invalid credentials",
    "SignatureDoesNotMatch": "invalid credentials",
    "InvalidArgument": "invalid argument",
}


def _errors() -> Any:
    return importlib.import_module("botocore.exceptions")


def _code(exc: Any) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _describe(where: str, exc: Any) -> str:
    code = _code(exc)
    message = getattr(exc, "response", {}).get("Error", {}).get("Message", "") or str(exc)
    return f"S3 input {where}: {_CODES.get(code, code or 'error')}: {message}"


def _verify(where: str, given: str, digest: bytes, reported: str | None) -> None:
    actual = base64.b64encode(digest).decode()
    # A multipart composite ("...-N") is not a hash of the bytes: only S3 can tell.
    composite = "-" in given
    ok = given == reported if composite else given in (actual, digest.hex(), digest.hex().upper())
    if not ok:
        raise EngineError(
            f"S3 input {where}: checksum mismatch: ChecksumSHA256 {given} but the "
            f"object's SHA-256 is {actual}"
        )


class S3:
    """``StorageSource: S3``."""

    name = "S3"

    def __init__(
        self,
        *,
        default_endpoint: str = "",
        max_bytes: int = 1 << 30,
        allow_cidr: Sequence[str] = (),
        max_objects: int = 100_000,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
    ) -> None:
        self.default_endpoint = default_endpoint
        self.max_bytes = max_bytes
        self.policy = AddressPolicy(allow_cidr)
        self.max_objects = max_objects
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._session: Any = None  # made at the first prepare; caches models and credentials

    def is_installed(self) -> bool:
        return importlib.util.find_spec("aiobotocore") is not None

    def is_local(self, spec: StorageSpec) -> bool:
        return False

    def known_size(self, spec: StorageSpec) -> int:
        return 0  # no network I/O at bid time

    async def _guard(self, endpoint: str, where: str) -> GuardedResolver:
        """Check a job-chosen endpoint now (for a clear error) and return the resolver
        that keeps checking every connection."""
        what = f"S3 input {where}: endpoint {endpoint}"
        try:
            url = URL(endpoint)
        except ValueError:
            raise EngineError(f"{what} is not a valid URL") from None
        if url.scheme not in ("http", "https"):
            raise EngineError(f"{what}: only http and https endpoints are allowed")
        check_host(url.raw_host, self.policy, what)
        resolver = GuardedResolver(self.policy)
        try:
            await resolver.resolve(url.raw_host or "", url.port or 0)
        except RefusedAddress as exc:
            raise EngineError(f"{what}: refused: {exc}") from None
        except (OSError, ValueError):
            pass  # an IP literal, or a name that does not resolve: botocore reports it
        return resolver

    async def prepare(self, spec: StorageSpec, dest: Path, *, requester: str) -> Path:
        s3 = spec.S3
        if s3 is None or not s3.Bucket:
            raise EngineError("S3 input: S3.Bucket is required")
        where = f"s3://{s3.Bucket}/{s3.Key}"
        if self._is_prefix(s3.Key) and (s3.VersionID or s3.ChecksumSHA256):
            raise self._single_key_only(where)
        resolver = None
        if s3.Endpoint and s3.Endpoint.rstrip("/") != self.default_endpoint.rstrip("/"):
            resolver = await self._guard(s3.Endpoint, where)
        errors = _errors()
        session, client_args = self._client_args(s3, resolver)
        try:
            async with session.create_client("s3", **client_args) as client:
                return await self._fetch(client, s3, dest, where)
        except EngineError:
            raise
        except errors.ClientError as exc:
            raise EngineError(_describe(where, exc)) from exc
        except (errors.BotoCoreError, aiohttp.ClientError, TimeoutError) as exc:
            refused = refused_in(exc)
            if refused is not None:
                raise EngineError(f"S3 input {where}: refused: {refused}") from exc
            raise EngineError(f"S3 input {where}: {exc}") from exc
        finally:
            if resolver is not None:
                await resolver.close()

    def _client_args(
        self, s3: S3StorageSpec, resolver: GuardedResolver | None
    ) -> tuple[Any, dict[str, Any]]:
        """The (cached) aiobotocore session, and the arguments of ``create_client``."""
        if self._session is None:
            self._session = importlib.import_module("aiobotocore.session").get_session()
        endpoint = s3.Endpoint or self.default_endpoint
        options: dict[str, Any] = {
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
            "retries": {"max_attempts": 3, "mode": "standard"},
        }
        if endpoint:
            options["s3"] = {"addressing_style": "path"}
        if resolver is not None:
            options["connector_args"] = {"resolver": resolver}
        config = importlib.import_module("aiobotocore.config").AioConfig(**options)
        region = s3.Region or self._session.get_config_variable("region") or "us-east-1"
        args: dict[str, Any] = {"region_name": region, "config": config}
        if endpoint:
            args["endpoint_url"] = endpoint
        return self._session, args

    @staticmethod
    def _is_prefix(key: str) -> bool:
        return not key or key.endswith(("/", "*"))

    @staticmethod
    def _single_key_only(where: str) -> EngineError:
        return EngineError(
            f"S3 input {where}: VersionID and ChecksumSHA256 need a single object key, not a prefix"
        )

    async def _fetch(self, client: Any, s3: S3StorageSpec, dest: Path, where: str) -> Path:
        key = s3.Key
        if self._is_prefix(key):
            return await self._prefix(client, s3, key.removesuffix("*"), dest, where)
        budget = Budget(self.max_bytes, f"S3 input {where}")
        name = key.rsplit("/", 1)[-1]
        try:
            return await self._get(client, s3, key, target(dest, name, "S3 key"), budget)
        except _errors().ClientError as exc:
            if _code(exc) not in ("NoSuchKey", "404") or s3.VersionID:
                raise
        return await self._prefix(client, s3, key + "/", dest, where, missing_key=True)

    async def _get(
        self,
        client: Any,
        s3: S3StorageSpec,
        key: str,
        path: Path,
        budget: Budget,
        *,
        single: bool = True,
    ) -> Path:
        params: dict[str, Any] = {"Bucket": s3.Bucket, "Key": key}
        if single and s3.VersionID:
            params["VersionId"] = s3.VersionID
        if single and s3.ChecksumSHA256:
            params["ChecksumMode"] = "ENABLED"
        resp = await client.get_object(**params)
        async with resp["Body"] as body:
            budget.check(int(resp.get("ContentLength") or 0))
            with NewFile(path, budget) as out:
                async for chunk in body.iter_chunks(CHUNK):
                    out.write(chunk)
                if single and s3.ChecksumSHA256:
                    where = f"s3://{s3.Bucket}/{key}"
                    reported = resp.get("ChecksumSHA256")
                    _verify(where, s3.ChecksumSHA256, out.sha256.digest(), reported)
        return path

    async def _prefix(
        self,
        client: Any,
        s3: S3StorageSpec,
        prefix: str,
        dest: Path,
        where: str,
        *,
        missing_key: bool = False,
    ) -> Path:
        if s3.VersionID or s3.ChecksumSHA256:
            raise self._single_key_only(where)
        budget = Budget(self.max_bytes, f"S3 input {where}")
        count = 0
        paginator = client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=s3.Bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = str(obj["Key"])
                if key.endswith("/"):
                    continue  # a folder marker
                count += 1
                if count > self.max_objects:
                    raise EngineError(f"S3 input {where}: more than {self.max_objects} objects")
                budget.check(int(obj.get("Size") or 0))
                rel = key[len(prefix) :].lstrip("/") or key.rsplit("/", 1)[-1]
                path = target(dest, rel, "S3 object key")
                await self._get(client, s3, key, path, budget, single=False)
        if count == 0:
            what = "no such key" if missing_key else f"no objects under prefix {prefix!r}"
            raise EngineError(f"S3 input {where}: {what}")
        return dest
