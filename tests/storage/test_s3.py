"""S3 inputs against moto's S3 server on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import importlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas.job import S3StorageSpec, StorageSource, StorageSpec
from worker.errors import EngineError
from worker.storage.s3 import S3

# moto's server and boto3 ship without type information.
ThreadedMotoServer: Any = importlib.import_module("moto.server").ThreadedMotoServer


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials from the standard chain (the environment here), nothing from the host."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def client(endpoint: str, aws_env: None) -> Any:
    boto3 = importlib.import_module("boto3")
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


@pytest.fixture
def bucket(client: Any) -> str:
    name = f"in-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    for key, body in {
        "data/a.txt": b"alpha",
        "data/sub/b.txt": b"beta",
        "data/": b"",  # a folder marker
        "datafile": b"not under data/",
        "one.bin": b"single",
    }.items():
        client.put_object(Bucket=name, Key=key, Body=body)
    return name


def spec(bucket: str, key: str, **fields: str) -> StorageSpec:
    return StorageSpec(
        StorageSource=StorageSource.S3, S3=S3StorageSpec(Bucket=bucket, Key=key, **fields)
    )


def files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


async def test_single_key(endpoint: str, bucket: str, tmp_path: Path) -> None:
    provider = S3(default_endpoint=endpoint)
    assert provider.is_installed() and not provider.is_local(spec(bucket, "one.bin"))
    assert provider.known_size(spec(bucket, "one.bin")) == 0
    path = await provider.prepare(spec(bucket, "one.bin"), tmp_path, requester="r")
    assert path == tmp_path / "one.bin"
    assert path.read_bytes() == b"single"


@pytest.mark.parametrize("key", ["data/", "data/*", "data"])
async def test_prefix(endpoint: str, bucket: str, tmp_path: Path, key: str) -> None:
    path = await S3(default_endpoint=endpoint).prepare(spec(bucket, key), tmp_path, requester="r")
    assert path == tmp_path
    assert files(tmp_path) == {"a.txt": b"alpha", "sub/b.txt": b"beta"}


async def test_wildcard_prefix_without_a_slash(endpoint: str, bucket: str, tmp_path: Path) -> None:
    await S3(default_endpoint=endpoint).prepare(spec(bucket, "data*"), tmp_path, requester="r")
    assert files(tmp_path) == {"a.txt": b"alpha", "sub/b.txt": b"beta", "file": b"not under data/"}


async def test_version(endpoint: str, client: Any, bucket: str, tmp_path: Path) -> None:
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    first = client.put_object(Bucket=bucket, Key="v.txt", Body=b"one")["VersionId"]
    client.put_object(Bucket=bucket, Key="v.txt", Body=b"two")
    provider = S3(default_endpoint=endpoint)
    (tmp_path / "a").mkdir()
    old = await provider.prepare(
        spec(bucket, "v.txt", VersionID=first), tmp_path / "a", requester="r"
    )
    assert old.read_bytes() == b"one"
    (tmp_path / "b").mkdir()
    new = await provider.prepare(spec(bucket, "v.txt"), tmp_path / "b", requester="r")
    assert new.read_bytes() == b"two"


async def test_checksum(endpoint: str, client: Any, bucket: str, tmp_path: Path) -> None:
    put = client.put_object(
        Bucket=bucket, Key="c.txt", Body=b"check me", ChecksumAlgorithm="SHA256"
    )
    digest = hashlib.sha256(b"check me").digest()
    assert put["ChecksumSHA256"] == base64.b64encode(digest).decode()
    provider = S3(default_endpoint=endpoint)
    for i, given in enumerate([put["ChecksumSHA256"], digest.hex()]):
        dest = tmp_path / str(i)
        dest.mkdir()
        path = await provider.prepare(
            spec(bucket, "c.txt", ChecksumSHA256=given), dest, requester="r"
        )
        assert path.read_bytes() == b"check me"
    wrong = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    with pytest.raises(EngineError, match="checksum mismatch"):
        await provider.prepare(spec(bucket, "c.txt", ChecksumSHA256=wrong), tmp_path, requester="r")
    assert not (tmp_path / "c.txt").exists()


@pytest.mark.parametrize(
    ("bucket_name", "key", "message"),
    [
        ("no-such-bucket-x", "one.bin", "bucket does not exist"),
        ("no-such-bucket-x", "data/", "bucket does not exist"),
        (None, "missing.txt", "no such key"),
        (None, "missing/", "no objects under prefix 'missing/'"),
    ],
)
async def test_missing(
    endpoint: str, bucket: str, tmp_path: Path, bucket_name: str | None, key: str, message: str
) -> None:
    with pytest.raises(EngineError, match=message):
        await S3(default_endpoint=endpoint).prepare(
            spec(bucket_name or bucket, key), tmp_path, requester="r"
        )
    assert list(tmp_path.iterdir()) == []


async def test_missing_version(endpoint: str, client: Any, bucket: str, tmp_path: Path) -> None:
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    with pytest.raises(EngineError, match=r"s3://.*/one.bin"):
        await S3(default_endpoint=endpoint).prepare(
            spec(bucket, "one.bin", VersionID="nope"), tmp_path, requester="r"
        )


async def test_version_or_checksum_need_a_single_key(
    endpoint: str, bucket: str, tmp_path: Path
) -> None:
    with pytest.raises(EngineError, match="need a single object key"):
        await S3(default_endpoint=endpoint).prepare(
            spec(bucket, "data/", VersionID="x"), tmp_path, requester="r"
        )


async def test_size_bound(endpoint: str, client: Any, bucket: str, tmp_path: Path) -> None:
    provider = S3(default_endpoint=endpoint, max_bytes=8)
    with pytest.raises(EngineError, match="larger than the limit of 8 bytes"):
        await provider.prepare(spec(bucket, "data/"), tmp_path, requester="r")  # 5 + 4 bytes
    client.put_object(Bucket=bucket, Key="nine", Body=b"123456789")
    with pytest.raises(EngineError, match="larger than the limit of 8 bytes"):
        await provider.prepare(spec(bucket, "nine"), tmp_path / "x", requester="r")


async def test_object_key_escaping_the_prefix(
    endpoint: str, client: Any, bucket: str, tmp_path: Path
) -> None:
    client.put_object(Bucket=bucket, Key="evil/../../x", Body=b"evil")
    with pytest.raises(EngineError, match="must be relative"):
        await S3(default_endpoint=endpoint).prepare(
            spec(bucket, "evil/"), tmp_path / "d", requester="r"
        )
    assert not (tmp_path / "x").exists()


async def test_job_chosen_endpoint_is_checked(endpoint: str, bucket: str, tmp_path: Path) -> None:
    """An endpoint other than the node's gets the URL inputs' address policy."""
    own = spec(bucket, "one.bin", Endpoint=endpoint)
    with pytest.raises(EngineError, match=r"refused: address 127\.0\.0\.1 is loopback"):
        await S3().prepare(own, tmp_path, requester="r")
    by_name = spec(bucket, "one.bin", Endpoint=endpoint.replace("127.0.0.1", "localhost"))
    with pytest.raises(EngineError, match=r"refused: localhost: address .* is loopback"):
        await S3().prepare(by_name, tmp_path, requester="r")
    allowed = S3(allow_cidr=["127.0.0.1/32"])
    assert (await allowed.prepare(by_name, tmp_path, requester="r")).read_bytes() == b"single"
    # The node's own endpoint needs no allowance.
    (tmp_path / "2").mkdir()
    assert (
        await S3(default_endpoint=endpoint).prepare(own, tmp_path / "2", requester="r")
    ).exists()


async def test_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"S3\.Bucket is required"):
        await S3().prepare(StorageSpec(StorageSource=StorageSource.S3), tmp_path, requester="r")
    with pytest.raises(EngineError, match="only http and https"):
        await S3().prepare(spec("b", "k", Endpoint="file:///x"), tmp_path, requester="r")
