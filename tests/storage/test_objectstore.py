"""ObjectStore inputs against the real nats-server: isolation per requester, digests."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from schemas.job import StorageSource, StorageSpec
from worker.errors import EngineError
from worker.storage.objectstore import ObjectStore


@pytest.fixture
async def store(nc: Client) -> AsyncIterator[tuple[str, Any]]:
    js = nc.jetstream()
    name = f"in_{uuid.uuid4().hex[:12]}"
    obs = await js.create_object_store(bucket=name)
    await obs.put("alice/data/in.txt", b"alice's data")
    await obs.put("bob/secret.txt", b"bob's secret")
    await obs.put("loose.txt", b"nobody's")
    yield name, obs
    await js.delete_object_store(name)


def spec(bucket: str, obj: str, **meta: Any) -> StorageSpec:
    return StorageSpec(
        StorageSource=StorageSource.OBJECT_STORE, Metadata={"Bucket": bucket, "Object": obj, **meta}
    )


def provider(nc: Client | None, **kwargs: Any) -> ObjectStore:
    return ObjectStore(connection=lambda: nc, **kwargs)


async def test_own_object(nc: Client, store: tuple[str, Any], tmp_path: Path) -> None:
    bucket, _ = store
    digest = hashlib.sha256(b"alice's data").hexdigest()
    s = spec(bucket, "alice/data/in.txt", Size=12, SHA256=digest)
    p = provider(nc)
    assert p.is_installed() and not p.is_local(s)
    assert p.known_size(s) == 12
    path = await p.prepare(s, tmp_path, requester="alice")
    assert path == tmp_path / "in.txt"
    assert path.read_bytes() == b"alice's data"


async def test_large_object_in_many_chunks(
    nc: Client, store: tuple[str, Any], tmp_path: Path
) -> None:
    bucket, obs = store
    data = bytes(range(256)) * 2000  # 512000 bytes: 4 chunks of 128 KiB
    await obs.put("alice/big", data)
    b64 = base64.b64encode(hashlib.sha256(data).digest()).decode()
    path = await provider(nc).prepare(
        spec(bucket, "alice/big", SHA256=b64), tmp_path, requester="alice"
    )
    assert path.read_bytes() == data
    with pytest.raises(EngineError, match="larger than the limit of 500000 bytes"):
        await provider(nc, max_bytes=500_000).prepare(
            spec(bucket, "alice/big"), tmp_path / "x", requester="alice"
        )


async def test_empty_object(nc: Client, store: tuple[str, Any], tmp_path: Path) -> None:
    bucket, obs = store
    await obs.put("alice/empty", b"")
    path = await provider(nc).prepare(spec(bucket, "alice/empty"), tmp_path, requester="alice")
    assert path.read_bytes() == b""


@pytest.mark.parametrize(
    ("requester", "obj"),
    [
        ("bob", "alice/data/in.txt"),  # another requester's object
        ("alice", "bob/secret.txt"),
        ("alice", "loose.txt"),  # under nobody's prefix
        ("alice", "alice/"),
        ("ali", "alice/data/in.txt"),  # a prefix of the name is not the owner
        ("alice/data", "alice/data/in.txt"),  # a requester is one name
        ("", "/data/in.txt"),
    ],
)
async def test_other_requesters_refused(
    nc: Client, store: tuple[str, Any], tmp_path: Path, requester: str, obj: str
) -> None:
    bucket, _ = store
    with pytest.raises(EngineError, match=r"refused|cannot own objects"):
        await provider(nc).prepare(spec(bucket, obj), tmp_path, requester=requester)
    assert list(tmp_path.iterdir()) == []


async def test_traversal_in_the_name_refused(
    nc: Client, store: tuple[str, Any], tmp_path: Path
) -> None:
    bucket, obs = store
    await obs.put("alice/../bob/secret.txt", b"x")
    with pytest.raises(EngineError, match="must be relative"):
        await provider(nc).prepare(
            spec(bucket, "alice/../bob/secret.txt"), tmp_path, requester="alice"
        )


async def test_link_to_another_requester_refused(
    nc: Client, store: tuple[str, Any], tmp_path: Path
) -> None:
    """A link under one's own prefix must not reach another requester's object."""
    bucket = store[0]
    name = "alice/link"
    meta = {
        "name": name,
        "bucket": bucket,
        "nuid": uuid.uuid4().hex,
        "size": 0,
        "chunks": 0,
        "digest": "",
        "options": {"link": {"bucket": bucket, "name": "bob/secret.txt"}},
    }
    subject = f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
    await nc.jetstream().publish(subject, json.dumps(meta).encode(), headers={"Nats-Rollup": "sub"})
    _, obs = store
    assert (await obs.get(name)).data == b"bob's secret"  # what nats-py's get would do
    with pytest.raises(EngineError, match="links are not followed"):
        await provider(nc).prepare(spec(bucket, name), tmp_path, requester="alice")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"SHA256": hashlib.sha256(b"other").hexdigest()}, "SHA256 mismatch"),
        ({"SHA256": "not-a-digest"}, "SHA256 mismatch"),
        ({"Size": 13}, "size mismatch"),
    ],
)
async def test_mismatch(
    nc: Client, store: tuple[str, Any], tmp_path: Path, meta: dict[str, Any], message: str
) -> None:
    bucket, _ = store
    with pytest.raises(EngineError, match=message):
        await provider(nc).prepare(
            spec(bucket, "alice/data/in.txt", **meta), tmp_path, requester="alice"
        )
    assert list(tmp_path.iterdir()) == []


async def test_missing(nc: Client, store: tuple[str, Any], tmp_path: Path) -> None:
    bucket, _ = store
    with pytest.raises(EngineError, match="no such object"):
        await provider(nc).prepare(spec(bucket, "alice/nope"), tmp_path, requester="alice")
    with pytest.raises(EngineError, match="no such bucket"):
        await provider(nc).prepare(spec("no_such_bucket_x", "alice/x"), tmp_path, requester="alice")


@pytest.mark.parametrize(
    "metadata",
    [{"Object": "alice/x"}, {"Bucket": "a.b", "Object": "alice/x"}, {"Bucket": "b"}, {}],
)
async def test_bad_metadata(nc: Client, tmp_path: Path, metadata: dict[str, Any]) -> None:
    s = StorageSpec(StorageSource=StorageSource.OBJECT_STORE, Metadata=metadata)
    with pytest.raises(EngineError, match="Metadata"):
        await provider(nc).prepare(s, tmp_path, requester="alice")
    assert provider(nc).known_size(s) == 0


async def test_not_connected(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="not connected"):
        await provider(None).prepare(spec("b", "alice/x"), tmp_path, requester="alice")
