"""The Local publisher against real HTTP: publish, download, re-publish, refuse traversal."""

from __future__ import annotations

import asyncio
import io
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from schemas.job import Publisher, StorageSource
from tests.publishers import make_execution, make_results
from worker.errors import PublishError
from worker.publishers.local import LocalPublisher, split_listen, url_host


@pytest.fixture
async def publisher(tmp_path: Path) -> AsyncIterator[LocalPublisher]:
    pub = LocalPublisher(directory=tmp_path / "data" / "published", listen="127.0.0.1:0")
    await pub.start()
    yield pub
    await pub.stop()


async def download(url: str) -> tuple[int, bytes, dict[str, str]]:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.get(url) as response,
    ):
        return response.status, await response.read(), dict(response.headers)


async def raw_get(base_url: str, target: str) -> tuple[int, bytes]:
    """Send ``target`` exactly as given (no client-side normalisation)."""
    parts = urlsplit(base_url)
    assert parts.hostname is not None and parts.port is not None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode("latin-1")
        )
        await writer.drain()
        response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = response.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def test_publish_then_download(tmp_path: Path, publisher: LocalPublisher) -> None:
    results = make_results(tmp_path / "results")
    execution = make_execution(publisher=Publisher.LOCAL)
    spec = await publisher.publish(execution, results)
    assert spec.StorageSource is StorageSource.URL_DOWNLOAD
    expected_url = f"{publisher.base_url}/{execution.id}.tar.gz"
    assert expected_url == spec.URL
    assert spec.URL.startswith("http://127.0.0.1:")
    on_disk = publisher.directory / f"{execution.id}.tar.gz"
    status, body, headers = await download(spec.URL)
    assert status == 200
    assert body == on_disk.read_bytes()
    assert headers["Content-Type"] == "application/gzip"
    assert "Content-Encoding" not in headers
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        stdout = tar.extractfile("stdout")
        assert stdout is not None
        assert stdout.read() == b"hello\n"
        blob = tar.extractfile("outputs/blob.bin")
        assert blob is not None
        assert blob.read() == (results / "outputs" / "blob.bin").read_bytes()
    assert sorted(p.name for p in publisher.directory.iterdir()) == [on_disk.name]


async def test_republish_is_idempotent(tmp_path: Path, publisher: LocalPublisher) -> None:
    results = make_results(tmp_path / "results")
    execution = make_execution(publisher=Publisher.LOCAL)
    first = await publisher.publish(execution, results)
    _, body_first, _ = await download(first.URL)
    second = await publisher.publish(execution, results)
    assert second == first
    _, body_second, _ = await download(second.URL)
    assert body_second == body_first


async def test_restart_keeps_serving_with_configured_base_url(tmp_path: Path) -> None:
    results = make_results(tmp_path / "results")
    execution = make_execution(publisher=Publisher.LOCAL)
    directory = tmp_path / "published"
    pub = LocalPublisher(directory=directory, base_url="https://results.example/r/")
    with pytest.raises(PublishError, match="not serving"):
        await pub.publish(execution, results)
    await pub.start()
    try:
        spec = await pub.publish(execution, results)
        expected_url = f"https://results.example/r/{execution.id}.tar.gz"
        assert expected_url == spec.URL
        archive = (directory / f"{execution.id}.tar.gz").read_bytes()
    finally:
        await pub.stop()
    again = LocalPublisher(directory=directory)
    await again.start()
    served = again.base_url
    try:
        assert served.startswith("http://127.0.0.1:")
        status, body, _ = await download(f"{again.base_url}/{execution.id}.tar.gz")
        assert (status, body) == (200, archive)
        again.remove(execution.id)
        status, _, _ = await download(f"{again.base_url}/{execution.id}.tar.gz")
        assert status == 404
    finally:
        await again.stop()
    assert not again.serving
    with pytest.raises(aiohttp.ClientConnectionError):  # stopped: nothing listens there
        await download(f"{served}/{execution.id}.tar.gz")


async def test_only_archive_names_are_served(tmp_path: Path, publisher: LocalPublisher) -> None:
    results = make_results(tmp_path / "results")
    execution = make_execution(publisher=Publisher.LOCAL)
    await publisher.publish(execution, results)
    data_dir = publisher.directory.parent
    (data_dir / "secret.tar.gz").write_bytes(b"SECRET")
    (data_dir / "worker.db").write_bytes(b"SECRET")
    (publisher.directory / "e-link.tar.gz").symlink_to(data_dir / "secret.tar.gz")
    (publisher.directory / ".e-x.tar.gz.tmp").write_bytes(b"SECRET")
    (publisher.directory / "notes.txt").write_bytes(b"SECRET")
    base = publisher.base_url
    for target in [
        "/../secret.tar.gz",
        "/..%2fsecret.tar.gz",
        "/%2e%2e/secret.tar.gz",
        "/%2e%2e%2fsecret.tar.gz",
        "/..%5csecret.tar.gz",
        f"/{execution.id}.tar.gz/../../secret.tar.gz",
        "/e-link.tar.gz",
        "/.e-x.tar.gz.tmp",
        "/notes.txt",
        "/worker.db",
        "/",
        f"/sub/{execution.id}.tar.gz",
        f"/{execution.id}",
        "/e-missing.tar.gz",
    ]:
        status, body = await raw_get(base, target)
        assert status in (400, 404), target
        assert b"SECRET" not in body, target
    status, body = await raw_get(base, f"/{execution.id}.tar.gz")
    assert status == 200
    assert body == (publisher.directory / f"{execution.id}.tar.gz").read_bytes()


async def test_head_and_range(tmp_path: Path, publisher: LocalPublisher) -> None:
    results = make_results(tmp_path / "results")
    spec = await publisher.publish(make_execution(publisher=Publisher.LOCAL), results)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.head(spec.URL) as head:
            assert head.status == 200
            size = int(head.headers["Content-Length"])
        async with session.get(spec.URL, headers={"Range": "bytes=0-1"}) as part:
            assert part.status == 206
            assert await part.read() == b"\x1f\x8b"
    assert size > 100


def test_listen_and_url_helpers() -> None:
    assert split_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert split_listen("[::1]:0") == ("::1", 0)
    assert split_listen(":9") == ("", 9)
    with pytest.raises(ValueError):
        split_listen("nope")
    assert url_host("::1") == "[::1]"
    assert url_host("10.1.2.3") == "10.1.2.3"
    assert url_host("results.local") == "results.local"
    assert url_host("0.0.0.0") not in ("0.0.0.0", "")
