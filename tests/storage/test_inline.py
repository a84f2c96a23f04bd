"""Inline inputs: RFC 2397 data URLs, base64 or percent-encoded, files and archives."""

from __future__ import annotations

import base64
import io
import tarfile
from pathlib import Path
from urllib.parse import quote_from_bytes

import pytest

from schemas.job import StorageSource, StorageSpec
from worker.errors import EngineError
from worker.storage.inline import Inline


def spec(url: str, name: str = "") -> StorageSpec:
    return StorageSpec(StorageSource=StorageSource.INLINE, URL=url, Name=name, path="/inputs")


def b64(data: bytes, media: str = "text/plain") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def targz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as out:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 100])
async def test_base64_file(tmp_path: Path, size: int) -> None:
    data = bytes(range(256))[:size] * 1
    provider = Inline()
    assert provider.known_size(spec(b64(data))) == size
    path = await provider.prepare(spec(b64(data)), tmp_path, requester="r")
    assert path == tmp_path / "inline"
    assert path.read_bytes() == data


async def test_percent_encoded_with_name(tmp_path: Path) -> None:
    data = "héllo, wörld / 100%\n".encode()
    url = "data:text/plain;charset=utf-8," + quote_from_bytes(data)
    provider = Inline()
    assert provider.known_size(spec(url)) == len(data)
    path = await provider.prepare(spec(url, name="greeting.txt"), tmp_path, requester="r")
    assert path == tmp_path / "greeting.txt"
    assert path.read_bytes() == data


async def test_plain_text_and_padding_free_base64(tmp_path: Path) -> None:
    assert await Inline().prepare(spec("data:,hi"), tmp_path, requester="r") == tmp_path / "inline"
    assert (tmp_path / "inline").read_bytes() == b"hi"
    unpadded = "data:;base64," + base64.b64encode(b"ab").decode().rstrip("=")
    out = await Inline().prepare(spec(unpadded, "x"), tmp_path, requester="r")
    assert out.read_bytes() == b"ab"


async def test_gzip_tar_is_extracted_to_a_folder(tmp_path: Path) -> None:
    url = b64(targz({"a.txt": b"alpha", "sub/b.txt": b"beta"}), "application/gzip")
    path = await Inline().prepare(spec(url, "ctx"), tmp_path, requester="r")
    assert path == tmp_path / "ctx"
    assert (path / "a.txt").read_bytes() == b"alpha"
    assert (path / "sub/b.txt").read_bytes() == b"beta"


async def test_archive_members_are_checked(tmp_path: Path) -> None:
    url = b64(targz({"../escape": b"evil"}), "application/gzip")
    with pytest.raises(EngineError, match="must be relative"):
        await Inline().prepare(spec(url), tmp_path, requester="r")
    assert list(tmp_path.iterdir()) == []
    assert not (tmp_path.parent / "escape").exists()


async def test_archive_expanding_past_the_limit(tmp_path: Path) -> None:
    url = b64(targz({"zeros": bytes(100_000)}), "application/gzip")
    with pytest.raises(EngineError, match="larger than the limit of 1000 bytes"):
        await Inline(max_bytes=1000).prepare(spec(url), tmp_path, requester="r")
    assert list(tmp_path.iterdir()) == []


async def test_too_large(tmp_path: Path) -> None:
    provider = Inline(max_bytes=10)
    await provider.prepare(spec(b64(b"x" * 10)), tmp_path, requester="r")
    with pytest.raises(EngineError, match="larger than the limit of 10 bytes"):
        await provider.prepare(spec(b64(b"x" * 11), "big"), tmp_path, requester="r")
    assert not (tmp_path / "big").exists()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://example.com/x", "not a data URL"),
        ("", "not a data URL"),
        ("data:text/plain;base64", "no ','"),
        ("data:;base64,@@@@", "invalid base64"),
        ("data:;base64,YQ=a", "invalid base64"),
    ],
)
async def test_bad_urls(tmp_path: Path, url: str, message: str) -> None:
    provider = Inline()
    assert provider.known_size(spec(url)) >= 0
    with pytest.raises(EngineError, match=message):
        await provider.prepare(spec(url), tmp_path, requester="r")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../x", "a/b", ".."])
async def test_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(EngineError, match="invalid Inline input name"):
        await Inline().prepare(spec(b64(b"x"), name), tmp_path, requester="r")


def test_declared_local_and_installed() -> None:
    provider = Inline()
    assert provider.name == "Inline"
    assert provider.is_installed()
    assert provider.is_local(spec(b64(b"x")))
    assert provider.known_size(spec("not a data url")) == 0
