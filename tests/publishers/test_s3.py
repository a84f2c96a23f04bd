"""The S3 publisher against moto's S3 server (real HTTP, real botocore signing)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]
import pytest
from moto.server import ThreadedMotoServer

from schemas.job import Publisher, StorageSource
from tests.publishers import Blocker, make_execution, make_results
from worker.errors import PublishError
from worker.publishers.archive import write_archive
from worker.publishers.s3 import MIB, S3Publisher, parse_params, resolve_key
from worker.store.types import Execution

CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **CREDENTIALS)


def new_bucket(s3: Any, *, versioned: bool = False) -> str:
    name = f"results-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    if versioned:
        s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def publisher(endpoint: str, **kwargs: Any) -> S3Publisher:
    return S3Publisher(default_endpoint=endpoint, client_options=CREDENTIALS, **kwargs)


def s3_execution(bucket: str, key: str, *, compress: bool, **params: Any) -> Execution:
    return make_execution(
        publisher=Publisher.S3,
        params={"Bucket": bucket, "Key": key, "Compress": compress, **params},
    )


def keys(s3: Any, bucket: str) -> list[str]:
    listed = s3.list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def versions(s3: Any, bucket: str) -> list[str]:
    listed = s3.list_object_versions(Bucket=bucket)
    return [v["Key"] for v in listed.get("Versions", []) + listed.get("DeleteMarkers", [])]


async def test_compressed(tmp_path: Path, endpoint: str, s3: Any) -> None:
    results = make_results(tmp_path / "results")
    bucket = new_bucket(s3)
    execution = s3_execution(bucket, "runs/{jobID}/{executionID}/{date}-{time}", compress=True)
    work = tmp_path / "data" / "work"  # created when missing, left empty
    spec = await publisher(endpoint, scratch_dir=work).publish(execution, results)
    assert list(work.iterdir()) == []
    key = f"runs/job-1/{execution.id}/20240309-070503.tar.gz"
    assert spec.StorageSource is StorageSource.S3
    assert spec.Name == f"s3://{bucket}/{key}"
    assert spec.S3 is not None
    assert (spec.S3.Bucket, spec.S3.Key, spec.S3.Endpoint) == (bucket, key, endpoint)
    assert keys(s3, bucket) == [key]
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    expected = tmp_path / "expected.tar.gz"
    await write_archive(results, expected)
    assert body == expected.read_bytes()
    assert spec.S3.ChecksumSHA256 == base64.b64encode(hashlib.sha256(body).digest()).decode()


async def test_uncompressed(tmp_path: Path, endpoint: str, s3: Any) -> None:
    results = make_results(tmp_path / "results")
    bucket = new_bucket(s3)
    execution = make_execution(
        publisher=Publisher.S3,
        params={"bucket": bucket, "key": "out/{executionID}", "endpoint": endpoint},
    )
    # The job chose the endpoint: the address policy applies, so loopback must be allowed.
    with pytest.raises(PublishError, match=r"refused: address 127\.0\.0\.1 is loopback"):
        await S3Publisher(client_options=CREDENTIALS).publish(execution, results)
    by_name = make_execution(
        publisher=Publisher.S3,
        params={
            "Bucket": bucket,
            "Key": "k",
            "Endpoint": endpoint.replace("127.0.0.1", "localhost"),
        },
    )
    with pytest.raises(PublishError, match="is loopback"):  # checked when resolved, too
        await S3Publisher(client_options=CREDENTIALS).publish(by_name, results)
    assert keys(s3, bucket) == []
    allowed = S3Publisher(client_options=CREDENTIALS, allow_cidr=["127.0.0.0/8"])
    spec = await allowed.publish(execution, results)
    prefix = f"out/{execution.id}/"
    assert spec.Name == f"s3://{bucket}/{prefix}"
    assert spec.S3 is not None and spec.S3.Key == prefix
    files = sorted(p for p in results.rglob("*") if p.is_file())
    assert keys(s3, bucket) == sorted(prefix + str(p.relative_to(results)) for p in files)
    for path in files:
        got = s3.get_object(Bucket=bucket, Key=prefix + str(path.relative_to(results)))
        assert got["Body"].read() == path.read_bytes()


async def test_republish_gives_the_same_result(tmp_path: Path, endpoint: str, s3: Any) -> None:
    results = make_results(tmp_path / "results")
    bucket = new_bucket(s3, versioned=True)
    execution = s3_execution(bucket, "r/{executionID}-{date}{time}", compress=True)
    first = await publisher(endpoint).publish(execution, results)
    assert first.S3 is not None and first.S3.VersionID
    # A restarted node (a new publisher), publishing again later: same key, same version.
    second = await publisher(endpoint).publish(execution, results)
    assert second == first
    assert versions(s3, bucket) == [first.S3.Key]
    plain = s3_execution(bucket, "plain/{executionID}", compress=False)
    one = await publisher(endpoint).publish(plain, results)
    count = len(versions(s3, bucket))
    assert await publisher(endpoint).publish(plain, results) == one
    assert len(versions(s3, bucket)) == count


async def test_changed_content_is_uploaded_again(tmp_path: Path, endpoint: str, s3: Any) -> None:
    results = make_results(tmp_path / "results")
    bucket = new_bucket(s3)
    execution = s3_execution(bucket, "r/{executionID}", compress=True)
    first = await publisher(endpoint).publish(execution, results)
    (results / "stdout").write_text("other\n")
    second = await publisher(endpoint).publish(execution, results)
    assert second.S3 is not None and first.S3 is not None
    assert second.S3.ChecksumSHA256 != first.S3.ChecksumSHA256


async def test_cancel_removes_the_uploaded_files(tmp_path: Path, endpoint: str, s3: Any) -> None:
    results = make_results(tmp_path / "results")
    bucket = new_bucket(s3, versioned=True)
    s3.put_object(Bucket=bucket, Key="other/keep", Body=b"not ours")
    blocker = Blocker(after=3)
    execution = s3_execution(bucket, "run/{executionID}", compress=False)
    task = asyncio.create_task(publisher(endpoint, on_progress=blocker).publish(execution, results))
    await asyncio.wait_for(blocker.reached.wait(), 30)
    assert len(keys(s3, bucket)) == 4
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert keys(s3, bucket) == ["other/keep"]
    assert versions(s3, bucket) == ["other/keep"]  # versions deleted, no delete markers


async def test_cancel_after_restart_removes_the_earlier_upload(
    tmp_path: Path, endpoint: str, s3: Any
) -> None:
    results = make_results(tmp_path / "results")
    bucket = new_bucket(s3)
    execution = s3_execution(bucket, "run/{executionID}", compress=False)
    await publisher(endpoint).publish(execution, results)
    total = len(keys(s3, bucket))
    blocker = Blocker(after=total)  # every object is found already, then it blocks
    task = asyncio.create_task(publisher(endpoint, on_progress=blocker).publish(execution, results))
    await asyncio.wait_for(blocker.reached.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert keys(s3, bucket) == []


async def test_multipart_and_its_cancel(tmp_path: Path, endpoint: str, s3: Any) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "big.bin").write_bytes(os.urandom(11 * MIB))
    bucket = new_bucket(s3)
    execution = s3_execution(bucket, "mp/{executionID}", compress=True)
    blocker = Blocker(after=2)
    task = asyncio.create_task(
        publisher(endpoint, part_size=5 * MIB, on_progress=blocker).publish(execution, results)
    )
    await asyncio.wait_for(blocker.reached.wait(), 60)
    assert len(s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert keys(s3, bucket) == []
    spec = await publisher(endpoint, part_size=5 * MIB).publish(execution, results)
    assert spec.S3 is not None
    body = s3.get_object(Bucket=bucket, Key=spec.S3.Key)["Body"].read()
    expected = tmp_path / "expected.tar.gz"
    info = await write_archive(results, expected)
    assert body == expected.read_bytes()
    assert info.size > 10 * MIB
    assert keys(s3, bucket) == [spec.S3.Key]


async def test_failures_are_publish_errors(tmp_path: Path, endpoint: str) -> None:
    results = make_results(tmp_path / "results")
    execution = s3_execution("no-such-bucket-here", "k", compress=True)
    with pytest.raises(PublishError, match="no-such-bucket-here"):
        await publisher(endpoint).publish(execution, results)


def test_params() -> None:
    assert parse_params({"BUCKET": "b", "key": "k", "Compress": "true"}).compress
    assert not parse_params({"Bucket": "b", "Key": "k"}).compress
    default = parse_params({"Bucket": "b", "Key": "k"}, default_endpoint="http://x")
    assert (default.endpoint, default.job_endpoint) == ("http://x", False)
    same = parse_params(
        {"Bucket": "b", "Key": "k", "Endpoint": "http://x/"}, default_endpoint="http://x"
    )
    assert not same.job_endpoint
    assert parse_params({"Bucket": "b", "Key": "k", "Endpoint": "http://y"}).job_endpoint
    bad_params: list[tuple[dict[str, Any], str]] = [
        ({"Key": "k"}, "Bucket is required"),
        ({"Bucket": "b"}, "Key is required"),
        ({"Bucket": "b", "Key": "k", "Compress": "maybe"}, "Compress"),
        ({"Bucket": 3, "Key": "k"}, "Bucket"),
    ]
    for bad, why in bad_params:
        with pytest.raises(PublishError, match=why):
            parse_params(bad)


def test_key_is_a_function_of_the_execution() -> None:
    execution = make_execution()
    assert resolve_key("a/{jobID}/{executionID}", execution, archive=True) == (
        f"a/job-1/{execution.id}.tar.gz"
    )
    assert resolve_key("x.tar.gz", execution, archive=True) == "x.tar.gz"
    assert resolve_key("d/{date}/{time}", execution, archive=False) == "d/20240309/070503/"
    assert resolve_key("d/", execution, archive=False) == "d/"
    with pytest.raises(PublishError, match="longer than 1024"):
        resolve_key("k" * 1100, execution, archive=False)
