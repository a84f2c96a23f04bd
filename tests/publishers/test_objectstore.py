"""The ObjectStore publisher against a real nats-server with JetStream."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import ObjectNotFoundError

from schemas.job import Publisher, StorageSource
from tests.publishers import Blocker, make_execution, make_results
from worker.errors import EngineError, PublishError
from worker.publishers.archive import write_archive
from worker.publishers.objectstore import ObjectStorePublisher, digest_of
from worker.storage.objectstore import ObjectStore as ObjectStoreInput
from worker.store.types import Execution


@pytest.fixture
async def bucket(nc: Client) -> AsyncIterator[str]:
    name = f"results-{uuid.uuid4().hex[:12]}"
    await nc.jetstream().create_object_store(bucket=name)
    yield name
    await nc.jetstream().delete_object_store(name)


def os_execution(bucket: str, requester: str = "req-a") -> Execution:
    return make_execution(
        requester=requester, publisher=Publisher.OBJECT_STORE, params={"Bucket": bucket}
    )


async def messages(js: JetStreamContext, bucket: str) -> int:
    return int((await js.stream_info(f"OBJ_{bucket}")).state.messages)


async def test_publish_and_read_back(tmp_path: Path, nc: Client, bucket: str) -> None:
    results = make_results(tmp_path / "results")
    execution = os_execution(bucket)
    work = tmp_path / "data" / "work"  # created when missing, left empty
    publisher = ObjectStorePublisher(connection=lambda: nc, scratch_dir=work)
    spec = await publisher.publish(execution, results)
    assert list(work.iterdir()) == []
    name = f"req-a/{execution.id}.tar.gz"
    expected = tmp_path / "expected.tar.gz"
    await write_archive(results, expected)
    data = expected.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    assert spec.StorageSource is StorageSource.OBJECT_STORE
    assert spec.Metadata == {"Bucket": bucket, "Object": name, "Size": len(data), "SHA256": sha}
    # nats-py's reader checks the object's digest too.
    got = await (await nc.jetstream().object_store(bucket)).get(name)
    assert got.data == data
    assert got.info.digest == digest_of(sha)
    assert got.info.size == len(data)
    # And the spec works as an ObjectStore input of the same requester.
    dest = tmp_path / "input"
    dest.mkdir()
    reader = ObjectStoreInput(connection=lambda: nc)
    path = await reader.prepare(spec, dest, requester="req-a")
    assert path.read_bytes() == data
    with pytest.raises(EngineError, match="refused"):
        await reader.prepare(spec, tmp_path, requester="req-b")


async def test_republish_is_idempotent(tmp_path: Path, nc: Client, bucket: str) -> None:
    results = make_results(tmp_path / "results")
    execution = os_execution(bucket)
    js = nc.jetstream()
    first = await ObjectStorePublisher(connection=lambda: nc).publish(execution, results)
    store = await js.object_store(bucket)
    info = await store.get_info(str(first.Metadata["Object"]))
    count = await messages(js, bucket)
    # A restarted node (a new publisher) publishes again: nothing new is stored.
    second = await ObjectStorePublisher(connection=lambda: nc).publish(execution, results)
    assert second == first
    assert (await store.get_info(str(first.Metadata["Object"]))).nuid == info.nuid
    assert await messages(js, bucket) == count


async def test_changed_content_replaces_the_object(tmp_path: Path, nc: Client, bucket: str) -> None:
    results = make_results(tmp_path / "results")
    execution = os_execution(bucket)
    js = nc.jetstream()
    publisher = ObjectStorePublisher(connection=lambda: nc)
    first = await publisher.publish(execution, results)
    (results / "stdout").write_text("changed\n")
    second = await publisher.publish(execution, results)
    assert second.Metadata["SHA256"] != first.Metadata["SHA256"]
    got = await (await js.object_store(bucket)).get(str(second.Metadata["Object"]))
    assert got.data is not None
    assert hashlib.sha256(got.data).hexdigest() == second.Metadata["SHA256"]
    assert got.info.chunks is not None
    assert await messages(js, bucket) == got.info.chunks + 1  # old chunks purged


async def test_cancel_removes_the_partial_upload(tmp_path: Path, nc: Client, bucket: str) -> None:
    results = make_results(tmp_path / "results")
    (results / "outputs" / "noise.bin").write_bytes(os.urandom(2 << 20))  # ~16 chunks
    execution = os_execution(bucket)
    js = nc.jetstream()
    blocker = Blocker(after=3)
    publisher = ObjectStorePublisher(connection=lambda: nc, on_progress=blocker)
    task = asyncio.create_task(publisher.publish(execution, results))
    await asyncio.wait_for(blocker.reached.wait(), 30)
    assert await messages(js, bucket) == 3
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await messages(js, bucket) == 0
    with pytest.raises(ObjectNotFoundError):
        await (await js.object_store(bucket)).get_info(f"req-a/{execution.id}.tar.gz")


async def test_cancel_after_restart_removes_the_earlier_object(
    tmp_path: Path, nc: Client, bucket: str
) -> None:
    results = make_results(tmp_path / "results")
    (results / "outputs" / "noise.bin").write_bytes(os.urandom(1 << 20))
    execution = os_execution(bucket)
    js = nc.jetstream()
    await ObjectStorePublisher(connection=lambda: nc).publish(execution, results)
    (results / "outputs" / "noise.bin").write_bytes(os.urandom(1 << 20))
    blocker = Blocker(after=2)
    publisher = ObjectStorePublisher(connection=lambda: nc, on_progress=blocker)
    task = asyncio.create_task(publisher.publish(execution, results))
    await asyncio.wait_for(blocker.reached.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    store = await js.object_store(bucket)
    with pytest.raises(ObjectNotFoundError):
        await store.get_info(f"req-a/{execution.id}.tar.gz")
    assert await messages(js, bucket) == 1  # only the deleted marker


async def test_errors(tmp_path: Path, nc: Client) -> None:
    results = make_results(tmp_path / "results")
    publisher = ObjectStorePublisher(connection=lambda: nc)
    with pytest.raises(PublishError, match="bucket missing-bucket not found"):
        await publisher.publish(os_execution("missing-bucket"), results)
    with pytest.raises(PublishError, match="invalid ObjectStore bucket name"):
        await publisher.publish(os_execution("a.b"), results)
    no_params = make_execution(publisher=Publisher.OBJECT_STORE)
    with pytest.raises(PublishError, match="Bucket is required"):
        await publisher.publish(no_params, results)
    offline = ObjectStorePublisher(connection=lambda: None)
    with pytest.raises(PublishError, match="not connected"):
        await offline.publish(os_execution("b"), results)
