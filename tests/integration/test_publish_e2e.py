"""A Python job writes an output file; the requester downloads it from the Local and the
ObjectStore publishers (PROTOCOL.md §7), through a node with its real plugins."""

from __future__ import annotations

import asyncio
import io
import tarfile
import urllib.request
import uuid
from typing import Any

import msgspec
from nats.aio.client import Client

from schemas.callbacks import PublishResult, RunResult
from schemas.job import Job
from tests.integration.conftest import NodeFactory
from worker.requester import Requester

PROGRAM = "open('outputs/hello.txt', 'w').write('hello from python\\n')\nprint('done')"


def python_job(publisher: dict[str, Any]) -> Job:
    spec = {
        "Engine": "Language",
        "Language": {"Language": "python", "Command": PROGRAM},
        "PublisherSpec": publisher,
        "outputs": [{"Name": "outputs", "path": "/outputs"}],
    }
    return msgspec.convert({"Metadata": {"ID": f"job-{uuid.uuid4().hex[:8]}"}, "Spec": spec}, Job)


def members(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


async def run(requester: Requester, node_id: str, job: Job) -> PublishResult:
    bid = await requester.ask(node_id, job)
    assert bid.Accepted, bid.Reason
    await requester.accept(node_id, bid.ExecutionID)
    callbacks = await requester.run_to_completion(node_id, bid.ExecutionID, timeout=60)
    assert isinstance(callbacks[0], RunResult), callbacks
    assert callbacks[0].RunCommandResult is not None
    assert callbacks[0].RunCommandResult.stdout == "done\n"
    assert isinstance(callbacks[-1], PublishResult), callbacks
    return callbacks[-1]


async def test_local_publisher_serves_the_result(
    make_node: NodeFactory, nc: Client, prefix: str
) -> None:
    await make_node("n1", language_uid_range="470000-470099")
    requester = Requester(nc=nc, requester_id="r1", prefix=prefix)
    await requester.start()
    try:
        published = await run(requester, "n1", python_job({"Type": "Local"}))
    finally:
        await requester.close()
    spec = published.PublishResult
    assert spec.StorageSource is not None and spec.StorageSource.value == "URLDownload"
    assert spec.URL.endswith(f"/{published.ExecutionID}.tar.gz")

    def download() -> bytes:
        with urllib.request.urlopen(spec.URL, timeout=10) as response:
            return bytes(response.read())

    files = members(await asyncio.to_thread(download))
    assert files["outputs/hello.txt"] == b"hello from python\n"
    assert files["stdout"] == b"done\n"


async def test_object_store_publisher_stores_the_result(
    make_node: NodeFactory, nc: Client, prefix: str
) -> None:
    bucket = f"results-{uuid.uuid4().hex[:8]}"
    await nc.jetstream().create_object_store(bucket)
    await make_node("n1", language_uid_range="470100-470199")
    requester = Requester(nc=nc, requester_id="r1", prefix=prefix)
    await requester.start()
    try:
        job = python_job({"Type": "ObjectStore", "Params": {"Bucket": bucket}})
        published = await run(requester, "n1", job)
    finally:
        await requester.close()
    spec = published.PublishResult
    assert spec.StorageSource is not None and spec.StorageSource.value == "ObjectStore"
    name = spec.Metadata["Object"]
    assert name == f"r1/{published.ExecutionID}.tar.gz"
    store = await nc.jetstream().object_store(bucket)
    stored = await store.get(name)
    assert stored.data is not None
    assert members(stored.data)["outputs/hello.txt"] == b"hello from python\n"


async def test_hostile_job_specs_fail_cleanly(
    make_node: NodeFactory, nc: Client, prefix: str
) -> None:
    """An output named ../x and a loopback URL input end in a ComputeError naming the
    problem; HTTP networking without an allowlist proxy is declined at bid time."""
    await make_node("n1", language_uid_range="470200-470299")
    requester = Requester(nc=nc, requester_id="r1", prefix=prefix)
    await requester.start()
    try:
        escape = python_job({"Type": "Noop"})
        escape.Spec.outputs[0].Name = "../x"
        loopback = python_job({"Type": "Noop"})
        loopback.Spec.inputs = msgspec.convert(
            [{"StorageSource": "URLDownload", "URL": "http://127.0.0.1:1/x", "path": "/in"}],
            list[type(loopback.Spec.outputs[0])],  # type: ignore[misc]
        )
        for job, needle in ((escape, "invalid output name"), (loopback, "127.0.0.1")):
            bid = await requester.ask("n1", job)
            assert bid.Accepted, bid.Reason
            await requester.accept("n1", bid.ExecutionID)
            failure = await requester.wait_callback(bid.ExecutionID, timeout=30)
            assert type(failure).__name__ == "ComputeError", failure
            assert needle in failure.Err, failure  # type: ignore[union-attr]
        http = python_job({"Type": "Noop"})
        http.Spec.Network.Type = type(http.Spec.Network.Type)("HTTP")
        declined = await requester.ask("n1", http)
        assert not declined.Accepted
        assert declined.Reason.startswith("networking"), declined.Reason
    finally:
        await requester.close()
